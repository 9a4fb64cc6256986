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


def unsupported_embedding_reason(layer):
    """Why no adapter can attach to this built embedding `layer`, or None."""
    if getattr(layer, "quantization_mode", None) is not None:
        return (
            f"Layer '{layer.path}' is an embedding quantized with mode "
            f"{layer.quantization_mode!r}; adapters attach to float embeddings "
            "(enable adapters before quantizing, or merge them first)."
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

    def project_transposed(self, inputs):
        """`x W^T` with the frozen table."""
        return self.project_transposed_with(inputs, self.dense())

    def finish_transposed(self, logits):
        """The layer's logit soft cap, if any."""
        cap = self.layer.logit_soft_cap
        if cap is None:
            return logits
        return ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
