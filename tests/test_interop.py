"""Hugging Face PEFT LoRA adapters in and out of KerasHub models.

The fixtures in `tests/data/peft/` (written by `tests/data/make_peft_fixtures.py`
with PyTorch, transformers and PEFT) hold tiny BERT, Llama and Gemma
checkpoints, a PEFT LoRA adapter for each, and the PyTorch outputs with and
without the adapters. Outputs are compared in float32 with
`atol=rtol=1e-4`; the measured differences are about 1e-6 (BERT, Gemma) and
up to 6e-5 (Llama on JAX), while the adapters change the outputs by 1 to 5.
"""

import json
import os
import re
import shutil
import warnings

import keras
import keras_hub
import numpy as np
import pytest

import keras_adapters as ka
from keras_adapters import interop
from keras_adapters.model import adapter_groups

DATA = os.path.join(os.path.dirname(__file__), "data", "peft")
OUTPUTS = np.load(os.path.join(DATA, "outputs.npz"))
LINEAR_MODULES = json.load(open(os.path.join(DATA, "linear_modules.json")))
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
BACKBONES = {
    "bert": keras_hub.models.BertBackbone,
    "llama": keras_hub.models.Llama3Backbone,
    "gemma": keras_hub.models.GemmaBackbone,
}
# adapter fixture -> (base checkpoint, Hugging Face class it was made on)
ADAPTERS = {
    "bert_lora": ("bert", "BertModel"),
    "bert_lora_all": ("bert", "BertForSequenceClassification"),
    "llama_lora": ("llama", "LlamaForCausalLM"),
    "gemma_lora": ("gemma", "GemmaForCausalLM"),
}


def _backbone(kind):
    return BACKBONES[kind].from_preset(os.path.join(DATA, kind))


def _outputs(backbone):
    inputs = {
        "token_ids": OUTPUTS["token_ids"],
        "padding_mask": OUTPUTS["padding_mask"],
    }
    if isinstance(backbone, keras_hub.models.BertBackbone):
        inputs["segment_ids"] = np.zeros_like(OUTPUTS["token_ids"])
    outputs = backbone(inputs)
    if not isinstance(outputs, dict):
        outputs = {"sequence_output": outputs}
    return {k: keras.ops.convert_to_numpy(v) for k, v in outputs.items()}


def _assert_matches_pytorch(backbone, fixture):
    outputs = _outputs(backbone)
    for key, value in outputs.items():
        expected = OUTPUTS[f"{fixture}/{key}"]
        np.testing.assert_allclose(value, expected, **TOLERANCE, err_msg=key)


def _lora_values(model):
    return {
        layer.path: (
            keras.ops.convert_to_numpy(layer.lora_a),
            keras.ops.convert_to_numpy(layer.lora_b),
        )
        for layer in ka.adapted_layers(model)
    }


def _snapshot(model):
    return [
        (v.path, v.trainable, keras.ops.convert_to_numpy(v).copy())
        for v in model.weights
    ]


def _assert_unchanged(model, snapshot):
    assert ka.adapted_layers(model) == []
    now = _snapshot(model)
    assert [(p, t) for p, t, _ in now] == [(p, t) for p, t, _ in snapshot]
    for (path, _, before), (_, _, after) in zip(snapshot, now, strict=True):
        np.testing.assert_array_equal(before, after, err_msg=path)


def _read_tensors(directory):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    return safetensors_numpy.load_file(
        os.path.join(directory, "adapter_model.safetensors")
    )


def _read_config(directory):
    with open(os.path.join(directory, "adapter_config.json")) as f:
        return json.load(f)


def _selected_modules(target_modules, hf_class):
    """The Linear modules of `hf_class` PEFT's `target_modules` selects."""
    names = LINEAR_MODULES[hf_class]
    if isinstance(target_modules, str):
        return {n for n in names if re.fullmatch(target_modules, n)}
    return {
        n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)
    }


def _saved_modules(directory):
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    return {
        key[len(prefix) : -len(suffix)]
        for key in _read_tensors(directory)
        if key.endswith(suffix)
    }


