"""Cost of per-variable learning rates: the wrapper vs MultiOptimizer vs bare.

Builds a 6-layer, 384-wide BERT classifier from its config (random weights,
no download), adds LoRA (rank 8) to query and value, and trains it with
`jit_compile=True` and, in turn:

- `bare`: `AdamW(1e-4)`, one learning rate;
- `wrapper_ones`: `ka.optimizers.lr_multipliers(AdamW(1e-4), {})`, every
  multiplier 1 (the wrapper's fixed cost);
- `wrapper_loraplus`: `ka.optimizers.loraplus(attention_lr(AdamW(1e-4),
  value_ratio=4), ratio=16)`: three distinct rates;
- `multi_optimizer`: `keras.optimizers.MultiOptimizer` with one AdamW per
  rate (the LoRA+ rates: `B` factors at 16x), Keras' own way.

It measures the median wall time of `train_on_batch` on one batch (16 x 128
tokens; `--quick`: 8 x 32) after warm-up, in interleaved rounds so that a
change of machine load hits every variant alike, and the optimizer-state
bytes (the variables Keras checkpoints for the optimizer). Run once per
backend:

    KERAS_BACKEND=jax python benchmarks/bench_optimizers.py
    KERAS_BACKEND=tensorflow python benchmarks/bench_optimizers.py --quick

It prints a table and writes JSON to `--output` (default
`benchmarks/results/optimizers-<backend>.json`).
"""

import argparse
import os
import statistics
import time

import keras
import numpy as np
from _common import BERT
from _common import build_classifier
from _common import make_batch
from _common import metadata
from _common import write_json

import keras_adapters as ka

LR = 1e-4


def _adamw(scale=1.0):
    return keras.optimizers.AdamW(LR * scale)


def _multi():
    return keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(_adamw(), {r".*/lora_b": _adamw(16.0)})
    )


VARIANTS = {
    "bare": (_adamw, "AdamW(1e-4)"),
    "wrapper_ones": (
        lambda: ka.optimizers.lr_multipliers(_adamw(), {}),
        "lr_multipliers(AdamW, {}): all multipliers 1",
    ),
    "wrapper_loraplus": (
        lambda: ka.optimizers.loraplus(
            ka.optimizers.attention_lr(_adamw(), value_ratio=4), ratio=16
        ),
        "loraplus(attention_lr(AdamW, 4), 16)",
    ),
    "multi_optimizer": (_multi, "MultiOptimizer: AdamW, AdamW x16 on lora_b"),
}


def build_model(seed=0):
    model = build_classifier(seed)
    ka.enable_adapter(model, ka.LoRA(rank=8, alpha=16))
    return model


def state_bytes(optimizer):
    variables = optimizer.variables
    if isinstance(optimizer, keras.optimizers.MultiOptimizer):
        variables = [v for o in optimizer.optimizers for v in o.variables]
    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables))


def run(variants, batch, seq, warmup, steps, rounds):
    x, y = make_batch(batch, seq)
    models, times, ready = {}, {v: [] for v in variants}, {}
    for variant in variants:
        start = time.perf_counter()
        model = build_model()
        model.compile(
            optimizer=VARIANTS[variant][0](),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=True,
        )
        for _ in range(warmup):
            model.train_on_batch(x, y)
        models[variant] = model
        ready[variant] = time.perf_counter() - start
        print(f"  ready: {variant} ({ready[variant]:.1f} s)", flush=True)
    for _ in range(rounds):
        for variant in variants:
            for _ in range(steps):
                start = time.perf_counter()
                models[variant].train_on_batch(x, y)
                times[variant].append(time.perf_counter() - start)
    rows = []
    for variant in variants:
        model = models[variant]
        rows.append(
            {
                "variant": variant,
                "description": VARIANTS[variant][1],
                "trainable_params": int(
                    sum(np.prod(v.shape) for v in model.trainable_weights)
                ),
                "optimizer_state_bytes": state_bytes(model.optimizer),
                "median_step_seconds": statistics.median(times[variant]),
                "min_step_seconds": min(times[variant]),
                "steps_timed": len(times[variant]),
                "warmup_and_compile_seconds": ready[variant],
            }
        )
    if "bare" in variants:
        bare = next(r for r in rows if r["variant"] == "bare")
        for row in rows:
            row["step_ratio_to_bare"] = (
                row["median_step_seconds"] / bare["median_step_seconds"]
            )
            row["state_ratio_to_bare"] = (
                row["optimizer_state_bytes"] / bare["optimizer_state_bytes"]
            )
    return rows


def print_table(rows):
    print(
        "| variant | trainable | state bytes | state vs bare | median step s "
        "| step vs bare |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['trainable_params']:,} | "
            f"{r['optimizer_state_bytes']:,} | "
            f"{r.get('state_ratio_to_bare', float('nan')):.3f} | "
            f"{r['median_step_seconds']:.4f} | "
            f"{r.get('step_ratio_to_bare', float('nan')):.2f}x |"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    parser.add_argument("--warmup", type=int, default=None, help="default 3 (1)")
    parser.add_argument("--steps", type=int, default=None, help="per round; 5 (2)")
    parser.add_argument("--rounds", type=int, default=None, help="default 6 (2)")
    parser.add_argument("--output", default=None, help="JSON path")
    args = parser.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    steps = args.steps if args.steps is not None else (2 if args.quick else 5)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 6)
    for name, value in (("warmup", warmup), ("steps", steps), ("rounds", rounds)):
        if value < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be a positive int; got {value}")
    batch, seq = (8, 32) if args.quick else (16, 128)
    backend = keras.backend.backend()
    print(
        f"backend={backend} keras={keras.__version__} cpus={os.cpu_count()} "
        f"batch={batch} seq={seq} warmup={warmup} steps={steps} rounds={rounds}",
        flush=True,
    )
    rows = run(variants, batch, seq, warmup, steps, rounds)
    print_table(rows)
    result = {
        "benchmark": "optimizer wrapper, MiniLM-sized BERT with LoRA r=8 on q,v",
        **metadata(),
        "config": {
            "model": BERT,
            "batch": batch,
            "sequence_length": seq,
            "jit_compile": True,
            "warmup": warmup,
            "steps_per_round": steps,
            "rounds": rounds,
            "quick": args.quick,
        },
        "results": rows,
    }
    write_json(result, args.output, "optimizers" + ("-quick" if args.quick else ""))


if __name__ == "__main__":
    main()
