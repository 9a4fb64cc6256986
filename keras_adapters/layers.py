"""How adapters attach to a Keras layer (`Dense`, `EinsumDense`, `Embedding`,
`Conv1D`/`Conv2D`/`Conv3D`).

An adapter never wraps or replaces a layer: the layer object stays where it is
(inside a KerasHub attention block, say), gains the adapters' variables, and
switches to a cached subclass of its own class whose `call` lets the active
adapters take part. That `call` is the only dispatcher: it prepares the inputs
the frozen kernel takes, then lets one adapter compute the output, adds the
terms of several additive ones, or projects with the composed kernel, and
finishes as the layer does (bias, activation); a tied `ReversibleEmbedding`
called with `reverse=True` goes through the adapters' transposed path. Several
named adapters can share a layer (see `AdapterSlot`). Merging folds an adapter
into the kernel; when the last one goes, the layer switches back to its
original class. See `docs/how_adapters_attach.md`.
"""

import contextlib
import contextvars

import keras
from keras import ops

from keras_adapters import _keras_internals as internals
from keras_adapters import placement
from keras_adapters.kernels import LAYER_KINDS
from keras_adapters.kernels import SUPPORTED_LAYERS
from keras_adapters.kernels import KernelView
from keras_adapters.kernels import UnsupportedLayerError
from keras_adapters.kernels import adapts_kind
from keras_adapters.kernels import frozen_kernel

__all__ = [
    "DEFAULT_NAME",
    "SUPPORTED_LAYERS",
    "AdapterSlot",
    "KernelView",
    "UnsupportedLayerError",
    "adapter_variables",
    "attach",
    "check_kind",
    "check_supported",
    "composed_kernel",
    "detach",
    "dispatching",
    "is_adapted",
    "planned_variables",
    "slots",
]

DEFAULT_NAME = "default"


# While set, a function `(layer, kernel, inputs, training) -> outputs` that
# computes every adapted layer's output before bias and activation, in place
# of its active adapters: per-example adapters (`keras_adapters.per_example`)
# route each example through its own adapter this way, inside the trace of
# the model's call.
_DISPATCH = contextvars.ContextVar("keras_adapters_dispatch", default=None)


@contextlib.contextmanager
def dispatching(dispatch):
    """Adapted layers called in this context compute with `dispatch`."""
    token = _DISPATCH.set(dispatch)
    try:
        yield
    finally:
        _DISPATCH.reset(token)


def check_supported(layer):
    """Raises `UnsupportedLayerError` if no adapter can attach to `layer`.

    A layer that already has adapters can take more (under other names).

    Returns:
        The layer's frozen kernel (`keras_adapters.kernels.FloatKernel` or
        `QuantizedKernel`).
    """
    if is_adapted(layer):
        return layer._keras_adapters_kernel
    kernel = frozen_kernel(layer)
    if getattr(layer, "lora_enabled", False):
        raise UnsupportedLayerError(
            f"Layer '{layer.path}' has Keras' built-in LoRA enabled; "
            "keras_adapters does not stack on it."
        )
    if getattr(layer, "kernel_constraint", None) is not None:
        raise UnsupportedLayerError(
            f"Layer '{layer.path}' has a kernel constraint, which an adapted "
            "kernel would not respect."
        )
    return kernel


def check_kind(adapter, kernel):
    """Raises `UnsupportedLayerError` if `adapter`'s method does not adapt
    layers of `kernel`'s kind (`Adapter.layer_kinds`)."""
    kinds = adapter.layer_kinds
    if not adapts_kind(kinds, kernel.kind):
        adapted = [k for k in LAYER_KINDS if adapts_kind(kinds, k)]
        raise UnsupportedLayerError(
            f"Layer '{kernel.path}' is a{'n' if kernel.kind[0] in 'ae' else ''} "
            f"{kernel.kind} layer, which {type(adapter).__name__} does not "
            f"adapt; it adapts {', '.join(adapted)} layers."
        )


