"""Multi-device checks, run in a fresh process by `tests/test_distribution.py`.

Usage:

    KERAS_BACKEND=jax python tests/distribution_check.py OUTPUT.json
    KERAS_BACKEND=tensorflow python tests/distribution_check.py OUTPUT.json

Virtual devices must be configured before the backend initializes, so this
runs in its own process: on JAX it sets
`XLA_FLAGS=--xla_force_host_platform_device_count=8` before importing JAX; on
TensorFlow it splits the CPU into 2 logical devices before TensorFlow creates
any. It trains tiny KerasHub models with adapters on one device and on
several, merges and exports, and writes what it measured to OUTPUT.json; the
assertions live in the test.
"""

import contextlib
import json
import os
import re
import sys
import tempfile
import time

BACKEND = os.environ.get("KERAS_BACKEND", "jax")
JAX_DEVICES = 8
TF_DEVICES = 2

if BACKEND == "jax":
    # 8 virtual host devices; and cheaper CPU compilation (each program is
    # compiled for one device and for 8, and the tests share 2 CPU cores).
    # Both runs of a comparison use the same flags.
    flags = os.environ.get("XLA_FLAGS", "").split()
    for flag in (
        f"--xla_force_host_platform_device_count={JAX_DEVICES}",
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
    ):
        if flag.split("=")[0] not in " ".join(flags):
            flags.append(flag)
    os.environ["XLA_FLAGS"] = " ".join(flags)
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

import keras_adapters as ka  # noqa: E402
from keras_adapters import layers as adapter_layers  # noqa: E402
from keras_adapters.kernels import frozen_kernel  # noqa: E402

SEQ = 8
VOCAB = 64
BATCH = 16
EPOCHS = 3

# One model carries all three methods, each on its own layers (two methods
# share no layer), so that one compiled training step covers them all: the
# machine running the tests has 2 CPU cores and each compilation for 8
# virtual devices costs seconds.
BERT_ADAPTERS = {
    "lora": (lambda: ka.LoRA(rank=2, alpha=4), ka.attention("query")),
    "hut": (lambda: ka.HUT(rank=2, alpha=4), ka.attention("value")),
    "qgoft": (
        lambda: ka.QGOFT(orthogonality=1e-2, scale=True),
        ka.attention("attention_output"),
    ),
}
# Gemma, with KerasHub's layout map on a (batch 4, model 2) mesh: each method
# gets a 3-D EinsumDense kernel and a 2-D one.
GEMMA_ADAPTERS = {
    "lora": (
        lambda: ka.LoRA(rank=2, alpha=4),
        [ka.attention("query"), r".*/ffw_linear"],
    ),
    "hut": (
        lambda: ka.HUT(rank=2, alpha=4),
        [ka.attention("attention_output"), r".*/ffw_gating"],
    ),
    "qgoft": (
        lambda: ka.QGOFT(orthogonality=1e-2, scale=True),
        [ka.attention("value"), r".*/ffw_gating_2"],
    ),
}


def bert(seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=SEQ,
        dropout=0.0,
    )
    return keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=3, preprocessor=None, dropout=0.0
    )


def gemma(seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
        dropout=0.0,
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


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


def enable(model, adapters):
    for name, (make, targets) in adapters.items():
        ka.enable_adapter(model, make(), targets=targets, name=name)


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
            k for k in exported if re.search("lora_|hut_|qgoft_", k)
        ],
    }


def spec(variable):
    """A JAX variable's sharding as a list with one entry per axis."""
    axes = list(variable.value.sharding.spec)
    return axes + [None] * (len(variable.shape) - len(axes))


def layouts(variables):
    return {v.path: spec(v) for v in variables}


