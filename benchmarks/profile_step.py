"""Profile of one training step of the MiniLM-sized BERT, by op class.

Runs a few `train_on_batch` steps (after warm-up) of the benchmark model
(`_common.build_classifier`, batch 16 x 128 tokens, AdamW, `jit_compile=True`)
under the profiler of the Keras backend set by `KERAS_BACKEND` (the JAX
profiler, or TensorFlow's `tf.profiler.experimental`), and reads back:

- from the trace (an XSpace file, parsed with `jax.profiler.ProfileData`,
  which the TensorFlow environment has too): the time of every XLA operation
  (thunk) the CPU runtime executed, by HLO instruction name;
- from the optimized HLO of the training step (XLA's dump, restricted to
  that module): what each instruction is (fusions with their fused ops), its
  `op_name` (Keras' name scopes: layer paths, the optimizer) and source file.

Each executed instruction goes to one op class, first match wins:
optimizer (the optimizer's name scope), dropout RNG (random-bit generation:
threefry, `rng-bit-generator`, `keras.random`), adapter path (ops from
`keras_adapters/` source files), attention softmax+masking, layer norm,
matmul (dot/convolution/oneDNN or YNNPACK matmul calls), copies/transposes
(data movement only), and other elementwise work. It prints a table (ms per
step and share of the summed op time, op count), the step's wall time and
XLA's cost analysis (FLOPs, bytes), and writes JSON to `--output` (default
`benchmarks/results/profile-<backend>[-<variant>].json`).

Usage (options for the recipes in docs/performance.md):

    KERAS_BACKEND=jax python benchmarks/profile_step.py
    KERAS_BACKEND=jax python benchmarks/profile_step.py --prng rbg
    KERAS_BACKEND=tensorflow python benchmarks/profile_step.py --method full
    KERAS_BACKEND=jax python benchmarks/profile_step.py --policy mixed_bfloat16
"""

import argparse
import collections
import glob
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

# XLA reads its flags when the backend starts: dump the training step's
# optimized HLO (and nothing else) before JAX or TensorFlow is imported.
_DUMP = tempfile.mkdtemp(prefix="ka-profile-hlo-")
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        f"--xla_dump_to={_DUMP}",
        "--xla_dump_hlo_as_text",
        "--xla_dump_hlo_module_re=.*(train_step|one_step_on_data|train_function).*",
    ]
).strip()

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _common import apply_jax_config  # noqa: E402
from _common import compiled_jax_train_step  # noqa: E402
from _common import make_batch  # noqa: E402
from _common import metadata  # noqa: E402
from _common import write_json  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import bench_methods  # noqa: E402

from keras_adapters.adapters.base import ADAPTER_METHODS  # noqa: E402

BACKEND = keras.backend.backend()
CLASSES = (
    "optimizer",
    "dropout RNG",
    "adapter path",
    "softmax+masking",
    "layer norm",
    "matmul",
    "copies/transposes",
    "other elementwise",
)
_MOVES = {
    "copy",
    "transpose",
    "bitcast",
    "reshape",
    "slice",
    "dynamic-slice",
    "dynamic-update-slice",
    "concatenate",
    "broadcast",
    "pad",
    "parameter",
    "constant",
    "tuple",
    "get-tuple-element",
    "convert",
    "copy-start",
    "copy-done",
    "iota",
}
_RNG_OPS = {"rng-bit-generator", "rng", "rng-get-and-update-state"}
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s"
    r"(?P<opcode>[a-z][a-z0-9\-]*)\((?P<rest>.*)$"
)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")


# ------------------------------------------------------------------ HLO text


def parse_hlo(text):
    """`{computation: [instruction dict]}` of an HLO module's text.

    Each instruction: name, opcode, `calls` (called computations), op_name
    and source_file from its metadata.
    """
    computations, current = {}, None
    for line in text.splitlines():
        if not line.startswith(" "):  # a computation's header, or its end
            match = _COMPUTATION.match(line)
            current = (
                computations.setdefault(match.group("name"), []) if match else None
            )
            continue
        if current is None:
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        rest = match.group("rest")
        calls = re.findall(
            r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)",
            rest,
        )
        op_name = re.search(r'op_name="([^"]*)"', rest)
        source = re.search(r'source_file="([^"]*)"', rest)
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        current.append(
            {
                "name": match.group("name"),
                "opcode": match.group("opcode"),
                "calls": calls,
                "op_name": op_name.group(1) if op_name else "",
                "source_file": source.group(1) if source else "",
                "target": target.group(1) if target else "",
            }
        )
    return computations


