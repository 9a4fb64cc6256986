"""`enable_adapter`, `merge_adapters` and the adapter state of a model."""

import dataclasses
import math
import os
import warnings

import keras

from keras_adapters import _io
from keras_adapters import _keras_internals as internals
from keras_adapters import _validation
from keras_adapters import layers as adapter_layers
from keras_adapters import placement
from keras_adapters import targeting
from keras_adapters._tables import format_table
from keras_adapters._validation import check_model
from keras_adapters.adapters.base import Adapter
from keras_adapters.adapters.base import restoring
from keras_adapters.kernels import quantization_mode


@dataclasses.dataclass(frozen=True)
class AdapterGroup:
    """One `enable_adapter` call: an adapter on a set of layers."""

    name: str
    adapter: Adapter
    layer_paths: tuple
    keep_trainable_paths: tuple = ()

    def to_config(self):
        return {
            "name": self.name,
            "adapter": self.adapter.serialize(),
            "layer_paths": list(self.layer_paths),
            "keep_trainable_paths": list(self.keep_trainable_paths),
        }

    @classmethod
    def from_config(cls, config):
        return cls(
            name=config["name"],
            adapter=Adapter.deserialize(config["adapter"]),
            layer_paths=tuple(config["layer_paths"]),
            keep_trainable_paths=tuple(config.get("keep_trainable_paths", ())),
        )


class _AdapterState:
    """What a model remembers about its adapters (never tracked by Keras)."""

    def __init__(self):
        self.groups = []
        # Names of the adapters the model applies (and trains).
        self.active = []
        # Trainable flags before the first adapter, restored after the last
        # adapter is merged or deleted.
        self.saved_flags = []


@dataclasses.dataclass
class AdapterReport:
    """What `enable_adapter` did. `print(report)` shows a table.

    Attributes:
        name: the adapter's name.
        adapter: the adapter configuration.
        adapted: `[(path, layer class, kernel shape, (d_in, d_out), params)]`.
        skipped: `[(path, reason)]` for matched layers left alone.
        layer_adapters: the configuration each adapted layer uses (the
            adapter resolved for it by `Adapter.for_layer`: a
            `rank_pattern` gives some layers another rank), in the order of
            `adapted`.
        adapter_params: parameters added by this adapter.
        trainable_params: trainable parameters of the model afterwards.
        total_params: all parameters of the model afterwards.
    """

    name: str
    adapter: Adapter
    adapted: list
    skipped: list
    adapter_params: int
    trainable_params: int
    total_params: int
    layer_adapters: list = dataclasses.field(default_factory=list)

    @property
    def adapted_paths(self):
        return [row[0] for row in self.adapted]

    def __str__(self):
        header = ("layer", "class", "kernel", "2-D view", "params")
        rows = [
            (path, cls, "x".join(map(str, shape)), f"{d[0]}x{d[1]}", f"{p:,}")
            for path, cls, shape, d, p in self.adapted
        ]
        if any(a is not self.adapter for a in self.layer_adapters):
            # Per-layer configurations (patterns): show each layer's rank and
            # alpha.
            header += ("rank", "alpha")
            rows = [
                row + _rank_and_alpha(a)
                for row, a in zip(rows, self.layer_adapters, strict=True)
            ]
        out = [f"Adapter '{self.name}': {self.adapter!r}"]
        out += format_table(header, rows)
        for path, reason in self.skipped:
            out.append(f"skipped {path}: {reason}")
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        out.append(
            f"{len(self.adapted)} layers adapted, {self.adapter_params:,} adapter "
            f"parameters; trainable {self.trainable_params:,} of "
            f"{self.total_params:,} ({share:.2f}%)"
        )
        return "\n".join(out)


def _rank_and_alpha(adapter):
    rank = getattr(adapter, "rank", None)
    alpha = getattr(adapter, "alpha", None)
    if rank is None:
        return ("-", "-")
    return (str(rank), str(rank if alpha is None else alpha))


def is_task(model):
    try:
        import keras_hub
    except ImportError:
        return False
    return isinstance(model, keras_hub.models.Task)


