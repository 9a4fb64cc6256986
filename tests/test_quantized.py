"""Adapters over int8/int4 quantized bases (QLoRA-style), on a small BERT.

The backbone is quantized with Keras' own `quantize`, then adapted; the
classifier head stays float (as in QLoRA). What every adapter method must do
on an int8 base (identity at init, training, the NumPy reference, files,
float and re-quantized merges) is in the shared matrix (`matrix.py`,
QuantizedMatrix); this file checks the machinery once, with LoRA: merge
choices and their errors, `.keras` files, int4 configurations, mixed
precision, unsupported modes and the order quantize-then-adapt.

Speed: most tests rebuild the quantized model from a config
(`cases.quantized_bert`, as `.keras` loading does: quantized policies in a
`DTypePolicyMap`, no `quantization_config`) instead of quantizing again, and
call the models eagerly rather than compiling `predict`.
"""

import keras
import numpy as np
import pytest
from cases import BATCH
from cases import MODELS
from cases import VOCAB
from cases import input_shape
from cases import max_relative_difference
from cases import quantized_bert

import keras_adapters as ka
from keras_adapters import quantization
from keras_adapters.kernels import PROJECTION_LAYERS
from keras_adapters.kernels import UnsupportedLayerError
from keras_adapters.kernels import frozen_kernel

CASE = MODELS["bert"]
METHODS = {"lora": ka.LoRA.example, "qgoft": ka.QGOFT.example}
INT4_CONFIGS = {
    "int4_grouped": keras.quantizers.Int4QuantizationConfig(block_size=8),
    "int4_per_channel": keras.quantizers.Int4QuantizationConfig(block_size=-1),
}


def rebuilt(mode="int8"):
    """A fresh int8 (W8A8) or int4 (block size 8) BERT rebuilt from a config."""
    return quantized_bert(
        mode, INT4_CONFIGS["int4_grouped"] if mode == "int4" else None
    )


def predict(model, x=None):
    """Eager inference outputs (no compiled `predict`: tests stay fast)."""
    return _numpy(model(CASE.x if x is None else x, training=False))


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _snapshot(variables):
    return {v.path: _numpy(v).copy() for v in variables}


def _train(model, adapter, epochs=5):
    ka.enable_adapter(model, adapter, targets=CASE.targets)
    init = predict(model)
    frozen = _snapshot(model.non_trainable_weights)
    adapters = _snapshot(ka.adapter_variables(model))
    model.compile(
        optimizer=keras.optimizers.Adam(3e-2), loss=CASE.loss, jit_compile=True
    )
    history = model.fit(CASE.x, CASE.y, batch_size=BATCH, epochs=epochs, verbose=0)
    return init, frozen, adapters, history.history["loss"]


@pytest.fixture(scope="module", params=["lora"])
def trained(request, tmp_path_factory):
    model = quantized_bert(rebuilt=False)
    base = predict(model)
    init, frozen, adapters, losses = _train(model, METHODS[request.param]())
    path = str(tmp_path_factory.mktemp(request.param) / "a.weights.h5")
    ka.save_adapter_weights(model, path)
    return dict(
        method=request.param,
        model=model,
        base=base,
        init=init,
        frozen=frozen,
        adapters=adapters,
        losses=losses,
        outputs=predict(model),
        adapter_file=path,
    )


def query_layer(model):
    """The query projection of BERT's second block."""
    path = "transformer_layer_1/self_attention_layer/query"
    (layer,) = [x for x in model._flatten_layers() if (x.path or "").endswith(path)]
    return layer


# ------------------------------------------------------------------ training


