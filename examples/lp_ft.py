"""LP-FT on MiniLM + BBC News: accuracy, calibration, head norm, feature change.

Reproduces, at a small scale, the comparisons of Tomihari & Sato
("Understanding Linear Probing then Fine-tuning Language Models from NTK
Perspective", NeurIPS 2024) with `ka.workflows.lp_ft` and
`ka.calibration`, offline, on all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) and
the BBC News topics (5 classes):

- LP: the linear head alone, an L2-regularised logistic regression on frozen
  features (`finetune=None`), its L2 strength chosen among 1e-2, 1e-3, 1e-4
  and 1e-5 by validation cross-entropy (the paper cross-validates
  scikit-learn's `C`); LP-FT and LP-LoRA reuse that choice;
- FT: full fine-tuning from the random head (`probe_first=False`);
- LoRA: rank-8 LoRA (alpha 8) on query and value, plus the head, from the
  random head;
- LP-FT and LP-LoRA: the same two, starting from the LP head.

For each: test accuracy, ECE (15 bins) before and after temperature scaling
(T fitted on a validation split), the head norm after LP and at the end, and
the feature change (RMS distance of the pooled features from their initial
values on 32 training articles). Mean and standard deviation over seeds are
printed as a table, written to `results.json`, and reliability diagrams of the
first seed are saved to `reliability.png`.

Choices, to fit in about 20 minutes on 2 otherwise idle CPU cores:
articles are cut to their first 64 tokens (title and opening sentences);
per class 40 training, 20 validation and 40 test articles (200 / 100 / 200),
drawn with a fixed split; every fine-tuning run takes the same budget of 3
epochs at batch size 16 (39 steps) with Adam, learning rate 1e-4 for FT and
LP-FT and 1e-3 for LoRA and LP-LoRA (the paper tunes per task; these are
single untuned values); 3 seeds (weights of the new head, LoRA factors,
dropout and the order of batches). LP is deterministic (convex, started at
zero), so its seeds agree. `--quick` runs 1 seed, 8/4/4 articles per class,
32 tokens and 1 epoch, to check that everything runs (about 2 minutes).

Run from the repository root, with `KERAS_BACKEND=jax` or
`KERAS_BACKEND=tensorflow`:

```shell
python examples/lp_ft.py          # full run
python examples/lp_ft.py --quick  # smoke run
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

import _bbc_minilm as bbc
import keras
import numpy as np

import keras_adapters as ka
from keras_adapters import calibration

INPUTS = ("token_ids", "segment_ids", "padding_mask")
METHODS = ("LP", "FT", "LoRA", "LP-FT", "LP-LoRA")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--output-dir", default="outputs/lp_ft")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    return parser.parse_args()


def split_per_class(labels, counts, seed):
    """Index arrays with `counts[i]` examples of each class, disjoint."""
    rng = np.random.default_rng(seed)
    parts = [[] for _ in counts]
    for label in np.unique(labels):
        order = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for part, count in zip(parts, counts, strict=True):
            part.extend(order[start : start + count])
            start += count
    return [rng.permutation(np.array(p)) for p in parts]


def subset(data, index):
    return {k: v[index] for k, v in data.items()}


def method_config(method, lora_rank):
    """`(finetune, probe_first, learning_rate)` of a method."""
    lora = ka.LoRA(rank=lora_rank, alpha=lora_rank)
    return {
        "LP": (None, True, None),
        "FT": ("full", False, 1e-4),
        "LoRA": (lora, False, 1e-3),
        "LP-FT": ("full", True, 1e-4),
        "LP-LoRA": (lora, True, 1e-3),
    }[method]


def run_one(method, seed, data, settings):
    keras.utils.set_random_seed(seed)
    classifier, _ = bbc.build_minilm_classifier(
        num_classes=5, sequence_length=settings["sequence_length"]
    )
    train, val, test = data["train"], data["val"], data["test"]
    x = {k: train[k] for k in INPUTS}
    finetune, probe_first, rate = method_config(method, settings["lora_rank"])
    # The LP run chooses the L2 strength on the validation split; LP-FT and
    # LP-LoRA reuse its choice.
    choose = method == "LP"
    start = time.perf_counter()
    result = ka.workflows.lp_ft(
        classifier,
        (x, train["labels"]),
        finetune=finetune,
        probe_first=probe_first,
        lp_l2=settings["lp_l2_grid"] if choose else settings.get("lp_l2"),
        validation_data=(
            ({k: val[k] for k in INPUTS}, val["labels"]) if choose else None
        ),
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        optimizer=None if rate is None else keras.optimizers.Adam(rate),
        probe_size=settings["probe_size"],
        seed=seed,
    )
    seconds = time.perf_counter() - start

    def logits(split):
        inputs = {k: split[k] for k in INPUTS}
        return classifier.predict(inputs, batch_size=64, verbose=0)

    val_logits, test_logits = logits(val), logits(test)
    temperature = calibration.fit_temperature(val_logits, val["labels"])
    before = calibration.calibration_errors(test_logits, test["labels"])
    after = calibration.calibration_errors(
        test_logits, test["labels"], temperature=temperature
    )
    ft_logs = result.ft_history.history if result.ft_history else {}
    row = {
        "method": method,
        "seed": seed,
        "accuracy": before["accuracy"],
        "ece": before["ece"],
        "ece_ts": after["ece"],
        "mce": before["mce"],
        "mce_ts": after["mce"],
        "temperature": temperature,
        "head_norm_initial": result.head_norm_initial,
        "head_norm_after_lp": result.head_norm_after_lp,
        "head_norm_final": result.head_norm_final,
        "feature_change": ft_logs.get("feature_change", [0.0])[-1],
        "lp_epochs": len(result.lp_history.epoch) if result.lp_history else 0,
        "lp_l2": result.lp_l2,
        "seconds": seconds,
    }
    print(
        f"  {method:<8} seed {seed}: acc {row['accuracy']:.3f}, ECE "
        f"{100 * row['ece']:.2f} -> {100 * row['ece_ts']:.2f} (T={temperature:.2f}), "
        f"head norm {row['head_norm_final']:.2f}, feature change "
        f"{row['feature_change']:.3f} ({seconds:.0f} s)",
        flush=True,
    )
    return row, test_logits, temperature


def mean_std(rows, key, scale=1.0, digits=2):
    values = [r[key] for r in rows if r[key] is not None]
    if not values:
        return "-"
    values = scale * np.asarray(values, dtype="float64")
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def table(rows, methods):
    columns = [
        ("method", None),
        ("accuracy %", ("accuracy", 100, 1)),
        ("ECE %", ("ece", 100, 2)),
        ("ECE % (TS)", ("ece_ts", 100, 2)),
        ("MCE %", ("mce", 100, 1)),
        ("MCE % (TS)", ("mce_ts", 100, 1)),
        ("T", ("temperature", 1, 2)),
        ("head norm after LP", ("head_norm_after_lp", 1, 2)),
        ("head norm final", ("head_norm_final", 1, 2)),
        ("feature change", ("feature_change", 1, 3)),
    ]
    lines = ["| " + " | ".join(name for name, _ in columns) + " |"]
    lines.append("|" + "---|" * len(columns))
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        cells = [method] + [mean_std(mine, *spec) for _, spec in columns[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    args = parse_args()
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"Unknown methods {unknown}; choose from {METHODS}.")
    run_start = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    if args.quick:
        counts, seeds = (8, 4, 4), [0]
        settings = {"sequence_length": 32, "epochs": 1, "batch_size": 8}
    else:
        counts, seeds = (40, 20, 40), list(range(args.seeds))
        settings = {"sequence_length": 64, "epochs": 3, "batch_size": 16}
    settings.update(lora_rank=8, probe_size=32, lp_l2_grid=[1e-2, 1e-3, 1e-4, 1e-5])

    texts, labels, test_texts, test_labels, names = bbc.load_bbc_news()
    train_index, val_index = split_per_class(labels, counts[:2], seed=0)
    (test_index,) = split_per_class(test_labels, counts[2:], seed=0)
    _, preprocessor = bbc.build_minilm_classifier(
        num_classes=len(names), sequence_length=settings["sequence_length"]
    )
    pool = bbc.tokenize(preprocessor, texts, labels)
    test_pool = bbc.tokenize(preprocessor, test_texts, test_labels)
    data = {
        "train": subset(pool, train_index),
        "val": subset(pool, val_index),
        "test": subset(test_pool, test_index),
    }
    sizes = {k: len(v["labels"]) for k, v in data.items()}
    steps = settings["epochs"] * -(-sizes["train"] // settings["batch_size"])
    print(
        f"BBC News ({', '.join(names)}): {sizes['train']} train / {sizes['val']} "
        f"validation / {sizes['test']} test articles, {settings['sequence_length']} "
        f"tokens; {steps} fine-tuning steps per run; backend "
        f"{keras.backend.backend()}",
        flush=True,
    )

    rows, diagram_logits, diagram_temperatures = [], {}, {}
    lp_row = None
    for seed in seeds:
        for method in args.methods:
            if method == "LP" and lp_row is not None:
                # LP is deterministic: every seed gives the same head.
                rows.append({**lp_row, "seed": seed})
                continue
            row, test_logits, temperature = run_one(method, seed, data, settings)
            rows.append(row)
            if method == "LP":
                lp_row = row
                settings["lp_l2"] = row["lp_l2"]
                print(f"  LP chose l2 = {row['lp_l2']:g} on the validation split")
            if seed == seeds[0]:
                diagram_logits[method] = test_logits
                diagram_temperatures[method] = temperature

    print(f"\nResults ({len(seeds)} seed(s), mean ± std), test set of {sizes['test']}")
    text = table(rows, args.methods)
    print(text)
    path = os.path.join(args.output_dir, "results.json")
    with open(path, "w") as f:
        json.dump({"settings": settings, "sizes": sizes, "rows": rows}, f, indent=1)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    try:
        png = calibration.reliability_diagram(
            diagram_logits,
            data["test"]["labels"],
            os.path.join(args.output_dir, "reliability.png"),
            temperature=diagram_temperatures,
            title=f"BBC News test set, seed {seeds[0]}: before / after "
            "temperature scaling",
        )
        print(f"Reliability diagrams: {png}")
    except ImportError as error:
        print(f"No reliability diagram: {error}")
    print(f"Results: {path}; total wall time {time.perf_counter() - run_start:.0f} s")


if __name__ == "__main__":
    main()
