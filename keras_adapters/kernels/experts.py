"""Stacked expert kernels of KerasHub's mixture-of-experts layers.

KerasHub keeps the experts of a sparse MoE block in one layer (Mixtral's
`MixtralMoeExperts`, Qwen-MoE's `QwenMoeExperts`, Qwen3-MoE's
`Qwen3MoeExperts`) that holds each projection of all experts as one stacked
weight `(experts, d_in, d_out)` and computes every expert at once with
einsums (`"th,ehm->etm"`, `"eti,eih->eth"`). Such a layer has several
kernels and a `call` that uses them directly, so adapters reach each
stacked weight through an `ExpertProjection`: a small Keras layer, one per
stacked weight, that projects with that weight by the layer's own einsum.
Targeting lists the projections as children of the experts layer (path
`<experts layer>/<weight name>`, an MLP role from the table below), and an
adapter attaches to a projection like to any other layer.

While one of its projections has an adapter, the experts layer switches to
a cached subclass whose `call` is the layer's own computation written in
terms of its projections (`ExpertsSpec.call`), and tracks the adapted
projections (so their variables train, save and load with the model); the
last adapter to go restores both.

The projection's kernel, `ExpertsKernel` (kind `"experts"`), is a stack of
`(d_in, d_out)` matrices: every expert's 2-D view is its own weight, and an
adapter's variables get the expert axis in front (LoRA's `A` is
`(experts, d_in, r)`, `B` `(experts, r, d_out)`). Its calls (`to_matrix`,
`contract_inputs`, `expand_outputs`) work on the whole stack with batched
einsums over the expert axis, inside the expert computation: no loop over
experts and no adapted weight built for a forward pass.
"""

import dataclasses
import re
import weakref
from collections.abc import Callable

import keras
from keras import ops

from keras_adapters import _keras_internals as internals
from keras_adapters.kernels.view import KernelView
from keras_adapters.kernels.view import UnsupportedLayerError


@dataclasses.dataclass(frozen=True)
class ExpertWeight:
    """One stacked expert weight of an experts layer.

    Attributes:
        attribute: the layer attribute holding the `(experts, d_in, d_out)`
            variable.
        key: the name `ExpertsSpec.call` projects with.
        equation: the layer's einsum with this weight (inputs, weight ->
            outputs); the weight's axes are expert, input, output.
        roles: the MLP roles of the weight (`("gate", "up")` for a fused
            gate and up projection).
    """

    attribute: str
    key: str
    equation: str
    roles: tuple


@dataclasses.dataclass(frozen=True)
class ExpertsSpec:
    """How a KerasHub experts layer computes with its stacked weights.

    Attributes:
        weights: its `ExpertWeight`s.
        call: `(layer, inputs, project) -> outputs`, the layer's `call` with
            each einsum replaced by `project(key, x)` (tested against the
            layer's own `call`, so a KerasHub change shows up).
    """

    weights: tuple
    call: Callable


def _mixtral_call(layer, hidden_states, project):
    # MixtralMoeExperts.call.
    gate = project("gate", hidden_states)
    gate = ops.cast(gate, "float32")  # Match PyTorch SiLU precision
    gate = layer.activation(gate)
    gate = ops.cast(gate, layer.compute_dtype)
    intermediate = project("up", hidden_states)
    return project("down", intermediate * gate)


def _qwen_call(layer, hidden_states, project):
    # QwenMoeExperts.call and Qwen3MoeExperts.call.
    gate_up = project("gate_up", hidden_states)
    gate, up = ops.split(gate_up, 2, axis=-1)
    return project("down", up * layer.activation(gate))


_TOKENS_IN = "th,ehm->etm"
_EXPERTS_IN = "eti,eih->eth"
_DOWN = ExpertWeight("_expert_feedforward_output_dense", "down", _EXPERTS_IN, ("down",))
_QWEN = ExpertsSpec(
    weights=(
        ExpertWeight(
            "_expert_feedforward_gate_dense", "gate_up", _TOKENS_IN, ("gate", "up")
        ),
        _DOWN,
    ),
    call=_qwen_call,
)

# `{module.Class: spec}` of the KerasHub experts layers adapters reach.
EXPERTS_SPECS = {
    "keras_hub.src.models.mixtral.mixtral_decoder.MixtralMoeExperts": ExpertsSpec(
        weights=(
            ExpertWeight(
                "_expert_feedforward_gate_dense", "gate", _TOKENS_IN, ("gate",)
            ),
            ExpertWeight(
                "_expert_feedforward_intermediate_dense", "up", _TOKENS_IN, ("up",)
            ),
            _DOWN,
        ),
        call=_mixtral_call,
    ),
    "keras_hub.src.models.qwen_moe.qwen_moe_decoder.QwenMoeExperts": _QWEN,
    "keras_hub.src.models.qwen3_moe.qwen3_moe_decoder.Qwen3MoeExperts": _QWEN,
}


