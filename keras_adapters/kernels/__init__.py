"""The frozen base kernel an adapter sees.

`frozen_kernel(layer)` returns a `FloatKernel` for a float `Dense` or
`EinsumDense` layer, a `QuantizedKernel` for an int8/int4 one, an
`EmbeddingKernel` for an `Embedding` (and KerasHub's `ReversibleEmbedding`;
a `QuantizedEmbeddingKernel` for an int8/int4 one)
and a `ConvKernel` for a `Conv1D`/`Conv2D`/`Conv3D`. All give adapter methods
the same calls (2-D view, frozen projection, dense kernel for merges), so a
method never needs to know how the base is stored or what kind of layer it
adapts.
"""

import keras

from keras_adapters.kernels.conv import CONV_LAYERS
from keras_adapters.kernels.conv import ConvKernel
from keras_adapters.kernels.conv import unsupported_conv_reason
from keras_adapters.kernels.embedding import EmbeddingKernel
from keras_adapters.kernels.embedding import QuantizedEmbeddingKernel
from keras_adapters.kernels.embedding import unsupported_embedding_reason
from keras_adapters.kernels.experts import ExpertProjection
from keras_adapters.kernels.experts import ExpertsKernel
from keras_adapters.kernels.float import FloatKernel
from keras_adapters.kernels.quantized import QuantizedKernel
from keras_adapters.kernels.quantized import is_quantized
from keras_adapters.kernels.quantized import quantization_mode
from keras_adapters.kernels.quantized import unsupported_reason
from keras_adapters.kernels.view import KernelView
from keras_adapters.kernels.view import UnsupportedLayerError

# The projections (and the only layers Keras quantizes to int8/int4 for us).
PROJECTION_LAYERS = (keras.layers.Dense, keras.layers.EinsumDense)
# Every layer an adapter can attach to.
SUPPORTED_LAYERS = (
    PROJECTION_LAYERS + (keras.layers.Embedding,) + CONV_LAYERS + (ExpertProjection,)
)
# The layer kinds (`KernelView.kind`), for `Adapter.layer_kinds`.
LAYER_KINDS = ("dense", "einsum_dense", "embedding", "conv", "experts")
# Kinds whose kernels are stacks (`KernelView.stack_shape`): a method adapts
# them only if its `layer_kinds` names them (`layer_kinds=None` means every
# other kind), since its variables get the stack axes in front.
STACKED_KINDS = ("experts",)

__all__ = [
    "ConvKernel",
    "EmbeddingKernel",
    "ExpertProjection",
    "ExpertsKernel",
    "FloatKernel",
    "LAYER_KINDS",
    "PROJECTION_LAYERS",
    "STACKED_KINDS",
    "KernelView",
    "QuantizedEmbeddingKernel",
    "QuantizedKernel",
    "SUPPORTED_LAYERS",
    "UnsupportedLayerError",
    "frozen_kernel",
    "adapts_kind",
    "is_quantized",
    "quantization_mode",
    "unsupported_reason",
]


def frozen_kernel(layer):
    """The kernel object of a built layer adapters can attach to.

    Args:
        layer: a built `Dense` or `EinsumDense` layer, float or quantized
            with Keras' `"int8"`/`"int4"` modes; an `Embedding` (or
            subclass, such as KerasHub's `ReversibleEmbedding`), float or
            int8/int4 (tied weights if reversible); a
            `Conv1D`, `Conv2D` or `Conv3D` layer with `groups=1`; an
            `ExpertProjection` (a stacked weight of a KerasHub experts
            layer).

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
            "adapters attach to Dense, EinsumDense, Embedding and "
            "Conv1D/Conv2D/Conv3D layers, and the stacked weights of KerasHub "
            "experts layers."
        )
    if not layer.built:
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' is not built; build the model (call it on "
            "data or call build()) before enabling adapters."
        )
    if isinstance(layer, ExpertProjection):
        return ExpertsKernel(layer)
    if isinstance(layer, keras.layers.Embedding):
        reason = unsupported_embedding_reason(layer)
        kernel_class = (
            QuantizedEmbeddingKernel if is_quantized(layer) else EmbeddingKernel
        )
    elif isinstance(layer, CONV_LAYERS):
        reason = unsupported_conv_reason(layer)
        kernel_class = ConvKernel
    else:
        reason = unsupported_reason(layer)
        kernel_class = QuantizedKernel if is_quantized(layer) else FloatKernel
    if reason is not None:
        raise UnsupportedLayerError(reason)
    return kernel_class(layer)


def adapts_kind(layer_kinds, kind) -> bool:
    """Whether a method with these `Adapter.layer_kinds` adapts `kind`.

    `None` means every kind but the stacked ones (`STACKED_KINDS`), which a
    method must name.
    """
    if layer_kinds is None:
        return kind not in STACKED_KINDS
    return kind in layer_kinds
