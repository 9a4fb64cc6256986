"""Mixed precision (DESIGN 4.8) and data sources (DESIGN 4.9)."""

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from cases import BATCH
from cases import MODELS

import keras_adapters as ka


@pytest.fixture
def policy():
    previous = keras.config.dtype_policy()
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy(previous)


def _fit(model, case, epochs=3, x=None):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2), loss=case.loss, jit_compile=True
    )
    if x is None:
        history = model.fit(case.x, case.y, batch_size=BATCH, epochs=epochs, verbose=0)
    else:
        history = model.fit(x, epochs=epochs, verbose=0)
    return history.history["loss"]


# Mixed precision per adapter method is in the shared matrix (`matrix.py`,
# PrecisionMatrix); a pure bfloat16 model here.
def test_merge_writes_the_kernel_dtype_of_a_bfloat16_model(policy):
    policy("bfloat16")
    case = MODELS["functional"]
    model = case.build(0)
    ka.enable_adapter(
        model,
        ka.LoRA(rank=2, alpha=4),
        targets=case.targets,
        keep_trainable=case.keep_trainable,
    )
    assert all(v.dtype == "float32" for v in ka.adapter_variables(model))
    losses = _fit(model, case)
    assert np.all(np.isfinite(losses))
    ka.merge_adapters(model)
    assert {v.dtype for v in model.weights} == {"bfloat16"}


def test_mixed_bfloat16_training_keeps_lora_float32(policy):
    policy("mixed_bfloat16")
    case = MODELS["bert"]
    model = case.build(0)
    ka.enable_adapter(model, ka.LoRA(rank=2, alpha=4), targets=case.targets)
    adapted = ka.adapted_layers(model)
    losses = _fit(model, case, epochs=2)
    assert np.all(np.isfinite(losses))
    assert {v.dtype for v in ka.adapter_variables(model)} == {"float32"}
    assert {layer.compute_dtype for layer in adapted} == {"bfloat16"}
    before = np.asarray(model(case.x, training=False), "float32")
    ka.merge_adapters(model)
    assert {layer._kernel.dtype for layer in adapted} == {"float32"}
    after = np.asarray(model(case.x, training=False), "float32")
    # bfloat16 compute: an 8-bit mantissa.
    np.testing.assert_allclose(after, before, atol=0.1, rtol=0.05)


def test_fit_from_a_tf_data_dataset():
    case = MODELS["bert"]
    model = case.build(0)
    ka.enable_adapter(model, ka.LoRA(rank=2, alpha=4), targets=case.targets)
    dataset = tf.data.Dataset.from_tensor_slices((case.x, case.y)).batch(BATCH)
    losses = _fit(model, case, epochs=20, x=dataset.repeat(1))
    assert losses[-1] < 0.99 * losses[0], losses


def test_fit_on_raw_strings_with_a_keras_hub_preprocessor():
    words = ["the", "match", "goal", "team", "market", "shares", "bank", "profit"]
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=8
    )
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary),
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
    )
    classifier = keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=2, preprocessor=preprocessor, dropout=0.0
    )
    sport = ["the match goal", "team goal", "the team match", "goal goal team"]
    money = ["bank profit", "market shares", "the bank shares", "profit market"]
    texts = np.array(sport + money)
    labels = np.array([0] * 4 + [1] * 4)
    report = classifier.enable_adapter(ka.LoRA(rank=2, alpha=8))
    assert len(report.adapted) == 2
    classifier.compile(
        optimizer=keras.optimizers.Adam(3e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    history = classifier.fit(texts, labels, batch_size=8, epochs=30, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.9 * losses[0], losses
    predictions = classifier.predict(texts, verbose=0).argmax(-1)
    assert (predictions == labels).mean() >= 0.75
