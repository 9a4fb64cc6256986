"""Adapters on several devices: layouts, data and model parallel, merge, export.

Two kinds of tests:

- In this process (one device): the layout rule, `adapter_layout_map`, and
  the checks `enable_adapter` makes before it creates adapter variables under
  a distribution (JAX: a one-device mesh; TensorFlow: a one-device
  `MirroredStrategy`).
- `test_multi_device_*` runs `distribution_check.py` in a fresh process with
  virtual devices (JAX: 8 host devices via XLA_FLAGS; TensorFlow: 2 logical
  CPUs), which must be configured before the backend starts, under the
  session's KERAS_BACKEND, and asserts on what it measured: losses equal to
  one device's, adapter layouts as the rule says, merged kernels and the
  exported SavedModel equal to one device's.
"""

import os

import keras
import keras_hub
import numpy as np
import pytest

import keras_adapters as ka
from keras_adapters import _keras_internals as internals
from keras_adapters.adapters.base import ADAPTER_METHODS
from keras_adapters.kernels import frozen_kernel
from keras_adapters.layers import planned_variables

BACKEND = keras.backend.backend()
SCRIPT = os.path.join(os.path.dirname(__file__), "distribution_check.py")


def _einsum(equation, output_shape, input_shape):
    layer = keras.layers.EinsumDense(equation, output_shape=output_shape)
    layer.build(input_shape)
    return layer


def _dense(units, d_in):
    layer = keras.layers.Dense(units, use_bias=False)
    layer.build((None, d_in))
    return layer


def _mesh(shape=(2, 4)):
    devices = [f"cpu:{i}" for i in range(int(np.prod(shape)))]
    return keras.distribution.DeviceMesh(shape, ("batch", "model"), devices)


# Gemma's projections (hidden 16, 4 heads of 8), as KerasHub builds them.
def _gemma_query():
    return _einsum("btd,ndh->btnh", (None, 4, 8), (None, None, 16))


def _gemma_output():
    return _einsum("btnh,nhd->btd", (None, 16), (None, None, 4, 8))


# --- The rule --------------------------------------------------------------


def test_rule_on_dense_kernels():
    layer = _dense(12, 8)
    axes = ka.distribution.adapter_variable_axes
    assert axes((None, "model"), layer, ("in", None)) == (None, None)
    assert axes((None, "model"), layer, (None, "out")) == (None, "model")
    assert axes(("model", None), layer, ("in", None)) == ("model", None)
    assert axes(("batch", "model"), layer, ("in",)) == ("batch",)
    assert axes(("batch", "model"), layer, (None, None, None)) == (None,) * 3


def test_rule_maps_einsum_kernel_axes_onto_the_2d_view():
    # Query kernel (heads, hidden, head_dim): input axis hidden, output axes
    # heads and head_dim. KerasHub's Gemma layout is ("model", "batch", None).
    query = _gemma_query()
    assert frozen_kernel(query).perm == (1, 0, 2)
    axes = ka.distribution.view_mesh_axes
    assert axes(("model", "batch", None), query) == ("batch", "model")
    # Output kernel (heads, head_dim, hidden): input axes heads and head_dim.
    output = _gemma_output()
    assert axes(("model", None, "batch"), output) == ("model", "batch")
    # Several sharded input axes: the outermost in view order is used.
    assert axes(("model", "batch", None), output) == ("model", None)
    assert axes((None, "batch", "model"), output) == ("batch", "model")
    # Nothing sharded.
    assert axes((None, None, None), output) == (None, None)


def test_rule_replicates_axes_the_mesh_does_not_divide():
    layer = _dense(6, 8)  # d_out = 6 is not divisible by 4
    mesh = _mesh((2, 4))
    axes = ka.distribution.view_mesh_axes
    assert axes(("batch", "model"), layer, mesh) == ("batch", None)
    assert axes(("batch", "model"), layer) == ("batch", "model")


def test_rule_never_uses_a_mesh_axis_twice_in_one_variable():
    layer = _dense(8, 8)
    axes = ka.distribution.adapter_variable_axes
    assert axes(("model", None), layer, ("in", "in")) == ("model", None)


@pytest.mark.parametrize(
    "args, message",
    [
        ((("model",), "dense"), "has 1 axes but the kernel has shape"),
        (("model", "dense"), "must be a tuple"),
        (((None, "model"), "not a layer"), "KernelView or a built"),
        (((None, "model"), "dense", ("left", None)), "'in', 'out' or None"),
        (((None, "model"), "dense", "in"), "must be a tuple"),
    ],
)
def test_rule_rejects_bad_input(args, message):
    args = tuple(_dense(4, 4) if a == "dense" else a for a in args)
    function = (
        ka.distribution.adapter_variable_axes
        if len(args) == 3
        else ka.distribution.view_mesh_axes
    )
    with pytest.raises(ValueError, match=message):
        function(*args)


