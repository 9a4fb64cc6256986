"""Teacher-student scaling study (after Dayi & Chen, COLT 2025).

Claim tested: a rank-1 student started at the base network recovers a
teacher whose first layer is the base plus a rank-1 perturbation comparable
in norm, with online SGD, in about `d k^O(1)` steps whatever the activation's
information exponent, where learning from scratch can need far more.

Setup (ours, stated; the paper's exact parameterization was not available):

- `x ~ N(0, I_d)`, `f(x; W) = sum_j a_j sigma(x . w_j)`, `k = 4` hidden units,
  readout `a_j = +-1/sqrt(k)` fixed, base `W` (`d x k`) with orthonormal
  columns; teacher `W* = W + u c^T`, `u` a random unit vector, `c` with
  `||u c^T||_F = ||W||_F` (comparable norms).
- `sigma(z) = (|z| - sqrt(2/pi)) / sqrt(1 - 2/pi)`: ReLU minus its linear
  part (`relu(z) - z/2 = |z|/2`), centred and scaled to variance 1; an even
  function, so its first Hermite coefficient is 0: information exponent 2.
- Students, trained by online SGD on `0.5 (f - y)^2`, fresh Gaussian samples
  in mini-batches of `max(2, d / 32)` (the step is `eta` times the summed
  per-sample gradients, so a step moves by `c / 32` of a sample's natural
  scale at every width; samples, not steps, are counted):
  `lora`: `W + p q^T` (`p` in R^d, `q` in R^k; `p` uniform in
  `+-1/sqrt(d)` as PEFT's default, `q = 0`), `d + k` parameters;
  `scratch`: the whole `W` trained from random orthonormal columns;
  `kernel`: the first layer linearized at the base (`f(W) + <grad_W f(W), D>`,
  `D` trained from 0): the lazy/NTK student.
- Learning rate `eta = c / d` (the theory's scaling: a sample's gradient has
  squared norm ~d), `c` tuned per (student, d) over
  `{0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2}` on 2 tuning seeds not used for the
  results: the first rate whose tuning seeds both reach relative loss 0.05
  (all rates run in one vectorized run, stopped then); if none does, the
  lowest final loss. In the committed run, LoRA at d <= 512 and the other
  students at d <= 256 were tuned by the earlier rule "fewest median
  samples, every rate run to its end" (`tuning` in their JSON lists every
  rate's score); the two rules pick the same rate whenever the first rate
  to finish is also the fastest on median.
- Measured: test loss on 500 fixed Gaussian inputs relative to the base
  network's (`relative loss`), every `d / 2` samples; the samples needed to
  reach relative loss 0.5, 0.2 and 0.05, within a budget of 200 d (LoRA),
  400 d (scratch) and 50 d (kernel, which plateaus) samples; runs that do
  not reach a threshold are counted as censored and left out of the fits.
- Fitted: `samples = C d^slope` over the widths where every seed reached the
  threshold (bootstrap over seeds).

Run: `python studies/teacher_student.py [--quick] [--seeds N]`.
"""

from __future__ import annotations

import math
import sys

import numpy as np

sys.path.insert(0, __import__("os").path.dirname(__file__))
import _harness as harness  # noqa: E402

HIDDEN = 4
THRESHOLD = 0.05
THRESHOLDS = (0.5, 0.2, 0.05)
RATES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
# Samples per run, in units of d (the kernel student plateaus early).
BUDGET = {"lora": 200, "scratch": 400, "kernel": 50}
STUDENTS = ("lora", "scratch", "kernel")
TEST_SIZE = 500
TUNING_SEEDS = (1000, 1001)


_NORM = math.sqrt(1.0 - 2.0 / math.pi)


def sigma(z):
    """ReLU minus its linear part, centred and scaled: information exponent 2.

    `relu(z) - z / 2 = |z| / 2` is even, so its first Hermite coefficient is
    0 and its second is not; centring and scaling give mean 0, variance 1.
    """
    return (np.abs(z) - math.sqrt(2.0 / math.pi)) / _NORM


def sigma_prime(z):
    return np.sign(z) / _NORM


def orthonormal(rng, shape):
    """`(..., d, k)` with orthonormal columns (Haar)."""
    q, r = np.linalg.qr(rng.standard_normal(shape))
    return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


