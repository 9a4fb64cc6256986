"""Many adapters in one compiled program: each example through its own.

`per_example_adapters(model, ["legal", "medical"])` returns a
`PerExampleModel`: it takes the model's inputs plus an int32 `adapter_id` of
shape `(batch,)` and gives each example the output of the model with only
its adapter active (`-1`: the base model). On every adapted layer, the named
adapters' factors are stacked (padded to the largest rank, scales folded
in), each example's are gathered, and batched einsums apply them: static
shapes, no loop over examples or adapters, one program under
`jit_compile=True` (the S-LoRA / Punica idea).

The ids reach the layers deep inside the model through
`keras_adapters.layers.dispatching`, set for the duration of the wrapped
model's call, so KerasHub models need no extra input. The stacks are built
from the adapters' own variables inside the call, so `fit` trains each
adapter's own variables and loading new weights into a slot is a plain
variable assignment: nothing recompiles (`PerExampleModel.load_adapter`).

A method takes part through its `Adapter.per_example_factors` hook (LoRA
defines it; DoRA can return an output scale too). See
`docs/serving_many_adapters.md`.
"""

import os

import keras
import numpy as np
from keras import ops

from keras_adapters import _validation
from keras_adapters import interop
from keras_adapters import layers as adapter_layers
from keras_adapters import model as adapter_model
from keras_adapters import saving
from keras_adapters import targeting
from keras_adapters._model_inputs import _Inputs
from keras_adapters._model_inputs import _inputs
from keras_adapters.adapters.base import ADAPTER_METHODS

__all__ = ["ADAPTER_ID", "PerExampleModel", "per_example_adapters"]

ADAPTER_ID = "adapter_id"
_HOOK = "per_example_factors"


def supported_methods() -> list:
    """The adapter methods per-example adapters support (their classes
    define `Adapter.per_example_factors` themselves)."""
    return sorted(m for m, cls in ADAPTER_METHODS.items() if _HOOK in vars(cls))


def _check_supported(model, names):
    groups = {g.name: g for g in adapter_model.adapter_groups(model)}
    for name in names:
        adapter = groups[name].adapter
        if _HOOK not in vars(type(adapter)):
            raise ValueError(
                f"Adapter {name!r} of model '{model.name}' is a "
                f"{type(adapter).__name__} (method {adapter.method!r}), which "
                "per-example adapters do not support; they support the methods "
                f"{supported_methods()}."
            )
    for layer in adapter_model.adapted_layers(model):
        for name, slot in adapter_layers.slots(layer).items():
            if name in names and slot.kernel.kind not in ("dense", "einsum_dense"):
                raise ValueError(
                    f"Adapter {name!r} of model '{model.name}' adapts the "
                    f"{slot.kernel.kind} layer '{layer.path}'; per-example "
                    "adapters support Dense and EinsumDense layers only."
                )


def _check_names(model, names):
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise ValueError(
            "`names` must be a non-empty list of adapter names (slot k serves "
            f"adapter_id k); received {names!r}."
        )
    checked = adapter_model.check_names(model, list(names), "names")
    if len(checked) != len(names):
        raise ValueError(f"`names` repeats an adapter name: {list(names)}.")
    return tuple(checked)


