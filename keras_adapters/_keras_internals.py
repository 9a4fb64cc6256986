"""Every use of private Keras internals, in one place.

keras_adapters attaches adapters to layers that already exist inside a model
(for example the `query` projection held by a KerasHub attention block). Keras
has no public API for that, so this module does the few private things it
takes, the same way Keras' own `enable_lora` does:

- add or remove variables on a built layer (its variable tracker is locked
  after `build`);
- switch a layer or model to a subclass of its own class, cached per class,
  that serializes exactly as the original class;
- walk a model's layer tree with parents;
- read a projection's kernel variable, and let adapted layers answer Keras'
  quantization hooks;
- drop a model's compiled functions (KerasHub's `generate_function` too);
- the optimizer internals per-variable learning rates use.

`tests/test_keras_internals.py` pins these behaviours for the supported Keras
versions (`keras>=3.15`).
"""

import contextlib

import keras
from keras.src import api_export
from keras.src.saving import object_registration
from keras.src.saving import serialization_lib

_SUBCLASS_CACHE = {}


@contextlib.contextmanager
def unlocked_tracker(layer):
    """Lets `add_weight` and attribute tracking work on a built layer."""
    was_locked = layer._tracker.locked
    layer._tracker.unlock()
    try:
        yield
    finally:
        if was_locked:
            layer._tracker.lock()


def untrack_variable(layer, variable):
    """Removes a variable added with `add_weight` from `layer`."""
    layer._untrack_variable(variable)


def untrack_attribute(layer, name):
    """Deletes attribute `name` of `layer` and stops tracking its value."""
    value = getattr(layer, name)
    with unlocked_tracker(layer):
        layer._tracker.untrack(value)
    object.__delattr__(layer, name)


def set_untracked_attribute(layer, name, value):
    """Sets a plain Python attribute that Keras' tracker must not wrap."""
    object.__setattr__(layer, name, value)


def switch_class(obj, mixin, *, serialize_as_base):
    """Switches `obj` to a cached subclass `(mixin, type(obj))`.

    Args:
        obj: the layer or model.
        mixin: the class whose methods override those of `type(obj)`.
        serialize_as_base: if True, the subclass serializes exactly as
            `type(obj)` (same module, name and registered name), so configs
            and `.keras` files written while it is active name the original
            class. If False, the subclass keeps the serialization names the
            mixin was registered with.
    """
    base = type(obj)
    key = (mixin, base)
    if key not in _SUBCLASS_CACHE:
        name = base.__name__ if serialize_as_base else f"Adapted{base.__name__}"
        subclass = type(name, (mixin, base), {})
        if serialize_as_base:
            subclass.__module__ = base.__module__
            subclass.__qualname__ = base.__qualname__
            if base in api_export.REGISTERED_OBJS_TO_NAMES:
                api_export.REGISTERED_OBJS_TO_NAMES[subclass] = (
                    api_export.REGISTERED_OBJS_TO_NAMES[base]
                )
            if base in object_registration.GLOBAL_CUSTOM_NAMES:
                object_registration.GLOBAL_CUSTOM_NAMES[subclass] = (
                    object_registration.GLOBAL_CUSTOM_NAMES[base]
                )
        else:
            object_registration.GLOBAL_CUSTOM_NAMES[subclass] = (
                object_registration.get_registered_name(mixin)
            )
        subclass._keras_adapters_base_class = base
        _SUBCLASS_CACHE[key] = subclass
    obj.__class__ = _SUBCLASS_CACHE[key]


def restore_class(obj):
    """Undoes `switch_class`."""
    obj.__class__ = obj._keras_adapters_base_class


def base_class(obj):
    """The class `obj` had before `switch_class` (or its class)."""
    return getattr(type(obj), "_keras_adapters_base_class", type(obj))


def serialize_class_config(cls, config):
    """What `keras.saving.serialize_keras_object` writes for class `cls`."""
    public = serialization_lib.serialize_with_public_class(cls, config)
    if public is not None:
        return public
    return {
        "module": cls.__module__,
        "class_name": cls.__name__,
        "config": config,
        "registered_name": object_registration.get_registered_name(cls),
    }


def is_deserializable(cls):
    """Whether `keras.saving.load_model` can find `cls` again by name."""
    return (
        api_export.get_name_from_symbol(cls) is not None
        or cls in object_registration.GLOBAL_CUSTOM_NAMES
        or cls.__module__.split(".")[0] in ("keras", "keras_hub")
    )


# Functions `layer -> [child layer]` giving children a layer does not track
# (the projections of a KerasHub experts layer, `kernels.experts`).
_CHILD_LAYERS = []


def register_child_layers(children):
    """Makes `layers_with_parents` also yield `children(layer)` below each
    layer."""
    _CHILD_LAYERS.append(children)


def _children(layer):
    children = list(layer._layers)
    for extra in _CHILD_LAYERS:
        children += [c for c in extra(layer) if all(c is not k for k in children)]
    return children


