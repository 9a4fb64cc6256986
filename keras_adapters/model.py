"""`enable_adapter`, `merge_adapters` and the adapter state of a model."""

import dataclasses
import math
import warnings

import keras

from keras_adapters import _keras_internals as internals
from keras_adapters import distribution as adapter_distribution
from keras_adapters import layers as adapter_layers
from keras_adapters import quantization
from keras_adapters import targeting
from keras_adapters.adapters.base import Adapter


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
        # Trainable flags before the first adapter, restored after the last
        # adapter is merged.
        self.saved_flags = []


@dataclasses.dataclass
class AdapterReport:
    """What `enable_adapter` did. `print(report)` shows a table.

    Attributes:
        name: the adapter's name.
        adapter: the adapter configuration.
        adapted: `[(path, layer class, kernel shape, (d_in, d_out), params)]`.
        skipped: `[(path, reason)]` for matched layers left alone.
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

    @property
    def adapted_paths(self):
        return [row[0] for row in self.adapted]

    def __str__(self):
        header = ("layer", "class", "kernel", "2-D view", "params")
        rows = [
            (path, cls, "x".join(map(str, shape)), f"{d[0]}x{d[1]}", f"{p:,}")
            for path, cls, shape, d, p in self.adapted
        ]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
        line = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [f"Adapter '{self.name}': {self.adapter!r}", line.format(*header)]
        out += [line.format(*r) for r in rows]
        for path, reason in self.skipped:
            out.append(f"skipped {path}: {reason}")
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        out.append(
            f"{len(self.adapted)} layers adapted, {self.adapter_params:,} adapter "
            f"parameters; trainable {self.trainable_params:,} of "
            f"{self.total_params:,} ({share:.2f}%)"
        )
        return "\n".join(out)


def _is_task(model):
    try:
        import keras_hub
    except ImportError:
        return False
    return isinstance(model, keras_hub.models.Task)


def _adapted_root(model):
    """The part of `model` adapters attach to: a Task's backbone, or itself."""
    return model.backbone if _is_task(model) else model


def _state(model):
    return getattr(model, "_keras_adapters_state", None)


def adapted_layers(model):
    """The layers of `model` that carry an adapter, in layer order."""
    return [
        layer
        for layer, _ in internals.layers_with_parents(model)
        if adapter_layers.is_adapted(layer)
    ]


def adapter_variables(model):
    """All adapter variables of `model`."""
    return [
        v
        for layer in adapted_layers(model)
        for v in adapter_layers.adapter_variables(layer).values()
    ]


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Expected a Keras model, received {type(model).__name__}: {model!r}."
        )
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built; call it on data or call build() "
            "before enabling adapters."
        )