def adapted_root(model):
    """The part of `model` adapters attach to: a Task's backbone, or itself."""
    return model.backbone if is_task(model) else model


def adapter_state(model):
    """The model's adapter state (groups, active names), or None."""
    return getattr(model, "_keras_adapters_state", None)


def adapted_layers(model: keras.Model) -> list:
    """The layers of `model` that carry an adapter, in layer order."""
    return [
        layer
        for layer, _ in internals.layers_with_parents(model)
        if adapter_layers.is_adapted(layer)
    ]


def adapter_variables(model: keras.Model, names: str | list[str] | None = None) -> list:
    """The adapter variables of `model`.

    Args:
        model: a Keras model.
        names: adapter names to include (a name or a list); all by default.

    Returns:
        A list of variables, in layer order.
    """
    if names is not None:
        names = check_names(model, names, "names")
    return [
        v
        for layer in adapted_layers(model)
        for v in adapter_layers.adapter_variables(layer, names).values()
    ]


def enable_adapter(
    model: keras.Model,
    adapter: Adapter,
    targets=None,
    *,
    keep_trainable=None,
    name: str = "default",
) -> AdapterReport:
    """Attaches `adapter` to the targeted layers of `model` and freezes the rest.

    The targeted `Dense`/`EinsumDense` layers stay where they are (inside
    KerasHub attention blocks, for example); each gets the adapter's
    variables, with paths such as
    `transformer_layer_0/self_attention_layer/query/lora_a`. Every other
    weight of the model is frozen, except for a KerasHub `Task`'s own head
    and the layers named in `keep_trainable`. The adapted model's outputs
    equal the base model's until training changes the adapter.

    Args:
        model: a built Keras model (functional, sequential or subclassed), a
            KerasHub `Backbone`, or a KerasHub `Task` (its backbone is adapted
            and its head stays trainable).
        adapter: an adapter configuration such as `ka.LoRA(rank=8)`.
        targets: which layers to adapt: `ka.attention("query", "value")`
            (the default), a layer name or a regex that fullmatches
            `layer.path`, a callable `layer -> bool`, or a list of these.
        keep_trainable: layers whose weights stay trainable (same forms as
            `targets`), such as a classification head.
        name: the adapter's name; each `enable_adapter` call on a model
            needs its own. A model can hold several named adapters, on the
            same layers or on others; a new adapter is active (applied and
            trained) alongside the active ones: see `set_active_adapters`.

    Returns:
        An `AdapterReport` (adapted and skipped layers, parameter counts).

    Raises:
        ValueError: on a bad argument, a name the model already uses, a
            target matching no layer (the message lists the candidates), or
            no adaptable layer. The model is left unchanged.

    Example:

    ```python
    import keras_adapters as ka
    report = ka.enable_adapter(
        backbone, ka.LoRA(rank=8), targets=ka.attention("query", "value")
    )
    print(report)
    ```
    """
    return _enable(model, adapter, targets, keep_trainable, name)