def layers_with_parents(model):
    """Yields `(layer, parent)` for every layer below `model`, parents first.

    The parent of a layer is the layer that holds it (for a KerasHub
    attention projection, the attention layer). Each layer appears once.
    """
    seen = {id(model)}
    stack = [(layer, model) for layer in reversed(model._layers)]
    while stack:
        layer, parent = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        yield layer, parent
        stack.extend((child, layer) for child in reversed(_children(layer)))


def reset_compiled_functions(model):
    """Drops a model's cached train/test/predict (and generate) functions.

    They capture the variable lists and the layers' classes, which change
    when adapters are added, merged or switched. A KerasHub `CausalLM`
    caches its `generate()` function as `generate_function`.
    """
    names = ("train_function", "test_function", "predict_function")
    for name in names + ("generate_function",):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


def optimizer_tracks(optimizer, variables):
    """Whether a built optimizer was built for exactly `variables`.

    True when it cannot tell (an optimizer without Keras' variable index).
    """
    known = getattr(optimizer, "_trainable_variables_indices", None)
    if not known:
        return True
    return len(known) == len(variables) and all(
        optimizer._var_key(v) in known for v in variables
    )


def variable_layout(variable):
    """The `keras.distribution` layout a variable was created with, or None.

    On JAX, a variable created while a distribution is active keeps the
    `TensorLayout` it was given (`Variable(layout=...)` or the distribution's
    `get_variable_layout`) in `_layout`.
    """
    return getattr(variable, "_layout", None)


def replace_quantized_kernel(layer, kernel, source_policy):
    """Turns an int8/int4 `Dense`/`EinsumDense`/`Embedding` back into a float
    layer.

    Deletes the integer kernel (an embedding's table) and its scale (and
    zero point and group indices), sets the float dtype policy the layer was
    quantized from (`source_policy`), and creates a float kernel holding
    `kernel`. A bias is re-created after it, so the variables come in a
    freshly built float layer's order (kernel, bias). Keras' own `quantize`
    removes variables the same way (`del layer._kernel` with the tracker
    unlocked).
    """
    embedding = isinstance(layer, keras.layers.Embedding)
    bias = None if embedding else getattr(layer, "bias", None)
    bias_value = None if bias is None else bias.numpy()
    if embedding:
        names = ["_embeddings", "embeddings_scale", "embeddings_zero", "g_idx"]
        attributes = ("inputs_quantizer", "_int4_block_size", "_orig_output_dim")
    else:
        names = ["_kernel", "kernel_scale", "kernel_zero", "g_idx"]
        attributes = ("inputs_quantizer", "_int4_block_size")
    with unlocked_tracker(layer):
        for name in names + ([] if bias is None else ["bias"]):
            if hasattr(layer, name):
                # What `del layer.<name>` does, without the full
                # `gc.collect()` Keras' `Layer.__delattr__` runs each time.
                untrack_variable(layer, getattr(layer, name))
                object.__delattr__(layer, name)
        for name in attributes:
            if hasattr(layer, name):
                object.__delattr__(layer, name)
        layer.quantization_config = None
        layer._is_quantized = False
        layer.dtype_policy = source_policy
        if embedding:
            layer._embeddings = _float_weight(
                layer,
                "embeddings",
                kernel,
                layer.embeddings_regularizer,
                layer.embeddings_constraint,
            )
            return
        layer._kernel = _float_weight(
            layer, "kernel", kernel, layer.kernel_regularizer, layer.kernel_constraint
        )
        if bias_value is not None:
            layer.bias = _float_weight(
                layer, "bias", bias_value, layer.bias_regularizer, layer.bias_constraint
            )


def _float_weight(layer, name, value, regularizer, constraint):
    """A new float variable of `layer` holding `value`."""
    variable = layer.add_weight(
        name=name,
        shape=tuple(value.shape),
        initializer="zeros",
        regularizer=regularizer,
        constraint=constraint,
    )
    variable.assign(value)
    return variable


def quantize_layer(layer, mode, config):
    """`layer.quantize(mode, config=config)`, also for a layer in a policy map.

    A model rebuilt from a config keeps its layers' policies in one shared
    `DTypePolicyMap`, and Keras' `quantize` then names the new policy after
    the map ("int8_from_map_float32") and fails. The layer is quantized with
    its own policy, and the map entry is updated after. Keras' `quantize`
    refuses subclasses unless `type_check=False` (KerasHub's
    `ReversibleEmbedding` is one); the layer was quantized before, so its
    class supports it.
    """
    from keras.src.dtype_policies.dtype_policy_map import DTypePolicyMap

    policy_map = layer._dtype_policy
    if not isinstance(policy_map, DTypePolicyMap):
        layer.quantize(mode, type_check=False, config=config)
        return
    layer._dtype_policy = policy_map[layer.path]
    try:
        layer.quantize(mode, type_check=False, config=config)
    finally:
        quantized = layer._dtype_policy
        layer._dtype_policy = policy_map
        if layer.path in policy_map:
            del policy_map[layer.path]
        policy_map[layer.path] = quantized


