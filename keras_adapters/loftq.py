"""LoftQ: quantize float layers and start a LoRA adapter that offsets the
quantization error (`ka.quantization.loftq`)."""

import dataclasses

import numpy as np
from keras import ops

from keras_adapters import _keras_internals as internals
from keras_adapters import _validation
from keras_adapters import model as model_lib
from keras_adapters import targeting
from keras_adapters._tables import format_table
from keras_adapters.adapters import lora as lora_lib
from keras_adapters.adapters import lora_init
from keras_adapters.kernels import PROJECTION_LAYERS
from keras_adapters.kernels import FloatKernel
from keras_adapters.kernels import QuantizedKernel
from keras_adapters.kernels import frozen_kernel


@dataclasses.dataclass
class LoftQReport:
    """What `loftq` did.

    Attributes:
        mode: `"int8"` or `"int4"`.
        iterations: LoftQ iterations.
        layers: `[(path, quantization error, LoftQ error)]`: the relative
            Frobenius errors `||W - Q(W)|| / ||W||` of quantization alone
            and `||W - Q - s A0 B0|| / ||W||` of the quantized base plus the
            initial adapter.
        adapter_report: the `AdapterReport` of the adapter.
    """

    mode: str
    iterations: int
    layers: list
    adapter_report: object

    def __str__(self):
        rows = [(p, f"{q:.4g}", f"{e:.4g}") for p, q, e in self.layers]
        header = ("layer", f"{self.mode} error", "LoftQ error")
        out = [f"LoftQ ({self.mode}, {self.iterations} iterations)"]
        return "\n".join(out + format_table(header, rows))


def loftq(model, adapter, targets=None, *, mode="int4", iterations=1, name="default"):
    """Quantizes the targeted float layers with LoftQ and adds `adapter`.

    For each targeted float `Dense`/`EinsumDense` layer with kernel `W`
    (its 2-D view), LoftQ alternates `Q = quantize(W - s A0 B0)` (Keras'
    own quantizer for `mode`, the one `model.quantize(mode)` uses) and
    `s A0 B0 = ` the best rank-`r` fit of `W - Q` (truncated SVD),
    `iterations` times, starting from `A0 B0 = 0`. The layer is left
    quantized with `Q`, and a LoRA adapter starts at `A = A0`, `B = B0`, so
    the adapted layer computes `Q + s A0 B0`, closer to `W` than `Q` alone
    (the returned report gives both errors per layer).

    The adapter is a plain LoRA on the quantized base: training, merging
    (`quantized=...`), files and `.keras` files work as for any adapter on
    an int8/int4 base. An adapter file fits a model quantized by this same
    call: to load one into a fresh float model, run `loftq` on it with the
    same arguments first (the quantization is deterministic), then
    `ka.load_adapter_weights`.

    Args:
        model: a built model whose targeted layers are float.
        adapter: `ka.LoRA(..., init="loftq")`.
        targets: as for `enable_adapter` (default: query and value).
        mode: `"int8"` or `"int4"`.
        iterations: positive int (PEFT's `loftq_iter`, default 1).
        name: the adapter's name.

    Returns:
        A `LoftQReport`.

    Raises:
        ValueError: a bad argument, or a targeted layer that is quantized
            or has adapters. Nothing changes then.

    Example:

    ```python
    report = ka.quantization.loftq(
        backbone, ka.LoRA(rank=8, init="loftq"), mode="int4"
    )
    print(report)
    ```
    """
    model_lib.check_model(model)
    if not isinstance(adapter, lora_lib.LoRA) or adapter.init != "loftq":
        raise ValueError(
            f"`adapter` must be ka.LoRA(..., init='loftq'); received {adapter!r}."
        )
    mode = _validation.check_choice("mode", mode, ("int8", "int4"))
    iterations = _validation.check_positive_int("iterations", iterations)
    _validation.check_name("name", name)
    root = model_lib.adapted_root(model)
    if targets is None:
        targets = targeting.attention("query", "value")
    layers = [
        layer
        for layer, _ in targeting.resolve_targets(root, targets)
        if isinstance(layer, PROJECTION_LAYERS)
    ]
    plan = []
    for layer in layers:
        kernel = frozen_kernel(layer)
        if not isinstance(kernel, FloatKernel) or kernel.quantized:
            raise ValueError(
                f"Layer '{layer.path}' is already quantized; LoftQ quantizes float "
                "layers itself (call loftq on the float model)."
            )
        if getattr(layer, "_keras_adapters_slots", None):
            raise ValueError(f"Layer '{layer.path}' already has adapters.")
        path = targeting.relative_path(root.name, layer.path)
        layer_adapter = adapter.for_layer(path)
        layer_adapter.validate(kernel)
        plan.append((layer, kernel, layer_adapter))
    if not plan:
        raise ValueError(
            f"`targets` selects no Dense/EinsumDense layer of '{model.name}'."
        )

    originals = [(layer, ops.convert_to_numpy(layer.kernel)) for layer, _, _ in plan]
    policies = [layer.dtype_policy.name for layer, _, _ in plan]
    factors, rows = {}, []
    try:
        for (layer, kernel, layer_adapter), policy in zip(plan, policies, strict=True):
            matrix = np.asarray(
                ops.convert_to_numpy(
                    kernel.to_matrix(ops.cast(kernel.dense(), "float32"))
                ),
                "float64",
            )
            quantize = _LayerQuantizer(layer, kernel, mode, policy)
            _, a0, b0, errors = lora_init.loftq(
                matrix, layer_adapter.rank, layer_adapter.scale, quantize, iterations
            )
            factors[kernel.path] = (a0, b0)
            rows.append((layer.path, errors[0], errors[-1]))
        with lora_lib.loftq_factors(factors):
            report = model_lib.enable_adapter(
                model,
                adapter,
                targets=targeting.PathsTarget(
                    [
                        targeting.relative_path(root.name, layer.path)
                        for layer, _, _ in plan
                    ],
                    root.name,
                ),
                name=name,
            )
    except BaseException:
        for (layer, value), policy in zip(originals, policies, strict=True):
            if getattr(layer, "quantization_mode", None) is not None:
                internals.replace_quantized_kernel(layer, value, policy)
        raise
    return LoftQReport(mode, iterations, rows, report)


class _LayerQuantizer:
    """`matrix -> dequantized matrix` by quantizing the layer itself (so the
    values are exactly those Keras stores); the layer stays quantized after
    the last call."""

    def __init__(self, layer, kernel, mode, policy):
        self.layer, self.view, self.mode, self.policy = layer, kernel, mode, policy

    def __call__(self, matrix):
        layer = self.layer
        value = ops.convert_to_numpy(
            self.view.from_matrix(np.asarray(matrix, "float32"))
        )
        if getattr(layer, "quantization_mode", None) is not None:
            internals.replace_quantized_kernel(layer, value, self.policy)
        else:
            internals.kernel_variable(layer).assign(value)
        internals.quantize_layer(layer, self.mode, None)
        dense = QuantizedKernel(layer).dense()
        return np.asarray(ops.convert_to_numpy(self.view.to_matrix(dense)), "float64")
