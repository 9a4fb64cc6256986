"""Serve the fine-tuned MiniLM news classifier from a merged SavedModel.

Run after the quickstart demo (it reuses its adapter file):

    python examples/quickstart.py
    KERAS_BACKEND=tensorflow python examples/serve_saved_model.py

What it shows:
1. The demo's LoRA adapter file loaded into a freshly built MiniLM classifier.
2. `ka.export_saved_model(..., preprocessor=...)`: adapters merged into a copy
   of the weights, the KerasHub preprocessor in front, so the SavedModel takes
   raw strings; reloaded and checked in a fresh process before it is kept.
3. The `serving_default` signature, as `saved_model_cli show` prints it.
4. A client in a separate Python process that cannot import keras_adapters:
   it uses TensorFlow and TensorFlow Text only, as TF Serving does.

Raw-string export needs the TensorFlow backend (KerasHub tokenizers are
TensorFlow Text ops), so this script defaults to it. Without an adapter file
(`--adapter`), it fine-tunes for `--steps` steps itself first.
"""

# First, before TensorFlow, Keras and JAX load: drop TensorFlow's start-up
# noise from stderr, and nothing else (see _quiet_start.py).
import _quiet_start

_quiet_start.hide_tensorflow_noise()

import argparse
import os
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
from _bbc_minilm import build_minilm_classifier  # noqa: E402
from _bbc_minilm import load_bbc_news  # noqa: E402
from _bbc_minilm import tokenize  # noqa: E402

import keras_adapters as ka  # noqa: E402

SENTENCES = [
    "The striker scored twice as the home side won the league title.",
    "Shares in the bank fell after it reported lower annual profits.",
    "The prime minister faces a vote in parliament on the new tax bill.",
    "The new smartphone chip doubles battery life, the firm says.",
    "The film won best picture at the awards ceremony last night.",
]

# The serving client: a fresh interpreter that cannot import keras_adapters.
CLIENT = """
import sys, json
sys.modules["keras_adapters"] = None
import tensorflow as tf
import tensorflow_text  # registers the tokenizer ops used by the SavedModel
path = sys.argv[1]
class_names, sentences = json.loads(sys.argv[2]), json.loads(sys.argv[3])
serve = tf.saved_model.load(path).signatures["serving_default"]
logits = next(iter(serve(texts=tf.constant(sentences)).values()))
probabilities = tf.nn.softmax(logits).numpy()
for sentence, p in zip(sentences, probabilities):
    print(f"  {class_names[p.argmax()]:>13} ({p.max():.2f})  {sentence}")
"""


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--adapter",
        default=os.path.join("outputs", "quickstart", "bbc_news.lora.weights.h5"),
        help="adapter file written by examples/quickstart.py",
    )
    parser.add_argument("--output-dir", default=os.path.join("outputs", "serving"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--sequence-length", type=int, default=128)
    return parser.parse_args()


def fine_tune(classifier, preprocessor, steps):
    """A short LoRA fine-tune, when no adapter file is given."""
    train_texts, train_labels, *_ = load_bbc_news(max_per_class=40)
    data = tokenize(preprocessor, train_texts, train_labels)
    labels = data.pop("labels")
    classifier.enable_adapter(ka.LoRA(rank=8, alpha=16), targets=ka.attention())
    classifier.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    epochs = max(1, steps * 16 // len(labels))
    classifier.fit(data, labels, batch_size=16, epochs=epochs, verbose=2)


def main():
    args = parse_args()
    if keras.backend.backend() != "tensorflow":
        sys.exit("Raw-string serving needs KERAS_BACKEND=tensorflow (see docstring).")
    class_names = load_bbc_news(max_per_class=2)[4]
    classifier, preprocessor = build_minilm_classifier(
        num_classes=len(class_names), sequence_length=args.sequence_length
    )
    if os.path.exists(args.adapter):
        print(f"Loading the demo's adapters from {args.adapter}")
        ka.load_adapter_weights(classifier, args.adapter)
    else:
        print(f"No adapter file at {args.adapter}; fine-tuning {args.steps} steps")
        fine_tune(classifier, preprocessor, args.steps)

    path = os.path.join(args.output_dir, "bbc_news")
    report = ka.export_saved_model(
        classifier,
        path,
        preprocessor=preprocessor,
        sample_inputs={"texts": keras.ops.convert_to_numpy(SENTENCES[:2])},
        overwrite=True,
    )
    print(report)

    print("\nsaved_model_cli show --tag_set serve --signature_def serving_default:")
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorflow.python.tools.saved_model_cli",
            "show",
            "--dir",
            path,
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
        ],
        capture_output=True,
        text=True,
    )
    print(cli.stdout or cli.stderr[-2000:])

    import json

    print("Client (cannot import keras_adapters) classifying raw sentences:")
    client = subprocess.run(
        [
            sys.executable,
            "-c",
            CLIENT,
            path,
            json.dumps(class_names),
            json.dumps(SENTENCES),
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