def enable_adapter(
    model,
    adapter,
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
            needs its own.

    Returns:
        An `AdapterReport` (adapted and skipped layers, parameter counts).

    Raises:
        ValueError: on a bad argument, a target matching no layer (the
            message lists the candidates), a layer that is already adapted,
            or no adaptable layer. The model is left unchanged.

    Example:

    ```python
    import keras_adapters as ka
    report = ka.enable_adapter(
        backbone, ka.LoRA(rank=8), targets=ka.attention("query", "value")
    )
    print(report)
    ```
    """
    _check_model(model)
    if not isinstance(adapter, Adapter):
        raise ValueError(
            "`adapter` must be an adapter configuration such as ka.LoRA(rank=8); "
            f"received {adapter!r}."
        )
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(
            f"`name` must be a non-empty identifier string; received {name!r}."
        )
    state = _state(model)
    if state is not None and any(g.name == name for g in state.groups):
        raise ValueError(
            f"Model '{model.name}' already has an adapter named {name!r}; pass "
            "another `name=` or merge_adapters() first."
        )
    root = _adapted_root(model)
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
        if adapter_layers.is_adapted(layer):
            raise ValueError(
                f"Layer '{layer.path}' already has an adapter "
                f"('{layer._keras_adapters_name}'); a layer is adapted at most "
                "once. merge_adapters() first to stack a new adapter on it."
            )
        try:
            view = adapter_layers.check_supported(layer)
        except adapter_layers.UnsupportedLayerError as error:
            skipped.append((layer.path or layer.name, str(error)))
            continue
        adapter.validate(layer, view)
        plan.append((layer, view))
    if not plan:
        reasons = "\n".join(f"  {p}: {r}" for p, r in skipped)
        raise ValueError(
            f"No layer of model '{model.name}' can take the adapter; the targets "
            f"matched only:\n{reasons}"
        )
    adapter_distribution.check_variable_placement(adapter, [layer for layer, _ in plan])

    if state is None:
        state = _AdapterState()
        state.saved_flags = _trainable_flags(model)
    for layer, view in plan:
        adapter_layers.attach(layer, adapter, view, name)
    group = AdapterGroup(
        name=name,
        adapter=adapter,
        layer_paths=tuple(
            targeting.relative_path(root.name, layer.path) for layer, _ in plan
        ),
        keep_trainable_paths=tuple(
            targeting.relative_path(model.name, k.path) for k in kept_layers
        ),
    )
    state.groups.append(group)
    if not isinstance(model, _AdaptedModel):
        internals.switch_class(model, _AdaptedModel, serialize_as_base=False)
    internals.set_untracked_attribute(model, "_keras_adapters_state", state)
    quantization.guard_quantize(model, root)
    _freeze_all_but_adapters(model)
    _forget_compiled_functions(model, warn=True)
    return AdapterReport(
        name=name,
        adapter=adapter,
        adapted=[
            (
                layer.path,
                type(layer).__name__,
                view.kernel_shape,
                (view.d_in, view.d_out),
                adapter.num_parameters(view),
            )
            for layer, view in plan
        ],
        skipped=skipped,
        adapter_params=sum(adapter.num_parameters(view) for _, view in plan),
        trainable_params=_count(model.trainable_weights),
        total_params=_count(model.weights),
    )


def _count(variables):
    return sum(math.prod(v.shape) for v in variables)


def _trainable_flags(model):
    """`[(layer or variable, trainable)]`: layers parents first, then variables."""
    layers = [model] + [layer for layer, _ in internals.layers_with_parents(model)]
    return [(obj, obj.trainable) for obj in layers + list(model.weights)]


def _freeze_all_but_adapters(model):
    """Trainable: adapter variables, a Task's head, `keep_trainable` layers."""
    state = _state(model)
    root = _adapted_root(model)
    keep = {id(v) for v in adapter_variables(model)}
    if root is not model:
        root_ids = {id(v) for v in root.weights}
        keep |= {id(v) for v in model.weights if id(v) not in root_ids}
    kept_paths = {p for g in state.groups for p in g.keep_trainable_paths}
    for layer, _ in internals.layers_with_parents(model):
        if targeting.relative_path(model.name, layer.path) in kept_paths:
            keep |= {id(v) for v in layer.weights}
    # A frozen ancestor would hide the adapters from `trainable_weights`, so
    # every layer is marked trainable and freezing happens per variable.
    model.trainable = True
    keep -= quantization.quantized_storage(model)  # int kernels stay frozen
    for variable in model.weights:
        variable.trainable = id(variable) in keep


def _forget_compiled_functions(model, warn=False):
    internals.reset_compiled_functions(model)
    optimizer = getattr(model, "optimizer", None)
    if warn and optimizer is not None and optimizer.built:
        warnings.warn(
            f"Model '{model.name}' was compiled and its optimizer built before "
            "its adapters changed; call model.compile(...) again before fit() so "
            "the optimizer tracks the new trainable variables.",
            stacklevel=3,
        )


def merge_adapters(model, names=None, *, quantized=None):
    """Folds adapters into their base kernels, leaving plain Keras layers.

    Each adapted layer's kernel becomes the adapted kernel (computed in
    float32, then cast to the kernel's own dtype), its adapter variables are
    removed, and it is again an instance of its original class. The model's
    outputs do not change. Once the last adapter is merged, the trainable
    flags the model had before `enable_adapter` are restored.

    Merging into an int8/int4 (quantized) kernel is explicit: it raises a
    `ValueError` unless `quantized` says how (see
    `keras_adapters.quantization` and docs/quantized_bases.md).

    Args:
        model: a model with adapters.
        names: adapter names to merge; all of them by default.
        quantized: for adapters on quantized layers: `"float"` (the layer
            becomes a float layer with the exact merged kernel) or
            `"requantize"` (the merged kernel is re-quantized to the layer's
            mode by Keras). Required if a merged layer is quantized.

    Returns:
        The paths of the merged layers; with `quantized`, a
        `ka.quantization.QuantizedMergeReport` (its `paths`, and the kernel
        error of each quantized layer).

    Example:

    ```python
    ka.merge_adapters(classifier)
    classifier.export("serving", format="tf_saved_model")
    ```
    """
    _check_model(model)
    state = _state(model)
    if state is None or not state.groups:
        raise ValueError(
            f"Model '{model.name}' has no adapters to merge; enable_adapter() first."
        )
    known = [g.name for g in state.groups]
    if names is None:
        names = known
    elif isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"Unknown adapter names {unknown}; the model has {known}.")
    layers = [x for x in adapted_layers(model) if x._keras_adapters_name in names]
    quantization.check_merge_choice(layers, quantized)
    merged, quantized_merges = [], []
    for layer in layers:
        if quantization.quantization_mode(layer) is not None:
            quantized_merges.append(quantization.merge_layer(layer, quantized))
        else:
            adapter_layers.detach(layer, merge=True)
        merged.append(layer.path)
    state.groups = [g for g in state.groups if g.name not in names]
    if state.groups:
        _freeze_all_but_adapters(model)
    else:
        _restore(model, state)
    _forget_compiled_functions(model)
    if quantized is not None:
        return quantization.QuantizedMergeReport(quantized, merged, quantized_merges)
    return merged


