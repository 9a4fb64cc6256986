"""Serve several BBC News fine-tunes of MiniLM from one SavedModel.

Two customers fine-tune the same pretrained MiniLM (all-MiniLM-L6-v2) on
their own data; one server answers both, each request with its own
fine-tune, from one copy of the base weights:

1. Two LoRA adapters, `customer_a` and `customer_b`, on the query and
   value projections of every attention block. The classification head is
   the model's own: shared by both, trained on both customers' articles.
2. `ka.per_example_adapters`: one model that takes `adapter_id` beside the
   tokens. Both adapters train together in one `fit`, on mixed batches:
   customer A's articles (the first half of the training set) train
   adapter 0 only, customer B's (the second half) adapter 1 only (and
   the shared head).
3. Test accuracy per adapter, the whole test set through each (and `-1`:
   the base encoder with the trained head).
4. `ka.export_saved_model(..., adapters=[...], preprocessor=...)`: one
   SavedModel whose `serving_default` takes raw `texts` and an
   `adapter_id` per text, checked in a fresh process before it is kept.
5. A client in a separate Python process that cannot import keras_adapters
   (TensorFlow and TensorFlow Text only, as TF Serving) sends one batch
   mixing both customers' requests.

Raw-string export needs the TensorFlow backend (KerasHub tokenizers are
TensorFlow Text ops), so this script defaults to it. `--quick` trains 4
steps on a tiny subset (a smoke run).

```shell
KERAS_BACKEND=tensorflow python examples/serve_many_adapters.py [--quick]
```
"""

# First, before TensorFlow, Keras and JAX load: drop TensorFlow's start-up
# noise from stderr, and nothing else (see _quiet_start.py).
import _quiet_start

_quiet_start.hide_tensorflow_noise()

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import _bbc_minilm as bbc  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_adapters as ka  # noqa: E402

INPUTS = ("token_ids", "segment_ids", "padding_mask")
CUSTOMERS = ["customer_a", "customer_b"]
REQUESTS = [
    ("The striker scored twice as the home side won the league title.", 0),
    ("Shares in the bank fell after it reported lower annual profits.", 1),
    ("The prime minister faces a vote in parliament on the new tax bill.", 0),
    ("The new smartphone chip doubles battery life, the firm says.", 1),
    ("The film won best picture at the awards ceremony last night.", -1),
]

# The serving client: a fresh interpreter that cannot import keras_adapters.
CLIENT = """
import sys, json
sys.modules["keras_adapters"] = None
import tensorflow as tf
import tensorflow_text  # registers the tokenizer ops used by the SavedModel
path, class_names, requests, names = sys.argv[1], *map(json.loads, sys.argv[2:5])
serve = tf.saved_model.load(path).signatures["serving_default"]
texts = tf.constant([text for text, _ in requests])
ids = tf.constant([adapter for _, adapter in requests], tf.int32)
logits = next(iter(serve(texts=texts, adapter_id=ids).values()))
probabilities = tf.nn.softmax(logits).numpy()
for (text, adapter), p in zip(requests, probabilities):
    who = names[adapter] if adapter >= 0 else "base model"
    print(f"  {who:>10}: {class_names[p.argmax()]:>13} ({p.max():.2f})  {text}")
"""


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--output-dir", default=os.path.join("outputs", "many"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main():
    args = parse_args()
    if keras.backend.backend() != "tensorflow":
        sys.exit("Raw-string serving needs KERAS_BACKEND=tensorflow (see docstring).")
    keras.utils.set_random_seed(args.seed)
    if args.quick:
        max_per_class, sequence_length, steps = 20, 64, 4
    else:
        max_per_class, sequence_length, steps = None, 128, 96
    train_texts, train_labels, test_texts, test_labels, class_names = bbc.load_bbc_news(
        max_per_class=max_per_class
    )
    classifier, preprocessor = bbc.build_minilm_classifier(
        num_classes=len(class_names), sequence_length=sequence_length, dropout=0.0
    )
    train = bbc.tokenize(preprocessor, train_texts, train_labels)
    test = bbc.tokenize(preprocessor, test_texts, test_labels)

    # 1. One adapter per customer.
    for name in CUSTOMERS:
        report = classifier.enable_adapter(
            ka.LoRA(rank=8, alpha=16), targets=ka.attention("query", "value"), name=name
        )
    print(report)

    # 2. Both adapters train in one fit: each article carries its customer's id.
    serving = ka.per_example_adapters(classifier, CUSTOMERS)
    half = len(train["labels"]) // 2
    ids = np.where(np.arange(len(train["labels"])) < half, 0, 1).astype("int32")
    features = {**{k: train[k] for k in INPUTS}, "adapter_id": ids}
    serving.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    dataset = (
        tf.data.Dataset.from_tensor_slices((features, train["labels"]))
        .shuffle(len(ids), seed=args.seed)
        .batch(16)
        .take(steps)
    )
    serving.fit(dataset, epochs=1, shuffle=False, verbose=2)

    # 3. Accuracy of each adapter, all in the same batches.
    tokens = {k: test[k] for k in INPUTS}
    print("Test accuracy of each adapter:")
    for adapter_id, who in [(-1, "base model"), (0, CUSTOMERS[0]), (1, CUSTOMERS[1])]:
        ids = np.full(len(test["labels"]), adapter_id, "int32")
        logits = serving.predict({**tokens, "adapter_id": ids}, verbose=0)
        accuracy = np.mean(logits.argmax(-1) == test["labels"])
        print(f"  {who:>10}: {accuracy:.1%}")

    # 4. One SavedModel for both customers, raw strings in.
    path = os.path.join(args.output_dir, "bbc_news_customers")
    sample = {
        "texts": np.array([text for text, _ in REQUESTS]),
        "adapter_id": np.array([adapter for _, adapter in REQUESTS], "int32"),
    }
    export = ka.export_saved_model(
        classifier,
        path,
        adapters=CUSTOMERS,
        preprocessor=preprocessor,
        sample_inputs=sample,
        overwrite=True,
    )
    print(export)

    # 5. A client without keras_adapters, one batch mixing both customers.
    print("Client (cannot import keras_adapters), one mixed batch:")
    client = subprocess.run(
        [
            sys.executable,
            "-c",
            CLIENT,
            path,
            json.dumps(class_names),
            json.dumps(REQUESTS),
            json.dumps(CUSTOMERS),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    if client.returncode != 0:
        sys.exit(f"The serving client failed:\n{client.stderr[-3000:]}")
    print(client.stdout)


if __name__ == "__main__":
    main()
