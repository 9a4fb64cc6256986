"""Calibration: temperature scaling, calibration errors, reliability diagrams.

Temperature scaling (Guo et al., ICML 2017) divides a classifier's logits by a
single temperature `T > 0` fitted on held-out data by minimising the negative
log-likelihood. It changes confidences, never the predicted class. Tomihari &
Sato (NeurIPS 2024) use it to repair the calibration of LP-FT, whose large
linear head (grown during linear probing) makes it overconfident; they report
ECE and MCE with 15 equal-width bins.

- `fit_temperature(logits, labels)` fits `T` (in float64 NumPy; deterministic).
- `TemperatureScaling` is a layer dividing its inputs by `T`;
  `with_temperature(model, T)` wraps a model with it, and
  `merge_temperature(model, T)` instead divides the linear head's kernel and
  bias by `T` in place, for export without any extra op.
- `ExpectedCalibrationError` and `MaximumCalibrationError` are Keras metrics.
- `reliability_diagram(logits, labels, path)` saves a PNG (needs matplotlib).
"""

import math
import os

import keras
import numpy as np
from keras import ops

from keras_adapters import _io
from keras_adapters import _validation
from keras_adapters import model as adapter_model
from keras_adapters.workflows import heads

_PLOT_PIP = 'pip install "keras-adapters[plot]"'


def _check_positive_number(name, value):
    return _validation.check_number(name, value, low=0, low_inclusive=False)


def _check_num_bins(num_bins):
    return _validation.check_number("num_bins", num_bins, low=1, integer=True)


def _check_logits_and_labels(logits, labels):
    """NumPy `(float64 logits (n, c), int labels (n,))`; binary -> 2 classes."""
    logits = np.asarray(ops.convert_to_numpy(logits), dtype="float64")
    labels = np.asarray(ops.convert_to_numpy(labels))
    if logits.ndim == 1:
        logits = logits[:, None]
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(
            "`logits` must have shape (num_examples, num_classes) with at least "
            f"one example; received shape {logits.shape}."
        )
    if not np.all(np.isfinite(logits)):
        raise ValueError("`logits` contains NaN or infinite values.")
    if logits.shape[1] == 1:  # Binary: sigmoid(z) = softmax([0, z])[1].
        logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
    num_examples, num_classes = logits.shape
    if labels.ndim == 2 and labels.shape[1] == num_classes and num_classes > 1:
        labels = np.argmax(labels, axis=1)  # One-hot.
    labels = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
    if labels.shape != (num_examples,):
        raise ValueError(
            f"`labels` must have shape ({num_examples},) (class ids) or "
            f"({num_examples}, {num_classes}) (one-hot) to match `logits`; "
            f"received shape {labels.shape}."
        )
    if labels.dtype.kind == "f":
        if not np.all(labels == np.round(labels)):
            raise ValueError("`labels` must be integer class ids.")
        labels = labels.astype("int64")
    if labels.dtype.kind not in "iub":
        raise ValueError(f"`labels` must be integer class ids; got {labels.dtype}.")
    labels = labels.astype("int64")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"`labels` must be in [0, {num_classes}); received values from "
            f"{labels.min()} to {labels.max()}."
        )
    return logits, labels


def _nll_and_derivatives(t, logits, labels):
    """Mean NLL of `logits * exp(-t)` and its first two derivatives in `t`."""
    beta = math.exp(-t)
    scaled = beta * logits
    scaled -= scaled.max(axis=1, keepdims=True)
    probs = np.exp(scaled)
    norm = probs.sum(axis=1, keepdims=True)
    probs /= norm
    rows = np.arange(len(labels))
    nll = np.mean(np.log(norm[:, 0]) - scaled[rows, labels])
    mean = np.sum(probs * logits, axis=1)
    var = np.sum(probs * logits * logits, axis=1) - mean**2
    # L(beta) is convex: dL/dbeta = E[E_p z - z_y], d2L/dbeta2 = E[Var_p z].
    d_beta = np.mean(mean - logits[rows, labels])
    d2_beta = np.mean(np.maximum(var, 0.0))
    return nll, -beta * d_beta, beta * beta * d2_beta + beta * d_beta


