"""Pins the private Keras behaviours keras_adapters relies on (keras>=3.15)."""

import keras
import numpy as np
import pytest
from _fixtures import backend_independent
from keras.src import api_export

from keras_adapters import _keras_internals as internals


class _Mixin:
    def call(self, inputs):
        return super().call(inputs) * 2.0


@backend_independent
def test_keras_version_is_supported():
    major, minor = (int(p) for p in keras.__version__.split(".")[:2])
    assert (major, minor) >= (3, 15)


def test_variables_can_be_added_to_and_removed_from_a_built_layer():
    layer = keras.layers.Dense(3)
    layer.build((None, 2))
    assert layer._tracker.locked
    with pytest.raises(ValueError):
        layer.extra = layer.add_weight(name="extra", shape=(1,))
    with internals.unlocked_tracker(layer):
        extra = layer.add_weight(name="extra", shape=(1,))
        layer.extra = extra
    assert layer._tracker.locked
    assert any(v is extra for v in layer.weights)
    assert any(v is extra for v in layer.trainable_weights)
    internals.untrack_variable(layer, extra)
    internals.untrack_attribute(layer, "extra")
    assert [v.name for v in layer.weights] == ["kernel", "bias"]
    assert not hasattr(layer, "extra")


def test_switched_class_serializes_as_the_original_and_switches_back():
    layer = keras.layers.Dense(3, name="proj")
    layer.build((None, 2))
    before = keras.saving.serialize_keras_object(layer)
    internals.switch_class(layer, _Mixin, serialize_as_base=True)
    assert isinstance(layer, _Mixin) and isinstance(layer, keras.layers.Dense)
    assert internals.base_class(layer) is keras.layers.Dense
    x = np.ones((1, 2), "float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)),
        2 * (x @ keras.ops.convert_to_numpy(layer.kernel) + 0),
        rtol=1e-6,
    )
    after = keras.saving.serialize_keras_object(layer)
    assert {k: after[k] for k in ("module", "class_name", "registered_name")} == {
        k: before[k] for k in ("module", "class_name", "registered_name")
    }
    assert type(keras.saving.deserialize_keras_object(after)) is keras.layers.Dense
    # One cached subclass per (mixin, class).
    other = keras.layers.Dense(2)
    other.build((None, 2))
    internals.switch_class(other, _Mixin, serialize_as_base=True)
    assert type(other) is type(layer)
    internals.restore_class(layer)
    assert type(layer) is keras.layers.Dense
    assert keras.layers.Dense in api_export.REGISTERED_OBJS_TO_NAMES


@backend_independent
def test_layers_with_parents_walks_nested_layers_once():
    inner = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2, name="mha")
    inputs = keras.Input((3, 4))
    outputs = inner(inputs, inputs)
    model = keras.Model(inputs, outputs)
    pairs = list(internals.layers_with_parents(model))
    names = [(layer.name, parent.name) for layer, parent in pairs]
    assert ("mha", model.name) in names
    assert ("query", "mha") in names and ("attention_output", "mha") in names
    assert len({id(layer) for layer, _ in pairs}) == len(pairs)


def test_add_variable_gives_the_layer_path_a_regularizer_and_float32():
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3, name="proj")(inputs)
    model = keras.Model(inputs, outputs)
    layer = model.get_layer("proj")
    penalty = keras.regularizers.L2(0.5)
    variable = internals.add_variable(
        layer, "extra.a", (4, 2), keras.initializers.Ones(), regularizer=penalty
    )
    assert variable.path == f"{layer.path}/extra.a"
    assert variable.dtype == "float32" and not variable._autocast
    assert variable.trainable and any(v is variable for v in layer.trainable_weights)
    assert getattr(layer, "extra.a") is variable
    # The regularizer reaches the layer's (and the model's) losses.
    model(np.zeros((1, 4), "float32"))
    losses = [float(keras.ops.convert_to_numpy(loss)) for loss in layer.losses]
    assert losses == [pytest.approx(0.5 * 8.0)]
    internals.untrack_variable(layer, variable)
    internals.untrack_attribute(layer, "extra.a")
    assert [v.name for v in layer.weights] == ["kernel", "bias"]


