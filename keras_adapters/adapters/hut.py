"""HUT: Hadamard updated transformation."""

from keras import ops

from keras_adapters.adapters.base import LowRankAdapter
from keras_adapters.adapters.base import register_adapter


@register_adapter
class HUT(LowRankAdapter):
    """Hadamard updated transformation: W' = W (.) (1 + s A B).

    HUT follows the "updated transformation" idea of Zhang et al.: the
    adapted weight is a transformation `U(W)` of the pre-trained weight
    rather than `W` plus an independent increment (as in LoRA), which keeps
    the adapted weight correlated with the pre-trained one. The paper's `U`
    is an elementwise (Hadamard) product of `W` with a matrix built from two
    low-rank factors. This library's parameterization is

        W' = W (.) (1 + s A B),    s = alpha / rank,

    with `A` `(d_in, rank)` random and `B` `(rank, d_out)` zero, so the
    adapted layer starts out equal to the base layer and the update is a
    low-rank multiplicative modulation of `W` (equivalently `W (.) A' B'`
    with rank `r + 1` factors whose first component is fixed to ones). The
    exact parameterization of the paper could not be checked; this one is
    the project's reading of it.

    For an `EinsumDense` kernel with more than two axes, `A B` has the shape
    of the kernel viewed as a 2-D `(input axes, output axes)` matrix (see
    `keras_adapters.kernels.KernelView`). The modulation `1 + s A B` and its
    product with `W` are computed in float32; the projection runs in the
    layer's compute dtype. The adapted kernel is materialized at every call
    (the update is elementwise in `W`, so there is no cheaper activation
    path); merging writes the same kernel, exactly.

    Args:
        rank: positive int, the rank `r` of the modulation.
        alpha: positive number; the scale numerator. Defaults to `rank`
            (scale 1).
        a_initializer: `"kaiming"` (PEFT's LoRA default), `"gaussian"`
            (normal, std `1 / rank`), `"he_uniform"`, or any Keras
            initializer (name, config dict or object).
        b_initializer: Keras initializer for `B`; `"zeros"` (default) keeps
            the identity at init.
        rank_pattern: `{regex: rank}` for layers that take another rank; a
            key matches a layer whose path (relative to the adapted model)
            it `re.fullmatch`es, or a `/`-separated tail of that path (as
            PEFT's `rank_pattern`); the first matching key wins.
        alpha_pattern: `{regex: alpha}`, the same for `alpha`.

    Example:

    >>> import keras_adapters as ka
    >>> ka.HUT(rank=8, alpha=16)
    HUT(rank=8, alpha=16, a_initializer='kaiming', b_initializer='zeros')

    Reference:
        Zhang, Zhou and Chen, "A More Computation Efficient Fine-Tuning
        Method With Hadamard Updated Transformation", arXiv:2409.13501, 2024.
    """

    method = "hut"
    factor_names = ("hut_a", "hut_b")
    variable_axes = {"hut_a": ("in", None), "hut_b": (None, "out")}

    def __init__(
        self,
        rank: int,
        alpha: float | None = None,
        a_initializer="kaiming",
        b_initializer="zeros",
        rank_pattern: dict | None = None,
        alpha_pattern: dict | None = None,
    ):
        super().__init__(
            rank,
            alpha,
            a_initializer,
            b_initializer,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
        )

    @classmethod
    def example(cls):
        return cls(rank=2, alpha=4)

    def modulation_matrix(self, weights):
        """`1 + s A B`, the `(d_in, d_out)` multiplier of `W`, in float32."""
        return ops.add(ops.matmul(weights["hut_a"], weights["hut_b"]) * self.scale, 1.0)

    def adapted_matrix(self, weights, matrix):
        return ops.multiply(matrix, self.modulation_matrix(weights))

    def adapted_kernel(self, weights, kernel, base):
        # The modulation goes to the kernel's layout (one transpose of a
        # d_in x d_out matrix at most) rather than the kernel to the 2-D view
        # and back.
        modulation = kernel.from_matrix(self.modulation_matrix(weights))
        return ops.multiply(ops.cast(base, "float32"), modulation)

    def reference_matrix(self, values, matrix):
        return matrix * (1.0 + self.scale * values["hut_a"] @ values["hut_b"])