def test_fit_changes_only_adapters_and_head(trained):
    model = trained["model"]
    after = _snapshot(model.non_trainable_weights)
    assert after.keys() == trained["frozen"].keys()
    for path, value in trained["frozen"].items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    changed = _snapshot(ka.adapter_variables(model))
    assert any(
        not np.array_equal(changed[p], v) for p, v in trained["adapters"].items()
    )
    adapter_ids = {id(v) for v in ka.adapter_variables(model)}
    backbone_ids = {id(v) for v in model.backbone.weights}
    extras = [v for v in model.trainable_weights if id(v) not in adapter_ids]
    assert extras and not any(id(v) in backbone_ids for v in extras)
    for layer in ka.adapted_layers(model):
        assert layer.quantization_mode == "int8"
        assert keras.backend.standardize_dtype(layer._kernel.dtype) == "int8"
        assert not layer._kernel.trainable and not layer.kernel_scale.trainable
        assert layer._kernel.path in trained["frozen"]
        assert layer.kernel_scale.path in trained["frozen"]


# -------------------------------------------------------------------- files


def test_adapter_file_loads_into_the_float_model(trained):
    # Same logical kernel shapes: adapters trained on the int8 base load into
    # the float model they were quantized from (outputs then differ by the
    # base's quantization error).
    fresh = CASE.build(0)
    ka.load_adapter_weights(fresh, trained["adapter_file"])
    assert max_relative_difference(predict(fresh), trained["outputs"]) < 0.05


def test_keras_file_round_trip(trained, tmp_path):
    path = str(tmp_path / "model.keras")
    trained["model"].save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        predict(loaded), trained["outputs"], rtol=1e-5, atol=1e-5
    )
    layers = ka.adapted_layers(loaded)
    assert layers and all(layer.quantization_mode == "int8" for layer in layers)
    for original, reloaded in zip(
        ka.adapted_layers(trained["model"]), layers, strict=True
    ):
        np.testing.assert_array_equal(
            _numpy(reloaded._kernel), _numpy(original._kernel)
        )


# ------------------------------------------------------------------ merging


def test_merge_without_a_choice_raises_and_changes_nothing(trained):
    model = rebuilt()
    ka.load_adapter_weights(model, trained["adapter_file"])
    adapted = ka.adapted_layers(model)
    before = predict(model)
    with pytest.raises(ValueError, match="quantized='float'"):
        ka.merge_adapters(model)
    with pytest.raises(ValueError, match="`quantized` must be one of"):
        ka.merge_adapters(model, quantized="int8")
    assert ka.adapted_layers(model) == adapted
    assert all(layer.quantization_mode == "int8" for layer in adapted)
    np.testing.assert_array_equal(predict(model), before)


def test_merge_float_of_w8a8_layers_is_flagged_and_measured(trained):
    model = rebuilt()
    ka.load_adapter_weights(model, trained["adapter_file"])
    unmerged = predict(model)
    report = ka.quantization.merge_and_measure(model, "float", CASE.x)
    merged = predict(model)
    assert all(row.activations_quantized for row in report.layers)
    assert report.output_max_abs_error == pytest.approx(
        float(np.max(np.abs(merged - unmerged))), rel=1e-3, abs=1e-6
    )
    # Only the activation quantization of the merged layers is gone.
    assert report.output_relative_error < 0.05
    assert "act. quant." in str(report)


# --------------------------------------------------------------------- int4

INT4_CASES = {
    # Keras' int4 default is sub-channel (asymmetric, one scale and zero point
    # per block of input rows); block 8 gives BERT's 16 rows two blocks.
    "int4_grouped": "qgoft",
    "int4_per_channel": "lora",
}


