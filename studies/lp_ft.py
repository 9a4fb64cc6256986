"""LP-FT study (Tomihari & Sato, NeurIPS 2024) on few-shot BBC News (MiniLM).

Claims tested: linear probing first (LP-FT, LP-LoRA) changes the features
less and keeps accuracy (Table 8: e.g. RTE FT 74.73 +- 3.04, LP-FT
76.75 +- 0.87, LoRA 72.85 +- 1.41, LP-LoRA 74.08 +- 2.57); LP leaves a large
head norm, which makes LP-FT / LP-LoRA over-confident, and temperature
scaling fixes it (Table 3, RTE ECE %: FT 21.16 -> 5.13, LP-FT 21.72 -> 5.48,
LoRA 11.92 -> 6.17, LP-LoRA 18.14 -> 5.72).

Cells: `lp` (the probe alone), `ft` (full fine-tuning), `lora` (LoRA r=8,
alpha 8 on query and value), `lp_ft` and `lp_lora` (the same, the head
started at the probe). Optimizer: Adam (as the paper's code), constant rate:
3e-4 for FT and LP-FT, 3e-3 for LoRA and LP-LoRA (the rates the methods
study picked on validation for full fine-tuning and LoRA on the same data;
an earlier run at 5e-5 and 1e-3 stopped far from convergence);
`--epochs` (20) epochs, batch 8, the best validation epoch kept (the
paper: 10 epochs, best validation epoch). Data as `studies/methods.py`
(8 + 8 articles per class, 300-article test set, 64 tokens).

Probe: multinomial logistic regression on the frozen `[CLS]`-pooled features
with an L2 penalty `l2 ||V||^2` (bias free), solved to convergence by
L-BFGS in NumPy/SciPy; `l2` chosen by 4-fold cross-validation on the
training articles (mean held-out cross-entropy) over the grid
`10^-6, 10^-5, ..., 10^1` (8 values), then refitted on all of them.

Calibration: ECE and MCE (15 equal-width confidence bins) on the test set
before and after temperature scaling (one `T`, fitted on the validation
split with `ka.calibration.fit_temperature`), with 95% bootstrap intervals
over test articles (1,000 resamples).

Run: `python studies/lp_ft.py [--quick] [--seeds N] [--cells a,b]`.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from scipy import optimize

sys.path.insert(0, os.path.dirname(__file__))
import _harness as harness  # noqa: E402
import _minilm as minilm  # noqa: E402

CELLS = {
    # name: (probe first, adapter ("lora") or full fine-tuning ("ft"), rate)
    "lp": (True, None, 0.0),
    "ft": (False, "ft", 3e-4),
    "lora": (False, "lora", 3e-3),
    "lp_ft": (True, "ft", 3e-4),
    "lp_lora": (True, "lora", 3e-3),
}
L2_GRID = tuple(10.0**k for k in range(-6, 2))
PAPER_ECE = {
    "ft": (21.16, 5.13),
    "lp_ft": (21.72, 5.48),
    "lora": (11.92, 6.17),
    "lp_lora": (18.14, 5.72),
}


# ------------------------------------------------------------------ probe


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_probe(features, labels, l2, classes=5):
    """Minimizes mean CE + `l2 ||V||^2` (bias free) by L-BFGS; `(V, b)`."""
    n, f = features.shape
    onehot = np.eye(classes)[labels]

    def loss(theta):
        v, b = theta[: f * classes].reshape(f, classes), theta[f * classes :]
        p = _softmax(features @ v + b)
        value = -np.mean(np.sum(onehot * np.log(p + 1e-300), axis=1)) + l2 * np.sum(
            v * v
        )
        g = (p - onehot) / n
        grad = np.concatenate([(features.T @ g + 2 * l2 * v).ravel(), g.sum(axis=0)])
        return value, grad

    theta = np.zeros(f * classes + classes)
    result = optimize.minimize(
        loss,
        theta,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 5000, "gtol": 1e-8},
    )
    return result.x[: f * classes].reshape(f, classes), result.x[f * classes :]


def cross_entropy(features, labels, v, b):
    p = _softmax(features @ v + b)
    return float(-np.mean(np.log(p[np.arange(labels.size), labels] + 1e-300)))


def choose_l2(features, labels, seed, folds=4):
    """`l2` with the lowest mean held-out cross-entropy over `folds` folds."""
    order = np.random.default_rng([seed, 5]).permutation(labels.size)
    parts = np.array_split(order, folds)
    scores = {}
    for l2 in L2_GRID:
        losses = []
        for k in range(folds):
            held = parts[k]
            fit = np.concatenate([parts[j] for j in range(folds) if j != k])
            v, b = fit_probe(features[fit], labels[fit], l2)
            losses.append(cross_entropy(features[held], labels[held], v, b))
        scores[l2] = float(np.mean(losses))
    return min(scores, key=scores.get), scores


# ------------------------------------------------------------- calibration


def ece_mce(logits, labels, bins=15):
    """Expected and maximum calibration error (NumPy, equal-width bins)."""
    p = _softmax(np.asarray(logits, "float64"))
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == labels).astype("float64")
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    ece, mce = 0.0, 0.0
    for k in range(bins):
        mask = index == k
        if mask.any():
            gap = abs(correct[mask].mean() - confidence[mask].mean())
            ece += mask.mean() * gap
            mce = max(mce, gap)
    return ece, mce


def calibration(test_logits, test_labels, val_logits, val_labels, seed):
    import keras_adapters as ka

    temperature = ka.calibration.fit_temperature(val_logits, val_labels)
    out = {"temperature": float(temperature)}
    rng = np.random.default_rng([seed, 11])
    for key, t in (("before", 1.0), ("after", temperature)):
        scaled = test_logits / t
        ece, mce = ece_mce(scaled, test_labels)
        library = ka.calibration.calibration_errors(
            test_logits, test_labels, temperature=t
        )
        samples = []
        for _ in range(1000):
            pick = rng.integers(0, test_labels.size, test_labels.size)
            samples.append(ece_mce(scaled[pick], test_labels[pick])[0])
        out[key] = {
            "ece": ece,
            "mce": mce,
            "ece_library": library["ece"],
            "ece_low": float(np.quantile(samples, 0.025)),
            "ece_high": float(np.quantile(samples, 0.975)),
            "nll": library["nll"],
        }
    return out


# --------------------------------------------------------------- training


def configure(kind):
    def apply(classifier):
        import keras_adapters as ka

        if kind == "lora":
            ka.enable_adapter(
                classifier,
                ka.LoRA(rank=8, alpha=8),
                targets=ka.attention("query", "value"),
            )
        # "ft" and the probe alone: every weight stays trainable (a probe-only
        # cell never trains).

    return apply


def head_norm(classifier):
    import keras

    head = classifier.get_layer("logits")
    return float(np.linalg.norm(keras.ops.convert_to_numpy(head.kernel)))


def main(argv=None):
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--cells", default=",".join(CELLS))
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args(argv)
    study = harness.open_study("lp_ft", args)
    seeds = list(range(args.seeds or (1 if args.quick else 5)))
    shots, epochs, length = (4, 2, 32) if args.quick else (8, args.epochs, 64)
    names = ["lp_lora"] if args.quick else [c.strip() for c in args.cells.split(",")]
    harness.check_names(names, CELLS)
    if not args.report:
        import keras

        import keras_adapters as ka

        tokens = minilm.corpus(length)
        for name in names:
            probe_first, kind, rate = CELLS[name]
            todo = [s for s in seeds if not study.has(name, s)]
            if not todo:
                continue
            harness.log(f"{name}: building and compiling")
            runner = minilm.Runner(
                configure(kind or "ft"),
                lambda rate=rate: keras.optimizers.Adam(rate or 1e-3),
                sequence_length=length,
            )
            extractor = ka.workflows.heads.feature_extractor(runner.model)
            head = runner.model.get_layer("logits")
            for seed in todo:
                train, val, test = minilm.split(tokens, shots, seed)
                if args.quick:
                    test = {k: v[::6] for k, v in test.items()}
                record = {
                    "cell": name,
                    "shots": shots,
                    "epochs": epochs,
                    "sequence_length": length,
                    "optimizer": "Adam",
                    "rate": rate,
                    "backend": keras.backend.backend(),
                }

                def probe(
                    seed=seed,
                    train=train,
                    record=record,
                    extractor=extractor,
                    head=head,
                ):
                    feats = extractor.predict(
                        minilm.features(train), batch_size=64, verbose=0
                    )
                    l2, scores = choose_l2(feats, train["labels"], seed)
                    v, b = fit_probe(feats, train["labels"], l2)
                    head.kernel.assign(v.astype("float32"))
                    head.bias.assign(b.astype("float32"))
                    record.update(
                        probe_l2=l2,
                        probe_cv=scores,
                        probe_head_norm=float(np.linalg.norm(v)),
                    )

                if kind is None:
                    runner.reset(seed)
                    probe()
                    logits = runner.model.predict(
                        minilm.features(test), batch_size=64, verbose=0
                    )
                    correct = int(np.sum(logits.argmax(1) == test["labels"]))
                    result = {
                        "test_correct": correct,
                        "test_n": int(test["labels"].size),
                        "test_accuracy": correct / test["labels"].size,
                        "best_epoch": 0,
                    }
                else:
                    result = runner.train(
                        train,
                        val,
                        test,
                        seed,
                        epochs,
                        before=probe if probe_first else None,
                    )
                    logits = result.pop("logits")
                val_logits = runner.model.predict(
                    minilm.features(val), batch_size=64, verbose=0
                )
                record.update(result)
                record["head_norm"] = head_norm(runner.model)
                record["calibration"] = calibration(
                    logits, test["labels"], val_logits, val["labels"], seed
                )
                study.record(name, seed, record)
                c = record["calibration"]
                harness.log(
                    f"{name} seed {seed}: test {record['test_accuracy']:.3f}, ECE "
                    f"{c['before']['ece']:.3f} -> {c['after']['ece']:.3f} "
                    f"(T={c['temperature']:.2f})"
                )
    report(study)


def report(study):
    runs = study.runs()
    if not runs:
        print("no runs recorded yet")
        return
    summary, lines = (
        {},
        [
            "| cell | seeds | test acc % | ECE % before TS | ECE % after TS | T "
            "| head norm | probe l2 |",
            "|---|---:|---|---|---|---:|---:|---:|",
        ],
    )
    for name in CELLS:
        mine = [r for r in runs if r["cell"] == name]
        if not mine:
            continue
        acc = harness.t_interval([100 * r["test_accuracy"] for r in mine])
        before = harness.t_interval(
            [100 * r["calibration"]["before"]["ece"] for r in mine]
        )
        after = harness.t_interval(
            [100 * r["calibration"]["after"]["ece"] for r in mine]
        )
        temps = [r["calibration"]["temperature"] for r in mine]
        l2s = sorted({r.get("probe_l2") for r in mine if r.get("probe_l2") is not None})
        summary[name] = {
            "test_accuracy_pct": acc,
            "ece_before_pct": before,
            "ece_after_pct": after,
            "temperature_mean": float(np.mean(temps)),
            "head_norm_mean": float(np.mean([r["head_norm"] for r in mine])),
        }
        lines.append(
            f"| {name} | {len(mine)} | {harness.format_interval(acc)} | "
            f"{harness.format_interval(before)} | {harness.format_interval(after)} | "
            f"{np.mean(temps):.2f} | {np.mean([r['head_norm'] for r in mine]):.1f} | "
            f"{', '.join(f'{v:g}' for v in l2s) or '-'} |"
        )
    lines.append("")
    lines.append(
        "Per-seed ECE bootstrap intervals (95%, over test articles) are in the JSON."
    )
    table = study.by_cell("test_accuracy")
    for a, b in (("lp_ft", "ft"), ("lp_lora", "lora")):
        if a in table and b in table and set(table[a]) & set(table[b]):
            diff = harness.paired_difference(
                {s: 100 * v for s, v in table[a].items()},
                {s: 100 * v for s, v in table[b].items()},
            )
            summary[f"{a}-{b}"] = diff
            lines.append(
                f"- {a} - {b} (test accuracy points): "
                f"{harness.format_interval(diff)} (n={diff['n']})"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    study.write_summary(summary, text)
    groups = {}
    for key, label in (
        ("ece_before_pct", "before temperature scaling"),
        ("ece_after_pct", "after"),
    ):
        groups[label] = [(n, summary[n][key]) for n in CELLS if n in summary]
    harness.errorbar_figure(
        study.figure_path("ece"),
        groups,
        "cell",
        "test ECE % (mean, 95% t)",
        "few-shot BBC News, MiniLM",
    )


if __name__ == "__main__":
    main()