class PerExampleModel(keras.Model):
    """A model whose examples each go through their own adapter.

    Built by `ka.per_example_adapters(model, names)` (see there). It shares
    every layer and variable with `model`: training it trains `model`'s
    adapters, and loading weights into `model` changes what it computes. It
    is not saved itself: save the adapters (`ka.save_adapter_weights`) and
    wrap the model again, or export it (`ka.export_saved_model(...,
    adapters=names)`).

    Args:
        model: a built model with adapters.
        names: a non-empty list of its adapter names; slot `k` serves
            `adapter_id == k`.
        seed: optional int, the seed of adapter dropout in training.

    Call arguments:
        inputs: a dict: the model's inputs by name (the keys of a dict of
            inputs, as KerasHub models take; else each `keras.Input`'s name,
            `inputs` for a single unnamed input, `inputs_0`, `inputs_1`, ...
            for several), plus `"adapter_id"`: int `(batch,)`, `k` for
            `names[k]` and `-1` for the base model.
        training: bool, passed to the model (dropout).

    Attributes:
        model: the wrapped model.
        names: the adapters, in slot order.
    """

    def __init__(self, model, names, *, seed=None, **kwargs):
        adapter_model.check_model(model)
        names = _check_names(model, names)
        _check_supported(model, names)
        symbolic = getattr(model, "inputs", None)
        inputs = _inputs(model) if symbolic else _Inputs("single", ("inputs",), ())
        if ADAPTER_ID in inputs.names:
            raise ValueError(
                f"Model '{model.name}' already has an input named {ADAPTER_ID!r}."
            )
        kwargs.setdefault("name", f"{model.name}_per_example")
        super().__init__(**kwargs)
        self.model = model
        self._names = names
        self._inputs = inputs
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.built = True

    @property
    def slots(self):
        """The adapter names, in slot order: `adapter_id == k` is `slots[k]`."""
        return list(self._names)

    @property
    def input_keys(self):
        """The keys `call` takes: the model's input names and `"adapter_id"`."""
        return list(self._inputs.names) + [ADAPTER_ID]

    def _check_keys(self, inputs):
        if not isinstance(inputs, dict) or sorted(inputs) != sorted(self.input_keys):
            got = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
            raise ValueError(
                f"'{self.name}' takes a dict with the keys {self.input_keys} "
                f"(adapter_id: int (batch,), -1 = base); received {got}."
            )

    def _ids(self, inputs):
        ids = ops.convert_to_tensor(inputs[ADAPTER_ID])
        if len(ids.shape) != 1:
            raise ValueError(
                f"`{ADAPTER_ID}` must have shape (batch,); received shape "
                f"{tuple(ids.shape)}."
            )
        if "int" not in str(ids.dtype):
            raise ValueError(
                f"`{ADAPTER_ID}` must hold ints; received dtype {ids.dtype}."
            )
        return ops.cast(ids, "int32")

    def _check_range(self, ids):
        # Only where the ids are concrete (eager calls); traced ids (fit,
        # predict, jit, SavedModel) cannot be read, and out-of-range ids
        # there select the base model (see `per_example_adapters`).
        try:
            values = np.asarray(ops.convert_to_numpy(ids))
        except Exception:  # a JAX tracer, a TF graph tensor or a KerasTensor
            return
        outside = (values < -1) | (values >= len(self._names))
        bad = np.unique(values[outside]).tolist()
        if bad:
            raise ValueError(
                f"`{ADAPTER_ID}` values {bad} are out of range: '{self.name}' "
                f"serves {len(self._names)} adapters {list(self._names)}, so ids "
                f"go from -1 (base model) to {len(self._names) - 1}."
            )

    def call(self, inputs, training=None):
        self._check_keys(inputs)
        ids = self._ids(inputs)
        # Checked at every call (in Python, so at trace time only under jit):
        # an adapter deleted or replaced since would otherwise be skipped.
        adapter_model.check_names(self.model, list(self._names), "names")
        _check_supported(self.model, self._names)
        self._check_range(ids)
        count = len(self._names)
        valid = ops.logical_and(ops.greater_equal(ids, -1), ops.less(ids, count))
        # Row 0 of every stack is the base model (zeros), row k + 1 slot k.
        index = ops.where(valid, ids + 1, ops.zeros_like(ids))
        dispatch = _Dispatch(self._names, index, self.seed_generator)
        with adapter_layers.dispatching(dispatch):
            return self.model(self._inputs.structure(inputs), training=training)

    def compute_output_spec(self, inputs, training=None):
        self._check_keys(inputs)
        return self.model.compute_output_spec(self._inputs.structure(inputs))

    def load_adapter(self, slot, path, *, name=None):
        """Loads adapter weights into one slot; nothing recompiles.

        The slot keeps its variables and shapes, so compiled `predict`,
        `fit` and serving functions keep running, now with the new weights:
        a hot-swap. The weights are converted to the slot's configuration
        (`Adapter.values_from`): a LoRA of rank up to the slot's is
        zero-padded and its scale folded into `B`, so the slot computes
        exactly the loaded adapter's update. Layers of the slot that the
        loaded adapter does not adapt get no update. To add adapters later,
        reserve slots: adapters of the largest rank you expect, with `B`
        zero (the base model until loaded).

        Args:
            slot: the slot's index or adapter name.
            path: an adapter file (`.h5`, `ka.save_adapter_weights`) or a
                Hugging Face PEFT adapter directory (KerasHub BERT, Llama
                or Gemma models; see `ka.interop.load_peft_adapter`).
            name: which adapter of an adapter file holding several.

        Raises:
            ValueError: an unknown slot, a file that does not fit (another
                method, a larger rank, layers the slot does not adapt).
                Nothing changes then.

        Example:

        ```python
        serving = ka.per_example_adapters(classifier, ["legal", "medical"])
        serving.load_adapter("medical", "medical_v2.adapter.weights.h5")
        ```
        """
        target = self._slot_name(slot)
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"`path` must be a str or os.PathLike; received {path!r}.")
        if os.path.isdir(path):
            if name is not None:
                raise ValueError("`name` selects an adapter of an .h5 file only.")
            source, values = self._read_peft(path)
        else:
            source, values = _read_adapter_file(path, name)
        root = adapter_model.adapted_root(self.model)
        layers = {
            targeting.relative_path(root.name, layer.path): layer
            for layer in adapter_model.adapted_layers(self.model)
            if target in adapter_layers.slots(layer)
        }
        outside = sorted(set(values) - set(layers))
        if outside:
            raise ValueError(
                f"Cannot load {path!r} into slot {target!r}: it adapts the layers "
                f"{outside}, which the slot does not adapt (the slot adapts "
                f"{sorted(layers)})."
            )
        assignments = []
        for key, layer in layers.items():
            slot_weights = adapter_layers.slots(layer)[target]
            # The file's configuration on this layer (its rank/alpha patterns).
            new = slot_weights.adapter.values_from(
                source.for_layer(key), values.get(key), slot_weights.kernel
            )
            for short, value in new.items():
                variable = slot_weights[short]
                value = np.asarray(value, "float32")
                if tuple(variable.shape) != value.shape:
                    raise ValueError(
                        f"Cannot load {path!r} into slot {target!r}: '{key}' "
                        f"{short} has shape {tuple(variable.shape)}, the loaded "
                        f"values {value.shape}."
                    )
                assignments.append((variable, value))
        for variable, value in assignments:
            variable.assign(value)

    def _slot_name(self, slot):
        if isinstance(slot, str) and slot in self._names:
            return slot
        if (
            isinstance(slot, (int, np.integer))
            and not isinstance(slot, bool)
            and 0 <= slot < len(self._names)
        ):
            return self._names[int(slot)]
        raise ValueError(
            f"`slot` must be one of {list(self._names)} or an index in "
            f"[0, {len(self._names) - 1}]; received {slot!r}."
        )

    def _read_peft(self, path):
        """`(LoRA, {layer path: {name: array}})` of a PEFT directory."""
        existing = set(adapter_model.adapter_names(self.model))
        temporary = next(
            f"_peft_load_{i}"
            for i in range(len(existing) + 1)
            if f"_peft_load_{i}" not in existing
        )
        interop.load_peft_adapter(self.model, path, name=temporary)
        try:
            root = adapter_model.adapted_root(self.model)
            values = {}
            for layer in adapter_model.adapted_layers(self.model):
                slots = adapter_layers.slots(layer)
                if temporary in slots:
                    key = targeting.relative_path(root.name, layer.path)
                    values[key] = {
                        short: np.asarray(ops.convert_to_numpy(v))
                        for short, v in slots[temporary].items()
                    }
            group = next(
                g
                for g in adapter_model.adapter_groups(self.model)
                if g.name == temporary
            )
            return group.adapter, values
        finally:
            adapter_model.delete_adapter(self.model, temporary)