@pytest.mark.parametrize("config_id", list(INT4_CASES))
def test_int4_base(config_id, tmp_path):
    config = INT4_CONFIGS[config_id]
    model = quantized_bert("int4", config=config, rebuilt=False)
    base = predict(model)
    init, frozen, _, losses = _train(model, METHODS[INT4_CASES[config_id]](), 20)
    assert max_relative_difference(init, base) <= 1e-5
    assert losses[-1] < losses[0] - 0.01, losses
    after = _snapshot(model.non_trainable_weights)
    for path, value in frozen.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    layer = query_layer(model)
    assert layer.quantization_mode == "int4"
    assert layer._keras_adapters_kernel.kernel_shape == (16, 2, 8)  # not packed
    # The dequantized kernel is Keras' unpacked int4 kernel, rescaled.
    unpacked = _numpy(keras.layers.EinsumDense.kernel.fget(layer)).reshape(16, 16)
    scale = _numpy(layer.kernel_scale)
    if config_id == "int4_grouped":
        groups = _numpy(layer.g_idx).astype(int)
        zero = _numpy(layer.kernel_zero)
        dequantized = (unpacked - zero[groups]) * scale[groups]
    else:
        dequantized = unpacked / scale
    np.testing.assert_allclose(
        _numpy(frozen_kernel(layer).dense()).reshape(16, 16),
        dequantized,
        rtol=1e-6,
        atol=1e-7,
    )
    outputs = predict(model)
    if config_id == "int4_grouped":
        # The adapter file loads into a rebuilt int4 model, whose merge can
        # re-quantize with the block size its policy records.
        path = str(tmp_path / "int4.weights.h5")
        ka.save_adapter_weights(model, path)
        fresh = rebuilt("int4")
        ka.load_adapter_weights(fresh, path)
        np.testing.assert_allclose(predict(fresh), outputs, rtol=1e-5, atol=1e-5)
        report = ka.merge_adapters(fresh, quantized="requantize")
        requantized = query_layer(fresh)
        assert requantized.quantization_mode == "int4"
        assert tuple(requantized.kernel_scale.shape) == (2, 16)  # 16 rows / 8
        assert all(0 < row.kernel_relative_error < 0.2 for row in report.layers)
        assert max_relative_difference(predict(fresh), outputs) < 0.2
    # Weight-only: a float merge equals the adapted model.
    report = ka.merge_adapters(model, quantized="float")
    assert max_relative_difference(predict(model), outputs) <= 1e-5
    assert not any(row.activations_quantized for row in report.layers)


def test_mixed_bfloat16_trains_and_keeps_adapters_float32():
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = quantized_bert(rebuilt=False)
        base = predict(model).astype("float32")
        init, _, _, losses = _train(model, METHODS["lora"](), epochs=15)
    finally:
        keras.config.set_dtype_policy(policy)
    # bfloat16 outputs: an 8-bit mantissa.
    assert max_relative_difference(init.astype("float32"), base) <= 1e-2
    assert losses[-1] < losses[0] - 0.01, losses
    assert {v.dtype for v in ka.adapter_variables(model)} == {"float32"}
    assert query_layer(model).compute_dtype == "bfloat16"


# -------------------------------------------------------------------- errors


def test_unsupported_quantization_modes_are_rejected():
    model = CASE.build(0)
    model.backbone.quantize("float8")
    with pytest.raises(ValueError, match="float8") as error:
        ka.enable_adapter(model, ka.LoRA(rank=2), targets=CASE.targets)
    assert "'int8' or 'int4'" in str(error.value)
    assert ka.adapted_layers(model) == []


@pytest.mark.parametrize("where", ["task", "backbone"])
def test_adapt_then_quantize_raises_and_changes_nothing(where):
    model = CASE.build(0)
    ka.enable_adapter(model, ka.LoRA(rank=2), targets=CASE.targets)
    target = model if where == "task" else model.backbone
    with pytest.raises(ValueError, match="quantize the model before enable_adapter"):
        target.quantize("int8")
    assert not any(
        getattr(layer, "quantization_mode", None) for layer in model._flatten_layers()
    )
    layer = ka.adapted_layers(model)[0]
    with pytest.raises(ValueError, match="has an adapter"):
        layer.quantize("int8")
    # Once merged, the model quantizes as usual.
    ka.merge_adapters(model)
    model.backbone.quantize("int8")
    assert layer.quantization_mode == "int8"


# ------------------------------------------------------ Keras' quantized layer


