"""Adapter math in the compute dtype under mixed precision (issue 19).

Under `mixed_bfloat16` / `mixed_float16`, LoRA and DoRA keep their variables
in float32 and cast the factors down to the compute dtype: no float32 copy
of the activations in the forward or the backward pass (a copy the backward
pass would keep), and outputs within the rounding error of the compute
dtype of a float64 NumPy reference. Training under mixed precision is in the
shared matrix (`PrecisionMatrix`) and `test_precision_and_data.py`.
"""

import keras
import numpy as np
import pytest
import single_layer

import keras_adapters as ka
from keras_adapters import layers as adapter_layers

BACKEND = keras.backend.backend()
# A batch size that no variable of the layer has as its first axis: every
# floating tensor whose first axis is BATCH is an activation or its gradient.
BATCH = 7
# KerasHub BERT's query layout: x (batch, seq 3, hidden 6), kernel
# (hidden 6, heads 2, head_dim 4), 2-D view (6, 8).
LAYOUT = "bert"
METHODS = {
    "lora": lambda: ka.LoRA(rank=2, alpha=4),
    "dora": lambda: ka.DoRA(rank=2, alpha=4),
}
# Unit roundoff of each compute dtype (half the gap from 1 to the next
# number): bfloat16 keeps 8 significant bits, float16 11.
UNIT_ROUNDOFF = {"mixed_bfloat16": 2.0**-8, "mixed_float16": 2.0**-11}


@pytest.fixture(params=list(UNIT_ROUNDOFF))
def policy(request):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy(previous)


def numpy(x):
    return np.asarray(
        keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")), "float64"
    )


def adapted(method):
    """`(model, layer, x, values)`: the adapted layer (built under the
    current policy) in a model taking inputs of the compute dtype, with
    random, sizable adapter values; inputs in the compute dtype; the
    float64 values of the inputs (`x`), the base kernel and the adapter
    variables (by short name: `lora_a`, ...)."""
    model, layer, _ = single_layer.build(LAYOUT)
    values = {"kernel": numpy(layer.kernel)}
    ka.enable_adapter(model, METHODS[method](), targets="proj")
    rng = np.random.default_rng(1)
    for name, variable in adapter_layers.adapter_variables(layer).items():
        if variable.dtype != "float32":  # the dropout seed (none here)
            continue
        value = rng.normal(size=variable.shape).astype("float32")
        if name == "lora_magnitude":
            value = 1.0 + np.abs(value)
        variable.assign(value)
        values[name] = value.astype("float64")
    x = rng.normal(size=(BATCH,) + single_layer.LAYOUTS[LAYOUT][1])
    x = keras.ops.cast(x, layer.compute_dtype)
    values["x"] = numpy(x)
    # Inputs in the compute dtype, as a KerasHub backbone's embeddings hand
    # them on (`single_layer`'s model takes float32 inputs and casts them).
    inputs = keras.Input(x.shape[1:], dtype=layer.compute_dtype)
    model = keras.Model(inputs, layer(inputs))
    return model, layer, x, values


def reference(method, values, dtype):
    """`(y, size)`: the adapted layer's output before bias in float64 from
    the compute-dtype inputs and the kernel rounded to `dtype` (as Keras
    autocasts it), and the same formula on absolute values, which bounds the
    rounding error (`|error| <= k * u * size`, `u` the unit roundoff)."""
    adapter = METHODS[method]()
    w = single_layer.to_matrix(LAYOUT, values["kernel"])
    w_rounded = single_layer.to_matrix(
        LAYOUT, numpy(keras.ops.cast(values["kernel"], dtype))
    )
    a, b, s = values["lora_a"], values["lora_b"], adapter.scale
    x = values["x"].reshape(BATCH, 3, 6)
    y = x @ w_rounded + s * (x @ a) @ b
    size = np.abs(x) @ np.abs(w) + s * (np.abs(x) @ np.abs(a)) @ np.abs(b)
    if method == "dora":
        column = values["lora_magnitude"] / np.linalg.norm(w + s * a @ b, axis=0)
        y, size = y * column, size * column
    return y.reshape(BATCH, 3, 2, 4), size.reshape(BATCH, 3, 2, 4)


