"""The frozen kernel of a `Conv1D`, `Conv2D` or `Conv3D` layer.

A convolution's kernel `(*kernel_size, channels, filters)` maps each input
patch (`prod(kernel_size) * channels` values) to `filters` outputs. Its 2-D
view is that patch matrix, `(prod(kernel_size) * channels, filters)`: the
matrix Hugging Face PEFT factorizes for `Conv1d/2d/3d` (its `get_delta_weight`
is `B @ A` with `A` flattened over the input channels and the kernel window).
Low-rank factors on the view are a convolution and a 1 x 1 convolution:
`A` `(d_in, r)` reshaped to `(*kernel_size, channels, r)` is a convolution to
`r` channels with the layer's strides, padding and dilation, and `B`
`(r, filters)` maps those `r` channels to the outputs at every position. So
LoRA trains as `conv(x, W) + s conv(x, A) B`, exactly PEFT's conv LoRA, and
merges as `W + s A B` on the view.
"""

import keras
from keras import ops

from keras_adapters.kernels.float import FloatKernel
from keras_adapters.kernels.view import UnsupportedLayerError

CONV_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


def unsupported_conv_reason(layer):
    """Why no adapter can attach to this built convolution, or None."""
    if int(layer.groups) != 1:
        return (
            f"Layer '{layer.path}' is a grouped convolution (groups="
            f"{layer.groups}); adapters attach to convolutions with groups=1."
        )
    return None


class ConvKernel(FloatKernel):
    """The frozen kernel of a float `Conv1D`/`Conv2D`/`Conv3D` layer.

    Answers the calls of `FloatKernel` with the kernel's patch matrix as the
    2-D view: `contract_inputs(x, A)` convolves `x` with `A` reshaped to a
    kernel with `r` filters (the layer's strides, padding, dilation and data
    format), `expand_outputs(h, B)` is a 1 x 1 convolution, `scale_outputs`
    scales the channel axis.

    Args:
        layer: a built `Conv1D`, `Conv2D` or `Conv3D` layer with `groups=1`.
    """

    @property
    def kind(self):
        return "conv"

    @property
    def _channels_last(self):
        return self.layer.data_format == "channels_last"

    def apply(self, inputs, kernel):
        """The layer's convolution of `inputs` with `kernel` (no bias)."""
        layer = self.layer
        padding = layer.padding
        if padding == "causal":  # Conv1D: pad on the left, then "valid".
            left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
            pads = [[0, 0], [left, 0], [0, 0]]
            if not self._channels_last:
                pads = [[0, 0], [0, 0], [left, 0]]
            inputs = ops.pad(inputs, pads)
            padding = "valid"
        return ops.conv(
            inputs,
            kernel,
            strides=list(layer.strides),
            padding=padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )

    def contract_inputs(self, inputs, factor):
        """Convolves `inputs` with a `(d_in, r)` factor as a kernel with `r`
        filters: `(batch, *positions, r)` (channels first: `(batch, r,
        *positions)`)."""
        kernel = ops.reshape(factor, self.in_shape + (factor.shape[-1],))
        return self.apply(inputs, kernel)

    def expand_outputs(self, hidden, factor):
        """A 1 x 1 convolution of the `r` channels of `hidden` with an
        `(r, d_out)` factor."""
        if self._channels_last:
            return ops.matmul(hidden, factor)
        moved = ops.moveaxis(hidden, 1, -1)
        return ops.moveaxis(ops.matmul(moved, factor), -1, 1)

    def _channel_shape(self, rank):
        if self._channels_last:
            return (self.d_out,)
        return (self.d_out,) + (1,) * (rank - 2)

    def scale_outputs(self, outputs, vector):
        """Multiplies the output channels by a `(d_out,)` vector."""
        return ops.multiply(
            outputs, ops.reshape(vector, self._channel_shape(len(outputs.shape)))
        )

    def map_inputs(self, inputs, fn):
        raise UnsupportedLayerError(
            f"Layer '{self.path}' is a convolution: its 2-D view's inputs are "
            "patches, not the layer's inputs, so they cannot be transformed "
            "before the convolution."
        )

    def contract_inputs_per_example(self, inputs, factors):
        raise UnsupportedLayerError(
            f"Layer '{self.path}' is a convolution; per-example adapters "
            "support Dense and EinsumDense layers."
        )

    expand_outputs_per_example = contract_inputs_per_example

    def finish(self, outputs, inputs=None):
        """The layer's bias (on the channel axis), then its activation."""
        layer = self.layer
        if layer.bias is not None:
            rank = len(outputs.shape)
            outputs = ops.add(
                outputs, ops.reshape(layer.bias, self._channel_shape(rank))
            )
        if layer.activation is not None:
            outputs = layer.activation(outputs)
        return outputs
