"""Mixture-of-experts layers: the stacked expert kernels of KerasHub's MoE
blocks (Mixtral; Qwen3-MoE, whose gate and up experts are one fused weight).

The shared matrix (`matrix.py`, model "mixtral") runs every invariant on
Mixtral's experts for the methods that adapt them (identity, `fit` under
XLA, the NumPy reference of each projection, adapter and `.keras` files,
exact merges, the other backend); this file checks what it does not: each
`ExpertsSpec.call` against KerasHub's own `call`, the whole adapted experts
layer against NumPy, targeting by role (the router is no gate; a fused
weight needs both its roles), the fused Qwen3-MoE layout end to end, mixed
precision, placement of the expert axis, and the methods that refuse
experts.
"""

import importlib
import json
import os
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest
from cases import MODELS
from cases import VOCAB
from cases import max_relative_difference
from cases import predict

import keras_adapters as ka
from keras_adapters import placement
from keras_adapters import targeting
from keras_adapters.kernels import ExpertProjection
from keras_adapters.kernels import frozen_kernel
from keras_adapters.kernels.experts import EXPERTS_SPECS
from keras_adapters.kernels.experts import expert_projections
from keras_adapters.kernels.experts import experts_spec
from keras_adapters.layers import adapter_variables

RNG = np.random.default_rng(0)
# Token ids and padding masks of the causal LM cases.
X = MODELS["mixtral"].x


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x), "float64")


def _randomize(model, scale=0.3):
    rng = np.random.default_rng(1)
    for variable in ka.adapter_variables(model):
        variable.assign(_numpy(variable) + rng.normal(scale=scale, size=variable.shape))


def _experts_class(key):
    module, name = key.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------ the specs


@pytest.mark.parametrize("key", sorted(EXPERTS_SPECS))
def test_each_spec_computes_as_the_keras_hub_layer(key):
    """The spec's call through plain projections is the layer's own call, and
    it names every weight of the layer (a KerasHub change shows up here)."""
    layer = _experts_class(key)(
        num_experts=3, hidden_dim=8, intermediate_dim=6, name="experts"
    )
    layer.build((5, 8))
    x = RNG.normal(size=(5, 8)).astype("float32")
    spec = experts_spec(layer)
    by_key = {p.key: p for p in expert_projections(layer)}
    got = spec.call(layer, x, lambda k, h: by_key[k](h))
    np.testing.assert_allclose(_numpy(got), _numpy(layer(x)), rtol=1e-6, atol=1e-6)
    assert {w.attribute.lstrip("_") for w in spec.weights} == {
        v.name for v in layer.weights
    }


# ------------------------------------------------------------------- Mixtral


@pytest.fixture(scope="module")
def mixtral():
    """The matrix's tiny Mixtral, LoRA on every expert weight, randomized."""
    model = MODELS["mixtral"].build(0)
    bank = model.backbone.get_layer("transformer_layer_0")._sparse_moe_block
    bank = bank.expert_bank
    weights = {w.name: _numpy(w) for w in bank.weights}
    ka.enable_adapter(model, ka.LoRA(rank=2, alpha=4), targets=ka.experts())
    _randomize(model)
    return model, bank, weights


def test_adapted_mixtral_experts_match_numpy(mixtral):
    """Every expert computes with its own `W_e + s A_e B_e`."""
    model, bank, weights = mixtral
    x = RNG.normal(size=(5, 16)).astype("float32")
    adapted = {}
    for layer in ka.adapted_layers(model):
        values = {k: _numpy(v) for k, v in adapter_variables(layer).items()}
        a, b = values["lora_a"], values["lora_b"]
        assert a.shape == (4, layer._kernel.shape[1], 2)  # (experts, d_in, r)
        adapted[layer.name] = weights[layer.name] + 2.0 * a @ b
    gate = np.einsum("th,ehm->etm", x, adapted["expert_feedforward_gate_dense"])
    up = np.einsum("th,ehm->etm", x, adapted["expert_feedforward_intermediate_dense"])
    hidden = up * gate / (1 + np.exp(-gate))  # silu
    want = np.einsum("eti,eih->eth", hidden, adapted["expert_feedforward_output_dense"])
    got = _numpy(bank(x))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.max(np.abs(want)))


