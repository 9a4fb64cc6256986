"""The small base every adapter method builds on, and the method registry.

A method is one file: a subclass of `Adapter` registered with
`@register_adapter`. It sees the layer it adapts only through two objects:

- `kernel`: the frozen base kernel (`keras_adapters.kernels.FloatKernel`
  or `QuantizedKernel`): the 2-D view (`d_in`, `d_out`, `to_matrix`,
  `contract_inputs`, `expand_outputs`, `map_inputs`, ...), the projection
  of the inputs with the frozen kernel (`project`), and the dense kernel for
  merges (`dense`);
- `weights`: the adapter's variables on that layer, by the short names it
  gave them (`weights["lora_a"]`), created in `build` with the `factory`.

Quantized bases and multi-device placement live behind those two objects,
so a method file imports neither. See `docs/writing_a_method.md`.
"""

import contextlib
import re

import keras
import numpy as np
from keras import ops

from keras_adapters import _validation

ADAPTER_METHODS = {}

# Named initializers for the random factor of a low-rank adapter (LoRA's and
# HUT's `A`); each maps the rank to a Keras initializer.
FACTOR_INITIALIZERS = {
    # Hugging Face PEFT's default: kaiming_uniform_(a=sqrt(5)) on A, which is
    # uniform(-1/sqrt(d_in), 1/sqrt(d_in)).
    "kaiming": lambda rank: keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
    ),
    # PEFT's init_lora_weights="gaussian": normal with std 1/r.
    "gaussian": lambda rank: keras.initializers.RandomNormal(stddev=1.0 / rank),
    # Keras' built-in `enable_lora` default.
    "he_uniform": lambda rank: keras.initializers.HeUniform(),
}


def check_initializer(name, value):
    """Validates a factor initializer argument and returns its config form.

    Accepts a name in `FACTOR_INITIALIZERS` or a Keras initializer (a name
    Keras knows, a config dict naming a registered `Initializer` class, or
    an `Initializer` object, which is serialized so that the adapter's
    config stays JSON-ready). Raises `ValueError` otherwise (`None` too: it
    would silently mean Keras' default).
    """
    allowed = (
        f"one of {sorted(FACTOR_INITIALIZERS)} or a Keras initializer (name, "
        "config dict or object)"
    )
    if isinstance(value, str) and value in FACTOR_INITIALIZERS:
        return value
    if value is None or isinstance(value, bool):
        raise ValueError(f"`{name}` must be {allowed}; received {value!r}.")
    try:
        initializer = keras.initializers.get(value)
    except Exception as error:  # Keras raises ValueError, TypeError, KeyError.
        raise ValueError(
            f"`{name}` must be {allowed}; received {value!r} ({error})."
        ) from None
    if not isinstance(initializer, keras.initializers.Initializer):
        raise ValueError(
            f"`{name}` must be {allowed}; received {value!r}, which is a "
            f"{type(initializer).__name__}, not an initializer."
        )
    if isinstance(value, keras.initializers.Initializer):
        return keras.initializers.serialize(value)
    return value


def factor_initializer(value, rank):
    """The Keras initializer for a value accepted by `check_initializer`."""
    if isinstance(value, str) and value in FACTOR_INITIALIZERS:
        return FACTOR_INITIALIZERS[value](rank)
    return keras.initializers.get(value)


def register_adapter(cls: type) -> type:
    """Class decorator: makes an `Adapter` subclass known by its `method`.

    Registered methods can be rebuilt from adapter files and `.keras` files
    (`Adapter.deserialize`), are Keras-serializable, and run through the
    shared test matrix.

    Example:

    ```python
    @ka.register_adapter
    class IA3(ka.Adapter):
        method = "ia3"
        ...
    ```
    """
    if not isinstance(cls, type) or not issubclass(cls, Adapter):
        raise ValueError(
            f"register_adapter takes a subclass of ka.Adapter; received {cls!r}."
        )
    if not isinstance(cls.method, str) or not cls.method.isidentifier():
        raise ValueError(
            f"Adapter class {cls.__name__} must set `method` to an identifier "
            f"string such as 'lora'; it has {cls.method!r}."
        )
    if cls.method in ADAPTER_METHODS:
        raise ValueError(
            f"Adapter method name {cls.method!r} is taken by "
            f"{ADAPTER_METHODS[cls.method].__name__}; choose another `method`."
        )
    ADAPTER_METHODS[cls.method] = cls
    return keras.saving.register_keras_serializable(package="keras_adapters")(cls)


