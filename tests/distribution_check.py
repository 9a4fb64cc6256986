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
import sys
import tempfile
import time

BACKEND = os.environ.get("KERAS_BACKEND", "jax")
JAX_DEVICES = 8
TF_DEVICES = 2

if BACKEND == "jax":
    flag = f"--xla_force_host_platform_device_count={JAX_DEVICES}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
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

SEQ = 8
VOCAB = 64
BATCH = 16
EPOCHS = 3

ADAPTERS = {
    "lora": lambda: ka.LoRA(rank=2, alpha=4),
    "hut": lambda: ka.HUT(rank=2, alpha=4),
    "qgoft": lambda: ka.QGOFT(orthogonality=1e-2, scale=True),
}
GEMMA_TARGETS = [
    ka.attention("query", "value", "attention_output"),
    r".*/ffw_(gating|linear)",
]


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


def numpy_of(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable))


def train(build, adapter, targets, x, y, scope=None):
    """Builds, adapts, compiles and fits under `scope`; returns (model, losses)."""
    with scope or contextlib.nullcontext():
        model = build()
        ka.enable_adapter(model, adapter, targets=targets)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=True,
        )
        history = model.fit(
            x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0
        )
    return model, [float(v) for v in history.history["loss"]]


def copy_adapters(source, target):
    for s, t in zip(
        ka.adapter_variables(source), ka.adapter_variables(target), strict=True
    ):
        assert s.path == t.path, (s.path, t.path)
        t.assign(numpy_of(s))


def merged_difference(multi, single, scope=None):
    """Merges both models; the largest difference between their kernels."""
    copy_adapters(multi, single)
    with scope or contextlib.nullcontext():
        ka.merge_adapters(multi)
    ka.merge_adapters(single)
    worst = 0.0
    for a, b in zip(multi.weights, single.weights, strict=True):
        assert a.path == b.path, (a.path, b.path)
        worst = max(worst, float(np.max(np.abs(numpy_of(a) - numpy_of(b)))))
    return worst


def serve(path, inputs):
    loaded = tf.saved_model.load(path)
    outputs = loaded.signatures["serving_default"](
        **{k: tf.constant(v) for k, v in inputs.items()}
    )
    return next(iter(outputs.values())).numpy()


def export_difference(multi, single, inputs, scope=None):
    """Exports `multi` (distributed, with adapters), compares with `single`.

    Returns the export's own verification difference and the largest
    relative difference between the SavedModel and `single` merged.
    """
    copy_adapters(multi, single)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "export")
        with scope or contextlib.nullcontext():
            report = ka.export_saved_model(multi, path)
        got = serve(path, inputs)
    ka.merge_adapters(single)
    want = np.asarray(single.predict(inputs, verbose=0))
    relative = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    return report.max_relative_difference, relative


def run_jax(results):
    devices = keras.distribution.list_devices()
    results["devices"] = len(devices)

    # Data parallel: BERT, every variable replicated, batch split 8 ways.
    data_parallel = keras.distribution.DataParallel(devices=devices)
    x, y = bert_data()
    for name, make in ADAPTERS.items():
        start = time.time()
        single, single_losses = train(bert, make(), None, x, y)
        multi, multi_losses = train(bert, make(), None, x, y, data_parallel.scope())
        results[f"data_parallel/{name}"] = {
            "single": single_losses,
            "multi": multi_losses,
            "layouts": {
                v.path: list(v.value.sharding.spec) for v in ka.adapter_variables(multi)
            },
            "devices": sorted(
                {len(v.value.sharding.device_set) for v in ka.adapter_variables(multi)}
            ),
            "merged_difference": merged_difference(
                multi, single, data_parallel.scope()
            ),
            "seconds": time.time() - start,
        }

    # Model parallel: Gemma on a (batch 4, model 2) mesh with KerasHub's
    # layout map; LoRA through adapter_layout_map, the others automatic.
    mesh = keras.distribution.DeviceMesh((4, 2), ("batch", "model"), devices)
    x, y = gemma_data()
    for name, make in ADAPTERS.items():
        start = time.time()
        layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
        if name == "lora":
            layout_map = ka.distribution.adapter_layout_map(layout_map)
        model_parallel = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
        single, single_losses = train(gemma, make(), GEMMA_TARGETS, x, y)
        multi, multi_losses = train(
            gemma, make(), GEMMA_TARGETS, x, y, model_parallel.scope()
        )
        entry = {
            "single": single_losses,
            "multi": multi_losses,
            "kernel_layouts": {
                layer.path: list(layer._kernel.value.sharding.spec)
                for layer in ka.adapted_layers(multi)
            },
            "layouts": {
                v.path: list(v.value.sharding.spec) for v in ka.adapter_variables(multi)
            },
        }
        if name == "lora":
            entry["export"] = export_difference(
                multi, single, x, model_parallel.scope()
            )
        else:
            entry["merged_difference"] = merged_difference(
                multi, single, model_parallel.scope()
            )
            entry["merged_kernel_layouts"] = {
                v.path: list(v.value.sharding.spec)
                for v in multi.weights
                if v.path.endswith("/kernel")
            }
        entry["seconds"] = time.time() - start
        results[f"model_parallel/{name}"] = entry

    # The automatic rule and adapter_layout_map agree; enabling outside the
    # distribution the model was built under is refused.
    layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    model_parallel = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    with model_parallel.scope():
        model = gemma()
    try:
        ka.enable_adapter(model, ka.LoRA(rank=2), targets=GEMMA_TARGETS)
        results["outside_scope_error"] = None
    except ValueError as error:
        results["outside_scope_error"] = str(error)
    with model_parallel.scope():
        ka.enable_adapter(model, ka.LoRA(rank=2), targets=GEMMA_TARGETS)
    results["automatic_lora_layouts"] = {
        v.path: list(v.value.sharding.spec) for v in ka.adapter_variables(model)
    }


def run_tensorflow(results):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    results["devices"] = len(devices)
    strategy = tf.distribute.MirroredStrategy(devices)
    x, y = bert_data()
    for name, make in ADAPTERS.items():
        start = time.time()
        single, single_losses = train(bert, make(), None, x, y)
        multi, multi_losses = train(bert, make(), None, x, y, strategy.scope())
        entry = {
            "single": single_losses,
            "multi": multi_losses,
            "mirrored": [
                isinstance(v.value, tf.distribute.DistributedValues)
                for v in ka.adapter_variables(multi)
            ],
            "replicas": multi.distribute_strategy.num_replicas_in_sync,
        }
        if name == "lora":
            entry["export"] = export_difference(multi, single, x, strategy.scope())
        else:
            entry["merged_difference"] = merged_difference(
                multi, single, strategy.scope()
            )
        entry["seconds"] = time.time() - start
        results[f"mirrored/{name}"] = entry

    with strategy.scope():
        model = bert()
    try:
        ka.enable_adapter(model, ka.LoRA(rank=2))
        results["outside_scope_error"] = None
    except ValueError as error:
        results["outside_scope_error"] = str(error)


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
    with open(output, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
