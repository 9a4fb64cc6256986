"""Study: LoRA on QKV vs QV, with eta_V = lambda * eta_Q, on MiniLM + BBC News.

Reproduces, at small scale, the setting of Table 2 of Yao et al.,
"Theoretical Insights into Fine-Tuning Attention Mechanism" (IJCAI 2025):

- LoRA (rank 8, alpha 8) on query, key and value ("QKV") and on query and
  value only ("QV"), each with lambda in {1, 2, 4, 8}, where every trainable
  variable of the value projections (both LoRA factors) learns lambda times
  faster than the rest (`ka.optimizers.attention_lr`);
- full fine-tuning of W_q and W_v with their biases ("Full FT (QV)",
  `ka.attention_full`) at lambda 1 and 4.

Every run trains the pretrained all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT)
with a fresh 5-way head on the BBC News topics, for the same number of steps
(`--steps`, batch 16, articles cut to their first `--sequence-length` = 64
tokens) with AdamW (beta_2 0.99 and epsilon 1e-8 as the paper, weight decay
0.01) and a linear decay to 0, from eta_Q = `--lr` (1e-3) for LoRA and
`--full-lr` (1e-4) for full fine-tuning, under `--seeds` seeds (the seed sets
the head, the adapters, dropout and the order of the training articles). It
prints a table (test accuracy and loss, training loss at fixed steps,
trainable parameters), and writes it as JSON with a PNG of the training loss
curves (needs matplotlib: `pip install "keras-adapters[plot]"`).

Cost: measured only on a loaded machine (2 CPU cores shared with other
jobs), where one run (load, compile, 40 steps, evaluate) took 4 to 8 minutes
and `--quick` (6 settings, 4 steps, 100 articles, 32 tokens) 5 to 30
minutes; on idle cores expect a fraction of that. Use `--lambdas 1,4
--seeds 1 --steps 40` for a shorter grid.

Run from the repository root:

```shell
KERAS_BACKEND=jax python examples/attention_lr_study.py
KERAS_BACKEND=tensorflow python examples/attention_lr_study.py --quick
```
"""

# First, before TensorFlow, Keras and JAX load: drop TensorFlow's start-up
# noise from stderr, and nothing else (see _quiet_start.py).
import _quiet_start

_quiet_start.hide_tensorflow_noise()

import argparse
import json
import math
import os
import statistics
import time

import _bbc_minilm as bbc
import keras
import numpy as np

import keras_adapters as ka

INPUTS = ("token_ids", "segment_ids", "padding_mask")
BATCH = 16


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, tiny data")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per setting")
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="eta_Q for LoRA")
    parser.add_argument(
        "--full-lr", type=float, default=1e-4, help="eta_Q for full fine-tuning"
    )
    parser.add_argument("--max-test", type=int, default=400, help="test articles")
    parser.add_argument(
        "--lambdas", default="1,2,4,8", help="comma-separated lambdas for LoRA"
    )
    parser.add_argument("--output-dir", default="outputs/attention_lr_study")
    args = parser.parse_args()
    try:
        args.lambdas = tuple(float(v) for v in args.lambdas.split(","))
    except ValueError:
        parser.error(f"--lambdas must be comma-separated numbers; got {args.lambdas}")
    if not args.lambdas or min(args.lambdas) <= 0:
        parser.error("--lambdas must be numbers > 0")
    args.lambdas = tuple(int(v) if v.is_integer() else v for v in args.lambdas)
    if args.quick:
        args.steps, args.seeds, args.sequence_length, args.max_test = 4, 1, 32, 20
        args.lambdas = (1, 4)
    for name in ("steps", "seeds", "rank", "max_test"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def settings(lambdas):
    out = [("LoRA (QKV)", ("query", "key", "value"), lam) for lam in lambdas]
    out += [("LoRA (QV)", ("query", "value"), lam) for lam in lambdas]
    out += [("Full FT (QV)", ("query", "value"), lam) for lam in (1, 4)]
    return out


def load_data(args):
    train_x, train_y, test_x, test_y, names = bbc.load_bbc_news(
        seed=0, max_per_class=20 if args.quick else None
    )
    _, preprocessor = bbc.build_minilm_classifier(
        len(names), sequence_length=args.sequence_length
    )
    test_x, test_y = test_x[: args.max_test], test_y[: args.max_test]
    return (
        bbc.tokenize(preprocessor, train_x, train_y),
        bbc.tokenize(preprocessor, test_x, test_y),
        len(names),
    )


def train_batches(train, steps, seed):
    """`steps * BATCH` training rows, reshuffled per pass, for one seed."""
    rng = np.random.default_rng(seed)
    n = len(train["labels"])
    order = np.concatenate(
        [rng.permutation(n) for _ in range(math.ceil(steps * BATCH / n))]
    )[: steps * BATCH]
    return {k: train[k][order] for k in INPUTS}, train["labels"][order]


class BatchLosses(keras.callbacks.Callback):
    """Per-step training loss, recovered from Keras' running epoch mean."""

    def on_epoch_begin(self, epoch, logs=None):
        self.means = []

    def on_train_batch_end(self, batch, logs=None):
        self.means.append(float(logs["loss"]))

    @property
    def losses(self):
        means = self.means
        return [means[0]] + [
            (k + 1) * means[k] - k * means[k - 1] for k in range(1, len(means))
        ]


def run(setting, seed, data, args):
    name, roles, lam = setting
    train, test, num_classes = data
    keras.utils.set_random_seed(seed)
    classifier, _ = bbc.build_minilm_classifier(
        num_classes, sequence_length=args.sequence_length
    )
    full = name.startswith("Full")
    if full:
        report = ka.attention_full(classifier, roles=roles)
        trainable = report.trainable_params
        lr = args.full_lr
    else:
        ka.enable_adapter(
            classifier,
            ka.LoRA(rank=args.rank, alpha=8),
            targets=ka.attention(*roles),
        )
        trainable = sum(math.prod(v.shape) for v in classifier.trainable_weights)
        lr = args.lr
    schedule = keras.optimizers.schedules.PolynomialDecay(lr, args.steps, 0.0)
    optimizer = ka.optimizers.attention_lr(
        keras.optimizers.AdamW(schedule, beta_2=0.99, epsilon=1e-8, weight_decay=0.01),
        value_ratio=lam,
    )
    classifier.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["sparse_categorical_accuracy"],
        jit_compile=True,
    )
    x, y = train_batches(train, args.steps, seed)
    losses = BatchLosses()
    start = time.perf_counter()
    classifier.fit(
        x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[losses]
    )
    seconds = time.perf_counter() - start
    test_loss, accuracy = classifier.evaluate(
        {k: test[k] for k in INPUTS}, test["labels"], batch_size=64, verbose=0
    )
    return {
        "setting": name,
        "lambda": lam,
        "seed": seed,
        "trainable_params": int(trainable),
        "accuracy": float(accuracy),
        "test_loss": float(test_loss),
        "losses": losses.losses,
        "train_seconds": seconds,
    }


