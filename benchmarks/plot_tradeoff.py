"""The method trade-off figure: trainable parameters against training-step time.

Reads the committed results of `bench_methods.py`
(`benchmarks/results/methods-<backend>.json`, one file per backend) and draws
one point per method and backend: x is the number of trainable parameters
(log scale), y the median training-step time. Writes
`docs/figures/method_tradeoff.png`, shown on the docs' home page.

    nox -s figures                       # or:
    python benchmarks/plot_tradeoff.py [--accuracy FILE] [--out PNG]

Accuracy is not in the benchmark files (they time steps of a randomly
initialized model). `--accuracy FILE` takes a JSON object
`{"<method>": <test accuracy in %>, ...}` keyed like the benchmark's `method`
field (`lora`, `hut`, `goft`, `qgoft`, `full`, `keras_lora`), and writes each
value next to its method's points. `studies/methods.py` writes one,
`docs/studies/methods/accuracy.json` (few-shot BBC News; note its budgets: LoRA
and HUT rank 2 there, rank 8 in the benchmark; keys starting with `_` are
ignored). Without it the figure shows parameters and time only.
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = HERE.parent / "docs" / "figures" / "method_tradeoff.png"

LABELS = {
    "full": "full fine-tuning",
    "keras_lora": "Keras enable_lora(8)",
    "lora": "ka.LoRA(8)",
    "hut": "ka.HUT(8)",
    "goft": "ka.GOFT",
    "qgoft": "ka.QGOFT",
    "dora": "ka.DoRA",
    "pissa": "ka.LoRA(8, pissa)",
}
COLORS = {
    "full": "tab:gray",
    "keras_lora": "tab:orange",
    "lora": "tab:blue",
    "hut": "tab:green",
    "goft": "tab:purple",
    "qgoft": "tab:red",
    "dora": "tab:brown",
    "pissa": "tab:cyan",
}
MARKERS = {"jax": "o", "tensorflow": "s"}


def load(results=RESULTS):
    """`{backend: benchmark dict}` for every committed `methods-<backend>.json`."""
    runs = {}
    for path in sorted(results.glob("methods-*.json")):
        data = json.loads(path.read_text())
        if data.get("config", {}).get("quick"):
            continue  # smoke runs are not data
        runs[data["backend"]] = data
    if not runs:
        raise SystemExit(f"no methods-<backend>.json in {results}")
    return runs


def plot(runs, accuracy=None, out=OUT):
    accuracy = accuracy or {}
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    methods = []
    for backend, data in runs.items():
        for row in data["results"]:
            method = row["method"]
            if method not in methods:
                methods.append(method)
            ax.scatter(
                row["trainable_params"],
                row["median_step_seconds"],
                marker=MARKERS.get(backend, "^"),
                s=60,
                color=COLORS.get(method, "black"),
                edgecolor="black",
                linewidth=0.5,
                zorder=3,
            )
    # One label per method, next to its highest point.
    for method in methods:
        rows = [
            row
            for data in runs.values()
            for row in data["results"]
            if row["method"] == method
        ]
        top = max(rows, key=lambda row: row["median_step_seconds"])
        label = LABELS.get(method, method)
        if method in accuracy:
            label += f"\naccuracy {accuracy[method]:.1f}%"
        # LoRA and HUT have the same parameter count: put their labels apart;
        # full fine-tuning is at the right edge: label it on the left.
        offset, align = {
            "hut": ((8, 6), "left"),
            "lora": ((8, -14), "left"),
            "pissa": ((-8, -4), "right"),
            "full": ((-8, 4), "right"),
        }.get(method, ((8, 4), "left"))
        ax.annotate(
            label,
            (top["trainable_params"], top["median_step_seconds"]),
            xytext=offset,
            textcoords="offset points",
            ha=align,
            fontsize=8,
            color=COLORS.get(method, "black"),
        )
    for backend, marker in MARKERS.items():
        if backend in runs:
            ax.scatter(
                [],
                [],
                marker=marker,
                color="white",
                edgecolor="black",
                label=f"{backend} backend",
            )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("median training-step time (s)")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    first = next(iter(runs.values()))
    model = first["config"]["model"]
    ax.set_title(
        f"{first['benchmark']}: {model['num_layers']} layers, hidden "
        f"{model['hidden_dim']}, batch {first['config']['batch']} x "
        f"{first['config']['sequence_length']} tokens, "
        f"{first['machine']['cpu_count']} CPU cores",
        fontsize=9,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    # No software version or date in the file: regenerating the same data gives
    # the same PNG.
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accuracy", type=pathlib.Path, help="JSON {method: %}")
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    args = parser.parse_args()
    accuracy = json.loads(args.accuracy.read_text()) if args.accuracy else None
    out = plot(load(), accuracy, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