def _enable(model, adapter, targets, keep_trainable, name, validate=True):
    """`enable_adapter`; `validate=False` skips the adapter's own layer checks
    (`combine_adapters` builds LoRA factors whose rank may exceed a layer's
    dimensions, which is wasteful for training but exact)."""
    check_model(model)
    if not isinstance(adapter, Adapter):
        raise ValueError(
            "`adapter` must be an adapter configuration such as ka.LoRA(rank=8); "
            f"received {adapter!r}."
        )
    _validation.check_name("name", name)
    state = adapter_state(model)
    if state is not None and any(g.name == name for g in state.groups):
        raise ValueError(
            f"Model '{model.name}' already has an adapter named {name!r}; pass "
            "another `name=` or merge_adapters() first."
        )
    root = adapted_root(model)
    if targets is None:
        targets = targeting.attention("query", "value")
    hits = targeting.resolve_targets(root, targets)
    kept_layers = (
        []
        if keep_trainable is None
        else [layer for layer, _ in targeting.resolve_targets(model, keep_trainable)]
    )

    plan, skipped = [], []
    for layer, _ in hits:
        try:
            kernel = adapter_layers.check_supported(layer)
            adapter_layers.check_kind(adapter, kernel)
        except adapter_layers.UnsupportedLayerError as error:
            skipped.append((layer.path or layer.name, str(error)))
            continue
        # The configuration for this layer (per-layer rank and alpha).
        layer_adapter = adapter.for_layer(
            targeting.relative_path(root.name, layer.path)
        )
        if validate:
            layer_adapter.validate(kernel)
        plan.append((layer, kernel, layer_adapter))
    if not plan:
        reasons = "\n".join(f"  {p}: {r}" for p, r in skipped)
        raise ValueError(
            f"No layer of model '{model.name}' can take the adapter; the targets "
            f"matched only:\n{reasons}"
        )
    placement.check_variable_placement(adapter, [layer for layer, _, _ in plan])

    if state is None:
        state = _AdapterState()
        state.saved_flags = _trainable_flags(model)
    attached = []
    try:
        for layer, kernel, layer_adapter in plan:
            adapter_layers.attach(layer, layer_adapter, kernel, name)
            attached.append(layer)
    except BaseException:
        # All or nothing: a failure on one layer leaves no adapter behind.
        for layer in attached:
            adapter_layers.detach(layer, name, merge=False)
        raise
    group = AdapterGroup(
        name=name,
        adapter=adapter,
        layer_paths=tuple(
            targeting.relative_path(root.name, layer.path) for layer, _, _ in plan
        ),
        keep_trainable_paths=tuple(
            targeting.relative_path(model.name, k.path) for k in kept_layers
        ),
    )
    state.groups.append(group)
    state.active.append(name)
    if not isinstance(model, _AdaptedModel):
        internals.switch_class(model, _AdaptedModel, serialize_as_base=False)
    internals.set_untracked_attribute(model, "_keras_adapters_state", state)
    for guarded in {id(model): model, id(root): root}.values():
        internals.guard_model_quantize(guarded, _refuse_quantize)
    _freeze_all_but_adapters(model)
    _forget_compiled_functions(model, warn=True)
    return AdapterReport(
        name=name,
        adapter=adapter,
        adapted=[
            (
                layer.path,
                type(layer).__name__,
                kernel.kernel_shape,
                (kernel.d_in, kernel.d_out),
                _num_parameters(layer_adapter, kernel),
            )
            for layer, kernel, layer_adapter in plan
        ],
        skipped=skipped,
        adapter_params=sum(_num_parameters(a, kernel) for _, kernel, a in plan),
        trainable_params=_count(model.trainable_weights),
        total_params=_count(model.weights),
        layer_adapters=[a for _, _, a in plan],
    )


def _refuse_quantize(model):
    adapted = [layer.path for layer in adapted_layers(model)]
    if adapted:
        raise ValueError(
            f"'{model.name}' has adapters on {adapted}; quantize the model "
            "before enable_adapter() (quantize, then adapt, as QLoRA "
            "does), or merge_adapters() first. Keras would skip the "
            "adapted layers and leave them in float."
        )


def _count(variables):
    return sum(math.prod(v.shape) for v in variables)


def _trainable_flags(model):
    """`[(layer or variable, trainable)]`: layers parents first, then variables."""
    layers = [model] + [layer for layer, _ in internals.layers_with_parents(model)]
    return [(obj, obj.trainable) for obj in layers + list(model.weights)]


def _freeze_all_but_adapters(model):
    """Trainable: adapter variables, a Task's head, `keep_trainable` layers."""
    state = adapter_state(model)
    root = adapted_root(model)
    keep = {id(v) for v in adapter_variables(model, state.active)}
    if root is not model:
        root_ids = {id(v) for v in root.weights}
        keep |= {id(v) for v in model.weights if id(v) not in root_ids}
    kept_paths = {p for g in state.groups for p in g.keep_trainable_paths}
    for layer, _ in internals.layers_with_parents(model):
        if targeting.relative_path(model.name, layer.path) in kept_paths:
            keep |= {id(v) for v in layer.weights}
    freeze_all_but(model, keep - _quantized_storage(model))


