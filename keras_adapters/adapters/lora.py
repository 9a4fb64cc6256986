"""LoRA: low-rank adaptation."""

import math

import keras
import numpy as np
from keras import ops

from keras_adapters import _validation
from keras_adapters.adapters.base import LowRankAdapter
from keras_adapters.adapters.base import register_adapter


@register_adapter
class LoRA(LowRankAdapter):
    """Low-rank adaptation: W' = W + s A B.

    `A` is `(d_in, rank)` and random, `B` is `(rank, d_out)` and zero, so the
    adapted layer starts out equal to the base layer. The scale is
    `s = alpha / rank`, or `alpha / sqrt(rank)` with `use_rslora=True`
    (rank-stabilized LoRA). For an `EinsumDense` kernel with more than two
    axes, `A B` factorizes the kernel viewed as a 2-D
    `(input axes, output axes)` matrix, as PEFT does on the flattened
    projection (see `keras_adapters.kernels.KernelView`).

    Training uses the activation path `x W + s ((dropout(x) A) B)`: the
    adapted kernel is never built, and the weight gradient of the frozen
    kernel is never computed. The adapter math runs in float32 under mixed
    precision. Merging computes `W + s A B` exactly.

    Args:
        rank: positive int, the rank `r` of the update.
        alpha: positive number; the scale numerator. Defaults to `rank`
            (scale 1).
        use_rslora: bool; scale by `alpha / sqrt(rank)` instead of
            `alpha / rank`.
        dropout: float in `[0, 1)`, dropout on the adapter's input during
            training.
        a_initializer: `"kaiming"` (PEFT's default), `"gaussian"` (normal,
            std `1 / rank`), `"he_uniform"` (Keras' `enable_lora` default), or
            any Keras initializer (name, config dict or object).
        b_initializer: Keras initializer for `B`; `"zeros"` (default) keeps
            the identity at init.

    Example:

    >>> import keras_adapters as ka
    >>> lora = ka.LoRA(rank=8, alpha=16, use_rslora=True)
    >>> round(lora.scale, 6)  # alpha / sqrt(rank)
    5.656854

    Reference:
        Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
        ICLR 2022; Kalajdzievski, "A Rank Stabilization Scaling Factor for
        Fine-Tuning with LoRA", 2023.
    """

    method = "lora"
    additive = True
    factor_names = ("lora_a", "lora_b")
    variable_axes = {"lora_a": ("in", None), "lora_b": (None, "out")}
    roles = {"A": "lora_a", "B": "lora_b"}
    peft_type = "LORA"
    # PEFT's `lora_A.weight` is `(r, in)` and `lora_B.weight` `(out, r)`: our
    # `lora_a` `(in, r)` and `lora_b` `(r, out)` transposed.
    peft_tensors = ("lora_A", "lora_B")

    def __init__(
        self,
        rank: int,
        alpha: float | None = None,
        use_rslora: bool = False,
        dropout: float = 0.0,
        a_initializer="kaiming",
        b_initializer="zeros",
    ):
        super().__init__(rank, alpha, a_initializer, b_initializer)
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
        }

    def build(self, kernel, factory):
        super().build(kernel, factory)
        if self.dropout > 0:
            factory.seed_generator("lora_dropout_seed")

    def delta_matrix(self, weights):
        """`s A B`, the `(d_in, d_out)` update, in float32."""
        return ops.matmul(weights["lora_a"], weights["lora_b"]) * self.scale

    def adapted_matrix(self, weights, matrix):
        return matrix + self.delta_matrix(weights)

    def delta(self, weights, kernel, inputs, training=None):
        """`s (dropout(x) A) B` in the layer's output layout, in float32."""
        x = ops.cast(inputs, "float32")
        if training and self.dropout > 0:
            x = keras.random.dropout(x, self.dropout, seed=weights["lora_dropout_seed"])
        hidden = kernel.contract_inputs(x, weights["lora_a"]) * self.scale
        return kernel.expand_outputs(hidden, weights["lora_b"])

    def per_example_factors(self, weights, kernel):
        return {
            "a": weights["lora_a"],
            "b": ops.multiply(weights["lora_b"], self.scale),
            "dropout": self.dropout,
        }

    def values_from(self, other, values, kernel):
        """Any LoRA of rank <= this one's: `A` padded with zero columns, `B`
        with zero rows and rescaled by `other.scale / self.scale`, so that
        `s A B` is `other`'s update exactly; `B = 0` where `values` is None."""
        if type(self) is not LoRA or type(other) is not LoRA:
            return super().values_from(other, values, kernel)
        if other.rank > self.rank:
            raise ValueError(
                f"Cannot load a rank-{other.rank} LoRA into a slot of rank "
                f"{self.rank} (layer '{kernel.path}'); reserve the slot with a "
                f"LoRA of rank >= {other.rank}."
            )
        if values is None:  # `other` does not adapt this layer
            return {"lora_b": np.zeros((self.rank, kernel.d_out), "float32")}
        pad = self.rank - other.rank
        a = np.pad(np.asarray(values["lora_a"], "float64"), [(0, 0), (0, pad)])
        b = np.asarray(values["lora_b"], "float64") * (other.scale / self.scale)
        b = np.pad(b, [(0, pad), (0, 0)])
        return {"lora_a": a.astype("float32"), "lora_b": b.astype("float32")}

    def reference_matrix(self, values, matrix):
        return matrix + self.scale * values["lora_a"] @ values["lora_b"]

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
        }

    def from_peft_tensors(self, tensors, kernel):
        a, b = tensors["lora_A"], tensors["lora_B"]
        expected_a, expected_b = (self.rank, kernel.d_in), (kernel.d_out, self.rank)
        if a.shape != expected_a or b.shape != expected_b:
            raise ValueError(
                f"lora_A {a.shape} and lora_B {b.shape}, but r={self.rank} and "
                f"layer '{kernel.path}' (kernel {kernel.kernel_shape}, 2-D view "
                f"{kernel.d_in}x{kernel.d_out}) need {expected_a} and {expected_b}"
            )
        return {"lora_a": a.T, "lora_b": b.T}

    def to_peft_tensors(self, weights):
        return {
            "lora_A": ops.convert_to_numpy(weights["lora_a"]).T,
            "lora_B": ops.convert_to_numpy(weights["lora_b"]).T,
        }

    @classmethod
    def combine(cls, adapters, coefficients):
        """A LoRA whose update is `sum_i c_i s_i A_i B_i`: the factors side by
        side (`A = [A_1, A_2, ...]`, `B = [c_1 s_1 B_1; ...]`), rank the sum of
        the ranks, scale 1, no dropout."""
        not_lora = [a for a in adapters if not isinstance(a, LoRA)]
        if not_lora:
            raise ValueError(
                f"combine_adapters combines LoRA adapters only; {not_lora} are not "
                "LoRA."
            )
        rank = sum(a.rank for a in adapters)
        return cls(rank=rank, alpha=rank)

    def combined_values(self, parts, kernel):
        a_blocks, b_blocks = [], []
        for adapter, weights, coefficient in parts:
            if weights is None:
                a_blocks.append(np.zeros((kernel.d_in, adapter.rank), "float32"))
                b_blocks.append(np.zeros((adapter.rank, kernel.d_out), "float32"))
                continue
            a_blocks.append(ops.convert_to_numpy(weights["lora_a"]))
            b = ops.convert_to_numpy(weights["lora_b"])
            b_blocks.append(b * np.float32(coefficient * adapter.scale))
        return {
            "lora_a": np.concatenate(a_blocks, axis=1),
            "lora_b": np.concatenate(b_blocks, axis=0),
        }
