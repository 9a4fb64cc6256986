"""Training-step time of each adaptation method on a MiniLM-sized BERT.

Builds a 6-layer, 384-wide BERT classifier from its config (random weights,
no download) once per method, compiles it with AdamW and
`jit_compile=True`, and measures the median wall time of `train_on_batch`
on one batch (16 x 128 tokens) after warm-up, under the Keras backend set by
`KERAS_BACKEND`. The methods are timed in interleaved rounds (one step of
every method per round, by default), so that a change of machine load hits
them all alike and the ratios stay meaningful.

Methods: full fine-tuning; Keras' built-in `backbone.enable_lora(8)`
(query and value, its default); and keras_adapters' LoRA r=8, HUT r=8 (the
same parameter count as LoRA), LoRA r=8 with PiSSA's start (its kept initial
factors cost two more rank-8 products per call), DoRA r=8, GOFT and qGOFT,
each on query and value.

Usage:

    KERAS_BACKEND=jax python benchmarks/bench_methods.py
    KERAS_BACKEND=tensorflow python benchmarks/bench_methods.py --quick

It prints a table (method, trainable parameters, median step seconds and
ratio to our LoRA, and the same for the process's CPU time per step, which
other jobs on a shared machine disturb less) and writes JSON to `--output`
(default `benchmarks/results/methods-<backend>.json`).
"""

import argparse
import os
import statistics
import time

import keras
import keras_hub
import numpy as np
from _common import BATCH
from _common import BERT
from _common import NUM_CLASSES
from _common import SEQ
from _common import build_classifier
from _common import make_batch
from _common import metadata
from _common import write_json

import keras_adapters as ka


def _adapter(adapter):
    def configure(model):
        ka.enable_adapter(model, adapter, targets=ka.attention("query", "value"))

    return configure


def _full(model):
    model.trainable = True


def _keras_lora(model):
    model.backbone.enable_lora(8)


METHODS = {
    "full": _full,
    "keras_lora": _keras_lora,
    "lora": _adapter(ka.LoRA(rank=8, alpha=16)),
    "hut": _adapter(ka.HUT(rank=8, alpha=16)),
    "pissa": _adapter(ka.LoRA(rank=8, alpha=16, init="pissa")),
    "dora": _adapter(ka.DoRA(rank=8, alpha=16)),
    "goft": _adapter(ka.GOFT()),
    "qgoft": _adapter(ka.QGOFT(orthogonality=1e-3)),
}
DESCRIPTIONS = {
    "full": "full fine-tuning",
    "keras_lora": "Keras backbone.enable_lora(8)",
    "lora": "ka.LoRA(rank=8), query+value",
    "hut": "ka.HUT(rank=8), query+value",
    "pissa": "ka.LoRA(rank=8, init='pissa'), query+value",
    "dora": "ka.DoRA(rank=8), query+value",
    "goft": "ka.GOFT(), query+value",
    "qgoft": "ka.QGOFT(1e-3), query+value",
}


def prepare(method, dropout=None):
    """The benchmark model with `method` applied, compiled; `dropout`
    overrides the backbone's dropout rate (0.1)."""
    model = build_classifier(**({} if dropout is None else {"dropout": dropout}))
    METHODS[method](model)
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    return model


def count(variables):
    return int(sum(np.prod(v.shape) for v in variables))


def run(methods, warmup, steps, rounds):
    x, y = make_batch()
    models, compile_seconds = {}, {}
    times = {m: [] for m in methods}
    cpu_times = {m: [] for m in methods}
    for method in methods:
        start = time.perf_counter()
        models[method] = prepare(method)
        for _ in range(warmup):
            models[method].train_on_batch(x, y)
        compile_seconds[method] = time.perf_counter() - start
        print(f"  ready: {method} ({compile_seconds[method]:.1f} s)", flush=True)
    for i in range(rounds):
        for method in methods:
            for _ in range(steps):
                start, cpu_start = time.perf_counter(), time.process_time()
                models[method].train_on_batch(x, y)
                times[method].append(time.perf_counter() - start)
                cpu_times[method].append(time.process_time() - cpu_start)
        medians = ", ".join(f"{m} {statistics.median(times[m]):.3f}" for m in methods)
        print(f"  round {i + 1}/{rounds}: median s so far: {medians}", flush=True)
    rows = []
    for method in methods:
        rows.append(
            {
                "method": method,
                "description": DESCRIPTIONS[method],
                "trainable_params": count(models[method].trainable_weights),
                "median_step_seconds": statistics.median(times[method]),
                "min_step_seconds": min(times[method]),
                # CPU time of this process (all threads) per step: less
                # sensitive than wall time to other jobs on the machine.
                "median_step_cpu_seconds": statistics.median(cpu_times[method]),
                "steps_timed": len(times[method]),
                "warmup_and_compile_seconds": compile_seconds[method],
            }
        )
    if "lora" in methods:
        reference = next(r for r in rows if r["method"] == "lora")
        for row in rows:
            row["ratio_to_lora"] = (
                row["median_step_seconds"] / reference["median_step_seconds"]
            )
            row["cpu_ratio_to_lora"] = (
                row["median_step_cpu_seconds"] / reference["median_step_cpu_seconds"]
            )
    return rows


def print_table(rows):
    header = (
        f"{'method':<12}{'trainable':>12}{'median s':>11}{'vs LoRA':>9}"
        f"{'cpu s':>9}{'vs LoRA':>9}  notes"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio, cpu_ratio = (
            f"{row[k]:.2f}x" if k in row else "-"
            for k in ("ratio_to_lora", "cpu_ratio_to_lora")
        )
        print(
            f"{row['method']:<12}{row['trainable_params']:>12,}"
            f"{row['median_step_seconds']:>11.4f}{ratio:>9}"
            f"{row['median_step_cpu_seconds']:>9.3f}{cpu_ratio:>9}"
            f"  {row['description']}"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)}",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="steps before timing; 3 (quick: 1)"
    )
    parser.add_argument(
        "--steps", type=int, default=1, help="timed steps per method per round; 1"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds over all methods; 30 (2)"
    )
    parser.add_argument("--output", default=None, help="JSON path")
    args = parser.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    steps = args.steps
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 30)
    backend = keras.backend.backend()

    print(
        f"backend={backend} keras={keras.__version__} "
        f"keras_hub={keras_hub.__version__} cpus={os.cpu_count()} "
        f"batch={BATCH} seq={SEQ} warmup={warmup} steps={steps} rounds={rounds}",
        flush=True,
    )
    rows = run(methods, warmup, steps, rounds)
    print_table(rows)
    result = {
        "benchmark": "training step, MiniLM-sized BERT classifier",
        **metadata(),
        "config": {
            "model": BERT,
            "num_classes": NUM_CLASSES,
            "batch": BATCH,
            "sequence_length": SEQ,
            "optimizer": "AdamW(1e-4)",
            "jit_compile": True,
            "warmup": warmup,
            "steps_per_round": steps,
            "rounds": rounds,
            "quick": args.quick,
        },
        "results": rows,
    }
    write_json(result, args.output, "methods" + ("-quick" if args.quick else ""))


if __name__ == "__main__":
    main()
