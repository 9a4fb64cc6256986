"""The frozen base kernel an adapter sees.

`frozen_kernel(layer)` returns a `FloatKernel` for a float `Dense` or
`EinsumDense` layer and a `QuantizedKernel` for an int8/int4 one. Both give
adapter methods the same calls (2-D view, frozen projection, dense kernel
for merges), so a method never needs to know how the base is stored.
"""

import keras

from keras_adapters.kernels.float import FloatKernel
from keras_adapters.kernels.quantized import QuantizedKernel
from keras_adapters.kernels.quantized import is_quantized
from keras_adapters.kernels.quantized import quantization_mode
from keras_adapters.kernels.quantized import unsupported_reason
from keras_adapters.kernels.view import KernelView
from keras_adapters.kernels.view import UnsupportedLayerError

SUPPORTED_LAYERS = (keras.layers.Dense, keras.layers.EinsumDense)

__all__ = [
    "FloatKernel",
    "KernelView",
    "QuantizedKernel",
    "SUPPORTED_LAYERS",
    "UnsupportedLayerError",
    "frozen_kernel",
    "is_quantized",
    "quantization_mode",
    "unsupported_reason",
]


def frozen_kernel(layer):
    """The `FloatKernel` or `QuantizedKernel` of a built projection layer.

    Args:
        layer: a built `Dense` or `EinsumDense` layer, float or quantized
            with Keras' `"int8"`/`"int4"` modes.

    Returns:
        The kernel object adapters are built on.

    Raises:
        UnsupportedLayerError: for another layer type, an unbuilt layer, a
            quantization mode adapters do not support, or an einsum that is
            not a plain projection.
    """
    if not isinstance(layer, SUPPORTED_LAYERS):
        raise UnsupportedLayerError(
            f"Layer '{layer.path or layer.name}' is of type {type(layer).__name__}; "
            "adapters attach to Dense and EinsumDense layers."
        )
    if not layer.built:
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' is not built; build the model (call it on "
            "data or call build()) before enabling adapters."
        )
    reason = unsupported_reason(layer)
    if reason is not None:
        raise UnsupportedLayerError(reason)
    return QuantizedKernel(layer) if is_quantized(layer) else FloatKernel(layer)