def window_mean(losses, step, width):
    """Mean training loss over the `width` steps ending at `step` (1-based)."""
    chunk = losses[max(0, step - width) : step]
    return sum(chunk) / len(chunk)


def summarize(results, steps):
    marks = sorted({max(1, steps // 4), max(1, steps // 2), steps})
    width = max(1, steps // 10)
    rows = []
    keys = list(dict.fromkeys((r["setting"], r["lambda"]) for r in results))
    for key in keys:
        runs = [r for r in results if (r["setting"], r["lambda"]) == key]
        acc = [100 * r["accuracy"] for r in runs]
        row = {
            "setting": key[0],
            "lambda": key[1],
            "seeds": len(runs),
            "trainable_params": runs[0]["trainable_params"],
            "accuracy_mean": statistics.mean(acc),
            "accuracy_std": statistics.pstdev(acc),
            "test_loss_mean": statistics.mean(r["test_loss"] for r in runs),
        }
        for m in marks:
            row[f"train_loss@{m}"] = statistics.mean(
                window_mean(r["losses"], m, width) for r in runs
            )
        rows.append(row)
    return rows, marks, width


def print_table(rows, marks, width):
    header = ["setting", "lambda", "trainable", "test acc %", "test loss"]
    header += [f"loss@{m}" for m in marks]
    lines = []
    for r in rows:
        lines.append(
            [
                r["setting"],
                str(r["lambda"]),
                f"{r['trainable_params']:,}",
                f"{r['accuracy_mean']:.1f} ± {r['accuracy_std']:.1f}",
                f"{r['test_loss_mean']:.3f}",
            ]
            + [f"{r[f'train_loss@{m}']:.3f}" for m in marks]
        )
    print(f"| {' | '.join(header)} |")
    print(f"|{'|'.join('---' for _ in header)}|")
    for line in lines:
        print(f"| {' | '.join(line)} |")
    print(
        f"(loss@k: mean training loss over the {width} steps ending at step k, "
        "averaged over seeds; ± is the standard deviation over seeds)"
    )


def plot(results, path, width):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            'matplotlib is not installed (pip install "keras-adapters[plot]"); no plot.'
        )
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    groups = ["LoRA (QKV)", "LoRA (QV)", "Full FT (QV)"]
    for ax, group in zip(axes, groups, strict=True):
        lambdas = sorted({r["lambda"] for r in results if r["setting"] == group})
        for lam in lambdas:
            runs = [r for r in results if r["setting"] == group and r["lambda"] == lam]
            curve = np.mean([r["losses"] for r in runs], axis=0)
            kernel = np.ones(width) / width
            smooth = np.convolve(curve, kernel, mode="valid")
            steps = np.arange(width, len(curve) + 1)
            ax.plot(steps, smooth, label=f"λ = {lam}")
        ax.set_title(group)
        ax.set_xlabel("step")
        ax.legend()
    axes[0].set_ylabel(f"training loss (mean of seeds, {width}-step moving mean)")
    fig.suptitle(f"MiniLM on BBC News, eta_V = λ eta_Q ({keras.backend.backend()})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main():
    args = parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}")
    data = load_data(args)
    print(
        f"BBC News: {len(data[0]['labels'])} training / {len(data[1]['labels'])} "
        f"test articles, {args.sequence_length} tokens; {args.steps} steps of "
        f"batch {BATCH}, {args.seeds} seed(s)"
    )
    results = []
    start = time.perf_counter()
    for setting in settings(args.lambdas):
        for seed in range(args.seeds):
            result = run(setting, seed, data, args)
            results.append(result)
            print(
                f"  {setting[0]:13s} λ={setting[2]} seed {seed}: accuracy "
                f"{100 * result['accuracy']:.1f}%, final loss "
                f"{result['losses'][-1]:.3f} ({result['train_seconds']:.0f} s)",
                flush=True,
            )
    rows, marks, width = summarize(results, args.steps)
    print_table(rows, marks, width)
    backend = keras.backend.backend()
    tag = f"{backend}{'-quick' if args.quick else ''}"
    with open(os.path.join(args.output_dir, f"results-{tag}.json"), "w") as f:
        json.dump({"args": vars(args), "summary": rows, "runs": results}, f, indent=1)
    png = plot(results, os.path.join(args.output_dir, f"loss-{tag}.png"), width)
    print(f"Total {time.perf_counter() - start:.0f} s; wrote {args.output_dir}")
    if png:
        print(f"Plot: {png}")


if __name__ == "__main__":
    main()
