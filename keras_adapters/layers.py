"""How an adapter attaches to a Keras `Dense` or `EinsumDense` layer.

An adapter never wraps or replaces a layer: the layer object stays where it is
(inside a KerasHub attention block, say), gains the adapters' variables, and
switches to a cached subclass of its own class whose `call` lets the active
adapters take part. Several named adapters can share a layer (see
`AdapterSlot`). Merging folds an adapter into the kernel; when the last one
goes, the layer switches back to its original class. See `docs/how_adapters_attach.md`.
"""

import math
import string

import keras
from keras import ops

from keras_adapters import _keras_internals as internals
from keras_adapters import quantization

SUPPORTED_LAYERS = (keras.layers.Dense, keras.layers.EinsumDense)


class UnsupportedLayerError(ValueError):
    """Raised when an adapter cannot attach to a layer."""


class KernelView:
    """The 2-D (input axes x output axes) view of a projection kernel.

    A `Dense` kernel is already a `(d_in, d_out)` matrix. An `EinsumDense`
    kernel can have more axes: KerasHub's BERT query kernel is
    `(hidden, heads, head_dim)` and Gemma's is `(heads, hidden, head_dim)`.
    Its axes that contract with the inputs are the input axes, the ones that
    reach the outputs are the output axes, and the 2-D view is the kernel
    transposed to (input axes, output axes) and reshaped to
    `(prod(input sizes), prod(output sizes))`. This is the matrix of the
    flattened projection, the one Hugging Face PEFT factorizes.

    Args:
        layer: a built `Dense` or `EinsumDense` layer.
    """

    def __init__(self, layer):
        # The logical shape: int4 kernels are stored packed.
        kernel_shape = quantization.logical_kernel_shape(layer)
        self.kernel_shape = kernel_shape
        if isinstance(layer, keras.layers.EinsumDense):
            self.equation = layer.equation.replace(" ", "")
            inputs, rest = self.equation.split(",")
            kernel, outputs = rest.split("->")
            self._inputs, self._kernel, self._outputs = inputs, kernel, outputs
            bad = [c for c in kernel if (c in inputs) == (c in outputs)]
            if "." in kernel or bad or len(set(kernel)) != len(kernel):
                raise UnsupportedLayerError(
                    f"EinsumDense equation '{layer.equation}' is not a plain "
                    "projection: every kernel axis must contract with the "
                    "inputs or reach the outputs, not both or neither."
                )
            in_axes = [i for i, c in enumerate(kernel) if c in inputs]
            out_axes = [i for i, c in enumerate(kernel) if c in outputs]
            self._batch = "".join(c for c in inputs if c not in kernel)
            leftover = set(outputs) - set(self._batch) - set(kernel)
            if leftover or set(self._batch.replace(".", "")) - set(outputs):
                raise UnsupportedLayerError(
                    f"EinsumDense equation '{layer.equation}' is not a plain "
                    "projection: its non-kernel input axes must all reach "
                    "the outputs."
                )
            free = [c for c in string.ascii_letters if c not in self.equation]
            self._rank_letter = free[0]
        else:
            self.equation = None
            in_axes, out_axes = [0], [1]
        self.perm = tuple(in_axes + out_axes)
        self.inverse_perm = tuple(
            sorted(range(len(self.perm)), key=self.perm.__getitem__)
        )
        self.in_shape = tuple(kernel_shape[i] for i in in_axes)
        self.out_shape = tuple(kernel_shape[i] for i in out_axes)
        self.d_in = math.prod(self.in_shape)
        self.d_out = math.prod(self.out_shape)
        self._transposed = self.perm != tuple(range(len(self.perm)))

    def to_matrix(self, kernel):
        """Kernel (layer layout) -> `(d_in, d_out)` matrix."""
        if self._transposed:
            kernel = ops.transpose(kernel, self.perm)
        return ops.reshape(kernel, (self.d_in, self.d_out))

    def from_matrix(self, matrix):
        """`(d_in, d_out)` matrix -> kernel (layer layout)."""
        kernel = ops.reshape(matrix, self.in_shape + self.out_shape)
        if self._transposed:
            kernel = ops.transpose(kernel, self.inverse_perm)
        return kernel

    def project(self, inputs, kernel):
        """The layer's own contraction of `inputs` with `kernel` (no bias)."""
        if self.equation is None:
            return ops.matmul(inputs, kernel)
        return ops.einsum(self.equation, inputs, kernel)

    def contract_inputs(self, inputs, factor):
        """Contracts the input axes of `inputs` with a `(d_in, r)` factor.

        Returns a tensor of shape `batch_axes + (r,)`.
        """
        if self.equation is None:
            return ops.matmul(inputs, factor)
        r = self._rank_letter
        factor = ops.reshape(factor, self.in_shape + (factor.shape[-1],))
        in_letters = "".join(c for c in self._kernel if c in self._inputs)
        equation = f"{self._inputs},{in_letters}{r}->{self._batch}{r}"
        return ops.einsum(equation, inputs, factor)

    def map_inputs(self, inputs, fn):
        """Applies `fn` along the flattened input axes of `inputs`.

        `fn` maps a `(n, d_in)` tensor to a `(n, d_in)` tensor (for example
        `x -> x R` for an input-side rotation `R`). Returns a tensor shaped
        like `inputs`, ready for `project`.
        """
        if self.equation is None:
            in_positions = [len(inputs.shape) - 1]
        else:
            in_letters = [c for c in self._kernel if c in self._inputs]
            offset = len(inputs.shape) - len(self._inputs.replace("...", "_"))
            in_positions = [
                self._inputs.replace("...", "_").index(c) + max(offset, 0)
                for c in in_letters
            ]
        rank = len(inputs.shape)
        other = [i for i in range(rank) if i not in in_positions]
        perm = other + in_positions
        moved = inputs if perm == list(range(rank)) else ops.transpose(inputs, perm)
        moved_shape = ops.shape(moved)
        flat = fn(ops.reshape(moved, (-1, self.d_in)))
        moved = ops.reshape(flat, moved_shape)
        if perm == list(range(rank)):
            return moved
        return ops.transpose(moved, [perm.index(i) for i in range(rank)])

    def expand_outputs(self, hidden, factor):
        """Maps `batch_axes + (r,)` through an `(r, d_out)` factor.

        Returns a tensor in the layer's output layout.
        """
        if self.equation is None:
            return ops.matmul(hidden, factor)
        r = self._rank_letter
        factor = ops.reshape(factor, (factor.shape[0],) + self.out_shape)
        out_letters = "".join(c for c in self._kernel if c in self._outputs)
        equation = f"{self._batch}{r},{r}{out_letters}->{self._outputs}"
        return ops.einsum(equation, hidden, factor)


