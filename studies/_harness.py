"""The harness every study shares: seeds, per-seed JSON, intervals, figures.

A study is a script in `studies/` that runs *cells* (one configuration: a
method, a learning rate, a width, ...) for several *seeds*. Each finished
(cell, seed) run is written at once, atomically, as one JSON file under
`docs/studies/<study>/runs/` (`--quick` runs go to `<study>/quick/`, never
mixed with the committed results), so a study that is stopped can be resumed
(finished runs are skipped) and reported from what it has. Reports and
figures are computed from those files only (`--report` rebuilds them without
running anything).

Statistics:

- `t_interval`: mean with a Student-t confidence interval (95% by default),
  the sample standard deviation (`ddof=1`).
- `bootstrap_interval`: a percentile bootstrap interval of any statistic.
- `paired_difference`: `a - b` over the seeds both have, with the t interval
  of the per-seed differences (both methods saw the same data split and
  initial weights for a given seed).
- `power_law_fit`: the slope of `log y` against `log x` by least squares,
  with a bootstrap interval that resamples seeds (whole curves) with
  replacement.
- `binomial_interval`: Wilson's interval of an accuracy on `n` examples.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping

import numpy as np
from scipy import stats

from keras_adapters import _io

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "studies"
_NAME = re.compile(r"[a-z0-9][a-z0-9_.=+-]*")


def _check_values(name, values, minimum=1):
    array = np.asarray(values, dtype="float64").reshape(-1)
    if array.size < minimum:
        raise ValueError(
            f"`{name}` needs at least {minimum} value(s); received {array.size}."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` must be finite numbers; received {list(array)}.")
    return array


def _check_confidence(confidence):
    if not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"`confidence` must be in (0, 1); received {confidence!r}.")
    return float(confidence)


def t_interval(values: Iterable[float], confidence: float = 0.95) -> dict:
    """Mean and Student-t confidence interval of independent values.

    Args:
        values: finite numbers, at least one (one value gives an interval of
            `nan` width: no spread can be estimated).
        confidence: the coverage in (0, 1).

    Returns:
        A dict with `mean`, `low`, `high`, `half_width`, `std` (sample
        standard deviation, `ddof=1`) and `n`.

    Example:

    >>> t_interval([1.0, 2.0, 3.0])["half_width"]  # 4.303 * 1 / sqrt(3)
    2.484...
    """
    array = _check_values("values", values)
    confidence = _check_confidence(confidence)
    n = array.size
    mean = float(array.mean())
    if n == 1:
        std = half = math.nan
    else:
        std = float(array.std(ddof=1))
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))
    return {
        "mean": mean,
        "low": mean - half,
        "high": mean + half,
        "half_width": half,
        "std": std,
        "n": n,
    }


def bootstrap_interval(
    values: Iterable[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict:
    """Percentile bootstrap interval of `statistic` over `values`.

    Args:
        values: finite numbers (at least 2), resampled with replacement.
        statistic: a function of a 1-D array returning a number; vectorized
            statistics are applied to all resamples at once when they accept
            `axis=-1` (NumPy reductions do).
        confidence: the coverage in (0, 1).
        resamples: positive int, the number of bootstrap resamples.
        seed: the resampling seed (the interval is deterministic).

    Returns:
        A dict with `estimate` (the statistic of `values`), `low`, `high`
        and `n`.
    """
    array = _check_values("values", values, minimum=2)
    confidence = _check_confidence(confidence)
    if not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"`resamples` must be a positive int; received {resamples!r}.")
    rng = np.random.default_rng(seed)
    samples = array[rng.integers(0, array.size, size=(resamples, array.size))]
    try:
        results = np.asarray(statistic(samples, axis=-1), dtype="float64")
    except TypeError:
        results = np.array([statistic(s) for s in samples], dtype="float64")
    tail = (1 - confidence) / 2
    return {
        "estimate": float(statistic(array)),
        "low": float(np.quantile(results, tail)),
        "high": float(np.quantile(results, 1 - tail)),
        "n": int(array.size),
    }


def paired_difference(a: Mapping, b: Mapping, confidence: float = 0.95) -> dict:
    """`a - b` over the seeds both have, with a t interval of the differences.

    Args:
        a: `{seed: value}` of the first method.
        b: `{seed: value}` of the second, on the same seeds' data splits.
        confidence: the coverage in (0, 1).

    Returns:
        `t_interval` of the per-seed differences, plus `seeds` (the shared
        seeds, sorted) and `p_value` (two-sided paired t-test; `nan` for
        fewer than 2 seeds or identical differences).
    """
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        raise ValueError("`a` and `b` must be {seed: value} mappings.")
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError(f"No shared seeds: `a` has {sorted(a)}, `b` has {sorted(b)}.")
    differences = [float(a[s]) - float(b[s]) for s in shared]
    result = t_interval(differences, confidence)
    p_value = math.nan
    if len(shared) > 1 and result["std"] > 0:
        p_value = float(stats.ttest_1samp(differences, 0.0).pvalue)
    return {**result, "seeds": shared, "p_value": p_value}


def power_law_fit(
    x: Iterable[float],
    y: Iterable[float],
    groups: Iterable | None = None,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """Fits `y = C x^slope` by least squares on `log y` against `log x`.

    Args:
        x: positive numbers (e.g. widths `d`).
        y: positive numbers, one per `x` (e.g. steps to a threshold).
        groups: optional labels, one per point (e.g. the seed): the
            bootstrap resamples whole groups, so points of one seed stay
            together. Without it, points are resampled one by one.
        confidence: the coverage in (0, 1).
        resamples: positive int, bootstrap resamples.
        seed: the resampling seed.

    Returns:
        A dict with `slope`, `intercept` (of `log y`), `low`, `high` (the
        bootstrap percentile interval of the slope) and `n` (points).
    """
    x = _check_values("x", x, minimum=2)
    y = _check_values("y", y, minimum=2)
    if x.size != y.size:
        raise ValueError(f"`x` has {x.size} values and `y` {y.size}; they must match.")
    if np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("`x` and `y` must be positive for a power-law fit.")
    if np.unique(x).size < 2:
        raise ValueError(f"`x` needs at least 2 distinct values; received {set(x)}.")
    confidence = _check_confidence(confidence)
    groups = np.arange(x.size) if groups is None else np.asarray(list(groups))
    if groups.size != x.size:
        raise ValueError("`groups` must have one label per point.")
    lx, ly = np.log(x), np.log(y)
    slope, intercept = np.polyfit(lx, ly, 1)
    labels = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in labels]
    rng = np.random.default_rng(seed)
    slopes = []
    for _ in range(resamples):
        pick = np.concatenate(
            [members[i] for i in rng.integers(0, labels.size, labels.size)]
        )
        if np.unique(lx[pick]).size < 2:
            continue
        slopes.append(np.polyfit(lx[pick], ly[pick], 1)[0])
    tail = (1 - confidence) / 2
    return {
        "slope": float(slope),
        "intercept": float(intercept),
        "low": float(np.quantile(slopes, tail)),
        "high": float(np.quantile(slopes, 1 - tail)),
        "n": int(x.size),
    }


def binomial_interval(correct: int, n: int, confidence: float = 0.95) -> dict:
    """Wilson score interval of an accuracy `correct / n`.

    Args:
        correct: int in `[0, n]`.
        n: positive int, the number of test examples.
        confidence: the coverage in (0, 1).

    Returns:
        A dict with `accuracy`, `low`, `high` and `n`.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"`n` must be a positive int; received {n!r}.")
    if not isinstance(correct, (int, np.integer)) or not 0 <= correct <= n:
        raise ValueError(f"`correct` must be an int in [0, {n}]; received {correct!r}.")
    confidence = _check_confidence(confidence)
    z = stats.norm.ppf(0.5 + confidence / 2)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"accuracy": p, "low": centre - half, "high": centre + half, "n": int(n)}


