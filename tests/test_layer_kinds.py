"""Embeddings, convolutions and MLP roles, against NumPy and by name.

The shared matrix (`matrix.py`, models "vit" and "tied_lm") runs every
invariant on these layer kinds for every method; this file checks what the
matrix does not: the math of each kind against formulas written out here in
NumPy (PEFT's embedding and conv LoRA), which calls train adapter dropout,
that LoRA on a lookup never builds the table, which methods refuse which
kinds, `ka.mlp(...)` on every KerasHub architecture `ka.attention(...)`
covers, the `ka.adaptable_layers` report, and PEFT's embedding LoRA
(fixtures written by `tests/data/make_peft_fixtures.py --embeddings`).
"""

import os
import shutil
import warnings

import keras
import keras_hub
import numpy as np
import pytest
import safetensors.numpy
from _fixtures import backend_independent
from test_attention_roles import ARCHITECTURES

import keras_adapters as ka
from keras_adapters import _keras_internals as internals
from keras_adapters.kernels import SUPPORTED_LAYERS

RNG = np.random.default_rng(0)


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x), "float64")


def _randomize(model, scale=0.3):
    """Moves every adapter variable away from its identity initialization."""
    rng = np.random.default_rng(1)
    for variable in ka.adapter_variables(model):
        noise = rng.normal(scale=scale, size=variable.shape)
        variable.assign(_numpy(variable) + noise)


# ------------------------------------------------------------------ embeddings


@pytest.fixture(scope="module")
def tied():
    """A tied ReversibleEmbedding (vocab 40, dim 6) with LoRA, randomized."""
    keras.utils.set_random_seed(0)
    token_ids = keras.Input((5,), dtype="int32")
    embedding = keras_hub.layers.ReversibleEmbedding(40, 6, name="embed")
    logits = embedding(embedding(token_ids), reverse=True)
    model = keras.Model(token_ids, logits)
    table = _numpy(embedding.embeddings)
    ka.enable_adapter(model, ka.LoRA(rank=3, alpha=6), targets="embed")
    _randomize(model)
    return model, embedding, table


def test_embedding_lora_is_a_gather_of_a_rows_times_b(tied):
    model, embedding, table = tied
    a, b = _numpy(embedding.lora_a), _numpy(embedding.lora_b)
    ids = RNG.integers(0, 40, (3, 5))
    # PEFT's Embedding: W[ids] + s (A^T[ids]) B^T with its lora_embedding_A
    # (r, vocab) = our A^T and lora_embedding_B (dim, r) = our B^T.
    expected = table[ids] + 2.0 * (a[ids] @ b)
    np.testing.assert_allclose(_numpy(embedding(ids)), expected, atol=1e-5)


