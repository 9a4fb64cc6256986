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
`Dense` and `EinsumDense`, and on `Embedding` tables and tied
`ReversibleEmbedding`s: their lookup gathers integer rows and rescales them,
see `keras_adapters.kernels.QuantizedEmbeddingKernel`; `loftq` quantizes
projections only). `"float8"` (which trains its own scales through
overwritten gradients), `"gptq"` and `"awq"` are rejected with a message.
"""

import keras
import numpy as np

from keras_adapters.kernels.quantized import SUPPORTED_MODES
from keras_adapters.kernels.quantized import activation_quantizer
from keras_adapters.kernels.quantized import is_quantized
from keras_adapters.kernels.quantized import logical_kernel_shape
from keras_adapters.kernels.quantized import quantization_mode
from keras_adapters.loftq import LoftQReport
from keras_adapters.loftq import loftq
from keras_adapters.merge import MERGE_CHOICES
from keras_adapters.merge import QuantizedLayerMerge
from keras_adapters.merge import QuantizedMergeReport
from keras_adapters.merge import merge_adapters

__all__ = [
    "LoftQReport",
    "MERGE_CHOICES",
    "SUPPORTED_MODES",
    "QuantizedLayerMerge",
    "QuantizedMergeReport",
    "activation_quantizer",
    "is_quantized",
    "logical_kernel_shape",
    "loftq",
    "merge_and_measure",
    "quantization_mode",
]


def merge_and_measure(
    model: keras.Model,
    quantized: str,
    sample_inputs,
    names: str | list[str] | None = None,
    batch_size: int | None = None,
) -> QuantizedMergeReport:
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
    if quantized not in MERGE_CHOICES:
        raise ValueError(
            f"`quantized` must be one of {MERGE_CHOICES}; received {quantized!r}."
        )
    before = _outputs(model, sample_inputs, batch_size)
    report = merge_adapters(model, names, quantized=quantized)
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
