"""qGOFT and GOFT: (quasi-)orthogonal fine-tuning with Givens rotations.

Both methods adapt a kernel `W` (its `(d_in, d_out)` 2-D view, see
`KernelView`) as `W' = R W`, where `R` is a `d x d` matrix (`d = d_in`) acting
on the layer's input side: for a row-vector input `x`, `x W' = (x R) W`.

`R` is a product of `K = ceil(log2 d)` stages `P_1, ..., P_K`. Stage `k`
(`k = 1..K`, stride `s = 2^(k-1)`) is the identity except for one 2x2 block on
each coordinate pair `(i, j) = (2 s m, 2 s m + s)` with `j < d`:

    P_k[i, i] = g00    P_k[i, j] = g01
    P_k[j, i] = g10    P_k[j, j] = g11

So stage 1 pairs `(0, 1), (2, 3), ...`, stage 2 pairs `(0, 2), (4, 6), ...`,
stage 3 pairs `(0, 4), (8, 12), ...`: a binary reduction tree with exactly
`d - 1` blocks for any `d` (the paper's Eq. 3, extended to widths that are
not powers of two). The blocks are stored stage by stage (stage 1's blocks
first, each stage's blocks by increasing `m`), as the authors' code stores
them.

Stage order (`stage_order`):

- `"authors"` (the default): `R = P_K ... P_2 P_1`, so with row vectors
  `x R = (((x P_K) P_(K-1)) ... ) P_1`: **stage K (the widest stride) is
  applied to `x` first**. This is the official code (ArthurLeoM/peft-givens,
  `tuners/givens/layer.py`: `rot_weight = P_r @ rot_weight` for `r = 1..K`,
  then `F.linear(x, rot_weight.T)`), and what its saved blocks mean.
- `"stage1_first"`: `R = P_1 P_2 ... P_K` (stage 1 applied first), the
  order of keras_adapters before adapter files recorded a `stage_order`;
  an adapter config without the key (a file written then) loads with it, so
  old files give the outputs they gave when they were saved.

The two orders give different matrices for the same blocks when `d >= 3`,
and neither family contains the other (for `d = 3`, `P_1 P_2` is always 0 at
`[2, 1]` and `P_2 P_1` at `[1, 2]`), so blocks cannot be converted exactly
from one order to the other. Transposition maps one onto the other:
`(P_1 ... P_K)^T = P_K^T ... P_1^T`, so the `"stage1_first"` matrix of
blocks `G_i` is the transpose of the `"authors"` matrix of blocks `G_i^T`.

`R` is never built. Stage by stage on the activations, only the coordinates
a stage touches change (`ceil(d / 2^(k-1))` of them at stage `k`), so applying
`R` costs `O(d)` per row. Merging computes `R W` with the same stage
functions on the rows of `W^T` (`(R W)^T = W^T R^T`: the stages in reverse
order, each block transposed), exactly and without a `d x d` matrix.
"""

import keras
import numpy as np
from keras import ops

from keras_adapters import _validation
from keras_adapters.adapters.base import Adapter
from keras_adapters.adapters.base import register_adapter