def _flatten(instruction, computations, seen=None):
    """The instruction and every instruction of the computations it calls."""
    seen = set() if seen is None else seen
    yield instruction
    for called in instruction["calls"]:
        if called in seen:
            continue
        seen.add(called)
        for inner in computations.get(called, []):
            yield from _flatten(inner, computations, seen)


def classify(instruction, computations):
    """The op class of one executed HLO instruction (see the module doc)."""
    parts = list(_flatten(instruction, computations))
    opcodes = {p["opcode"] for p in parts}
    names = " ".join(p["op_name"].lower() for p in parts)
    targets = " ".join(p["target"].lower() for p in parts)
    if re.search(
        r"(?:^|/)(?:adam_?w?|sgd|lion|adafactor|lamb|rms_?prop|"
        r"optimizer|loss_scale_optimizer|lr_multipliers)(?:/|$)",
        names,
    ):
        return "optimizer"
    # LoRA.delta and DoRA.call run under a name scope named after the
    # method; backward ops keep the forward op's name.
    if re.search(rf"/(?:{'|'.join(ADAPTER_METHODS)})(?:/|$)", names):
        return "adapter path"
    is_matmul = opcodes & {"dot", "convolution"} or re.search(
        r"matmul|gemm|onednn|ynn", targets + " " + instruction["name"]
    )
    if is_matmul:
        return "matmul"
    if (
        opcodes & _RNG_OPS
        or re.search(
            r"threefry|random_bits|_uniform|_bernoulli|stateless_random", names
        )
        or "threefry" in targets
    ):
        return "dropout RNG"
    if "softmax" in names or "masking" in names or "mask" in names:
        return "softmax+masking"
    if "layer_norm" in names or "layernorm" in names:
        return "layer norm"
    if opcodes <= _MOVES | {"fusion"}:
        return "copies/transposes"
    return "other elementwise"


def find_train_module(dump):
    """`(path, text)` of the largest optimized training-step module."""
    paths = glob.glob(os.path.join(dump, "*after_optimizations.txt"))
    if not paths:
        raise RuntimeError(f"XLA dumped no optimized training step into {dump}.")
    path = max(paths, key=os.path.getsize)
    with open(path) as file:
        return path, file.read()


# ------------------------------------------------------------------ trace


def thunk_times(logdir, known):
    """`{HLO instruction name: [total ns, count]}` from the trace.

    Only instructions in `known` count, and only outermost ones: an event
    inside another counted event of the same thread (the fusions a `call` or
    a `while` loop runs) is part of that event's time.
    """
    from jax.profiler import ProfileData

    paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise RuntimeError(f"The profiler wrote no trace into {logdir}.")
    data = ProfileData.from_file(paths[-1])
    times = collections.defaultdict(lambda: [0.0, 0])
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            events = sorted(
                (e.start_ns, e.duration_ns, e.name)
                for e in line.events
                if e.name in known
            )
            end = -1.0
            for start, duration, name in events:
                if start < end:  # nested in the previous outermost event
                    continue
                end = start + duration
                times[name][0] += duration
                times[name][1] += 1
    return times


def trace_steps(model, x, y, steps, logdir):
    if BACKEND == "jax":
        import jax

        jax.profiler.start_trace(logdir)
    else:
        import tensorflow as tf

        tf.profiler.experimental.start(logdir)
    walls = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        walls.append(time.perf_counter() - start)
    if BACKEND == "jax":
        jax.profiler.stop_trace()
    else:
        tf.profiler.experimental.stop()
    return walls


def cost_analysis(model, x, y):
    """XLA's estimate of the JAX step's FLOPs and bytes (JAX only)."""
    if BACKEND != "jax":
        return None
    cost = compiled_jax_train_step(model, x, y).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    keep = ("flops", "bytes accessed", "transcendentals")
    return {k: float(cost[k]) for k in keep if k in cost}


