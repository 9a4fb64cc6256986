"""Attention roles on every supported KerasHub architecture; `attention_full`.

Each architecture is built from a tiny config (no download). The tests pin
three things per architecture: `ka.attention(role)` finds the projection of
each role; `ka.role(...)` (which reads variable paths) agrees with it; and
`ka.attention_full` plus `ka.optimizers.attention_lr` give the chosen
kernels their rates.
"""

import keras
import keras_hub
import numpy as np
import pytest
from _fixtures import backend_independent
from cases import MODELS

import keras_adapters as ka
from keras_adapters import _keras_internals as internals
from keras_adapters import optimizers as kopt
from keras_adapters import targeting

M = keras_hub.models
V = 64
ENCODER = dict(
    vocabulary_size=V,
    num_layers=1,
    num_heads=2,
    hidden_dim=16,
    intermediate_dim=32,
    max_sequence_length=8,
)
DECODER = dict(
    vocabulary_size=V,
    num_layers=1,
    num_query_heads=4,
    num_key_value_heads=2,
    hidden_dim=16,
    intermediate_dim=32,
)
KERAS_NAMES = ("query", "key", "value", "attention_output")
DENSE_NAMES = ("query_dense", "key_dense", "value_dense", "output_dense")


def _smollm3():
    return M.SmolLM3Backbone(
        vocabulary_size=V,
        hidden_dim=16,
        intermediate_dim=32,
        num_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=False,
        attention_dropout=0.0,
        rope_layer_enabled_list=[True],
        layer_types=["attention"],
        mlp_bias=False,
        layer_norm_epsilon=1e-6,
        max_position_embeddings=16,
        rope_theta=10000.0,
        partial_rotary_factor=1.0,
    )


def _pali_gemma_vit():
    from keras_hub.src.models.pali_gemma.pali_gemma_vit import PaliGemmaVit

    return PaliGemmaVit(
        image_size=16,
        patch_size=8,
        num_heads=2,
        hidden_dim=16,
        num_layers=1,
        intermediate_dim=32,
        num_classes=2,
    )