# Import: the KerasHub model with the imported adapter computes what PyTorch
# computed.


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_converted_base_model_matches_pytorch(kind):
    # Sanity check of the fixture and KerasHub's conversion, without adapter.
    _assert_matches_pytorch(_backbone(kind), kind)


@pytest.mark.parametrize("fixture", sorted(ADAPTERS))
def test_imported_adapter_matches_pytorch(fixture):
    kind, _ = ADAPTERS[fixture]
    backbone = _backbone(kind)
    config = _read_config(os.path.join(DATA, fixture))
    report = interop.load_peft_adapter(backbone, os.path.join(DATA, fixture))

    assert isinstance(report.adapter, ka.LoRA)
    assert report.adapter.rank == config["r"]
    assert report.adapter.alpha == config["lora_alpha"]
    assert report.adapter.use_rslora == config["use_rslora"]
    assert report.adapter.dropout == config["lora_dropout"]
    assert len(report.adapted) == len(_read_tensors(os.path.join(DATA, fixture))) // 2
    _assert_matches_pytorch(backbone, fixture)
    # Without the adapter the outputs differ a lot: the check above is not
    # passing by accident.
    base = OUTPUTS[f"{kind}/sequence_output"]
    assert np.abs(_outputs(backbone)["sequence_output"] - base).max() > 0.5


@pytest.mark.parametrize("fixture", ["llama_lora", "gemma_lora"])
def test_comparison_detects_a_wrong_head_layout(fixture):
    # The tolerance is tight enough to catch a per-head layout mistake: the
    # same factors with the query's (heads, head_dim) output order swapped
    # to (head_dim, heads) no longer match PyTorch.
    backbone = _backbone(ADAPTERS[fixture][0])
    interop.load_peft_adapter(backbone, os.path.join(DATA, fixture))
    for layer in ka.adapted_layers(backbone):
        if layer.path.endswith("attention/query"):
            b = keras.ops.convert_to_numpy(layer.lora_b)
            heads, head_dim = layer._kernel.shape[-2], layer._kernel.shape[-1]
            if "decoder_block" in layer.path:  # Gemma: (heads, hidden, head_dim)
                heads = layer._kernel.shape[0]
            swapped = b.reshape(-1, heads, head_dim).transpose(0, 2, 1)
            layer.lora_b.assign(swapped.reshape(b.shape))
    actual = _outputs(backbone)["sequence_output"]
    expected = OUTPUTS[f"{fixture}/sequence_output"]
    assert np.abs(actual - expected).max() > 0.1


@pytest.mark.parametrize("fixture", ["bert_lora_all", "llama_lora", "gemma_lora"])
def test_merge_after_import_matches_pytorch(fixture):
    backbone = _backbone(ADAPTERS[fixture][0])
    interop.load_peft_adapter(backbone, os.path.join(DATA, fixture))
    ka.merge_adapters(backbone)
    assert ka.adapted_layers(backbone) == []
    _assert_matches_pytorch(backbone, fixture)


def test_import_into_a_task_adapts_its_backbone():
    classifier = keras_hub.models.BertTextClassifier(
        backbone=_backbone("bert"), num_classes=2, preprocessor=None
    )
    ka.interop.load_peft_adapter(
        classifier, os.path.join(DATA, "bert_lora"), name="imported"
    )
    assert {
        layer.path.rsplit("/", 1)[-1] for layer in ka.adapted_layers(classifier)
    } == {
        "query",
        "value",
    }
    # The head stays trainable, as with enable_adapter on a Task.
    assert classifier.get_layer("logits").kernel.trainable
    _assert_matches_pytorch(classifier.backbone, "bert_lora")


# Export: PEFT's file layout, and round trips.