class Adapter:
    """Base class of adapter configurations (`LoRA`, `HUT`, `QGOFT`, ...).

    An adapter object is a small, immutable description of a method and its
    hyperparameters; it validates them on construction. `enable_adapter`
    uses it to create variables on each targeted layer and to compute that
    layer's outputs; the variables live on the layer, not on the adapter,
    so one adapter object serves many layers.

    A subclass sets `method` and implements the first four hooks; the rest
    are optional:

    - `get_config()`: its hyperparameters (constructor arguments).
    - `build(kernel, factory)`: creates its variables with
      `factory(name, shape, initializer, regularizer=None)`.
    - `adapted_matrix(weights, matrix)`: the adapted `(d_in, d_out)` matrix
      for the base matrix `matrix` (float32); used for merges, and by the
      default `call`.
    - `num_parameters(kernel)`: parameters for one layer.
    - `validate(kernel)`: raise `ValueError` for a layer it cannot adapt.
    - `delta(weights, kernel, inputs, training)`: for an additive method
      (`additive = True`, `W' = W + delta`), the term it adds to the
      layer's output; several additive adapters on one layer each add
      their term without building a kernel.
    - `call(weights, kernel, inputs, training)`: the layer's output before
      bias and activation, from the inputs the frozen kernel takes. The
      default adds `delta` for additive methods and otherwise projects
      with the materialized adapted kernel.
    - `combine(adapters, coefficients)` and `combined_values(parts,
      kernel)`: a single adapter equal to a weighted combination
      (`ka.combine_adapters`).
    - `reference_matrix(values, matrix)`: a NumPy formula of the adapted
      matrix, checked against `adapted_matrix` and the layer by the shared
      tests.
    - PEFT interop (`ka.interop`): `peft_type` (PEFT's name of the method,
      `"LORA"`), `peft_tensors` (the tensors PEFT stores per module),
      `from_peft_config(config)`, `peft_config()`, `from_peft_tensors(tensors,
      kernel)` and `to_peft_tensors(weights)`.
    - `example()`: a small configuration for the shared test matrix.

    Class attributes: `variable_axes` (for each variable, which dimension of
    the kernel's 2-D view each axis runs along, `"in"`, `"out"` or None; under
    a `keras.distribution` the variable is laid out like those dimensions
    of the kernel), and `roles` (`{role: variable name}`, the variables
    optimizer recipes may select, such as LoRA+'s `"B"` factor).
    """

    method = None
    additive = False
    # The layer kinds the method adapts (`KernelView.kind`: "dense",
    # "einsum_dense", "embedding", "conv"); None for every kind.
    layer_kinds = None
    variable_axes = {}
    roles = {}
    peft_type = None
    peft_tensors = ()

    def get_config(self):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        if not isinstance(config, dict):
            raise ValueError(
                f"The config of a {cls.__name__} adapter must be a dict; "
                f"received {config!r}."
            )
        try:
            return cls(**config)
        except TypeError as error:
            raise ValueError(
                f"Invalid {cls.__name__} config {config!r}: {error}."
            ) from None

    @classmethod
    def example(cls):
        """A small configuration of this method for the shared test matrix."""
        return cls()

    def serialize(self):
        """`{"method": ..., "config": ...}`: JSON-ready."""
        return {"method": self.method, "config": self.get_config()}

    @staticmethod
    def deserialize(data):
        """Inverse of `serialize`."""
        method = data.get("method") if isinstance(data, dict) else None
        if method not in ADAPTER_METHODS:
            raise ValueError(
                f"Unknown adapter method {method!r}; known methods: "
                f"{sorted(ADAPTER_METHODS)}."
            )
        return ADAPTER_METHODS[method].from_config(data.get("config"))

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((self.method, repr(sorted(self.get_config().items()))))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    # Building.

    def for_layer(self, path):
        """The configuration this adapter uses on the layer at `path`.

        `path` is the layer's path relative to the adapted root (as adapter
        groups and files store it). The default is the adapter itself;
        `LowRankAdapter` resolves `rank_pattern` and `alpha_pattern` here.
        `enable_adapter` calls it once per layer, before `validate`.
        """
        return self

    def validate(self, kernel):
        """Raises `ValueError` if this adapter cannot adapt `kernel`'s layer."""

    def check_rank(self, rank, kernel):
        """Raises `ValueError` if `rank > min(d_in, d_out)` of `kernel`."""
        if rank > min(kernel.d_in, kernel.d_out):
            raise ValueError(
                f"{type(self).__name__} rank {rank} is larger than min(d_in, "
                f"d_out) = min({kernel.d_in}, {kernel.d_out}) of layer "
                f"'{kernel.path}'; use a rank <= {min(kernel.d_in, kernel.d_out)}."
            )

    def build(self, kernel, factory):
        raise NotImplementedError

    def num_parameters(self, kernel):
        raise NotImplementedError

    # Computing.

    def adapted_matrix(self, weights, matrix):
        raise NotImplementedError

    def adapted_kernel(self, weights, kernel, base):
        """The adapted kernel in the layer's layout, in float32.

        `base` is the frozen kernel in the layer's layout (`kernel.dense()`
        or the result of the adapters applied before this one).
        """
        matrix = kernel.to_matrix(ops.cast(base, "float32"))
        return kernel.from_matrix(self.adapted_matrix(weights, matrix))

    def delta(self, weights, kernel, inputs, training=None):
        """The term an additive adapter adds to the layer's output."""
        raise NotImplementedError

    def call(self, weights, kernel, inputs, training=None):
        """The layer's output before bias and activation.

        `inputs` are what the frozen kernel takes (on an int8 layer, the
        inputs quantized as Keras would). The default adds `delta` to the
        frozen projection for additive methods, and otherwise projects with
        the adapted kernel built from `kernel.dense()`.
        """
        if self.additive:
            outputs = kernel.project(inputs)
            delta = self.delta(weights, kernel, inputs, training=training)
            return ops.add(outputs, ops.cast(delta, outputs.dtype))
        adapted = self.adapted_kernel(weights, kernel, kernel.dense())
        return kernel.project_with(inputs, adapted)

    def call_transposed(self, weights, kernel, inputs):
        """`x W'^T`: the output of a layer that projects with its kernel
        transposed, before its last steps.

        A KerasHub `ReversibleEmbedding` with tied weights does this with
        `reverse=True` (the output projection of a causal LM onto the
        vocabulary); `kernel` is then an `EmbeddingKernel`. The default adds
        `delta_transposed` to `kernel.project_transposed(x)` for additive
        methods, and otherwise projects with the adapted table.
        """
        if self.additive:
            outputs = kernel.project_transposed(inputs)
            delta = self.delta_transposed(weights, kernel, inputs)
            return ops.add(outputs, ops.cast(delta, outputs.dtype))
        adapted = self.adapted_kernel(weights, kernel, kernel.dense())
        return kernel.project_transposed_with(inputs, adapted)

    def delta_transposed(self, weights, kernel, inputs):
        """`x (W' - W)^T` for an additive method, in float32. The default
        builds `W' - W`; LoRA has a low-rank path."""
        base = ops.cast(kernel.dense(), "float32")
        update = ops.subtract(self.adapted_kernel(weights, kernel, base), base)
        return ops.matmul(ops.cast(inputs, "float32"), ops.transpose(update))

    # Optional hooks.

    @classmethod
    def combine(cls, adapters, coefficients):
        """The adapter equal to `sum_i coefficients[i] * adapters[i]`.

        Returns the new adapter's configuration; `combined_values` then
        gives its variables on each layer. Methods that cannot combine
        raise `ValueError`.
        """
        supported = sorted(
            m for m, c in ADAPTER_METHODS.items() if _overrides(c, "combine")
        )
        raise ValueError(
            f"{cls.__name__} adapters cannot be combined; combine_adapters "
            f"supports the methods {supported}."
        )

    def combined_values(self, parts, kernel):
        """The variables of this combined adapter on one layer.

        Args:
            parts: `[(adapter, weights or None, coefficient)]` for the
                combined adapters; `weights` is None where that adapter
                does not adapt this layer.
            kernel: the layer's frozen kernel.

        Returns:
            `{variable name: value}`.
        """
        raise NotImplementedError

    @classmethod
    def from_peft_config(cls, config):
        """The adapter a PEFT `adapter_config.json` (a dict) describes.

        Raises `ValueError` naming the bad setting.
        """
        raise ValueError(f"{cls.__name__} adapters have no PEFT equivalent.")

    def peft_config(self) -> dict:
        """The method's own settings in a PEFT `adapter_config.json`."""
        raise ValueError(f"{type(self).__name__} adapters have no PEFT equivalent.")

    def from_peft_tensors(self, tensors, kernel) -> dict:
        """`{variable name: value}` from one PEFT module's tensors.

        Args:
            tensors: `{name in peft_tensors: np.ndarray}` in PEFT's layout.
            kernel: the layer's frozen kernel (its 2-D view's shapes).

        Raises:
            ValueError: a tensor has the wrong shape for this layer.
        """
        raise ValueError(f"{type(self).__name__} adapters have no PEFT equivalent.")

    def to_peft_tensors(self, weights) -> dict:
        """`{name in peft_tensors: np.ndarray}` in PEFT's layout."""
        raise ValueError(f"{type(self).__name__} adapters have no PEFT equivalent.")

    def per_example_factors(self, weights, kernel):
        """This adapter on one layer as stackable factors (per-example adapters).

        A method that supports `ka.per_example_adapters` writes its layer's
        output before bias as `(x W + (dropout(x) a) b) * output_scale`: the
        per-example path stacks these pieces for several adapters (padding
        `a` and `b` to the largest rank) and gathers each example's. Only the
        class that defines this hook supports it: a subclass that changes
        the math (DoRA on LoRA) defines its own, or is refused.

        Args:
            weights: the adapter's variables on the layer.
            kernel: the layer's frozen kernel.

        Returns:
            `{"a": (d_in, r), "b": (r, d_out)}` in float32, the scale folded
            into `b`; optionally `"output_scale"`, a `(d_out,)` vector, and
            `"dropout"`, the rate of dropout on `x` in training.
        """
        raise NotImplementedError

    def values_from(self, other, values, kernel):
        """`{variable name: array}` giving this adapter `other`'s update.

        Loads another adapter's weights into a per-example slot of this
        configuration (`PerExampleModel.load_adapter`) without changing the
        slot's shapes, so nothing recompiles. The default accepts an equal
        configuration only.

        Args:
            other: the configuration the values were saved with.
            values: `{variable name: np.ndarray}` of `other` on one layer,
                or None where `other` does not adapt the layer (no update).
            kernel: the layer's frozen kernel.
        """
        if other != self:
            raise ValueError(
                f"Cannot load {other!r} weights into a slot holding {self!r}: "
                f"{type(self).__name__} slots take weights of the same "
                "configuration only."
            )
        if values is None:
            raise ValueError(
                f"The loaded {other!r} does not adapt layer '{kernel.path}', "
                f"which a {type(self).__name__} slot cannot leave unchanged."
            )
        return values

    def reference_matrix(self, values, matrix):
        """The adapted matrix by a NumPy formula (for tests).

        Args:
            values: `{variable name: np.ndarray}`.
            matrix: the `(d_in, d_out)` base matrix, float64.
        """
        raise NotImplementedError


