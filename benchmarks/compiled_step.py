"""XLA's memory and cost analysis of the compiled training step (JAX).

Compiles the benchmark model's training step (`_common.build_classifier`,
batch 16 x 128, AdamW, `jit_compile=True`) and prints what XLA reports for
it: the temporary buffers the step needs (activations kept for the backward
pass included), argument and output sizes, FLOPs and bytes accessed. These
numbers do not depend on the machine's load, so they compare code versions
(e.g. the adapter path's dtypes under `mixed_bfloat16`) where timings on a
busy machine cannot.

Usage:

    KERAS_BACKEND=jax python benchmarks/compiled_step.py --policy mixed_bfloat16
    KERAS_BACKEND=jax python benchmarks/compiled_step.py --method full
"""

import argparse

import bench_methods
import keras
from _common import compiled_jax_train_step
from _common import make_batch
from _common import metadata
from _common import write_json


def analyse(method):
    x, y = make_batch()
    model = bench_methods.prepare(method)
    model.train_on_batch(x, y)  # builds the optimizer and metrics
    compiled = compiled_jax_train_step(model, x, y)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    fields = (
        "temp_size_in_bytes",
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    result = {f: int(getattr(memory, f)) for f in fields if hasattr(memory, f)}
    for key in ("flops", "bytes accessed", "transcendentals"):
        if key in cost:
            result[key.replace(" ", "_")] = float(cost[key])
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--method", default="lora", choices=sorted(bench_methods.METHODS)
    )
    parser.add_argument("--policy", default=None, help="Keras dtype policy")
    parser.add_argument("--variant", default="", help="suffix of the JSON name")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if keras.backend.backend() != "jax":
        parser.error("XLA's analysis of the JAX step: run with KERAS_BACKEND=jax")
    if args.policy:
        keras.config.set_dtype_policy(args.policy)
    result = analyse(args.method)
    for key, value in result.items():
        scaled = (
            f"{value / 2**20:,.1f} MiB" if key.endswith("bytes") else f"{value:.4g}"
        )
        print(f"{key:<32}{scaled:>16}")
    name = "compiled-step" + (f"-{args.variant}" if args.variant else "")
    config = {"method": args.method, "policy": args.policy}
    write_json({**metadata(), "config": config, **result}, args.output, name)


if __name__ == "__main__":
    main()
