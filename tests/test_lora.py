"""LoRA numerics against NumPy formulas, on Dense and multi-axis EinsumDense."""

import keras
import numpy as np
import pytest
from _fixtures import backend_independent

import keras_adapters as ka
from keras_adapters.adapters import Adapter


def _model(layer, input_shape):
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, layer(inputs))


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


# (layer factory, input shape, numpy kernel -> (d_in, d_out) matrix, inverse)
LAYERS = {
    "dense": (
        lambda: keras.layers.Dense(6, name="proj"),
        (5,),
        lambda k: k,
        lambda m, shape: m,
    ),
    # Gemma's query layout: kernel (heads, hidden, head_dim); the 2-D view
    # needs the hidden axis first.
    "einsum_gemma_query": (
        lambda: keras.layers.EinsumDense(
            "btd,ndh->btnh", output_shape=(None, 2, 3), name="proj"
        ),
        (4, 5),
        lambda k: np.transpose(k, (1, 0, 2)).reshape(5, 6),
        lambda m, shape: np.transpose(m.reshape(5, 2, 3), (1, 0, 2)),
    ),
    # Attention output: kernel (heads, head_dim, hidden), two input axes.
    "einsum_attention_output": (
        lambda: keras.layers.EinsumDense(
            "abcd,cde->abe", output_shape=(None, 5), bias_axes="e", name="proj"
        ),
        (4, 2, 3),
        lambda k: k.reshape(6, 5),
        lambda m, shape: m.reshape(2, 3, 5),
    ),
}


@pytest.mark.parametrize("layer_id", sorted(LAYERS))
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_output_and_merge_match_numpy(layer_id, use_rslora):
    make, input_shape, to_matrix, from_matrix = LAYERS[layer_id]
    model = _model(make(), input_shape)
    layer = model.get_layer("proj")
    kernel = _numpy(layer._kernel).copy()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, *input_shape)).astype("float32")
    ka.enable_adapter(
        model, ka.LoRA(rank=2, alpha=3, use_rslora=use_rslora), targets="proj"
    )
    a = rng.normal(size=layer.lora_a.shape).astype("float32")
    b = rng.normal(size=layer.lora_b.shape).astype("float32")
    layer.lora_a.assign(a)
    layer.lora_b.assign(b)
    scale = 3 / np.sqrt(2) if use_rslora else 3 / 2
    adapted_kernel = from_matrix(to_matrix(kernel) + scale * a @ b, kernel.shape)
    expected = _model_output_with_kernel(layer, x, adapted_kernel)
    np.testing.assert_allclose(_numpy(model(x)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        _numpy(layer.kernel), adapted_kernel, rtol=1e-5, atol=1e-6
    )
    ka.merge_adapters(model)
    np.testing.assert_allclose(
        _numpy(layer._kernel), adapted_kernel, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(_numpy(model(x)), expected, rtol=1e-5, atol=1e-5)


def _model_output_with_kernel(layer, x, kernel):
    bias = 0 if layer.bias is None else _numpy(layer.bias)
    if isinstance(layer, keras.layers.EinsumDense):
        return np.einsum(layer.equation, x, kernel) + bias
    return x @ kernel + bias


def test_dropout_applies_to_the_adapter_input_only_in_training():
    model = _model(keras.layers.Dense(6, name="proj"), (5,))
    layer = model.get_layer("proj")
    x = np.random.default_rng(0).normal(size=(64, 5)).astype("float32")
    base = _numpy(model(x))
    ka.enable_adapter(model, ka.LoRA(rank=2, dropout=0.5), targets="proj")
    # B = 0: dropout on the adapter input cannot change the output.
    np.testing.assert_allclose(_numpy(model(x, training=True)), base, atol=1e-6)
    layer.lora_b.assign(np.ones(layer.lora_b.shape, "float32"))
    evaluated = _numpy(model(x, training=False))
    trained_1 = _numpy(model(x, training=True))
    trained_2 = _numpy(model(x, training=True))
    assert not np.allclose(trained_1, evaluated)
    assert not np.allclose(trained_1, trained_2)
    delta = x @ _numpy(layer.lora_a) @ _numpy(layer.lora_b)
    np.testing.assert_allclose(evaluated, base + delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "initializer, check",
    [
        # PEFT's kaiming_uniform(a=sqrt(5)): uniform(-1/sqrt(d_in), 1/sqrt(d_in)).
        ("kaiming", lambda a, d_in, r: np.abs(a).max() <= 1 / np.sqrt(d_in)),
        ("gaussian", lambda a, d_in, r: abs(a.std() - 1 / r) < 0.1 / r),
        ("he_uniform", lambda a, d_in, r: np.abs(a).max() <= np.sqrt(6 / d_in)),
        ("ones", lambda a, d_in, r: np.all(a == 1)),
    ],
)
def test_a_initializers(initializer, check):
    model = _model(keras.layers.Dense(300, name="proj"), (400,))
    ka.enable_adapter(model, ka.LoRA(rank=4, a_initializer=initializer), targets="proj")
    layer = model.get_layer("proj")
    a = _numpy(layer.lora_a)
    assert a.shape == (400, 4) and a.std() > 0 or initializer == "ones"
    assert check(a, 400, 4)
    assert np.all(_numpy(layer.lora_b) == 0)


@backend_independent
def test_config_round_trip_and_registry():
    lora = ka.LoRA(
        rank=4,
        alpha=8,
        use_rslora=True,
        dropout=0.1,
        b_initializer=keras.initializers.RandomNormal(stddev=0.01),
    )
    data = lora.serialize()
    assert data["method"] == "lora"
    restored = Adapter.deserialize(data)
    assert restored == lora and restored.get_config() == lora.get_config()
    assert (
        keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(lora))
        == lora
    )
    assert lora.scale == pytest.approx(8 / 2)
    assert ka.LoRA(rank=4).scale == 1.0
    with pytest.raises(ValueError, match="Unknown adapter method 'vera'"):
        Adapter.deserialize({"method": "vera", "config": {}})
