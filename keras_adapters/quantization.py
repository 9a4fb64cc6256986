"""Adapters over quantized bases (QLoRA-style) and merging into them.

Keras quantizes a built model in place with `model.quantize("int8")` or
`model.quantize("int4")`: each `Dense`/`EinsumDense` kernel becomes a frozen
integer variable (int4 values packed two per byte) plus a float
`kernel_scale` (and, for int4 with a `block_size`, a zero point and group
indices). keras_adapters attaches LoRA, HUT, GOFT and qGOFT to such layers
and trains them on top of the frozen quantized kernel.

**What an adapted quantized layer computes.** With `q(x)` the layer's own
activation quantize-dequantize (Keras' int8 default quantizes the inputs of
every matmul per token, "W8A8"; int4 and int8 configured with
`activation_quantizer=None` are weight-only, and `q(x) = x`) and
`W = dequantize(W_int, scale)` the frozen kernel dequantized on the fly:

    y = project(q(x), W')  with  W' = adapter(W)  (+ bias, activation)

that is, exactly the float adapter applied to the dequantized kernel, fed
with the inputs Keras' quantized layer would use. The adapter math runs in
float32 (as on a float base); each method keeps its fast path (LoRA adds
`s (q(x) A) B`, GOFT/qGOFT rotate `q(x)`; HUT materializes `W'`). Before
training the output equals Keras' quantized layer's up to float rounding
(Keras multiplies int8 by int8 exactly in int32 and rescales once; here the
dequantized values are multiplied in float).

The base projection `project(q(x), W)` dequantizes the kernel inside a
custom gradient: the backward pass dequantizes it again instead of keeping a
float copy of every kernel alive between the forward and the backward pass
(QLoRA dequantizes per matmul for the same reason), and the gradient
passes straight through `q` (as in Keras' own quantized layers). Nothing
differentiates the integer kernel or its scale: they are never trainable,
so `fit` leaves them bit-identical.

**Order.** Quantize first, then `enable_adapter` (the QLoRA workflow).
Quantizing a model that has adapters raises a `ValueError`: Keras would skip
the adapted layers (they are no longer plain `Dense`/`EinsumDense`) and
leave them in float. Merge (or do not adapt) first.

**Merging is explicit.** `merge_adapters(model, quantized=...)` is required
as soon as a quantized layer is among those merged:

- `quantized="float"`: the layer becomes a float layer with the exact
  merged kernel `W'` (computed in float32). For weight-only quantized
  layers the merged model equals the adapted one to float rounding; for
  layers that quantized their inputs, the float layer no longer does (the
  report flags these layers).
- `quantized="requantize"`: `W'` is re-quantized by Keras' own
  `layer.quantize` to the layer's mode and config; the returned
  `QuantizedMergeReport` gives each layer's measured kernel error
  (`merge_and_measure` adds the output error on sample inputs).

Supported modes: `"int8"` and `"int4"` (per-channel and sub-channel, on
`Dense` and `EinsumDense`). `"float8"` (which trains its own scales through
overwritten gradients), `"gptq"` and `"awq"` are rejected with a message.
"""

import dataclasses

import keras
import numpy as np
from keras import ops

SUPPORTED_MODES = ("int8", "int4")
MERGE_CHOICES = ("float", "requantize")

_UNSUPPORTED = {
    "float8": (
        "float8 layers keep a float kernel and update their scales through "
        "overwritten gradients while training, which adapters would disturb"
    ),
    "gptq": "GPTQ kernels are calibrated per layer and not supported yet",
    "awq": "AWQ kernels are calibrated per layer and not supported yet",
}


def quantization_mode(layer):
    """The layer's Keras quantization mode (`"int8"`, ...), or None."""
    return getattr(layer, "quantization_mode", None)


def is_quantized(layer) -> bool:
    """Whether `layer` holds an int8 or int4 kernel adapters can use."""
    return quantization_mode(layer) in SUPPORTED_MODES