def nll(logits, labels, temperature=1.0) -> float:
    """Mean negative log-likelihood of softmax(`logits` / `temperature`).

    Args:
        logits: array `(num_examples, num_classes)` (or `(num_examples,)` /
            `(num_examples, 1)` for binary sigmoid logits).
        labels: class ids `(num_examples,)` or one-hot labels.
        temperature: number > 0.

    Returns:
        The mean NLL, a Python float (computed in float64).
    """
    temperature = _check_positive_number("temperature", temperature)
    logits, labels = _check_logits_and_labels(logits, labels)
    return float(_nll_and_derivatives(math.log(temperature), logits, labels)[0])


def fit_temperature(
    logits,
    labels,
    *,
    bounds=(1e-2, 1e2),
    tolerance: float = 1e-10,
    max_iterations: int = 100,
) -> float:
    """Fits the temperature `T` minimising the NLL of softmax(`logits` / `T`).

    The search runs on `t = log T`, in float64 NumPy, with Newton steps
    safeguarded by bisection: the NLL is convex in `1 / T`, so its derivative
    in `t` changes sign once and the bracket always holds the minimum. The
    result is deterministic and the same on every backend. If the minimum
    lies outside `bounds` (e.g. every example is classified correctly, so the
    NLL keeps falling as `T -> 0`), the nearest bound is returned.

    Args:
        logits: validation logits, `(num_examples, num_classes)`; binary
            sigmoid logits may be `(num_examples,)` or `(num_examples, 1)`.
        labels: class ids `(num_examples,)` or one-hot
            `(num_examples, num_classes)`.
        bounds: `(low, high)` with `0 < low < high`, the range of `T`.
        tolerance: positive float, the precision of `log T`.
        max_iterations: positive int.

    Returns:
        The temperature, a Python float.

    Raises:
        ValueError: on bad shapes, non-finite logits, labels out of range, or
            bad `bounds`, `tolerance` or `max_iterations`.

    Example:

    ```python
    logits = classifier.predict(val_x)
    temperature = ka.calibration.fit_temperature(logits, val_y)
    calibrated = ka.calibration.with_temperature(classifier, temperature)
    ```

    Reference:
        Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
    """
    message = f"`bounds` must be (low, high) with 0 < low < high; received {bounds!r}."
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(message)
    bounds = [
        _validation.check_number(
            f"bounds[{i}]", b, low=0, low_inclusive=False, allowed="a number > 0"
        )
        for i, b in enumerate(bounds)
    ]
    if not bounds[0] < bounds[1]:
        raise ValueError(message)
    tolerance = _check_positive_number("tolerance", tolerance)
    max_iterations = _validation.check_positive_int("max_iterations", max_iterations)
    logits, labels = _check_logits_and_labels(logits, labels)
    low, high = math.log(bounds[0]), math.log(bounds[1])
    if _nll_and_derivatives(low, logits, labels)[1] >= 0:
        return float(bounds[0])
    if _nll_and_derivatives(high, logits, labels)[1] <= 0:
        return float(bounds[1])
    t = min(max(0.0, low), high)  # Start at T = 1.
    for _ in range(max_iterations):
        _, grad, hess = _nll_and_derivatives(t, logits, labels)
        if grad > 0:
            high = t
        else:
            low = t
        step = grad / hess if hess > 0 else math.inf
        candidate = t - step
        if not low < candidate < high:  # Newton left the bracket: bisect.
            candidate = 0.5 * (low + high)
        if abs(candidate - t) < tolerance or high - low < tolerance:
            t = candidate
            break
        t = candidate
    return float(math.exp(t))


