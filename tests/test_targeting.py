"""Targets: attention roles per architecture, names, regexes, callables."""

import keras
import keras_hub
import pytest
from _fixtures import backend_independent
from cases import MODELS

import keras_adapters as ka
from keras_adapters import targeting

ATTENTION_PARENTS = {
    "bert": "transformer_layer_{i}/self_attention_layer",
    "gpt2": "transformer_layer_{i}/self_attention",
    "gemma": "decoder_block_{i}/attention",
    "llama": "transformer_layer_{i}/self_attention",
}


def _paths(model, targets):
    root = model.backbone if hasattr(model, "backbone") else model
    return [layer.path for layer, _ in targeting.resolve_targets(root, targets)]


@pytest.fixture(scope="module")
def built():
    """`built(model_id)`: one model per architecture for the module, read only
    (resolving targets does not change a model)."""
    models = {}

    def get(model_id):
        if model_id not in models:
            models[model_id] = MODELS[model_id].build(0)
        return models[model_id]

    return get


# Resolving targets reads the structure of a model (layer classes, names,
# paths), the same under every backend.
@backend_independent
@pytest.mark.parametrize("model_id", sorted(ATTENTION_PARENTS))
@pytest.mark.parametrize(
    "roles", [("query",), ("query", "value"), ("key", "attention_output"), ()]
)
def test_attention_roles_resolve_on_every_architecture(model_id, roles, built):
    model = built(model_id)
    parent = ATTENTION_PARENTS[model_id]
    expected_roles = roles or targeting.ATTENTION_ROLES
    found = _paths(model, ka.attention(*roles))
    expected = sorted(
        f"{parent.format(i=i)}/{role}" for i in range(2) for role in expected_roles
    )
    assert sorted(found) == expected


@backend_independent
def test_names_regexes_callables_and_lists(built):
    model = built("bert")
    assert _paths(model, "pooled_dense") == ["pooled_dense"]
    assert sorted(_paths(model, r"transformer_layer_1/.*/(query|key)")) == [
        "transformer_layer_1/self_attention_layer/key",
        "transformer_layer_1/self_attention_layer/query",
    ]
    # fullmatch: a partial match of the path is not a match.
    with pytest.raises(ValueError, match="matches no layer"):
        _paths(model, "transformer_layer_1/self_attention_layer/quer")
    dense_ffn = _paths(
        model, lambda layer: layer.name == "feedforward_intermediate_dense"
    )
    assert dense_ffn == [
        "transformer_layer_0/feedforward_intermediate_dense",
        "transformer_layer_1/feedforward_intermediate_dense",
    ]
    combined = _paths(model, [ka.attention("value"), "pooled_dense"])
    assert sorted(combined) == [
        "pooled_dense",
        "transformer_layer_0/self_attention_layer/value",
        "transformer_layer_1/self_attention_layer/value",
    ]
    # A layer matched by two targets is listed once.
    assert len(_paths(model, ["pooled_dense", "pooled_dense"])) == 1


@backend_independent
def test_name_that_is_not_an_attention_sublayer_has_no_role():
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(4, name="query")(inputs)
    model = keras.Model(inputs, outputs)
    with pytest.raises(ValueError, match="attention"):
        _paths(model, ka.attention("query"))
    assert _paths(model, "query") == ["query"]


@backend_independent
def test_keras_hub_methods_are_installed_without_replacing_native_ones():
    for cls in (keras_hub.models.Backbone, keras_hub.models.Task):
        assert cls.enable_adapter is ka.enable_adapter
        assert cls.merge_adapters is ka.merge_adapters
        assert cls.save_adapter_weights is ka.save_adapter_weights
        assert cls.load_adapter_weights is ka.load_adapter_weights
    # KerasHub's own LoRA methods stay KerasHub's.
    assert keras_hub.models.Backbone.enable_lora.__module__.startswith("keras_hub")
    assert keras_hub.models.Backbone.save_lora_weights.__module__.startswith(
        "keras_hub"
    )


def test_method_form_on_backbone_and_task():
    task = MODELS["bert"].build(0)
    report = task.enable_adapter(ka.LoRA(rank=2))
    # Default targets: query and value; a Task adapts its backbone, keeps its head.
    assert [p.rsplit("/", 1)[1] for p in report.adapted_paths] == [
        "query",
        "value",
        "query",
        "value",
    ]
    head = {v.path for v in task.trainable_weights} - {
        v.path for v in ka.adapter_variables(task)
    }
    assert head == {"logits/kernel", "logits/bias"}
    backbone = MODELS["gpt2"].build(0).backbone
    report = backbone.enable_adapter(ka.LoRA(rank=2), targets=ka.attention("key"))
    assert {v.path for v in backbone.trainable_weights} == {
        f"transformer_layer_{i}/self_attention/key/lora_{ab}"
        for i in range(2)
        for ab in "ab"
    }