def run_jax(results):
    devices = keras.distribution.list_devices()
    results["devices"] = len(devices)

    # Data parallel: BERT, every variable replicated, the batch split 8 ways.
    data_parallel = keras.distribution.DataParallel(devices=devices)
    x, y = bert_data()
    with timed("data parallel: one device"):
        single, single_losses = train(bert, BERT_ADAPTERS, x, y)
    with timed("data parallel: 8 devices"):
        multi, multi_losses = train(bert, BERT_ADAPTERS, x, y, data_parallel.scope())
    variables = ka.adapter_variables(multi)
    results["data_parallel"] = {
        "single": single_losses,
        "multi": multi_losses,
        "layouts": layouts(variables),
        "device_counts": sorted({len(v.value.sharding.device_set) for v in variables}),
        "merged_difference": merged_difference(multi, single, data_parallel.scope()),
    }

    # Model parallel: Gemma on a (batch 4, model 2) mesh with KerasHub's own
    # layout map; enable_adapter lays the adapter variables out by the rule.
    mesh = keras.distribution.DeviceMesh((4, 2), ("batch", "model"), devices)
    model_parallel = keras.distribution.ModelParallel(
        layout_map=keras_hub.models.GemmaBackbone.get_layout_map(mesh),
        batch_dim_name="batch",
    )
    x, y = gemma_data()
    with timed("model parallel: one device"):
        single, single_losses = train(gemma, GEMMA_ADAPTERS, x, y)
    with timed("model parallel: 8 devices"):
        multi, multi_losses = train(gemma, GEMMA_ADAPTERS, x, y, model_parallel.scope())
    kernels = [layer._kernel for layer in ka.adapted_layers(multi)]
    # What adapter_layout_map's entries resolve to, for the same variables.
    extended = ka.distribution.adapter_layout_map(
        keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    )
    from_map = {}
    for layer in ka.adapted_layers(multi):
        for slot in adapter_layers.slots(layer).values():
            for name, qualified in slot.attributes.items():
                path = f"{layer.path}/{qualified}"
                resolved = extended[path].resolve(
                    frozen_kernel(layer), slot.adapter.variable_axes[name]
                )
                from_map[path] = list(resolved.axes)
    entry = {
        "single": single_losses,
        "multi": multi_losses,
        "kernel_layouts": layouts(kernels),
        "layouts": layouts(ka.adapter_variables(multi)),
        "layout_map_layouts": from_map,
    }
    with timed("model parallel: export"):
        entry["export"] = export_difference(multi, single, x, model_parallel.scope())
    with timed("model parallel: merge"):
        single = gemma()
        enable(single, GEMMA_ADAPTERS)
        entry["merged_difference"] = merged_difference(
            multi, single, model_parallel.scope()
        )
    # Merging in place keeps each kernel's layout.
    entry["merged_kernel_layouts"] = layouts(kernels)
    results["model_parallel"] = entry


def run_tensorflow(results):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    results["devices"] = len(devices)
    strategy = tf.distribute.MirroredStrategy(devices)
    x, y = bert_data()
    # XLA cannot run MirroredStrategy replicas on logical CPU devices (TF
    # itself fails: keras-team/keras#19005), so both runs skip jit_compile.
    with timed("mirrored: one device"):
        single, single_losses = train(bert, BERT_ADAPTERS, x, y, jit_compile=False)
    with timed("mirrored: 2 devices"):
        multi, multi_losses = train(
            bert, BERT_ADAPTERS, x, y, strategy.scope(), jit_compile=False
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
        enable(single, BERT_ADAPTERS)
        entry["merged_difference"] = merged_difference(multi, single, strategy.scope())
    # Every replica holds the same merged kernel.
    entry["replicas_agree"] = all(
        np.array_equal(r.numpy(), v.value.values[0].numpy())
        for v in multi.weights
        for r in v.value.values
    )
    results["mirrored"] = entry


def main(output):
    results = {"backend": BACKEND}
    start = time.time()
    if BACKEND == "jax":
        run_jax(results)
    elif BACKEND == "tensorflow":
        run_tensorflow(results)
    else:
        raise SystemExit(f"unsupported backend {BACKEND!r}")
    results["seconds"] = time.time() - start
    results["timings"] = TIMINGS
    with open(output, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
