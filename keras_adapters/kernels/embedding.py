"""The frozen table of an `Embedding` (or KerasHub `ReversibleEmbedding`).

An embedding's table `W` `(vocab, dim)` is a projection of one-hot token
vectors: the lookup `W[ids]` is `onehot(ids) W`. So the table's 2-D view is
the table itself (`d_in = vocab`, `d_out = dim`), every method that adapts a
`(d_in, d_out)` matrix applies to it unchanged, and LoRA's `x A` becomes a
gather of rows of `A`: `W'[ids] = W[ids] + s A[ids] B`, without a one-hot
vector and without building `W'`.

A `ReversibleEmbedding` with tied weights also projects hidden states back
onto the vocabulary with the same table (`reverse=True`, the output layer of
KerasHub's causal LMs): `x W'^T`. Its adapters apply there too, through
`Adapter.call_transposed` (LoRA: `x W^T + s (x B^T) A^T`).
"""

import keras
from keras import ops

from keras_adapters import _keras_internals as internals
from keras_adapters.kernels.float import FloatKernel
from keras_adapters.kernels.view import UnsupportedLayerError

# Indices pass through float32 in methods that cast their inputs; float32
# holds every integer below 2^24 exactly.
MAX_VOCABULARY = 2**24


# The Keras quantization modes of an embedding table adapters attach to.
QUANTIZED_EMBEDDING_MODES = ("int8", "int4")


def unsupported_embedding_reason(layer):
    """Why no adapter can attach to this built embedding `layer`, or None."""
    mode = getattr(layer, "quantization_mode", None)
    if mode is not None and mode not in QUANTIZED_EMBEDDING_MODES:
        return (
            f"Layer '{layer.path}' is an embedding quantized with mode "
            f"{mode!r}; adapters attach to float embeddings and to embeddings "
            f"quantized with {' or '.join(map(repr, QUANTIZED_EMBEDDING_MODES))}."
        )
    if (
        mode is not None
        and isinstance(layer, keras.layers.ReversibleEmbedding)
        and not layer.tie_weights
    ):
        return (
            f"Layer '{layer.path}' is a ReversibleEmbedding with untied weights "
            f"quantized with mode {mode!r}; adapters attach to quantized "
            "ReversibleEmbeddings with tied weights (or adapt it before "
            "quantizing, or dequantize it first)."
        )
    if int(layer.input_dim) > MAX_VOCABULARY:
        return (
            f"Layer '{layer.path}' has {layer.input_dim} rows; adapters support "
            f"embeddings of up to {MAX_VOCABULARY} rows."
        )
    return None


class EmbeddingKernel(FloatKernel):
    """The frozen table of a float `Embedding` layer.

    Answers the calls of `FloatKernel` with the table as the `(vocab, dim)`
    2-D view and token ids as inputs: `contract_inputs(ids, A)` gathers rows
    of `A`, `project(ids)` rows of the table. On a `ReversibleEmbedding`
    with tied weights, `project_transposed(x)` is the reverse projection
    `x W^T`.

    Args:
        layer: a built float `keras.layers.Embedding` (or subclass).
    """

    index_inputs = True

    def __init__(self, layer):
        super().__init__(layer)
        self.equation = None

    @property
    def kind(self):
        return "embedding"

    @property
    def transposable(self) -> bool:
        """Whether the layer also projects with the table transposed."""
        return bool(
            isinstance(self.layer, keras.layers.ReversibleEmbedding)
            and self.layer.tie_weights
        )

    @staticmethod
    def _ids(inputs):
        if inputs.dtype not in ("int32", "int64"):
            inputs = ops.cast(inputs, "int32")
        return inputs

    def apply(self, inputs, kernel):
        """The rows of `kernel` that the ids `inputs` select."""
        return ops.take(kernel, self._ids(inputs), axis=0)

    def project(self, inputs):
        """`W[ids]` in the layer's compute dtype, as `Embedding.call`."""
        return self.project_with(inputs, self.dense())

    def project_with(self, inputs, kernel):
        return ops.cast(self.apply(inputs, kernel), self.compute_dtype)

    def contract_inputs(self, inputs, factor):
        """`onehot(ids) A`: the rows of the `(vocab, r)` factor `A`."""
        return self.apply(inputs, factor)

    def map_inputs(self, inputs, fn):
        raise UnsupportedLayerError(
            f"Layer '{self.path}' is an embedding: its inputs are token ids, "
            "which an adapter cannot transform."
        )

    def contract_inputs_per_example(self, inputs, factors):
        raise UnsupportedLayerError(
            f"Layer '{self.path}' is an embedding; per-example adapters "
            "support Dense and EinsumDense layers."
        )

    expand_outputs_per_example = contract_inputs_per_example

    def finish(self, outputs, inputs=None):
        """The mask a `ReversibleEmbedding` sets itself (`mask_zero`)."""
        if (
            inputs is not None
            and self.layer.mask_zero
            and isinstance(self.layer, keras.layers.ReversibleEmbedding)
        ):
            internals.set_keras_mask(outputs, ops.not_equal(inputs, 0))
        return outputs

    # The tied output projection (`ReversibleEmbedding(reverse=True)`).

    def call_mode(self, reverse=False):
        """`"forward"`, `"transposed"` (tied reverse projection) or `"base"`
        (the reverse projection of untied weights: not this table)."""
        if not reverse:
            return "forward"
        return "transposed" if self.layer.tie_weights else "base"

    def project_transposed_with(self, inputs, kernel):
        """`x W^T` for a table `W` (layer layout), as `ReversibleEmbedding`
        computes its reverse projection (in `reverse_dtype` if set)."""
        kernel = ops.transpose(kernel)
        reverse_dtype = self.layer.reverse_dtype
        if reverse_dtype is not None:
            inputs = ops.cast(inputs, reverse_dtype)
            kernel = ops.cast(kernel, reverse_dtype)
        return ops.matmul(inputs, kernel)

    def prepare_transposed_inputs(self, inputs):
        """The hidden states the reverse projection multiplies (`x`)."""
        return inputs

    def project_transposed(self, inputs):
        """`x W^T` with the frozen table."""
        return self.project_transposed_with(inputs, self.dense())

    def finish_transposed(self, logits):
        """The layer's logit soft cap, if any."""
        cap = self.layer.logit_soft_cap
        if cap is None:
            return logits
        return ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)


