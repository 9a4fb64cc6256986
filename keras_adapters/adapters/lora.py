"""LoRA: low-rank adaptation."""

import contextlib
import math
import re

import keras
import numpy as np
from keras import ops

from keras_adapters import _validation
from keras_adapters.adapters import lora_init
from keras_adapters.adapters.base import FACTOR_INITIALIZERS
from keras_adapters.adapters.base import LowRankAdapter
from keras_adapters.adapters.base import is_restoring
from keras_adapters.adapters.base import register_adapter

# `init` values that name the random initializer of A (PEFT's
# `init_lora_weights=True` is "kaiming", "gaussian" is its Gaussian).
_RANDOM_INITS = tuple(FACTOR_INITIALIZERS)
# Inits that keep the initial factors A0, B0 as constants on the layer: the
# layer computes x W + s x (A B - A0 B0), which is x W at init.
_KEPT_FACTOR_INITS = ("pissa", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")
# {layer path: (A0, B0)} that `ka.quantization.loftq` hands to `build`.
_LOFTQ_FACTORS = {}


@contextlib.contextmanager
def loftq_factors(factors):
    """Inside: LoRA(init="loftq") builds layers with these initial factors.

    Args:
        factors: `{layer path: (A0, B0)}`; used by `ka.quantization.loftq`.
    """
    _LOFTQ_FACTORS.update(factors)
    try:
        yield
    finally:
        for path in factors:
            _LOFTQ_FACTORS.pop(path, None)


def _check_init(value):
    allowed = (
        "None, one of "
        f"{list(_RANDOM_INITS) + ['pissa', 'pissa_niter_<n>', 'olora', 'loftq']}"
    )
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"`init` must be {allowed}; received {value!r}.")
    if value in _RANDOM_INITS or value in lora_init.DATA_INITS:
        return value
    if _PISSA_NITER.fullmatch(value):
        return value
    raise ValueError(f"`init` must be {allowed}; received {value!r}.")


