"""LoRA training on a quantized vs a float MiniLM-sized BERT: time and memory.

Builds the 6-layer, 384-wide BERT classifier of `bench_methods.py` from its
config (random weights, no download), optionally quantizes the backbone with
Keras (`backbone.quantize(...)`; the classifier head stays float, as in
QLoRA), attaches `ka.LoRA(rank=8, alpha=16)` to query and value, compiles
with AdamW and `jit_compile=True`, and times `train_on_batch` on one batch
(16 x 128 tokens) under the Keras backend set by `KERAS_BACKEND`.

Variants:

- `float`: the float32 base.
- `int8`: `quantize("int8")`, Keras' default: int8 kernels and int8
  activations per matmul (W8A8); the adapted layers reproduce it.
- `int8_weight_only`: int8 kernels, float activations
  (`Int8QuantizationConfig(activation_quantizer=None)`).
- `int4`: `quantize("int4")`, Keras' default: int4 kernels in blocks of 128
  input rows with a zero point, float activations.

Each variant runs in its own subprocess, so that its memory is its own.
Memory is measured as resident set size (RSS, Linux `/proc/self/status`):
after setup (model built, quantized, adapted, compiled and warmed up), the
process releases freed heap memory to the OS (`malloc_trim`) and resets its
RSS high-water mark (`/proc/self/clear_refs`), so `step_peak_rss_mb` is the
peak RSS while the timed steps run: the weights, optimizer state and
compiled code that stay resident, plus the activations and temporaries of a
step. `setup_rss_mb` is the RSS just before the steps, `step_extra_mb` the
difference (what a step adds), `process_max_rss_mb` the whole process's peak
(`getrusage`; it includes building the float model before quantizing it),
`weight_mb` the bytes of all the model's variables, and (JAX only)
`live_jax_arrays_mb` the bytes of all live JAX arrays after setup (weights,
optimizer state, the batch). JAX's allocator statistics
(`device.memory_stats()`) are not available for the CPU device, hence RSS.
RSS does not drop by all the bytes that quantizing frees (the allocator
keeps part of the float weights' memory), so compare `weight_mb` and
`live_jax_arrays_mb` for the weights, and the step peak for the rest.

Usage:

    KERAS_BACKEND=jax python benchmarks/bench_quantized.py
    KERAS_BACKEND=tensorflow python benchmarks/bench_quantized.py --quick

It prints a table with ratios to the float base and writes JSON to
`--output` (default `benchmarks/results/quantized-<backend>.json`).
"""

import argparse
import ctypes
import json
import math
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from _common import BATCH  # noqa: E402
from _common import BERT  # noqa: E402
from _common import NUM_CLASSES  # noqa: E402
from _common import SEQ  # noqa: E402
from _common import build_classifier  # noqa: E402
from _common import make_batch  # noqa: E402
from _common import metadata  # noqa: E402

VARIANTS = {
    "float": "float32 base",
    "int8": "quantize('int8'): int8 kernels, W8A8 (Keras default)",
    "int8_weight_only": "int8 kernels, float activations",
    "int4": "quantize('int4'): int4 kernels, blocks of 128 (Keras default)",
}


def _status_mb(field):
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise KeyError(field)


def _release_and_reset_peak():
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    # Writing 5 resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
    pathlib.Path("/proc/self/clear_refs").write_text("5")


