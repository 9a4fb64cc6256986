"""Merged SavedModel export: verified, adapter-free, dynamic shapes."""

import os
import re
import stat
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from cases import MODELS

import keras_adapters as ka
from keras_adapters import export as export_module


def _adapted(model_id, seed=0):
    case = MODELS[model_id]
    model = case.build(seed)
    ka.enable_adapter(
        model, ka.LoRA(rank=2), targets=case.targets, keep_trainable=case.keep_trainable
    )
    rng = np.random.default_rng(seed)
    for variable in ka.adapter_variables(model):
        variable.assign(rng.normal(scale=0.2, size=variable.shape))
    return model


def _serve(path, inputs):
    loaded = tf.saved_model.load(path)
    outputs = loaded.signatures["serving_default"](
        **{k: tf.constant(v) for k, v in inputs.items()}
    )
    return loaded, next(iter(outputs.values())).numpy()


def _variable_names(path):
    # Auto-numbered names (seed_generator_7) differ between two models.
    return sorted(
        re.sub(r"_\d+(?=[/:])", "", v.name) for v in tf.saved_model.load(path).variables
    )


@pytest.mark.parametrize("model_id", ["bert", "gemma"])  # Llama: a causal LM like Gemma
def test_export_is_merged_verified_and_dynamic(tmp_path, model_id):
    model = _adapted(model_id)
    adapter_values = [
        keras.ops.convert_to_numpy(v) for v in ka.adapter_variables(model)
    ]
    adapted = len(ka.adapted_layers(model))
    # The fresh-process verification (a TensorFlow start-up) runs for one
    # architecture; the others are served and compared in this process below.
    verify = model_id == "bert"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = ka.export_saved_model(model, tmp_path / "merged", verify=verify)
    # The merged copy is rebuilt without the task's compile config: no
    # "compile() was not called as part of model loading" warning.
    assert not [w for w in caught if "compile()" in str(w.message)], caught
    if verify:
        assert report.max_relative_difference <= 1e-5
    assert len(report.merged_layers) == adapted
    assert sorted(report.inputs) == sorted(i.name for i in model.inputs)
    # The user's model keeps its adapters, values and trainability.
    assert len(ka.adapted_layers(model)) == adapted
    for variable, value in zip(
        ka.adapter_variables(model), adapter_values, strict=True
    ):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value)
        assert variable.trainable
    # Same variables (names, count, parameters) as an export of the base model.
    base = MODELS[model_id].build(0)
    base_report = ka.export_saved_model(base, tmp_path / "base", verify=False)
    assert base_report.notes == ["the model has no adapters; it was exported as is"]
    assert (report.num_variables, report.num_parameters) == (
        base_report.num_variables,
        base_report.num_parameters,
    )
    merged_names = _variable_names(report.path)
    base_names = _variable_names(base_report.path)
    assert merged_names == base_names
    assert not any("lora" in name for name in merged_names)
    # Dynamic batch and sequence length, shared by all inputs.
    for batch, length in [(2, 5), (3, 8)]:
        inputs = {
            name: value[:batch, :length] for name, value in MODELS[model_id].x.items()
        }
        if "segment_ids" in [i.name for i in model.inputs]:
            inputs["segment_ids"] = np.zeros((batch, length), "int32")
        _, served = _serve(report.path, inputs)
        expected = np.asarray(model.predict(inputs, verbose=0))
        np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)


# The fresh-process verification (a TensorFlow start-up each) runs in
# test_export_is_merged_verified_and_dynamic (for BERT) and
# test_failed_verification_leaves_nothing; the tests below serve the export in
# this process instead.


