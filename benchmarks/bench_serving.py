"""Inference latency: merged SavedModel vs base SavedModel vs unmerged model.

Builds a MiniLM-sized BERT classifier from config (random weights), adds LoRA
(r=8) on query and value with non-zero adapter weights, and measures in one
process, on the same inputs:

- `merged`: `ka.export_saved_model` (adapters merged), served through
  `tf.saved_model.load(...).signatures["serving_default"]`;
- `base`: the same classifier without adapters, exported the same way;
- `unmerged`: the adapted Keras model itself (`predict_on_batch`, compiled).

The claim to check: merged / base is 1.00 within noise (no adapter cost at
inference). Usage:

    KERAS_BACKEND=jax python benchmarks/bench_serving.py [--quick]
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import keras
import keras_hub
import numpy as np
import tensorflow as tf

import keras_adapters as ka


def build(seed, args):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30522,
        num_layers=args.layers,
        num_heads=12,
        hidden_dim=384,
        intermediate_dim=1536,
        max_sequence_length=512,
    )
    return keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=5, preprocessor=None
    )


def median_seconds(fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    args.layers = 2 if args.quick else 6
    repeats = 5 if args.quick else 30
    backend = keras.backend.backend()

    rng = np.random.default_rng(0)
    shape = (args.batch, args.sequence_length)
    inputs = {
        "token_ids": rng.integers(0, 30522, shape).astype("int32"),
        "segment_ids": np.zeros(shape, "int32"),
        "padding_mask": np.ones(shape, "int32"),
    }
    adapted = build(0, args)
    base = build(0, args)
    ka.enable_adapter(adapted, ka.LoRA(rank=8), targets=ka.attention("query", "value"))
    for variable in ka.adapter_variables(adapted):
        variable.assign(rng.normal(scale=0.02, size=variable.shape))

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        served = {}
        for name, model in [("merged", adapted), ("base", base)]:
            report = ka.export_saved_model(
                model, os.path.join(scratch, name), sample_inputs=inputs
            )
            serve = tf.saved_model.load(report.path).signatures["serving_default"]
            tensors = {k: tf.constant(v) for k, v in inputs.items()}
            served[name] = (serve, tensors, report)
        for name, (serve, tensors, report) in served.items():
            results[name] = {
                "seconds": median_seconds(lambda s=serve, t=tensors: s(**t), repeats),
                "parameters": report.num_parameters,
            }
    adapted.make_predict_function()
    results["unmerged"] = {
        "seconds": median_seconds(lambda: adapted.predict_on_batch(inputs), repeats),
        "parameters": int(sum(np.prod(v.shape) for v in adapted.weights)),
    }
    base_seconds = results["base"]["seconds"]
    print(f"\nInference, batch {args.batch}, seq {args.sequence_length}, {backend}")
    print(f"{'model':<10} {'params':>12} {'median s':>10} {'vs base':>8}")
    for name, row in results.items():
        row["ratio_to_base"] = row["seconds"] / base_seconds
        print(
            f"{name:<10} {row['parameters']:>12,} {row['seconds']:>10.4f} "
            f"{row['ratio_to_base']:>8.2f}"
        )
    output = args.output or os.path.join(
        os.path.dirname(__file__), "results", f"serving-{backend}.json"
    )
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(
            {
                "backend": backend,
                "batch": args.batch,
                "sequence_length": args.sequence_length,
                "layers": args.layers,
                "repeats": repeats,
                "date": time.strftime("%Y-%m-%d"),
                "results": results,
            },
            f,
            indent=2,
        )
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