def test_every_adapter_declares_its_variable_axes():
    for method, cls in ADAPTER_METHODS.items():
        adapter = cls.example()
        shapes = planned_variables(_dense(6, 8), adapter)
        # Every variable it creates has axes of the variable's rank.
        assert shapes and set(shapes) <= set(adapter.variable_axes), method
        for name, shape in shapes.items():
            assert len(adapter.variable_axes[name]) == len(shape), (method, name)


# --- adapter_layout_map ----------------------------------------------------


def test_adapter_layout_map_derives_regex_entries_from_kernel_entries():
    mesh = _mesh()
    layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    before = {k: layout_map[k] for k in layout_map}
    extended = ka.distribution.adapter_layout_map(layout_map)
    # The argument is untouched; the copy has every original entry.
    assert {k: layout_map[k] for k in layout_map} == before
    assert all(extended[k] is v for k, v in before.items())
    kernel_keys = [k for k in before if k.endswith(("kernel", "embeddings"))]
    assert len(list(extended)) == len(before) + len(kernel_keys)
    # The token embedding's table too (its adapters are laid out like it).
    table = extended["token_embedding/lora_a"]
    assert tuple(table.axes) == ("model", "batch")

    query = extended["decoder_block_3/attention/query/lora_a"]
    assert isinstance(query, ka.distribution.KernelDerivedLayout)
    assert tuple(query.axes) == ("model", "batch", None)  # the kernel entry's
    assert query.device_mesh is mesh
    output = extended["decoder_block_0/attention/attention_output/qgoft_blocks"]
    assert tuple(output.axes) == ("model", None, "batch")
    assert tuple(extended["decoder_block_1/ffw_linear/hut_b"].axes) == (
        "model",
        "batch",
    )
    # Kernels keep their own entries; other variables get none.
    assert type(extended["decoder_block_0/attention/query/kernel"]) is (
        keras.distribution.TensorLayout
    )
    for path in (
        "decoder_block_0/attention/query/bias",
        "decoder_block_0/attention/query/lora_kernel_a",
        "decoder_block_0/pre_attention_norm/scale",
        "decoder_block_0/pre_attention_norm/lora_a",
    ):
        assert extended[path] is None, path

    # Resolved per layer: A like the kernel's input axis, B like its output.
    resolve = query.resolve
    assert tuple(resolve(frozen_kernel(_gemma_query()), ("in", None)).axes) == (
        "batch",
        None,
    )
    assert tuple(resolve(frozen_kernel(_gemma_query()), (None, "out")).axes) == (
        None,
        "model",
    )
    b = output.resolve(frozen_kernel(_gemma_output()), (None, "out"))
    assert tuple(b.axes) == (None, "batch") and b.device_mesh is mesh


def test_adapter_layout_map_is_idempotent_and_keeps_overrides():
    mesh = _mesh()
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["dense.*kernel"] = (None, "model")
    layout_map["x|kernel"] = ("model", None)  # alternation: no safe rewrite
    layout_map["embeddings"] = ("model", None)
    once = ka.distribution.adapter_layout_map(layout_map)
    twice = ka.distribution.adapter_layout_map(once)
    assert list(once) == list(twice)
    derived = [k for k in once if k not in list(layout_map)]
    assert len(derived) == 1 and derived[0].startswith("dense.*(?:")
    # A user's replacement of a derived entry survives another call.
    del once[derived[0]]
    once[derived[0]] = (None, None)
    again = ka.distribution.adapter_layout_map(once)
    assert type(again[derived[0]]) is keras.distribution.TensorLayout


def test_adapter_layout_map_rejects_bad_input():
    with pytest.raises(ValueError, match="must be a keras.distribution.LayoutMap"):
        ka.distribution.adapter_layout_map({"dense.*kernel": (None, "model")})
    with pytest.raises(ValueError, match="must be a keras.distribution.TensorLayout"):
        ka.distribution.KernelDerivedLayout((None, "model"))


# --- enable_adapter under a distribution, one device -----------------------

jax_only = pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution: JAX")
tf_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute")


def _two_layer_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 8))
    x = keras.layers.EinsumDense("abc,cde->abde", output_shape=(4, 2, 4), name="proj")(
        inputs
    )
    x = keras.layers.Reshape((4, 8))(x)
    outputs = keras.layers.Dense(8, name="out")(x)
    return keras.Model(inputs, outputs, name="two_layers")