DEFAULT_NAME = "default"


def check_supported(layer):
    """Raises `UnsupportedLayerError` if no adapter can attach to `layer`.

    A layer that already has adapters can take more (under other names).

    Returns:
        The layer's `KernelView`.
    """
    if not isinstance(layer, SUPPORTED_LAYERS):
        raise UnsupportedLayerError(
            f"Layer '{layer.path or layer.name}' is of type {type(layer).__name__}; "
            "adapters attach to Dense and EinsumDense layers."
        )
    if is_adapted(layer):
        return layer._keras_adapters_view
    if not layer.built:
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' is not built; build the model (call it on "
            "data or call build()) before enabling adapters."
        )
    if getattr(layer, "lora_enabled", False):
        raise UnsupportedLayerError(
            f"Layer '{layer.path}' has Keras' built-in LoRA enabled; "
            "keras_adapters does not stack on it."
        )
    reason = quantization.unsupported_reason(layer)
    if reason is not None:
        raise UnsupportedLayerError(reason)
    if getattr(layer, "kernel_constraint", None) is not None:
        raise UnsupportedLayerError(
            f"Layer '{layer.path}' has a kernel constraint, which an adapted "
            "kernel would not respect."
        )
    return KernelView(layer)


def is_adapted(layer):
    return isinstance(layer, _AdaptedLayer)


class AdapterSlot:
    """One named adapter on one layer, as the adapter's methods see the layer.

    Adapter methods receive a slot where they expect the layer: reading an
    attribute falls through to the layer (`layer.path`, `layer._kernel`),
    except for the adapter's own variables and state, which the adapter
    reads and sets by their short names (`layer.lora_a`). On the layer they
    live under qualified names: `lora_a` for the adapter named `"default"`,
    `lora_a.news` for the adapter named `"news"`, so several adapters can
    share a layer and their variable paths say which adapter they belong to.

    Attributes:
        layer: the adapted layer.
        name: the adapter's name.
        adapter: the adapter configuration.
        active: whether the layer applies this adapter.
    """

    def __init__(self, layer, name, adapter):
        state = self.__dict__
        state.update(layer=layer, name=name, adapter=adapter, active=True, own={})

    def qualified(self, short_name):
        """The layer attribute (and variable name) for `short_name`."""
        if self.name == DEFAULT_NAME:
            return short_name
        return f"{short_name}.{self.name}"

    def __getattr__(self, attr):
        # Only called for attributes the slot itself does not have.
        state = self.__dict__
        if attr in state["own"]:
            return getattr(state["layer"], state["own"][attr])
        return getattr(state["layer"], attr)

    def __setattr__(self, attr, value):
        if attr == "active":
            self.__dict__["active"] = bool(value)
            return
        qualified = self.qualified(attr)
        with internals.unlocked_tracker(self.layer):
            setattr(self.layer, qualified, value)
        self.own[attr] = qualified

    def variables(self):
        """`{qualified name: variable}` of this adapter's variables."""
        return {
            q: getattr(self.layer, q)
            for q in self.own.values()
            if isinstance(getattr(self.layer, q), keras.Variable)
        }