def unsupported_reason(layer):
    """Why no adapter can attach to this quantized `layer`, or None."""
    mode = quantization_mode(layer)
    if mode is None or mode in SUPPORTED_MODES:
        return None
    why = _UNSUPPORTED.get(mode, "this mode is not supported")
    return (
        f"Layer '{layer.path}' is quantized with mode {mode!r}: {why}. "
        f"Adapters attach to float layers and to layers quantized with "
        f"{' or '.join(repr(m) for m in SUPPORTED_MODES)} "
        "(model.quantize('int8') or model.quantize('int4'))."
    )


def _is_einsum(layer):
    # Adapters pass their `AdapterSlot`, which reads like the layer but is
    # not an instance of its class.
    layer = getattr(layer, "__dict__", {}).get("layer", layer)
    return isinstance(layer, keras.layers.EinsumDense)


def _int4_grouped(layer):
    return hasattr(layer, "kernel_zero")


def logical_kernel_shape(layer) -> tuple:
    """The float kernel's shape, also for packed int4 kernels."""
    if quantization_mode(layer) == "int4":
        if _is_einsum(layer):
            return tuple(int(d) for d in layer.original_kernel_shape)
        return (int(layer._kernel.shape[0]), int(layer.units))
    if quantization_mode(layer) in ("gptq", "awq") and hasattr(
        layer, "original_kernel_shape"
    ):
        return tuple(int(d) for d in layer.original_kernel_shape)
    return tuple(int(d) for d in layer._kernel.shape)


def activation_quantizer(layer):
    """The quantizer Keras applies to `layer`'s inputs, or None (weight-only).

    Keras quantizes the inputs of int8 layers (by default) and of per-channel
    int4 layers configured with an activation quantizer; its sub-channel
    int4 path never does.
    """
    if not is_quantized(layer):
        return None
    if quantization_mode(layer) == "int4" and _int4_grouped(layer):
        return None
    return getattr(layer, "inputs_quantizer", None)


def quantize_inputs(layer, inputs):
    """`q(x)`: `inputs` quantized and dequantized as `layer` would (see above).

    Returns `inputs` unchanged for float and weight-only quantized layers.
    The gradient passes straight through.
    """
    quantizer = activation_quantizer(layer)
    if quantizer is None:
        return inputs
    axis = tuple(layer.quantization_axis) if _is_einsum(layer) else -1
    values, scale = quantizer(inputs, axis=axis)
    dequantized = ops.divide(ops.cast(values, inputs.dtype), scale)
    dequantized = ops.cast(dequantized, inputs.dtype)
    # Forward: exactly `dequantized` (x - x == 0); backward: identity.
    return ops.add(
        ops.stop_gradient(dequantized),
        ops.subtract(inputs, ops.stop_gradient(inputs)),
    )


class _Dequantizer:
    """How to rebuild the float kernel of one quantized layer.

    Static facts (shapes, layout) come from the layer; `__call__` works on
    plain tensors, so it can run inside a custom gradient.
    """

    def __init__(self, layer):
        self.mode = quantization_mode(layer)
        self.shape = logical_kernel_shape(layer)
        self.grouped = self.mode == "int4" and _int4_grouped(layer)
        self.scale_shape = None
        if self.mode == "int4":
            self.columns = int(layer.kernel_scale.shape[-1])
        elif _is_einsum(layer):
            self.scale_shape, self.scale_perm = _einsum_scale_layout(layer, self.shape)

    def storage(self, layer):
        """The tensors `__call__` takes, read from `layer`'s variables."""
        names = ["_kernel", "kernel_scale"]
        if self.grouped:
            names += ["kernel_zero", "g_idx"]
        return [ops.convert_to_tensor(getattr(layer, n)) for n in names]

    def __call__(self, kernel, scale, zero=None, g_idx=None, dtype="float32"):
        """The float kernel, in the layer's (unpacked) layout."""
        if self.mode == "int8":
            values = ops.cast(kernel, dtype)
            scale = ops.cast(scale, dtype)
            if self.scale_shape is not None:
                scale = ops.reshape(scale, self.scale_shape[0])
                if self.scale_perm is not None:
                    scale = ops.transpose(scale, self.scale_perm)
                scale = ops.reshape(scale, self.scale_shape[1])
            return ops.divide(values, scale)
        values = keras.quantizers.unpack_int4(kernel, self.columns, axis=-1)
        values = ops.cast(values, dtype)
        if self.grouped:
            groups = ops.cast(g_idx, "int32")
            scale = ops.take(ops.cast(scale, dtype), groups, axis=0)
            zero = ops.take(ops.cast(zero, dtype), groups, axis=0)
            matrix = ops.multiply(ops.subtract(values, zero), scale)
        else:
            matrix = ops.divide(values, ops.cast(scale, dtype))
        return ops.reshape(matrix, self.shape)