@keras.saving.register_keras_serializable(package="keras_adapters")
class TemperatureScaling(keras.layers.Layer):
    """Divides its inputs (logits) by a fixed temperature.

    Args:
        temperature: number > 0.
        **kwargs: base layer arguments (`name`, `dtype`).

    Call arguments:
        inputs: logits.

    Returns:
        `inputs / temperature`, in the inputs' dtype.

    Example:

    ```python
    outputs = ka.calibration.TemperatureScaling(1.7)(logits)
    ```
    """

    def __init__(self, temperature, **kwargs):
        super().__init__(**kwargs)
        self.temperature = _check_positive_number("temperature", temperature)

    def call(self, inputs):
        return ops.divide(inputs, ops.cast(self.temperature, inputs.dtype))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


def with_temperature(model, temperature, name=None):
    """Returns a model whose outputs are `model`'s logits divided by `temperature`.

    The new model shares `model`'s layers and weights. A functional model (or
    KerasHub `Task`, whose preprocessor is not included) is extended in its
    own graph, so it takes the same inputs; any other model is wrapped in a
    `keras.Sequential`.

    Args:
        model: a built Keras model whose (single) output is logits.
        temperature: number > 0, e.g. from `fit_temperature`.
        name: optional name of the new model.

    Returns:
        A `keras.Model`.

    Example:

    ```python
    temperature = ka.calibration.fit_temperature(model.predict(val_x), val_y)
    calibrated = ka.calibration.with_temperature(model, temperature)
    probabilities = keras.ops.softmax(calibrated.predict(test_x))
    ```
    """
    adapter_model.check_model(model)
    layer = TemperatureScaling(temperature, name="temperature_scaling")
    name = name or f"{model.name}_calibrated"
    try:
        inputs, outputs = model.input, model.output
    except (AttributeError, ValueError):
        inputs = outputs = None
    if inputs is not None and not isinstance(outputs, (list, tuple, dict)):
        return keras.Model(inputs, layer(outputs), name=name)
    return keras.Sequential([model, layer], name=name)


def merge_temperature(model, temperature, head=None):
    """Divides the linear head's kernel and bias by `temperature`, in place.

    Afterwards `model`'s logits are the old logits divided by `temperature`
    (up to float rounding; exactly if `temperature` is a power of two), so a
    calibrated model exports with no extra op. It scales the head's
    pre-activation, so it is also temperature scaling for a head with a
    softmax activation.

    Args:
        model: a built Keras model or KerasHub `Task`.
        temperature: number > 0, e.g. from `fit_temperature`.
        head: the head (see `ka.workflows.find_head`); by default the layer
            computing the model's output.

    Returns:
        The head layer.

    Raises:
        ValueError: on a bad `temperature`, or a head that cannot be found
            or is not a `Dense` layer.

    Example:

    ```python
    ka.calibration.merge_temperature(classifier, temperature)
    ka.export_saved_model(classifier, "serving/calibrated")
    ```
    """
    temperature = _check_positive_number("temperature", temperature)
    layer = heads.find_head(model, head)
    for variable in (layer.kernel, layer.bias):
        if variable is None:
            continue
        value = np.asarray(ops.convert_to_numpy(variable), dtype="float64")
        variable.assign((value / temperature).astype(variable.dtype))
    return layer