def is_adapted(layer):
    return isinstance(layer, _AdaptedLayer)


class AdapterSlot:
    """One named adapter on one layer: what the adapter's methods get as
    `weights`.

    `slot["lora_a"]` is the adapter's variable `lora_a` on this layer. On the
    layer it lives under a qualified name: `lora_a` for the adapter named
    `"default"`, `lora_a.news` for the adapter named `"news"`, so several
    adapters can share a layer and their variable paths say which adapter
    they belong to.

    Attributes:
        layer: the adapted layer.
        name: the adapter's name.
        adapter: the adapter configuration.
        kernel: the layer's frozen kernel.
        active: whether the layer applies this adapter.
        attributes: `{short name: qualified layer attribute}`.
    """

    def __init__(self, layer, name, adapter, kernel):
        self.layer = layer
        self.name = name
        self.adapter = adapter
        self.kernel = kernel
        self.active = True
        self.attributes = {}

    def qualified(self, short_name):
        """The layer attribute (and variable name) for `short_name`."""
        if self.name == DEFAULT_NAME:
            return short_name
        return f"{short_name}.{self.name}"

    def __getitem__(self, short_name):
        return getattr(self.layer, self.attributes[short_name])

    def __contains__(self, short_name):
        return short_name in self.attributes

    def items(self):
        """`(short name, variable)` of this adapter's variables."""
        return [
            (short, self[short])
            for short in self.attributes
            if isinstance(self[short], keras.Variable)
        ]

    def variables(self):
        """`{qualified name: variable}` of this adapter's variables."""
        return {self.attributes[short]: variable for short, variable in self.items()}

    def __repr__(self):
        return (
            f"<AdapterSlot {self.name!r} on '{self.layer.path}': "
            f"{self.adapter!r}, active={self.active}>"
        )


class _VariableFactory:
    """What `Adapter.build` gets to create its variables on one layer.

    `factory(name, shape, initializer, regularizer=None, trainable=True)`
    creates a float32 variable laid out by `keras_adapters.placement` (under
    a `keras.distribution`, like the kernel dimensions the method's
    `variable_axes` names). On a stacked kernel (`kernel.stack_shape`, the
    experts of an MoE layer) the variable gets the stack axes in front: one
    `shape` per expert. `trainable=False` makes a constant the method
    keeps with the layer (saved and restored with the adapter, never
    trained), such as LoRA's initial factors under PiSSA.
    """

    def __init__(self, slot):
        self._slot = slot

    def __call__(self, name, shape, initializer, regularizer=None, trainable=True):
        slot = self._slot
        qualified = slot.qualified(name)
        stack = tuple(slot.kernel.stack_shape)
        shape = stack + tuple(int(d) for d in shape)
        axes = slot.adapter.variable_axes.get(name)
        if axes is not None and stack:
            axes = (placement.STACK,) * len(stack) + tuple(axes)
        layout = placement.variable_layout(slot.kernel, qualified, shape, axes)
        variable = internals.add_variable(
            slot.layer,
            qualified,
            shape,
            keras.initializers.get(initializer),
            regularizer=regularizer,
            layout=layout,
            trainable=trainable,
        )
        slot.attributes[name] = qualified
        return variable

    def seed_generator(self, name):
        """A `keras.random.SeedGenerator` tracked by the layer (for dropout)."""
        slot = self._slot
        qualified = slot.qualified(name)
        generator = keras.random.SeedGenerator()
        internals.set_tracked_attribute(slot.layer, qualified, generator)
        slot.attributes[name] = qualified
        return generator


class _ShapeRecorder:
    """A factory that records the variables `build` would create."""

    def __init__(self, slot):
        self._slot = slot
        self.shapes = {}

    def __call__(self, name, shape, initializer, regularizer=None, trainable=True):
        stack = tuple(self._slot.kernel.stack_shape)
        self.shapes[self._slot.qualified(name)] = stack + tuple(int(d) for d in shape)

    def seed_generator(self, name):
        return None