# id -> (builder, sublayer names of query, key, value, attention_output).
ARCHITECTURES = {
    "bert": (lambda: M.BertBackbone(**ENCODER), KERAS_NAMES),
    "roberta": (lambda: M.RobertaBackbone(**ENCODER), KERAS_NAMES),
    "distil_bert": (lambda: M.DistilBertBackbone(**ENCODER), KERAS_NAMES),
    "gpt2": (lambda: M.GPT2Backbone(**ENCODER), KERAS_NAMES),
    "gemma": (lambda: M.GemmaBackbone(**DECODER, head_dim=8), KERAS_NAMES),
    "llama": (lambda: M.LlamaBackbone(**DECODER), KERAS_NAMES),
    "mistral": (lambda: M.MistralBackbone(**DECODER), KERAS_NAMES),
    "qwen": (lambda: M.QwenBackbone(**DECODER), KERAS_NAMES),
    "qwen3": (lambda: M.Qwen3Backbone(**DECODER, head_dim=8), KERAS_NAMES),
    "phi3": (lambda: M.Phi3Backbone(**DECODER), KERAS_NAMES),
    "bloom": (
        lambda: M.BloomBackbone(
            vocabulary_size=V,
            num_layers=1,
            num_heads=2,
            hidden_dim=16,
            intermediate_dim=32,
        ),
        DENSE_NAMES,
    ),
    "falcon": (
        lambda: M.FalconBackbone(
            vocabulary_size=V,
            num_layers=1,
            num_attention_heads=2,
            hidden_dim=16,
            intermediate_dim=32,
        ),
        DENSE_NAMES,
    ),
    "smollm3": (_smollm3, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "pali_gemma_vit": (
        _pali_gemma_vit,
        ("query_proj", "key_proj", "value_proj", "out_proj"),
    ),
}

# Layers whose variable paths do not name their attention block. KerasHub's
# SmolLM3Attention creates `o_proj` outside its own name scope, so its
# variables are `o_proj/kernel` in every layer: `ka.attention(...)` finds it,
# `ka.role(...)` (by path) cannot.
PATHLESS = {("smollm3", "o_proj")}


def _own_weights(layer):
    below = {id(v) for sub in layer._layers for v in sub.weights}
    return [v for v in layer.weights if id(v) not in below]


# Which layer has which role, which paths, which trainable flags and which
# multipliers: the structure of the models, the same under every backend.
@backend_independent
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_roles_resolve_on_every_architecture(arch):
    build, names = ARCHITECTURES[arch]
    model = build()
    for role, name in zip(targeting.ATTENTION_ROLES, names, strict=True):
        hits = targeting.resolve_targets(model, ka.attention(role))
        assert [layer.name for layer, _ in hits] == [name], role

    # `ka.role` (variable paths) agrees with `ka.attention` (layers).
    checked = 0
    for layer, parent in internals.layers_with_parents(model):
        expected = targeting.attention_role(layer, parent)
        if (arch, layer.name) in PATHLESS:
            assert expected is not None
            expected = None
        for variable in _own_weights(layer):
            assert kopt.variable_role(variable.path) == expected, variable.path
            checked += expected is not None
    assert checked >= 3

    # Full fine-tuning of query and value, with eta_V = 4 eta_Q.
    report = ka.attention_full(model, roles=("query", "value"))
    trainable = model.trainable_variables
    assert {why for *_, why in report.trainable} == {"query", "value"}
    assert {v.path.split("/")[-2] for v in trainable} == {names[0], names[2]}
    assert {v.path.split("/")[-1] for v in trainable} <= {"kernel", "bias"}
    optimizer = kopt.attention_lr(keras.optimizers.SGD(0.1), value_ratio=4)
    optimizer.build(trainable)
    assert [optimizer.multiplier(v) for v in trainable] == [
        4.0 if v.path.split("/")[-2] == names[2] else 1.0 for v in trainable
    ]


@backend_independent
def test_fused_qkv_has_no_role():
    # GPT-NeoX fuses Q, K and V into one `query_key_value` kernel.
    model = M.GPTNeoXBackbone(**ENCODER)
    with pytest.raises(ValueError, match="query_key_value"):
        targeting.resolve_targets(model, ka.attention("query"))
    hits = targeting.resolve_targets(model, ka.attention("attention_output"))
    assert [layer.name for layer, _ in hits] == ["attention_output"]


# attention_full on the tiny BERT classifier of the shared cases.


def _paths(report):
    return set(report.trainable_paths)


def _qv(layers=2, bias=True):
    names = ("kernel", "bias") if bias else ("kernel",)
    return {
        f"transformer_layer_{i}/self_attention_layer/{role}/{name}"
        for i in range(layers)
        for role in ("query", "value")
        for name in names
    }


def test_attention_full_on_a_task_trains_the_kernels_biases_and_head():
    case = MODELS["bert"]
    model = case.build(0)
    report = ka.attention_full(model)
    head = {"logits/kernel", "logits/bias"}
    assert _paths(report) == _qv() | head
    assert {v.path for v in model.trainable_variables} == _qv() | head
    assert report.roles == ("query", "value")
    assert report.trainable_params == sum(
        int(np.prod(v.shape)) for v in model.trainable_variables
    )
    assert "query" in str(report) and "trainable" in str(report)

    before = {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}
    model.compile(
        optimizer=kopt.attention_lr(keras.optimizers.AdamW(1e-3), value_ratio=4),
        loss=case.loss,
        jit_compile=True,
    )
    model.fit(case.x, case.y, epochs=1, batch_size=16, verbose=0)
    after = {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed == _qv() | head


@backend_independent
def test_attention_full_options():
    case = MODELS["bert"]
    model = case.build(0)
    report = ka.attention_full(model, roles="value", train_bias=False)
    assert _paths(report) == {
        "transformer_layer_0/self_attention_layer/value/kernel",
        "transformer_layer_1/self_attention_layer/value/kernel",
        "logits/kernel",
        "logits/bias",
    }
    # Calling it again replaces the previous choice.
    report = ka.attention_full(
        model, roles=("query", "value"), keep_trainable="pooled_dense"
    )
    pooler = {"pooled_dense/kernel", "pooled_dense/bias"}
    assert _paths(report) == _qv() | pooler | {"logits/kernel", "logits/bias"}
    assert dict((p, w) for p, *_, w in report.trainable)["pooled_dense/kernel"] == (
        "keep_trainable"
    )
    # A backbone alone has no head.
    backbone = case.build(0).backbone
    assert _paths(ka.attention_full(backbone)) == _qv()


@pytest.fixture(scope="module")
def _bert_once():
    return MODELS["bert"].build(0)


@pytest.fixture
def bert(_bert_once):
    """One BERT for the module; its trainable flags are put back after each test."""
    flags = [v.trainable for v in _bert_once.weights]
    yield _bert_once
    for variable, flag in zip(_bert_once.weights, flags, strict=True):
        variable.trainable = flag


@backend_independent
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"roles": ()}, "non-empty tuple of attention roles"),
        ({"roles": ("query", "W_v")}, "Unknown attention role 'W_v'"),
        ({"roles": 3}, "non-empty tuple"),
        ({"train_bias": "yes"}, "`train_bias` must be a bool"),
        ({"keep_trainable": "no_such_layer"}, "matches no layer"),
    ],
)
def test_attention_full_bad_arguments(kwargs, match, bert):
    model = bert
    flags = [v.trainable for v in model.weights]
    with pytest.raises(ValueError, match=match):
        ka.attention_full(model, **kwargs)
    assert [v.trainable for v in model.weights] == flags  # unchanged


@backend_independent
def test_attention_full_bad_models():
    with pytest.raises(ValueError, match="Expected a Keras model"):
        ka.attention_full("bert")
    model = MODELS["bert"].build(0)
    ka.enable_adapter(model, ka.LoRA(rank=2))
    with pytest.raises(ValueError, match="has adapters"):
        ka.attention_full(model)
    inputs = keras.Input((4,))
    plain = keras.Model(inputs, keras.layers.Dense(2, name="value")(inputs))
    with pytest.raises(ValueError, match=r"matches no layer.*Candidate layers"):
        ka.attention_full(plain)
