"""Bad input gets a clear error and leaves models and files as they were."""

import hashlib
import os
import shutil

import keras
import numpy as np
import pytest
from _fixtures import backend_independent
from cases import MODELS

import keras_adapters as ka
from keras_adapters import saving


def _snapshot(model):
    return (
        type(model),
        [keras.ops.convert_to_numpy(v).copy() for v in model.weights],
        [v.trainable for v in model.weights],
        [v.path for v in model.weights],
    )


def _assert_unchanged(model, snapshot):
    cls, values, flags, paths = _snapshot(model)
    assert cls is snapshot[0]
    assert paths == snapshot[3]
    assert flags == snapshot[2]
    for a, b in zip(values, snapshot[1], strict=True):
        np.testing.assert_array_equal(a, b)
    assert ka.adapted_layers(model) == []


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@backend_independent
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "`rank` must be a positive int; received 0"),
        ({"rank": -2}, "received -2"),
        ({"rank": 2.5}, "received 2.5"),
        ({"rank": True}, "received True"),
        ({"rank": 4, "alpha": 0}, "`alpha` must be a positive number"),
        ({"rank": 4, "dropout": 1.0}, "`dropout` must be a float in [0, 1)"),
        ({"rank": 4, "dropout": -0.1}, "received -0.1"),
        ({"rank": 4, "use_rslora": "yes"}, "`use_rslora` must be a bool"),
        ({"rank": 4, "a_initializer": "nope"}, "`a_initializer` must be one of"),
    ],
)
def test_lora_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as error:
        ka.LoRA(**kwargs)
    assert message in str(error.value)


def test_rank_larger_than_the_layer_is_rejected():
    model = MODELS["functional"].build(0)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"rank 9 is larger than min\(d_in, d_out\)"):
        ka.enable_adapter(model, ka.LoRA(rank=9), targets="proj")
    _assert_unchanged(model, before)


@backend_independent
def test_unknown_role_is_rejected():
    with pytest.raises(ValueError, match="Unknown attention role 'querry'"):
        ka.attention("querry")


@pytest.fixture(scope="module")
def pristine_bert():
    """For tests whose calls fail and must leave it unchanged (they check)."""
    return MODELS["bert"].build(0)


def test_target_matching_nothing_lists_candidates(pristine_bert):
    model = pristine_bert
    before = _snapshot(model)
    with pytest.raises(ValueError) as error:
        ka.enable_adapter(model, ka.LoRA(rank=2), targets="q_proj")
    text = str(error.value)
    assert "'q_proj' matches no layer" in text
    assert "transformer_layer_0/self_attention_layer/query  (role: query)" in text
    assert "transformer_layer_1/feedforward_output_dense" in text
    _assert_unchanged(model, before)


@pytest.mark.parametrize("targets", [12, [], [None]])
def test_invalid_target_types(targets):
    model = MODELS["functional"].build(0)
    with pytest.raises(ValueError, match="target"):
        ka.enable_adapter(model, ka.LoRA(rank=2), targets=targets)


def test_invalid_regex_is_reported():
    model = MODELS["functional"].build(0)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        ka.enable_adapter(model, ka.LoRA(rank=2), targets="proj(")


def test_unsupported_layer_is_rejected(pristine_bert):
    model = pristine_bert
    before = _snapshot(model)
    with pytest.raises(ValueError) as error:
        ka.enable_adapter(model, ka.LoRA(rank=2), targets="embeddings_layer_norm")
    assert "LayerNormalization" in str(error.value)
    assert "Dense, EinsumDense, Embedding and Conv1D" in str(error.value)
    _assert_unchanged(model, before)


def test_unsupported_layers_among_matches_are_reported_as_skipped():
    model = MODELS["functional"].build(0)
    report = ka.enable_adapter(model, ka.LoRA(rank=2), targets=["proj", "pool"])
    assert report.adapted_paths == ["proj"]
    assert [path for path, _ in report.skipped] == ["pool"]
    assert "skipped pool" in str(report)


def test_a_failed_second_adapter_leaves_the_first_unchanged():
    model = MODELS["bert"].build(0)
    ka.enable_adapter(model, ka.LoRA(rank=2), targets=ka.attention("query"))
    before = _snapshot(model)
    with pytest.raises(ValueError, match="larger than min"):
        ka.enable_adapter(
            model, ka.LoRA(rank=64), targets=ka.attention("query", "key"), name="big"
        )
    after = _snapshot(model)
    assert after[3] == before[3] and after[2] == before[2]


def test_adapter_names_must_be_unique_and_valid():
    model = MODELS["bert"].build(0)
    ka.enable_adapter(model, ka.LoRA(rank=2), targets=ka.attention("query"))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        ka.enable_adapter(model, ka.LoRA(rank=2), targets=ka.attention("value"))
    with pytest.raises(ValueError, match="`name` must be a non-empty identifier"):
        ka.enable_adapter(model, ka.LoRA(rank=2), targets="key", name="a b")


def test_bad_model_and_adapter_arguments():
    with pytest.raises(ValueError, match="Expected a Keras model"):
        ka.enable_adapter(keras.layers.Dense(3), ka.LoRA(rank=2))
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="is not built"):
        ka.enable_adapter(unbuilt, ka.LoRA(rank=2), targets=".*")
    model = MODELS["functional"].build(0)
    with pytest.raises(ValueError, match="`adapter` must be an adapter configuration"):
        ka.enable_adapter(model, "lora", targets="proj")