def _einsum_scale_layout(layer, kernel_shape):
    """How an int8 `EinsumDense` scale maps onto its kernel.

    Keras stores one scale per output unit, laid out like the outputs (the
    kernel's output axes in the order the output names them, with ones for
    the other output axes). Returns `((output-ordered sizes, broadcast
    shape), permutation or None)`: reshape to the sizes, transpose to the
    kernel's order of output axes, reshape to the kernel's shape with ones
    on its input axes.
    """
    equation = layer.equation.replace(" ", "")
    _, rest = equation.split(",")
    kernel, outputs = rest.split("->")
    sizes = dict(zip(kernel, kernel_shape, strict=True))
    out_in_output_order = [c for c in outputs if c in kernel]
    out_in_kernel_order = [c for c in kernel if c in outputs]
    perm = [out_in_output_order.index(c) for c in out_in_kernel_order]
    broadcast = tuple(sizes[c] if c in outputs else 1 for c in kernel)
    return (
        (tuple(sizes[c] for c in out_in_output_order), broadcast),
        None if perm == sorted(perm) else perm,
    )


def float_kernel(layer, view=None):
    """The kernel adapters build on, in the layer's (unpacked) layout.

    A float layer's kernel variable itself; for an int8/int4 layer, the
    kernel dequantized on the fly (float32), a differentiable function of
    nothing trainable.
    """
    if not is_quantized(layer):
        return layer._kernel
    dequantize = _Dequantizer(layer)
    return dequantize(*dequantize.storage(layer))


def _transposed_equation(view):
    inputs, rest = view.equation.split(",")
    kernel, outputs = rest.split("->")
    return f"{outputs},{kernel}->{inputs}"


def base_projection(layer, view, inputs):
    """`project(inputs, W)` with the layer's frozen kernel `W` (no bias).

    For a float layer, the layer's own contraction with its kernel. For an
    int8/int4 layer, the contraction with the kernel dequantized on the fly
    to the layer's compute dtype, inside a custom gradient that dequantizes
    again for the input gradient (no float kernel is kept for the backward
    pass) and gives the frozen integer kernel no gradient. Apply
    `quantize_inputs` first to reproduce Keras' quantized layer.
    """
    if not is_quantized(layer):
        return view.project(inputs, layer._kernel)
    dequantize = _Dequantizer(layer)
    dtype = layer.compute_dtype

    @ops.custom_gradient
    def project(x, *storage):
        outputs = view.project(x, dequantize(*storage, dtype=dtype))

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            kernel = dequantize(*storage, dtype=dtype)
            if view.equation is None:
                x_grad = ops.matmul(upstream, ops.transpose(kernel))
            else:
                x_grad = ops.einsum(_transposed_equation(view), upstream, kernel)
            return (x_grad,) + (None,) * len(storage)

        return outputs, grad

    return project(ops.cast(inputs, dtype), *dequantize.storage(layer))


def quantized_storage(model):
    """Ids of the variables of int8/int4 layers that must stay frozen.

    Everything a quantized layer holds but its bias and its adapter
    variables: the integer kernel, its scale, zero point and group indices.
    """
    from keras_adapters import _keras_internals as internals
    from keras_adapters import model as adapter_model

    adapters = {id(v) for v in adapter_model.adapter_variables(model)}
    frozen = set()
    for layer, _ in internals.layers_with_parents(model):
        if quantization_mode(layer) is not None:
            bias = getattr(layer, "bias", None)
            frozen |= {id(v) for v in layer.weights if v is not bias}
    return frozen - adapters


# ----------------------------------------------------------------------------
# Adapt, then quantize: refused.