def _restore(model, state):
    # Setting a layer's `trainable` also sets its sublayers' and variables',
    # so parents go first and variables last.
    for obj, flag in state.saved_flags:
        obj.trainable = flag
    object.__delattr__(model, "_keras_adapters_state")
    internals.restore_class(model)


def enable_groups(model, groups):
    """Re-attaches saved `AdapterGroup`s to exactly the layers they name."""
    root = _adapted_root(model)
    for group in groups:
        keep = group.keep_trainable_paths
        enable_adapter(
            model,
            group.adapter,
            targets=targeting.PathsTarget(group.layer_paths, root.name),
            keep_trainable=(targeting.PathsTarget(keep, model.name) if keep else None),
            name=group.name,
        )


def adapter_groups(model):
    """The `AdapterGroup`s of `model` (empty if it has no adapters)."""
    state = _state(model)
    return list(state.groups) if state is not None else []


@keras.saving.register_keras_serializable(package="keras_adapters", name="AdaptedModel")
class _AdaptedModel:
    """Methods a model gets while it has adapters.

    Its config wraps the original model's config with the adapters, so that
    `keras.saving.load_model` rebuilds the original model, re-attaches the
    adapters, and then loads every weight, adapter variables included.
    """

    def save(self, filepath, *args, **kwargs):
        # Keras opens the file before it serializes the config; checking the
        # config first means a model that cannot be saved leaves no broken
        # (or overwritten) file behind.
        if str(filepath).endswith(".keras"):
            self.get_config()
        return super().save(filepath, *args, **kwargs)

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
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        model = keras.saving.deserialize_keras_object(
            config["base"], custom_objects=custom_objects
        )
        enable_groups(model, map(AdapterGroup.from_config, config["adapters"]))
        return model
