"""LoRA training step against PyTorch + Hugging Face PEFT, one run after another.

The task of issue 19: a MiniLM-L6-sized BERT classifier (6 layers, 384 wide,
12 heads, 5 classes; random weights of the shape of all-MiniLM-L6-v2, so that
nothing is downloaded: step times do not depend on the values), LoRA r=8,
alpha=16 on the query and value projections (the classification head
trainable too, as PEFT's `task_type="SEQ_CLS"` keeps it), batch 16 x 128
tokens without padding (BBC News articles fill 128 tokens), AdamW(1e-4),
dropout 0.1 in the model as both libraries configure BERT. Measured per run:

- `first_step_seconds`: the first training step (tracing and compilation
  for Keras with `jit_compile=True`; eager PyTorch has none);
- `median_step_seconds`: the median of `--steps` steps after `--warmup`;
- `inference_seconds`: the median forward pass of one batch (Keras
  `predict_on_batch`, PyTorch `inference_mode` in eval mode);
- memory: the resident set size after importing the framework
  (`runtime_rss_mb`), after building the model (`model_rss_mb`) and the
  process's peak (`peak_rss_mb`, `ru_maxrss`), in MB.

Each framework runs in its own subprocess, one after another (PyTorch and
TensorFlow are never imported in one process): PEFT with `--torch-python`
(an environment with torch, transformers and peft: `nox -s bench_peft`
makes one), then keras_adapters under JAX and under TensorFlow with this
Python. `--full` adds full fine-tuning in both frameworks (the LoRA / full
ratio), `--jax-cache` runs JAX a second time with a warm persistent
compilation cache (cold and warm first step), `--tf-cache` does the same for
TensorFlow's XLA persistent cache (`TF_XLA_FLAGS`), and `--prng`, `--policy`
pass the recipes of docs/performance.md to the Keras runs. It prints the
table and ratios and writes JSON (default `benchmarks/results/vs-peft.json`).

Usage:

    python benchmarks/bench_vs_peft.py --torch-python /path/to/venv/bin/python
    nox -s bench_peft                 # the same, with its own PyTorch env
    nox -s bench_peft -- --quick --full
"""

import argparse
import json
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _task import BATCH  # noqa: E402
from _task import BERT as MINILM  # noqa: E402
from _task import NUM_CLASSES  # noqa: E402
from _task import SEQ  # noqa: E402