def _check_pattern(name, pattern, check_value):
    """`pattern` (None or `{regex: value}`) as a plain dict, checked."""
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise ValueError(
            f"`{name}` must be a dict {{regex on the layer path: value}} or None; "
            f"received {pattern!r}."
        )
    checked = {}
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise ValueError(
                f"`{name}` keys must be non-empty regex strings; received {key!r}."
            )
        try:
            re.compile(key)
        except re.error as error:
            raise ValueError(
                f"`{name}` key {key!r} is not a valid regular expression: {error}."
            ) from None
        checked[key] = check_value(f"{name}[{key!r}]", value)
    return checked


def pattern_key(pattern, path):
    r"""The first key of `pattern` that matches the layer `path`, or None.

    A key matches when it `re.fullmatch`es the path or a `/`-separated tail
    of it: `"query"`, `"self_attention_layer/query"` and
    `"transformer_layer_0/.*/query"` all match
    `transformer_layer_0/self_attention_layer/query`. This is PEFT's rule for
    `rank_pattern` (`re.match(rf"(.*\.)?({key})$", module_name)`) with `/`
    for `.`.
    """
    for key in pattern:
        if re.fullmatch(rf"(?:.*/)?(?:{key})", path or "") is not None:
            return key
    return None


_RESTORING = [0]