# A plain functional model; KerasHub vision classifiers with adapters on
# convolutions (ViT's patch embedding, every Conv2D of a ResNet between its
# batch normalizations) and embeddings.
@pytest.mark.parametrize("model_id", ["functional", "vit", "resnet"])
def test_export_of_models_with_adapters_served_in_process(tmp_path, model_id):
    model = _adapted(model_id)
    case = MODELS[model_id]
    report = ka.export_saved_model(model, tmp_path / model_id, verify=False)
    assert len(report.merged_layers) == len(ka.adapted_layers(model))
    assert not any("lora" in name for name in _variable_names(report.path))
    (name,) = report.inputs
    _, served = _serve(report.path, {name: case.x})
    np.testing.assert_allclose(
        served, model.predict(case.x, verbose=0), rtol=1e-5, atol=1e-5
    )


def _plain_models():
    keras.utils.set_random_seed(0)
    sequential = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, name="hidden"), keras.layers.Dense(3)]
    )
    unnamed = keras.Input((6,))
    functional = keras.Model(unnamed, keras.layers.Dense(3, name="hidden")(unnamed))
    left, right = keras.Input((6,), name="left"), keras.Input((6,))
    hidden = keras.layers.Dense(3, name="hidden")(keras.layers.Add()([left, right]))
    two_inputs = keras.Model([left, right], hidden)
    return {
        "sequential": (sequential, ["inputs"]),
        "unnamed functional": (functional, ["inputs"]),
        "two positional inputs": (two_inputs, ["inputs_0", "inputs_1"]),
    }


@pytest.mark.parametrize(
    "kind", ["sequential", "unnamed functional", "two positional inputs"]
)
def test_export_of_sequential_and_unnamed_inputs(tmp_path, kind):
    model, names = _plain_models()[kind]
    ka.enable_adapter(model, ka.LoRA(rank=2), targets="hidden")
    for variable in ka.adapter_variables(model):
        variable.assign(np.full(variable.shape, 0.2))
    report = ka.export_saved_model(model, tmp_path / "plain", verify=False)
    assert list(report.inputs) == names
    x = {n: np.random.default_rng(i).normal(size=(2, 6)) for i, n in enumerate(names)}
    _, served = _serve(report.path, {n: v.astype("float32") for n, v in x.items()})
    call = x[names[0]] if len(names) == 1 else [x[n] for n in names]
    np.testing.assert_allclose(
        served, keras.ops.convert_to_numpy(model(call)), rtol=1e-5, atol=1e-6
    )