class _CalibrationError(keras.metrics.Metric):
    """Per-bin counts, confidence sums and accuracy sums (equal-width bins).

    Bins are `(i / B, (i + 1) / B]` (right-inclusive, as in Guo et al.'s and
    Tomihari & Sato's code); a confidence of exactly 0 goes to the first bin.
    """

    def __init__(self, num_bins=15, from_logits=False, name=None, dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_bins = _check_num_bins(num_bins)
        from_logits = _validation.check_bool("from_logits", from_logits)
        self.from_logits = from_logits
        shape = (self.num_bins,)
        self.counts = self.add_variable(shape, "zeros", name="counts")
        self.confidence_sums = self.add_variable(shape, "zeros", name="confidence")
        self.correct_sums = self.add_variable(shape, "zeros", name="correct")

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds a batch: `y_true` class ids (or one-hot), `y_pred` scores.

        Args:
            y_true: class ids `(batch,)` or `(batch, 1)`, or one-hot
                `(batch, num_classes)`; for binary scores, 0/1 labels.
            y_pred: probabilities (or logits with `from_logits=True`),
                `(batch, num_classes)`; `(batch,)` or `(batch, 1)` for one
                sigmoid output.
            sample_weight: optional `(batch,)` weights.
        """
        y_pred = ops.cast(ops.convert_to_tensor(y_pred), self.dtype)
        y_true = ops.convert_to_tensor(y_true)
        binary = len(y_pred.shape) == 1 or y_pred.shape[-1] == 1
        if len(y_pred.shape) == 0 or len(y_pred.shape) > 2:
            raise ValueError(
                "`y_pred` must have shape (batch, num_classes), (batch, 1) or "
                f"(batch,); received {y_pred.shape}."
            )
        if binary:
            p = ops.reshape(y_pred, (-1,))
            if self.from_logits:
                p = ops.sigmoid(p)
            confidence = ops.maximum(p, 1.0 - p)
            predicted = ops.cast(ops.greater(p, 0.5), "int32")
            labels = ops.reshape(ops.cast(y_true, self.dtype), (-1,))
            labels = ops.cast(ops.greater(labels, 0.5), "int32")
        else:
            probs = ops.softmax(y_pred, axis=-1) if self.from_logits else y_pred
            confidence = ops.max(probs, axis=-1)
            predicted = ops.cast(ops.argmax(probs, axis=-1), "int32")
            if len(y_true.shape) == 2 and y_true.shape[-1] == y_pred.shape[-1]:
                y_true = ops.argmax(y_true, axis=-1)
            labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        correct = ops.cast(ops.equal(predicted, labels), self.dtype)
        index = ops.cast(ops.ceil(confidence * self.num_bins), "int32") - 1
        index = ops.clip(index, 0, self.num_bins - 1)
        in_bin = ops.one_hot(index, self.num_bins, dtype=self.dtype)
        if sample_weight is not None:
            weight = ops.reshape(ops.cast(sample_weight, self.dtype), (-1, 1))
            in_bin = in_bin * weight
        self.counts.assign_add(ops.sum(in_bin, axis=0))
        confidence = ops.expand_dims(confidence, -1)
        correct = ops.expand_dims(correct, -1)
        self.confidence_sums.assign_add(ops.sum(in_bin * confidence, axis=0))
        self.correct_sums.assign_add(ops.sum(in_bin * correct, axis=0))

    def _gaps(self):
        """`|accuracy - confidence|` per bin (0 for empty bins)."""
        safe = ops.maximum(self.counts, 1e-12)
        gaps = ops.abs(self.correct_sums - self.confidence_sums) / safe
        return ops.where(self.counts > 0, gaps, ops.zeros_like(gaps))

    def bin_statistics(self) -> dict:
        """NumPy per-bin statistics of everything seen since the last reset.

        Returns:
            A dict with `"edges"` (`num_bins + 1` bin edges), `"count"`
            (weighted examples per bin), `"confidence"` and `"accuracy"`
            (per-bin means; NaN for empty bins).
        """
        count = np.asarray(ops.convert_to_numpy(self.counts), dtype="float64")
        conf = np.asarray(ops.convert_to_numpy(self.confidence_sums), "float64")
        correct = np.asarray(ops.convert_to_numpy(self.correct_sums), "float64")
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_conf = np.where(count > 0, conf / count, np.nan)
            accuracy = np.where(count > 0, correct / count, np.nan)
        return {
            "edges": np.linspace(0.0, 1.0, self.num_bins + 1),
            "count": count,
            "confidence": mean_conf,
            "accuracy": accuracy,
        }

    def get_config(self):
        return {
            **super().get_config(),
            "num_bins": self.num_bins,
            "from_logits": self.from_logits,
        }


@keras.saving.register_keras_serializable(package="keras_adapters")
class ExpectedCalibrationError(_CalibrationError):
    """Expected calibration error (ECE) with equal-width confidence bins.

    `ECE = sum_b (n_b / n) |accuracy_b - confidence_b|`, where bin `b` holds
    the examples whose confidence (top class probability) is in
    `(b / B, (b + 1) / B]`. It is stateful: it accumulates over batches until
    `reset_state()`, and works in `model.compile(metrics=...)` under
    `jit_compile=True`.

    Args:
        num_bins: int >= 1, the number of equal-width bins (15, as in
            Tomihari & Sato and Guo et al.).
        from_logits: bool; whether `y_pred` is logits (softmax, or sigmoid
            for a single output, is applied) rather than probabilities.
        name: metric name.
        dtype: dtype of the statistics.

    Example:

    ```python
    metric = ka.calibration.ExpectedCalibrationError(from_logits=True)
    metric.update_state([0, 1], [[2.0, 0.0], [0.5, 0.0]])
    float(metric.result())
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[ka.calibration.ExpectedCalibrationError(from_logits=True)],
    )
    ```

    Reference:
        Naeini et al., "Obtaining Well Calibrated Probabilities Using Bayesian
        Binning", AAAI 2015; Guo et al., ICML 2017.
    """

    def __init__(self, num_bins=15, from_logits=False, name="ece", dtype=None):
        super().__init__(num_bins, from_logits, name=name, dtype=dtype)

    def result(self):
        total = ops.sum(self.counts)
        error = ops.sum(ops.abs(self.correct_sums - self.confidence_sums))
        return ops.where(total > 0, error / ops.maximum(total, 1e-12), 0.0)


@keras.saving.register_keras_serializable(package="keras_adapters")
class MaximumCalibrationError(_CalibrationError):
    """Maximum calibration error (MCE): the largest per-bin gap.

    `MCE = max_b |accuracy_b - confidence_b|` over non-empty bins, with the
    bins of `ExpectedCalibrationError`.

    Args:
        num_bins: int >= 1, the number of equal-width bins.
        from_logits: bool; whether `y_pred` is logits.
        name: metric name.
        dtype: dtype of the statistics.

    Example:

    ```python
    metric = ka.calibration.MaximumCalibrationError(from_logits=True)
    metric.update_state([0, 1], [[2.0, 0.0], [0.5, 0.0]])
    float(metric.result())
    ```
    """

    def __init__(self, num_bins=15, from_logits=False, name="mce", dtype=None):
        super().__init__(num_bins, from_logits, name=name, dtype=dtype)

    def result(self):
        return ops.max(self._gaps())


def calibration_errors(logits, labels, *, temperature=1.0, num_bins=15) -> dict:
    """ECE and MCE of softmax(`logits` / `temperature`), as Python floats.

    Args:
        logits: `(num_examples, num_classes)` logits (binary: one column).
        labels: class ids or one-hot labels.
        temperature: number > 0.
        num_bins: int >= 1.

    Returns:
        `{"ece": float, "mce": float, "accuracy": float, "nll": float}`.

    Example:

    ```python
    ka.calibration.calibration_errors(logits, labels, temperature=1.5)
    ```
    """
    temperature = _check_positive_number("temperature", temperature)
    num_bins = _check_num_bins(num_bins)
    logits, labels = _check_logits_and_labels(logits, labels)
    scaled = (logits / temperature).astype("float32")
    out = {}
    for key, cls in (
        ("ece", ExpectedCalibrationError),
        ("mce", MaximumCalibrationError),
    ):
        metric = cls(num_bins=num_bins, from_logits=True)
        metric.update_state(labels, scaled)
        out[key] = float(ops.convert_to_numpy(metric.result()))
    out["accuracy"] = float(np.mean(np.argmax(logits, axis=1) == labels))
    out["nll"] = nll(logits, labels, temperature)
    return out


def _import_pyplot_free_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "reliability_diagram needs matplotlib; install it with "
            f"`{_PLOT_PIP}` (or `pip install matplotlib`)."
        ) from None
    return Figure, FigureCanvasAgg


def reliability_diagram(
    logits,
    labels,
    path,
    *,
    temperature=None,
    num_bins: int = 15,
    title: str | None = None,
) -> str:
    """Saves a reliability diagram (accuracy vs confidence per bin) as a PNG.

    One column per model; the first row shows the raw logits, and a second
    row the same logits divided by the fitted `temperature` if one is given.
    Each panel draws the per-bin accuracy as bars against the diagonal of
    perfect calibration, the gap to each bin's mean confidence, and the ECE
    and MCE in its title. Needs matplotlib (`pip install
    "keras-adapters[plot]"`); it draws with matplotlib's object API, never
    touching pyplot's global state.

    Args:
        logits: `(num_examples, num_classes)` logits, or a dict
            `{model name: logits}` sharing the same `labels`.
        labels: class ids (or one-hot labels).
        path: the PNG file to write (its directory must exist).
        temperature: optional number > 0 (or a dict `{model name: number}`)
            to also plot the temperature-scaled logits.
        num_bins: int >= 1.
        title: optional figure title.

    Returns:
        `path`.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: on bad inputs.

    Example:

    ```python
    ka.calibration.reliability_diagram(
        test_logits, test_labels, "reliability.png", temperature=temperature
    )
    ```
    """
    if not isinstance(logits, dict):
        logits = {"model": logits}
        if temperature is not None and not isinstance(temperature, dict):
            temperature = {"model": temperature}
    if not logits:
        raise ValueError("`logits` is an empty dict.")
    if temperature is not None and not isinstance(temperature, dict):
        temperature = dict.fromkeys(logits, temperature)
    if temperature is not None:
        unknown = sorted(set(temperature) - set(logits))
        if unknown:
            raise ValueError(f"`temperature` names unknown models {unknown}.")
        for value in temperature.values():
            _check_positive_number("temperature", value)
    num_bins = _check_num_bins(num_bins)
    if not isinstance(path, (str, os.PathLike)) or not str(path).endswith(".png"):
        raise ValueError(f"`path` must be a .png file path; received {path!r}.")
    directory = os.path.dirname(os.fspath(path)) or "."
    if not os.path.isdir(directory):
        raise ValueError(f"The directory of `path` does not exist: {directory!r}.")
    checked = {name: _check_logits_and_labels(z, labels) for name, z in logits.items()}
    Figure, FigureCanvasAgg = _import_pyplot_free_matplotlib()

    rows = 1 if temperature is None else 2
    columns = len(checked)
    figure = Figure(figsize=(3.2 * columns, 3.2 * rows + (0.4 if title else 0)))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    for column, (name, (z, y)) in enumerate(checked.items()):
        scales = [("", 1.0)]
        if temperature is not None:
            t = temperature.get(name)
            scales.append(("no T fitted", None) if t is None else (f"T={t:.2f}", t))
        for row, (label, t) in enumerate(scales):
            ax = axes[row][column]
            if t is None:
                ax.set_axis_off()
                ax.set_title(f"{name}: {label}", fontsize=9)
                continue
            _draw_reliability(ax, z / t, y, num_bins, f"{name} {label}".strip())
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with _io.atomic_file(path) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    return os.fspath(path)


def _draw_reliability(ax, logits, labels, num_bins, name):
    ece = ExpectedCalibrationError(num_bins=num_bins, from_logits=True)
    ece.update_state(labels, logits.astype("float32"))
    stats = ece.bin_statistics()
    mce = np.nanmax(np.abs(stats["accuracy"] - stats["confidence"]))
    edges = stats["edges"]
    width = edges[1] - edges[0]
    filled = stats["count"] > 0
    left = edges[:-1][filled]
    ax.bar(
        left,
        stats["accuracy"][filled],
        width=width,
        align="edge",
        edgecolor="black",
        linewidth=0.5,
        color="tab:blue",
        label="accuracy",
    )
    ax.bar(
        left,
        stats["confidence"][filled] - stats["accuracy"][filled],
        bottom=stats["accuracy"][filled],
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.3,
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    result = float(ops.convert_to_numpy(ece.result()))
    ax.set_title(f"{name}\nECE {100 * result:.1f}%, MCE {100 * mce:.1f}%", fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
