"""The frozen float kernel of a `Dense`/`EinsumDense` layer."""

import keras
from keras import ops

from keras_adapters import _keras_internals as internals
from keras_adapters.kernels.view import KernelView


class FloatKernel(KernelView):
    """The frozen kernel of a float `Dense` or `EinsumDense` layer.

    This is what an adapter method sees of the layer it adapts: the 2-D view
    (`d_in`, `d_out`, `to_matrix`, `contract_inputs`, ...), the projection of
    the inputs with the frozen kernel, and the kernel itself as a float
    tensor for merges. Adapter methods never touch the layer; the quantized
    variant (`QuantizedKernel`) answers the same calls for int8/int4 layers.

    Args:
        layer: a built `Dense` or `EinsumDense` layer.

    Attributes:
        path: the layer's path, for messages.
        compute_dtype: the layer's compute dtype.
    """

    quantized = False
    # Whether the layer also projects with its kernel transposed (a tied
    # `ReversibleEmbedding`; see `EmbeddingKernel`).
    transposable = False

    def __init__(self, layer):
        equation = (
            layer.equation if isinstance(layer, keras.layers.EinsumDense) else None
        )
        super().__init__(self._logical_shape(layer), equation)
        self.layer = layer
        self.path = layer.path or layer.name

    @staticmethod
    def _logical_shape(layer):
        return tuple(internals.kernel_variable(layer).shape)

    @property
    def compute_dtype(self):
        return self.layer.compute_dtype

    def prepare_inputs(self, inputs):
        """The inputs the frozen kernel is applied to (`x` for a float layer)."""
        return inputs

    def project(self, inputs):
        """`x W` with the frozen kernel, in the layer's layout (no bias)."""
        return self.apply(inputs, internals.kernel_variable(self.layer))

    def project_with(self, inputs, kernel):
        """`x W'` for an adapted kernel `W'` (layer layout), in compute dtype."""
        return self.apply(inputs, ops.cast(kernel, self.compute_dtype))

    def call_mode(self, **kwargs):
        """How a call with these keyword arguments uses the kernel:
        `"forward"` (see `EmbeddingKernel.call_mode` for the others)."""
        return "forward"

    def finish(self, outputs, inputs=None):
        """The layer's own last steps on `outputs`: bias, then activation."""
        if self.layer.bias is not None:
            outputs = ops.add(outputs, self.layer.bias)
        if self.layer.activation is not None:
            outputs = self.layer.activation(outputs)
        return outputs

    def dense(self):
        """The frozen kernel as a float tensor in the layer's layout."""
        return internals.kernel_variable(self.layer)

    def storage_variables(self):
        """The variables that hold the frozen kernel (never trainable)."""
        return [internals.kernel_variable(self.layer)]

    def assign(self, kernel):
        """Writes a merged float kernel (layer layout) into the layer."""
        variable = internals.kernel_variable(self.layer)
        variable.assign(ops.cast(kernel, variable.dtype))