def freeze_all_but(model, keep):
    """Makes exactly the variables whose ids are in `keep` trainable.

    Layers are made trainable all the way down and freezing happens per
    variable: a frozen ancestor would hide the chosen variables from
    `trainable_weights`. Only variables created trainable can become
    trainable (normalization statistics stay non-trainable). It goes
    through `trainable = False` first because on the TensorFlow backend
    `layer.trainable = True` on a layer that is already trainable is skipped
    (Keras' tracking short-circuits `self.x = value` when `self.x is
    value`), which would leave frozen variables frozen.

    Then every layer none of whose variables trains is frozen as a layer
    too, since some layers compute differently when frozen:
    `BatchNormalization` then runs in inference mode (its moving statistics
    neither update nor get replaced by batch statistics), as in Keras'
    transfer-learning guide, so training an adapter leaves the base model's
    statistics as they were and an adapter file reproduces the trained model.

    Args:
        model: a Keras model.
        keep: a set of `id(variable)`.
    """
    model.trainable = False
    model.trainable = True
    for variable in model.trainable_weights:
        variable.trainable = id(variable) in keep
    for layer, _ in internals.layers_with_parents(model):
        weights = layer.weights
        if weights and layer.trainable and not any(v.trainable for v in weights):
            layer.trainable = False


def _quantized_storage(model):
    """Ids of what quantized layers hold but their bias and adapters: the
    integer kernel, its scale, zero point and group indices."""
    adapters = {id(v) for v in adapter_variables(model)}
    frozen = set()
    for layer, _ in internals.layers_with_parents(model):
        if quantization_mode(layer) is not None:
            bias = getattr(layer, "bias", None)
            frozen |= {id(v) for v in layer.weights if v is not bias}
    return frozen - adapters


def _forget_compiled_functions(model, warn=False):
    internals.reset_compiled_functions(model)
    optimizer = getattr(model, "optimizer", None)
    if (
        warn
        and optimizer is not None
        and optimizer.built
        and not internals.optimizer_tracks(optimizer, model.trainable_variables)
    ):
        warnings.warn(
            f"Model '{model.name}' was compiled and its optimizer built before "
            "its trainable adapters changed; call model.compile(...) again before "
            "fit() so the optimizer tracks the new trainable variables "
            "(predict() and evaluate() need nothing).",
            stacklevel=3,
        )


def _check_optimizer_tracks_trainables(model):
    # Keras would fail later, inside the optimizer, with a less clear message.
    optimizer = getattr(model, "optimizer", None)
    if (
        optimizer is not None
        and optimizer.built
        and not internals.optimizer_tracks(optimizer, model.trainable_variables)
    ):
        raise ValueError(
            f"Model '{model.name}' has other trainable variables than its optimizer "
            "was built for (adapters were enabled, switched, merged or deleted "
            "since); call model.compile(...) again, with a new optimizer, before "
            "training."
        )


def check_names(model, names, argument):
    """`names` (a name or a list of names of the model's adapters) as a list."""
    known = [g.name for g in adapter_groups(model)]
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(
        isinstance(n, str) for n in names
    ):
        raise ValueError(
            f"`{argument}` must be an adapter name or a list of names; received "
            f"{names!r}."
        )
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"Unknown adapter names {unknown} in `{argument}`; model "
            f"'{model.name}' has {known}."
        )
    return list(dict.fromkeys(names))


def delete_adapter(model: keras.Model, name: str) -> None:
    """Removes adapter `name` and its variables without merging it.

    The base weights do not change. Once no adapter is left, the trainable
    flags the model had before `enable_adapter` are restored.

    Args:
        model: a model with adapters.
        name: the adapter to delete.

    Raises:
        ValueError: on an unknown name.

    Example:

    ```python
    ka.delete_adapter(model, "news")
    ```
    """
    check_model(model)
    if not isinstance(name, str):
        raise ValueError(f"`name` must be an adapter name; received {name!r}.")
    (name,) = check_names(model, [name], "name")
    for layer in adapted_layers(model):
        if name in adapter_layers.slots(layer):
            adapter_layers.detach(layer, name, merge=False)
    remove_groups(model, [name])