RANK, ALPHA, LR = 8, 16, 1e-4


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb():
    with open("/proc/self/statm") as file:
        pages = int(file.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def batch(seed=0):
    """The benchmark batch as NumPy arrays (as `_common.make_batch`)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, MINILM["vocabulary_size"], (BATCH, SEQ)).astype("int32")
    labels = rng.integers(0, NUM_CLASSES, (BATCH,)).astype("int32")
    return tokens, labels


def timed(fn, count):
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------ workers


def worker_peft(args):
    import torch
    import transformers

    runtime = rss_mb()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=MINILM["vocabulary_size"],
        hidden_size=MINILM["hidden_dim"],
        num_hidden_layers=MINILM["num_layers"],
        num_attention_heads=MINILM["num_heads"],
        intermediate_size=MINILM["intermediate_dim"],
        max_position_embeddings=MINILM["max_sequence_length"],
        num_labels=NUM_CLASSES,
    )
    model = transformers.BertForSequenceClassification(config)
    if args.method == "lora":
        import peft

        lora = peft.LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            target_modules=["query", "value"],
            lora_dropout=0.0,
            task_type="SEQ_CLS",
        )
        model = peft.get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    tokens, labels = batch()
    inputs = {
        "input_ids": torch.from_numpy(tokens.astype("int64")),
        "token_type_ids": torch.zeros((BATCH, SEQ), dtype=torch.int64),
        "attention_mask": torch.ones((BATCH, SEQ), dtype=torch.int64),
    }
    labels = torch.from_numpy(labels.astype("int64"))
    built = rss_mb()

    def step():
        model.train()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer():
        model.eval()
        with torch.inference_mode():
            model(**inputs).logits.numpy()

    return measure(args, step, infer, runtime, built, sum(p.numel() for p in params))


def worker_keras(args):
    if args.jax_cache_dir:
        import jax

        jax.config.update("jax_compilation_cache_dir", args.jax_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if args.prng:
        import jax

        jax.config.update("jax_default_prng_impl", args.prng)
    import keras

    sys.path.insert(0, str(HERE))
    import bench_methods
    from _common import apply_jax_config

    if keras.backend.backend() == "jax":
        apply_jax_config(args.jax_config)

    if args.policy:
        keras.config.set_dtype_policy(args.policy)
    runtime = rss_mb()
    model = bench_methods.prepare(args.method)
    tokens, labels = batch()
    import numpy as np

    x = {
        "token_ids": tokens,
        "segment_ids": np.zeros_like(tokens),
        "padding_mask": np.ones_like(tokens),
    }
    built = rss_mb()
    params = int(sum(np.prod(v.shape) for v in model.trainable_weights))
    return measure(
        args,
        lambda: model.train_on_batch(x, labels),
        lambda: model.predict_on_batch(x),
        runtime,
        built,
        params,
    )


def measure(args, step, infer, runtime, built, params):
    first = timed(step, 1)[0]
    timed(step, args.warmup)
    steps = timed(step, args.steps)
    first_inference = timed(infer, 1)[0]
    inference = timed(infer, args.inference_steps)
    return {
        "trainable_params": int(params),
        "first_step_seconds": first,
        "median_step_seconds": statistics.median(steps),
        "min_step_seconds": min(steps),
        "step_seconds": steps,
        "first_inference_seconds": first_inference,
        "inference_seconds": statistics.median(inference),
        "runtime_rss_mb": runtime,
        "model_rss_mb": built,
        "peak_rss_mb": peak_rss_mb(),
    }


# ------------------------------------------------------------------ driver


def run_worker(name, python, framework, args, env=None, extra=()):
    """Runs one measurement in a fresh process; returns its result dict."""
    with tempfile.TemporaryDirectory() as tmp:
        output = os.path.join(tmp, "result.json")
        command = [
            python,
            str(pathlib.Path(__file__).resolve()),
            "--worker",
            framework,
            "--worker-output",
            output,
            "--method",
            args_method(name),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--inference-steps",
            str(args.inference_steps),
            *extra,
        ]
        print(f"[{name}] {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, **(env or {})})
        with open(output) as file:
            result = json.load(file)
    result["process_seconds"] = time.perf_counter() - start
    print(
        f"[{name}] step {result['median_step_seconds']:.3f} s, first "
        f"{result['first_step_seconds']:.1f} s, peak {result['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    return result


def args_method(name):
    return "full" if name.endswith("full") else "lora"


def run_all(args):
    runs = {}
    keras_extra = []
    if args.prng:
        keras_extra += ["--prng", args.prng]
    if args.policy:
        keras_extra += ["--policy", args.policy]
    for item in args.jax_config:
        keras_extra += ["--jax-config", item]
    methods = ["lora", "full"] if args.full else ["lora"]
    if args.torch_python:
        for method in methods:
            runs[f"peft-{method}"] = run_worker(
                f"peft-{method}", args.torch_python, "peft", args
            )
    for backend in args.backends.split(","):
        env = {"KERAS_BACKEND": backend}
        for method in methods:
            runs[f"{backend}-{method}"] = run_worker(
                f"{backend}-{method}", sys.executable, "keras", args, env, keras_extra
            )
        if backend == "jax" and args.jax_cache:
            cache = tempfile.mkdtemp(prefix="ka-jax-cache-")
            try:
                for state in ("cold", "warm"):
                    runs[f"jax-lora-cache-{state}"] = run_worker(
                        f"jax-lora-cache-{state}",
                        sys.executable,
                        "keras",
                        args,
                        env,
                        [*keras_extra, "--jax-cache-dir", cache],
                    )
            finally:
                shutil.rmtree(cache, ignore_errors=True)
        if backend == "tensorflow" and args.tf_cache:
            cache = tempfile.mkdtemp(prefix="ka-tf-cache-")
            flags = (
                f"--tf_xla_persistent_cache_directory={cache} "
                "--tf_xla_persistent_cache_read_only=false"
            )
            try:
                for state in ("cold", "warm"):
                    runs[f"tensorflow-lora-cache-{state}"] = run_worker(
                        f"tensorflow-lora-cache-{state}",
                        sys.executable,
                        "keras",
                        args,
                        {**env, "TF_XLA_FLAGS": flags},
                        keras_extra,
                    )
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    return runs


def ratios(runs):
    """Ours / PEFT for each Keras run, and LoRA / full per framework."""
    out = {}
    peft = runs.get("peft-lora")
    keys = ("median_step_seconds", "first_step_seconds", "inference_seconds")
    for name, run in runs.items():
        if peft is not None and not name.startswith("peft") and "full" not in name:
            out[f"{name} / peft-lora"] = {
                **{k: run[k] / peft[k] for k in keys},
                "peak_rss_mb": run["peak_rss_mb"] / peft["peak_rss_mb"],
            }
    for prefix in ("peft", "jax", "tensorflow"):
        lora, full = runs.get(f"{prefix}-lora"), runs.get(f"{prefix}-full")
        if lora and full:
            out[f"{prefix}-lora / {prefix}-full"] = {
                "median_step_seconds": lora["median_step_seconds"]
                / full["median_step_seconds"]
            }
    return out


def print_table(runs, ratio_rows):
    header = (
        f"{'run':<28}{'step s':>9}{'first s':>9}{'infer s':>9}"
        f"{'runtime MB':>11}{'model MB':>10}{'peak MB':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, run in runs.items():
        print(
            f"{name:<28}{run['median_step_seconds']:>9.3f}"
            f"{run['first_step_seconds']:>9.1f}{run['inference_seconds']:>9.3f}"
            f"{run['runtime_rss_mb']:>11.0f}{run['model_rss_mb']:>10.0f}"
            f"{run['peak_rss_mb']:>9.0f}"
        )
    print()
    for name, row in ratio_rows.items():
        values = ", ".join(f"{k.split('_')[0]} {v:.2f}x" for k, v in row.items())
        print(f"{name:<40}{values}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-python", default=os.environ.get("KA_TORCH_PYTHON"))
    parser.add_argument("--backends", default="jax,tensorflow")
    parser.add_argument("--full", action="store_true", help="full fine-tuning too")
    parser.add_argument("--jax-cache", action="store_true", help="cold+warm JAX cache")
    parser.add_argument("--tf-cache", action="store_true", help="cold+warm TF cache")
    parser.add_argument("--prng", default=None, help="JAX PRNG implementation")
    parser.add_argument("--policy", default=None, help="Keras dtype policy")
    parser.add_argument(
        "--jax-config",
        action="append",
        default=[],
        help="jax_NAME=VALUE for the JAX runs, e.g. "
        "jax_threefry_partitionable=false (repeatable)",
    )
    parser.add_argument("--quick", action="store_true", help="2 timed steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; 20")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--inference-steps", type=int, default=None)
    parser.add_argument("--load", default="", help="machine load note for JSON")
    parser.add_argument("--output", default=None, help="JSON path")
    # Internal: one measurement in this process.
    parser.add_argument("--worker", choices=("peft", "keras"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--jax-cache-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker = worker_peft if args.worker == "peft" else worker_keras
        result = worker(args)
        pathlib.Path(args.worker_output).write_text(json.dumps(result))
        return result
    args.steps = args.steps or (2 if args.quick else 20)
    args.inference_steps = args.inference_steps or (2 if args.quick else 10)
    if not args.torch_python:
        print("no --torch-python (or KA_TORCH_PYTHON): PEFT is not measured")
    start = time.time()
    runs = run_all(args)
    ratio_rows = ratios(runs)
    print_table(runs, ratio_rows)
    result = {
        "benchmark": "LoRA vs PyTorch + PEFT, MiniLM-L6-sized BERT, issue 19",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
        "machine": {"cpu_count": os.cpu_count(), "platform": sys.platform},
        "load": args.load or os.getloadavg(),
        "config": {
            "model": MINILM,
            "batch": BATCH,
            "sequence_length": SEQ,
            "lora": {"rank": RANK, "alpha": ALPHA, "targets": ["query", "value"]},
            "optimizer": f"AdamW({LR})",
            "steps": args.steps,
            "warmup": args.warmup,
            "prng": args.prng,
            "jax_config": args.jax_config,
            "policy": args.policy,
        },
        "runs": runs,
        "ratios": ratio_rows,
    }
    path = pathlib.Path(args.output or HERE / "results" / "vs-peft.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
