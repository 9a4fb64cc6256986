"""Calibration: ECE/MCE metrics, temperature scaling, reliability diagrams.

Hand-made cases have their expected values worked out in the comments; the
random cases compare with a NumPy transcription of the reference code of
Tomihari & Sato (`utils/custom_metric.py`: 15 bins, `lower < conf <= upper`).
"""

import math
import sys

import keras
import numpy as np
import pytest

from keras_adapters import calibration as cal

ECE = cal.ExpectedCalibrationError
MCE = cal.MaximumCalibrationError

# Case A: 3 classes, 4 examples, 15 bins of width 1/15; bin i is
# (i/15, (i+1)/15], i.e. index ceil(15 * confidence) - 1.
#   ex 1: confidence 0.90 (class 0), label 0: correct; 15*0.90 = 13.5 -> bin 13
#   ex 2: confidence 0.88 (class 0), label 1: wrong;   15*0.88 = 13.2 -> bin 13
#   ex 3: confidence 0.50 (class 0), label 0: correct; 15*0.50 = 7.5  -> bin 7
#   ex 4: confidence 0.45 (class 1), label 2: wrong;   15*0.45 = 6.75 -> bin 6
# bin 13: 2 examples, accuracy 1/2, mean confidence 0.89, gap 0.39
# bin 7:  1 example,  accuracy 1,   confidence 0.50,      gap 0.50
# bin 6:  1 example,  accuracy 0,   confidence 0.45,      gap 0.45
# ECE = 2/4 * 0.39 + 1/4 * 0.50 + 1/4 * 0.45 = 0.195 + 0.125 + 0.1125 = 0.4325
# MCE = max(0.39, 0.50, 0.45) = 0.50
PROBS_A = np.array(
    [
        [0.90, 0.05, 0.05],
        [0.88, 0.10, 0.02],
        [0.50, 0.30, 0.20],
        [0.20, 0.45, 0.35],
    ],
    dtype="float32",
)
LABELS_A = np.array([0, 1, 0, 2])


def _value(metric):
    return float(keras.ops.convert_to_numpy(metric.result()))


def _reference(probs, labels, num_bins=15):
    """NumPy transcription of the paper's `calibration_error`."""
    edges = np.linspace(0, 1, num_bins + 1)
    confidences = probs.max(axis=1)
    accuracies = probs.argmax(axis=1) == labels
    ece, mce = 0.0, 0.0
    for lower, upper in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidences > lower) & (confidences <= upper)
        if in_bin.mean() > 0:
            gap = abs(confidences[in_bin].mean() - accuracies[in_bin].mean())
            ece += gap * in_bin.mean()
            mce = max(mce, gap)
    return ece, mce


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_hand_made_multiclass_case():
    ece, mce = ECE(), MCE()
    ece.update_state(LABELS_A, PROBS_A)
    mce.update_state(LABELS_A, PROBS_A)
    assert _value(ece) == pytest.approx(0.4325, abs=1e-6)
    assert _value(mce) == pytest.approx(0.50, abs=1e-6)
    stats = ece.bin_statistics()
    assert stats["count"][[6, 7, 13]].tolist() == [1, 1, 2]
    assert stats["count"].sum() == 4
    assert stats["accuracy"][13] == pytest.approx(0.5)
    assert stats["confidence"][13] == pytest.approx(0.89, abs=1e-6)
    assert np.isnan(stats["accuracy"][0])


def test_sample_weights():
    # Weights (1, 3, 1, 1), total 6. Bin 13: weight 4, confidence sum
    # 0.90 + 3 * 0.88 = 3.54, correct sum 1: |1 - 3.54| = 2.54.
    # Bin 7: |1 - 0.50| = 0.50; bin 6: |0 - 0.45| = 0.45.
    # ECE = (2.54 + 0.50 + 0.45) / 6 = 3.49 / 6 = 0.581666...
    # MCE = max(2.54 / 4, 0.50, 0.45) = 0.635
    weights = np.array([1.0, 3.0, 1.0, 1.0])
    ece, mce = ECE(), MCE()
    ece.update_state(LABELS_A, PROBS_A, sample_weight=weights)
    mce.update_state(LABELS_A, PROBS_A, sample_weight=weights)
    assert _value(ece) == pytest.approx(3.49 / 6, abs=1e-6)
    assert _value(mce) == pytest.approx(0.635, abs=1e-6)


def test_one_bin_is_the_gap_of_the_means():
    # One bin: accuracy 2/4 = 0.5, mean confidence
    # (0.90 + 0.88 + 0.50 + 0.45) / 4 = 2.73 / 4 = 0.6825;
    # ECE = MCE = 0.6825 - 0.5 = 0.1825.
    for cls in (ECE, MCE):
        metric = cls(num_bins=1)
        metric.update_state(LABELS_A, PROBS_A)
        assert _value(metric) == pytest.approx(0.1825, abs=1e-6)


