"""The frozen int8/int4 kernel of a quantized `Dense`/`EinsumDense` layer.

Keras quantizes a built model in place with `model.quantize("int8")` or
`model.quantize("int4")`: each kernel becomes a frozen integer variable
(int4 values packed two per byte) plus a float `kernel_scale` (and, for int4
with a `block_size`, a zero point and group indices). `QuantizedKernel`
lets every adapter method train on top of such a kernel without knowing it
is quantized:

- `prepare_inputs(x)` is `q(x)`, the layer's own activation
  quantize-dequantize (Keras' int8 default quantizes the inputs of every
  matmul per token, "W8A8"; int4 and int8 configured with
  `activation_quantizer=None` are weight-only, and `q(x) = x`), with a
  straight-through gradient;
- `project(x)` contracts with the kernel dequantized on the fly, inside a
  custom gradient that dequantizes again for the input gradient (no float
  copy of the kernel is kept between the forward and the backward pass, as
  QLoRA does) and gives the frozen integer kernel no gradient;
- `dense()` is the dequantized float32 kernel, for merges and for methods
  that materialize the adapted kernel.
"""

import keras
from keras import ops

from keras_adapters import _keras_internals as internals
from keras_adapters.kernels.float import FloatKernel

SUPPORTED_MODES = ("int8", "int4")

_UNSUPPORTED = {
    "float8": (
        "float8 layers keep a float kernel and update their scales through "
        "overwritten gradients while training, which adapters would disturb"
    ),
    "gptq": "GPTQ kernels are calibrated per layer and not supported yet",
    "awq": "AWQ kernels are calibrated per layer and not supported yet",
}


def quantization_mode(layer):
    """The layer's Keras quantization mode (`"int8"`, ...), or None."""
    return getattr(layer, "quantization_mode", None)


def is_quantized(layer) -> bool:
    """Whether `layer` holds an int8 or int4 kernel adapters can use."""
    return quantization_mode(layer) in SUPPORTED_MODES


def unsupported_reason(layer):
    """Why no adapter can attach to this quantized `layer`, or None."""
    mode = quantization_mode(layer)
    if mode is None or mode in SUPPORTED_MODES:
        return None
    why = _UNSUPPORTED.get(mode, "this mode is not supported")
    return (
        f"Layer '{layer.path}' is quantized with mode {mode!r}: {why}. "
        f"Adapters attach to float layers and to layers quantized with "
        f"{' or '.join(repr(m) for m in SUPPORTED_MODES)} "
        "(model.quantize('int8') or model.quantize('int4'))."
    )


def _int4_grouped(layer):
    return hasattr(layer, "kernel_zero")


def logical_kernel_shape(layer) -> tuple:
    """The float kernel's shape, also for packed int4 kernels (an
    embedding's: its table's `(vocab, dim)`)."""
    mode = quantization_mode(layer)
    if isinstance(layer, keras.layers.Embedding):
        return (int(layer.input_dim), int(layer.output_dim))
    if mode == "int4":
        if isinstance(layer, keras.layers.EinsumDense):
            return tuple(int(d) for d in layer.original_kernel_shape)
        return (int(internals.kernel_variable(layer).shape[0]), int(layer.units))
    if mode in ("gptq", "awq") and hasattr(layer, "original_kernel_shape"):
        return tuple(int(d) for d in layer.original_kernel_shape)
    return tuple(int(d) for d in internals.kernel_variable(layer).shape)


def activation_quantizer(layer):
    """The quantizer Keras applies to `layer`'s inputs, or None (weight-only).

    Keras quantizes the inputs of int8 layers (by default) and of per-channel
    int4 layers configured with an activation quantizer; its sub-channel
    int4 path never does.
    """
    if not is_quantized(layer):
        return None
    if quantization_mode(layer) == "int4" and _int4_grouped(layer):
        return None
    return getattr(layer, "inputs_quantizer", None)


