"""Multi-device checks, run in a fresh process by `tests/test_distribution.py`.

Usage:

    KERAS_BACKEND=jax python tests/distribution_check.py OUTPUT.json \
        --methods lora,hut [--import MODULE ...]

`--methods` names registered adapter methods (each built from its
`example()`); `--import` imports modules that register methods defined
outside the library (a test file).

Virtual devices must be configured before the backend initializes, so this
runs in its own process: on JAX it sets
`XLA_FLAGS=--xla_force_host_platform_device_count=8` before importing JAX; on
TensorFlow it splits the CPU into 2 logical devices before TensorFlow creates
any. It trains tiny KerasHub models with adapters on one device and on
several, merges and exports, and writes what it measured to OUTPUT.json; the
assertions live in the test.
"""

import argparse
import contextlib
import importlib
import json
import os
import tempfile
import time

BACKEND = os.environ.get("KERAS_BACKEND", "jax")
JAX_DEVICES = 8
TF_DEVICES = 2

if BACKEND == "jax":
    # 8 virtual host devices; and cheaper CPU compilation (each program is
    # compiled for one device and for 8, and the tests share 2 CPU cores).
    # Both runs of a comparison use the same flags.
    import xla_flags  # this script runs from tests/

    xla_flags.add(
        f"--xla_force_host_platform_device_count={JAX_DEVICES}",
        *xla_flags.FAST_COMPILE,
    )
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

if BACKEND == "tensorflow":
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration()] * TF_DEVICES
    )

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

# The tests' tiny models (this script runs from tests/, next to cases.py).
from cases import BATCH  # noqa: E402
from cases import MODELS  # noqa: E402
from cases import SEQ  # noqa: E402
from cases import VOCAB  # noqa: E402

import keras_adapters as ka  # noqa: E402
from keras_adapters import _keras_internals as internals  # noqa: E402
from keras_adapters import layers as adapter_layers  # noqa: E402
from keras_adapters.adapters.base import ADAPTER_METHODS  # noqa: E402
from keras_adapters.kernels import frozen_kernel  # noqa: E402

EPOCHS = 3

# One model carries every method, each on its own layers while there are
# enough (four roles; further methods share layers as named adapters), so
# that one compiled
# training step covers them all: the machine running the tests has 2 CPU
# cores and each compilation for 8 virtual devices costs seconds.
BERT_ROLES = ("query", "value", "attention_output", "key")
# Gemma, with KerasHub's layout map on a (batch 4, model 2) mesh: each method
# gets a 3-D EinsumDense kernel and a 2-D one.
GEMMA_ROLES = ("query", "attention_output", "value", "key")
GEMMA_MLP = (r".*/ffw_linear", r".*/ffw_gating", r".*/ffw_gating_2")
# (input mesh axis, output mesh axis) of each adapted Gemma layer, from
# GemmaBackbone.get_layout_map: query/key/value kernels (heads, hidden,
# head_dim) are ("model", "batch", None), the output kernel (heads, head_dim,
# hidden) ("model", None, "batch"), ffw_gating* ("batch", "model"),
# ffw_linear ("model", "batch").
GEMMA_VIEW_AXES = {
    "attention/query": ("batch", "model"),
    "attention/key": ("batch", "model"),
    "attention/value": ("batch", "model"),
    "attention/attention_output": ("model", "batch"),
    "ffw_gating": ("batch", "model"),
    "ffw_gating_2": ("batch", "model"),
    "ffw_linear": ("model", "batch"),
    # The table (vocab, hidden) is ("model", "batch"); its view is itself.
    "token_embedding": ("model", "batch"),
}


def bert_adapters(methods):
    return {
        m: (m, ka.attention(BERT_ROLES[i % len(BERT_ROLES)]))
        for i, m in enumerate(methods)
    }


def gemma_adapters(methods):
    adapters = {
        m: (
            m,
            [
                ka.attention(GEMMA_ROLES[i % len(GEMMA_ROLES)]),
                GEMMA_MLP[i % len(GEMMA_MLP)],
            ],
        )
        for i, m in enumerate(methods)
    }
    # The tied token embedding (its lookup and the output projection), laid
    # out like the table, on the first method that adapts embeddings.
    for m in methods:
        layer_kinds = ADAPTER_METHODS[m].layer_kinds
        if layer_kinds is None or "embedding" in layer_kinds:
            adapters[m][1].append("token_embedding")
            break
    return adapters


def expected_gemma_layout(path, variable_axes):
    """The layout the rule gives a Gemma adapter variable (test's own map)."""
    block, *rest = path.split("/")
    layer = "/".join(rest[:-1]) or block  # `token_embedding/lora_a`
    in_axis, out_axis = GEMMA_VIEW_AXES[layer]
    axes = [{"in": in_axis, "out": out_axis, None: None}[a] for a in variable_axes]
    return axes


def bert(seed=0):
    # No dropout: one device and several must compute the same losses.
    return MODELS["bert"].build(seed, dropout=0.0)