def test_binary_sigmoid_case():
    # One sigmoid output p; confidence max(p, 1 - p), prediction p > 0.5.
    #   p 0.70, label 1: conf 0.70, correct; 15*0.70 = 10.5  -> bin 10, gap 0.30
    #   p 0.25, label 1: conf 0.75, wrong;   15*0.75 = 11.25 -> bin 11, gap 0.75
    #   p 0.95, label 0: conf 0.95, wrong;   15*0.95 = 14.25 -> bin 14, gap 0.95
    #   p 0.10, label 0: conf 0.90, correct; 15*0.90 = 13.5  -> bin 13, gap 0.10
    # ECE = (0.30 + 0.75 + 0.95 + 0.10) / 4 = 2.10 / 4 = 0.525; MCE = 0.95.
    p = np.array([[0.70], [0.25], [0.95], [0.10]], dtype="float32")
    y = np.array([[1], [1], [0], [0]])
    ece, mce = ECE(), MCE()
    ece.update_state(y, p)
    mce.update_state(y, p)
    assert _value(ece) == pytest.approx(0.525, abs=1e-6)
    assert _value(mce) == pytest.approx(0.95, abs=1e-6)
    logits = np.log(p / (1 - p))
    ece_logits = ECE(from_logits=True)
    ece_logits.update_state(y, logits[:, 0])
    assert _value(ece_logits) == pytest.approx(0.525, abs=1e-5)


def test_logits_one_hot_batches_and_reset():
    metric = ECE(from_logits=True)
    logits = np.log(PROBS_A)  # softmax(log p) = p.
    metric.update_state(LABELS_A[:2], logits[:2])
    metric.update_state(keras.ops.one_hot(LABELS_A[2:], 3), logits[2:])
    assert _value(metric) == pytest.approx(0.4325, abs=1e-5)
    metric.reset_state()
    assert _value(metric) == 0.0
    metric.update_state(LABELS_A, logits)
    assert _value(metric) == pytest.approx(0.4325, abs=1e-5)


def test_matches_reference_on_random_data():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(257, 5)) * 3
    labels = rng.integers(0, 5, 257)
    probs = _softmax(logits)
    expected_ece, expected_mce = _reference(probs, labels)
    ece, mce = ECE(from_logits=True), MCE(from_logits=True)
    for start in range(0, 257, 64):
        ece.update_state(labels[start : start + 64], logits[start : start + 64])
        mce.update_state(labels[start : start + 64], logits[start : start + 64])
    assert _value(ece) == pytest.approx(expected_ece, abs=1e-5)
    assert _value(mce) == pytest.approx(expected_mce, abs=1e-5)
    errors = cal.calibration_errors(logits, labels)
    assert errors["ece"] == pytest.approx(expected_ece, abs=1e-5)
    assert errors["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels))


def test_metrics_in_compile_under_jit():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(96, 4)).astype("float32")
    y = rng.integers(0, 3, 96)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[ECE(from_logits=True), MCE(from_logits=True)],
        jit_compile=True,
    )
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    results = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    expected_ece, expected_mce = _reference(_softmax(model.predict(x, verbose=0)), y)
    assert results["ece"] == pytest.approx(expected_ece, abs=1e-5)
    assert results["mce"] == pytest.approx(expected_mce, abs=1e-5)


def test_metric_config_round_trip():
    metric = MCE(num_bins=10, from_logits=True, name="my_mce")
    config = metric.get_config()
    assert config["num_bins"] == 10 and config["from_logits"] is True
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(metric)
    )
    assert isinstance(clone, MCE)
    assert (clone.num_bins, clone.from_logits, clone.name) == (10, True, "my_mce")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_bins": 0}, "num_bins"),
        ({"num_bins": 2.5}, "num_bins"),
        ({"from_logits": "yes"}, "from_logits"),
    ],
)
def test_metric_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ECE(**kwargs)


def _grid_temperature(logits, labels):
    """Brute force: the NLL on a fine grid of log T (no optimizer)."""
    grid = np.linspace(math.log(0.05), math.log(20.0), 4001)
    nlls = []
    for t in grid:
        z = logits / math.exp(t)
        z = z - z.max(axis=1, keepdims=True)
        log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        nlls.append(-log_probs[np.arange(len(labels)), labels].mean())
    best = int(np.argmin(nlls))
    return math.exp(grid[best]), grid[1] - grid[0]


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_fit_temperature_matches_grid_search(scale):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, 400)
    logits = rng.normal(size=(400, 4))
    logits[np.arange(400), labels] += 1.5  # Informative, then rescaled.
    logits *= scale
    temperature = cal.fit_temperature(logits, labels)
    expected, step = _grid_temperature(logits, labels)
    assert abs(math.log(temperature) - math.log(expected)) <= step
    assert cal.nll(logits, labels, temperature) <= cal.nll(logits, labels, expected)
    assert cal.fit_temperature(logits, labels) == temperature  # Deterministic.


