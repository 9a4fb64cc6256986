"""The method trade-off figure: trainable parameters, training-step time and
accuracy, per method.

Two panels, one color per method:

- left, from the committed results of `bench_methods.py`
  (`benchmarks/results/methods-<backend>.json`, one file per backend): x is
  the number of trainable parameters (log scale), y the median training-step
  time, one marker per backend (MiniLM-sized BERT, LoRA/HUT rank 8);
- right, from the methods study (`studies/methods.py`,
  `docs/studies/methods/accuracy.json`): test accuracy on few-shot BBC News
  (mean and 95% t interval over seeds, at the learning rate picked on
  validation) against that study's trainable parameters (rank 2 there).

Writes `docs/figures/method_tradeoff.png`, shown on the docs' home page.

    nox -s figures                       # or:
    python benchmarks/plot_tradeoff.py [--accuracy FILE] [--out PNG]

Without an accuracy file (`--accuracy none`) the figure has the left panel
only.
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
ACCURACY = HERE.parent / "docs" / "studies" / "methods" / "accuracy.json"

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
# The methods study's budgets (rank 2), for the accuracy panel.
STUDY_LABELS = {
    "full": "full fine-tuning",
    "keras_lora": "Keras enable_lora(2)",
    "lora": "ka.LoRA(2)",
    "hut": "ka.HUT(2)",
    "goft": "ka.GOFT",
    "qgoft": "ka.QGOFT",
    "dora": "ka.DoRA(2)",
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
    """Draws the figure.

    Args:
        runs: `{backend: benchmark dict}`, as `load` returns.
        accuracy: the methods study's `accuracy.json` contents, or None.
        out: the PNG to write.

    Returns:
        `out`.
    """
    methods_accuracy = (accuracy or {}).get("methods", {})
    if methods_accuracy:
        fig, (ax, right) = plt.subplots(
            1, 2, figsize=(13, 5), dpi=120, gridspec_kw={"width_ratios": [3, 2]}
        )
        _accuracy_panel(right, methods_accuracy)
    else:
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
        # LoRA and HUT have the same parameter count: put their labels apart;
        # full fine-tuning is at the right edge: label it on the left.
        offset, align = {
            "hut": ((8, 6), "left"),
            "lora": ((8, -14), "left"),
            "pissa": ((-8, -4), "right"),
            "full": ((-8, -12), "right"),
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
        f"step time ({first['benchmark']}): {model['num_layers']} layers, hidden "
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


def _accuracy_panel(ax, methods):
    """Test accuracy (mean, 95% t interval) per method, best on top; each
    label names the method's trainable parameters in the study."""
    order = sorted(methods, key=lambda m: methods[m]["accuracy_pct"])
    for y, method in enumerate(order):
        row = methods[method]
        mean = row["accuracy_pct"]
        low, high = row["ci95"]
        ax.errorbar(
            mean,
            y,
            xerr=None if low is None else [[mean - low], [high - mean]],
            fmt="D",
            ms=7,
            capsize=4,
            color=COLORS.get(method, "black"),
            markeredgecolor="black",
            markeredgewidth=0.5,
            zorder=3,
        )
        ax.annotate(
            f"{mean:.1f}%",
            (mean, y),
            xytext=(0, 7),
            textcoords="offset points",
            ha="center",
            fontsize=8,
            color=COLORS.get(method, "black"),
        )
    ax.set_yticks(
        range(len(order)),
        [
            f"{STUDY_LABELS.get(m, m)}\n{methods[m]['trainable_params']:,} params"
            for m in order
        ],
        fontsize=8,
    )
    ax.set_ylim(-0.6, len(order) - 0.4)
    ax.set_xlabel("test accuracy % (mean, 95% t interval)")
    seeds = sorted({row["seeds"] for row in methods.values()})
    ax.set_title(
        "accuracy: few-shot BBC News (8/class), MiniLM, query+value, "
        f"{'/'.join(map(str, seeds))} seeds",
        fontsize=9,
    )
    ax.grid(True, axis="x", alpha=0.3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--accuracy",
        default=str(ACCURACY),
        help="the methods study's accuracy.json, or 'none' (default: %(default)s)",
    )
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    args = parser.parse_args()
    accuracy = None
    if args.accuracy != "none":
        path = pathlib.Path(args.accuracy)
        if not path.is_file():
            raise SystemExit(f"--accuracy {args.accuracy!r}: no such file")
        accuracy = json.loads(path.read_text())
        if not isinstance(accuracy.get("methods"), dict):
            raise SystemExit(
                f"--accuracy {args.accuracy!r}: expected the methods study's "
                "accuracy.json (an object with a 'methods' object)"
            )
    out = plot(load(), accuracy, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
