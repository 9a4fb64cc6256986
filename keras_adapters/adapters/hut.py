"""HUT: Hadamard updated transformation."""

from keras import ops

from keras_adapters.adapters.base import Adapter
from keras_adapters.adapters.base import check_initializer
from keras_adapters.adapters.base import check_number
from keras_adapters.adapters.base import factor_initializer
from keras_adapters.adapters.base import register_adapter


@register_adapter
class HUT(Adapter):
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
    `KernelView`). The modulation `1 + s A B` and its product with `W` are
    computed in float32; the projection runs in the layer's compute dtype.
    The adapted kernel is materialized at every call (the update is
    elementwise in `W`, so there is no cheaper activation path); merging
    writes the same kernel, exactly.

    Args:
        rank: positive int, the rank `r` of the modulation.
        alpha: positive number; the scale numerator. Defaults to `rank`
            (scale 1).
        a_initializer: `"kaiming"` (PEFT's LoRA default), `"gaussian"`
            (normal, std `1 / rank`), `"he_uniform"`, or any Keras
            initializer (name, config dict or object).
        b_initializer: Keras initializer for `B`; `"zeros"` (default) keeps
            the identity at init.

    Example:

    >>> import keras_adapters as ka
    >>> ka.HUT(rank=8, alpha=16)
    HUT(rank=8, alpha=16, a_initializer='kaiming', b_initializer='zeros')

    Reference:
        Zhang, Zhou and Chen, "A More Computation Efficient Fine-Tuning
        Method With Hadamard Updated Transformation", arXiv:2409.13501, 2024.
    """

    method = "hut"
    variable_axes = {"hut_a": ("in", None), "hut_b": (None, "out")}

    def __init__(
        self,
        rank: int,
        alpha: float | None = None,
        a_initializer="kaiming",
        b_initializer="zeros",
    ):
        check_number("rank", rank, 1, "a positive int", integer=True)
        if alpha is not None:
            check_number("alpha", alpha, 0, "a positive number", low_inclusive=False)
        self.rank = rank
        self.alpha = alpha
        self.a_initializer = check_initializer("a_initializer", a_initializer)
        self.b_initializer = check_initializer("b_initializer", b_initializer)

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def get_config(self):
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "a_initializer": self.a_initializer,
            "b_initializer": self.b_initializer,
        }

    def validate(self, layer, view):
        if self.rank > min(view.d_in, view.d_out):
            raise ValueError(
                f"HUT rank {self.rank} is larger than min(d_in, d_out) = "
                f"min({view.d_in}, {view.d_out}) of layer '{layer.path}'; use a "
                f"rank <= {min(view.d_in, view.d_out)}."
            )

    def num_parameters(self, view):
        return self.rank * (view.d_in + view.d_out)

    def build(self, layer, view):
        a_init = factor_initializer(self.a_initializer, self.rank)
        b_init = factor_initializer(self.b_initializer, self.rank)
        self.add_variable(layer, "hut_a", (view.d_in, self.rank), a_init)
        self.add_variable(layer, "hut_b", (self.rank, view.d_out), b_init)
        return ("hut_a", "hut_b")

    def modulation_matrix(self, layer):
        """`1 + s A B`, the `(d_in, d_out)` multiplier of `W`, in float32."""
        return ops.add(ops.matmul(layer.hut_a, layer.hut_b) * self.scale, 1.0)

    def adapted_matrix(self, layer, matrix):
        return ops.multiply(matrix, self.modulation_matrix(layer))

    def adapted_kernel(self, layer, view, kernel):
        # The modulation goes to the kernel's layout (one transpose of a
        # d_in x d_out matrix at most) rather than the kernel to the 2-D view
        # and back.
        modulation = view.from_matrix(self.modulation_matrix(layer))
        return ops.multiply(ops.cast(kernel, "float32"), modulation)