class QuantizedEmbeddingKernel(EmbeddingKernel):
    """The frozen int8/int4 table of a quantized `Embedding` (or tied
    `ReversibleEmbedding`).

    Keras stores the table as integers (int4 packed two per byte along the
    embedding axis) with one float scale per row (`embeddings_scale`; int4
    with a `block_size`: a scale and zero point per row and group, and the
    group of each column in `g_idx`). The lookup `project(ids)` is Keras'
    own: it gathers the integer rows and their scales and rescales them,
    never dequantizing the whole table. `dense()` is the dequantized float32
    table, for merges and for methods that need the whole adapted table.

    The reverse projection of a tied `ReversibleEmbedding` quantizes its
    inputs as Keras does (`prepare_transposed_inputs`, with a straight-
    through gradient) and multiplies them with the table dequantized inside
    a custom gradient (recomputed in the backward pass; the integer table
    and its scales get no gradient).

    Args:
        layer: a built `keras.layers.Embedding` (or subclass) quantized by
            Keras with mode `"int8"` or `"int4"`.
    """

    quantized = True

    def __init__(self, layer):
        super().__init__(layer)
        self.mode = layer.quantization_mode
        self.grouped = self.mode == "int4" and hasattr(layer, "embeddings_zero")

    @staticmethod
    def _logical_shape(layer):
        return (int(layer.input_dim), int(layer.output_dim))

    @property
    def activations_quantized(self) -> bool:
        return getattr(self.layer, "inputs_quantizer", None) is not None

    def storage_variables(self):
        names = ["embeddings_scale"] + (
            ["embeddings_zero", "g_idx"] if self.grouped else []
        )
        table = internals.kernel_variable(self.layer)
        return [table] + [getattr(self.layer, n) for n in names]

    def _storage(self):
        return [ops.convert_to_tensor(v) for v in self.storage_variables()]

    def _dequantize_rows(self, values, scale, zero=None, g_idx=None, dtype="float32"):
        """Float rows from integer rows `values` and their row scales (and,
        grouped, zero points), as Keras' `_int8_call`/`_int4_call`."""
        if self.mode == "int4":
            values = keras.quantizers.unpack_int4(values, self.d_out, axis=-1)
        values = ops.cast(values, dtype)
        scale = ops.cast(scale, dtype)
        if not self.grouped:
            return ops.divide(values, ops.expand_dims(scale, -1))
        groups = ops.cast(g_idx, "int32")
        scale = ops.take(scale, groups, axis=-1)
        zero = ops.take(ops.cast(zero, dtype), groups, axis=-1)
        return ops.multiply(ops.subtract(values, zero), scale)

    def dense(self):
        """The table dequantized (float32, `(vocab, dim)`)."""
        return self._dequantize_rows(*self._storage())

    def project(self, inputs):
        """`W[ids]`: the integer rows (and their scales) gathered, then
        rescaled, in the layer's compute dtype."""
        ids = self._ids(inputs)
        storage = self._storage()
        # The integer rows, their scales (and zero points); `g_idx` is per
        # column.
        gathered = 3 if self.grouped else 2
        rows = [ops.take(v, ids, axis=0) for v in storage[:gathered]]
        rows += storage[gathered:]
        return self._dequantize_rows(*rows, dtype=self.compute_dtype)

    def prepare_transposed_inputs(self, inputs):
        """`q(x)`: the hidden states quantized and dequantized as the layer's
        reverse projection does (unchanged without an inputs quantizer); the
        gradient passes straight through."""
        quantizer = getattr(self.layer, "inputs_quantizer", None)
        if quantizer is None:
            return inputs
        values, scale = quantizer(inputs, axis=-1)
        dequantized = ops.cast(
            ops.divide(ops.cast(values, inputs.dtype), scale), inputs.dtype
        )
        return ops.add(
            ops.stop_gradient(dequantized),
            ops.subtract(inputs, ops.stop_gradient(inputs)),
        )

    def project_transposed(self, inputs):
        """`x W^T` with the table dequantized on the fly, recomputed in the
        backward pass."""
        dtype = self.layer.reverse_dtype or self.compute_dtype

        @ops.custom_gradient
        def project(x, *storage):
            table = self._dequantize_rows(*storage, dtype=dtype)
            outputs = ops.matmul(x, ops.transpose(table))

            def grad(*args, upstream=None):
                if upstream is None:
                    (upstream,) = args
                table = self._dequantize_rows(*storage, dtype=dtype)
                x_grad = ops.matmul(ops.cast(upstream, dtype), table)
                return (x_grad,) + (None,) * len(storage)

            return outputs, grad

        return project(ops.cast(inputs, dtype), *self._storage())

    def assign(self, kernel):
        raise ValueError(
            f"Layer '{self.path}' is a quantized embedding ({self.mode}); "
            "merging into it needs `merge_adapters(..., quantized='float' | "
            "'requantize')`."
        )
