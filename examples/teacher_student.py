"""Low-rank teacher-student: how many online SGD steps does LoRA need vs d?

After Dayi & Chen ("Low-rank fine-tuning lies between lazy training and
feature learning", COLT 2025): a two-layer network with k hidden units on
Gaussian inputs in dimension d; the teacher is the base network with its
first-layer weights perturbed by a rank-1 matrix as large (in Frobenius norm)
as the base weights. Students, trained with online SGD on the squared loss (a
fresh Gaussian batch every step, drawn inside the `jit`-compiled train step):

- lora: the base network with `ka.LoRA(rank=1)` on its first layer (the
  paper's setting, in our proposed parameterization);
- full: the base network, whole first layer trained;
- scratch: the whole first layer trained from a random kernel.

For each d the run records the test loss (relative to the base network's)
and the overlap |<u, v>| between the planted direction u and the learned
direction v, and reports the steps needed to reach overlap 0.9 and relative
test loss 0.01. The paper proves about d k^O(1) steps for its low-rank
student; here we look at how our steps grow with d (steps / d flat means
linear). The parameterization is a proposed design, not the paper's: see
`docs/teacher_student.md` and `keras_adapters/workflows/teacher_student.py`.

Settings: k = 4 hidden units, ReLU, batch size 1 (pure online SGD), learning
rate 1 / d for every student (at d = 128, 2 / d made full and scratch
diverge; 0.5 / d was slower for all three), 100 d steps per run,
d in {64, 128, 256, 512}, 2 seeds (problem and student). `--quick`: d in
{32, 64}, 1 seed, 50 d steps.

Run from the repository root, with `KERAS_BACKEND=jax` (fastest here) or
`KERAS_BACKEND=tensorflow`:

```shell
python examples/teacher_student.py          # full run, several minutes
python examples/teacher_student.py --quick  # about a minute
```
"""

# First, before TensorFlow, Keras and JAX load: drop TensorFlow's start-up
# noise from stderr, and nothing else (see _quiet_start.py).
import _quiet_start

_quiet_start.hide_tensorflow_noise()

import argparse
import json
import os
import time

import keras
import numpy as np

from keras_adapters.workflows import teacher_student as ts

LEARNING_RATE = 1.0  # times batch / d, for every student
THRESHOLDS = {"overlap": 0.9, "relative_loss": 0.01}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--dims", type=int, nargs="+", default=None)
    parser.add_argument("--hidden", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps-per-dim", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--methods", nargs="+", default=list(ts.METHODS))
    parser.add_argument("--output-dir", default="outputs/teacher_student")
    return parser.parse_args()