@pytest.mark.parametrize("fixture", sorted(ADAPTERS))
def test_export_of_an_imported_adapter_reproduces_the_fixture(fixture, tmp_path):
    kind, hf_class = ADAPTERS[fixture]
    backbone = _backbone(kind)
    source = os.path.join(DATA, fixture)
    interop.load_peft_adapter(backbone, source)
    target = str(tmp_path / "exported")
    interop.save_peft_adapter(backbone, target)

    original, exported = _read_tensors(source), _read_tensors(target)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == np.float32
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    config, saved = _read_config(source), _read_config(target)
    for key in (
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "r",
        "lora_alpha",
        "use_rslora",
        "lora_dropout",
        "bias",
        "use_dora",
        "modules_to_save",
    ):
        assert saved[key] == config[key], key
    # target_modules may be written differently (BERT's "dense" also names
    # modules of other heads, so a regex is used), but selects the same
    # modules of the real Hugging Face model.
    assert _selected_modules(saved["target_modules"], hf_class) == _saved_modules(
        target
    )
    assert _selected_modules(config["target_modules"], hf_class) == _saved_modules(
        target
    )


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_export_then_import_into_a_fresh_model_round_trips_exactly(kind, tmp_path):
    backbone = _backbone(kind)
    targets = (
        ka.attention("query", "key", "value", "attention_output")
        if kind == "bert"
        else [r"transformer_layer_1/.*"]  # One of two layers: needs a regex.
    )
    ka.enable_adapter(backbone, ka.LoRA(rank=3, alpha=5.5, dropout=0.2), targets)
    rng = np.random.default_rng(0)
    for layer in ka.adapted_layers(backbone):
        layer.lora_a.assign(rng.normal(size=layer.lora_a.shape))
        layer.lora_b.assign(rng.normal(size=layer.lora_b.shape))
    expected = _outputs(backbone)
    path = str(tmp_path / "adapter")
    ka.interop.save_peft_adapter(backbone, path, base_model_name_or_path="my/base")

    config = _read_config(path)
    assert config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == "my/base"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (3, 5.5, 0.2)
    hf_class = "BertModel" if kind == "bert" else "LlamaForCausalLM"
    assert _selected_modules(config["target_modules"], hf_class) == _saved_modules(path)
    assert len(_saved_modules(path)) == len(ka.adapted_layers(backbone))
    if kind == "llama":
        assert isinstance(config["target_modules"], str)
        assert all(m.startswith("model.layers.1.") for m in _saved_modules(path))

    fresh = _backbone(kind)
    ka.interop.load_peft_adapter(fresh, path)
    original, loaded = _lora_values(backbone), _lora_values(fresh)
    assert sorted(loaded) == sorted(original)
    for layer_path, (a, b) in original.items():
        np.testing.assert_array_equal(loaded[layer_path][0], a)
        np.testing.assert_array_equal(loaded[layer_path][1], b)
    group = adapter_groups(fresh)[0]
    assert (
        group.adapter.get_config()
        == ka.LoRA(rank=3, alpha=5.5, dropout=0.2).get_config()
    )
    for key, value in _outputs(fresh).items():
        np.testing.assert_array_equal(value, expected[key])


def test_export_names_modules_for_the_hugging_face_class(tmp_path):
    backbone = _backbone("bert")
    classifier = keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=2, preprocessor=None
    )
    ka.enable_adapter(classifier, ka.LoRA(rank=2))
    with pytest.warns(UserWarning, match="logits"):
        ka.interop.save_peft_adapter(classifier, tmp_path / "cls")
    config = _read_config(tmp_path / "cls")
    assert config["task_type"] is None  # SEQ_CLS would need the head.
    assert config["target_modules"] == ["query", "value"]
    assert _saved_modules(tmp_path / "cls") == {
        f"bert.encoder.layer.{i}.attention.self.{m}"
        for i in range(2)
        for m in ("query", "value")
    }
    # A backbone alone is BertModel's; both defaults can be overridden.
    backbone = _backbone("bert")
    ka.enable_adapter(backbone, ka.LoRA(rank=2))
    with warnings.catch_warnings():
        # No other trained weights to warn about.
        warnings.simplefilter("error", UserWarning)
        ka.interop.save_peft_adapter(backbone, tmp_path / "model")
    assert _read_config(tmp_path / "model")["task_type"] == "FEATURE_EXTRACTION"
    assert "encoder.layer.0.attention.self.query" in _saved_modules(tmp_path / "model")
    ka.interop.save_peft_adapter(
        backbone, tmp_path / "custom", module_prefix="bert.", task_type=None
    )
    assert _read_config(tmp_path / "custom")["task_type"] is None
    assert _saved_modules(tmp_path / "custom") == _saved_modules(tmp_path / "cls")