def worker(variant, warmup, steps):
    """Runs one variant; returns its measurements as a dict."""
    import keras

    import keras_adapters as ka

    start = time.perf_counter()
    model = build_classifier()
    if variant == "int8":
        model.backbone.quantize("int8")
    elif variant == "int8_weight_only":
        config = keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
        model.backbone.quantize(config=config)
    elif variant == "int4":
        model.backbone.quantize("int4")
    report = ka.enable_adapter(
        model, ka.LoRA(rank=8, alpha=16), targets=ka.attention("query", "value")
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    x, y = make_batch()
    for _ in range(warmup):
        model.train_on_batch(x, y)
    setup_seconds = time.perf_counter() - start
    weight_bytes = sum(
        math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in model.weights
    )
    _release_and_reset_peak()
    setup_rss = _status_mb("VmRSS")
    live_jax_mb = None
    if keras.backend.backend() == "jax":
        import jax

        live_jax_mb = sum(a.nbytes for a in jax.live_arrays()) / 2**20
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    step_peak = _status_mb("VmHWM")
    return {
        "variant": variant,
        "description": VARIANTS[variant],
        "trainable_params": sum(math.prod(v.shape) for v in model.trainable_weights),
        "adapter_params": report.adapter_params,
        "weight_mb": weight_bytes / 2**20,
        "median_step_seconds": statistics.median(times),
        "min_step_seconds": min(times),
        "median_step_cpu_seconds": statistics.median(cpu_times),
        "steps_timed": steps,
        "setup_seconds": setup_seconds,
        "setup_rss_mb": setup_rss,
        "step_peak_rss_mb": step_peak,
        "step_extra_mb": step_peak - setup_rss,
        "live_jax_arrays_mb": live_jax_mb,
        # ru_maxrss is in KiB on Linux.
        "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / 1024.0,
    }


def run_variant(variant, warmup, steps):
    command = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--warmup",
        str(warmup),
        "--steps",
        str(steps),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"variant {variant!r} failed ({done.returncode})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"  {variant}: {result['median_step_seconds']:.3f} s/step, "
        f"peak {result['step_peak_rss_mb']:.0f} MB",
        flush=True,
    )
    return result


def add_ratios(rows):
    reference = next((r for r in rows if r["variant"] == "float"), None)
    if reference is None:
        return
    for row in rows:
        for key in (
            "median_step_seconds",
            "median_step_cpu_seconds",
            "step_peak_rss_mb",
            "step_extra_mb",
            "weight_mb",
        ):
            row[f"{key}_vs_float"] = row[key] / reference[key]


def print_table(rows):
    header = (
        f"{'variant':<18}{'step s':>8}{'vs float':>9}{'cpu s':>8}{'vs float':>9}"
        f"{'weights MB':>11}{'vs float':>9}{'peak MB':>9}{'vs float':>9}"
        f"{'step +MB':>9}{'vs float':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:

        def ratio(key, row=row):
            value = row.get(f"{key}_vs_float")
            return "-" if value is None else f"{value:.2f}x"

        print(
            f"{row['variant']:<18}{row['median_step_seconds']:>8.3f}"
            f"{ratio('median_step_seconds'):>9}"
            f"{row['median_step_cpu_seconds']:>8.3f}"
            f"{ratio('median_step_cpu_seconds'):>9}"
            f"{row['weight_mb']:>11.1f}{ratio('weight_mb'):>9}"
            f"{row['step_peak_rss_mb']:>9.0f}{ratio('step_peak_rss_mb'):>9}"
            f"{row['step_extra_mb']:>9.0f}{ratio('step_extra_mb'):>9}"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="steps before timing; 3 (quick: 1)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps; 20 (quick: 3)"
    )
    parser.add_argument("--output", default=None, help="JSON path")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    steps = args.steps if args.steps is not None else (3 if args.quick else 20)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, warmup, steps)))
        return

    import keras
    import keras_hub

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    backend = keras.backend.backend()
    output = args.output or str(
        pathlib.Path(__file__).parent
        / "results"
        / f"quantized{'-quick' if args.quick else ''}-{backend}.json"
    )
    print(
        f"backend={backend} keras={keras.__version__} "
        f"keras_hub={keras_hub.__version__} cpus={os.cpu_count()} "
        f"batch={BATCH} seq={SEQ} warmup={warmup} steps={steps}",
        flush=True,
    )
    rows = [run_variant(v, warmup, steps) for v in variants]
    add_ratios(rows)
    print_table(rows)
    result = {
        "benchmark": "LoRA r=8 (query, value) training step on a quantized "
        "vs float MiniLM-sized BERT classifier",
        **metadata(),
        "config": {
            "model": BERT,
            "num_classes": NUM_CLASSES,
            "batch": BATCH,
            "sequence_length": SEQ,
            "adapter": "LoRA(rank=8, alpha=16) on query and value",
            "quantized": "backbone only (the classifier head stays float)",
            "optimizer": "AdamW(1e-4)",
            "jit_compile": True,
            "warmup": warmup,
            "steps": steps,
            "quick": args.quick,
            "memory": "RSS; see the module docstring",
        },
        "results": rows,
    }
    path = pathlib.Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
