"""The studies' harness (studies/_harness.py): statistics against hand-computed
values and scipy, and the per-seed JSON store (resume, atomic records)."""

import json
import math
import os
import sys

import numpy as np
import pytest
from _fixtures import backend_independent
from scipy import stats

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from studies import _harness as harness  # noqa: E402

pytestmark = backend_independent


def test_t_interval_by_hand():
    # mean 2, sample std 1, t_{0.975, 2} = 4.302653 -> half width 4.302653/sqrt(3)
    result = harness.t_interval([1.0, 2.0, 3.0])
    assert result["mean"] == 2.0
    assert result["std"] == 1.0
    assert result["n"] == 3
    np.testing.assert_allclose(result["half_width"], 4.302653 / math.sqrt(3), rtol=1e-6)
    np.testing.assert_allclose(
        [result["low"], result["high"]], [2 - 2.484138, 2 + 2.484138], rtol=1e-6
    )


def test_t_interval_matches_scipy():
    values = np.random.default_rng(0).normal(size=7)
    low, high = stats.t.interval(
        0.9, len(values) - 1, loc=values.mean(), scale=stats.sem(values)
    )
    result = harness.t_interval(values, confidence=0.9)
    np.testing.assert_allclose([result["low"], result["high"]], [low, high], rtol=1e-12)


def test_t_interval_of_one_value_has_no_width():
    result = harness.t_interval([0.5])
    assert result["mean"] == 0.5 and math.isnan(result["half_width"])
    assert harness.format_interval(result) == "0.5 (n=1)"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: harness.t_interval([]), "at least 1"),
        (lambda: harness.t_interval([1.0, float("nan")]), "finite"),
        (lambda: harness.t_interval([1.0, 2.0], confidence=1.5), "confidence"),
        (lambda: harness.bootstrap_interval([1.0]), "at least 2"),
        (lambda: harness.paired_difference({1: 0.5}, {2: 0.5}), "No shared seeds"),
        (lambda: harness.power_law_fit([1, 1], [2, 3]), "distinct"),
        (lambda: harness.power_law_fit([1, 2], [0, 3]), "positive"),
        (lambda: harness.binomial_interval(5, 4), "correct"),
        (lambda: harness.Study("Bad Name"), "name"),
    ],
)
def test_bad_inputs_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bootstrap_interval_of_constant_and_coverage():
    constant = harness.bootstrap_interval([3.0, 3.0, 3.0])
    assert constant["low"] == constant["high"] == constant["estimate"] == 3.0
    # For the mean of 400 normal values, the percentile interval is close to
    # the t interval (both about mean +- 1.97 sigma / 20).
    values = np.random.default_rng(1).normal(size=400)
    boot = harness.bootstrap_interval(values, resamples=4000)
    t = harness.t_interval(values)
    np.testing.assert_allclose(
        [boot["low"], boot["high"]], [t["low"], t["high"]], atol=0.01
    )
    median = harness.bootstrap_interval(values, statistic=np.median, resamples=500)
    assert median["low"] < np.median(values) < median["high"]


def test_paired_difference_uses_shared_seeds_only():
    a = {0: 0.90, 1: 0.80, 2: 0.70, 7: 0.1}
    b = {0: 0.85, 1: 0.78, 2: 0.60, 9: 0.9}
    result = harness.paired_difference(a, b)
    assert result["seeds"] == [0, 1, 2]
    differences = [0.05, 0.02, 0.10]
    np.testing.assert_allclose(result["mean"], np.mean(differences))
    expected = stats.ttest_rel([0.90, 0.80, 0.70], [0.85, 0.78, 0.60]).pvalue
    np.testing.assert_allclose(result["p_value"], expected, rtol=1e-10)


def test_power_law_fit_recovers_exact_exponent():
    d = np.repeat([64, 128, 256, 512], 3)
    seeds = np.tile([0, 1, 2], 4)
    noise = np.tile([0.9, 1.0, 1.1], 4)  # a per-seed constant: slope unchanged
    result = harness.power_law_fit(d, 5.0 * d**1.5 * noise, seeds, resamples=200)
    np.testing.assert_allclose(result["slope"], 1.5, atol=1e-10)
    np.testing.assert_allclose([result["low"], result["high"]], [1.5, 1.5], atol=1e-10)
    noisy = harness.power_law_fit(
        d,
        d * np.exp(np.random.default_rng(2).normal(0, 0.3, d.size)),
        seeds,
        resamples=200,
    )
    assert noisy["low"] < noisy["slope"] < noisy["high"]


def test_binomial_interval_by_hand():
    # Wilson, 90/100, z = 1.959964: centre 0.8824, half width 0.0594
    result = harness.binomial_interval(90, 100)
    np.testing.assert_allclose(
        [result["low"], result["high"]], [0.82564, 0.94476], atol=1e-4
    )


def test_study_records_resume_and_summaries(tmp_path):
    study = harness.Study("demo", root=tmp_path)
    assert study.runs() == [] and not study.has("lora/lr=1e-3", 0)
    study.record(
        "lora/lr=1e-3", 0, {"accuracy": np.float32(0.5), "curve": np.arange(3)}
    )
    study.record("lora/lr=1e-3", 1, {"accuracy": 0.75})
    study.record("hut/lr=1e-3", 0, {"accuracy": 0.25})
    assert study.has("lora/lr=1e-3", 0) and not study.has("lora/lr=1e-3", 2)
    runs = study.runs()
    assert [(r["cell"], r["seed"]) for r in runs] == [
        ("hut/lr=1e-3", 0),
        ("lora/lr=1e-3", 0),
        ("lora/lr=1e-3", 1),
    ]
    assert runs[1]["curve"] == [0, 1, 2] and runs[1]["accuracy"] == 0.5
    assert study.by_cell("accuracy") == {
        "hut/lr=1e-3": {0: 0.25},
        "lora/lr=1e-3": {0: 0.5, 1: 0.75},
    }
    # One file per run, readable JSON, nothing left over from the atomic write.
    names = sorted(os.listdir(study.runs_directory))
    assert names == [
        "hut__lr=1e-3__seed0.json",
        "lora__lr=1e-3__seed0.json",
        "lora__lr=1e-3__seed1.json",
    ]
    # Quick runs are stored apart and never mixed with the real ones.
    quick = harness.Study("demo", quick=True, root=tmp_path)
    assert quick.runs() == []
    quick.write_summary({"x": np.float64(1.0)}, "text\n")
    assert json.loads((tmp_path / "demo" / "summary_quick.json").read_text()) == {
        "x": 1.0
    }
    with pytest.raises(ValueError, match="cell"):
        study.record("Bad Cell", 0, {})
    with pytest.raises(ValueError, match="seed"):
        study.record("lora", -1, {})


def test_errorbar_figure_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "figure.png"
    points = [
        (64, harness.t_interval([1.0, 2.0])),
        (128, harness.t_interval([2.0, 4.0])),
    ]
    harness.errorbar_figure(path, {"lora": points}, "d", "steps", log=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