def slots(layer):
    """`{name: AdapterSlot}` of `layer`, in the order adapters were attached."""
    return dict(getattr(layer, "_keras_adapters_slots", {}))


def attach(layer, adapter, view, name):
    """Adds adapter `name` (its variables) to `layer`.

    `check_supported(layer)` and `adapter.validate(layer, view)` must have
    passed. The first adapter also switches the layer's class.
    """
    slot = AdapterSlot(layer, name, adapter)
    with internals.unlocked_tracker(layer):
        layer.trainable = True
        adapter.build(slot, view)
    if not is_adapted(layer):
        internals.set_untracked_attribute(layer, "_keras_adapters_view", view)
        internals.set_untracked_attribute(layer, "_keras_adapters_slots", {})
        internals.switch_class(layer, _AdaptedLayer, serialize_as_base=True)
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
    view = layer._keras_adapters_view
    base = quantization.float_kernel(layer, view)
    if len(active_slots) == 1:
        slot = active_slots[0]
        return slot.adapter.adapted_kernel(slot, view, base)
    matrix = view.to_matrix(ops.cast(base, "float32"))
    for slot in active_slots:
        matrix = slot.adapter.adapted_matrix(slot, matrix)
    return view.from_matrix(matrix)


def detach(layer, name, merge):
    """Removes adapter `name` from `layer`, first folding it in if `merge`.

    The last adapter to go also restores the layer's class.
    """
    slot = layer._keras_adapters_slots[name]
    if merge:
        merged = composed_kernel(layer, [slot])
        layer._kernel.assign(ops.cast(merged, layer._kernel.dtype))
    slot.adapter.release(slot)
    for qualified in slot.own.values():
        value = getattr(layer, qualified)
        if isinstance(value, keras.Variable):
            internals.untrack_variable(layer, value)
        internals.untrack_attribute(layer, qualified)
    del layer._keras_adapters_slots[name]
    if not layer._keras_adapters_slots:
        object.__delattr__(layer, "_keras_adapters_view")
        object.__delattr__(layer, "_keras_adapters_slots")
        internals.restore_class(layer)


class _AdaptedLayer:
    """Methods a `Dense`/`EinsumDense` layer gets while it has adapters."""

    def _active_slots(self):
        return [s for s in self._keras_adapters_slots.values() if s.active]

    @property
    def kernel(self):
        """The effective (adapted) kernel, as Keras' own LoRA exposes it."""
        active = self._active_slots()
        if not active:
            return quantization.float_kernel(self, self._keras_adapters_view)
        return composed_kernel(self, active)

    def quantized_call(self, *args, **kwargs):
        # Keras routes quantized layers here instead of `call`; the adapter
        # handles the quantized kernel itself (see keras_adapters.quantization).
        return self.call(*args, **kwargs)

    def _check_quantize_args(self, mode, compute_dtype):
        raise quantization.refuse_layer_quantize(self)

    def call(self, inputs, training=None):
        active = self._active_slots()
        view = self._keras_adapters_view
        if len(active) == 1:
            slot = active[0]
            outputs = slot.adapter.call(slot, view, inputs, training=training)
        elif all(slot.adapter.additive for slot in active):
            # No adapter, or only additive ones (LoRA): each adds its own
            # term to the base projection, without building a kernel. On an
            # int8/int4 base, the inputs are those Keras' quantized layer uses.
            inputs = quantization.quantize_inputs(self, inputs)
            outputs = quantization.base_projection(self, view, inputs)
            for slot in active:
                delta = slot.adapter.delta(slot, view, inputs, training=training)
                outputs = ops.add(outputs, ops.cast(delta, outputs.dtype))
        else:
            inputs = quantization.quantize_inputs(self, inputs)
            kernel = composed_kernel(self, active)
            outputs = view.project(inputs, ops.cast(kernel, self.compute_dtype))
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

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