def test_mixtral_targets_by_role(mixtral):
    model, _, _ = mixtral
    backbone = model.backbone

    def paths(target):
        return [
            layer.path.split("/")[-1]
            for layer, _ in targeting.resolve_targets(backbone, target)
        ]

    assert paths(ka.mlp("gate")) == ["expert_feedforward_gate_dense"]
    assert paths(ka.mlp("up", "down")) == [
        "expert_feedforward_intermediate_dense",
        "expert_feedforward_output_dense",
    ]
    assert paths(ka.experts()) == paths(ka.mlp())
    attention = targeting.resolve_targets(backbone, ka.attention())
    assert not any(isinstance(layer, ExpertProjection) for layer, _ in attention)
    with pytest.raises(ValueError, match="Unknown MLP role 'router'"):
        ka.experts("router")
    # By path, like any layer.
    assert paths(r".*/experts/expert_feedforward_output_dense") == [
        "expert_feedforward_output_dense"
    ]


def test_adaptable_layers_lists_experts_for_lora_only():
    report = ka.adaptable_layers(MODELS["mixtral"].build(0))
    info = report.kinds["experts"]
    assert info["layers"] == 3
    assert info["methods"] == ["lora"]
    assert set(info["roles"]) == {"gate", "up", "down"}
    router = [
        r for r in report.layers if r.path.endswith("/sparse_feedforward_gate_dense")
    ]
    assert [(r.kind, r.role) for r in router] == [("dense", None)]


@pytest.mark.parametrize(
    "adapter", [ka.DoRA(rank=2), ka.HUT(rank=2), ka.QGOFT.example()]
)
def test_methods_without_experts_refuse_them_by_name(adapter):
    model = MODELS["mixtral"].build(0)
    with pytest.raises(ValueError, match="is an experts layer, which .* does not"):
        ka.enable_adapter(model, adapter, targets=ka.experts())
    assert ka.adapted_layers(model) == []


def test_lora_refuses_data_driven_inits_and_combining_on_experts():
    model = MODELS["mixtral"].build(0)
    base = predict(model, X)
    with pytest.raises(ValueError, match="stack of \\(4,\\) expert kernels"):
        ka.enable_adapter(model, ka.LoRA(rank=2, init="pissa"), targets=ka.experts())
    ka.enable_adapter(model, ka.LoRA(rank=2), targets=ka.experts("down"), name="a")
    # The gate and up projections compute unadapted inside the rewritten call.
    assert max_relative_difference(predict(model, X), base) <= 1e-6
    with pytest.raises(ValueError, match="stacked expert weights"):
        ka.combine_adapters(model, {"a": 1.0}, name="b")