def _one_device_model_parallel(layout_map_entries, extend):
    mesh = keras.distribution.DeviceMesh(
        (1, 1), ("batch", "model"), keras.distribution.list_devices()[:1]
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    for key, axes in layout_map_entries.items():
        layout_map[key] = axes
    if extend:
        layout_map = ka.distribution.adapter_layout_map(layout_map)
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )


def _spec(variable):
    # On one device JAX may simplify the sharding itself; the layout Keras
    # gave the variable is what the rule decides (the multi-device test
    # checks the real shardings).
    return tuple(internals.variable_layout(variable).axes)


KERNEL_LAYOUTS = {
    ".*proj/kernel": (None, "model", None),
    ".*out/kernel": ("model", None),
}


@jax_only
@pytest.mark.parametrize("extend", [False, True], ids=["automatic", "layout_map"])
def test_adapter_variables_get_the_rule_layout_on_jax(extend):
    distribution = _one_device_model_parallel(KERNEL_LAYOUTS, extend)
    with distribution.scope():
        model = _two_layer_model()
        ka.enable_adapter(model, ka.LoRA(rank=2), targets=["proj"], name="lora")
        ka.enable_adapter(model, ka.QGOFT(scale=True), targets=["out"], name="q")
    specs = {v.path: _spec(v) for v in ka.adapter_variables(model)}
    # proj: kernel (c=8, d=2, e=4), input axis c, output axes (d, e).
    # Named adapters' variables carry the adapter's name.
    assert specs == {
        "proj/lora_a.lora": (None, None),
        "proj/lora_b.lora": (None, "model"),
        "out/qgoft_blocks.q": (None, None, None),
        "out/qgoft_scale.q": ("model",),
    }
    # Optimizer slots follow their variables.
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    slots = {v.path: _spec(v) for v in model.optimizer.variables if "lora_b" in v.path}
    assert slots and all(s == (None, "model") for s in slots.values()), slots


@jax_only
def test_a_layout_map_entry_for_an_adapter_variable_wins_on_jax():
    entries = {**KERNEL_LAYOUTS, ".*proj/lora_a": ("model", None)}
    with _one_device_model_parallel(entries, extend=False).scope():
        model = _two_layer_model()
        ka.enable_adapter(model, ka.LoRA(rank=2), targets=["proj"])
    assert _spec(model.get_layer("proj").lora_a) == ("model", None)


@jax_only
def test_a_wrong_rank_layout_map_entry_is_refused_before_any_change():
    entries = {**KERNEL_LAYOUTS, ".*/lora_.*": ("model", None, None)}
    with _one_device_model_parallel(entries, extend=False).scope():
        model = _two_layer_model()
        with pytest.raises(ValueError, match="has 3 axes .* but that adapter"):
            ka.enable_adapter(model, ka.LoRA(rank=2), targets=["proj", "out"])
    assert not ka.adapted_layers(model)


@jax_only
def test_enable_adapter_outside_the_model_distribution_is_refused_on_jax():
    distribution = keras.distribution.DataParallel(
        devices=keras.distribution.list_devices()[:1]
    )
    with distribution.scope():
        model = _two_layer_model()
    with pytest.raises(ValueError, match="inside `with distribution.scope"):
        ka.enable_adapter(model, ka.LoRA(rank=2), targets=["proj"])
    assert not ka.adapted_layers(model)
    plain = _two_layer_model()
    with distribution.scope():
        with pytest.raises(ValueError, match="was created without one"):
            ka.enable_adapter(plain, ka.LoRA(rank=2), targets=["proj"])
    assert not ka.adapted_layers(plain)
    with distribution.scope():
        ka.enable_adapter(model, ka.LoRA(rank=2), targets=["proj"])
    assert len(ka.adapted_layers(model)) == 1


@tf_only
def test_enable_adapter_must_run_in_the_model_strategy_scope_on_tensorflow():
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = _two_layer_model()
    with pytest.raises(ValueError, match="inside the same `with strategy.scope"):
        ka.enable_adapter(model, ka.LoRA(rank=2), targets=["proj"])
    assert not ka.adapted_layers(model)
    plain = _two_layer_model()
    with strategy.scope():
        with pytest.raises(ValueError, match="built outside the scope"):
            ka.enable_adapter(plain, ka.LoRA(rank=2), targets=["proj"])
    assert not ka.adapted_layers(plain)
    with strategy.scope():
        ka.enable_adapter(model, ka.LoRA(rank=2), targets=["proj"])
    assert all(
        isinstance(v.value, tf.distribute.DistributedValues)
        for v in ka.adapter_variables(model)
    )


# Several devices (data and model parallel on 8 virtual JAX devices,
# MirroredStrategy on TensorFlow), per adapter method: `matrix.py`'s
# DistributionMatrix, run by test_adapter_matrix.py.