def test_fixed_shapes_are_an_explicit_option(tmp_path):
    model = _adapted("bert")
    report = ka.export_saved_model(
        model, tmp_path / "fixed", sequence_length=8, verify=False
    )
    assert all(shape == (None, 8) for shape, _ in report.inputs.values())


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_existing_directory_is_refused_unless_overwrite(tmp_path):
    model = _adapted("functional")
    target = tmp_path / "serving"
    target.mkdir()
    os.chmod(target, 0o750)
    (target / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        ka.export_saved_model(model, target)
    assert os.listdir(target) == ["keep.txt"]
    # What killed exports leave: a staging directory, and (killed between the
    # two renames of a swap without renameat2) the old export as a backup.
    dead = _dead_pid()
    (tmp_path / f".serving.staging-{dead}-0123abcd").mkdir()
    os.rename(target, tmp_path / f".serving.backup-{dead}-4567cdef")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        ka.export_saved_model(model, target)  # the backup is restored first
    assert os.listdir(target) == ["keep.txt"]
    ka.export_saved_model(model, target, overwrite=True, verify=False)
    assert "saved_model.pb" in os.listdir(target)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o750
    assert sorted(os.listdir(tmp_path)) == ["serving"]


def test_failed_verification_leaves_nothing(tmp_path, monkeypatch):
    model = _adapted("functional")
    monkeypatch.setattr(export_module, "_max_relative_difference", lambda a, b: 1.0)
    with pytest.raises(ka.ExportVerificationError, match="differs from model"):
        ka.export_saved_model(model, tmp_path / "bad")
    assert os.listdir(tmp_path) == []


def test_bad_arguments(tmp_path):
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="is not built"):
        ka.export_saved_model(unbuilt, tmp_path / "x")
    model = _adapted("bert")
    wrong = {"tokens": tf.TensorSpec((None, None), tf.int32)}
    with pytest.raises(ValueError, match=r"names \['tokens'\] do not match"):
        ka.export_saved_model(model, tmp_path / "x", input_signature=wrong)
    with pytest.raises(ValueError, match="must be a dict"):
        ka.export_saved_model(model, tmp_path / "x", input_signature=[1])
    with pytest.raises(ValueError, match="`sequence_length` must be a positive int"):
        ka.export_saved_model(model, tmp_path / "x", sequence_length=0)
    with pytest.raises(ValueError, match="`sample_inputs` must be a dict"):
        ka.export_saved_model(model, tmp_path / "x", sample_inputs={"a": 1})
    nan_inputs = {"features": np.full((2, 4, 8), np.nan)}
    functional = _adapted("functional")
    with pytest.raises(ValueError, match=r"`sample_inputs\['features'\]` must be"):
        ka.export_saved_model(functional, tmp_path / "x", sample_inputs=nan_inputs)
    with pytest.raises(ValueError, match=r"must have the shape \(None, 4, 8\)"):
        ka.export_saved_model(
            functional, tmp_path / "x", sample_inputs={"features": np.zeros((2, 3))}
        )
    for bad in (float("nan"), 0, -1.0, "1e-5"):
        with pytest.raises(ValueError, match="`tolerance` must be"):
            ka.export_saved_model(functional, tmp_path / "x", tolerance=bad)
    with pytest.raises(ValueError, match="`overwrite` must be a bool"):
        ka.export_saved_model(functional, tmp_path / "x", overwrite="yes")
    assert os.listdir(tmp_path) == []


def _classifier_with_preprocessor():
    import keras_hub

    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "goal", "bank"]
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=8
    )
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary),
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
    )
    classifier = keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=2, preprocessor=preprocessor
    )
    classifier.enable_adapter(ka.LoRA(rank=2))
    for variable in ka.adapter_variables(classifier):
        variable.assign(np.full(variable.shape, 0.3))
    return classifier


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="raw-string export needs the TensorFlow backend",
)
def test_export_with_preprocessor_takes_raw_strings(tmp_path):
    classifier = _classifier_with_preprocessor()
    # Served in this process here; the export below is verified in a fresh one.
    report = ka.export_saved_model(
        classifier, tmp_path / "text", preprocessor=True, verify=False
    )
    assert report.inputs == {"texts": ((None,), "string")}
    import tensorflow_text  # noqa: F401  (the tokenizer ops)

    texts = np.array(["goal goal", "bank", "unknown words here"])
    _, served = _serve(report.path, {"texts": texts})
    np.testing.assert_allclose(
        served, classifier.predict(texts, verbose=0), rtol=1e-5, atol=1e-6
    )
    # The documented usage: the verification on the user's own texts.
    report = ka.export_saved_model(
        classifier,
        tmp_path / "text",
        preprocessor=classifier.preprocessor,
        sample_inputs={"texts": ["bank goal", "goal"]},
        overwrite=True,
    )
    assert report.max_relative_difference <= 1e-5
    with pytest.raises(ValueError, match="must be a 1-D array of strings"):
        ka.export_saved_model(
            classifier,
            tmp_path / "other",
            preprocessor=True,
            sample_inputs={"texts": np.zeros((2, 3))},
        )


@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow", reason="the error is for other backends"
)
def test_export_with_preprocessor_explains_the_backend_limit(tmp_path):
    classifier = _classifier_with_preprocessor()
    with pytest.raises(ValueError, match="needs the TensorFlow backend"):
        ka.export_saved_model(classifier, tmp_path / "text", preprocessor=True)
    with pytest.raises(ValueError, match="has no preprocessor"):
        ka.export_saved_model(_adapted("bert"), tmp_path / "x", preprocessor=True)