@register_adapter
class LoRA(LowRankAdapter):
    """Low-rank adaptation: W' = W + s A B.

    `A` is `(d_in, rank)` and random, `B` is `(rank, d_out)` and zero, so the
    adapted layer starts out equal to the base layer. The scale is
    `s = alpha / rank`, or `alpha / sqrt(rank)` with `use_rslora=True`
    (rank-stabilized LoRA). For an `EinsumDense` kernel with more than two
    axes, `A B` factorizes the kernel viewed as a 2-D
    `(input axes, output axes)` matrix, as PEFT does on the flattened
    projection (see `keras_adapters.kernels.KernelView`). On the stacked
    expert weights of a mixture-of-experts layer (`ExpertsKernel`) every
    expert has its own factors, `A` `(experts, d_in, r)` and `B` `(experts,
    r, d_out)`, applied with batched einsums over the expert axis.

    Training uses the activation path `x W + s ((dropout(x) A) B)`: the
    adapted kernel is never built, and the weight gradient of the frozen
    kernel is never computed. Under mixed precision the factors stay float32
    variables and are cast down to the compute dtype for the activation
    path, so no float32 copy of the activations is made or kept for the
    backward pass (as PyTorch autocast runs PEFT's LoRA). Merging computes
    `W + s A B` exactly, in float32.

    `init` starts `A` and `B` from the base kernel instead (see
    docs/methods/lora_initializations.md): `"pissa"` (its top singular
    triplets), `"pissa_niter_<n>"` (the same by a randomized SVD with `n`
    subspace iterations), `"olora"` (its QR decomposition), and `"loftq"`
    (through `ka.quantization.loftq`, which also quantizes the layer). PEFT
    then writes the residual `W - s A0 B0` into the base weights; here the
    base kernel is never changed. The layer keeps the initial factors
    `A0`, `B0` as constants (`lora_a0`, `lora_b0`, not trainable) and
    computes `x W + s ((dropout(x) A) B) - s ((x A0) B0)`, which is PEFT's
    `x (W - s A0 B0) + s ((dropout(x) A) B)`: the same training, a base
    other adapters on the layer still share, deletion that leaves the
    kernel bit-identical, and files that load into an untouched model. The
    cost: `r (d_in + d_out)` more stored values and two more rank-`r`
    products per call.

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
        rank_pattern: `{regex: rank}` for layers that take another rank. A
            key matches a layer whose path (relative to the adapted model,
            as `enable_adapter` reports it) it `re.fullmatch`es, or a
            `/`-separated tail of that path, PEFT's `rank_pattern` rule;
            the first matching key (in dict order) wins.
        alpha_pattern: `{regex: alpha}`, the same for `alpha`. A layer
            whose rank comes from `rank_pattern` keeps `alpha` unless a key
            here matches it (with `alpha=None`, its alpha is its rank).
        init: how `A` and `B` start. `None` (default): `A` from
            `a_initializer`, `B` from `b_initializer`. `"kaiming"` or
            `"gaussian"`: a shorthand for `a_initializer` (PEFT's
            `init_lora_weights` names). `"pissa"`, `"pissa_niter_<n>"`,
            `"olora"`, `"loftq"`: computed from the base kernel, see above;
            `a_initializer` and `b_initializer` must then stay at their
            defaults.

    Example:

    >>> import keras_adapters as ka
    >>> lora = ka.LoRA(rank=8, alpha=16, use_rslora=True)
    >>> round(lora.scale, 6)  # alpha / sqrt(rank)
    5.656854
    >>> ka.LoRA(rank=8, rank_pattern={"value": 16}).for_layer("layer_0/value").rank
    16

    Reference:
        Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
        ICLR 2022; Kalajdzievski, "A Rank Stabilization Scaling Factor for
        Fine-Tuning with LoRA", 2023; Meng et al., "PiSSA: Principal
        Singular Values and Singular Vectors Adaptation of Large Language
        Models", NeurIPS 2024; Büyükakyüz, "OLoRA: Orthonormal Low-Rank
        Adaptation of Large Language Models", 2024; Li et al., "LoftQ:
        LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
        ICLR 2024.
    """

    method = "lora"
    additive = True
    # Every kind, the stacked experts of MoE layers too: its factors get the
    # expert axis in front and its math batches over it.
    layer_kinds = ("dense", "einsum_dense", "embedding", "conv", "experts")
    factor_names = ("lora_a", "lora_b")
    variable_axes = {
        "lora_a": ("in", None),
        "lora_b": (None, "out"),
        "lora_a0": ("in", None),
        "lora_b0": (None, "out"),
    }
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
        rank_pattern: dict | None = None,
        alpha_pattern: dict | None = None,
        init: str | None = None,
    ):
        init = _check_init(init)
        if init in _RANDOM_INITS:
            # A shorthand for `a_initializer` (PEFT's names).
            if a_initializer not in ("kaiming", init):
                raise ValueError(
                    f"`init={init!r}` and `a_initializer={a_initializer!r}` both "
                    "choose the random initializer of A; pass one of them."
                )
            a_initializer, init = init, None
        if init is not None and (a_initializer, b_initializer) != (
            "kaiming",
            "zeros",
        ):
            raise ValueError(
                f"`init={init!r}` computes A and B from the base kernel; "
                f"`a_initializer={a_initializer!r}` and "
                f"`b_initializer={b_initializer!r}` would be ignored. Leave them "
                "at their defaults."
            )
        super().__init__(
            rank,
            alpha,
            a_initializer,
            b_initializer,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
        )
        self.init = init
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

    @property
    def keeps_initial_factors(self) -> bool:
        """Whether each layer keeps the constants `lora_a0`, `lora_b0`."""
        return self.init is not None and self.init.startswith(_KEPT_FACTOR_INITS)

    def get_config(self):
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "dropout": self.dropout,
            "a_initializer": self.a_initializer,
            "b_initializer": self.b_initializer,
            # Only when set (see LowRankAdapter.get_config).
            **self._pattern_config(),
            **({} if self.init is None else {"init": self.init}),
        }

    def validate(self, kernel):
        super().validate(kernel)
        if self.init is not None and kernel.stack_shape:
            raise ValueError(
                f"LoRA(init={self.init!r}) computes its factors from a 2-D base "
                f"kernel, but layer '{kernel.path}' holds a stack of "
                f"{kernel.stack_shape} expert kernels; use init=None there."
            )

    def num_parameters(self, kernel):
        # The initial factors (constants) count: they are stored per layer.
        factor = 2 if self.keeps_initial_factors else 1
        return factor * self.rank * (kernel.d_in + kernel.d_out)

    def build(self, kernel, factory):
        if self.init is None:
            super().build(kernel, factory)
        else:
            shapes = {"a": (kernel.d_in, self.rank), "b": (self.rank, kernel.d_out)}
            initial = _InitialFactors(self, kernel)
            factory("lora_a", shapes["a"], initial.initializer(0))
            factory("lora_b", shapes["b"], initial.initializer(1))
            if self.keeps_initial_factors:
                factory("lora_a0", shapes["a"], initial.initializer(0), trainable=False)
                factory("lora_b0", shapes["b"], initial.initializer(1), trainable=False)
        if self.dropout > 0:
            factory.seed_generator("lora_dropout_seed")

    def initial_factors(self, matrix):
        """`(A0, B0)` (float64 NumPy) this adapter starts from on a layer
        whose base kernel has the 2-D view `matrix` (`init` "pissa",
        "pissa_niter_<n>" or "olora"; see `keras_adapters.adapters.lora_init`).
        """
        if self.init == "olora":
            return lora_init.olora(matrix, self.rank, self.scale)
        niter = _PISSA_NITER.fullmatch(self.init)
        iterations = int(niter.group(1)) if niter else None
        return lora_init.pissa(matrix, self.rank, self.scale, iterations)

    def delta_matrix(self, weights):
        """`s (A B - A0 B0)`, the `(d_in, d_out)` update, in float32 (`A0 B0`
        only with an `init` that keeps the initial factors)."""
        product = ops.matmul(weights["lora_a"], weights["lora_b"])
        if "lora_a0" in weights:
            product = product - ops.matmul(weights["lora_a0"], weights["lora_b0"])
        return product * self.scale

    def adapted_matrix(self, weights, matrix):
        return matrix + self.delta_matrix(weights)

    def delta(self, weights, kernel, inputs, training=None):
        """`s (dropout(x) A) B` in the layer's output layout, in the layer's
        compute dtype; minus `s (x A0) B0` with an `init` that keeps the
        initial factors (without dropout: PEFT's residual base sees `x`).

        The float32 factors are cast to the compute dtype (the scale folded
        into `B` first), not the activations up to float32.
        """
        # (The name scope labels the adapter's ops in profiles and graphs.)
        with keras.name_scope(self.method):
            dtype = kernel.compute_dtype
            x = ops.cast(inputs, dtype)
            dropped = x
            if training and self.dropout > 0:
                dropped = keras.random.dropout(
                    x, self.dropout, seed=weights["lora_dropout_seed"]
                )
            a = ops.cast(weights["lora_a"], dtype)
            hidden = kernel.contract_inputs(dropped, a)
            b = _scaled(weights["lora_b"], self, dtype)
            delta = kernel.expand_outputs(hidden, b)
            if "lora_a0" in weights:
                a0 = ops.cast(weights["lora_a0"], dtype)
                b0 = _scaled(weights["lora_b0"], self, dtype)
                delta = delta - kernel.expand_outputs(kernel.contract_inputs(x, a0), b0)
            return delta

    def per_example_factors(self, weights, kernel):
        a, b = weights["lora_a"], weights["lora_b"]
        if "lora_a0" in weights:
            # `s (A B - A0 B0)` as one factor pair of rank 2 r. Dropout would
            # also reach the `A0` half, which the adapter itself applies to
            # the undropped inputs: refused rather than silently different.
            if self.dropout > 0:
                raise ValueError(
                    f"Per-example adapters do not support LoRA(init="
                    f"{self.init!r}) with dropout={self.dropout} (layer "
                    f"'{kernel.path}'): its initial factors see the inputs "
                    "without dropout. Use dropout=0.0 for this adapter."
                )
            a = ops.concatenate([a, weights["lora_a0"]], axis=1)
            b = ops.concatenate([b, ops.negative(weights["lora_b0"])], axis=0)
        return {"a": a, "b": ops.multiply(b, self.scale), "dropout": self.dropout}

    def values_from(self, other, values, kernel):
        """Any LoRA of rank <= this one's: `A` padded with zero columns, `B`
        with zero rows and rescaled by `other.scale / self.scale`, so that
        `s A B` is `other`'s update exactly; `B = 0` where `values` is None."""
        if type(self) is not LoRA or type(other) is not LoRA:
            return super().values_from(other, values, kernel)
        for adapter in (self, other):
            if adapter.keeps_initial_factors:
                raise ValueError(
                    f"Cannot hot-swap a LoRA with init={adapter.init!r} "
                    f"(layer '{kernel.path}'): only plain LoRA slots and files "
                    "swap; save it as a PEFT adapter (a plain LoRA of rank "
                    "2 r) and load that."
                )
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
        product = values["lora_a"] @ values["lora_b"]
        if "lora_a0" in values:
            product = product - values["lora_a0"] @ values["lora_b0"]
        return matrix + self.scale * product

    def delta_transposed(self, weights, kernel, inputs):
        """`s (x B^T) A^T` (minus `s (x B0^T) A0^T`): a tied reverse
        projection's update, without building `A B` (no dropout)."""
        x = ops.cast(inputs, "float32")
        pairs = [("lora_a", "lora_b", 1.0), ("lora_a0", "lora_b0", -1.0)]
        delta = None
        for a, b, sign in pairs:
            if a not in weights:
                continue
            hidden = ops.matmul(x, ops.transpose(weights[b])) * (sign * self.scale)
            term = ops.matmul(hidden, ops.transpose(weights[a]))
            delta = term if delta is None else ops.add(delta, term)
        return delta

    def plain_factors(self, weights):
        """`(A', B')` (NumPy float32) with `s A' B'` this layer's update.

        `(A, B)`; with an `init` that keeps the initial factors, `A' = [A,
        A0]` and `B' = [B; -B0]` (rank `2 r`): the update relative to the
        untouched base kernel, as PEFT's
        `path_initial_model_for_weight_conversion` writes it.
        """
        a = np.asarray(ops.convert_to_numpy(weights["lora_a"]), "float32")
        b = np.asarray(ops.convert_to_numpy(weights["lora_b"]), "float32")
        if "lora_a0" not in weights:
            return a, b
        a0 = np.asarray(ops.convert_to_numpy(weights["lora_a0"]), "float32")
        b0 = np.asarray(ops.convert_to_numpy(weights["lora_b0"]), "float32")
        return np.concatenate([a, a0], axis=1), np.concatenate([b, -b0], axis=0)

    @classmethod
    def from_peft_config(cls, config):
        # JSON numbers reach here as plain ints and floats; checked here too.
        # `rank_pattern`/`alpha_pattern` name PEFT modules: `ka.interop`
        # maps them to layer paths.
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
            init=_init_from_peft(config.get("init_lora_weights", True)),
        )

    def peft_config(self):
        """PEFT's `r`, `lora_alpha`, `lora_dropout`, `use_rslora`.

        With an `init` that keeps the initial factors, the adapter is written
        as the plain LoRA update relative to the untouched base (see
        `plain_factors`): rank `2 r`, and `alpha` doubled (times `sqrt(2)`
        with rsLoRA) so that the scale stays the same.
        """
        if self.init == "loftq":
            raise ValueError(
                "A LoftQ adapter is an update of the LoftQ-quantized base, not of "
                "the float weights the Hugging Face model has, so it has no PEFT "
                "LoRA equivalent; merge it (ka.merge_adapters) and export the "
                "model instead."
            )
        rank = self.rank
        alpha = self.rank if self.alpha is None else self.alpha
        if self.keeps_initial_factors:
            rank, alpha = 2 * rank, alpha * (math.sqrt(2) if self.use_rslora else 2)
        return {
            "r": rank,
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
        self.peft_config()  # refuses LoftQ
        a, b = self.plain_factors(weights)
        return {"lora_A": a.T, "lora_B": b.T}

    def _combined_rank(self):
        """The rank this adapter takes in a combination: its largest rank
        (patterns included), doubled if it keeps its initial factors."""
        rank = max([self.rank, *self.rank_pattern.values()])
        return 2 * rank if self.keeps_initial_factors else rank

    @classmethod
    def combine(cls, adapters, coefficients):
        """A LoRA whose update is `sum_i c_i s_i A_i B_i`: the factors side by
        side (`A = [A_1, A_2, ...]`, `B = [c_1 s_1 B_1; ...]`), rank the sum of
        the ranks, scale 1, no dropout. Layers with a smaller rank (from a
        `rank_pattern`) are padded with zeros; adapters that keep initial
        factors (PiSSA, OLoRA) contribute `[A_i, A0_i]`, `[B_i; -B0_i]`."""
        not_lora = [a for a in adapters if not isinstance(a, LoRA)]
        if not_lora:
            raise ValueError(
                f"combine_adapters combines LoRA adapters only; {not_lora} are not "
                "LoRA."
            )
        rank = sum(a._combined_rank() for a in adapters)
        return cls(rank=rank, alpha=rank)

    def combined_values(self, parts, kernel):
        a_blocks, b_blocks = [], []
        for adapter, weights, coefficient in parts:
            size = adapter._combined_rank()
            a_block = np.zeros((kernel.d_in, size), "float32")
            b_block = np.zeros((size, kernel.d_out), "float32")
            if weights is not None:
                layer_adapter = getattr(weights, "adapter", adapter)
                a, b = layer_adapter.plain_factors(weights)
                a_block[:, : a.shape[1]] = a
                b_block[: b.shape[0]] = b * np.float32(
                    coefficient * layer_adapter.scale
                )
            a_blocks.append(a_block)
            b_blocks.append(b_block)
        return {
            "lora_a": np.concatenate(a_blocks, axis=1),
            "lora_b": np.concatenate(b_blocks, axis=0),
        }


def _scaled(factor, adapter, dtype):
    """`s B` computed in float32, then cast to the compute dtype `dtype`."""
    return ops.cast(ops.multiply(factor, adapter.scale), dtype)


def _init_from_peft(value):
    """Our `init` for PEFT's `init_lora_weights`."""
    if value is True or value is False or value in ("gaussian", "eva", "orthogonal"):
        # Random or data-driven starts that leave the base weights alone: the
        # trained factors are all there is to import.
        return None
    if value in ("pissa", "olora"):
        # PEFT recomputes the start from the base weights when it loads such
        # an adapter, and so does ka.LoRA(init=...): the same update.
        return value
    raise ValueError(
        f"`init_lora_weights={value!r}` changed the base weights in a way that "
        "cannot be recomputed exactly here (a randomized SVD, CorDA's "
        "activation statistics, or LoftQ's NF4 quantization); convert it to a "
        "plain LoRA first with PEFT's save_pretrained(..., "
        "path_initial_model_for_weight_conversion=...)"
    )


class _InitialFactors:
    """Initializers for `A` and `B` from the base kernel, computed once, on
    first use (planning a load never computes them)."""

    def __init__(self, adapter, kernel):
        self._adapter = adapter
        self._kernel = kernel
        self._values = None

    def _compute(self):
        adapter, kernel = self._adapter, self._kernel
        if adapter.init == "loftq":
            if kernel.path in _LOFTQ_FACTORS:
                return _LOFTQ_FACTORS[kernel.path]
            if is_restoring() and kernel.quantized:
                return _zeros(kernel, adapter.rank)
            raise ValueError(
                f"LoRA(init='loftq') on layer '{kernel.path}': LoftQ quantizes "
                "the float layer itself; call ka.quantization.loftq(model, "
                "ka.LoRA(..., init='loftq'), targets, mode=...) on the float "
                "model (also before loading a LoftQ adapter file into a fresh "
                "model)."
            )
        if is_restoring():
            # Re-attached to receive saved values: skip the decomposition.
            return _zeros(kernel, adapter.rank)
        dense = ops.cast(kernel.dense(), "float32")
        matrix = np.asarray(ops.convert_to_numpy(kernel.to_matrix(dense)), "float64")
        return adapter.initial_factors(matrix)

    def initializer(self, index):
        def initialize(shape, dtype=None):
            if self._values is None:
                self._values = self._compute()
            value = np.asarray(self._values[index], "float32")
            return ops.convert_to_tensor(value, dtype=dtype or "float32")

        return initialize


def _zeros(kernel, rank):
    return (
        np.zeros((kernel.d_in, rank), "float32"),
        np.zeros((rank, kernel.d_out), "float32"),
    )