def test_expert_axis_is_laid_out_like_the_kernels_first_axis():
    layer = _experts_class(sorted(EXPERTS_SPECS)[0])(
        num_experts=4, hidden_dim=8, intermediate_dim=6
    )
    layer.build((5, 8))
    kernel = frozen_kernel(expert_projections(layer)[0])
    assert kernel.kind == "experts" and kernel.stack_shape == (4,)
    # A kernel (experts, d_in, d_out) sharded ("model", None, "batch").
    axes = ("model", None, "batch")
    lora_a = placement.adapter_variable_axes(axes, kernel, ("stack", "in", None))
    lora_b = placement.adapter_variable_axes(axes, kernel, ("stack", None, "out"))
    assert (lora_a, lora_b) == (("model", None, None), ("model", None, "batch"))


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="keras.distribution runs on JAX"
)
def test_experts_adapters_on_four_devices(tmp_path):
    """Expert weights sharded over the experts: the factors are sharded the
    same way, training equals one device, the merge is exact."""
    output = tmp_path / "results.json"
    script = os.path.join(os.path.dirname(__file__), "moe_distribution_check.py")
    result = subprocess.run(
        [sys.executable, script, str(output)],
        env={**os.environ, "KERAS_BACKEND": "jax"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    results = json.loads(output.read_text())
    assert results["devices"] == 4
    np.testing.assert_allclose(results["multi"], results["single"], rtol=1e-5)
    assert results["single"][-1] < results["single"][0]
    assert len(results["layouts"]) == 6
    for path, layout in results["layouts"].items():
        assert "/experts/expert_feedforward_" in path
        assert layout == ["model", None, None], path
    assert results["merged_difference"] <= 1e-6


# ------------------------------------------------ Qwen3-MoE (fused gate + up)


def _qwen3(seed):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.Qwen3MoeBackbone(
        vocabulary_size=VOCAB,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        moe_intermediate_dim=8,
        num_experts=4,
        top_k=2,
        head_dim=4,
    )
    return keras_hub.models.Qwen3MoeCausalLM(backbone=backbone, preprocessor=None)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    model = _qwen3(0)
    base_weights = model.get_weights()
    base = predict(model, X)
    report = ka.enable_adapter(model, ka.LoRA(rank=2), targets=ka.mlp())
    init = predict(model, X)
    _randomize(model)
    path = str(tmp_path_factory.mktemp("qwen3") / "a.weights.h5")
    ka.save_adapter_weights(model, path)
    return model, base_weights, base, init, report, path


def test_qwen3_fused_gate_up_needs_both_roles(qwen3):
    model = qwen3[0]

    def names(target):
        return [
            layer.name for layer, _ in targeting.resolve_targets(model.backbone, target)
        ]

    assert names(ka.mlp("up", "down")) == ["expert_feedforward_output_dense"]
    assert names(ka.mlp("gate", "up")) == ["expert_feedforward_gate_dense"]
    # The router is no gate projection, and nothing else is.
    with pytest.raises(ValueError, match="matches no layer"):
        targeting.resolve_targets(model.backbone, ka.mlp("gate"))


def test_qwen3_identity_report_and_outputs(qwen3):
    model, _, base, init, report, _ = qwen3
    assert max_relative_difference(init, base) <= 1e-6
    assert [p.split("/")[-1] for p in report.adapted_paths] == [
        "expert_feedforward_gate_dense",
        "expert_feedforward_output_dense",
    ]
    # (experts) x rank x (d_in + d_out): 4 x 2 x (8 + 16) and 4 x 2 x (8 + 8).
    assert report.adapter_params == 4 * 2 * (8 + 16) + 4 * 2 * (8 + 8)
    assert max_relative_difference(predict(model, X), base) > 1e-3


def test_qwen3_files_and_merge(qwen3, tmp_path):
    model, base_weights, _, _, _, path = qwen3
    outputs = predict(model, X)
    fresh = _qwen3(1)
    fresh.set_weights(base_weights)
    ka.load_adapter_weights(fresh, path)
    assert max_relative_difference(predict(fresh, X), outputs) <= 1e-5
    model.save(str(tmp_path / "m.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "m.keras"))
    assert max_relative_difference(predict(loaded, X), outputs) <= 1e-5
    bank = fresh.backbone.get_layer("transformer_layer_0").mlp.expert_bank
    ka.merge_adapters(fresh)
    assert max_relative_difference(predict(fresh, X), outputs) <= 1e-5
    assert type(bank).__name__ == "Qwen3MoeExperts"
    assert not hasattr(bank, "_keras_adapters_expert_feedforward_gate_dense")
    assert len(fresh.weights) == len(base_weights)


def test_qwen3_mixed_precision_trains_float32_experts_adapters():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = _qwen3(0)
        ka.enable_adapter(model, ka.LoRA(rank=2), targets=ka.experts())
        if keras.backend.backend() == "jax":
            # Under TensorFlow, KerasHub's MoE load-balancing loss multiplies
            # float32 by bfloat16 in training, adapters or not (keras-hub
            # 0.32): forward passes and merges only there.
            model.compile(
                optimizer=keras.optimizers.Adam(1e-2),
                loss=MODELS["mixtral"].loss,
                jit_compile=True,
            )
            history = model.fit(X, MODELS["mixtral"].y, epochs=2, verbose=0)
            assert np.all(np.isfinite(history.history["loss"]))
        else:
            _randomize(model, scale=0.1)
        assert all(v.dtype == "float32" for v in ka.adapter_variables(model))
        bank = model.backbone.get_layer("transformer_layer_0").mlp.expert_bank
        stacked = [
            bank._expert_feedforward_gate_dense,
            bank._expert_feedforward_output_dense,
        ]
        dtypes = [w.dtype for w in stacked]
        before = np.asarray(model(X, training=False), "float32")
        ka.merge_adapters(model)
        assert [w.dtype for w in stacked] == dtypes
        after = np.asarray(model(X, training=False), "float32")
        np.testing.assert_allclose(after, before, atol=0.1, rtol=0.05)
    finally:
        keras.config.set_dtype_policy(previous)
