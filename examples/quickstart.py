"""Quickstart: LoRA fine-tuning of a pretrained MiniLM on BBC News topics.

This demo walks the whole path of a `keras_adapters` user, offline, on real
data and a real pretrained model:

1. load the BBC News corpus (2,127 deduplicated articles, 5 topics) and
   all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) as a KerasHub
   `BertTextClassifier`, and tokenize the articles once;
2. measure test accuracy with the fresh, random classification head;
3. attach LoRA (rank 8) to the query and value projections of every attention
   block with `classifier.enable_adapter(...)`: only the adapters and the
   head stay trainable;
4. fine-tune with `compile()` / `fit()`, as any Keras model;
5. measure test accuracy again and save the adapter weights alone (with the
   trained head: ~0.3 MB, where the whole model's weights take ~90 MB);
6. export a SavedModel with `ka.export_saved_model`: the adapters are merged
   into a copy of the weights (plain BERT weights, no adapter variables), and
   the export is reloaded in a fresh process and checked before it is kept;
   then serve a few test articles from it with `tf.saved_model.load`;
7. merge the adapters into the model's own kernels (`ka.merge_adapters`),
   checking that predictions do not change.

Choices, to finish in a few minutes on 2 CPU cores: articles are cut to
their first 128 tokens (the title and first paragraphs are plenty to tell a
topic); the split is fixed (80% train / 20% test per class, 1,701 / 426
articles); training makes one pass over 1,024 shuffled training articles
(64 steps of batch size 16) with AdamW at learning rate 2e-3. LoRA makes
0.3% of the parameters trainable, so this is enough to go from chance (~20%)
to over 95% test accuracy. `--quick` runs 4 steps on a tiny subset instead.

Run from the repository root, with `KERAS_BACKEND=jax` or
`KERAS_BACKEND=tensorflow`:

```shell
python examples/quickstart.py          # full run, a few minutes on CPU
python examples/quickstart.py --quick  # smoke run on a tiny subset
```
"""

# First, before TensorFlow, Keras and JAX load: drop TensorFlow's start-up
# noise from stderr, and nothing else (see _quiet_start.py).
import _quiet_start

_quiet_start.hide_tensorflow_noise()

import argparse
import math
import os
import time

import _bbc_minilm as bbc
import keras
import numpy as np
import tensorflow as tf

import keras_adapters as ka

INPUTS = ("token_ids", "segment_ids", "padding_mask")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run on a tiny subset"
    )
    parser.add_argument("--output-dir", default="outputs/quickstart")
    parser.add_argument(
        "--seed", type=int, default=0, help="head init, dropout, shuffling"
    )
    return parser.parse_args()


def predict_logits(model, data, batch_size=64):
    return model.predict({k: data[k] for k in INPUTS}, batch_size=batch_size, verbose=0)


def accuracy(logits, labels):
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def megabytes(num_bytes):
    return f"{num_bytes / 1e6:.1f} MB"