@pytest.mark.parametrize("method", list(METHODS))
def test_outputs_match_a_float64_reference_to_the_compute_dtype(method, policy):
    _, layer, x, values = adapted(method)
    dtype = layer.compute_dtype
    outputs = layer(x)
    assert keras.backend.standardize_dtype(outputs.dtype) == dtype
    y, size = reference(method, values, dtype)
    error = np.abs(numpy(outputs) - values_bias(layer) - y)
    # Each of the roundings (x W; the factors, the rank-r hidden, the update,
    # the sum; DoRA's scale) costs at most u relative to the terms' absolute
    # sizes, plus u per accumulation step if a backend accumulates its
    # 6-term dot products in the compute dtype; k = 8 (measured: at most
    # 2.6 u on JAX).
    bound = 8 * UNIT_ROUNDOFF[policy] * size
    assert np.all(error <= bound), (error / size).max() / UNIT_ROUNDOFF[policy]
    # The adapter's update is far above that bound: dropping it would fail.
    base = values["x"].reshape(BATCH, 3, 6) @ single_layer.to_matrix(
        LAYOUT, values["kernel"]
    )
    assert np.abs(base.reshape(y.shape) - y).max() > 5 * bound.max()


def values_bias(layer):
    return numpy(layer.bias)


def floating_activations(model, x):
    """`{dtype}` of the floating tensors with the batch as first axis in the
    forward and backward pass (gradients of the adapter variables) of the
    one-layer `model` on `x`, read from the program the backend traces.

    The cotangent of the outputs is given in the compute dtype (no loss
    reduction, which may accumulate in float32 by itself).
    """
    trainable = model.trainable_variables
    if BACKEND == "jax":
        import jax

        frozen = [v.value for v in model.non_trainable_variables]

        def gradients(values):
            def forward(values):
                return model.stateless_call(values, frozen, x)[0]

            outputs, backward = jax.vjp(forward, values)
            return backward(keras.ops.ones_like(outputs))

        closed = jax.make_jaxpr(gradients)([v.value for v in trainable])
        return {str(a.dtype) for a in _jax_avals(closed.jaxpr) if _is_activation(a)}
    import tensorflow as tf

    @tf.function
    def gradients(x):
        with tf.GradientTape() as tape:
            outputs = model(x)
        return tape.gradient(outputs, trainable, tf.ones_like(outputs))

    graph = gradients.get_concrete_function(x).graph
    return {
        t.dtype.name
        for op in graph.get_operations()
        for t in op.outputs
        if _is_activation(t)
    }


def _is_activation(tensor):
    """Whether `tensor` (a JAX abstract value or a TF graph tensor) is a
    floating tensor with the batch as its first axis."""
    try:
        shape = tuple(tensor.shape)
    except ValueError:  # a TF tensor of unknown rank
        return False
    name = getattr(tensor.dtype, "name", str(tensor.dtype))
    return len(shape) > 1 and shape[0] == BATCH and "float" in name


def _jax_avals(jaxpr):
    """The abstract values of every equation's outputs, sub-programs too."""
    for equation in jaxpr.eqns:
        for var in equation.outvars:
            yield var.aval
        for param in equation.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    yield from _jax_avals(inner)
                elif hasattr(sub, "eqns"):
                    yield from _jax_avals(sub)


@pytest.mark.parametrize("method", list(METHODS))
def test_no_float32_activation_in_the_adapter_path(method, policy):
    model, layer, x, _ = adapted(method)
    dtypes = floating_activations(model, x)
    assert dtypes == {layer.compute_dtype}, dtypes