@contextlib.contextmanager
def restoring():
    """Inside: adapters are re-attached to receive saved values.

    Methods whose initialization is computed from the base kernel (PiSSA's
    SVD) may skip it then (`is_restoring()`); the values are overwritten.
    """
    _RESTORING[0] += 1
    try:
        yield
    finally:
        _RESTORING[0] -= 1


def is_restoring() -> bool:
    """Whether adapters are being re-attached from saved values."""
    return _RESTORING[0] > 0


class LowRankAdapter(Adapter):
    """The shared part of methods with low-rank factors `A` `(d_in, rank)`
    (random) and `B` `(rank, d_out)` (zeros): rank, `alpha`, initializers,
    per-layer rank and alpha patterns, the rank check, the parameter count
    and the two factors.

    A subclass names its factors in `factor_names` (LoRA: `lora_a`,
    `lora_b`). Its `scale` is `alpha / rank` (`alpha` defaults to `rank`).

    `rank_pattern` and `alpha_pattern` (`{regex: value}`) give some layers
    another rank or alpha: the first key (in dict order) that matches a
    layer's path (see `pattern_key`) decides; other layers use `rank` and
    `alpha`. `for_layer(path)` returns the resolved configuration (patterns
    cleared), which is what each layer is built and computed with.
    """

    factor_names = ()

    def __init__(
        self,
        rank,
        alpha=None,
        a_initializer="kaiming",
        b_initializer="zeros",
        rank_pattern=None,
        alpha_pattern=None,
    ):
        self.rank = _validation.check_positive_int("rank", rank)
        self.alpha = _check_alpha("alpha", alpha)
        self.a_initializer = check_initializer("a_initializer", a_initializer)
        self.b_initializer = check_initializer("b_initializer", b_initializer)
        self.rank_pattern = _check_pattern(
            "rank_pattern", rank_pattern, _validation.check_positive_int
        )
        self.alpha_pattern = _check_pattern(
            "alpha_pattern", alpha_pattern, _check_positive_number
        )

    def get_config(self):
        """The shared hyperparameters; subclasses add theirs.

        The patterns appear only when set, so configs (and `repr`) without
        them read as before they existed, and a subclass whose constructor
        does not take them still round-trips its configs.
        """
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "a_initializer": self.a_initializer,
            "b_initializer": self.b_initializer,
            **self._pattern_config(),
        }

    def _pattern_config(self):
        config = {}
        if self.rank_pattern:
            config["rank_pattern"] = dict(self.rank_pattern)
        if self.alpha_pattern:
            config["alpha_pattern"] = dict(self.alpha_pattern)
        return config

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def for_layer(self, path):
        if not self.rank_pattern and not self.alpha_pattern:
            return self
        rank_key = pattern_key(self.rank_pattern, path)
        alpha_key = pattern_key(self.alpha_pattern, path)
        config = self.get_config()
        config.pop("rank_pattern", None)
        config.pop("alpha_pattern", None)
        if rank_key is not None:
            config["rank"] = self.rank_pattern[rank_key]
        if alpha_key is not None:
            config["alpha"] = self.alpha_pattern[alpha_key]
        return type(self).from_config(config)

    def validate(self, kernel):
        self.check_rank(self.rank, kernel)

    def num_parameters(self, kernel):
        return self.rank * (kernel.d_in + kernel.d_out)

    def build(self, kernel, factory):
        a, b = self.factor_names
        factory(
            a,
            (kernel.d_in, self.rank),
            factor_initializer(self.a_initializer, self.rank),
        )
        factory(
            b,
            (self.rank, kernel.d_out),
            factor_initializer(self.b_initializer, self.rank),
        )


def _check_positive_number(name, value):
    return _validation.check_number(
        name, value, low=0, low_inclusive=False, allowed="a positive number"
    )


def _check_alpha(name, value):
    return None if value is None else _check_positive_number(name, value)


def _overrides(cls, name):
    return getattr(cls, name).__func__ is not getattr(Adapter, name).__func__


def numpy_values(weights) -> dict:
    """`{variable name: np.ndarray}` of an adapter's weights on a layer."""
    return {
        name: np.asarray(ops.convert_to_numpy(variable))
        for name, variable in weights.items()
    }