def experts_spec(layer):
    """The `ExpertsSpec` of `layer`'s class, or None."""
    for cls in type(layer).__mro__:
        spec = EXPERTS_SPECS.get(f"{cls.__module__}.{cls.__qualname__}")
        if spec is not None:
            return spec
    return None


# KerasHub creates the sparse MoE blocks without a name, so Keras numbers
# them per process (`mixtral_sparse_moe_block_3`): a second model in the
# same process would get other paths than the one an adapter file or a
# `.keras` file names. The projections' paths drop that number (each
# decoder layer, named `transformer_layer_<i>`, holds one block).
_NUMBERED_BLOCK = re.compile(r"(?<=sparse_moe_block)_\d+(?=/|$)")


def _stable_path(path):
    return _NUMBERED_BLOCK.sub("", path)


class ExpertProjection(keras.layers.Layer):
    """One stacked weight of a KerasHub experts layer, as a layer adapters
    attach to.

    `call(x)` is the experts layer's einsum with the weight: for
    `"th,ehm->etm"` tokens `(t, d_in)` to `(experts, t, d_out)`, for
    `"eti,eih->eth"` `(experts, t, d_in)` to `(experts, t, d_out)`. The
    weight stays the experts layer's variable (the projection does not
    track it); `ExpertProjection`s are made by `expert_projections`, never
    by hand.

    Args:
        parent: the built experts layer.
        weight: the `ExpertWeight` this projection computes with.
    """

    def __init__(self, parent, weight):
        variable = getattr(parent, weight.attribute)
        super().__init__(name=weight.attribute.lstrip("_"), dtype=parent.dtype_policy)
        # Untracked: the variable stays the parent's, saved and trained there.
        object.__setattr__(self, "_kernel", variable)
        # A weak reference, not the layer: Keras' saving walks attributes,
        # and a path back to the parent would be a cycle.
        object.__setattr__(self, "_parent", weakref.ref(parent))
        self.equation = weight.equation
        self.key = weight.key
        self.mlp_roles = tuple(weight.roles)
        parent_path = _stable_path(parent.path or parent.name)
        self._path = f"{parent_path}/{self.name}"
        # Adapter variables' paths start with it (`<path>/lora_a`).
        self._parent_path = parent_path
        self.built = True

    def call(self, inputs):
        return ops.einsum(self.equation, inputs, self._kernel)


class _Projections:
    """The projections of one experts layer (not a container Keras saves)."""

    def __init__(self, parent, spec):
        self.spec = spec
        self.by_key = {w.key: ExpertProjection(parent, w) for w in spec.weights}
        self.tracked = set()


def expert_projections(layer):
    """The `ExpertProjection`s of an experts layer (made once), or `[]`."""
    spec = experts_spec(layer)
    if spec is None or not layer.built:
        return []
    projections = layer.__dict__.get("_keras_adapters_projections")
    if projections is None:
        projections = _Projections(layer, spec)
        internals.set_untracked_attribute(
            layer, "_keras_adapters_projections", projections
        )
    return list(projections.by_key.values())


# Targeting walks the projections as children of their experts layer.
internals.register_child_layers(expert_projections)


class _ExpertsLayer:
    """The `call` of an experts layer while a projection has adapters."""

    def call(self, hidden_states):
        projections = self._keras_adapters_projections
        by_key = projections.by_key
        return projections.spec.call(self, hidden_states, lambda key, x: by_key[key](x))


def _tracked_name(projection):
    return f"_keras_adapters_{projection.name}"