def test_tied_output_projection_uses_the_adapted_table(tied):
    model, embedding, table = tied
    a, b = _numpy(embedding.lora_a), _numpy(embedding.lora_b)
    ids = RNG.integers(0, 40, (3, 5))
    adapted = table + 2.0 * a @ b
    expected = adapted[ids] @ adapted.T
    np.testing.assert_allclose(_numpy(model(ids)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="reads a jaxpr")
def test_embedding_lora_never_builds_the_table(tied):
    """No (vocab, dim) value is computed in the lookup or the reverse
    projection: the only one is the frozen table itself."""
    import jax

    _, embedding, _ = tied
    ids = np.zeros((2, 5), "int32")
    hidden = np.zeros((2, 5, 6), "float32")
    for call, x in [
        (lambda x: embedding(x), ids),
        (lambda x: embedding(x, reverse=True), hidden),
    ]:
        jaxpr = jax.make_jaxpr(call)(x)
        shapes = [
            tuple(v.aval.shape)
            for eqn in jaxpr.jaxpr.eqns
            for v in eqn.outvars
            if eqn.primitive.name not in ("transpose", "convert_element_type")
        ]
        assert (40, 6) not in shapes, jaxpr


def test_untied_reverse_projection_is_left_alone():
    keras.utils.set_random_seed(0)
    embedding = keras_hub.layers.ReversibleEmbedding(
        20, 4, tie_weights=False, name="embed"
    )
    token_ids = keras.Input((3,), dtype="int32")
    model = keras.Model(token_ids, embedding(embedding(token_ids), reverse=True))
    hidden = RNG.normal(size=(2, 3, 4)).astype("float32")
    before = _numpy(embedding(hidden, reverse=True))
    ka.enable_adapter(model, ka.DoRA(rank=2), targets="embed")
    _randomize(model)
    np.testing.assert_array_equal(_numpy(embedding(hidden, reverse=True)), before)


@backend_independent
def test_orthogonal_methods_refuse_embeddings_by_name():
    keras.utils.set_random_seed(0)
    token_ids = keras.Input((3,), dtype="int32")
    model = keras.Model(
        token_ids, keras.layers.Embedding(10, 4, name="embed")(token_ids)
    )
    for adapter in (ka.QGOFT(), ka.GOFT()):
        with pytest.raises(ValueError, match="embedding layer, which .*GOFT"):
            ka.enable_adapter(model, adapter, targets="embed")
        assert ka.adapted_layers(model) == []


# ---------------------------------------------------------------- convolutions


def _numpy_conv2d(x, kernel, stride):
    """`valid` 2-D convolution (channels last), written out: every output
    position is its input patch flattened times the kernel's patch matrix."""
    kh, kw, cin, cout = kernel.shape
    n, h, w, _ = x.shape
    out_h, out_w = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.zeros((n, out_h, out_w, cout))
    matrix = kernel.reshape(kh * kw * cin, cout)
    for i in range(out_h):
        for j in range(out_w):
            patch = x[:, i * stride : i * stride + kh, j * stride : j * stride + kw]
            out[:, i, j] = patch.reshape(n, -1) @ matrix
    return out


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_conv2d_adapters_match_peft_formula_in_numpy(method):
    """PEFT's conv LoRA: a k x k convolution to rank r, then a 1 x 1
    convolution, scaled; DoRA scales each output channel by m / ||V||_c."""
    keras.utils.set_random_seed(0)
    images = keras.Input((7, 7, 3))
    conv = keras.layers.Conv2D(5, 3, strides=2, activation="relu", name="conv")
    model = keras.Model(images, conv(images))
    kernel = _numpy(conv.kernel)
    adapter = ka.LoRA(rank=2, alpha=3) if method == "lora" else ka.DoRA(rank=2)
    ka.enable_adapter(model, adapter, targets="conv")
    _randomize(model)
    x = RNG.normal(size=(2, 7, 7, 3))
    a, b = _numpy(conv.lora_a), _numpy(conv.lora_b)
    s = adapter.scale
    base = _numpy_conv2d(x, kernel, 2)
    # conv(x, A as a (3, 3, 3, r) kernel), then B as a 1 x 1 convolution.
    low_rank = _numpy_conv2d(x, a.reshape(3, 3, 3, 2), 2) @ b * s
    if method == "lora":
        outputs = base + low_rank
    else:
        direction = kernel.reshape(27, 5) + s * a @ b
        scale = _numpy(conv.lora_magnitude) / np.linalg.norm(direction, axis=0)
        outputs = (base + low_rank) * scale
    expected = np.maximum(outputs + _numpy(conv.bias), 0.0)
    got = _numpy(model(x.astype("float32")))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_conv_trains_adapter_dropout_and_lookups_do_not():
    """Keras passes `training` to an adapted Conv2D (its own `call` has no
    such argument), so LoRA's dropout applies; an embedding's ids get none."""
    keras.utils.set_random_seed(0)
    images = keras.Input((4, 4, 2))
    model = keras.Model(images, keras.layers.Conv2D(3, 2, name="conv")(images))
    ka.enable_adapter(model, ka.LoRA(rank=2, dropout=0.5), targets="conv")
    _randomize(model)
    x = RNG.normal(size=(2, 4, 4, 2)).astype("float32")
    assert not np.allclose(_numpy(model(x, training=True)), _numpy(model(x)))
    ka.merge_adapters(model)
    assert model.get_layer("conv")._call_has_context_arg["training"] is False

    token_ids = keras.Input((3,), dtype="int32")
    lookup = keras.Model(
        token_ids, keras.layers.Embedding(10, 4, name="embed")(token_ids)
    )
    ka.enable_adapter(lookup, ka.LoRA(rank=2, dropout=0.5), targets="embed")
    _randomize(lookup)
    ids = RNG.integers(0, 10, (2, 3))
    np.testing.assert_array_equal(
        _numpy(lookup(ids, training=True)), _numpy(lookup(ids))
    )


@backend_independent
def test_unsupported_convolutions_are_skipped_with_the_reason():
    images = keras.Input((6, 6, 4))
    grouped = keras.layers.Conv2D(4, 3, groups=2, name="grouped")(images)
    depthwise = keras.layers.DepthwiseConv2D(3, name="depthwise")(grouped)
    plain = keras.layers.Conv2D(2, 1, name="plain")(depthwise)
    model = keras.Model(images, plain)
    report = ka.enable_adapter(
        model, ka.LoRA(rank=1), targets=["grouped", "depthwise", "plain"]
    )
    assert report.adapted_paths == ["plain"]
    reasons = dict(report.skipped)
    assert "groups=2" in reasons["grouped"]
    assert "DepthwiseConv2D" in reasons["depthwise"]


# ------------------------------------------------------------------- MLP roles

# Sublayer names of the gate, up and down projections, written out per
# architecture (None: the architecture has no such projection).
MLP_NAMES = {
    "bert": (None, "feedforward_intermediate_dense", "feedforward_output_dense"),
    "roberta": (None, "feedforward_intermediate_dense", "feedforward_output_dense"),
    "distil_bert": (
        None,
        "feedforward_intermediate_dense",
        "feedforward_output_dense",
    ),
    "gpt2": (None, "feedforward_intermediate_dense", "feedforward_output_dense"),
    "gemma": ("ffw_gating", "ffw_gating_2", "ffw_linear"),
    "bloom": (None, "mlp_intermediate_dense", "mlp_output_dense"),
    "falcon": (None, "dense_h_to_4h", "dense_4h_to_h"),
    "smollm3": ("gate_proj", "up_proj", "down_proj"),
    "pali_gemma_vit": (None, "mlp_dense_1", "mlp_dense_2"),
}
LLAMA_LIKE = (
    "feedforward_gate_dense",
    "feedforward_intermediate_dense",
    "feedforward_output_dense",
)
for _name in ("llama", "mistral", "qwen", "qwen3", "phi3"):
    MLP_NAMES[_name] = LLAMA_LIKE


def _vit_backbone():
    return keras_hub.models.ViTBackbone(
        image_shape=(8, 8, 3),
        patch_size=4,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
    )


MLP_ARCHITECTURES = {
    **{name: build for name, (build, _) in ARCHITECTURES.items()},
    "vit": _vit_backbone,
}
MLP_NAMES["vit"] = (None, "dense_1", "dense_2")


def test_every_architecture_has_an_mlp_table():
    assert set(MLP_ARCHITECTURES) == set(MLP_NAMES)


@backend_independent
@pytest.mark.parametrize("architecture", sorted(MLP_ARCHITECTURES))
def test_mlp_roles_find_each_projection(architecture):
    backbone = MLP_ARCHITECTURES[architecture]()
    for role, name in zip(("gate", "up", "down"), MLP_NAMES[architecture], strict=True):
        if name is None:
            with pytest.raises(ValueError, match=rf"mlp\('{role}',\) matches no"):
                ka.targeting.resolve_targets(backbone, ka.mlp(role))
            continue
        hits = ka.targeting.resolve_targets(backbone, ka.mlp(role))
        assert {layer.name for layer, _ in hits} == {name}, architecture
        assert all(isinstance(layer, SUPPORTED_LAYERS) for layer, _ in hits)
    # Attention and MLP roles never overlap.
    attention = {
        id(layer)
        for layer, _ in ka.targeting.resolve_targets(
            backbone, ka.attention("attention_output")
        )
    }
    assert not attention & {
        id(layer) for layer, _ in ka.targeting.resolve_targets(backbone, ka.mlp())
    }


@backend_independent
def test_mlp_rejects_unknown_roles():
    with pytest.raises(ValueError, match=r"Unknown MLP role 'query'.*\['gate'"):
        ka.mlp("query")
    with pytest.raises(ValueError, match=r"Unknown MLP role \['up'\]"):
        ka.mlp(["up"], "down")


# ------------------------------------------------------------ the report


@backend_independent
def test_adaptable_layers_lists_kinds_roles_and_methods():
    keras.utils.set_random_seed(0)
    classifier = keras_hub.models.ViTImageClassifier(
        backbone=_vit_backbone(), num_classes=3, preprocessor=None
    )
    report = ka.adaptable_layers(classifier)
    kinds = report.kinds
    assert list(kinds) == ["dense", "einsum_dense", "embedding", "conv"]
    assert kinds["conv"]["layers"] == 1 and kinds["embedding"]["layers"] == 1
    assert kinds["einsum_dense"]["roles"] == [
        "attention_output",
        "key",
        "query",
        "value",
    ]
    assert kinds["dense"]["roles"] == ["down", "up"]
    assert kinds["dense"]["layers"] == 3  # dense_1, dense_2 and the head
    assert "qgoft" in kinds["conv"]["methods"]
    assert "qgoft" not in kinds["embedding"]["methods"]
    assert {"lora", "dora", "hut"} <= set(kinds["embedding"]["methods"])
    assert report.paths(kind="conv") == ["vit_patching_and_embedding/patch_embedding"]
    text = str(report)
    assert "patch" not in text  # a summary per kind, not per layer
    assert all(kind in text for kind in kinds)
    with pytest.raises(ValueError, match="Expected a Keras model"):
        ka.adaptable_layers(classifier.backbone.layers[1])


@backend_independent
def test_adaptable_layers_reports_what_cannot_be_adapted():
    images = keras.Input((6, 6, 4))
    x = keras.layers.DepthwiseConv2D(3, name="depthwise")(images)
    x = keras.layers.Conv2D(4, 1, groups=2, name="grouped")(x)
    model = keras.Model(images, keras.layers.Conv2D(2, 1, name="plain")(x))
    report = ka.adaptable_layers(model)
    assert report.paths() == ["plain"]
    reasons = {row.path: row.reason for row in report.unsupported}
    assert set(reasons) == {"depthwise", "grouped"}
    assert "groups=2" in reasons["grouped"]
    assert "not adaptable depthwise (DepthwiseConv2D)" in str(report)


def test_internals_pass_training_argument_round_trip():
    layer = keras.layers.Conv2D(2, 1)
    layer.build((None, 3, 3, 1))
    previous = internals.pass_training_argument(layer)
    assert layer._call_has_context_arg["training"] is True
    internals.restore_training_argument(layer, previous)
    assert layer._call_has_context_arg["training"] is False


# ------------------------------------------------------ PEFT embedding adapters

PEFT_DATA = os.path.join(os.path.dirname(__file__), "data", "peft")
PEFT_BACKBONES = {
    "llama": keras_hub.models.LlamaBackbone,
    "gemma": keras_hub.models.GemmaBackbone,
}


@pytest.mark.parametrize(
    "kind, fixture",
    [
        ("gemma", "gemma_embed_lora"),
        ("llama", "llama_embed_lora"),
        ("llama", "llama_embed_dora"),
    ],
)
def test_peft_embedding_adapter_matches_pytorch_and_exports_back(
    kind, fixture, tmp_path
):
    """PEFT's LoRA and DoRA on `embed_tokens` (and q/v projections): the
    decoder body's outputs equal PyTorch's; the export writes the same
    tensors (DoRA's magnitudes included)."""
    backbone = PEFT_BACKBONES[kind].from_preset(os.path.join(PEFT_DATA, kind))
    source = os.path.join(PEFT_DATA, fixture)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = ka.interop.load_peft_adapter(backbone, source)
    tied = [w for w in caught if "tied embedding" in str(w.message)]
    assert len(tied) == (1 if kind == "gemma" else 0)
    assert report.adapted_paths[0] == "token_embedding"
    stored = np.load(os.path.join(PEFT_DATA, "outputs.npz"))
    inputs = {"token_ids": stored["token_ids"], "padding_mask": stored["padding_mask"]}
    expected = np.load(os.path.join(PEFT_DATA, "outputs_embeddings.npz"))
    expected = expected[f"{fixture}/sequence_output"]
    mask = stored["padding_mask"].astype(bool)
    got = _numpy(backbone(inputs))
    base = PEFT_BACKBONES[kind].from_preset(os.path.join(PEFT_DATA, kind))
    change = np.max(np.abs(_numpy(base(inputs)) - expected)[mask])
    error = np.max(np.abs(got - expected)[mask])
    assert error <= 1e-5 * np.max(np.abs(expected)) and change > 100 * error
    ka.interop.save_peft_adapter(backbone, tmp_path / "exported")
    written = safetensors.numpy.load_file(
        str(tmp_path / "exported" / "adapter_model.safetensors")
    )
    original = safetensors.numpy.load_file(
        os.path.join(source, "adapter_model.safetensors")
    )
    original = {k: v for k, v in original.items() if "base_layer" not in k}
    assert written.keys() == original.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)


