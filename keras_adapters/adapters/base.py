"""The small base every adapter method builds on."""

import keras
from keras import ops

from keras_adapters import distribution
from keras_adapters import quantization

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


def check_number(name, value, low, allowed, *, integer=False, low_inclusive=True):
    """Raises `ValueError` unless `value` is a number (an int if `integer`) >= low.

    With `low_inclusive=False`, `value` must be > low. `allowed` describes
    the accepted values in the message, e.g. "a positive int".
    """
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ValueError(f"`{name}` must be {allowed}; received {value!r}.")
    if value < low or (value == low and not low_inclusive):
        raise ValueError(f"`{name}` must be {allowed}; received {value!r}.")


def check_initializer(name, value):
    """Validates a factor initializer argument and returns its config form.

    Accepts a name in `FACTOR_INITIALIZERS` or anything `keras.initializers.get`
    accepts (name, config dict, object; objects are serialized so the
    adapter's config stays JSON-ready). Raises `ValueError` otherwise.
    """
    if isinstance(value, str) and value in FACTOR_INITIALIZERS:
        return value
    try:
        keras.initializers.get(value)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"`{name}` must be one of {sorted(FACTOR_INITIALIZERS)} or a Keras "
            f"initializer; received {value!r} ({error})."
        ) from None
    if isinstance(value, keras.initializers.Initializer):
        return keras.initializers.serialize(value)
    return value


def factor_initializer(value, rank):
    """The Keras initializer for a value accepted by `check_initializer`."""
    if isinstance(value, str) and value in FACTOR_INITIALIZERS:
        return FACTOR_INITIALIZERS[value](rank)
    return keras.initializers.get(value)


def register_adapter(cls):
    """Class decorator: makes an `Adapter` subclass known by its `method`.

    Registered methods can be rebuilt from adapter files and `.keras` files
    (`Adapter.deserialize`), and are Keras-serializable.
    """
    if not cls.method or cls.method in ADAPTER_METHODS:
        raise ValueError(f"Adapter method name {cls.method!r} is empty or taken.")
    ADAPTER_METHODS[cls.method] = cls
    return keras.saving.register_keras_serializable(package="keras_adapters")(cls)


class Adapter:
    """Base class of adapter configurations (`LoRA`, `HUT`, `QGOFT`, ...).

    An adapter object is a small, immutable description of a method and its
    hyperparameters. `enable_adapter` uses it to create variables on each
    targeted layer and to compute that layer's outputs; the variables live on
    the layer, not on the adapter, so one adapter object serves many layers.

    A subclass sets `method` and implements:

    - `get_config()`: its hyperparameters (constructor arguments);
    - `build(layer, view)`: creates its variables with `self.add_variable`
      and returns their names;
    - `adapted_matrix(layer, matrix)`: the adapted `(d_in, d_out)` kernel,
      used for merging (exact) and by the default `call`;
    - `num_parameters(view)`: adapter parameters for one layer.

    It may override `call(layer, view, inputs, training)` with a faster path
    that does not materialize the adapted kernel, `validate(layer, view)` to
    reject layers it cannot adapt, and `release(layer)` to drop extra state.
    An additive method (`W' = W + delta`, like LoRA) sets `additive = True`
    and implements `delta(layer, view, inputs, training)`, the term it adds
    to the layer's output; several additive adapters active on one layer
    then each add their term without building the kernel.

    The `layer` these methods receive is the adapter's
    `keras_adapters.layers.AdapterSlot` on the layer: it reads like the
    layer, and `layer.<variable name>` is this adapter's variable.
    """

    method = None
    additive = False
    # For each variable `build` creates, which dimension of the kernel's 2-D
    # view each of its axes runs along: "in" (d_in), "out" (d_out) or None.
    # Under a keras.distribution, adapter variables are laid out like those
    # dimensions of the kernel (see keras_adapters.distribution); a variable
    # not listed gets Keras' default layout.
    variable_axes = {}

    def get_config(self):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)

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
        return ADAPTER_METHODS[method].from_config(data["config"])

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((self.method, repr(sorted(self.get_config().items()))))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def validate(self, layer, view):
        """Raises `ValueError` if this adapter cannot adapt `layer`."""

    def build(self, layer, view):
        raise NotImplementedError

    def num_parameters(self, view):
        raise NotImplementedError

    def add_variable(self, layer, name, shape, initializer, regularizer=None):
        """Creates a float32 adapter variable `name` on `layer`.

        Adapter variables are never autocast, so adapter math stays float32
        under mixed precision. A `regularizer` (a Keras regularizer) adds its
        penalty to the model's losses, which `model.fit` minimizes. Under a
        `keras.distribution`, the variable is laid out like the kernel, as
        `variable_axes[name]` says.
        """
        axes = self.variable_axes.get(name)
        base_layer, qualified = layer.layer, layer.qualified(name)
        with distribution.variable_layout_scope(base_layer, qualified, shape, axes):
            variable = base_layer.add_weight(
                name=qualified,
                shape=shape,
                initializer=initializer,
                regularizer=regularizer,
                dtype="float32",
                autocast=False,
                trainable=True,
            )
        setattr(layer, name, variable)
        return variable

    def adapted_matrix(self, layer, matrix):
        raise NotImplementedError

    def adapted_kernel(self, layer, view, kernel):
        """The adapted kernel in the layer's layout, computed in float32."""
        matrix = view.to_matrix(ops.cast(kernel, "float32"))
        return view.from_matrix(self.adapted_matrix(layer, matrix))

    def call(self, layer, view, inputs, training=None):
        """The layer's output before bias and activation.

        The default materializes the adapted kernel. On an int8/int4 layer
        it starts from the dequantized kernel and feeds the inputs the layer
        would use (see `keras_adapters.quantization`).
        """
        inputs = quantization.quantize_inputs(layer, inputs)
        base = quantization.float_kernel(layer, view)
        kernel = self.adapted_kernel(layer, view, base)
        return view.project(inputs, ops.cast(kernel, layer.compute_dtype))

    def delta(self, layer, view, inputs, training=None):
        """The term an additive adapter adds to the layer's output."""
        raise NotImplementedError

    def release(self, layer):
        """Drops state other than what it set on `layer` (that goes anyway)."""