def test_fit_temperature_binary_and_bounds():
    rng = np.random.default_rng(3)
    z = rng.normal(size=200) * 2
    y = (rng.random(200) < 1 / (1 + np.exp(-z / 2))).astype(int)
    binary = cal.fit_temperature(z, y)
    two_class = cal.fit_temperature(np.stack([np.zeros_like(z), z], axis=1), y)
    assert binary == pytest.approx(two_class, rel=1e-12)
    # Every example right with a margin: the NLL keeps falling as T -> 0.
    logits = np.eye(3)[[0, 1, 2, 0]] * 5.0
    assert cal.fit_temperature(logits, [0, 1, 2, 0], bounds=(0.1, 10)) == 0.1


def test_nll_matches_keras_cross_entropy():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(10, 3)).astype("float32")
    labels = rng.integers(0, 3, 10)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    expected = float(keras.ops.convert_to_numpy(loss(labels, logits / 2.0)))
    assert cal.nll(logits, labels, 2.0) == pytest.approx(expected, rel=1e-5)


Z22 = np.zeros((2, 2))


@pytest.mark.parametrize(
    "function, args, kwargs, message",
    [
        (cal.fit_temperature, (np.zeros((3, 2)), [0, 1, 2]), {}, "labels"),
        (cal.fit_temperature, (np.zeros((3, 2)), [0, 1]), {}, "shape"),
        (cal.fit_temperature, (np.full((2, 2), np.nan), [0, 1]), {}, "NaN"),
        (cal.fit_temperature, (np.zeros((0, 2)), []), {}, "at least one"),
        (cal.fit_temperature, (Z22, [0.5, 1]), {}, "integer"),
        (cal.fit_temperature, (Z22, [0, 1]), {"bounds": (2, 1)}, "bounds"),
        (cal.fit_temperature, (Z22, [0, 1]), {"tolerance": 0}, "tolerance"),
        (cal.fit_temperature, (Z22, [0, 1]), {"max_iterations": 0}, "max_iter"),
        (cal.nll, (Z22, [0, 1]), {"temperature": -1.0}, "temperature"),
        (cal.nll, (Z22, [0, 1]), {"temperature": float("nan")}, "received nan"),
        (cal.fit_temperature, (Z22, [0, 1]), {"bounds": (1, np.inf)}, "bounds"),
        (cal.fit_temperature, (Z22, [0, 1]), {"tolerance": np.nan}, "tolerance"),
        (cal.TemperatureScaling, (float("inf"),), {}, "received inf"),
        (cal.calibration_errors, (Z22, [0, 1]), {"num_bins": 2.0}, "num_bins"),
        (cal.TemperatureScaling, (0.0,), {}, "temperature"),
        (cal.calibration_errors, (Z22, [0, 1]), {"num_bins": 0}, "num_bins"),
    ],
)
def test_validation(function, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        function(*args, **kwargs)


def test_numpy_scalars_are_accepted():
    assert cal.nll(Z22, [0, 1], temperature=np.float32(2.0)) == pytest.approx(
        cal.nll(Z22, [0, 1], temperature=2.0)
    )
    assert cal.calibration_errors(Z22, [0, 1], num_bins=np.int64(4))["ece"] >= 0


def _classifier():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="relu", name="body")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))


def test_with_temperature_and_merge_temperature():
    model = _classifier()
    x = np.random.default_rng(5).normal(size=(6, 4)).astype("float32")
    logits = model.predict(x, verbose=0)

    wrapped = cal.with_temperature(model, 1.7)
    np.testing.assert_allclose(wrapped.predict(x, verbose=0), logits / 1.7, rtol=1e-6)
    layer = wrapped.get_layer("temperature_scaling")
    clone = cal.TemperatureScaling.from_config(layer.get_config())
    assert clone.temperature == 1.7

    cal.merge_temperature(model, 2.0)  # A power of two: exact.
    np.testing.assert_array_equal(model.predict(x, verbose=0), logits / 2.0)
    cal.merge_temperature(model, 1.3, head="head")
    np.testing.assert_allclose(
        model.predict(x, verbose=0), logits / 2.6, rtol=1e-5, atol=1e-7
    )
    with pytest.raises(ValueError, match="temperature"):
        cal.merge_temperature(model, 0)
    with pytest.raises(ValueError, match="nope"):
        cal.merge_temperature(model, 1.0, head="nope")


def test_reliability_diagram_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(50, 3)) * 4
    labels = rng.integers(0, 3, 50)
    path = cal.reliability_diagram(
        {"a": logits, "b": logits / 3}, labels, tmp_path / "r.png", temperature=2.0
    )
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="png"):
        cal.reliability_diagram(logits, labels, tmp_path / "r.pdf")
    with pytest.raises(ValueError, match="unknown models"):
        cal.reliability_diagram(
            {"a": logits}, labels, tmp_path / "s.png", temperature={"z": 1.0}
        )


def test_reliability_diagram_without_matplotlib(tmp_path, monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"keras-adapters\[plot\]"):
        cal.reliability_diagram(np.zeros((2, 2)), [0, 1], tmp_path / "r.png")