def _read_adapter_file(path, name):
    """`(adapter, {layer path: {name: array}})` of one adapter of a file."""
    spec = saving.read_adapter_spec(path)
    groups = saving._adapter_groups(spec, os.fspath(path))
    names = [g.name for g in groups]
    if name is None:
        if len(groups) != 1:
            raise ValueError(
                f"Adapter file {path!r} holds the adapters {names}; pass `name=` "
                "to choose one."
            )
        group = groups[0]
    else:
        _validation.check_name("name", name)
        if name not in names:
            raise ValueError(
                f"Adapter file {path!r} holds the adapters {names}; it has no "
                f"adapter named {name!r}."
            )
        group = groups[names.index(name)]
    stored, _, problems = saving._read_values(path, spec, group.layer_paths)
    if problems:
        raise ValueError(
            f"Adapter file {path!r} is unreadable:\n  " + "\n  ".join(problems)
        )
    suffix = "" if group.name == adapter_layers.DEFAULT_NAME else f".{group.name}"
    values = {}
    for layer_path, arrays in stored.items():
        values[layer_path] = {
            key.removesuffix(suffix): array
            for key, array in arrays.items()
            if (key.endswith(suffix) and "." not in key.removesuffix(suffix))
        }
    return group.adapter, values


class _Dispatch:
    """Computes an adapted layer's output with each example's own adapter."""

    def __init__(self, names, index, seed_generator):
        self.names = names
        self.index = index  # (batch,) int32: 0 = base, k + 1 = names[k]
        self.seed_generator = seed_generator

    def __call__(self, layer, kernel, inputs, training):
        outputs = kernel.project(inputs)
        slots = adapter_layers.slots(layer)
        factors = [
            None
            if n not in slots
            else slots[n].adapter.per_example_factors(slots[n], kernel)
            for n in self.names
        ]
        present = [f for f in factors if f is not None]
        if not present:
            return outputs
        rank = max(int(f["a"].shape[-1]) for f in present)
        a_rows = [ops.zeros((kernel.d_in, rank), "float32")]
        b_rows = [ops.zeros((rank, kernel.d_out), "float32")]
        for f in factors:
            if f is None:
                a_rows.append(a_rows[0])
                b_rows.append(b_rows[0])
                continue
            pad = rank - int(f["a"].shape[-1])
            a, b = ops.cast(f["a"], "float32"), ops.cast(f["b"], "float32")
            a_rows.append(ops.pad(a, [(0, 0), (0, pad)]) if pad else a)
            b_rows.append(ops.pad(b, [(0, pad), (0, 0)]) if pad else b)
        a = ops.take(ops.stack(a_rows), self.index, axis=0)  # (batch, d_in, r)
        b = ops.take(ops.stack(b_rows), self.index, axis=0)  # (batch, r, d_out)
        x = ops.cast(inputs, "float32")
        rates = [0.0] + [float(f.get("dropout", 0)) if f else 0.0 for f in factors]
        for name, f in zip(self.names, factors, strict=True):
            if training and f and f.get("dropout") and "output_scale" in f:
                raise ValueError(
                    f"Per-example training of adapter {name!r} "
                    f"({type(slots[name].adapter).__name__}) with dropout="
                    f"{f['dropout']} is not supported on layer '{kernel.path}': "
                    "its dropout does not commute with its output scale. Train "
                    "it alone, or with dropout=0.0; inference is exact."
                )
        if training and any(rates):
            x = self._dropout(x, rates)
        hidden = kernel.contract_inputs_per_example(x, a)
        delta = kernel.expand_outputs_per_example(hidden, b)
        outputs = ops.add(outputs, ops.cast(delta, outputs.dtype))
        if any(f is not None and "output_scale" in f for f in factors):
            ones = ops.ones((kernel.d_out,), "float32")
            scales = [ones] + [
                ones
                if f is None or "output_scale" not in f
                else ops.cast(f["output_scale"], "float32")
                for f in factors
            ]
            vectors = ops.take(ops.stack(scales), self.index, axis=0)
            outputs = kernel.scale_outputs_per_example(
                outputs, ops.cast(vectors, outputs.dtype)
            )
        return outputs

    def _dropout(self, x, rates):
        """Dropout on `x` at each example's adapter's rate."""
        rate = ops.take(ops.convert_to_tensor(rates, "float32"), self.index)
        rate = ops.reshape(rate, (-1,) + (1,) * (len(x.shape) - 1))
        noise = keras.random.uniform(ops.shape(x), seed=self.seed_generator)
        kept = ops.greater_equal(noise, rate)
        return ops.where(kept, ops.divide(x, 1.0 - rate), ops.zeros_like(x))