def kernel_variable(layer):
    """The variable holding a layer's own kernel (an embedding's table).

    `Dense`, `EinsumDense` and the convolutions store it as `_kernel`,
    `Embedding` as `_embeddings`. Their public `kernel` / `embeddings`
    properties are what an adapted layer overrides (the effective kernel,
    as Keras' own LoRA does), so the stored variable is read here.
    """
    if isinstance(layer, keras.layers.Embedding):
        return layer._embeddings
    return layer._kernel


def pass_training_argument(layer):
    """Makes Keras pass `training` to `layer.call`, also where the layer's
    own `call` has no such argument (`Conv2D`, `Embedding`).

    Keras decides once, from the signature of the class's `call` when the
    layer is created, whether to pass `training` (`_call_has_context_arg`);
    an adapted layer's `call` takes it (adapter dropout needs it). Returns
    the previous setting for `restore_training_argument`.
    """
    previous = dict(layer._call_has_context_arg)
    object.__setattr__(layer, "_call_has_context_arg", {**previous, "training": True})
    return previous


def restore_training_argument(layer, previous):
    """Undoes `pass_training_argument`."""
    object.__setattr__(layer, "_call_has_context_arg", dict(previous))


def set_keras_mask(outputs, mask):
    """Attaches a Keras mask to `outputs`, as `ReversibleEmbedding.call`
    does for `mask_zero`."""
    from keras.src.backend import set_keras_mask as set_mask

    set_mask(outputs, mask)


def set_tracked_attribute(layer, name, value):
    """`setattr(layer, name, value)` on a built layer, tracked by Keras.

    A variable or `SeedGenerator` set this way becomes part of the layer's
    weights (and is saved, distributed and trained like them).
    """
    with unlocked_tracker(layer):
        setattr(layer, name, value)


def add_variable(
    layer, name, shape, initializer, regularizer=None, layout=None, trainable=True
):
    """Creates a float32 variable `name` (trainable by default) on a built
    `layer`.

    What `layer.add_weight` does, plus an explicit distribution `layout`
    (`keras.Variable(layout=...)`; `add_weight` has no such argument): the
    variable's path is `<layer.path>/<name>`, it is never autocast (adapter
    math stays float32 under mixed precision), and its `regularizer` adds
    to the layer's losses.
    """
    with keras.name_scope(layer.name, caller=layer):
        variable = keras.Variable(
            initializer=initializer,
            shape=shape,
            dtype="float32",
            trainable=trainable,
            autocast=False,
            name=name,
            layout=layout,
        )
    variable.regularizer = regularizer
    set_tracked_attribute(layer, name, variable)
    return variable


class QuantizeHooks:
    """What an adapted layer answers to Keras' quantization hooks.

    Keras routes a quantized layer's `__call__` to `quantized_call` instead
    of `call`; an adapted layer handles its quantized kernel itself (through
    `keras_adapters.kernels.QuantizedKernel`), so it goes to `call`. Keras
    checks `layer.quantize(...)` arguments with `_check_quantize_args`
    before changing anything; an adapted layer refuses there
    (`_refuse_quantize_error` is the subclass's).
    """

    def quantized_call(self, *args, **kwargs):
        return self.call(*args, **kwargs)

    def _check_quantize_args(self, mode, compute_dtype):
        raise self._refuse_quantize_error()


def guard_model_quantize(model, check):
    """Runs `check(model)` before `model.quantize(...)` changes anything.

    Keras' `Model.quantize` checks its arguments with the model's
    `_check_quantize_args` first; the guard wraps it with an instance
    attribute, once per model. `check` raises to refuse.
    """
    if getattr(model, "_keras_adapters_quantize_guard", False):
        return
    original = model._check_quantize_args

    def check_quantize_args(mode, compute_dtype):
        check(model)
        return original(mode, compute_dtype)

    object.__setattr__(model, "_check_quantize_args", check_quantize_args)
    object.__setattr__(model, "_keras_adapters_quantize_guard", True)


def optimizer_variable_index(optimizer, variable):
    """The index of `variable` among the variables `optimizer` was built for."""
    return optimizer._get_variable_index(variable)


def optimizer_iterations_variable(optimizer):
    """The variable counting `optimizer`'s iterations (what
    `apply_gradients` returns)."""
    return optimizer._iterations


def override_optimizer_updates(optimizer, wrap_update_step, wrap_weight_decay):
    """Routes one optimizer instance's updates through wrappers.

    Every Keras optimizer updates variable `v` in
    `update_step(gradient, v, learning_rate)` and applies decoupled weight
    decay in `_apply_weight_decay(variables)`. The instance gets its own
    versions: `wrap_update_step(original)` and `wrap_weight_decay(original)`
    return them, `original` being the class's method bound to `optimizer`.
    """
    cls = type(optimizer)
    update_step = cls.update_step.__get__(optimizer)
    apply_weight_decay = cls._apply_weight_decay.__get__(optimizer)
    object.__setattr__(optimizer, "update_step", wrap_update_step(update_step))
    object.__setattr__(
        optimizer, "_apply_weight_decay", wrap_weight_decay(apply_weight_decay)
    )