def test_kernel_variable_is_the_stored_kernel():
    layer = keras.layers.EinsumDense("ab,bc->ac", output_shape=(3,))
    layer.build((None, 2))
    assert internals.kernel_variable(layer) is layer._kernel
    assert internals.kernel_variable(layer).path.endswith("/kernel")


@pytest.mark.parametrize("block_size", [-1, 2], ids=["per_channel", "grouped"])
def test_quantized_embedding_goes_back_to_float_and_requantizes(block_size):
    """`replace_quantized_kernel` on an int4 KerasHub `ReversibleEmbedding`
    (a subclass Keras' `quantize` refuses without `type_check=False`) leaves
    a float table like a fresh layer's, and `quantize_layer` quantizes it
    again with the int4 storage Keras builds."""
    import keras_hub

    layer = keras_hub.layers.ReversibleEmbedding(6, 4)
    layer.build()
    float_names = [v.name for v in layer.weights]
    config = keras.quantizers.Int4QuantizationConfig(block_size=block_size)
    layer.quantize("int4", type_check=False, config=config)
    assert layer._embeddings.dtype == "int8" and layer._orig_output_dim == 4
    table = np.arange(24, dtype="float32").reshape(6, 4) / 24
    internals.replace_quantized_kernel(layer, table, "float32")
    assert layer.quantization_mode is None and not hasattr(layer, "_orig_output_dim")
    assert [v.name for v in layer.weights] == float_names
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.embeddings), table)
    internals.quantize_layer(layer, "int4", config)
    assert layer.quantization_mode == "int4"
    names = ["embeddings", "embeddings_scale"]
    assert [v.name for v in layer.weights][:2] == names
    assert hasattr(layer, "embeddings_zero") == (block_size > 0)


def test_quantize_hooks_route_quantized_calls_and_refuse_quantizing():
    class Hooked(internals.QuantizeHooks):
        def call(self, inputs):
            return super().call(inputs) + 1.0

        def _refuse_quantize_error(self):
            return ValueError("refused")

    layer = keras.layers.Dense(2)
    layer.build((None, 2))
    internals.switch_class(layer, Hooked, serialize_as_base=True)
    x = np.ones((1, 2), "float32")
    # Keras' `quantize` checks its arguments with `_check_quantize_args`
    # before changing anything.
    with pytest.raises(ValueError, match="refused"):
        layer.quantize("int8")
    assert layer.quantization_mode is None
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer.quantized_call(x)),
        keras.ops.convert_to_numpy(layer.call(x)),
    )
    internals.restore_class(layer)


def test_guard_model_quantize_runs_before_keras_changes_anything():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="proj")(inputs))
    calls = []

    def refuse(m):
        calls.append(m)
        raise ValueError("not now")

    internals.guard_model_quantize(model, refuse)
    internals.guard_model_quantize(model, refuse)  # once per model
    with pytest.raises(ValueError, match="not now"):
        model.quantize("int8")
    assert calls == [model]
    assert model.get_layer("proj").quantization_mode is None


def test_override_optimizer_updates_routes_update_step_and_weight_decay():
    variable = keras.Variable(np.ones((2,), "float32"))
    optimizer = keras.optimizers.AdamW(0.1, weight_decay=0.5)
    optimizer.build([variable])
    assert internals.optimizer_variable_index(optimizer, variable) == 0
    seen = []

    def wrap_update_step(original):
        def update_step(gradient, var, learning_rate):
            seen.append("update")
            return original(gradient, var, learning_rate)

        return update_step

    def wrap_weight_decay(original):
        def apply_weight_decay(variables):
            seen.append("decay")
            return original(variables)

        return apply_weight_decay

    internals.override_optimizer_updates(optimizer, wrap_update_step, wrap_weight_decay)
    optimizer.apply([keras.ops.ones((2,))], [variable])
    assert seen == ["decay", "update"]
    iterations = internals.optimizer_iterations_variable(optimizer)
    assert int(keras.ops.convert_to_numpy(iterations)) == 1


def test_reset_compiled_functions_drops_a_causal_lm_generate_function():
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=16,
        num_layers=1,
        num_heads=1,
        hidden_dim=4,
        intermediate_dim=8,
        max_sequence_length=4,
    )
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    lm.make_generate_function()
    assert lm.generate_function is not None
    internals.reset_compiled_functions(lm)
    assert lm.generate_function is None