@pytest.mark.parametrize(
    "model_id,mode",
    [("bert", "int8"), ("gemma", "int8"), ("gemma", "int4")]
    + [("functional", "int8"), ("functional", "int4")],
)
def test_base_projection_reproduces_keras_quantized_layers(model_id, mode):
    """`q(x)` and the dequantized kernel give Keras' own quantized outputs.

    BERT's EinsumDense kernels are (inputs, outputs...), Gemma's query
    (heads, hidden, head_dim) contracts a middle axis; the functional model
    has Dense layers with activations.
    """
    model = MODELS[model_id].build(0)
    model.quantize(mode)
    rng = np.random.default_rng(0)
    checked = 0
    for layer in model._flatten_layers():
        if not isinstance(layer, PROJECTION_LAYERS):  # Keras quantizes these
            continue
        if not quantization.is_quantized(layer):
            continue
        view = frozen_kernel(layer)
        x = rng.normal(size=input_shape(view)).astype("float32")
        inputs = view.prepare_inputs(x)
        outputs = view.project(inputs)
        if layer.bias is not None:
            outputs = outputs + layer.bias
        if layer.activation is not None:
            outputs = layer.activation(outputs)
        if mode == "int8" and isinstance(layer, keras.layers.EinsumDense):
            # Keras' own (private) inverse of its scale layout.
            scale = layer._adjust_scale_for_dequant(layer.kernel_scale)
            np.testing.assert_allclose(
                _numpy(frozen_kernel(layer).dense()),
                _numpy(layer._kernel).astype("float32") / _numpy(scale),
                rtol=1e-6,
                err_msg=layer.path,
            )
        expected = _numpy(layer(x))
        scale = max(float(np.max(np.abs(expected))), 1e-6)
        np.testing.assert_allclose(
            _numpy(outputs), expected, rtol=0, atol=2e-5 * scale, err_msg=layer.path
        )
        checked += 1
    assert checked >= 2


def test_keras_cannot_resave_a_reloaded_quantized_keras_hub_model(tmp_path):
    """A Keras 3.15 limit the docs state: a quantized KerasHub model loaded
    from `.keras` cannot be saved again (its layers' policies sit in a
    `DTypePolicyMap`, which their `save_own_variables` reads as "float").
    With or without adapters; adapter files are not affected. If this test
    fails, Keras fixed it: update docs/quantized_bases.md."""
    model = rebuilt()
    with pytest.raises(ValueError, match="Invalid dtype"):
        model.save(str(tmp_path / "again.keras"))


# ------------------------------------------------ quantized embedding tables

TIED_LM = MODELS["tied_lm"]


def quantized_tied_lm(config=None):
    """The `"tied_lm"` case (seed 0) with its tied KerasHub
    `ReversibleEmbedding` quantized to int8 (Keras' default: the reverse
    projection quantizes its inputs per token; `config` to change that)."""
    model = TIED_LM.build(0)
    model.get_layer("token_embedding").quantize("int8", type_check=False, config=config)
    return model


def _table(layer):
    """The dequantized table `int8 / scale` (one scale per row), float64."""
    table = _numpy(layer._embeddings).astype("float64")
    return table / _numpy(layer.embeddings_scale).astype("float64")[:, None]


def _eager(model):
    return _numpy(model(TIED_LM.x, training=False))


@pytest.fixture(scope="module", params=["lora", "dora", "hut"])
def quantized_embedding(request, tmp_path_factory):
    """LoRA, DoRA or HUT on the int8 tied embedding only, trained under XLA."""
    from matrix import example

    model = quantized_tied_lm()
    base = _eager(model)
    ka.enable_adapter(model, example(request.param), targets=["token_embedding"])
    init = _eager(model)
    frozen = _snapshot(model.non_trainable_weights)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-2), loss=TIED_LM.loss, jit_compile=True
    )
    history = model.fit(TIED_LM.x, TIED_LM.y, batch_size=BATCH, epochs=8, verbose=0)
    path = str(tmp_path_factory.mktemp(f"qemb-{request.param}") / "a.weights.h5")
    ka.save_adapter_weights(model, path)
    return dict(
        model=model,
        base=base,
        init=init,
        frozen=frozen,
        losses=history.history["loss"],
        outputs=_eager(model),
        path=path,
    )