def test_peft_embedding_adapter_for_another_table_is_refused(tmp_path):
    source = os.path.join(PEFT_DATA, "llama_embed_lora")
    edited = tmp_path / "edited"
    shutil.copytree(source, edited)
    path = str(edited / "adapter_model.safetensors")
    tensors = safetensors.numpy.load_file(path)
    tensors["base_model.model.model.embed_tokens.base_layer.weight"] += 0.5
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    backbone = PEFT_BACKBONES["llama"].from_preset(os.path.join(PEFT_DATA, "llama"))
    with pytest.raises(ValueError, match="base embedding table .* differs"):
        ka.interop.load_peft_adapter(backbone, edited)
    assert ka.adapted_layers(backbone) == []


def test_peft_export_refuses_hut_on_embeddings(tmp_path):
    backbone = PEFT_BACKBONES["llama"].from_preset(os.path.join(PEFT_DATA, "llama"))
    ka.enable_adapter(backbone, ka.HUT(rank=2), targets="token_embedding")
    with pytest.raises(ValueError, match="HUT"):
        ka.interop.save_peft_adapter(backbone, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@backend_independent
def test_per_example_adapters_refuse_embeddings_and_convolutions():
    token_ids = keras.Input((3,), dtype="int32")
    x = keras.layers.Embedding(10, 4, name="embed")(token_ids)
    model = keras.Model(token_ids, keras.layers.Dense(2, name="head")(x))
    ka.enable_adapter(model, ka.LoRA(rank=2), targets=["embed", "head"])
    with pytest.raises(ValueError, match="embedding layer 'embed'; per-example"):
        ka.per_example_adapters(model, ["default"])


def test_adapted_reversible_embedding_keeps_its_mask():
    """`ReversibleEmbedding(mask_zero=True)` sets its mask in `call`; the
    adapted call does too, so masked pooling gives the base outputs."""
    keras.utils.set_random_seed(0)
    token_ids = keras.Input((4,), dtype="int32")
    embedding = keras_hub.layers.ReversibleEmbedding(
        10, 3, mask_zero=True, name="embed"
    )
    pooled = keras.layers.GlobalAveragePooling1D()(embedding(token_ids))
    model = keras.Model(token_ids, pooled)
    ids = np.array([[3, 4, 0, 0], [5, 0, 0, 0]], "int32")
    before = _numpy(model(ids))
    ka.enable_adapter(model, ka.LoRA(rank=2), targets="embed")
    np.testing.assert_allclose(_numpy(model(ids)), before, rtol=1e-6)
