"""Per-layer rank and alpha: `rank_pattern` and `alpha_pattern`.

PEFT's matching rule (a key fullmatches the layer path or a `/`-separated
tail of it; the first matching key wins), validation, the report, adapter
files, LoRA and HUT, combining, and PEFT interop both ways.
"""

import json
import os

import keras
import keras_hub
import numpy as np
import pytest
from _fixtures import backend_independent
from cases import MODELS
from cases import max_relative_difference

import keras_adapters as ka
from keras_adapters import interop
from keras_adapters.adapters.base import pattern_key

CASE = MODELS["bert"]
PEFT_DATA = os.path.join(os.path.dirname(__file__), "data", "peft")
QUERY = "transformer_layer_0/self_attention_layer/query"


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


@backend_independent
@pytest.mark.parametrize(
    "key, matches",
    [
        ("query", True),  # the layer's name: a tail
        ("self_attention_layer/query", True),
        (QUERY, True),  # the whole path
        ("transformer_layer_0/.*", True),
        ("transformer_layer_.*/query", True),
        ("quer", False),  # no partial names
        ("ransformer_layer_0/.*", False),  # tails start at a '/'
        ("transformer_layer_1/.*", False),
    ],
)
def test_keys_match_the_path_or_a_tail_like_peft(key, matches):
    assert (pattern_key({key: 1}, QUERY) == key) is matches
    # The same rule PEFT applies to module names, with '.' for '/'.
    peft_key = key.replace("/", r"\.")
    assert (
        interop._peft_pattern_key({peft_key: 1}, QUERY.replace("/", ".")) is not None
    ) is matches


@backend_independent
def test_first_matching_key_wins_and_alpha_follows_its_own_pattern():
    lora = ka.LoRA(
        rank=4,
        alpha=8,
        rank_pattern={"transformer_layer_0/.*": 2, "query": 6},
        alpha_pattern={"value": 3},
    )
    assert (lora.for_layer(QUERY).rank, lora.for_layer(QUERY).alpha) == (2, 8)
    layer_1 = lora.for_layer("transformer_layer_1/self_attention_layer/query")
    assert (layer_1.rank, layer_1.alpha, layer_1.rank_pattern) == (6, 8, {})
    value = lora.for_layer("transformer_layer_1/self_attention_layer/value")
    assert (value.rank, value.alpha, value.scale) == (4, 3, 0.75)
    # alpha=None: each layer's alpha is its rank (scale 1).
    assert ka.LoRA(rank=4, rank_pattern={"query": 2}).for_layer(QUERY).scale == 1.0
    assert ka.LoRA(rank=4).for_layer(QUERY) == ka.LoRA(rank=4)


@backend_independent
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"rank_pattern": {"query": 0}},
            r"`rank_pattern\['query'\]` must be a positive int; received 0",
        ),
        ({"rank_pattern": {"query": 2.5}}, r"positive int; received 2.5"),
        (
            {"rank_pattern": {"(query": 2}},
            r"`rank_pattern` key '\(query' is not a valid regular",
        ),
        ({"rank_pattern": {"": 2}}, r"keys must be non-empty regex strings"),
        ({"rank_pattern": ["query"]}, r"`rank_pattern` must be a dict"),
        (
            {"alpha_pattern": {"value": -1}},
            r"`alpha_pattern\['value'\]` must be a positive number",
        ),
        ({"alpha_pattern": {"value": float("nan")}}, r"positive number; received nan"),
    ],
)
def test_bad_patterns_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ka.LoRA(rank=2, **kwargs)
    with pytest.raises(ValueError, match=message):
        ka.HUT(rank=2, **kwargs)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    model = CASE.build(0)
    base_weights = model.get_weights()
    lora = ka.LoRA(
        rank=2,
        alpha=4,
        rank_pattern={"value": 4},
        alpha_pattern={"transformer_layer_1/.*": 2},
    )
    report = ka.enable_adapter(model, lora, targets=ka.attention("query", "value"))
    rng = np.random.default_rng(0)
    for variable in ka.adapter_variables(model):
        variable.assign(rng.normal(scale=0.1, size=variable.shape))
    path = str(tmp_path_factory.mktemp("patterns") / "a.weights.h5")
    ka.save_adapter_weights(model, path)
    return dict(
        model=model,
        base_weights=base_weights,
        report=report,
        path=path,
        lora=lora,
        outputs=_numpy(model(CASE.x)),
    )


def test_each_layer_gets_its_rank_and_the_report_shows_it(adapted):
    model, report = adapted["model"], adapted["report"]
    for layer in ka.adapted_layers(model):
        rank = 4 if layer.name == "value" else 2
        assert layer.lora_a.shape[-1] == rank and layer.lora_b.shape[0] == rank
    lines = str(report).splitlines()
    assert lines[1].split()[-2:] == ["rank", "alpha"]
    rows = {line.split()[0]: line.split()[-2:] for line in lines[2:6]}
    assert rows["transformer_layer_0/self_attention_layer/value"] == ["4", "4"]
    assert rows["transformer_layer_1/self_attention_layer/query"] == ["2", "2"]
    assert report.adapter_params == sum(
        int(np.prod(v.shape)) for v in ka.adapter_variables(model)
    )


