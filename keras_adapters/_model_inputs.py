"""How a model takes its inputs, and their names in a serving signature."""

import dataclasses
import re

import keras


def _model_inputs(model):
    inputs = model.inputs
    if not inputs:
        raise ValueError(
            f"Model '{model.name}' has no symbolic inputs (a subclassed model?); "
            "pass `input_signature=` with one keras.InputSpec or "
            "tf.TensorSpec per input."
        )
    return inputs


# Names Keras gives inputs created without `name=`: they change from one
# model to the next, so the signature uses positional names instead.
_AUTOMATIC_NAME = re.compile(r"keras_tensor(_\d+)?|input_layer(_\d+)?")


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """How the model takes its inputs, and their names in the signature.

    Attributes:
        kind: "dict" (KerasHub backbones and tasks, functional models built
            from a dict), "single" (one tensor: `keras.Sequential`, most
            functional models) or "list" (several positional tensors).
        names: the signature's input names, in the model's order: dict keys,
            else each `keras.Input`'s name, or `inputs` / `inputs_<i>` for
            inputs Keras named automatically.
        tensors: the model's symbolic inputs, in the same order.
    """

    kind: str
    names: tuple
    tensors: tuple

    def structure(self, values):
        """`values` (`{name: value}`) in the structure the model is called with."""
        if self.kind == "dict":
            return {name: values[name] for name in self.names}
        if self.kind == "single":
            return values[self.names[0]]
        return [values[name] for name in self.names]


def _inputs(model):
    tensors = list(_model_inputs(model))
    structure = None
    if not isinstance(model, keras.Sequential):
        try:
            structure = model.input
        except (AttributeError, ValueError):
            structure = None
    if isinstance(structure, dict):
        return _Inputs("dict", tuple(structure), tuple(structure.values()))
    names = [getattr(t, "name", None) or "" for t in tensors]
    automatic = any(_AUTOMATIC_NAME.fullmatch(n) for n in names)
    if automatic or len(set(names)) != len(names):
        names = [f"inputs_{i}" for i in range(len(tensors))]
        if len(tensors) == 1:
            names = ["inputs"]
    kind = "single" if len(tensors) == 1 else "list"
    return _Inputs(kind, tuple(names), tuple(tensors))