def format_interval(summary: Mapping, scale: float = 1.0, digits: int = 1) -> str:
    """`"mean [low, high]"` of a `t_interval`-style dict, times `scale`."""
    mean = summary.get("mean", summary.get("estimate", summary.get("slope")))
    parts = [mean, summary["low"], summary["high"]]
    mean, low, high = (scale * v for v in parts)
    if math.isnan(low):
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


# ---------------------------------------------------------------- run storage


class Study:
    """The per-seed JSON files of one study.

    Args:
        name: the study's name (lowercase letters, digits, `_`).
        quick: whether this is a `--quick` run (stored apart).
        root: where studies live; defaults to `docs/studies/`.

    Example:

    ```python
    study = Study("teacher_student")
    if not study.has("lora/d=64", 3):
        study.record("lora/d=64", 3, {"steps": 1234})
    study.runs()  # [{"cell": "lora/d=64", "seed": 3, "steps": 1234, ...}]
    ```
    """

    def __init__(self, name: str, quick: bool = False, root=None):
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_]+", name):
            raise ValueError(
                f"`name` must be lowercase letters, digits and '_'; received {name!r}."
            )
        self.name = name
        self.quick = bool(quick)
        self.directory = pathlib.Path(root or RESULTS) / name
        self.runs_directory = self.directory / ("quick" if quick else "runs")

    def _path(self, cell: str, seed: int) -> pathlib.Path:
        if not isinstance(cell, str) or not all(
            _NAME.fullmatch(p) for p in cell.split("/")
        ):
            raise ValueError(
                f"`cell` must be '/'-separated parts of lowercase letters, digits "
                f"and '_.=+-'; received {cell!r}."
            )
        if (
            not isinstance(seed, (int, np.integer))
            or isinstance(seed, bool)
            or seed < 0
        ):
            raise ValueError(f"`seed` must be a non-negative int; received {seed!r}.")
        return self.runs_directory / f"{cell.replace('/', '__')}__seed{int(seed)}.json"

    def has(self, cell: str, seed: int) -> bool:
        """Whether the run `(cell, seed)` has finished and was recorded."""
        return self._path(cell, seed).is_file()

    def record(self, cell: str, seed: int, result: Mapping) -> dict:
        """Writes one finished run (atomically) and returns what was written."""
        path = self._path(cell, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        run = {
            "study": self.name,
            "cell": cell,
            "seed": int(seed),
            "quick": self.quick,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **_plain(dict(result)),
        }
        text = json.dumps(run, indent=1, sort_keys=True, allow_nan=True) + "\n"
        _io.write_bytes(path, text.encode())
        return run

    def runs(self, cell_prefix: str = "") -> list:
        """Every recorded run (dicts), sorted by cell then seed."""
        if not self.runs_directory.is_dir():
            return []
        runs = [json.loads(p.read_text()) for p in self.runs_directory.glob("*.json")]
        runs = [r for r in runs if r["cell"].startswith(cell_prefix)]
        return sorted(runs, key=lambda r: (r["cell"], r["seed"]))

    def by_cell(self, key: str) -> dict:
        """`{cell: {seed: run[key]}}` over the runs that have `key`."""
        table: dict = {}
        for run in self.runs():
            if key in run:
                table.setdefault(run["cell"], {})[run["seed"]] = run[key]
        return table

    def write_summary(self, summary: Mapping, text: str) -> None:
        """Writes `summary.json` and `summary.md` beside the runs."""
        suffix = "_quick" if self.quick else ""
        self.directory.mkdir(parents=True, exist_ok=True)
        body = json.dumps(_plain(dict(summary)), indent=1, sort_keys=True) + "\n"
        _io.write_bytes(self.directory / f"summary{suffix}.json", body.encode())
        _io.write_bytes(self.directory / f"summary{suffix}.md", text.encode())

    def figure_path(self, name: str) -> pathlib.Path:
        suffix = "_quick" if self.quick else ""
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.directory / f"{name}{suffix}.png"


def write_json(path, data: Mapping) -> None:
    """Writes `data` as indented JSON, atomically."""
    body = json.dumps(_plain(dict(data)), indent=1, sort_keys=True) + "\n"
    _io.write_bytes(path, body.encode())


def _plain(value):
    """JSON-ready copy: NumPy scalars and arrays become Python numbers/lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------- figures


def errorbar_figure(
    path, groups: Mapping, xlabel: str, ylabel: str, title: str = "", log: bool = False
):
    """Means with interval bars, one series per group, saved as a PNG.

    Args:
        path: the PNG file to write.
        groups: `{series: [(x, summary), ...]}` with `summary` a
            `t_interval`-style dict (`mean`, `low`, `high`); `x` numbers or
            labels.
        xlabel, ylabel, title: the axes' labels and the title.
        log: log-log axes (for scaling laws).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for index, (series, points) in enumerate(groups.items()):
        xs = [p[0] for p in points]
        means = np.array([p[1]["mean"] for p in points])
        low = np.array([p[1]["low"] for p in points])
        high = np.array([p[1]["high"] for p in points])
        errors = np.nan_to_num(np.stack([means - low, high - means]))
        numeric = all(isinstance(x, (int, float)) for x in xs)
        positions = xs if numeric else np.arange(len(xs)) + 0.08 * index
        axis.errorbar(
            positions, means, yerr=errors, capsize=3, marker="o", label=series
        )
        if not numeric:
            axis.set_xticks(np.arange(len(xs)), xs)
    if log:
        axis.set_xscale("log")
        axis.set_yscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if title:
        axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    with _io.atomic_file(path, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)


# ----------------------------------------------------------------- command line


def parser(description: str) -> argparse.ArgumentParser:
    """The options every study takes; a study adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in seconds (results under <study>/quick/, not the docs')",
    )
    p.add_argument("--seeds", type=int, default=None, help="number of seeds per cell")
    p.add_argument(
        "--report",
        action="store_true",
        help="rebuild the summary and figures from the JSON files, run nothing",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="delete this mode's recorded runs first (default: resume)",
    )
    return p


def open_study(name: str, args) -> Study:
    """The `Study` for parsed `args`, emptied first with `--fresh`."""
    study = Study(name, quick=args.quick)
    if args.fresh and study.runs_directory.is_dir():
        for path in study.runs_directory.glob("*.json"):
            os.remove(path)
    return study


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def check_names(names, known, what="cell"):
    """Raises on a name not in `known`, naming the allowed ones."""
    for name in names:
        if name not in known:
            raise ValueError(f"Unknown {what} {name!r}; known: {sorted(known)}.")