def planned_variables(layer, adapter, name=DEFAULT_NAME):
    """`{qualified variable name: shape}` that `attach` would create.

    Changes nothing; used to check a file against a model before loading.
    """
    kernel = check_supported(layer)
    recorder = _ShapeRecorder(AdapterSlot(layer, name, adapter, kernel))
    adapter.build(kernel, recorder)
    return recorder.shapes


def slots(layer):
    """`{name: AdapterSlot}` of `layer`, in the order adapters were attached."""
    return dict(getattr(layer, "_keras_adapters_slots", {}))


def attach(layer, adapter, kernel, name):
    """Adds adapter `name` (its variables) to `layer`.

    `check_supported(layer)` (which returned `kernel`) and
    `adapter.validate(kernel)` must have passed. The first adapter also
    switches the layer's class.
    """
    slot = AdapterSlot(layer, name, adapter, kernel)
    with internals.unlocked_tracker(layer):
        layer.trainable = True
        adapter.build(kernel, _VariableFactory(slot))
    if not is_adapted(layer):
        internals.set_untracked_attribute(layer, "_keras_adapters_kernel", kernel)
        internals.set_untracked_attribute(layer, "_keras_adapters_slots", {})
        internals.set_untracked_attribute(
            layer,
            "_keras_adapters_training_argument",
            internals.pass_training_argument(layer),
        )
        mixin = (
            _AdaptedEmbedding
            if isinstance(layer, keras.layers.Embedding)
            else _AdaptedLayer
        )
        internals.switch_class(layer, mixin, serialize_as_base=True)
        kernel.on_first_attach()
    layer._keras_adapters_slots[name] = slot
    return slot


def adapter_variables(layer, names=None):
    """`{qualified name: variable}` of the adapters on `layer`.

    Args:
        layer: an adapted layer.
        names: adapter names to include; all by default.
    """
    return {
        qualified: variable
        for name, slot in slots(layer).items()
        if names is None or name in names
        for qualified, variable in slot.variables().items()
    }


def composed_kernel(layer, active_slots):
    """The kernel with `active_slots` applied in order, in float32.

    On an int8/int4 layer, it starts from the dequantized kernel.
    """
    kernel = layer._keras_adapters_kernel
    base = kernel.dense()
    if len(active_slots) == 1:
        slot = active_slots[0]
        return slot.adapter.adapted_kernel(slot, kernel, base)
    matrix = kernel.to_matrix(ops.cast(base, "float32"))
    for slot in active_slots:
        matrix = slot.adapter.adapted_matrix(slot, matrix)
    return kernel.from_matrix(matrix)


def detach(layer, name, merge):
    """Removes adapter `name` from `layer`, first folding it in if `merge`.

    The last adapter to go also restores the layer's class.
    """
    slot = layer._keras_adapters_slots[name]
    if merge:
        slot.kernel.assign(composed_kernel(layer, [slot]))
    for qualified in slot.attributes.values():
        value = getattr(layer, qualified)
        if isinstance(value, keras.Variable):
            internals.untrack_variable(layer, value)
        internals.untrack_attribute(layer, qualified)
    del layer._keras_adapters_slots[name]
    if not layer._keras_adapters_slots:
        internals.restore_training_argument(
            layer, layer._keras_adapters_training_argument
        )
        for attribute in ("kernel", "slots", "training_argument"):
            object.__delattr__(layer, f"_keras_adapters_{attribute}")
        internals.restore_class(layer)
        slot.kernel.on_last_detach()


