"""HUT against the NumPy formula W' = W * (1 + s A B)."""

import math

import keras
import numpy as np
import pytest
from _fixtures import backend_independent
from single_layer import build
from single_layer import from_matrix
from single_layer import output
from single_layer import to_matrix

import keras_adapters as ka
from keras_adapters import layers as adapter_layers

RNG = np.random.default_rng(7)
LAYOUTS = ("dense", "gemma", "bert")


def randomize(layer):
    for variable in adapter_layers.adapter_variables(layer).values():
        variable.assign(RNG.normal(size=variable.shape).astype("float32") * 0.5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_identity_at_init(layout):
    model, _, x = build(layout)
    base = keras.ops.convert_to_numpy(model(x))
    ka.enable_adapter(model, ka.HUT(rank=2), targets="proj")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), base, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank, alpha", [(1, None), (2, 4), (3, 0.5)])
def test_output_and_merge_match_formula(layout, rank, alpha):
    model, layer, x = build(layout)
    adapter = ka.HUT(rank=rank, alpha=alpha)
    ka.enable_adapter(model, adapter, targets="proj")
    randomize(layer)
    a = np.asarray(layer.hut_a, "float64")
    b = np.asarray(layer.hut_b, "float64")
    base = np.asarray(layer._kernel, "float64")
    assert (a.shape[0], b.shape[1]) == to_matrix(layout, base).shape
    assert a.shape[1] == b.shape[0] == rank
    scale = (rank if alpha is None else alpha) / rank
    matrix = to_matrix(layout, base) * (1.0 + scale * a @ b)
    kernel = from_matrix(layout, matrix, base.shape)
    expected = output(layout, layer, x, kernel)
    # The update is far above the tolerances below.
    assert np.max(np.abs(kernel - base)) > 0.05

    outputs = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer.kernel), kernel, rtol=1e-5, atol=1e-5
    )
    ka.merge_adapters(model)
    assert not adapter_layers.is_adapted(layer)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer._kernel), kernel, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x)), outputs, rtol=1e-5, atol=1e-5
    )


def test_zero_weights_stay_zero():
    # A multiplicative update cannot move a weight that is exactly zero.
    model, layer, x = build("dense")
    kernel = np.array(layer._kernel)
    kernel[0] = 0.0
    layer._kernel.assign(kernel)
    ka.enable_adapter(model, ka.HUT(rank=2), targets="proj")
    randomize(layer)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.kernel)[0], 0.0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parameter_count(layout):
    model, _, _ = build(layout)
    report = ka.enable_adapter(model, ka.HUT(rank=2), targets="proj")
    d_in, d_out = {"dense": (5, 3)}.get(layout, (6, 8))
    actual = sum(math.prod(v.shape) for v in ka.adapter_variables(model))
    assert report.adapter_params == actual == 2 * (d_in + d_out)


def test_initializers():
    model, layer, _ = build("dense")
    ka.enable_adapter(model, ka.HUT(rank=2, a_initializer="gaussian"), targets="proj")
    assert np.all(np.asarray(layer.hut_b) == 0)
    assert np.std(np.asarray(layer.hut_a)) > 0
    model, layer, _ = build("dense")
    adapter = ka.HUT(rank=2, b_initializer=keras.initializers.Constant(0.5))
    assert isinstance(adapter.get_config()["b_initializer"], dict)
    ka.enable_adapter(model, adapter, targets="proj")
    np.testing.assert_array_equal(np.asarray(layer.hut_b), 0.5)


def test_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model, layer, x = build("dense")
        ka.enable_adapter(model, ka.HUT(rank=2), targets="proj")
        randomize(layer)
        outputs = model(x)
        assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
        assert all(v.dtype == "float32" for v in ka.adapter_variables(model))
        # The adapted kernel is computed in float32.
        assert keras.backend.standardize_dtype(layer.kernel.dtype) == "float32"
        expected = x @ np.asarray(layer.kernel) + np.asarray(layer.bias)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(keras.ops.cast(outputs, "float32")),
            expected,
            rtol=5e-2,
            atol=1e-1,
        )
    finally:
        keras.config.set_dtype_policy(previous)


@backend_independent
@pytest.mark.parametrize(
    "adapter",
    [
        ka.HUT(rank=4),
        ka.HUT(rank=2, alpha=8),
        ka.HUT(rank=2, alpha=0.5, a_initializer="he_uniform"),
        ka.HUT(rank=1, a_initializer={"class_name": "Ones", "config": {}}),
    ],
    ids=repr,
)
def test_config_round_trip(adapter):
    assert ka.HUT.from_config(adapter.get_config()) == adapter
    assert ka.Adapter.deserialize(adapter.serialize()) == adapter
    assert (
        keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(adapter)
        )
        == adapter
    )


@backend_independent
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank"),
        ({"rank": -2}, "rank"),
        ({"rank": 1.5}, "rank"),
        ({"rank": True}, "rank"),
        ({"rank": "4"}, "rank"),
        ({"rank": 2, "alpha": 0}, "alpha"),
        ({"rank": 2, "alpha": -1.0}, "alpha"),
        ({"rank": 2, "alpha": "16"}, "alpha"),
        ({"rank": 2, "a_initializer": "no_such_initializer"}, "a_initializer"),
        ({"rank": 2, "b_initializer": 3}, "b_initializer"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ka.HUT(**kwargs)


def test_rank_larger_than_layer_is_rejected():
    model, layer, _ = build("dense")  # 6 x 5
    with pytest.raises(ValueError, match="min\\(d_in, d_out\\)"):
        ka.enable_adapter(model, ka.HUT(rank=6), targets="proj")
    assert not adapter_layers.is_adapted(layer)


@backend_independent
def test_lora_behaviour_unchanged_by_shared_helpers():
    # The initializer table and checks moved to base.py; LoRA keeps its API.
    lora = ka.LoRA(rank=2, a_initializer="gaussian")
    assert lora.get_config()["a_initializer"] == "gaussian"
    with pytest.raises(ValueError, match="a_initializer"):
        ka.LoRA(rank=2, a_initializer="no_such_initializer")
    with pytest.raises(ValueError, match="rank"):
        ka.LoRA(rank=0)
