"""JAX speed recipes, A/B in one process: the same model, interleaved steps.

JAX keys its compiled programs on the configuration a function is traced
under, so toggling a setting between `train_on_batch` calls of one model
runs two compiled training steps side by side: a round times one step of
each variant, so that a change of machine load hits all of them alike and
the ratios stay meaningful on a busy machine.

Variants (`--variants`): `default`; `threefry_nonpartitionable`
(`jax_threefry_partitionable=False`, the cheaper CPU lowering of the default
threefry generator that draws the dropout masks); `no_dropout` is not a
setting but a second model with the backbone's dropout at 0, the bound of
what any dropout recipe can save.

Usage:

    KERAS_BACKEND=jax python benchmarks/bench_recipes.py
    KERAS_BACKEND=jax python benchmarks/bench_recipes.py --rounds 5 --method full

It prints median seconds per step and the ratio to `default`, and writes
JSON (default `benchmarks/results/recipes-jax.json`).
"""

import argparse
import contextlib
import statistics
import time

import bench_methods
import jax
import keras
from _common import make_batch
from _common import metadata
from _common import write_json

SETTINGS = {
    "default": {},
    "threefry_nonpartitionable": {"jax_threefry_partitionable": False},
    "no_dropout": {},
}


@contextlib.contextmanager
def jax_settings(settings):
    previous = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)


def run(variants, method, warmup, rounds):
    x, y = make_batch()
    model = bench_methods.prepare(method)
    models = {v: model for v in variants}
    if "no_dropout" in variants:
        models["no_dropout"] = bench_methods.prepare(method, dropout=0.0)
    times = {v: [] for v in variants}
    first = {}
    for variant in variants:
        with jax_settings(SETTINGS[variant]):
            start = time.perf_counter()
            for _ in range(1 + warmup):
                models[variant].train_on_batch(x, y)
            first[variant] = time.perf_counter() - start
        print(f"  ready: {variant} ({first[variant]:.1f} s)", flush=True)
    for i in range(rounds):
        for variant in variants:
            with jax_settings(SETTINGS[variant]):
                start = time.perf_counter()
                models[variant].train_on_batch(x, y)
                times[variant].append(time.perf_counter() - start)
        medians = ", ".join(f"{v} {statistics.median(times[v]):.3f}" for v in variants)
        print(f"  round {i + 1}/{rounds}: {medians}", flush=True)
    base = statistics.median(times[variants[0]])
    return [
        {
            "variant": v,
            "settings": SETTINGS[v],
            "median_step_seconds": statistics.median(times[v]),
            f"ratio_to_{variants[0]}": statistics.median(times[v]) / base,
            "step_seconds": times[v],
            "warmup_and_compile_seconds": first[v],
        }
        for v in variants
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(SETTINGS))
    parser.add_argument(
        "--method", default="lora", choices=sorted(bench_methods.METHODS)
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if keras.backend.backend() != "jax":
        parser.error("JAX recipes: run with KERAS_BACKEND=jax")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in SETTINGS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(SETTINGS)}")
    rows = run(variants, args.method, args.warmup, args.rounds)
    for row in rows:
        ratio = row[f"ratio_to_{variants[0]}"]
        print(f"{row['variant']:<28}{row['median_step_seconds']:>9.3f} s{ratio:>8.2f}x")
    config = {"method": args.method, "rounds": args.rounds, "warmup": args.warmup}
    write_json(
        {
            "benchmark": "JAX recipes, interleaved",
            **metadata(),
            "config": config,
            "results": rows,
        },
        args.output,
        "recipes",
    )


if __name__ == "__main__":
    main()