def test_export_writes_atomically_and_refuses_to_clobber(tmp_path):
    backbone = _backbone("bert")
    interop.load_peft_adapter(backbone, os.path.join(DATA, "bert_lora"))
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="non-empty directory.*overwrite=True"):
        interop.save_peft_adapter(backbone, target)
    assert os.listdir(target) == ["notes.txt"]
    interop.save_peft_adapter(backbone, target, overwrite=True)
    assert sorted(os.listdir(target)) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # No temporary leftovers.
    empty = tmp_path / "empty"
    empty.mkdir()
    interop.save_peft_adapter(backbone, empty)
    assert len(os.listdir(empty)) == 2
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        interop.save_peft_adapter(backbone, tmp_path / "file")


# Half-precision factors (bfloat16 is read without safetensors.numpy).


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_adapters_are_read(dtype, tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    source = os.path.join(DATA, "bert_lora")
    tensors = _read_tensors(source)
    numpy_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    code = "F16" if dtype == "float16" else "BF16"
    header, chunks, offset = {}, [], 0
    for key in sorted(tensors):
        raw = tensors[key].astype(numpy_dtype).tobytes()
        header[key] = {
            "dtype": code,
            "shape": list(tensors[key].shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header).encode()
    shutil.copytree(source, tmp_path / "half")
    with open(tmp_path / "half" / "adapter_model.safetensors", "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks))
    backbone = _backbone("bert")
    interop.load_peft_adapter(backbone, tmp_path / "half")
    for layer in ka.adapted_layers(backbone):
        module = layer.path.replace("transformer_layer_", "encoder.layer.")
        module = module.replace("/self_attention_layer/", ".attention.self.")
        a = tensors[f"base_model.model.{module}.lora_A.weight"]
        expected = a.astype(numpy_dtype).astype(np.float32).T
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(layer.lora_a), expected
        )
        assert not np.array_equal(expected, a.T)  # The rounding is visible.


# Errors: each names the problem, and the model is left unchanged.


def _edited(tmp_path, fixture, **changes):
    directory = tmp_path / fixture
    shutil.copytree(os.path.join(DATA, fixture), directory)
    config = _read_config(directory)
    config.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def bert():
    return _backbone("bert")


@pytest.mark.parametrize(
    "changes, message",
    [
        # use_dora=True imports as ka.DoRA, which needs the magnitudes too.
        ({"use_dora": True}, r"lacks lora_A or lora_B or lora_magnitude_vector"),
        ({"bias": "all"}, r"bias='all' \(trained biases; supported: 'none'"),
        ({"modules_to_save": ["classifier"]}, r"modules_to_save=\['classifier'\]"),
        # Per-module ranks are imported: this one does not fit the tensors.
        ({"rank_pattern": {"query": 8}}, r"query: lora_A .* r=8 .*need \(8, 32\)"),
        ({"alpha_pattern": {"value": 0}}, r"invalid per-module setting: `alpha_pat"),
        ({"rank_pattern": {"(": 8}}, r"`rank_pattern` key is not a valid regular"),
        ({"init_lora_weights": "loftq"}, r"init_lora_weights='loftq'.*plain LoRA"),
        ({"lora_bias": True}, r"lora_bias=True"),
        ({"peft_type": "IA3"}, r"peft_type='IA3'.*only LoRA"),
        ({"brand_new_option": 3}, r"brand_new_option=3 \(a setting keras_adapters"),
        (
            {"target_modules": ["query", "position_embeddings"]},
            r"without a KerasHub BERT counterpart: \['position_embeddings'\].*"
            r"attention\.self\.query",
        ),
        ({"r": 8}, r"r=8.*need \(8, 32\) and \(32, 8\)"),
        ({"lora_alpha": 0}, r"invalid LoRA setting: `lora_alpha` must be a finite"),
        ({"lora_alpha": float("nan")}, r"adapter_config.json' holds NaN; every number"),
        ({"lora_alpha": float("-inf")}, r"holds -Infinity; every number must be"),
        (
            {"lora_alpha": "16"},
            r"`lora_alpha` must be a finite number > 0; received '16'",
        ),
        ({"r": "2"}, r"`r` must be a positive int; received '2'"),
        ({"r": 2.5}, r"`r` must be a positive int; received 2.5"),
        ({"r": None}, r"`r` must be a positive int; received None"),
        ({"lora_dropout": 1.5}, r"`lora_dropout` must be a finite number in \[0, 1\)"),
        ({"use_rslora": "yes"}, r"`use_rslora` must be a bool"),
        (
            {"auto_mapping": {"base_model_class": "LlamaForCausalLM"}},
            r"trained on a LlamaForCausalLM, the model is BERT",
        ),
    ],
)
def test_unsupported_adapter_configs_raise(bert, tmp_path, changes, message):
    snapshot = _snapshot(bert)
    path = _edited(tmp_path, "bert_lora", **changes)
    with pytest.raises(ValueError, match=message):
        interop.load_peft_adapter(bert, path)
    _assert_unchanged(bert, snapshot)


def _with_extra_tensor(tmp_path, key, shape):
    directory = tmp_path / "extra"
    shutil.copytree(os.path.join(DATA, "bert_lora"), directory)
    tensors = _read_tensors(directory)
    tensors[key] = np.ones(shape, np.float32)
    pytest.importorskip("safetensors.numpy").save_file(
        tensors, str(directory / "adapter_model.safetensors")
    )
    return directory


@pytest.mark.parametrize(
    "key, shape, message",
    [
        (
            "base_model.model.classifier.lora_A.weight",
            (4, 32),
            r"modules without a KerasHub BERT counterpart: \['classifier'\]",
        ),
        (
            "base_model.model.embeddings.word_embeddings.lora_embedding_A",
            (4, 100),
            # An embedding's factors (PEFT's names) without lora_embedding_B.
            r"lacks lora_A or lora_B for \['embeddings.word_embeddings'\]",
        ),
        (
            "base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector",
            (32,),
            r"DoRA magnitudes",
        ),
        (
            "base_model.model.encoder.layer.5.attention.self.query.lora_A.weight",
            (4, 32),
            r"lacks lora_A or lora_B",
        ),
    ],
)
def test_unsupported_adapter_tensors_raise(bert, tmp_path, key, shape, message):
    snapshot = _snapshot(bert)
    with pytest.raises(ValueError, match=message):
        interop.load_peft_adapter(bert, _with_extra_tensor(tmp_path, key, shape))
    _assert_unchanged(bert, snapshot)


def test_adapter_for_another_model_size_raises(tmp_path):
    small = keras_hub.models.BertBackbone(
        vocabulary_size=100,
        num_layers=1,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=64,
    )
    snapshot = _snapshot(small)
    with pytest.raises(ValueError, match=r"no layer 'transformer_layer_1/"):
        interop.load_peft_adapter(small, os.path.join(DATA, "bert_lora"))
    _assert_unchanged(small, snapshot)
    narrow = keras_hub.models.BertBackbone(
        vocabulary_size=100,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=64,
        max_sequence_length=64,
    )
    with pytest.raises(ValueError, match=r"2-D view 16x16\) need \(4, 16\)"):
        interop.load_peft_adapter(narrow, os.path.join(DATA, "bert_lora"))
    assert ka.adapted_layers(narrow) == []


def test_adapter_for_another_architecture_raises(bert):
    snapshot = _snapshot(bert)
    with pytest.raises(
        ValueError, match=r"without a KerasHub BERT counterpart.*q_proj"
    ):
        interop.load_peft_adapter(bert, os.path.join(DATA, "llama_lora"))
    _assert_unchanged(bert, snapshot)


def test_model_without_a_mapping_raises(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="proj")(inputs))
    with pytest.raises(ValueError, match=r"no module mapping.*Functional.*BERT"):
        interop.load_peft_adapter(model, os.path.join(DATA, "bert_lora"))
    ka.enable_adapter(model, ka.LoRA(rank=1), targets="proj")
    with pytest.raises(ValueError, match=r"no module mapping.*BertBackbone"):
        interop.save_peft_adapter(model, tmp_path / "out")


def test_missing_or_pickled_weights_raise(bert, tmp_path):
    with pytest.raises(FileNotFoundError, match="No PEFT adapter directory"):
        interop.load_peft_adapter(bert, tmp_path / "nowhere")
    directory = _edited(tmp_path, "bert_lora")
    os.rename(directory / "adapter_model.safetensors", directory / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model.bin.*only.*safetensors"):
        interop.load_peft_adapter(bert, directory)
    os.remove(directory / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="No adapter_model.safetensors"):
        interop.load_peft_adapter(bert, directory)
    (directory / "adapter_model.safetensors").write_bytes(b"\xff" * 12)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        interop.load_peft_adapter(bert, directory)
    assert ka.adapted_layers(bert) == []


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"peft_type": "LORA", "r": 2, "x": "\xff\xfe"}', "is not UTF-8 text"),
        (b'{"peft_type": "LORA", "r": 2', "is not valid JSON"),
        (b'["LORA"]', "does not hold a JSON object"),
    ],
)
def test_corrupted_adapter_config_raises(bert, tmp_path, content, message):
    snapshot = _snapshot(bert)
    directory = _edited(tmp_path, "bert_lora")
    (directory / "adapter_config.json").write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        interop.load_peft_adapter(bert, directory)
    assert str(directory / "adapter_config.json") in str(error.value)
    _assert_unchanged(bert, snapshot)


