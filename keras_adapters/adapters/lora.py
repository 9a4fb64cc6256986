"""LoRA: low-rank adaptation."""

import math

import keras
from keras import ops

from keras_adapters import quantization
from keras_adapters.adapters.base import FACTOR_INITIALIZERS
from keras_adapters.adapters.base import Adapter
from keras_adapters.adapters.base import check_initializer
from keras_adapters.adapters.base import check_number
from keras_adapters.adapters.base import factor_initializer
from keras_adapters.adapters.base import register_adapter

# The former module-level names; the helpers now live in base.py (shared with
# HUT).
_A_INITIALIZERS = FACTOR_INITIALIZERS
_check_number = check_number


@register_adapter
class LoRA(Adapter):
    """Low-rank adaptation: W' = W + s A B.

    `A` is `(d_in, rank)` and random, `B` is `(rank, d_out)` and zero, so the
    adapted layer starts out equal to the base layer. The scale is
    `s = alpha / rank`, or `alpha / sqrt(rank)` with `use_rslora=True`
    (rank-stabilized LoRA). For an `EinsumDense` kernel with more than two
    axes, `A B` factorizes the kernel viewed as a 2-D
    `(input axes, output axes)` matrix, as PEFT does on the flattened
    projection (see `KernelView`).

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
    >>> lora.scale  # alpha / sqrt(rank)
    5.656854249492381

    Reference:
        Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
        ICLR 2022; Kalajdzievski, "A Rank Stabilization Scaling Factor for
        Fine-Tuning with LoRA", 2023.
    """

    method = "lora"
    additive = True
    variable_axes = {"lora_a": ("in", None), "lora_b": (None, "out")}

    def __init__(
        self,
        rank: int,
        alpha: float | None = None,
        use_rslora: bool = False,
        dropout: float = 0.0,
        a_initializer="kaiming",
        b_initializer="zeros",
    ):
        _check_number("rank", rank, 1, "a positive int", integer=True)
        if alpha is not None:
            _check_number("alpha", alpha, 0, "a positive number", low_inclusive=False)
        if not isinstance(use_rslora, bool):
            raise ValueError(f"`use_rslora` must be a bool; received {use_rslora!r}.")
        _check_number("dropout", dropout, 0, "a float in [0, 1)")
        if dropout >= 1:
            raise ValueError(
                f"`dropout` must be a float in [0, 1); received {dropout!r}."
            )
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.dropout = float(dropout)
        self.a_initializer = self._check_initializer("a_initializer", a_initializer)
        self.b_initializer = self._check_initializer("b_initializer", b_initializer)

    _check_initializer = staticmethod(check_initializer)

    def _initializer(self, value):
        return factor_initializer(value, self.rank)

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

    def validate(self, layer, view):
        if self.rank > min(view.d_in, view.d_out):
            raise ValueError(
                f"LoRA rank {self.rank} is larger than min(d_in, d_out) = "
                f"min({view.d_in}, {view.d_out}) of layer '{layer.path}'; use a "
                f"rank <= {min(view.d_in, view.d_out)}."
            )

    def num_parameters(self, view):
        return self.rank * (view.d_in + view.d_out)

    def build(self, layer, view):
        self.add_variable(
            layer,
            "lora_a",
            (view.d_in, self.rank),
            self._initializer(self.a_initializer),
        )
        self.add_variable(
            layer,
            "lora_b",
            (self.rank, view.d_out),
            self._initializer(self.b_initializer),
        )
        if self.dropout > 0:
            layer.lora_dropout_seed = keras.random.SeedGenerator()
        return ("lora_a", "lora_b")

    def delta_matrix(self, layer):
        """`s A B`, the `(d_in, d_out)` update, in float32."""
        return ops.matmul(layer.lora_a, layer.lora_b) * self.scale

    def adapted_matrix(self, layer, matrix):
        return matrix + self.delta_matrix(layer)

    def delta(self, layer, view, inputs, training=None):
        """`s (dropout(x) A) B` in the layer's output layout, in float32."""
        x = ops.cast(inputs, "float32")
        if training and self.dropout > 0:
            x = keras.random.dropout(x, self.dropout, seed=layer.lora_dropout_seed)
        hidden = view.contract_inputs(x, layer.lora_a) * self.scale
        return view.expand_outputs(hidden, layer.lora_b)

    def call(self, layer, view, inputs, training=None):
        # On an int8/int4 base: Keras' input quantization (if any), then the
        # frozen kernel dequantized on the fly (keras_adapters.quantization).
        inputs = quantization.quantize_inputs(layer, inputs)
        outputs = quantization.base_projection(layer, view, inputs)
        delta = self.delta(layer, view, inputs, training=training)
        return ops.add(outputs, ops.cast(delta, outputs.dtype))