class _AdaptedLayer(internals.QuantizeHooks):
    """Methods an adapted layer gets while it has adapters."""

    def _active_slots(self):
        return [s for s in self._keras_adapters_slots.values() if s.active]

    @property
    def kernel(self):
        """The effective (adapted) kernel, as Keras' own LoRA exposes it."""
        active = self._active_slots()
        if not active:
            return self._keras_adapters_kernel.dense()
        return composed_kernel(self, active)

    def _refuse_quantize_error(self):
        return ValueError(
            f"Layer '{self.path}' has an adapter; quantize before "
            "enable_adapter() (quantize, then adapt), or merge_adapters() first."
        )

    def call(self, inputs, training=None, **kwargs):
        kernel = self._keras_adapters_kernel
        mode = kernel.call_mode(**kwargs)
        if mode == "base":
            # A call that does not use the adapted kernel (the reverse
            # projection of an untied `ReversibleEmbedding`).
            return super().call(inputs, **kwargs)
        active = self._active_slots()
        if mode == "transposed":
            # On an int8 table: the hidden states quantized as Keras would.
            inputs = kernel.prepare_transposed_inputs(inputs)
            return kernel.finish_transposed(_transposed(self, kernel, active, inputs))
        # On an int8 layer: the inputs quantized as Keras would (else `x`).
        inputs = kernel.prepare_inputs(inputs)
        if kernel.index_inputs:
            # Lookups take no adapter dropout (token ids are not features;
            # PEFT's embedding LoRA has none either).
            training = None
        dispatch = _DISPATCH.get()
        if dispatch is not None:
            outputs = dispatch(self, kernel, inputs, training)
        elif len(active) == 1:
            slot = active[0]
            outputs = slot.adapter.call(slot, kernel, inputs, training=training)
        elif all(slot.adapter.additive for slot in active):
            # No adapter, or only additive ones (LoRA): each adds its own
            # term to the frozen projection, without building a kernel.
            outputs = kernel.project(inputs)
            for slot in active:
                delta = slot.adapter.delta(slot, kernel, inputs, training=training)
                outputs = ops.add(outputs, ops.cast(delta, outputs.dtype))
        else:
            outputs = kernel.project_with(inputs, composed_kernel(self, active))
        return kernel.finish(outputs, inputs)

    def _base_variables(self):
        names = set(adapter_variables(self))
        return [v for v in self.weights if v.name not in names]

    def save_own_variables(self, store):
        # The base variables keep the keys Keras gives them ("0", "1"), so a
        # file written here is the base layer's file plus adapter entries.
        for i, variable in enumerate(self._base_variables()):
            store[str(i)] = variable
        for name, variable in adapter_variables(self).items():
            store[name] = variable

    def load_own_variables(self, store):
        base = self._base_variables()
        adapters = adapter_variables(self)
        keys = set(store.keys())
        expected = {str(i) for i in range(len(base))} | set(adapters)
        if keys != expected:
            raise ValueError(
                f"Layer '{self.path}' has the adapters "
                f"{list(self._keras_adapters_slots)} and expects the entries "
                f"{sorted(expected)}, but the file has {sorted(keys)}. Was the "
                "file written by a model with the same adapters?"
            )
        for i, variable in enumerate(base):
            variable.assign(store[str(i)])
        for name, variable in adapters.items():
            variable.assign(store[name])


def _transposed(layer, kernel, active, inputs):
    """`x W'^T`: the active adapters on a tied reverse projection."""
    if _DISPATCH.get() is not None:
        raise UnsupportedLayerError(
            f"Layer '{layer.path}' projects with its table transposed "
            "(reverse=True); per-example adapters do not support that."
        )
    if len(active) == 1:
        slot = active[0]
        return slot.adapter.call_transposed(slot, kernel, inputs)
    if all(slot.adapter.additive for slot in active):
        outputs = kernel.project_transposed(inputs)
        for slot in active:
            delta = slot.adapter.delta_transposed(slot, kernel, inputs)
            outputs = ops.add(outputs, ops.cast(delta, outputs.dtype))
        return outputs
    return kernel.project_transposed_with(inputs, composed_kernel(layer, active))


class _AdaptedEmbedding(_AdaptedLayer):
    """Methods an `Embedding` layer gets while it has adapters."""

    @property
    def embeddings(self):
        """The effective (adapted) table, as Keras' own LoRA exposes it."""
        return self.kernel