def test_non_finite_factors_raise(bert, tmp_path):
    snapshot = _snapshot(bert)
    directory = _edited(tmp_path, "bert_lora")
    tensors = _read_tensors(directory)
    key = sorted(tensors)[0]
    tensors[key] = np.full(tensors[key].shape, np.nan, np.float32)
    pytest.importorskip("safetensors.numpy").save_file(
        tensors, str(directory / "adapter_model.safetensors")
    )
    with pytest.raises(ValueError, match=r"holds NaN or infinite values"):
        interop.load_peft_adapter(bert, directory)
    _assert_unchanged(bert, snapshot)


def test_loading_twice_needs_a_new_name_and_then_adds_a_second_adapter():
    backbone = _backbone("bert")
    interop.load_peft_adapter(backbone, os.path.join(DATA, "bert_lora"))
    before = _lora_values(backbone)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        interop.load_peft_adapter(backbone, os.path.join(DATA, "bert_lora"))
    assert ka.adapter_names(backbone) == ["default"]
    interop.load_peft_adapter(backbone, os.path.join(DATA, "bert_lora"), name="second")
    assert ka.adapter_names(backbone) == ["default", "second"]
    after = _lora_values(backbone)
    assert sorted(after) == sorted(before)
    second = {
        layer.path: [
            keras.ops.convert_to_numpy(v)
            for v in ka.adapter_variables(backbone, "second")
            if v.path.startswith(layer.path + "/")
        ]
        for layer in ka.adapted_layers(backbone)
    }
    for path, (a, b) in before.items():
        np.testing.assert_array_equal(after[path][0], a)
        np.testing.assert_array_equal(after[path][1], b)
        np.testing.assert_array_equal(second[path][0], a)
        np.testing.assert_array_equal(second[path][1], b)


