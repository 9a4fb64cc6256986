"""One adapted projection in a tiny functional model, and its NumPy view.

Shared by the per-method reference tests (`test_hut.py`,
`test_qgoft_reference.py`, ...): each layout is a `Dense` or an `EinsumDense`
as KerasHub uses them, and the 2-D `(d_in, d_out)` view of its kernel is
written out here by hand, independently of `keras_adapters.kernels.KernelView`.
"""

import keras
import numpy as np

# name -> (equation or None for Dense, input shape without batch, output shape)
LAYOUTS = {
    # An odd width: the Givens tree of the orthogonal methods has an unpaired
    # coordinate.
    "dense": (None, (5,), (3,)),
    "dense_384": (None, (384,), (4,)),
    # KerasHub BERT's query layout, with a bias.
    "bert": ("abc,cde->abde", (3, 6), (2, 4)),
    # Gemma's query layout: the kernel is (heads, hidden, head_dim), so its
    # 2-D (hidden, heads * head_dim) view needs a transpose.
    "gemma": ("btd,ndh->btnh", (3, 6), (2, 4)),
}


def build(layout, seed=0):
    """`(model, layer, x)`: the layer named `"proj"` with random weights
    (bias included) and a batch of 4 random inputs."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed + 7)
    equation, input_shape, output_shape = LAYOUTS[layout]
    inputs = keras.Input(input_shape)
    if equation is None:
        layer = keras.layers.Dense(output_shape[0], name="proj")
    else:
        layer = keras.layers.EinsumDense(
            equation,
            output_shape=(None,) + output_shape,
            bias_axes="de" if layout == "bert" else None,
            name="proj",
        )
    model = keras.Model(inputs, layer(inputs))
    for variable in layer.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    x = rng.normal(size=(4,) + input_shape).astype("float32")
    return model, layer, x


def to_matrix(layout, kernel):
    """The `(d_in, d_out)` view of `kernel`, in float64."""
    kernel = np.asarray(keras.ops.convert_to_numpy(kernel), "float64")
    if layout == "gemma":  # (n, d, h) -> (d, n * h)
        return kernel.transpose(1, 0, 2).reshape(kernel.shape[1], -1)
    return kernel.reshape(kernel.shape[0], -1)


def from_matrix(layout, matrix, kernel_shape):
    """The kernel of shape `kernel_shape` whose view is `matrix`."""
    if layout == "gemma":
        n, d, h = kernel_shape
        return matrix.reshape(d, n, h).transpose(1, 0, 2)
    return matrix.reshape(kernel_shape)


def output(layout, layer, x, kernel):
    """`x` through `layer` (its bias, no activation) with `kernel`, in NumPy."""
    x = np.asarray(x, "float64")
    bias = 0.0 if layer.bias is None else np.asarray(layer.bias, "float64")
    equation = LAYOUTS[layout][0]
    if equation is None:
        return x @ kernel + bias
    return np.einsum(equation, x, kernel) + bias