def remove_groups(model, names):
    """Forgets the groups of adapters `names` (already detached)."""
    state = adapter_state(model)
    state.groups = [g for g in state.groups if g.name not in names]
    state.active = [n for n in state.active if n not in names]
    if state.groups:
        _apply_active(model)
    else:
        _restore(model, state)
        _forget_compiled_functions(model)


def adapter_names(model: keras.Model) -> list:
    """The names of the adapters of `model`, in the order they were added."""
    return [g.name for g in adapter_groups(model)]


def active_adapters(model: keras.Model) -> list:
    """The names of the adapters `model` applies and trains."""
    state = adapter_state(model)
    return list(state.active) if state is not None else []


class _ActiveAdapters:
    """Returned by `set_active_adapters`; as a context manager, it restores
    the previously active adapters on exit."""

    def __init__(self, model, previous):
        self._model = model
        self._previous = previous

    def __enter__(self):
        return self._model

    def __exit__(self, *exc_info):
        state = adapter_state(self._model)
        if state is not None:
            previous = [n for n in self._previous if n in adapter_names(self._model)]
            set_active_adapters(self._model, previous)
        return False


def set_active_adapters(
    model: keras.Model, names: str | list[str]
) -> "_ActiveAdapters":
    """Chooses which of the model's adapters apply (and train).

    Active adapters change the outputs and are trainable; inactive ones keep
    their values, are frozen, and cost nothing in the forward pass. The
    model's compiled functions are dropped, so the next `predict`, `evaluate`
    or `fit` traces (and, with `jit_compile=True`, compiles) again: each
    switch costs one compilation (see `docs/multiple_adapters.md`). To
    train other adapters than the ones an already-built optimizer tracks,
    call `model.compile(...)` again (`fit` raises a `ValueError` saying so
    otherwise).

    Also usable as a context manager, which restores the previously active
    adapters on exit.

    Args:
        model: a model with adapters.
        names: an adapter name or a list of names; `[]` disables all.

    Returns:
        A context manager (see above); using it is optional.

    Raises:
        ValueError: on an unknown name. Nothing changes then.

    Example:

    ```python
    ka.set_active_adapters(model, ["news"])
    with ka.set_active_adapters(model, "sports"):
        sports_predictions = model.predict(x)
    ```
    """
    check_model(model)
    state = adapter_state(model)
    if state is None:
        raise ValueError(
            f"Model '{model.name}' has no adapters; enable_adapter() first."
        )
    names = check_names(model, names, "names")
    previous = list(state.active)
    # Keep the order in which the adapters were added.
    state.active = [n for n in adapter_names(model) if n in names]
    _apply_active(model)
    return _ActiveAdapters(model, previous)


def disable_adapters(model: keras.Model) -> "_ActiveAdapters":
    """Deactivates every adapter: the model computes its base outputs.

    Same as `set_active_adapters(model, [])`; as a context manager, it
    re-activates the previously active adapters on exit.

    Example:

    ```python
    with ka.disable_adapters(model):
        base_predictions = model.predict(x)
    ```
    """
    return set_active_adapters(model, [])


def _apply_active(model):
    state = adapter_state(model)
    for layer in adapted_layers(model):
        for name, slot in adapter_layers.slots(layer).items():
            slot.active = name in state.active
    _freeze_all_but_adapters(model)
    _forget_compiled_functions(model)