def problems(seeds, d):
    """Base kernel, readout, teacher kernel and test set for each seed."""
    out = {"base": [], "readout": [], "teacher": [], "test_x": [], "start": []}
    for seed in seeds:
        rng = np.random.default_rng([seed, d])
        base = orthonormal(rng, (d, HIDDEN))
        readout = rng.choice([-1.0, 1.0], HIDDEN) / math.sqrt(HIDDEN)
        u = rng.standard_normal(d)
        u /= np.linalg.norm(u)
        c = rng.standard_normal(HIDDEN)
        c *= np.linalg.norm(base) / np.linalg.norm(c)  # ||u c^T|| = ||W||
        out["base"].append(base)
        out["readout"].append(readout)
        out["teacher"].append(base + np.outer(u, c))
        out["test_x"].append(rng.standard_normal((TEST_SIZE, d)))
        out["start"].append(orthonormal(rng, (d, HIDDEN)))
    return {k: np.stack(v) for k, v in out.items()}


def network(x, kernel, readout):
    """`(S, n)` outputs for `(S, n, d)` inputs and `(S, d, k)` kernels."""
    return np.einsum("snk,sk->sn", sigma(np.einsum("snd,sdk->snk", x, kernel)), readout)


def batch_size(d):
    """Samples per step: `d / 32` (at least 2), so that a step moves the
    parameters by a small fraction (`eta * batch = c / 32`) at every width."""
    return max(2, d // 32)


def run(student, d, rates, seeds, budget_factor=400, batch=None, chunk=64, stop=None):
    """Online SGD for one student at one width, vectorized over lanes.

    Lane `i` trains seed `seeds[i]` with `eta = rates[i] / d` on fresh
    Gaussian mini-batches of `batch` samples (the update is `eta` times the
    sum of the per-sample gradients, so one step of `batch` samples is
    `batch` online-SGD steps with the parameters held fixed).

    Returns:
        `(samples, final_relative_loss, curve)`: `samples` is `(S, 3)`, the
        samples to reach each of `THRESHOLDS` (`nan` where not reached within
        `budget_factor * d` samples); `curve` the relative losses at the
        checkpoints (every `d // 2` samples), `(S, checkpoints)`.
    """
    batch = batch or batch_size(d)
    p = problems(seeds, d)
    s = len(seeds)
    base, readout = p["base"], p["readout"]
    test_y = network(p["test_x"], p["teacher"], readout)
    base_loss = np.mean((network(p["test_x"], base, readout) - test_y) ** 2, axis=1)
    base_pre = np.einsum("snd,sdk->snk", p["test_x"], base)
    rng = np.random.default_rng([*seeds, d, 7])
    eta = np.asarray(rates, dtype="float64") / d
    if student == "lora":
        left = np.stack(
            [np.random.default_rng([seed, d, 3]).uniform(-1, 1, d) for seed in seeds]
        ) / math.sqrt(d)
        right = np.zeros((s, HIDDEN))
    elif student == "scratch":
        kernel = p["start"].copy()
    else:
        delta = np.zeros((s, d, HIDDEN))

    def test_loss():
        if student == "lora":
            shift = (
                np.einsum("snd,sd->sn", p["test_x"], left)[..., None] * right[:, None]
            )
            out = np.einsum("snk,sk->sn", sigma(base_pre + shift), readout)
        elif student == "scratch":
            out = network(p["test_x"], kernel, readout)
        else:
            shift = np.einsum("snd,sdk->snk", p["test_x"], delta)
            linear = sigma(base_pre) + sigma_prime(base_pre) * shift
            out = np.einsum("snk,sk->sn", linear, readout)
        loss = np.mean((out - test_y) ** 2, axis=1) / base_loss
        return np.where(np.isfinite(loss), loss, np.inf)

    every = max(batch, d // 2)
    total = budget_factor * d
    samples = np.full((s, len(THRESHOLDS)), np.nan)
    curve = []
    teacher = p["teacher"]
    done = 0
    step_eta = eta[:, None]
    while done < total:
        xs = rng.standard_normal((chunk, s, batch, d))
        pre_t = np.einsum("tsbd,sdk->tsbk", xs, teacher)
        ys = np.einsum("tsbk,sk->tsb", sigma(pre_t), readout)
        for t in range(chunk):
            x, y = xs[t], ys[t]  # (s, b, d), (s, b)
            if student == "lora":
                proj = np.einsum("sbd,sd->sb", x, left)
                pre = (
                    np.einsum("sbd,sdk->sbk", x, base)
                    + proj[..., None] * right[:, None]
                )
                err = np.einsum("sbk,sk->sb", sigma(pre), readout) - y
                g = err[..., None] * readout[:, None] * sigma_prime(pre)  # (s, b, k)
                grad_right = np.einsum("sbk,sb->sk", g, proj)
                grad_left = np.einsum("sbk,sk,sbd->sd", g, right, x)
                right -= step_eta * grad_right
                left -= step_eta * grad_left
            elif student == "scratch":
                pre = np.einsum("sbd,sdk->sbk", x, kernel)
                err = np.einsum("sbk,sk->sb", sigma(pre), readout) - y
                g = err[..., None] * readout[:, None] * sigma_prime(pre)
                kernel -= step_eta[..., None] * np.einsum("sbd,sbk->sdk", x, g)
            else:
                pre = np.einsum("sbd,sdk->sbk", x, base)
                shift = np.einsum("sbd,sdk->sbk", x, delta)
                linear = sigma(pre) + sigma_prime(pre) * shift
                err = np.einsum("sbk,sk->sb", linear, readout) - y
                g = err[..., None] * readout[:, None] * sigma_prime(pre)
                delta -= step_eta[..., None] * np.einsum("sbd,sbk->sdk", x, g)
            done += batch
            if done % every < batch:
                loss = test_loss()
                curve.append(loss)
                newly = np.isnan(samples) & (loss[:, None] <= np.array(THRESHOLDS))
                samples[newly] = done
                finished = np.all(~np.isfinite(loss) | ~np.isnan(samples[:, -1]))
                if finished or (stop is not None and stop(samples[:, -1])):
                    done = total  # every lane finished or diverged, or `stop`
                    break
            if done >= total:
                break
    curve = np.stack(curve, axis=1)
    return samples, curve[:, -1], curve


def tune(student, d, budget_factor):
    """The rate `c` (in `eta = c / d`) with the fewest samples on tuning seeds.

    Every (rate, tuning seed) pair is one lane of a single vectorized run,
    which stops as soon as every tuning seed of one rate has reached the
    threshold (that rate is then picked: the others have not reached it).
    Ties (no lane reaching the threshold) go to the lowest final loss.
    """
    lanes = [(rate, seed) for rate in RATES for seed in TUNING_SEEDS]
    groups = [
        np.array([i for i, (r, _) in enumerate(lanes) if r == rate]) for rate in RATES
    ]

    def one_rate_done(reached):
        return any(np.all(~np.isnan(reached[g])) for g in groups)

    samples, final, _ = run(
        student,
        d,
        [r for r, _ in lanes],
        [s for _, s in lanes],
        budget_factor,
        stop=one_rate_done,
    )
    scores = []
    for rate in RATES:
        pick = [i for i, (r, _) in enumerate(lanes) if r == rate]
        reached = np.nan_to_num(samples[pick, -1], nan=np.inf)
        finals = np.where(np.isfinite(final[pick]), final[pick], np.inf)
        scores.append((float(np.median(reached)), float(np.median(finals)), rate))
    return min(scores)[2], scores


def stride(n, points=100):
    return max(1, n // points)


def _finite(value):
    """A float, or `None` for a diverged (non-finite) value."""
    return float(value) if np.isfinite(value) else None


def main(argv=None):
    p = harness.parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    study = harness.open_study("teacher_student", args)
    if args.quick:
        widths, seeds, scale = (32, 64), list(range(args.seeds or 3)), 0.25
    else:
        widths, seeds, scale = (
            (64, 128, 256, 512, 1024),
            list(range(args.seeds or 10)),
            1,
        )
    if not args.report:
        for d in widths:
            for student in STUDENTS:
                cell = f"{student}/d={d}"
                todo = [s for s in seeds if not study.has(cell, s)]
                if not todo:
                    continue
                budget = max(1, int(BUDGET[student] * scale))
                with np.errstate(over="ignore", invalid="ignore"):
                    rate, scores = tune(student, d, budget)
                harness.log(f"{cell}: tuned c = {rate} ({scores})")
                with np.errstate(over="ignore", invalid="ignore"):
                    steps, final, curve = run(
                        student, d, [rate] * len(todo), todo, budget
                    )
                for i, seed in enumerate(todo):
                    study.record(
                        cell,
                        seed,
                        {
                            "student": student,
                            "d": d,
                            "hidden": HIDDEN,
                            "activation": "He3/sqrt(6)",
                            "rate_c": rate,
                            "eta": rate / d,
                            "tuning": [list(s) for s in scores],
                            "threshold": THRESHOLD,
                            "budget_samples": budget * d,
                            "thresholds": list(THRESHOLDS),
                            "samples_to": [
                                None if np.isnan(v) else int(v) for v in steps[i]
                            ],
                            "samples_to_threshold": (
                                None if np.isnan(steps[i, -1]) else int(steps[i, -1])
                            ),
                            "final_relative_loss": _finite(final[i]),
                            # About 100 checkpoints of the curve, evenly spaced.
                            "batch": batch_size(d),
                            "curve_every": max(batch_size(d), d // 2)
                            * stride(curve.shape[1]),
                            "curve": [
                                _finite(v)
                                for v in curve[
                                    i,
                                    stride(curve.shape[1]) - 1 :: stride(
                                        curve.shape[1]
                                    ),
                                ]
                            ],
                        },
                    )
                harness.log(f"{cell}: steps {steps}, final {np.round(final, 3)}")
    report(study)


def report(study):
    runs = study.runs()
    if not runs:
        print("no runs recorded yet")
        return
    summary, groups = {}, {}
    lines = [
        "| student | d | c (eta = c/d) | seeds | diverged | samples/d to 0.5 | "
        "to 0.2 | to 0.05 | final relative loss |",
        "|---|---:|---:|---:|---:|---|---|---|---|",
    ]
    fits = []
    for student in STUDENTS:
        mine = [r for r in runs if r["student"] == student]
        for d in sorted({r["d"] for r in mine}):
            cell = [r for r in mine if r["d"] == d]
            finals = [r["final_relative_loss"] for r in cell]
            finite = [v for v in finals if v is not None]
            row = {"seeds": len(cell), "diverged": len(cell) - len(finite)}
            row["final_relative_loss"] = harness.t_interval(finite) if finite else None
            texts = []
            for t, threshold in enumerate(THRESHOLDS):
                reached = [r["samples_to"][t] / d for r in cell if r["samples_to"][t]]
                interval = harness.t_interval(reached) if reached else None
                row[f"samples_over_d_to_{threshold}"] = interval
                row[f"reached_{threshold}"] = len(reached)
                text = harness.format_interval(interval) if interval else "-"
                texts.append(f"{text} ({len(reached)}/{len(cell)})")
            summary[f"{student}/d={d}"] = row
            final = row["final_relative_loss"]
            lines.append(
                f"| {student} | {d} | {cell[0]['rate_c']} | {len(cell)} | "
                f"{row['diverged']} | {' | '.join(texts)} | "
                f"{harness.format_interval(final, digits=3) if final else '-'} |"
            )
        for t, threshold in enumerate(THRESHOLDS):
            xs, ys, gs, points = [], [], [], []
            for d in sorted({r["d"] for r in mine}):
                cell = [r for r in mine if r["d"] == d]
                reached = [r for r in cell if r["samples_to"][t]]
                if len(reached) < len(cell):
                    continue  # only widths where every seed reached it
                xs += [d] * len(reached)
                ys += [r["samples_to"][t] for r in reached]
                gs += [r["seed"] for r in reached]
                points.append(
                    (d, harness.t_interval([r["samples_to"][t] for r in reached]))
                )
            if len(set(xs)) >= 2:
                fit = harness.power_law_fit(xs, ys, gs)
                fit["widths"] = sorted(set(xs))
                summary[f"{student}/slope_to_{threshold}"] = fit
                fits.append(
                    f"- {student}, relative loss {threshold}: samples ~ d^"
                    f"{fit['slope']:.2f} [{fit['low']:.2f}, {fit['high']:.2f}] "
                    f"(d = {', '.join(map(str, fit['widths']))})"
                )
            if threshold == THRESHOLD and points:
                groups[student] = points
    lines += ["", "Fitted exponents (95% bootstrap over seeds):", *fits]
    text = "\n".join(lines) + "\n"
    print(text)
    study.write_summary(summary, text)
    if groups:
        harness.errorbar_figure(
            study.figure_path("samples_to_threshold"),
            groups,
            "input dimension d",
            f"samples to relative test loss {THRESHOLD}",
            "teacher-student, k=4 (mean, 95% t interval)",
            log=True,
        )


if __name__ == "__main__":
    main()
