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