def combine_adapters(model: keras.Model, weights: dict, name: str) -> AdapterReport:
    """Adds an adapter that is a weighted sum of adapters of the same method.

    The new adapter's update is exactly `sum_i w_i * delta_i`, where
    `delta_i` is adapter i's update of a layer (zero on layers it does not
    adapt). How a method combines is its own (`Adapter.combine`): for LoRA,
    `delta_i = s_i A_i B_i` and the new factors are the adapters' factors
    side by side, `A = [A_1, A_2, ...]` and `B = [w_1 s_1 B_1; w_2 s_2 B_2;
    ...]`, so its rank is the sum of the ranks and its scale 1, with no
    dropout. The new adapter covers every layer one of the adapters covers
    and starts inactive: `set_active_adapters(model, [name])` switches to
    it. The combined adapters are left as they are.

    Args:
        model: a model with adapters of a method that supports combining
            (LoRA).
        weights: `{adapter name: weight}`, at least one entry; weights are
            any finite numbers (negative ones subtract an update).
        name: the new adapter's name.

    Returns:
        The new adapter's `AdapterReport`.

    Raises:
        ValueError: on unknown names, adapters whose method cannot combine
            or that mix methods, a weight that is not a finite number, or a
            name the model already uses. Nothing changes then.

    Example:

    ```python
    ka.combine_adapters(model, {"news": 0.7, "sports": 0.3}, name="mix")
    ka.set_active_adapters(model, ["mix"])
    ```
    """
    check_model(model)
    if not isinstance(weights, dict) or not weights:
        raise ValueError(
            "`weights` must be a non-empty dict {adapter name: weight}; received "
            f"{weights!r}."
        )
    names = check_names(model, list(weights), "weights")
    coefficients = [
        _validation.check_number(f"weights[{key!r}]", weights[key]) for key in names
    ]
    _validation.check_name("name", name)
    groups = {g.name: g for g in adapter_groups(model)}
    if name in groups:
        raise ValueError(
            f"Model '{model.name}' already has an adapter named {name!r}; pass "
            "another `name=`."
        )
    adapters = [groups[n].adapter for n in names]
    # The method of the first adapter decides (and refuses other methods).
    combined = type(adapters[0]).combine(adapters, coefficients)
    root = adapted_root(model)
    paths = list(dict.fromkeys(p for n in names for p in groups[n].layer_paths))
    stacked = [
        layer.path
        for layer in adapted_layers(model)
        if layer._keras_adapters_kernel.stack_shape
        and targeting.relative_path(root.name, layer.path) in paths
    ]
    if stacked:
        raise ValueError(
            f"combine_adapters does not support adapters on stacked expert "
            f"weights; the adapters {names} adapt {stacked}."
        )
    active = list(adapter_state(model).active)
    with warnings.catch_warnings():
        # The optimizer check runs once, after the active set is restored.
        warnings.simplefilter("ignore")
        report = _enable(
            model,
            combined,
            targeting.PathsTarget(tuple(paths), root.name),
            None,
            name,
            validate=False,
        )
    for layer in adapted_layers(model):
        layer_slots = adapter_layers.slots(layer)
        if name not in layer_slots:
            continue
        new = layer_slots[name]
        parts = [
            (adapter, layer_slots.get(n), c)
            for n, adapter, c in zip(names, adapters, coefficients, strict=True)
        ]
        for short, value in combined.combined_values(parts, new.kernel).items():
            new[short].assign(value)
    set_active_adapters(model, active)
    return report


def _num_parameters(adapter, kernel):
    """The adapter's parameters on one layer: per kernel of a stack (the
    experts of an MoE layer) times the stack size."""
    return adapter.num_parameters(kernel) * math.prod(kernel.stack_shape)


def _restore(model, state):
    # Setting a layer's `trainable` also sets its sublayers' and variables',
    # so parents go first and variables last.
    for obj, flag in state.saved_flags:
        obj.trainable = flag
    object.__delattr__(model, "_keras_adapters_state")
    internals.restore_class(model)


def enable_groups(model, groups, active=None):
    """Re-attaches saved `AdapterGroup`s to exactly the layers they name.

    `active`: the names among them to leave active (all by default).
    """
    root = adapted_root(model)
    groups = list(groups)
    for group in groups:
        keep = group.keep_trainable_paths
        # The adapter was valid on these layers when it was saved (or built
        # by combine_adapters, which may exceed a layer's rank). Its values
        # are loaded next: initializations computed from the base kernel
        # (PiSSA's SVD) are skipped.
        with restoring():
            _enable(
                model,
                group.adapter,
                targeting.PathsTarget(group.layer_paths, root.name),
                targeting.PathsTarget(keep, model.name) if keep else None,
                group.name,
                validate=False,
            )
    if active is not None:
        added = {g.name for g in groups}
        others = [n for n in active_adapters(model) if n not in added]
        set_active_adapters(model, others + [n for n in active if n in added])


