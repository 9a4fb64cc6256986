"""Folding adapters into base kernels: float and quantized merges."""

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_adapters import _keras_internals as internals
from keras_adapters import layers as adapter_layers
from keras_adapters import model as model_lib
from keras_adapters._tables import format_table
from keras_adapters.kernels import frozen_kernel
from keras_adapters.kernels import quantization_mode
from keras_adapters.kernels.quantized import activation_quantizer

MERGE_CHOICES = ("float", "requantize")


def merge_adapters(
    model: keras.Model,
    names: str | list[str] | None = None,
    *,
    quantized: str | None = None,
) -> "list | QuantizedMergeReport":
    """Folds adapters into their base kernels, leaving plain Keras layers.

    Each adapter's update is computed in float32 and folded into the kernel
    (cast to the kernel's own dtype); its variables are removed, and a layer
    left without adapters is again an instance of its original class. The
    model's outputs do not change. Once no adapter is left, the trainable
    flags the model had before `enable_adapter` are restored.

    Where several adapters share a layer, the active ones apply in the order
    they were added (additive ones, like LoRA, in any order). Merging some of
    them must keep that order exact: the adapters merged on a layer must
    come before the ones kept there, unless all of them are additive.

    Merging into an int8/int4 (quantized) kernel is explicit: it raises a
    `ValueError` unless `quantized` says how (see
    `keras_adapters.quantization` and docs/quantized_bases.md), and every
    adapter on such a layer must be merged together.

    Args:
        model: a model with adapters.
        names: adapter names to merge (a name or a list). By default, the
            active adapters (see `set_active_adapters`): the model keeps
            computing what it computes now, and inactive adapters stay as
            they are. Naming an inactive adapter folds it in too.
        quantized: for adapters on quantized layers: `"float"` (the layer
            becomes a float layer with the exact merged kernel) or
            `"requantize"` (the merged kernel is re-quantized to the layer's
            mode by Keras). Required if a merged layer is quantized.

    Returns:
        The paths of the layers whose kernels changed; with `quantized`, a
        `ka.quantization.QuantizedMergeReport` (its `paths`, and the kernel
        error of each quantized layer).

    Raises:
        ValueError: if the model has no adapters (or no active ones, with
            `names=None`), on an unknown name, or if merging `names` would
            change the order of non-additive adapters on a layer. Nothing
            changes then.

    Example:

    ```python
    ka.merge_adapters(classifier)
    classifier.export("serving", format="tf_saved_model")
    ```
    """
    model_lib.check_model(model)
    state = model_lib.adapter_state(model)
    if state is None or not state.groups:
        raise ValueError(
            f"Model '{model.name}' has no adapters to merge; enable_adapter() first."
        )
    if names is None:
        names = list(state.active)
        if not names:
            raise ValueError(
                f"Model '{model.name}' has no active adapters (it has "
                f"{model_lib.adapter_names(model)}); pass `names=` to merge "
                "inactive ones."
            )
    names = model_lib.check_names(model, names, "names")
    layers = [
        layer
        for layer in model_lib.adapted_layers(model)
        if any(n in names for n in adapter_layers.slots(layer))
    ]
    for layer in layers:
        order = list(adapter_layers.slots(layer).items())
        kept = [n for n, _ in order if n not in names]
        first_kept = min((i for i, (n, _) in enumerate(order) if n in kept), default=0)
        late = [n for i, (n, _) in enumerate(order) if n in names and i > first_kept]
        if kept and late and not all(s.adapter.additive for _, s in order):
            raise ValueError(
                f"Layer '{layer.path}' has the adapters {[n for n, _ in order]} "
                f"(applied in this order); merging {late} before {kept} would "
                "change the layer, since they are not all additive. Merge the "
                "earlier adapters too, or delete_adapter() the ones before."
            )
    _check_merge_choice(layers, quantized, names)
    merged, quantized_merges = [], []
    for layer in layers:
        if quantization_mode(layer) is not None:
            quantized_merges.append(_merge_quantized_layer(layer, quantized, names))
        else:
            for name in list(adapter_layers.slots(layer)):
                if name in names:
                    adapter_layers.detach(layer, name, merge=True)
        merged.append(layer.path)
    model_lib.remove_groups(model, names)
    if quantized is not None:
        return QuantizedMergeReport(quantized, merged, quantized_merges)
    return merged


@dataclasses.dataclass
class QuantizedLayerMerge:
    """How one quantized layer was merged.

    Attributes:
        path: the layer's path.
        base_mode: its quantization mode before merging (`"int8"`, `"int4"`).
        result: `"float"` or the mode it was re-quantized to.
        activations_quantized: whether the base layer quantized its inputs
            (Keras' int8 default). After a `"float"` merge the layer no
            longer does, so its outputs differ from the adapted layer's by
            that quantization error.
        kernel_max_abs_error: `max |W_written - W'|`, where `W'` is the
            exact merged kernel (float32) and `W_written` the kernel the
            layer now computes with (dequantized, for `"requantize"`).
        kernel_relative_error: `||W_written - W'||_F / ||W'||_F`.
    """

    path: str
    base_mode: str
    result: str
    activations_quantized: bool
    kernel_max_abs_error: float
    kernel_relative_error: float