def main():
    args = parse_args()
    # JAX: a persistent compilation cache (a second run skips compiling) and
    # faster dropout masks on CPU; see docs/performance.md.
    bbc.apply_speed_recipes(os.path.join(os.path.dirname(args.output_dir), "jax_cache"))
    run_start = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.quick:  # A tiny subset and a few steps: checks that all runs.
        max_per_class, sequence_length, train_steps = 20, 64, 4
    else:
        max_per_class, sequence_length, train_steps = None, 128, 64
    batch_size = 16

    # 1. Data and model. The train/test split does not depend on `--seed`.
    train_texts, train_labels, test_texts, test_labels, class_names = bbc.load_bbc_news(
        max_per_class=max_per_class
    )
    print(f"BBC News: {len(train_texts)} train / {len(test_texts)} test articles")
    print(f"Classes: {', '.join(class_names)}")
    classifier, preprocessor = bbc.build_minilm_classifier(
        num_classes=len(class_names), sequence_length=sequence_length
    )
    train = bbc.tokenize(preprocessor, train_texts, train_labels)
    test = bbc.tokenize(preprocessor, test_texts, test_labels)

    model_bytes = sum(
        math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in classifier.weights
    )

    # 2. Accuracy before fine-tuning: the head is random.
    acc_before = accuracy(predict_logits(classifier, test), test["labels"])
    print(f"Test accuracy before fine-tuning: {acc_before:.2%}")

    # 3. LoRA on the query and value projections of every attention block.
    report = classifier.enable_adapter(
        ka.LoRA(rank=8, alpha=16, dropout=0.1),
        targets=ka.attention("query", "value"),
    )
    print(report)

    # 4. Fine-tune like any Keras model.
    classifier.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=True,
    )
    # KerasHub's `fit` does not shuffle NumPy inputs, so shuffle with tf.data.
    features = {k: train[k] for k in INPUTS}
    train_ds = (
        tf.data.Dataset.from_tensor_slices((features, train["labels"]))
        .shuffle(len(train_texts), seed=args.seed)
        .batch(batch_size)
        .take(train_steps)
    )
    # `shuffle=False`: `train_ds` shuffles itself (Keras warns otherwise).
    start = time.perf_counter()
    classifier.fit(train_ds, epochs=1, shuffle=False, verbose=1)
    fit_seconds = time.perf_counter() - start

    # 5. Accuracy after fine-tuning; save the adapters alone.
    logits = predict_logits(classifier, test)
    acc_after = accuracy(logits, test["labels"])
    print(f"Test accuracy after fine-tuning: {acc_after:.2%} ({fit_seconds:.0f} s)")
    adapter_path = os.path.join(args.output_dir, "bbc_news.lora.weights.h5")
    ka.save_adapter_weights(classifier, adapter_path)
    adapter_bytes = os.path.getsize(adapter_path)
    print(
        f"Adapter file {adapter_path}: {megabytes(adapter_bytes)} "
        f"(full model weights: {megabytes(model_bytes)})"
    )

    # 6. Export: merged copy, verified in a fresh process; then serve from it.
    n = min(8, len(test_texts))
    sample = {k: test[k][:n] for k in INPUTS}
    export_report = ka.export_saved_model(
        classifier,
        os.path.join(args.output_dir, "saved_model"),
        sample_inputs=sample,
        overwrite=True,
    )
    print(export_report)
    serve = tf.saved_model.load(export_report.path).signatures["serving_default"]
    dtypes = {k: dtype for k, (_, dtype) in export_report.inputs.items()}
    served = next(
        iter(
            serve(**{k: tf.constant(v, dtypes[k]) for k, v in sample.items()}).values()
        )
    ).numpy()
    serve_diff = float(np.max(np.abs(served - logits[:n])))
    print(f"serving_default on {n} test articles: max |logit diff| = {serve_diff:.2e}")
    for text, label in zip(test_texts[:3], served.argmax(-1), strict=False):
        print(f"  {class_names[label]:>13}: {text.splitlines()[0]}")
    # The SavedModel holds the base model's parameters, none of the adapters'.
    base_params = report.total_params - report.adapter_params
    export_ok = export_report.num_parameters == base_params
    if not export_ok:
        raise AssertionError(
            f"The SavedModel has {export_report.num_parameters:,} parameters, the "
            f"base model {base_params:,}."
        )

    # 7. Merge in place: the adapted kernels become plain kernels.
    merged_paths = ka.merge_adapters(classifier)
    merged_logits = predict_logits(classifier, test)
    max_diff = float(np.max(np.abs(merged_logits - logits)))
    rel_diff = max_diff / float(np.max(np.abs(logits)))
    print(
        f"Merged {len(merged_paths)} layers; max |logit diff| = {max_diff:.2e} "
        f"(relative {rel_diff:.2e})"
    )
    if not np.array_equal(merged_logits.argmax(-1), logits.argmax(-1)):
        raise AssertionError("Merged model predicts other labels than the adapted.")
    if rel_diff > 1e-5:
        raise AssertionError(f"Merged logits differ by {rel_diff:.2e} > 1e-5.")

    # 8. Summary.
    rows = [
        ("backend", keras.backend.backend()),
        ("test accuracy before", f"{acc_before:.2%}"),
        ("test accuracy after", f"{acc_after:.2%}"),
        (
            "trainable / total params",
            f"{report.trainable_params:,} / {report.total_params:,}",
        ),
        ("fit wall time", f"{fit_seconds:.0f} s"),
        ("adapter file", f"{megabytes(adapter_bytes)} vs {megabytes(model_bytes)}"),
        ("merge max |logit diff|", f"{max_diff:.2e} (relative {rel_diff:.1e})"),
        (
            "SavedModel (fresh process)",
            f"ok, relative diff {export_report.max_relative_difference:.1e}",
        ),
        ("total wall time", f"{time.perf_counter() - run_start:.0f} s"),
    ]
    print("\nSummary")
    for key, value in rows:
        print(f"  {key:<26} {value}")


if __name__ == "__main__":
    main()