def givens_stages(d: int) -> list:
    """`[(active, pairs)]` for each stage of the Givens tree on `d` coordinates.

    `active` is the number of coordinates stage `k` can touch (the multiples
    of `2^(k-1)` below `d`) and `pairs = active // 2` its number of blocks.
    """
    stages = []
    active = d
    while active > 1:
        stages.append((active, active // 2))
        active = (active + 1) // 2
    return stages


def givens_pairs(d: int) -> list:
    """The coordinate pairs `(i, j)` of every block, stage by stage."""
    pairs = []
    for k, (_, count) in enumerate(givens_stages(d), start=1):
        stride = 2 ** (k - 1)
        pairs.append([(2 * stride * m, 2 * stride * m + stride) for m in range(count)])
    return pairs


def _mix(a, b, block, transpose):
    """`(a, b) -> (a, b) @ G` (or `@ G^T`), per block; `a`, `b` are `(n, pairs)`."""
    g00, g01, g10, g11 = block
    if transpose:
        g01, g10 = g10, g01
    return a * g00 + b * g10, a * g01 + b * g11


STAGE_ORDERS = ("authors", "stage1_first")


def apply_givens(
    x, blocks, d: int, transpose: bool = False, stage_order: str = "authors"
):
    """`x R` (or `x R^T` with `transpose=True`) for a `(n, d)` float tensor `x`.

    Args:
        x: `(n, d)` tensor.
        blocks: one `(g00, g01, g10, g11)` tuple of `(pairs,)` tensors per
            stage (see `givens_stages`).
        d: the width.
        transpose: apply `R^T` instead of `R` (the stages in reverse order,
            each block transposed).
        stage_order: `"authors"` (`R = P_K ... P_1`) or `"stage1_first"`
            (`R = P_1 ... P_K`); see the module docstring.

    The coordinates a stage pairs are the even and odd entries of its active
    coordinates, so each stage is a reshape to `(n, pairs, 2)`; the unpaired
    entries (the odd ones and, for an odd count, the last one) are set aside
    on the way down (stage 1 to K) and interleaved back on the way up (stage
    K to 1). A stage's blocks are applied on the way down when stage 1 comes
    first in the product being applied (`x P_1 ...`: `"stage1_first"`, or
    `"authors"` transposed), on the way up otherwise. Shapes are static; the
    loops over the stages unroll at trace time.
    """
    _validation.check_choice("stage_order", stage_order, STAGE_ORDERS)
    on_the_way_down = (stage_order == "stage1_first") != bool(transpose)
    stages = givens_stages(d)
    odd_entries = []
    active = x
    for (count, pairs), block in zip(stages, blocks, strict=True):
        head = active
        if count > 2 * pairs:
            head, rest = ops.split(active, [2 * pairs], axis=-1)
        a, b = ops.unstack(ops.reshape(head, (-1, pairs, 2)), 2, axis=-1)
        if on_the_way_down:
            a, b = _mix(a, b, block, transpose)
        odd_entries.append(b)
        active = a if count == 2 * pairs else ops.concatenate([a, rest], axis=-1)
    for (count, pairs), block, b in reversed(
        list(zip(stages, blocks, odd_entries, strict=True))
    ):
        a = active
        if count > 2 * pairs:
            a, rest = ops.split(active, [pairs], axis=-1)
        if not on_the_way_down:
            a, b = _mix(a, b, block, transpose)
        merged = ops.reshape(ops.stack([a, b], axis=-1), (-1, 2 * pairs))
        active = merged if count == 2 * pairs else ops.concatenate([merged, rest], -1)
    return active


@keras.saving.register_keras_serializable(package="keras_adapters")
class SoftOrthogonality(keras.regularizers.Regularizer):
    """qGOFT's soft-orthogonality penalty on 2x2 blocks.

    For blocks `G_i = [[a1, b1], [a2, b2]] = (alpha_i, beta_i)` (columns
    `alpha_i`, `beta_i`) stored as a `(..., 2, 2)` tensor, the penalty is
    `strength * sum_i <alpha_i, beta_i>^2`: it pushes the two columns of each
    block towards a right angle and leaves their norms free.

    Args:
        strength: positive number, the weight `lambda` of the penalty.

    Example:

    ```python
    penalty = ka.SoftOrthogonality(1e-2)
    penalty(keras.ops.ones((3, 2, 2)))  # 1e-2 * 3 * (1 + 1)^2 = 0.12
    ```
    """

    def __init__(self, strength: float = 1e-3):
        self.strength = float(
            _validation.check_number("strength", strength, low=0, low_inclusive=False)
        )

    def __call__(self, blocks):
        g00, g01, g10, g11 = ops.unstack(ops.reshape(blocks, (-1, 4)), 4, axis=-1)
        return self.strength * ops.sum(ops.square(g00 * g01 + g10 * g11))

    def get_config(self):
        return {"strength": self.strength}


def _identity_blocks(shape, dtype=None):
    return ops.broadcast_to(ops.eye(2, dtype=dtype or "float32"), shape)


class _GivensAdapter(Adapter):
    """The shared implementation of `GOFT` (`strict`) and `QGOFT`."""

    strict = True
    orthogonality = 0.0
    # A rotation of an embedding's rows (token ids) means nothing.
    layer_kinds = ("dense", "einsum_dense", "conv")

    def _check_scale(self, scale, stage_order):
        self.scale = _validation.check_bool("scale", scale)
        self.stage_order = _validation.check_choice(
            "stage_order", stage_order, STAGE_ORDERS
        )

    @classmethod
    def from_config(cls, config):
        # Configs written before `stage_order` existed (adapter files, .keras
        # files) meant stage 1 first: keep their meaning.
        if isinstance(config, dict) and "stage_order" not in config:
            config = {**config, "stage_order": "stage1_first"}
        return super().from_config(config)

    def validate(self, kernel):
        if kernel.d_in < 2:
            raise ValueError(
                f"{type(self).__name__} rotates the input dimension of a layer, "
                f"which needs d_in >= 2; layer '{kernel.path}' has d_in = "
                f"{kernel.d_in}."
            )

    def num_parameters(self, kernel):
        blocks = (1 if self.strict else 4) * (kernel.d_in - 1)
        return blocks + (kernel.d_in if self.scale else 0)

    def build(self, kernel, factory):
        d = kernel.d_in
        if self.strict:
            factory(self.method + "_cayley", (d - 1,), "zeros")
        else:
            regularizer = None
            if self.orthogonality > 0:
                regularizer = SoftOrthogonality(self.orthogonality)
            factory(
                self.method + "_blocks", (d - 1, 2, 2), _identity_blocks, regularizer
            )
        if self.scale:
            factory(self.method + "_scale", (d,), "ones")

    def _coefficients(self, weights):
        """`(d - 1, 4)`: `(g00, g01, g10, g11)` of every block."""
        if self.strict:
            # The Cayley parameter t = tan(theta / 2): cos and sin as rational
            # functions (see GOFT's docstring for why not the angle itself).
            t = weights[self.method + "_cayley"]
            inverse = 1.0 / (1.0 + t * t)
            cos, sin = (1.0 - t * t) * inverse, 2.0 * t * inverse
            return ops.stack([cos, -sin, sin, cos], axis=-1)
        return ops.reshape(weights[self.method + "_blocks"], (-1, 4))

    def stage_blocks(self, weights):
        """Per stage, `(g00, g01, g10, g11)` as `(pairs,)` float32 tensors.

        Block `i` acts on its pair `(x_i, x_j)` of a row vector as
        `(x_i, x_j) @ [[g00, g01], [g10, g11]]`.
        """
        coefficients = self._coefficients(weights)
        stages = givens_stages(int(coefficients.shape[0]) + 1)
        bounds, total = [], 0
        for _, pairs in stages[:-1]:
            total += pairs
            bounds.append(total)
        per_stage = (
            ops.split(coefficients, bounds, axis=0) if bounds else [coefficients]
        )
        return [tuple(ops.unstack(c, 4, axis=-1)) for c in per_stage]

    def _scale_vector(self, weights):
        return weights[self.method + "_scale"] if self.scale else None

    def adapted_matrix(self, weights, matrix):
        # W' = R diag(scale) W, and (R M)^T = M^T R^T.
        scale = self._scale_vector(weights)
        if scale is not None:
            matrix = matrix * ops.expand_dims(scale, -1)
        rows = apply_givens(
            ops.transpose(matrix),
            self.stage_blocks(weights),
            matrix.shape[0],
            transpose=True,
            stage_order=self.stage_order,
        )
        return ops.transpose(rows)

    def call(self, weights, kernel, inputs, training=None):
        if kernel.kind == "conv":
            # R acts on patches, not on the inputs: build R W (exact).
            return super().call(weights, kernel, inputs, training=training)
        blocks = self.stage_blocks(weights)
        scale = self._scale_vector(weights)

        def transform(x):
            y = apply_givens(
                ops.cast(x, "float32"),
                blocks,
                kernel.d_in,
                stage_order=self.stage_order,
            )
            if scale is not None:
                y = y * scale
            return ops.cast(y, kernel.compute_dtype)

        return kernel.project(kernel.map_inputs(inputs, transform))

    def reference_matrix(self, values, matrix):
        """`R diag(c) W` with `R` built as a dense matrix from its stages."""
        d = matrix.shape[0]
        if self.strict:
            t = values[self.method + "_cayley"]
            cos, sin = (1 - t * t) / (1 + t * t), 2 * t / (1 + t * t)
            coefficients = np.stack([cos, -sin, sin, cos], axis=-1)
        else:
            coefficients = values[self.method + "_blocks"].reshape(-1, 4)
        rotation = np.eye(d)
        index = 0
        for stage in givens_pairs(d):
            step = np.eye(d)
            for i, j in stage:
                g00, g01, g10, g11 = coefficients[index]
                step[i, i], step[i, j], step[j, i], step[j, j] = g00, g01, g10, g11
                index += 1
            if self.stage_order == "authors":
                rotation = step @ rotation  # R = P_K ... P_1
            else:
                rotation = rotation @ step  # R = P_1 ... P_K
        if self.scale:
            matrix = matrix * values[self.method + "_scale"][:, None]
        return rotation @ matrix


@register_adapter
class GOFT(_GivensAdapter):
    """Givens orthogonal fine-tuning: W' = R W with R exactly orthogonal.

    `R` is the product of `ceil(log2 d)` stages of disjoint Givens rotations
    on the input dimension `d = d_in` (`d - 1` rotations in all; see the
    module docstring for the pairing and the order: by default the authors'
    `R = P_K ... P_1`, so for a row-vector input the widest-stride stage is
    applied first). Its block is the Givens rotation
    `[[cos theta, -sin theta], [sin theta, cos theta]]` (the paper's sign
    convention), so `R` is exactly orthogonal.

    Each rotation is stored as its Cayley parameter `t = tan(theta / 2)`
    (init 0, so the adapted layer starts out equal to the base layer):
    `cos theta = (1 - t^2) / (1 + t^2)`, `sin theta = 2 t / (1 + t^2)`, the
    2x2 case of OFT's Cayley transform. It reaches every angle in
    `(-pi, pi)`, and `d theta / d t = 2` at init. The official code uses
    `theta = pi * tanh(p)`; the plain angle would do as well mathematically,
    but XLA fuses `cos`/`sin` into every elementwise loop over the
    activations and recomputes them per element, which made a GOFT step
    about twice as slow as a qGOFT step on CPU, on both backends; the
    rational form costs a few flops.

    `R` is applied to the activations stage by stage, at `O(d)` cost per
    row, and merges exactly (`W' = R W`).

    Parameters per layer: `d - 1` (plus `d` with `scale=True`).

    Args:
        scale: bool; adds a learnable per-coordinate scale `c` of size `d`
            (init ones) after the rotation: `x W' = ((x R) * c) W`, that is
            `W' = R diag(c) W` (the paper's GOFT* norm scaling; the official
            code's GOFT has it by default, `no_scaling=False`; here it is
            off).
        stage_order: `"authors"` (default; `R = P_K ... P_1`, the official
            code's order) or `"stage1_first"` (`R = P_1 ... P_K`, this
            library's order before it recorded one; configs without the key
            load with it).

    Example:

    >>> import keras_adapters as ka
    >>> ka.GOFT()
    GOFT(scale=False, stage_order='authors')

    Reference:
        Ma et al., "Parameter Efficient Quasi-Orthogonal Fine-Tuning via
        Givens Rotation", ICML 2024, arXiv:2404.04316 (GOFT, Sec. 4).
    """

    method = "goft"
    strict = True
    variable_axes = {"goft_cayley": (None,), "goft_scale": ("in",)}

    def __init__(self, scale: bool = False, stage_order: str = "authors"):
        self._check_scale(scale, stage_order)

    @classmethod
    def example(cls):
        # The scaled variant exercises the scale vector too.
        return cls(scale=True)

    def get_config(self):
        return {"scale": self.scale, "stage_order": self.stage_order}


@register_adapter
class QGOFT(_GivensAdapter):
    """Quasi-Givens orthogonal fine-tuning: W' = R W, R softly orthogonal.

    As `GOFT`, with every Givens rotation replaced by a free 2x2 block
    `G_i = (alpha_i, beta_i)` initialised to the identity, and the penalty
    `orthogonality * sum_i <alpha_i, beta_i>^2` over the columns of every
    block (a `SoftOrthogonality` regularizer on the blocks variable). The
    penalty is part of the model's losses, so `model.fit` minimizes it with
    the task loss; the column norms stay free.

    Parameters per layer: `4 (d - 1)` (plus `d` with `scale=True`).

    Args:
        orthogonality: number >= 0, the weight `lambda` of the penalty; `0`
            disables it. The paper uses 1e-3 to 5e-2 (0.5 hurts).
        scale: bool; adds a learnable per-coordinate scale `c` of size `d`
            (init ones) after the rotation: `x W' = ((x R) * c) W`, that is
            `W' = R diag(c) W` (the paper's GOFT* norm scaling, an option
            here; the official code has no scale for qGOFT, only for GOFT).
        stage_order: `"authors"` (default; `R = P_K ... P_1`, the official
            code's order) or `"stage1_first"` (`R = P_1 ... P_K`, this
            library's order before it recorded one; configs without the key
            load with it).

    Example:

    >>> import keras_adapters as ka
    >>> ka.QGOFT(orthogonality=1e-2)
    QGOFT(orthogonality=0.01, scale=False, stage_order='authors')

    Reference:
        Ma et al., "Parameter Efficient Quasi-Orthogonal Fine-Tuning via
        Givens Rotation", ICML 2024, arXiv:2404.04316.
    """

    method = "qgoft"
    strict = False
    variable_axes = {"qgoft_blocks": (None, None, None), "qgoft_scale": ("in",)}

    def __init__(
        self,
        orthogonality: float = 1e-3,
        scale: bool = False,
        stage_order: str = "authors",
    ):
        self.orthogonality = float(
            _validation.check_number("orthogonality", orthogonality, low=0)
        )
        self._check_scale(scale, stage_order)

    @classmethod
    def example(cls):
        return cls(orthogonality=1e-2)

    def get_config(self):
        return {
            "orthogonality": self.orthogonality,
            "scale": self.scale,
            "stage_order": self.stage_order,
        }