def test_export_errors(bert, tmp_path):
    with pytest.raises(ValueError, match="has no adapters"):
        interop.save_peft_adapter(bert, tmp_path / "a")
    backbone = _backbone("bert")
    ka.enable_adapter(backbone, ka.HUT(rank=2), name="hut")
    ka.enable_adapter(backbone, ka.QGOFT(), targets=ka.attention("key"), name="qgoft")
    with pytest.raises(ValueError, match="no adapter named 'default'.*'hut'"):
        interop.save_peft_adapter(backbone, tmp_path / "a")
    with pytest.raises(ValueError, match=r"'hut' .* is HUT.*only LoRA"):
        interop.save_peft_adapter(backbone, tmp_path / "a", name="hut")
    with pytest.raises(ValueError, match=r"'qgoft' .* is QGOFT.*only LoRA"):
        interop.save_peft_adapter(backbone, tmp_path / "a", name="qgoft")
    ka.enable_adapter(backbone, ka.LoRA(rank=2), ka.attention("attention_output"))
    with pytest.raises(ValueError, match="module_prefix"):
        interop.save_peft_adapter(backbone, tmp_path / "a", module_prefix="bert")
    with pytest.raises(ValueError, match="task_type"):
        interop.save_peft_adapter(backbone, tmp_path / "a", task_type="CLASSIFY")
    with pytest.raises(ValueError, match=r"task_type='SEQ_CLS'.*head's weights"):
        interop.save_peft_adapter(backbone, tmp_path / "a", task_type="SEQ_CLS")
    assert not os.path.exists(tmp_path / "a")


