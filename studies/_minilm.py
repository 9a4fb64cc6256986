"""Few-shot BBC News on all-MiniLM-L6-v2: the data and the training runner
shared by the MiniLM studies (methods, attention, LP-FT).

Data: the deduplicated BBC News corpus (2,127 articles, 5 topics; see
`examples/_bbc_minilm.py`). A fixed test set of `TEST_PER_CLASS` = 60
articles per class (300, drawn once with seed 12345, the same for every run)
is held out; for seed `s`, `shots` training and `shots` validation articles
per class are drawn from the rest with seed `s`, so methods compared at one
seed see the same split. Articles are cut to their first `sequence_length`
tokens (title and opening).

Runner: a classifier is built and compiled once per configuration (method,
targets, optimizer, learning rate); each seed then resets the trainable
variables and the optimizer state in place, so the compiled program is
reused (compiling MiniLM's train step costs more than a few-shot run). Seeds
differ in the data split, in dropout, and in the random initial values: the
head kernel and the random low-rank factors (`*_a`) are the initial values
times random signs drawn from the seed (the same distribution, since Keras'
and PEFT's initializers are symmetric); constant initial values (zeros,
ones, identity blocks, DoRA's magnitudes) stay as they are.
"""

from __future__ import annotations

import math
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

TEST_PER_CLASS = 60
TEST_SEED = 12345
INPUTS = ("token_ids", "segment_ids", "padding_mask")
_CACHE = pathlib.Path(os.environ.get("STUDIES_CACHE", "/tmp/keras_adapters_studies"))


def corpus(sequence_length: int) -> dict:
    """Every article tokenized once (cached on disk), with labels."""
    import _bbc_minilm as bbc

    _CACHE.mkdir(parents=True, exist_ok=True)
    path = _CACHE / f"bbc_tokens_{sequence_length}.npz"
    if path.is_file():
        return dict(np.load(path))
    # test_fraction only splits; we re-split below. Keep every article.
    train_texts, train_labels, test_texts, test_labels, _ = bbc.load_bbc_news(
        test_fraction=0.5, seed=0
    )
    texts = train_texts + test_texts
    labels = np.concatenate([train_labels, test_labels])
    _, preprocessor = bbc.build_minilm_classifier(5, sequence_length=sequence_length)
    tokens = bbc.tokenize(preprocessor, texts, labels)
    np.savez(path, **tokens)
    return tokens


def split(tokens: dict, shots: int, seed: int) -> tuple[dict, dict, dict]:
    """`(train, validation, test)` dicts of arrays for one seed (see module)."""
    labels = tokens["labels"]
    classes = np.unique(labels)
    test_rng = np.random.default_rng(TEST_SEED)
    test_idx, pools = [], []
    for c in classes:
        members = test_rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(members[:TEST_PER_CLASS])
        pools.append(np.sort(members[TEST_PER_CLASS:]))
    rng = np.random.default_rng([seed, shots])
    train_idx, val_idx = [], []
    for pool in pools:
        chosen = rng.permutation(pool)[: 2 * shots]
        train_idx.append(chosen[:shots])
        val_idx.append(chosen[shots:])

    def take(parts, shuffle):
        idx = np.concatenate(parts)
        if shuffle:
            idx = rng.permutation(idx)
        return {k: v[idx] for k, v in tokens.items()}

    return take(train_idx, True), take(val_idx, False), take(test_idx, False)


def features(data: dict) -> dict:
    return {k: data[k] for k in INPUTS}