def test_merge_without_adapters_or_with_unknown_names():
    model = MODELS["functional"].build(0)
    with pytest.raises(ValueError, match="has no adapters to merge"):
        ka.merge_adapters(model)
    ka.enable_adapter(model, ka.LoRA(rank=2), targets="proj")
    with pytest.raises(ValueError, match=r"Unknown adapter names \['other'\]"):
        ka.merge_adapters(model, names="other")


@pytest.fixture(scope="module")
def _bert_adapter_file(tmp_path_factory):
    model = MODELS["bert"].build(0)
    ka.enable_adapter(
        model,
        ka.LoRA(rank=2),
        targets=MODELS["bert"].targets,
        keep_trainable=MODELS["bert"].keep_trainable,
    )
    path = str(tmp_path_factory.mktemp("adapter_file") / "a.weights.h5")
    ka.save_adapter_weights(model, path)
    return path


@pytest.fixture
def adapter_file(tmp_path, _bert_adapter_file):
    """A LoRA (rank 2) adapter file of the BERT case, saved once per module,
    copied into the test's own `tmp_path` as `a.weights.h5`."""
    path = str(tmp_path / "a.weights.h5")
    shutil.copyfile(_bert_adapter_file, path)
    return path


def test_loading_into_another_architecture_fails_cleanly(adapter_file):
    path = adapter_file
    digest = _digest(path)
    other = MODELS["gpt2"].build(0)
    before = _snapshot(other)
    with pytest.raises(ValueError) as error:
        ka.load_adapter_weights(other, path)
    assert "does not fit model" in str(error.value)
    assert "transformer_layer_0/self_attention_layer/query" in str(error.value)
    _assert_unchanged(other, before)
    assert _digest(path) == digest


def test_loading_into_other_shapes_fails_cleanly(adapter_file):
    import keras_hub

    path = adapter_file
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=64,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=32,
        max_sequence_length=8,
    )
    wider = keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=3, preprocessor=None
    )
    before = _snapshot(wider)
    with pytest.raises(ValueError, match=r"has kernel shape \(32, 2, 16\), the file"):
        ka.load_adapter_weights(wider, path)
    _assert_unchanged(wider, before)


def test_loading_other_adapters_into_an_adapted_model_fails(adapter_file):
    path = adapter_file  # LoRA, rank 2
    model = MODELS["bert"].build(0)
    ka.enable_adapter(model, ka.LoRA(rank=4), targets=ka.attention("query", "value"))
    values = [keras.ops.convert_to_numpy(v).copy() for v in model.weights]
    with pytest.raises(ValueError, match="already has adapters"):
        ka.load_adapter_weights(model, path)
    for a, b in zip(model.weights, values, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), b)


def test_bad_adapter_file_paths(tmp_path):
    model = MODELS["functional"].build(0)
    with pytest.raises(ValueError, match="Adapter files end in '.h5'"):
        ka.load_adapter_weights(model, str(tmp_path / "a.npz"))
    with pytest.raises(FileNotFoundError, match="No adapter file"):
        ka.load_adapter_weights(model, str(tmp_path / "missing.h5"))
    keras_weights = str(tmp_path / "plain.weights.h5")
    model.save_weights(keras_weights)
    with pytest.raises(ValueError, match="is not a keras_adapters adapter file"):
        ka.load_adapter_weights(model, keras_weights)
    with pytest.raises(ValueError, match="has no adapters to save"):
        ka.save_adapter_weights(model, str(tmp_path / "x.h5"))


def test_interrupted_save_keeps_the_existing_file(tmp_path, monkeypatch, adapter_file):
    path = adapter_file
    digest = _digest(path)
    model = MODELS["bert"].build(1)
    ka.enable_adapter(model, ka.LoRA(rank=2), targets=ka.attention("query", "value"))
    calls = []

    def failing_numpy(variable):
        calls.append(variable)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed mid-save")
        return np.asarray(keras.ops.convert_to_numpy(variable))

    monkeypatch.setattr(saving, "_numpy", failing_numpy)
    with pytest.raises(KeyboardInterrupt):
        ka.save_adapter_weights(model, path)
    assert _digest(path) == digest
    assert os.listdir(tmp_path) == ["a.weights.h5"]


class _NoConfigModel(keras.Model):
    def __init__(self, dense):
        super().__init__()
        self.dense = dense

    def call(self, x):
        return self.dense(x)


def test_keras_save_of_a_model_without_config_points_to_adapter_files(tmp_path):
    model = _NoConfigModel(keras.layers.Dense(4))
    model(np.zeros((1, 3), "float32"))
    ka.enable_adapter(model, ka.LoRA(rank=2), targets=r".*dense(_\d+)?")
    path = tmp_path / "m.keras"
    with pytest.raises(NotImplementedError, match="save_adapter_weights"):
        model.save(path)
    assert not path.exists()


def test_plain_keras_weights_file_with_adapters_fails_loudly_in_a_plain_model(tmp_path):
    # A `.weights.h5` file of an adapted model holds the adapter variables;
    # loading it into a model without adapters must not silently drop them.
    model = MODELS["functional"].build(0)
    ka.enable_adapter(model, ka.LoRA(rank=2), targets="proj", keep_trainable="head")
    path = str(tmp_path / "adapted.weights.h5")
    model.save_weights(path)
    plain = MODELS["functional"].build(0)
    with pytest.raises(ValueError, match="expected 2 variables"):
        plain.load_weights(path)