# Live: through real PyTorch and PEFT, when they are installed (they are not
# dependencies). `tests/data/make_peft_fixtures.py` lists the versions used.

LIVE_CASES = {
    # case: (checkpoint, Hugging Face class, Keras targets, LoRA)
    "bert_model": (
        "bert",
        "BertModel",
        ka.attention("query", "key", "value", "attention_output"),
        ka.LoRA(rank=3, alpha=6),
    ),
    "bert_classifier": (
        "bert",
        "BertForSequenceClassification",
        [r".*_dense", "pooled_dense"],
        ka.LoRA(rank=2, alpha=4, use_rslora=True),
    ),
    "llama_one_layer": (
        "llama",
        "LlamaForCausalLM",
        [r"transformer_layer_1/.*"],
        ka.LoRA(rank=4, alpha=8),
    ),
    "gemma": ("gemma", "GemmaForCausalLM", [r".*"], ka.LoRA(rank=2, alpha=3)),
}


@pytest.mark.parametrize("case", sorted(LIVE_CASES))
def test_live_export_loads_in_peft_with_the_same_outputs(case, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    kind, hf_class, targets, lora = LIVE_CASES[case]
    backbone = _backbone(kind)
    model = backbone
    if hf_class == "BertForSequenceClassification":
        model = keras_hub.models.BertTextClassifier(
            backbone=backbone, num_classes=2, preprocessor=None
        )
    ka.enable_adapter(model, lora, targets)
    rng = np.random.default_rng(1)
    for layer in ka.adapted_layers(model):
        layer.lora_a.assign(0.3 * rng.normal(size=layer.lora_a.shape))
        layer.lora_b.assign(0.3 * rng.normal(size=layer.lora_b.shape))
    expected = _outputs(backbone)["sequence_output"]
    path = str(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # The classifier head.
        ka.interop.save_peft_adapter(model, path)

    kwargs = {"num_labels": 2} if hf_class.endswith("Classification") else {}
    hf_model = getattr(transformers, hf_class).from_pretrained(
        os.path.join(DATA, kind), **kwargs
    )
    peft_model = peft.PeftModel.from_pretrained(hf_model, path).eval()
    lora_modules = {
        name
        for name, module in peft_model.base_model.model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    assert lora_modules == _saved_modules(path)
    body = peft_model.base_model.model
    body = getattr(body, "bert", None) or getattr(body, "model", None) or body
    with torch.no_grad():
        outputs = body(
            input_ids=torch.tensor(OUTPUTS["token_ids"], dtype=torch.long),
            attention_mask=torch.tensor(OUTPUTS["padding_mask"], dtype=torch.long),
        )
    actual = outputs.last_hidden_state.numpy()
    np.testing.assert_allclose(actual, expected, **TOLERANCE)
    base = OUTPUTS[f"{kind}/sequence_output"]
    assert np.abs(actual - base).max() > 0.1  # The adapter took effect.