class Runner:
    """One compiled classifier, re-used for every seed of one configuration.

    Args:
        configure: `classifier -> int`, adapts the classifier (enables the
            adapter, or makes layers trainable) and returns nothing useful.
        optimizer: a function returning a fresh, unbuilt Keras optimizer.
        sequence_length: tokens per article.
        dropout: dropout before the head.
    """

    def __init__(
        self, configure, optimizer, sequence_length: int, dropout: float = 0.1
    ):
        import _bbc_minilm as bbc
        import keras

        self.keras = keras
        keras.utils.set_random_seed(0)
        self.model, _ = bbc.build_minilm_classifier(
            5, sequence_length=sequence_length, dropout=dropout
        )
        configure(self.model)
        self.model.compile(
            optimizer=optimizer(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["sparse_categorical_accuracy"],
            jit_compile=True,
        )
        self.trainable = list(self.model.trainable_variables)
        self.initial = [np.array(keras.ops.convert_to_numpy(v)) for v in self.trainable]
        self.trainable_params = int(sum(math.prod(v.shape) for v in self.trainable))
        self.built_optimizer = False

    def _flippable(self, variable):
        path = variable.path
        return path.endswith("_a") or ("logits" in path and path.endswith("kernel"))

    def reset(self, seed: int) -> None:
        rng = np.random.default_rng([seed, 99])
        for variable, value in zip(self.trainable, self.initial, strict=True):
            if self._flippable(variable):
                value = value * rng.choice(
                    np.array([-1.0, 1.0], value.dtype), value.shape
                )
            variable.assign(value)
        if self.built_optimizer:
            for variable in self.model.optimizer.variables:
                if "learning_rate" in variable.path:
                    continue
                variable.assign(np.zeros(variable.shape, variable.dtype))
        self.keras.utils.set_random_seed(seed)

    def train(
        self,
        train: dict,
        validation: dict,
        test: dict,
        seed: int,
        epochs: int,
        batch_size: int = 8,
        before=None,
    ) -> dict:
        """Trains `epochs` epochs; keeps the best validation epoch's weights.

        Returns:
            A dict: per-epoch `train_loss`, `val_loss`, `val_accuracy`; the
            `best_epoch` (1-based; highest validation accuracy, ties to the
            lower validation loss), and at that epoch `test_accuracy`,
            `test_correct`, `test_n`, `test_accuracy`, the test `logits`,
            `trainable_params` and `seconds`. `before`, if given, is called
            after the reset (e.g. to set the head to a linear probe).
        """
        keras = self.keras
        self.reset(seed)
        if before is not None:
            before()
        history = {"train_loss": [], "val_loss": [], "val_accuracy": []}
        best, best_key = None, None
        start = time.perf_counter()
        for epoch in range(epochs):
            fit = self.model.fit(
                features(train),
                train["labels"],
                batch_size=batch_size,
                epochs=1,
                shuffle=True,
                verbose=0,
            )
            self.built_optimizer = True
            # predict, not evaluate: one compiled program less.
            logits = self.model.predict(features(validation), batch_size=64, verbose=0)
            val_loss, val_accuracy = _loss_and_accuracy(logits, validation["labels"])
            history["train_loss"].append(float(fit.history["loss"][-1]))
            history["val_loss"].append(float(val_loss))
            history["val_accuracy"].append(float(val_accuracy))
            key = (val_accuracy, -val_loss)
            if best_key is None or key > best_key:
                best_key = key
                best = (
                    epoch + 1,
                    [np.array(keras.ops.convert_to_numpy(v)) for v in self.trainable],
                )
        epoch, values = best
        for variable, value in zip(self.trainable, values, strict=True):
            variable.assign(value)
        logits = self.model.predict(features(test), batch_size=64, verbose=0)
        predictions = np.argmax(logits, axis=-1)
        correct = int(np.sum(predictions == test["labels"]))
        return {
            **history,
            "best_epoch": epoch,
            "test_correct": correct,
            "test_n": int(test["labels"].size),
            "test_accuracy": correct / test["labels"].size,
            "trainable_params": self.trainable_params,
            "seconds": time.perf_counter() - start,
            "logits": logits,
        }


def _loss_and_accuracy(logits, labels):
    logits = np.asarray(logits, "float64")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-np.mean(log_probs[np.arange(labels.size), labels]))
    return loss, float(np.mean(logits.argmax(axis=1) == labels))