@dataclasses.dataclass
class QuantizedMergeReport:
    """What `merge_adapters(model, quantized=...)` did.

    Attributes:
        quantized: the choice, `"float"` or `"requantize"`.
        paths: the merged layers' paths (float and quantized ones), as
            `merge_adapters` returns them without `quantized`.
        layers: a `QuantizedLayerMerge` per merged quantized layer.
        output_max_abs_error: `max |y_merged - y_adapted|` on the sample
            inputs given to `merge_and_measure`, else None.
        output_relative_error: `||y_merged - y_adapted||_F /
            ||y_adapted||_F` on those inputs, else None.
    """

    quantized: str
    paths: list
    layers: list
    output_max_abs_error: float | None = None
    output_relative_error: float | None = None

    @property
    def max_kernel_relative_error(self) -> float:
        return max((r.kernel_relative_error for r in self.layers), default=0.0)

    def __str__(self):
        header = ("layer", "base", "now", "act. quant.", "max abs err", "rel err")
        rows = [
            (
                r.path,
                r.base_mode,
                r.result,
                "yes" if r.activations_quantized else "no",
                f"{r.kernel_max_abs_error:.3g}",
                f"{r.kernel_relative_error:.3g}",
            )
            for r in self.layers
        ]
        out = [f"Merged {len(self.paths)} layers (quantized={self.quantized!r})"]
        out += format_table(header, rows)
        if self.output_relative_error is not None:
            out.append(
                f"outputs: max abs error {self.output_max_abs_error:.3g}, "
                f"relative error {self.output_relative_error:.3g}"
            )
        return "\n".join(out)


def _check_merge_choice(layers, quantized, names):
    """Raises `ValueError` unless merging adapters `names` of `layers` is
    allowed as asked.

    Runs before anything changes.
    """
    for layer in layers:
        on_layer = list(adapter_layers.slots(layer))
        kept = [n for n in on_layer if n not in names]
        if quantization_mode(layer) is not None and kept:
            raise ValueError(
                f"Layer '{layer.path}' is quantized ({quantization_mode(layer)}) "
                f"and has the adapters {on_layer}; merging into its kernel replaces "
                f"the kernel, so merge all of them together (names={on_layer}), or "
                f"delete_adapter() {kept} first. Nothing was changed."
            )
    if quantized is not None and quantized not in MERGE_CHOICES:
        raise ValueError(
            f"`quantized` must be one of {MERGE_CHOICES} or None; received "
            f"{quantized!r}."
        )
    found = [(layer.path, quantization_mode(layer)) for layer in layers]
    found = [(path, mode) for path, mode in found if mode is not None]
    if found and quantized is None:
        listed = ", ".join(f"{path} ({mode})" for path, mode in found)
        raise ValueError(
            f"Cannot merge adapters into quantized kernels without a choice: "
            f"{listed}. Pass quantized='float' (the layers become float "
            "layers with the exact merged kernel) or quantized='requantize' "
            "(the merged kernel is re-quantized to the same mode; the "
            "returned report gives the error). Nothing was changed."
        )


def _merge_quantized_layer(layer, quantized, names):
    """Merges the adapters `names` (all it has) of one int8/int4 `layer`; see
    `merge_adapters`.

    Returns:
        A `QuantizedLayerMerge`.
    """
    slots = [s for n, s in adapter_layers.slots(layer).items() if n in names]
    merged = adapter_layers.composed_kernel(layer, slots)
    merged = np.asarray(ops.convert_to_numpy(merged), "float32")
    base_mode = quantization_mode(layer)
    activations = activation_quantizer(layer) is not None
    config = _requantize_config(layer)
    for slot in slots:
        adapter_layers.detach(layer, slot.name, merge=False)
    internals.replace_quantized_kernel(layer, merged, _float_policy(layer))
    if quantized == "requantize":
        internals.quantize_layer(layer, base_mode, config)
        written = frozen_kernel(layer).dense()
    else:
        written = internals.kernel_variable(layer)
    written = np.asarray(ops.convert_to_numpy(written), "float64")
    error = written - merged.astype("float64")
    norm = max(float(np.linalg.norm(merged)), 1e-30)
    return QuantizedLayerMerge(
        path=layer.path,
        base_mode=base_mode,
        result="float" if quantized == "float" else base_mode,
        activations_quantized=activations,
        kernel_max_abs_error=float(np.max(np.abs(error))),
        kernel_relative_error=float(np.linalg.norm(error)) / norm,
    )


def _layer_policy(layer):
    """The layer's own dtype policy, also inside a `DTypePolicyMap`.

    Models loaded from a config (`.keras` files) keep the policies of their
    quantized layers in one map keyed by layer path.
    """
    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        policy = policy[layer.path]
    return policy


def _float_policy(layer):
    """The float policy a quantized layer was quantized from."""
    policy = _layer_policy(layer)
    compute, variable = policy.compute_dtype, policy.variable_dtype
    return variable if compute == variable else f"mixed_{compute}"


def _requantize_config(layer):
    """The config that quantizes `layer` again as it is quantized now.

    The config `quantize` was given if the layer still has it; a layer
    rebuilt from a config (a `.keras` file) has only its policy, so the
    block size comes from there and the activation quantizer from the layer.
    """
    config = getattr(layer, "quantization_config", None)
    if config is not None:
        return config
    inputs = getattr(layer, "inputs_quantizer", None)
    if quantization_mode(layer) == "int4":
        block = getattr(_layer_policy(layer), "block_size", None)
        return keras.quantizers.Int4QuantizationConfig(
            block_size=-1 if block is None else block,
            activation_quantizer=inputs,
        )
    return keras.quantizers.Int8QuantizationConfig(activation_quantizer=inputs)