def summarize(runs, dims, methods):
    """Markdown table: median steps to the thresholds, final values."""
    header = (
        "| d | student | steps to overlap 0.9 (/d) | steps to rel. loss 0.01 (/d) "
        "| final overlap | final rel. loss | seconds |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for dim in dims:
        for method in methods:
            mine = [r for r in runs if r.dim == dim and r.method == method]
            cells = [str(dim), method]
            for key in ("overlap", "relative_loss"):
                reached = [r.steps_to(**{key: THRESHOLDS[key]}) for r in mine]
                if all(s is not None for s in reached):
                    median = float(np.median(reached))
                    cells.append(f"{median:,.0f} ({median / dim:.1f})")
                else:
                    hits = sum(s is not None for s in reached)
                    budget = int(mine[0].steps[-1])
                    cells.append(f"> {budget:,} ({hits}/{len(mine)} reached)")
            cells.append(" / ".join(f"{r.overlap[-1]:.3f}" for r in mine))
            cells.append(" / ".join(f"{r.relative_loss[-1]:.1e}" for r in mine))
            cells.append(f"{sum(r.seconds for r in mine):.0f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs, dims, methods, path):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print('No plots: pip install "keras-adapters[plot]" (matplotlib)')
        return None
    figure = Figure(figsize=(4.2 * 3, 3.6 * len(methods)))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(methods), 3, squeeze=False)
    colors = {d: f"C{i}" for i, d in enumerate(dims)}
    for row, method in enumerate(methods):
        for run in (r for r in runs if r.method == method):
            style = {"color": colors[run.dim], "alpha": 0.8, "linewidth": 1}
            label = f"d={run.dim}"
            axes[row][0].plot(run.steps, run.overlap, label=label, **style)
            axes[row][1].plot(run.steps / run.dim, run.overlap, label=label, **style)
            axes[row][2].semilogy(
                run.steps / run.dim, np.maximum(run.relative_loss, 1e-8), **style
            )
        axes[row][0].set_title(f"{method}: overlap vs steps", fontsize=9)
        axes[row][1].set_title(f"{method}: overlap vs steps / d", fontsize=9)
        axes[row][2].set_title(f"{method}: test loss / base loss", fontsize=9)
        axes[row][0].set_xlabel("SGD steps")
        for ax in axes[row][1:]:
            ax.set_xlabel("SGD steps / d")
        for ax in axes[row][:2]:
            ax.set_ylim(0, 1.02)
            ax.axhline(THRESHOLDS["overlap"], color="gray", linewidth=0.5)
        axes[row][2].axhline(THRESHOLDS["relative_loss"], color="gray", linewidth=0.5)
        # One legend entry per d.
        handles, labels = axes[row][0].get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        axes[row][0].legend(unique.values(), unique.keys(), fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def plot_scaling(runs, dims, methods, path):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(9, 3.8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    reference = np.array(dims, dtype=float)
    for ax, (key, threshold) in zip(axes, THRESHOLDS.items(), strict=True):
        for i, method in enumerate(methods):
            xs, ys = [], []
            for dim in dims:
                reached = [
                    r.steps_to(**{key: threshold})
                    for r in runs
                    if r.dim == dim and r.method == method
                ]
                if reached and all(s is not None for s in reached):
                    xs.append(dim)
                    ys.append(float(np.median(reached)))
            if xs:
                ax.loglog(xs, ys, "o-", color=f"C{i}", label=method)
        factor = 10 if key == "overlap" else 20
        ax.loglog(reference, factor * reference, "k--", lw=0.8, label=f"{factor} d")
        name = "overlap" if key == "overlap" else "test loss / base loss"
        ax.set_title(
            f"steps to {name} {'>=' if key == 'overlap' else '<='} "
            f"{threshold} (median over seeds)",
            fontsize=9,
        )
        ax.set_xlabel("d")
        ax.set_ylabel("SGD steps")
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def main():
    args = parse_args()
    unknown = sorted(set(args.methods) - set(ts.METHODS))
    if unknown:
        raise SystemExit(f"Unknown methods {unknown}; choose from {ts.METHODS}.")
    dims = args.dims or ([32, 64] if args.quick else [64, 128, 256, 512])
    seeds = args.seeds or (1 if args.quick else 2)
    steps_per_dim = args.steps_per_dim or (50 if args.quick else 100)
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()
    print(
        f"k={args.hidden}, {args.activation}, batch {args.batch_size}, "
        f"{steps_per_dim} d steps, dims {dims}, {seeds} seed(s), backend "
        f"{keras.backend.backend()}",
        flush=True,
    )
    runs = []
    for dim in dims:
        for seed in range(seeds):
            problem = ts.make_problem(
                dim, args.hidden, activation=args.activation, seed=seed
            )
            for method in args.methods:
                run = ts.train_student(
                    problem,
                    method,
                    steps=steps_per_dim * dim,
                    log_every=max(dim // 4, 1),
                    batch_size=args.batch_size,
                    learning_rate=LEARNING_RATE * args.batch_size / dim,
                    seed=seed,
                )
                runs.append(run)
                print(
                    f"  d={dim:4d} seed {seed} {method:<8}: overlap 0.9 at "
                    f"{run.steps_to(overlap=0.9)}, rel. loss 0.01 at "
                    f"{run.steps_to(relative_loss=0.01)}, final overlap "
                    f"{run.overlap[-1]:.3f}, rel. loss {run.relative_loss[-1]:.1e} "
                    f"({run.seconds:.0f} s)",
                    flush=True,
                )
    text = summarize(runs, dims, args.methods)
    print("\n" + text)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(
            [
                {
                    "method": r.method,
                    "dim": r.dim,
                    "learning_rate": r.learning_rate,
                    "batch_size": r.batch_size,
                    "steps": r.steps.tolist(),
                    "overlap": r.overlap.tolist(),
                    "relative_loss": r.relative_loss.tolist(),
                    "seconds": r.seconds,
                }
                for r in runs
            ],
            f,
        )
    curves = plot(runs, dims, args.methods, os.path.join(args.output_dir, "curves.png"))
    scaling = plot_scaling(
        runs, dims, args.methods, os.path.join(args.output_dir, "scaling.png")
    )
    print(f"Plots: {curves}, {scaling}")
    print(f"Total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
