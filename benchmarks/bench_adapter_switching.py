"""What switching between named adapters costs, on a MiniLM-sized BERT.

`ka.set_active_adapters` drops the model's compiled functions, so the first
`predict` after a switch traces and (with `jit_compile=True`) compiles again;
later calls run at full speed. This measures, under the Keras backend set by
`KERAS_BACKEND`, for a BERT classifier (6 layers, hidden 384, random weights)
with two LoRA r=8 adapters on query and value:

- the steady `predict_on_batch` time (16 x 128 tokens) with one adapter
  active, with both active, with none, and of the plain base model;
- the first `predict_on_batch` after each switch (retrace + compile + run),
  and its ratio to the steady time.

Usage:

    KERAS_BACKEND=jax python benchmarks/bench_adapter_switching.py [--quick]

Prints a table and writes `benchmarks/results/switching-<backend>.json`.
"""

import argparse
import statistics
import time

import keras
from _common import build_classifier
from _common import make_batch
from _common import metadata
from _common import write_json

import keras_adapters as ka


def _steady(model, x, repeats):
    model.predict_on_batch(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        keras.ops.convert_to_numpy(model.predict_on_batch(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _first_call(model, x):
    start = time.perf_counter()
    keras.ops.convert_to_numpy(model.predict_on_batch(x))
    return time.perf_counter() - start


def run(repeats, switches):
    x, _ = make_batch()
    base = build_classifier()
    base.compile(jit_compile=True)
    rows = [
        {"setting": "base model (no adapters)", "steady_s": _steady(base, x, repeats)}
    ]

    model = build_classifier()
    targets = ka.attention("query", "value")
    ka.enable_adapter(model, ka.LoRA(rank=8), targets=targets, name="news")
    ka.enable_adapter(model, ka.LoRA(rank=8), targets=targets, name="sports")
    model.compile(jit_compile=True)
    settings = {
        "news": ["news"],
        "sports": ["sports"],
        "news + sports": ["news", "sports"],
        "none (disabled)": [],
    }
    for label, names in settings.items():
        firsts = []
        for _ in range(switches):
            # Switch away and back, so each first call follows a real switch.
            other = ["news"] if names != ["news"] else ["sports"]
            ka.set_active_adapters(model, other)
            ka.set_active_adapters(model, names)
            firsts.append(_first_call(model, x))
        steady = _steady(model, x, repeats)
        first = statistics.median(firsts)
        rows.append(
            {
                "setting": f"active: {label}",
                "steady_s": steady,
                "first_after_switch_s": first,
                "switch_ratio": first / steady,
            }
        )
    base_time = rows[0]["steady_s"]
    for row in rows:
        row["steady_vs_base"] = row["steady_s"] / base_time
    return rows


def print_table(rows):
    print(
        f"{'setting':<28}{'steady s':>10}{'vs base':>9}{'1st after switch s':>20}"
        f"{'ratio':>8}"
    )
    for row in rows:
        first = row.get("first_after_switch_s")
        print(
            f"{row['setting']:<28}{row['steady_s']:>10.3f}{row['steady_vs_base']:>9.2f}"
            + (f"{first:>20.2f}{row['switch_ratio']:>8.1f}" if first else "")
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--output", default=None, help="JSON path")
    args = parser.parse_args(argv)
    repeats, switches = (2, 1) if args.quick else (10, 3)
    print(f"backend={keras.backend.backend()} repeats={repeats} switches={switches}")
    rows = run(repeats, switches)
    print_table(rows)
    write_json(
        {
            "benchmark": "adapter switching, MiniLM-sized BERT classifier, predict",
            **metadata(),
            "config": {
                "batch": 16,
                "sequence_length": 128,
                "jit_compile": True,
                "repeats": repeats,
                "switches": switches,
                "quick": args.quick,
            },
            "results": rows,
        },
        args.output,
        "switching" + ("-quick" if args.quick else ""),
    )


if __name__ == "__main__":
    main()