def gemma(seed=0):
    return MODELS["gemma"].build(seed, dropout=0.0)


def adapted_gemma(methods):
    """An untrained Gemma with the adapters (values to be copied in)."""
    model = gemma()
    enable(model, gemma_adapters(methods))
    return model


def bert_data():
    rng = np.random.default_rng(0)
    token_ids = rng.integers(1, VOCAB, (BATCH, SEQ)).astype("int32")
    padding_mask = np.ones((BATCH, SEQ), "int32")
    padding_mask[: BATCH // 2, SEQ - 2 :] = 0
    x = {
        "token_ids": token_ids,
        "segment_ids": np.zeros_like(token_ids),
        "padding_mask": padding_mask,
    }
    return x, rng.integers(0, 3, (BATCH,)).astype("int32")


def gemma_data():
    rng = np.random.default_rng(1)
    token_ids = rng.integers(1, VOCAB, (BATCH, SEQ)).astype("int32")
    x = {"token_ids": token_ids, "padding_mask": np.ones((BATCH, SEQ), "int32")}
    return x, np.roll(token_ids, -1, axis=1)


TIMINGS = {}


@contextlib.contextmanager
def timed(name):
    start = time.time()
    yield
    TIMINGS[name] = round(time.time() - start, 1)


def numpy_of(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable))


def example(method):
    return ADAPTER_METHODS[method].example()


def enable(model, adapters):
    for name, (method, targets) in adapters.items():
        ka.enable_adapter(model, example(method), targets=targets, name=name)


def train(build, adapters, x, y, scope=None, jit_compile=True):
    """Builds, adapts, compiles and fits under `scope`; returns (model, losses)."""
    with scope or contextlib.nullcontext():
        model = build()
        enable(model, adapters)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile,
        )
        history = model.fit(
            x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0
        )
    return model, [float(v) for v in history.history["loss"]]


def copy_trainable(source, target):
    """Gives `target` the adapter (and head) values of `source`."""
    for s, t in zip(source.trainable_weights, target.trainable_weights, strict=True):
        assert s.path == t.path, (s.path, t.path)
        t.assign(numpy_of(s))


def merged_difference(multi, single, scope=None):
    """Merges both models; the largest difference between their kernels."""
    copy_trainable(multi, single)
    with scope or contextlib.nullcontext():
        ka.merge_adapters(multi)
    ka.merge_adapters(single)
    worst = 0.0
    for a, b in zip(multi.weights, single.weights, strict=True):
        assert a.path == b.path, (a.path, b.path)
        worst = max(worst, float(np.max(np.abs(numpy_of(a) - numpy_of(b)))))
    return worst


def serve(path, inputs):
    """`(outputs, variable names)` of the SavedModel at `path`."""
    loaded = tf.saved_model.load(path)
    outputs = loaded.signatures["serving_default"](
        **{k: tf.constant(v) for k, v in inputs.items()}
    )
    return next(iter(outputs.values())).numpy(), [v.name for v in loaded.variables]


def export_difference(multi, single, inputs, scope=None):
    """Exports `multi` (distributed, with adapters), compares with `single`.

    `single` gets `multi`'s adapter values and is merged on one device. The
    SavedModel is reloaded in this process (the export's own fresh-process
    check is skipped to keep the test short; `test_export.py` covers it).
    Returns the largest relative difference between the SavedModel's outputs
    and `single`'s.
    """
    copy_trainable(multi, single)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "export")
        with scope or contextlib.nullcontext():
            report = ka.export_saved_model(multi, path, verify=False)
        got, exported = serve(path, inputs)
    ka.merge_adapters(single)
    want = np.asarray(single.predict(inputs, verbose=0))
    return {
        "relative_difference": float(np.max(np.abs(got - want)) / np.max(np.abs(want))),
        "merged_layers": len(report.merged_layers),
        "adapter_variables_exported": [
            k for k in exported if any(n in k for n in adapter_variable_names())
        ],
    }


def adapter_variable_names():
    """Every variable name a registered method declares."""
    return {n for cls in ADAPTER_METHODS.values() for n in cls.variable_axes}


def spec(variable):
    """A JAX variable's sharding as a list with one entry per axis."""
    axes = list(variable.value.sharding.spec)
    return axes + [None] * (len(variable.shape) - len(axes))


def layouts(variables):
    return {v.path: spec(v) for v in variables}


def variable_names(methods):
    return {m: sorted(planned_names(m)) for m in methods}


def planned_names(method):
    layer = keras.layers.Dense(4)
    layer.build((None, 4))
    return set(adapter_layers.planned_variables(layer, example(method)))