def _refuse_quantize(obj, original):
    def check_quantize_args(mode, compute_dtype):
        from keras_adapters import model as adapter_model

        adapted = [layer.path for layer in adapter_model.adapted_layers(obj)]
        if adapted:
            raise ValueError(
                f"'{obj.name}' has adapters on {adapted}; quantize the model "
                "before enable_adapter() (quantize, then adapt, as QLoRA "
                "does), or merge_adapters() first. Keras would skip the "
                "adapted layers and leave them in float."
            )
        return original(mode, compute_dtype)

    return check_quantize_args


def guard_quantize(*models):
    """Makes `model.quantize(...)` raise while `model` has adapters.

    Keras' `Model.quantize` checks its arguments with the model's
    `_check_quantize_args` before it changes any layer; the guard is an
    instance attribute on each model (for a KerasHub `Task`, on the task and
    its backbone), so the model is left unchanged when it raises.
    """
    for model in models:
        if getattr(model, "_keras_adapters_quantize_guard", False):
            continue
        original = model._check_quantize_args
        object.__setattr__(
            model, "_check_quantize_args", _refuse_quantize(model, original)
        )
        object.__setattr__(model, "_keras_adapters_quantize_guard", True)


def refuse_layer_quantize(layer):
    """The error for `layer.quantize(...)` on an adapted layer."""
    return ValueError(
        f"Layer '{layer.path}' has an adapter; quantize before "
        "enable_adapter() (quantize, then adapt), or merge_adapters() first."
    )


# ----------------------------------------------------------------------------
# Merging.


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
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(6)]
        line = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [f"Merged {len(self.paths)} layers (quantized={self.quantized!r})"]
        out += [line.format(*header)] + [line.format(*row) for row in rows]
        if self.output_relative_error is not None:
            out.append(
                f"outputs: max abs error {self.output_max_abs_error:.3g}, "
                f"relative error {self.output_relative_error:.3g}"
            )
        return "\n".join(out)


def check_merge_choice(layers, quantized, names):
    """Raises `ValueError` unless merging adapters `names` of `layers` is
    allowed as asked.

    Runs before anything changes.
    """
    from keras_adapters import layers as adapter_layers

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


def merge_layer(layer, quantized, names):
    """Merges the adapters `names` (all it has) of one int8/int4 `layer`; see
    `merge_adapters`.

    Returns:
        A `QuantizedLayerMerge`.
    """
    from keras_adapters import _keras_internals as internals
    from keras_adapters import layers as adapter_layers

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
        written = float_kernel(layer)
    else:
        written = layer._kernel
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


def merge_and_measure(model, quantized, sample_inputs, names=None, batch_size=None):
    """`merge_adapters(model, names, quantized=...)`, measuring the outputs.

    Runs `model` on `sample_inputs` before and after merging and adds the
    output error to the returned report.

    Args:
        model: a model with adapters.
        quantized: `"float"` or `"requantize"` (see `merge_adapters`).
        sample_inputs: inputs `model.predict` accepts (arrays, a dict of
            arrays, ...), such as a batch of validation data.
        names: adapter names to merge; all of them by default.
        batch_size: passed to `model.predict`.

    Returns:
        A `QuantizedMergeReport` with `output_max_abs_error` and
        `output_relative_error` set.

    Example:

    ```python
    report = ka.quantization.merge_and_measure(
        classifier, "requantize", x_val[:64]
    )
    print(report)
    ```
    """
    from keras_adapters import model as adapter_model

    if quantized not in MERGE_CHOICES:
        raise ValueError(
            f"`quantized` must be one of {MERGE_CHOICES}; received {quantized!r}."
        )
    before = _outputs(model, sample_inputs, batch_size)
    report = adapter_model.merge_adapters(model, names, quantized=quantized)
    after = _outputs(model, sample_inputs, batch_size)
    difference = after - before
    report.output_max_abs_error = float(np.max(np.abs(difference)))
    report.output_relative_error = float(np.linalg.norm(difference)) / max(
        float(np.linalg.norm(before)), 1e-30
    )
    return report


def _outputs(model, inputs, batch_size):
    outputs = model.predict(inputs, verbose=0, batch_size=batch_size)
    flat = keras.tree.flatten(outputs)
    return np.concatenate([np.asarray(o, "float64").ravel() for o in flat])