def adapter_groups(model):
    """The `AdapterGroup`s of `model` (empty if it has no adapters)."""
    state = adapter_state(model)
    return list(state.groups) if state is not None else []


@keras.saving.register_keras_serializable(package="keras_adapters", name="AdaptedModel")
class _AdaptedModel:
    """Methods a model gets while it has adapters.

    Its config wraps the original model's config with the adapters, so that
    `keras.saving.load_model` rebuilds the original model, re-attaches the
    adapters, and then loads every weight, adapter variables included.
    """

    def save(self, filepath, overwrite=True, zipped=None, **kwargs):
        """`keras.Model.save`, crash-safe for `.keras` files.

        Keras writes a `.keras` file in place, so a process killed while
        saving would destroy the file at `filepath`. Here the file is
        written to a temporary file next to it and renamed over it (see
        `keras_adapters._io.atomic_file`): `filepath` always holds the old
        or the new complete file.
        """
        atomic = (
            isinstance(filepath, (str, os.PathLike))
            and str(filepath).endswith(".keras")
            and zipped is not False
            and (overwrite or not os.path.exists(filepath))
        )
        if not atomic:
            return super().save(filepath, overwrite=overwrite, zipped=zipped, **kwargs)
        # Keras opens the file before it serializes the config; checking the
        # config first means a model that cannot be saved writes nothing.
        self.get_config()
        with _io.atomic_file(filepath, suffix=".keras") as tmp:
            return super().save(tmp, overwrite=True, zipped=zipped, **kwargs)

    def get_config(self):
        base_class = internals.base_class(self)
        message = (
            f"Model '{self.name}' ({base_class.__name__}) cannot be saved as "
            ".keras with its adapters: {}. Save the adapters alone with "
            "ka.save_adapter_weights(model, path) and load them into a freshly "
            "built model with ka.load_adapter_weights(model, path)."
        )
        if not internals.is_deserializable(base_class):
            raise NotImplementedError(
                message.format(
                    "its class is not registered with "
                    "@keras.saving.register_keras_serializable(), so Keras could "
                    "not load it back"
                )
            )
        try:
            config = super().get_config()
        except NotImplementedError:
            raise NotImplementedError(
                message.format("it has no get_config()")
            ) from None
        base = internals.serialize_class_config(base_class, config)
        # The base must be built before adapters attach, so it carries its
        # own build config (Keras applies the outer one only afterwards).
        build_config = self.get_build_config()
        if build_config is not None:
            base["build_config"] = build_config
        return {
            "base": base,
            "adapters": [g.to_config() for g in self._keras_adapters_state.groups],
            "active": list(self._keras_adapters_state.active),
        }

    def fit(self, *args, **kwargs):
        _check_optimizer_tracks_trainables(self)
        return super().fit(*args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        _check_optimizer_tracks_trainables(self)
        return super().train_on_batch(*args, **kwargs)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        groups = [AdapterGroup.from_config(g) for g in config["adapters"]]
        active = config.get("active")
        names = [g.name for g in groups]
        unknown = [n for n in active or () if n not in names]
        if unknown:
            raise ValueError(
                f"The saved model's active adapters {unknown} are not among its "
                f"adapters {names}; the file is inconsistent (was it edited?)."
            )
        model = keras.saving.deserialize_keras_object(
            config["base"], custom_objects=custom_objects
        )
        enable_groups(model, groups, active=active)
        return model

    @property
    def adapter_names(self):
        """The names of this model's adapters (see `ka.adapter_names`)."""
        return adapter_names(self)

    @property
    def active_adapters(self):
        """The names of the active adapters (see `ka.set_active_adapters`)."""
        return active_adapters(self)