def per_example_adapters(model: keras.Model, names) -> PerExampleModel:
    """A model that runs each example of a batch through its own adapter.

    The returned `PerExampleModel` takes the model's inputs plus an int32
    `adapter_id` of shape `(batch,)`: example `i` gets the output of `model`
    with only adapter `names[adapter_id[i]]` active, or the base model's
    for `-1` (the other adapters of `model` are ignored). On each adapted
    layer the named adapters' factors are stacked (padded to the largest
    rank, scales folded in) and gathered per example; batched einsums apply
    them. Shapes are static and nothing loops over examples or adapters, so
    a mixed batch is one compiled program (`jit_compile=True`), and loading
    new weights into a slot (`load_adapter`) reuses it.

    `fit` trains each example's adapter on a mixed batch: adapter `k`'s
    variables get gradients from the examples with id `k` only (the model's
    other trainable weights, such as a Task's head, from all examples). It
    trains the named adapters that are active in `model` (all adapters are,
    after `enable_adapter`). `ka.export_saved_model(model, path,
    adapters=names)` exports the same computation.

    Ids outside `[-1, len(names))` raise a `ValueError` in eager calls;
    where ids are traced (`predict`, `fit`, `jit`, a SavedModel) they
    cannot be checked and select the base model.

    Supported methods: those whose class defines
    `Adapter.per_example_factors` (LoRA); others raise a `ValueError`
    naming the method.

    Args:
        model: a built model with adapters (a KerasHub Task or Backbone, or
            any Keras model).
        names: a non-empty list of its adapter names; slot `k` serves
            `adapter_id == k`.

    Returns:
        A `PerExampleModel` sharing `model`'s layers and variables.

    Raises:
        ValueError: unknown or repeated names, an unsupported method, or a
            model with an input named `adapter_id`.

    Example:

    ```python
    serving = ka.per_example_adapters(classifier, ["legal", "medical"])
    logits = serving({**token_inputs, "adapter_id": np.array([0, 1, -1, 0])})
    ```
    """
    return PerExampleModel(model, names)