def test_layer_outputs_use_each_layers_scale(adapted):
    (value,) = [
        layer
        for layer in ka.adapted_layers(adapted["model"])
        if layer.path == "transformer_layer_1/self_attention_layer/value"
    ]
    slot = ka.layers.slots(value)["default"]
    assert slot.adapter.scale == 0.5  # alpha 2 (pattern) / rank 4 (pattern)
    x = np.random.default_rng(1).normal(size=(2, 3, 16)).astype("float32")
    w = _numpy(value._kernel).reshape(16, 16).astype("float64")
    a, b = (
        _numpy(value.lora_a).astype("float64"),
        _numpy(value.lora_b).astype("float64"),
    )
    want = (x @ (w + 0.5 * a @ b)).reshape(2, 3, 2, 8) + _numpy(value.bias)
    np.testing.assert_allclose(_numpy(value(x)), want, rtol=1e-5, atol=1e-5)


def test_file_round_trip_into_a_fresh_model(adapted):
    fresh = CASE.build(1)
    fresh.set_weights(adapted["base_weights"])
    ka.load_adapter_weights(fresh, adapted["path"])
    assert ka.model.adapter_groups(fresh)[0].adapter == adapted["lora"]
    np.testing.assert_allclose(
        _numpy(fresh(CASE.x)), adapted["outputs"], rtol=1e-6, atol=1e-6
    )


@backend_independent
@pytest.mark.parametrize("method", [ka.HUT, ka.DoRA])
def test_hut_and_dora_take_patterns_too(method):
    model = CASE.build(0)
    ka.enable_adapter(
        model,
        method(rank=2, rank_pattern={"query": 3}),
        targets=ka.attention("query", "value"),
    )
    factor = method.factor_names[0]
    shapes = {
        layer.name: tuple(getattr(layer, factor).shape)
        for layer in ka.adapted_layers(model)
    }
    assert shapes == {"query": (16, 3), "value": (16, 2)}


@backend_independent
def test_combining_pads_the_smaller_ranks(adapted):
    model = CASE.build(0)
    model.set_weights(adapted["base_weights"])
    ka.load_adapter_weights(model, adapted["path"])
    expected = {layer.path: _numpy(layer.kernel) for layer in ka.adapted_layers(model)}
    ka.combine_adapters(model, {"default": 1.0}, name="copy")
    ka.set_active_adapters(model, ["copy"])
    for layer in ka.adapted_layers(model):
        assert getattr(layer, "lora_a.copy").shape[-1] == 4  # max rank, padded
        np.testing.assert_allclose(
            _numpy(layer.kernel), expected[layer.path], atol=1e-6
        )


# ------------------------------------------------------------------ PEFT


@backend_independent
@pytest.mark.parametrize("method", [ka.LoRA, ka.DoRA])
def test_peft_round_trip_carries_the_patterns(method, tmp_path):
    def backbone():
        return keras_hub.models.BertBackbone.from_preset(
            os.path.join(PEFT_DATA, "bert")
        )

    inputs = {
        "token_ids": np.array([[2, 5, 7, 9, 3]], "int32"),
        "segment_ids": np.zeros((1, 5), "int32"),
        "padding_mask": np.ones((1, 5), "int32"),
    }
    model = backbone()
    lora = method(
        rank=2,
        alpha=4,
        rank_pattern={"value": 4},
        alpha_pattern={"transformer_layer_0/.*": 8},
    )
    ka.enable_adapter(model, lora)
    rng = np.random.default_rng(0)
    for variable in ka.adapter_variables(model):
        variable.assign(rng.normal(scale=0.05, size=variable.shape))
    expected = _numpy(model(inputs)["sequence_output"])
    interop.save_peft_adapter(model, tmp_path / "peft")
    with open(tmp_path / "peft" / "adapter_config.json") as f:
        config = json.load(f)
    assert (config["r"], config["lora_alpha"]) == (2, 4)
    # PEFT module names for the layers whose rank or alpha differ.
    assert config["rank_pattern"] == {
        "encoder.layer.0.attention.self.value": 4,
        "encoder.layer.1.attention.self.value": 4,
    }
    assert config["alpha_pattern"] == {
        "encoder.layer.0.attention.self.query": 8,
        "encoder.layer.0.attention.self.value": 8,
    }
    fresh = backbone()
    ka.interop.load_peft_adapter(fresh, tmp_path / "peft")
    got = _numpy(fresh(inputs)["sequence_output"])
    assert max_relative_difference(got, expected) <= 1e-5
    shapes = {
        layer.path: tuple(layer.lora_a.shape) for layer in ka.adapted_layers(fresh)
    }
    assert shapes["transformer_layer_1/self_attention_layer/value"] == (
        fresh.hidden_dim,
        4,
    )
    assert {type(g.adapter) for g in ka.model.adapter_groups(fresh)} == {method}
