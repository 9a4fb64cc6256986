"""DoRA: weight-decomposed low-rank adaptation."""

import math
import string

import keras
import numpy as np
from keras import ops

from keras_adapters import _validation
from keras_adapters.adapters.base import LowRankAdapter
from keras_adapters.adapters.base import factor_initializer
from keras_adapters.adapters.base import register_adapter


@register_adapter
class DoRA(LowRankAdapter):
    """Weight-decomposed low-rank adaptation: W' = m * V / ||V||_c.

    DoRA splits each column of the adapted matrix into a direction and a
    magnitude: the direction is `V = W + s A B` (LoRA's update of the frozen
    matrix `W`, with `A` `(d_in, rank)` random and `B` `(rank, d_out)` zero),
    normalized column by column, and the magnitude is a trainable vector `m`
    `(d_out,)`:

        W' = m * V / ||V||_c,    V = W + s A B,

    where `||V||_c` is the Euclidean norm of each output column of `V` over
    its input axis and `s = alpha / rank` (or `alpha / sqrt(rank)` with
    `use_rslora=True`). `m` starts at `||W + s A B||_c` (`||W||_c` with the
    default zero `B`), so the adapted layer starts out equal to the base
    layer. For an `EinsumDense` kernel with more than two axes, `V` is the
    kernel viewed as a 2-D `(input axes, output axes)` matrix, as PEFT does
    on the flattened projection (see `keras_adapters.kernels.KernelView`),
    so a column is one output unit (one head dimension of one head).

    As in the paper and in Hugging Face PEFT (`use_dora=True`), the norm
    `||V||_c` is a constant in the backward pass (a stop-gradient), which
    saves the memory and time of its gradient. Training uses PEFT's
    activation path and never builds `V` or `W'`:

        y = (m / ||V||_c) * (x W + s (x A) B)

    computed with the frozen projection `x W` (dequantized on the fly on an
    int8/int4 layer); with `dropout > 0` in training, PEFT's formula
    `x W + (m / ||V||_c - 1) * (d(x) W) + (m / ||V||_c) * s (d(x) A) B`,
    `d(x)` the dropped-out inputs, which projects the dropped-out inputs a
    second time. The column norms come from `||W||^2_c + 2 s colsum((A^T W)
    * B) + s^2 colsum(B * (A^T A) B)`, which needs no `d_in x d_out`
    temporary beyond `W` itself. The layer's bias is added after the
    scaling, as PEFT does. Merging computes `W'` exactly. Under mixed
    precision the column norms and `m / ||V||_c` are computed in float32
    from the float32 variables and cast to the compute dtype with the
    factors; the activations stay in the compute dtype.

    Args:
        rank: positive int, the rank `r` of the directional update.
        alpha: positive number; the scale numerator. Defaults to `rank`.
        use_rslora: bool; scale by `alpha / sqrt(rank)` instead of
            `alpha / rank`.
        dropout: float in `[0, 1)`, dropout on the adapter's input during
            training (PEFT's `lora_dropout`).
        a_initializer: `"kaiming"` (PEFT's default), `"gaussian"` (normal,
            std `1 / rank`), `"he_uniform"`, or any Keras initializer (name,
            config dict or object).
        b_initializer: Keras initializer for `B`; `"zeros"` (default). With
            another one, `m` starts at `||W + s A B||_c`, which still makes
            the adapted layer equal to the base layer only if `B` is zero.
        rank_pattern: `{regex: rank}` for layers that take another rank, as
            for `ka.LoRA` (PEFT's rule: the first key matching the layer's
            path, or a `/`-separated tail of it, wins).
        alpha_pattern: `{regex: alpha}`, the same for `alpha`.

    Example:

    >>> import keras_adapters as ka
    >>> dora = ka.DoRA(rank=8, alpha=16)
    >>> dora.scale
    2.0

    Reference:
        Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024
        (arXiv:2402.09353).
    """

    method = "dora"
    factor_names = ("lora_a", "lora_b")
    variable_axes = {
        "lora_a": ("in", None),
        "lora_b": (None, "out"),
        "lora_magnitude": ("out",),
    }
    roles = {"A": "lora_a", "B": "lora_b", "magnitude": "lora_magnitude"}
    # PEFT: a LoRA adapter (`peft_type` "LORA") with `use_dora=True`; its
    # `lora_A.weight` `(r, in)` and `lora_B.weight` `(out, r)` are our factors
    # transposed, and `lora_magnitude_vector` `(out,)` (stored without a
    # `.weight` suffix) is `m`.
    peft_type = "LORA"
    peft_settings = {"use_dora": True}
    peft_tensors = ("lora_A", "lora_B", "lora_magnitude_vector")
    peft_tensor_suffixes = {"lora_magnitude_vector": ""}

    def __init__(
        self,
        rank: int,
        alpha: float | None = None,
        use_rslora: bool = False,
        dropout: float = 0.0,
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
        self.use_rslora = _validation.check_bool("use_rslora", use_rslora)
        self.dropout = float(
            _validation.check_number(
                "dropout",
                dropout,
                low=0,
                high=1,
                high_inclusive=False,
                allowed="a float in [0, 1)",
            )
        )

    @classmethod
    def example(cls):
        return cls(rank=2, alpha=4, dropout=0.1)

    @property
    def scale(self) -> float:
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def get_config(self):
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "dropout": self.dropout,
            "a_initializer": self.a_initializer,
            "b_initializer": self.b_initializer,
            **self._pattern_config(),
        }

    # Building.

    def validate(self, kernel):
        self.check_rank(self.rank, kernel)
        if kernel.equation is not None:
            # The magnitude scales the outputs (`KernelView.scale_outputs`),
            # which needs the kernel's output axes in the order the outputs
            # name them.
            rest = kernel.equation.split(",")[1]
            kernel_term, outputs = rest.split("->")
            in_kernel = [c for c in kernel_term if c in outputs]
            if [c for c in outputs if c in kernel_term] != in_kernel:
                raise ValueError(
                    f"DoRA cannot adapt layer '{kernel.path}': its equation "
                    f"'{kernel.equation}' reorders the kernel's output axes, "
                    "and DoRA's magnitude scales the outputs in kernel order."
                )

    def num_parameters(self, kernel):
        return self.rank * (kernel.d_in + kernel.d_out) + kernel.d_out

    def build(self, kernel, factory):
        a = factory(
            "lora_a",
            (kernel.d_in, self.rank),
            factor_initializer(self.a_initializer, self.rank),
        )
        b = factory(
            "lora_b",
            (self.rank, kernel.d_out),
            factor_initializer(self.b_initializer, self.rank),
        )

        def magnitude(shape, dtype=None):
            # ||W + s A B||_c with the initial factors: identity at init.
            norms = self.column_norms({"lora_a": a, "lora_b": b}, kernel)
            return ops.cast(norms, dtype or "float32")

        factory("lora_magnitude", (kernel.d_out,), magnitude)
        if self.dropout > 0:
            factory.seed_generator("lora_dropout_seed")

    # Computing.

    def column_norms(self, weights, kernel):
        """`||W + s A B||_c`, the `(d_out,)` column norms, in float32.

        Computed as `sqrt(||W||^2_c + 2 s colsum((A^T W) * B) + s^2
        colsum(B * (A^T A) B))` on the frozen kernel in its own layout: no
        reshaping of the kernel to its 2-D view and no `d_in x d_out`
        temporary.
        """
        w = ops.cast(kernel.dense(), "float32")
        a = ops.convert_to_tensor(weights["lora_a"])
        b = ops.convert_to_tensor(weights["lora_b"])
        n_in = len(kernel.in_shape)
        in_axes, out_axes = kernel.perm[:n_in], kernel.perm[n_in:]
        squares = ops.reshape(
            ops.sum(ops.square(w), axis=tuple(in_axes)), (kernel.d_out,)
        )
        if kernel.equation is None:
            a_t_w = ops.matmul(ops.transpose(a), kernel.to_matrix(w))
        else:
            letters = string.ascii_letters[: len(kernel.kernel_shape) + 1]
            r = letters[-1]
            kernel_letters = letters[:-1]
            in_letters = "".join(kernel_letters[i] for i in in_axes)
            out_letters = "".join(kernel_letters[i] for i in out_axes)
            a_t_w = ops.einsum(
                f"{in_letters}{r},{kernel_letters}->{r}{out_letters}",
                ops.reshape(a, kernel.in_shape + (self.rank,)),
                w,
            )
            a_t_w = ops.reshape(a_t_w, (self.rank, kernel.d_out))
        s = self.scale
        cross = ops.sum(ops.multiply(a_t_w, b), axis=0)
        quadratic = ops.sum(
            ops.multiply(b, ops.matmul(ops.matmul(ops.transpose(a), a), b)), axis=0
        )
        squared = squares + (2.0 * s) * cross + (s * s) * quadratic
        return ops.sqrt(ops.maximum(squared, 0.0))

    def magnitude_scale(self, weights, kernel):
        """`m / ||V||_c` `(d_out,)` in float32, the norm a constant for
        gradients (a zero column, whose output is zero anyway, gets `m`)."""
        norms = ops.stop_gradient(self.column_norms(weights, kernel))
        safe = ops.where(norms > 0, norms, ops.ones_like(norms))
        return ops.divide(weights["lora_magnitude"], safe)

    def adapted_matrix(self, weights, matrix):
        direction = (
            matrix + ops.matmul(weights["lora_a"], weights["lora_b"]) * self.scale
        )
        norms = ops.sqrt(ops.sum(ops.square(direction), axis=0))
        safe = ops.where(norms > 0, norms, ops.ones_like(norms))
        return direction * ops.divide(weights["lora_magnitude"], safe)[None, :]

    def call(self, weights, kernel, inputs, training=None):
        """`(m / ||V||_c) * (x W + s (x A) B)`, PEFT's formula with dropout.

        In the compute dtype: the float32 factors and `m / ||V||_c` are
        cast down, the activations are not cast up.
        """
        # (The name scope labels the adapter's ops in profiles and graphs.)
        with keras.name_scope(self.method):
            return self._call(weights, kernel, inputs, training)

    def _call(self, weights, kernel, inputs, training):
        dtype = kernel.compute_dtype
        scale = ops.cast(self.magnitude_scale(weights, kernel), dtype)
        outputs = kernel.project(inputs)
        x = ops.cast(inputs, dtype)
        dropped = bool(training) and self.dropout > 0
        if dropped:
            x = keras.random.dropout(x, self.dropout, seed=weights["lora_dropout_seed"])
        hidden = kernel.contract_inputs(x, ops.cast(weights["lora_a"], dtype))
        b = ops.cast(ops.multiply(weights["lora_b"], self.scale), dtype)
        update = kernel.expand_outputs(hidden, b)
        if not dropped:
            return kernel.scale_outputs(ops.add(outputs, update), scale)
        # PEFT: x W + (m/n - 1) (d(x) W) + (m/n) s (d(x) A) B, the base term
        # on the undropped inputs.
        base_dropped = kernel.project(x)
        combined = kernel.scale_outputs(ops.add(base_dropped, update), scale)
        return ops.add(outputs, ops.subtract(combined, base_dropped))

    def call_transposed(self, weights, kernel, inputs):
        """`x W'^T = (x * m / ||V||_c) (W^T + s B^T A^T)`: a tied reverse
        projection, with the magnitude on its inputs (no dropout)."""
        x = ops.cast(inputs, "float32") * self.magnitude_scale(weights, kernel)
        outputs = kernel.project_transposed(ops.cast(x, inputs.dtype))
        hidden = ops.matmul(x, ops.transpose(weights["lora_b"])) * self.scale
        update = ops.matmul(hidden, ops.transpose(weights["lora_a"]))
        combined = ops.add(ops.cast(outputs, "float32"), update)
        return ops.cast(combined, outputs.dtype)

    def per_example_factors(self, weights, kernel):
        # `(x W + s (x A) B) * m / ||V||_c`: the LoRA factors and DoRA's
        # magnitude scale. Per-example training refuses DoRA's dropout, whose
        # formula projects the dropped inputs through `W` a second time.
        return {
            "a": weights["lora_a"],
            "b": ops.multiply(weights["lora_b"], self.scale),
            "output_scale": self.magnitude_scale(weights, kernel),
            "dropout": self.dropout,
        }

    def reference_matrix(self, values, matrix):
        direction = matrix + self.scale * values["lora_a"] @ values["lora_b"]
        norms = np.linalg.norm(direction, axis=0)
        norms = np.where(norms > 0, norms, 1.0)
        return direction * (values["lora_magnitude"] / norms)[None, :]

    # Hugging Face PEFT (`keras_adapters.interop`).

    @classmethod
    def from_peft_config(cls, config):
        # JSON numbers reach here as plain ints and floats; checked here too.
        return cls(
            rank=_validation.check_positive_int("r", config.get("r")),
            alpha=_validation.check_number(
                "lora_alpha", config.get("lora_alpha", 8), low=0, low_inclusive=False
            ),
            use_rslora=_validation.check_bool(
                "use_rslora", config.get("use_rslora", False)
            ),
            dropout=_validation.check_number(
                "lora_dropout",
                config.get("lora_dropout", 0.0),
                low=0,
                high=1,
                high_inclusive=False,
            ),
        )

    def peft_config(self):
        alpha = self.rank if self.alpha is None else self.alpha
        return {
            "r": self.rank,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "use_dora": True,
        }

    def from_peft_tensors(self, tensors, kernel):
        a, b = tensors["lora_A"], tensors["lora_B"]
        m = tensors["lora_magnitude_vector"]
        expected = {
            "lora_A": (self.rank, kernel.d_in),
            "lora_B": (kernel.d_out, self.rank),
            "lora_magnitude_vector": (kernel.d_out,),
        }
        got = {"lora_A": a.shape, "lora_B": b.shape, "lora_magnitude_vector": m.shape}
        if got != expected:
            raise ValueError(
                f"lora_A {a.shape}, lora_B {b.shape} and lora_magnitude_vector "
                f"{m.shape}, but r={self.rank} and layer '{kernel.path}' (kernel "
                f"{kernel.kernel_shape}, 2-D view {kernel.d_in}x{kernel.d_out}) "
                f"need {expected['lora_A']}, {expected['lora_B']} and "
                f"{expected['lora_magnitude_vector']}"
            )
        return {"lora_a": a.T, "lora_b": b.T, "lora_magnitude": m}

    def to_peft_tensors(self, weights):
        return {
            "lora_A": ops.convert_to_numpy(weights["lora_a"]).T,
            "lora_B": ops.convert_to_numpy(weights["lora_b"]).T,
            "lora_magnitude_vector": ops.convert_to_numpy(weights["lora_magnitude"]),
        }