def test_quantized_embedding_identity_fit_and_frozen_table(quantized_embedding):
    run = quantized_embedding
    assert max_relative_difference(run["init"], run["base"]) <= 1e-5
    losses = run["losses"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    after = _snapshot(run["model"].non_trainable_weights)
    assert any("embeddings_scale" in p for p in run["frozen"])
    for path, value in run["frozen"].items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    layer = run["model"].get_layer("token_embedding")
    assert layer.quantization_mode == "int8" and layer._embeddings.dtype == "int8"


def test_quantized_embedding_matches_numpy_reference(quantized_embedding):
    """The lookup and the tied reverse projection against NumPy: the int8
    table over its row scales, the adapter's reference formula and (reverse)
    Keras' per-token input quantizer and logit soft cap."""
    from matrix import reference_adapted_matrix
    from matrix import reference_quantize_inputs

    layer = quantized_embedding["model"].get_layer("token_embedding")
    adapted = reference_adapted_matrix(layer, _table(layer))
    ids = TIED_LM.x[:2]
    np.testing.assert_allclose(_numpy(layer(ids)), adapted[ids], rtol=1e-5, atol=1e-6)
    hidden = np.random.default_rng(3).normal(size=(2, 5, 8)).astype("float32")
    logits = reference_quantize_inputs(hidden.astype("float64")) @ adapted.T
    expected = np.tanh(logits / 30.0) * 30.0
    np.testing.assert_allclose(
        _numpy(layer(hidden, reverse=True)), expected, rtol=1e-4, atol=1e-4
    )


def test_quantized_embedding_adapter_and_keras_files(quantized_embedding, tmp_path):
    fresh = quantized_tied_lm()
    ka.load_adapter_weights(fresh, quantized_embedding["path"])
    np.testing.assert_allclose(
        _eager(fresh), quantized_embedding["outputs"], rtol=1e-5, atol=1e-5
    )
    path = str(tmp_path / "model.keras")
    quantized_embedding["model"].save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        _eager(loaded), quantized_embedding["outputs"], rtol=1e-5, atol=1e-5
    )
    (layer,) = ka.adapted_layers(loaded)
    assert layer.quantization_mode == "int8"
    np.testing.assert_array_equal(
        _numpy(layer._embeddings),
        _numpy(quantized_embedding["model"].get_layer("token_embedding")._embeddings),
    )


def _quantized_table(mode, block_size):
    """`(model, layer)`: a plain `Embedding` quantized to int8, or the tied
    table of `"tied_lm"` quantized to int4 with `block_size`."""
    if mode == "int8":
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.layers.Embedding(VOCAB, 8, name="emb")])
        model.build((None, 3))
        layer = model.get_layer("emb")
        layer.quantize("int8")
    else:
        model = TIED_LM.build(0)
        layer = model.get_layer("token_embedding")
        config = keras.quantizers.Int4QuantizationConfig(block_size=block_size)
        layer.quantize("int4", type_check=False, config=config)
    return model, layer