def profile(args):
    x, y = make_batch()
    model = bench_methods.prepare(args.method, dropout=args.dropout)
    start = time.perf_counter()
    model.train_on_batch(x, y)
    first = time.perf_counter() - start
    for _ in range(args.warmup):
        model.train_on_batch(x, y)
    logdir = tempfile.mkdtemp(prefix="ka-profile-trace-")
    module_path, text = None, None
    try:
        walls = trace_steps(model, x, y, args.steps, logdir)
        module_path, text = find_train_module(_DUMP)
        computations = parse_hlo(text)
        entry = max(computations.values(), key=len)  # ENTRY has the most
        by_name = {i["name"]: i for i in entry}
        # Thunks of nested computations (while bodies) are looked up too.
        for instructions in computations.values():
            for instruction in instructions:
                by_name.setdefault(instruction["name"], instruction)
        times = thunk_times(logdir, by_name)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    per_class = {c: {"ms_per_step": 0.0, "ops": 0} for c in CLASSES}
    top = []
    for name, (total_ns, _count) in times.items():
        instruction = by_name[name]
        op_class = classify(instruction, computations)
        ms = total_ns / 1e6 / args.steps
        per_class[op_class]["ms_per_step"] += ms
        per_class[op_class]["ops"] += 1
        top.append((ms, name, op_class, instruction["op_name"][-90:]))
    top.sort(reverse=True)
    total = sum(c["ms_per_step"] for c in per_class.values())
    for entry_ in per_class.values():
        entry_["share"] = entry_["ms_per_step"] / total if total else 0.0
    hlo_ops = collections.Counter(i["opcode"] for i in entry)
    return {
        "first_step_seconds": first,
        "median_step_seconds": statistics.median(walls),
        "step_seconds": walls,
        "op_time_ms_per_step": total,
        # Wall time not inside an XLA op of the step: the framework's
        # runtime, host work, waiting (ops on several threads overlap, so
        # this is a lower bound).
        "outside_ops_ms_per_step": max(0.0, statistics.median(walls) * 1e3 - total),
        "classes": per_class,
        "top_ops": [
            {"ms_per_step": ms, "name": n, "class": c, "op_name": o}
            for ms, n, c, o in top[:25]
        ],
        "entry_hlo_opcodes": dict(hlo_ops.most_common()),
        "hlo_module": os.path.basename(module_path),
        "cost_analysis": cost_analysis(model, x, y) if args.cost else None,
    }


def print_report(result):
    print(
        f"median step {result['median_step_seconds']:.3f} s, first step "
        f"{result['first_step_seconds']:.1f} s, summed op time "
        f"{result['op_time_ms_per_step']:.0f} ms/step, outside XLA ops "
        f"{result['outside_ops_ms_per_step']:.0f} ms/step"
    )
    header = f"{'op class':<20}{'ms/step':>10}{'share':>8}{'ops':>6}"
    print(header)
    print("-" * len(header))
    for name, entry in result["classes"].items():
        print(
            f"{name:<20}{entry['ms_per_step']:>10.1f}{entry['share']:>8.1%}"
            f"{entry['ops']:>6}"
        )
    print("\nlargest ops:")
    for op in result["top_ops"][:12]:
        print(
            f"  {op['ms_per_step']:8.1f} ms  {op['class']:<18} {op['name']:<28} "
            f"{op['op_name']}"
        )
    if result["cost_analysis"]:
        print("\nXLA cost analysis:", result["cost_analysis"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--method", default="lora", choices=sorted(bench_methods.METHODS)
    )
    parser.add_argument("--steps", type=int, default=5, help="profiled steps; 5")
    parser.add_argument("--warmup", type=int, default=2, help="steps before; 2")
    parser.add_argument(
        "--prng",
        default=None,
        choices=("threefry2x32", "rbg", "unsafe_rbg"),
        help="JAX's default PRNG implementation (JAX only)",
    )
    parser.add_argument(
        "--jax-config",
        action="append",
        default=[],
        help="jax_NAME=VALUE, e.g. jax_threefry_partitionable=false (repeatable)",
    )
    parser.add_argument("--policy", default=None, help="Keras dtype policy")
    parser.add_argument(
        "--dropout", type=float, default=None, help="the backbone's dropout rate"
    )
    parser.add_argument("--cost", action="store_true", help="XLA cost analysis (JAX)")
    parser.add_argument("--variant", default="", help="suffix of the JSON name")
    parser.add_argument("--output", default=None, help="JSON path")
    args = parser.parse_args(argv)
    if args.prng:
        if BACKEND != "jax":
            parser.error("--prng applies to the JAX backend only")
        import jax

        jax.config.update("jax_default_prng_impl", args.prng)
    if args.jax_config and BACKEND != "jax":
        parser.error("--jax-config applies to the JAX backend only")
    apply_jax_config(args.jax_config)
    if args.policy:
        keras.config.set_dtype_policy(args.policy)
    print(
        f"backend={BACKEND} method={args.method} prng={args.prng} "
        f"policy={args.policy} jax_config={args.jax_config} cpus={os.cpu_count()}",
        flush=True,
    )
    try:
        result = profile(args)
    finally:
        shutil.rmtree(_DUMP, ignore_errors=True)
    print_report(result)
    config = {
        k: getattr(args, k)
        for k in (
            "method",
            "steps",
            "warmup",
            "prng",
            "jax_config",
            "policy",
            "dropout",
        )
    }
    name = "profile" + (f"-{args.variant}" if args.variant else "")
    write_json({**metadata(), "config": config, **result}, args.output, name)
    return result


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