class QuantizedKernel(FloatKernel):
    """The frozen kernel of an int8/int4 `Dense` or `EinsumDense` layer.

    Answers the calls of `FloatKernel` (see the module docstring).

    Args:
        layer: a built layer quantized by Keras with mode `"int8"` or
            `"int4"`.
    """

    quantized = True

    def __init__(self, layer):
        super().__init__(layer)
        self.mode = quantization_mode(layer)
        self.grouped = self.mode == "int4" and _int4_grouped(layer)
        self.scale_shape = None
        if self.mode == "int4":
            self.columns = int(layer.kernel_scale.shape[-1])
        elif self.equation is not None:
            self.scale_shape, self.scale_perm = self._einsum_scale_layout()

    _logical_shape = staticmethod(logical_kernel_shape)

    @property
    def activations_quantized(self) -> bool:
        return activation_quantizer(self.layer) is not None

    def storage_variables(self):
        names = ["kernel_scale"] + (["kernel_zero", "g_idx"] if self.grouped else [])
        kernel = internals.kernel_variable(self.layer)
        return [kernel] + [getattr(self.layer, n) for n in names]

    def _einsum_scale_layout(self):
        """How an int8 `EinsumDense` scale maps onto its kernel.

        Keras stores one scale per output unit, laid out like the outputs
        (the kernel's output axes in the order the output names them, with
        ones for the other output axes). Returns `((output-ordered sizes,
        broadcast shape), permutation or None)`.
        """
        kernel, outputs = self._kernel_term, self._output_term
        sizes = dict(zip(kernel, self.kernel_shape, strict=True))
        out_in_output_order = [c for c in outputs if c in kernel]
        out_in_kernel_order = [c for c in kernel if c in outputs]
        perm = [out_in_output_order.index(c) for c in out_in_kernel_order]
        broadcast = tuple(sizes[c] if c in outputs else 1 for c in kernel)
        return (
            (tuple(sizes[c] for c in out_in_output_order), broadcast),
            None if perm == sorted(perm) else perm,
        )

    def _dequantize(self, kernel, scale, zero=None, g_idx=None, dtype="float32"):
        """The float kernel from its stored tensors, in the layer's layout."""
        if self.mode == "int8":
            values = ops.cast(kernel, dtype)
            scale = ops.cast(scale, dtype)
            if self.scale_shape is not None:
                scale = ops.reshape(scale, self.scale_shape[0])
                if self.scale_perm is not None:
                    scale = ops.transpose(scale, self.scale_perm)
                scale = ops.reshape(scale, self.scale_shape[1])
            return ops.divide(values, scale)
        values = keras.quantizers.unpack_int4(kernel, self.columns, axis=-1)
        values = ops.cast(values, dtype)
        if self.grouped:
            groups = ops.cast(g_idx, "int32")
            scale = ops.take(ops.cast(scale, dtype), groups, axis=0)
            zero = ops.take(ops.cast(zero, dtype), groups, axis=0)
            matrix = ops.multiply(ops.subtract(values, zero), scale)
        else:
            matrix = ops.divide(values, ops.cast(scale, dtype))
        return ops.reshape(matrix, self.kernel_shape)

    def _storage(self):
        return [ops.convert_to_tensor(v) for v in self.storage_variables()]

    def dense(self):
        """The kernel dequantized on the fly (float32, the layer's layout)."""
        return self._dequantize(*self._storage())

    def prepare_inputs(self, inputs):
        """`q(x)`: `inputs` quantized and dequantized as the layer would.

        Returns `inputs` unchanged for weight-only layers. The gradient
        passes straight through.
        """
        quantizer = activation_quantizer(self.layer)
        if quantizer is None:
            return inputs
        axis = tuple(self.layer.quantization_axis) if self.equation else -1
        values, scale = quantizer(inputs, axis=axis)
        dequantized = ops.divide(ops.cast(values, inputs.dtype), scale)
        dequantized = ops.cast(dequantized, inputs.dtype)
        # Forward: exactly `dequantized` (x - x == 0); backward: identity.
        return ops.add(
            ops.stop_gradient(dequantized),
            ops.subtract(inputs, ops.stop_gradient(inputs)),
        )

    def project(self, inputs):
        """`x W` with the dequantized kernel, recomputed in the backward pass."""
        dtype = self.compute_dtype

        @ops.custom_gradient
        def project(x, *storage):
            outputs = self.apply(x, self._dequantize(*storage, dtype=dtype))

            def grad(*args, upstream=None):
                if upstream is None:
                    (upstream,) = args
                kernel = self._dequantize(*storage, dtype=dtype)
                if self.equation is None:
                    x_grad = ops.matmul(upstream, ops.transpose(kernel))
                else:
                    x_grad = ops.einsum(self.transposed_equation(), upstream, kernel)
                return (x_grad,) + (None,) * len(storage)

            return outputs, grad

        return project(ops.cast(inputs, dtype), *self._storage())

    def assign(self, kernel):
        raise ValueError(
            f"Layer '{self.path}' is quantized ({self.mode}); merging into it "
            "needs `merge_adapters(..., quantized='float' | 'requantize')`."
        )
