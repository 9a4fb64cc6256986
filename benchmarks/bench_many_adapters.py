"""Many LoRA adapters in one compiled program, on a MiniLM-sized BERT.

`ka.per_example_adapters` runs a batch whose examples each use their own
adapter: one program, the factors gathered per example. This measures,
under the Keras backend set by `KERAS_BACKEND`, for a BERT classifier
(6 layers, hidden 384, random weights) with 16 LoRA r=8 adapters on query
and value, `predict_on_batch` of 16 x 128 tokens with `jit_compile=True`:

- the merged single model (one adapter merged: a plain BERT);
- the per-example model with 1, 4 and 16 distinct adapters in the batch;
- looping over merged copies, each on its own examples: for d distinct
  adapters, d calls of a merged model on 16 / d examples (the time of one
  merged copy per call; the copies' memory is not counted here, see below);
- hot-swap: `load_adapter` of one slot from an adapter file plus the next
  `predict_on_batch`, against `set_active_adapters` plus the next call
  (which retraces and recompiles, the cost in `switching-<backend>.json`),
  and against compiling the per-example model afresh;
- memory: parameters of one base copy plus the stacked factors, against
  one merged copy per adapter.

Usage:

    KERAS_BACKEND=jax python benchmarks/bench_many_adapters.py [--quick]

`--quick` is a smoke run (sequence length 32, 2 repeats): its timings mean
nothing. Prints a table and writes
`benchmarks/results/many-adapters-<backend>.json`.
"""

import argparse
import os
import statistics
import tempfile
import time

import keras
import numpy as np
from _common import BATCH
from _common import build_classifier
from _common import make_batch
from _common import metadata
from _common import write_json

import keras_adapters as ka

ADAPTERS = 16
RANK = 8


def _run(function, x):
    keras.ops.convert_to_numpy(
        keras.tree.flatten(function(x))[0]
    )  # waits for the result


def _steady(function, x, repeats):
    _run(function, x)  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _run(function, x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timed(function, x):
    start = time.perf_counter()
    _run(function, x)
    return time.perf_counter() - start


def _adapted_model():
    model = build_classifier()
    targets = ka.attention("query", "value")
    rng = np.random.default_rng(0)
    for k in range(ADAPTERS):
        ka.enable_adapter(model, ka.LoRA(rank=RANK), targets=targets, name=f"a{k}")
    for variable in ka.adapter_variables(model):
        variable.assign(rng.normal(scale=0.02, size=variable.shape).astype("float32"))
    return model


def run(repeats, seq):
    x, _ = make_batch(seq=seq)
    rows = []

    merged = build_classifier()  # a merged model costs what the base costs
    merged.compile(jit_compile=True)
    merged_time = _steady(merged.predict_on_batch, x, repeats)
    rows.append({"setting": "merged single model", "steady_s": merged_time})

    model = _adapted_model()
    names = [f"a{k}" for k in range(ADAPTERS)]
    serving = ka.per_example_adapters(model, names)
    serving.compile(jit_compile=True)
    start = time.perf_counter()
    first = {**x, "adapter_id": np.zeros(BATCH, "int32")}
    _run(serving.predict_on_batch, first)
    compile_time = time.perf_counter() - start
    for distinct in (1, 4, 16):
        ids = (np.arange(BATCH) % distinct).astype("int32")
        batch = {**x, "adapter_id": ids}
        per_example = _steady(serving.predict_on_batch, batch, repeats)
        # d merged copies, each on its own BATCH / d examples.
        part = {k: v[: BATCH // distinct] for k, v in x.items()}
        loop = distinct * _steady(merged.predict_on_batch, part, repeats)
        rows.append(
            {
                "setting": f"{distinct} distinct adapters",
                "distinct": distinct,
                "per_example_s": per_example,
                "loop_over_merged_s": loop,
                "per_example_vs_merged": merged_time / per_example,
                "loop_vs_merged": merged_time / loop,
            }
        )

    # Hot-swap one slot from a file, then the next call.
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "a0.adapter.weights.h5")
        ka.save_adapter_weights(model, path, names="a0")
        ids = (np.arange(BATCH) % ADAPTERS).astype("int32")
        swaps = []
        for _ in range(max(repeats, 2)):
            start = time.perf_counter()
            serving.load_adapter(ADAPTERS - 1, path)
            _run(serving.predict_on_batch, {**x, "adapter_id": ids})
            swaps.append(time.perf_counter() - start)
    # Switching the active adapter retraces and recompiles the next call.
    model.compile(jit_compile=True)
    switches = []
    for k in range(max(repeats, 2)):
        ka.set_active_adapters(model, [f"a{k}"])
        switches.append(_timed(model.predict_on_batch, x))
    ka.set_active_adapters(model, names)
    swap = {
        "hot_swap_s": statistics.median(swaps),
        "set_active_adapters_switch_s": statistics.median(switches),
        "per_example_first_call_s": compile_time,
    }

    base_parameters = merged.count_params()
    factors = sum(int(np.prod(v.shape)) for v in ka.adapter_variables(model))
    memory = {
        "base_parameters": base_parameters,
        "stacked_factor_parameters": factors,
        "one_base_plus_factors": base_parameters + factors,
        "merged_copies": ADAPTERS * base_parameters,
    }
    return rows, swap, memory


def print_table(rows, swap, memory):
    merged = rows[0]["steady_s"]
    print(f"merged single model: {merged:.3f} s per batch of {BATCH}")
    print(
        f"{'distinct adapters':<20}{'per-example s':>15}{'x merged':>10}"
        f"{'loop over merged s':>20}{'x merged':>10}"
    )
    for row in rows[1:]:
        print(
            f"{row['distinct']:<20}{row['per_example_s']:>15.3f}"
            f"{row['per_example_vs_merged']:>10.2f}"
            f"{row['loop_over_merged_s']:>20.3f}{row['loop_vs_merged']:>10.2f}"
        )
    print(
        f"hot-swap (load_adapter + next call): {swap['hot_swap_s']:.3f} s; "
        f"set_active_adapters + next call: {swap['set_active_adapters_switch_s']:.3f}"
        f" s; first call of the per-example model (compile): "
        f"{swap['per_example_first_call_s']:.3f} s"
    )
    print(
        f"parameters: one base + {ADAPTERS} adapters' factors "
        f"{memory['one_base_plus_factors']:,}; {ADAPTERS} merged copies "
        f"{memory['merged_copies']:,}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--output", default=None, help="JSON path")
    args = parser.parse_args(argv)
    repeats, seq = (2, 32) if args.quick else (10, 128)
    print(f"backend={keras.backend.backend()} repeats={repeats} seq={seq}")
    rows, swap, memory = run(repeats, seq)
    print_table(rows, swap, memory)
    write_json(
        {
            "benchmark": "many LoRA adapters per example, MiniLM-sized BERT, predict",
            **metadata(),
            "config": {
                "batch": BATCH,
                "sequence_length": seq,
                "adapters": ADAPTERS,
                "rank": RANK,
                "targets": ["query", "value"],
                "jit_compile": True,
                "repeats": repeats,
                "quick": args.quick,
            },
            "results": rows,
            "swap": swap,
            "memory": memory,
        },
        args.output,
        "many-adapters" + ("-quick" if args.quick else ""),
    )


if __name__ == "__main__":
    main()