def run_jax(results, methods):
    devices = keras.distribution.list_devices()
    results["devices"] = len(devices)

    # One run on one device is the reference for both distributions: Gemma
    # with its adapters (a 3-D EinsumDense kernel and a 2-D one per method).
    x, y = gemma_data()
    with timed("one device"):
        single, single_losses = train(gemma, gemma_adapters(methods), x, y)

    # Data parallel: every variable replicated, the batch split 8 ways.
    data_parallel = keras.distribution.DataParallel(devices=devices)
    with timed("data parallel: 8 devices"):
        multi, multi_losses = train(
            gemma, gemma_adapters(methods), x, y, data_parallel.scope()
        )
    variables = ka.adapter_variables(multi)
    results["data_parallel"] = {
        "single": single_losses,
        "multi": multi_losses,
        "layouts": layouts(variables),
        "device_counts": sorted({len(v.value.sharding.device_set) for v in variables}),
        "variables": variable_names(methods),
        "merged_difference": merged_difference(
            multi, adapted_gemma(methods), data_parallel.scope()
        ),
    }

    # Model parallel: a (batch 4, model 2) mesh with KerasHub's own layout
    # map; enable_adapter lays the adapter variables out by the rule.
    mesh = keras.distribution.DeviceMesh((4, 2), ("batch", "model"), devices)
    model_parallel = keras.distribution.ModelParallel(
        layout_map=keras_hub.models.GemmaBackbone.get_layout_map(mesh),
        batch_dim_name="batch",
    )
    with timed("model parallel: 8 devices"):
        multi, multi_losses = train(
            gemma, gemma_adapters(methods), x, y, model_parallel.scope()
        )
    kernels = [internals.kernel_variable(layer) for layer in ka.adapted_layers(multi)]
    # What adapter_layout_map's entries resolve to, for the same variables.
    extended = ka.distribution.adapter_layout_map(
        keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    )
    from_map, expected = {}, {}
    for layer in ka.adapted_layers(multi):
        for slot in adapter_layers.slots(layer).values():
            for name, qualified in slot.attributes.items():
                if name not in slot.adapter.variable_axes:
                    continue  # not a variable (a seed generator)
                axes = slot.adapter.variable_axes[name]
                path = f"{layer.path}/{qualified}"
                resolved = extended[path].resolve(frozen_kernel(layer), axes)
                from_map[path] = list(resolved.axes)
                expected[path] = expected_gemma_layout(path, axes)
    entry = {
        "single": single_losses,
        "multi": multi_losses,
        "kernel_layouts": layouts(kernels),
        "layouts": layouts(ka.adapter_variables(multi)),
        "layout_map_layouts": from_map,
        "expected_layouts": expected,
    }
    with timed("model parallel: export"):
        entry["export"] = export_difference(multi, single, x, model_parallel.scope())
    with timed("model parallel: merge"):
        entry["merged_difference"] = merged_difference(
            multi, adapted_gemma(methods), model_parallel.scope()
        )
    # Merging in place keeps each kernel's layout.
    entry["merged_kernel_layouts"] = layouts(kernels)
    results["model_parallel"] = entry


def run_tensorflow(results, methods):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    results["devices"] = len(devices)
    strategy = tf.distribute.MirroredStrategy(devices)
    x, y = bert_data()
    # XLA cannot run MirroredStrategy replicas on logical CPU devices (TF
    # itself fails: keras-team/keras#19005), so both runs skip jit_compile.
    with timed("mirrored: one device"):
        single, single_losses = train(
            bert, bert_adapters(methods), x, y, jit_compile=False
        )
    with timed("mirrored: 2 devices"):
        multi, multi_losses = train(
            bert, bert_adapters(methods), x, y, strategy.scope(), jit_compile=False
        )
    entry = {
        "single": single_losses,
        "multi": multi_losses,
        "replicas": strategy.num_replicas_in_sync,
        "mirrored": {
            v.path: isinstance(v.value, tf.distribute.DistributedValues)
            for v in ka.adapter_variables(multi)
        },
    }
    with timed("mirrored: export"):
        entry["export"] = export_difference(multi, single, x, strategy.scope())
    with timed("mirrored: merge"):
        single = bert()
        enable(single, bert_adapters(methods))
        entry["merged_difference"] = merged_difference(multi, single, strategy.scope())
    # Every replica holds the same merged kernel.
    entry["replicas_agree"] = all(
        np.array_equal(r.numpy(), v.value.values[0].numpy())
        for v in multi.weights
        for r in v.value.values
    )
    results["mirrored"] = entry


def main(output, methods):
    results = {"backend": BACKEND, "methods": methods}
    start = time.time()
    if BACKEND == "jax":
        run_jax(results, methods)
    elif BACKEND == "tensorflow":
        run_tensorflow(results, methods)
    else:
        raise SystemExit(f"unsupported backend {BACKEND!r}")
    results["seconds"] = time.time() - start
    results["timings"] = TIMINGS
    with open(output, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--methods", required=True)
    parser.add_argument("--import", dest="modules", action="append", default=[])
    args = parser.parse_args()
    for module in args.modules:
        importlib.import_module(module)
    main(args.output, args.methods.split(","))