class ExpertsKernel(KernelView):
    """The frozen stacked kernel `(experts, d_in, d_out)` of an
    `ExpertProjection`.

    Its 2-D view is per expert: `d_in`, `d_out` are one expert's, and
    `stack_shape` `(experts,)` comes in front of every adapter variable
    (the variable factory adds it) and of the matrices `to_matrix` returns,
    so a method's `matmul`s and sums over the last two axes batch over
    the experts unchanged. `contract_inputs(x, A)` with `A` `(experts,
    d_in, r)` and `expand_outputs(h, B)` with `B` `(experts, r, d_out)` are
    batched einsums (for `"th,ehm->etm"`: `"th,ehr->etr"` and
    `"etr,erm->etm"`).

    Args:
        layer: an `ExpertProjection`.
    """

    quantized = False
    transposable = False

    def __init__(self, layer):
        shape = tuple(int(d) for d in layer._kernel.shape)
        equation = layer.equation
        inputs, rest = equation.split(",")
        kernel, outputs = rest.split("->")
        if len(shape) != 3 or len(kernel) != 3:
            raise UnsupportedLayerError(
                f"Layer '{layer.path}': expert weights must be (experts, d_in, "
                f"d_out) with a 3-letter einsum term; got shape {shape} and "
                f"'{equation}'."
            )
        self.kernel_shape = shape
        self.equation = equation
        self._input_term, self._kernel_term, self._output_term = (
            inputs,
            kernel,
            outputs,
        )
        self.stack_shape = shape[:1]
        self.in_shape = shape[1:2]
        self.out_shape = shape[2:]
        self.d_in, self.d_out = shape[1], shape[2]
        # The view's input axis, then its output axis (for placement).
        self.perm = (1, 2)
        self._rank_letter = next(c for c in "rqpzyx" if c not in equation)
        self.layer = layer
        self.path = layer.path or layer.name

    @property
    def kind(self):
        return "experts"

    @property
    def compute_dtype(self):
        return self.layer.compute_dtype

    def to_matrix(self, kernel):
        """The stacked kernel as `(experts, d_in, d_out)` matrices."""
        return ops.reshape(kernel, self.kernel_shape)

    def from_matrix(self, matrix):
        return ops.reshape(matrix, self.kernel_shape)

    def apply(self, inputs, kernel):
        return ops.einsum(self.equation, inputs, kernel)

    def _rank_output_term(self):
        return self._output_term.replace(self._kernel_term[2], self._rank_letter)

    def contract_inputs(self, inputs, factor):
        """`x A_e` for every expert `e`, with `A` `(experts, d_in, r)`."""
        e, i, _ = self._kernel_term
        r = self._rank_letter
        equation = f"{self._input_term},{e}{i}{r}->{self._rank_output_term()}"
        return ops.einsum(equation, inputs, factor)

    def expand_outputs(self, hidden, factor):
        """`h_e B_e` for every expert `e`, with `B` `(experts, r, d_out)`."""
        e, _, o = self._kernel_term
        r = self._rank_letter
        equation = f"{self._rank_output_term()},{e}{r}{o}->{self._output_term}"
        return ops.einsum(equation, hidden, factor)

    def _refuse(self, what):
        raise UnsupportedLayerError(
            f"Layer '{self.path}' holds stacked expert weights; {what} is not "
            "supported on expert projections."
        )

    def contract_inputs_per_example(self, inputs, factors):
        self._refuse("per-example adapters")

    expand_outputs_per_example = contract_inputs_per_example

    def map_inputs(self, inputs, fn):
        self._refuse("an input-side transform")

    def scale_outputs(self, outputs, vector):
        self._refuse("per-output scaling")

    scale_outputs_per_example = scale_outputs

    def transposed_equation(self):
        self._refuse("a transposed projection")

    # What FloatKernel answers.

    def prepare_inputs(self, inputs):
        return inputs

    def project(self, inputs):
        return self.apply(inputs, self.layer._kernel)

    def project_with(self, inputs, kernel):
        return self.apply(inputs, ops.cast(kernel, self.compute_dtype))

    def call_mode(self, **kwargs):
        return "forward"

    def finish(self, outputs, inputs=None):
        return outputs

    def dense(self):
        return self.layer._kernel

    def storage_variables(self):
        return [self.layer._kernel]

    def assign(self, kernel):
        variable = self.layer._kernel
        variable.assign(ops.cast(kernel, variable.dtype))

    # The experts layer computes through its projections while one has
    # adapters.

    def on_first_attach(self):
        projection = self.layer
        parent = projection._parent()
        projections = parent._keras_adapters_projections
        internals.set_tracked_attribute(parent, _tracked_name(projection), projection)
        projections.tracked.add(projection.key)
        if not isinstance(parent, _ExpertsLayer):
            internals.switch_class(parent, _ExpertsLayer, serialize_as_base=True)

    def on_last_detach(self):
        projection = self.layer
        parent = projection._parent()
        projections = parent._keras_adapters_projections
        internals.untrack_attribute(parent, _tracked_name(projection))
        projections.tracked.discard(projection.key)
        if not projections.tracked and isinstance(parent, _ExpertsLayer):
            internals.restore_class(parent)