@pytest.mark.parametrize(
    "mode, block_size",
    [("int8", None), ("int4", -1), ("int4", 4)],
    ids=["int8_embedding", "int4_per_channel", "int4_grouped"],
)
def test_quantized_lookup_and_reverse_match_numpy(mode, block_size, tmp_path):
    """LoRA on a plain int8 `Embedding` and on int4 tied tables (per-channel
    and sub-channel with zero points): identity at init, then the lookup
    (and reverse projection) with a nonzero adapter against NumPy."""
    model, layer = _quantized_table(mode, block_size)
    reversible = isinstance(layer, keras.layers.ReversibleEmbedding)
    ids = TIED_LM.x[:2]
    hidden = np.random.default_rng(3).normal(size=(2, 3, 8)).astype("float32")
    base = _numpy(layer(ids))
    base_reverse = _numpy(layer(hidden, reverse=True)) if reversible else None
    ka.enable_adapter(model, ka.LoRA(rank=2), targets=[layer.name])
    np.testing.assert_array_equal(_numpy(layer(ids)), base)
    if reversible:
        reverse = _numpy(layer(hidden, reverse=True))
        np.testing.assert_allclose(reverse, base_reverse, atol=1e-5)
    weights = {v.name: v for v in layer.trainable_weights}
    weights["lora_b"].assign(np.random.default_rng(0).normal(size=(2, 8)))
    # Keras' table: (unpacked) integers, dequantized per row (and group).
    values = layer._embeddings
    if mode == "int4":
        values = keras.quantizers.unpack_int4(values, 8, axis=-1)
    values = _numpy(values).astype("float64")
    scale = _numpy(layer.embeddings_scale).astype("float64")
    if block_size in (None, -1):
        table = values / scale[:, None]
    else:
        groups = _numpy(layer.g_idx).astype("int64")
        zero = _numpy(layer.embeddings_zero).astype("float64")
        table = (values - zero[:, groups]) * scale[:, groups]
    lora_a, lora_b = (
        _numpy(weights[n]).astype("float64") for n in ("lora_a", "lora_b")
    )
    adapted = table + lora_a @ lora_b * ka.LoRA(rank=2).scale
    np.testing.assert_allclose(_numpy(layer(ids)), adapted[ids], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_numpy(layer.kernel), adapted, rtol=1e-5, atol=1e-5)
    if reversible:
        from matrix import reference_quantize_inputs

        inputs = hidden.astype("float64")
        if layer.inputs_quantizer is not None:
            inputs = reference_quantize_inputs(inputs)
        expected = np.tanh(inputs @ adapted.T / 30.0) * 30.0
        actual = _numpy(layer(hidden, reverse=True))
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    path = str(tmp_path / "a.weights.h5")
    ka.save_adapter_weights(model, path)
    fresh, fresh_layer = _quantized_table(mode, block_size)
    ka.load_adapter_weights(fresh, path)
    np.testing.assert_array_equal(_numpy(fresh_layer(ids)), _numpy(layer(ids)))


def test_quantized_untied_reversible_embedding_is_refused():
    layer = keras.layers.ReversibleEmbedding(8, 4, tie_weights=False)
    layer.build()
    layer.quantize("int8")
    with pytest.raises(UnsupportedLayerError, match="untied weights"):
        frozen_kernel(layer)


def test_quantized_embedding_merges(quantized_embedding):
    """`quantized="float"` on a weight-only int8 table equals the unmerged
    model; `"requantize"` re-quantizes it per row and reports the error."""
    weight_only = keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    model = quantized_tied_lm(weight_only)
    ka.load_adapter_weights(model, quantized_embedding["path"])
    layer = model.get_layer("token_embedding")
    unmerged, expected = _eager(model), _numpy(layer.kernel)
    report = ka.merge_adapters(model, quantized="float")
    assert layer.quantization_mode is None and not ka.adapted_layers(model)
    np.testing.assert_array_equal(_numpy(layer.embeddings), expected)
    assert report.layers[0].kernel_max_abs_error == 0.0
    assert max_relative_difference(_eager(model), unmerged) <= 1e-5

    model = quantized_tied_lm()
    ka.load_adapter_weights(model, quantized_embedding["path"])
    layer = model.get_layer("token_embedding")
    exact = _numpy(layer.kernel).astype("float64")
    report = ka.merge_adapters(model, quantized="requantize")
    (row,) = report.layers
    assert layer.quantization_mode == "int8" and row.result == "int8"
    assert row.activations_quantized
    error = np.max(np.abs(_table(layer) - exact))
    assert 0.0 < row.kernel_max_abs_error == pytest.approx(error, rel=1e-4)
