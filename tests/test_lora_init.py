"""LoRA initializations computed from the base kernel: PiSSA, OLoRA, LoftQ.

The factors against NumPy (SVD, QR, Eckart-Young); on a functional model
(an `EinsumDense` and a `Dense`): identity at init, the kernel never
changes, training under XLA, adapter files into an untouched model, exact
merges, and deletion that leaves the kernel bit-identical; PEFT export as
the rank-2r plain LoRA relative to the untouched base.
"""

import json
import os

import keras
import numpy as np
import pytest
from _fixtures import backend_independent
from cases import BATCH
from cases import MODELS
from cases import max_relative_difference

import keras_adapters as ka
from keras_adapters import interop
from keras_adapters.adapters import lora_init

CASE = MODELS["functional"]
TARGETS = ("proj", "hidden")


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _matrix(seed, shape=(12, 16)):
    return np.random.default_rng(seed).normal(size=shape)


@backend_independent
def test_pissa_factors_are_the_truncated_svd():
    w, rank, scale = _matrix(0), 3, 2.5
    a0, b0 = lora_init.pissa(w, rank, scale)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(scale * a0 @ b0, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-12)
    # sqrt(S / s) on each side: A0^T A0 = B0 B0^T = diag(S_r) / s.
    np.testing.assert_allclose(a0.T @ a0, np.diag(s[:3] / scale), atol=1e-12)
    np.testing.assert_allclose(b0 @ b0.T, np.diag(s[:3] / scale), atol=1e-12)
    # Eckart-Young: the residual is what the other singular values carry.
    residual = np.linalg.norm(w - scale * a0 @ b0)
    assert residual == pytest.approx(np.sqrt(np.sum(s[3:] ** 2)), rel=1e-12)


@backend_independent
def test_randomized_pissa_approaches_the_exact_svd():
    rng = np.random.default_rng(1)
    # A dominant rank-4 part plus noise: subspace iterations recover it.
    w = rng.normal(size=(40, 4)) @ rng.normal(size=(4, 60)) * 5
    w += 0.01 * rng.normal(size=w.shape)
    exact = lora_init.pissa(w, 4, 1.0)
    fast = lora_init.pissa(w, 4, 1.0, iterations=2)
    np.testing.assert_allclose(fast[0] @ fast[1], exact[0] @ exact[1], atol=1e-6)
    np.testing.assert_array_equal(
        lora_init.pissa(w, 4, 1.0, iterations=2)[0], fast[0]
    )  # deterministic


@backend_independent
def test_olora_factors_follow_the_qr_of_the_torch_weight():
    w, rank, scale = _matrix(2), 3, 2.0
    a0, b0 = lora_init.olora(w, rank, scale)
    q, r = np.linalg.qr(w.T)  # PyTorch's weight is W^T
    np.testing.assert_allclose((a0 @ b0).T, q[:, :3] @ r[:3], atol=1e-12)
    np.testing.assert_allclose(b0 @ b0.T, np.eye(3), atol=1e-12)  # orthonormal B0
    full_a, full_b = lora_init.olora(w, 12, scale)
    np.testing.assert_allclose(full_a @ full_b, w, atol=1e-12)  # full rank: W


@backend_independent
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"init": "svd"}, r"`init` must be None, one of .*'pissa'.*received 'svd'"),
        ({"init": "pissa_niter_0"}, r"received 'pissa_niter_0'"),
        ({"init": 3}, r"`init` must be .*received 3"),
        (
            {"init": "pissa", "a_initializer": "gaussian"},
            r"init='pissa'.*a_initializer='gaussian'.*would be ignored",
        ),
        (
            {"init": "gaussian", "a_initializer": "he_uniform"},
            r"both choose the random initializer of A",
        ),
    ],
)
def test_bad_init_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ka.LoRA(rank=2, **kwargs)


@backend_independent
def test_init_names_and_config_round_trip():
    assert ka.LoRA(rank=2, init="gaussian") == ka.LoRA(rank=2, a_initializer="gaussian")
    lora = ka.LoRA(rank=2, alpha=4, init="pissa_niter_3")
    assert ka.Adapter.deserialize(json.loads(json.dumps(lora.serialize()))) == lora
    assert "init='pissa_niter_3'" in repr(lora)
    assert "init=" not in repr(ka.LoRA(rank=2))  # the default stays quiet


class _Trained:
    pass


@pytest.fixture(scope="module", params=["pissa", "olora"])
def trained(request, tmp_path_factory):
    """A functional model with a PiSSA or OLoRA adapter, trained 3 steps."""
    t = _Trained()
    t.init = request.param
    model = CASE.build(0)
    t.base_weights = model.get_weights()
    t.base = _numpy(model(CASE.x))
    layers = [model.get_layer(n) for n in TARGETS]
    t.kernels = {layer.name: _numpy(layer.kernel).copy() for layer in layers}
    t.adapter = ka.LoRA(rank=2, alpha=4, init=request.param)
    t.report = ka.enable_adapter(
        model, t.adapter, targets=list(TARGETS), keep_trainable="head"
    )
    t.init_outputs = _numpy(model(CASE.x))
    t.initial = {
        layer.name: {v.name: _numpy(v).copy() for v in layer.weights}
        for layer in layers
    }
    if t.init == "pissa":
        model.compile(
            optimizer=keras.optimizers.Adam(3e-2), loss=CASE.loss, jit_compile=True
        )
        history = model.fit(CASE.x, CASE.y, batch_size=BATCH, epochs=3, verbose=0)
        t.losses = history.history["loss"]
    else:
        # The same code path after init: move A and B as training would (one
        # XLA compilation less).
        t.losses = None
        rng = np.random.default_rng(0)
        for variable in ka.adapter_variables(model):
            if variable.trainable:
                noise = rng.normal(scale=0.05, size=variable.shape)
                variable.assign(_numpy(variable) + noise)
    t.outputs = _numpy(model(CASE.x))
    t.path = str(tmp_path_factory.mktemp(request.param) / "a.weights.h5")
    ka.save_adapter_weights(model, t.path)
    t.model = model
    return t


def _untouched(trained):
    model = CASE.build(1)
    model.set_weights(trained.base_weights)
    return model


def test_identity_at_init_and_the_kernel_is_untouched(trained):
    # The two rank-r terms cancel exactly at init (same products).
    assert max_relative_difference(trained.init_outputs, trained.base) <= 1e-6
    for name, values in trained.initial.items():
        layer = trained.model.get_layer(name)
        np.testing.assert_array_equal(values["lora_a"], values["lora_a0"])
        np.testing.assert_array_equal(values["lora_b"], values["lora_b0"])
        w = layer._keras_adapters_kernel.to_matrix(trained.kernels[name])
        w = _numpy(w).astype("float64")
        a0, b0 = trained.adapter.initial_factors(w)
        np.testing.assert_allclose(values["lora_a0"], a0, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(values["lora_b0"], b0, rtol=1e-4, atol=1e-5)


def test_training_changes_a_b_only(trained):
    if trained.losses is not None:  # fit under XLA (PiSSA)
        assert trained.losses[-1] < trained.losses[0], trained.losses
    for name, kernel in trained.kernels.items():
        layer = trained.model.get_layer(name)
        np.testing.assert_array_equal(_numpy(layer._kernel), kernel)
        for short in ("lora_a0", "lora_b0"):
            variable = getattr(layer, short)
            assert not variable.trainable
            np.testing.assert_array_equal(
                _numpy(variable), trained.initial[name][short]
            )
        assert not np.array_equal(_numpy(layer.lora_b), trained.initial[name]["lora_b"])


def test_report_counts_the_kept_initial_factors(trained):
    assert trained.report.adapter_params == sum(
        int(np.prod(v.shape)) for v in ka.adapter_variables(trained.model)
    )


def test_file_loads_into_an_untouched_model(trained):
    fresh = _untouched(trained)
    ka.load_adapter_weights(fresh, trained.path)
    assert max_relative_difference(_numpy(fresh(CASE.x)), trained.outputs) <= 1e-6
    # The file holds the initial factors: no decomposition at load.
    for name in TARGETS:
        np.testing.assert_array_equal(
            _numpy(fresh.get_layer(name).lora_a0), trained.initial[name]["lora_a0"]
        )


def test_delete_leaves_the_kernel_bit_identical_and_merge_is_exact(trained):
    fresh = _untouched(trained)
    ka.load_adapter_weights(fresh, trained.path)
    ka.delete_adapter(fresh, "default")
    for name, kernel in trained.kernels.items():
        np.testing.assert_array_equal(_numpy(fresh.get_layer(name).kernel), kernel)
    fresh = _untouched(trained)
    ka.load_adapter_weights(fresh, trained.path)
    expected = {
        name: fresh.get_layer(name)._keras_adapters_kernel.to_matrix(kernel)
        for name, kernel in trained.kernels.items()
    }
    slots = {
        name: ka.layers.slots(fresh.get_layer(name))["default"] for name in TARGETS
    }
    values = {
        name: {
            k: v.astype("float64") for k, v in ka.adapters.base.numpy_values(s).items()
        }
        for name, s in slots.items()
    }
    ka.merge_adapters(fresh)
    assert max_relative_difference(_numpy(fresh(CASE.x)), trained.outputs) <= 1e-5
    for name in TARGETS:
        layer = fresh.get_layer(name)
        v = values[name]
        # W + s (A B - A0 B0), by NumPy.
        want = _numpy(expected[name]) + trained.adapter.scale * (
            v["lora_a"] @ v["lora_b"] - v["lora_a0"] @ v["lora_b0"]
        )
        got = _numpy(
            ka.layers.KernelView(
                layer.kernel.shape, getattr(layer, "equation", None)
            ).to_matrix(layer.kernel)
        )
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.max(np.abs(want)))


def test_keras_file_round_trip(trained, tmp_path):
    path = str(tmp_path / "model.keras")
    trained.model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(_numpy(loaded(CASE.x)), trained.outputs, atol=1e-6)
    assert ka.model.adapter_groups(loaded)[0].adapter == trained.adapter


# ------------------------------------------------------------- PEFT export

PEFT_DATA = os.path.join(os.path.dirname(__file__), "data", "peft")


@backend_independent
def test_peft_export_is_the_rank_2r_lora_of_the_untouched_base(tmp_path):
    """PEFT's `path_initial_model_for_weight_conversion` format: `[A, A0]`,
    `[B; -B0]`, r and alpha doubled, `init_lora_weights` true; loading it
    into an untouched backbone gives the PiSSA model's outputs."""
    import keras_hub

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
    ka.enable_adapter(model, ka.LoRA(rank=2, alpha=8, init="pissa"))
    rng = np.random.default_rng(0)
    for variable in ka.adapter_variables(model):
        if variable.trainable:
            variable.assign(
                _numpy(variable) + rng.normal(scale=0.05, size=variable.shape)
            )
    expected = _numpy(model(inputs)["sequence_output"])
    interop.save_peft_adapter(model, tmp_path / "peft")
    with open(tmp_path / "peft" / "adapter_config.json") as f:
        config = json.load(f)
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (
        4,
        16,
        True,
    )
    fresh = backbone()
    ka.interop.load_peft_adapter(fresh, tmp_path / "peft")
    got = _numpy(fresh(inputs)["sequence_output"])
    assert max_relative_difference(got, expected) <= 1e-5


# ------------------------------------------------------------------- LoftQ


def _dense_matrix(layer):
    kernel = ka.layers.check_supported(layer)
    return _numpy(kernel.to_matrix(kernel.dense())).astype("float64")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_loftq_base_plus_adapter_is_closer_to_the_float_weights(mode, tmp_path):
    """With one iteration the stored base is Keras' own quantization of `W`,
    so both errors are measured from the layer's tensors: its dequantized
    kernel `Q`, and `Q + s A B`."""
    model = CASE.build(0)
    floats = {n: _dense_matrix(model.get_layer(n)) for n in TARGETS}
    adapter = ka.LoRA(rank=4, alpha=8, init="loftq")
    report = ka.quantization.loftq(
        model, adapter, list(TARGETS), mode=mode, iterations=1
    )
    for (path, quant_error, loftq_error), n in zip(report.layers, TARGETS, strict=True):
        layer = model.get_layer(n)
        assert path == layer.path and layer.quantization_mode == mode
        w = floats[n]
        norm = np.linalg.norm(w)
        quantized = _dense_matrix(layer)
        alone = np.linalg.norm(w - quantized) / norm
        a, b = _numpy(layer.lora_a).astype("float64"), _numpy(layer.lora_b)
        error = np.linalg.norm(w - quantized - adapter.scale * a @ b) / norm
        assert quant_error == pytest.approx(alone, rel=1e-4)
        assert loftq_error == pytest.approx(error, rel=1e-3)
        assert error < 0.75 * alone, (mode, n, error, alone)
    assert f"LoftQ ({mode}, 1 iterations)" in str(report)
    if mode == "int8":
        return  # the file check below is the same for both modes
    # The file fits a fresh float model after the same (deterministic) call.
    for variable in ka.adapter_variables(model):
        variable.assign(_numpy(variable) * 1.1)
    outputs = _numpy(model(CASE.x))
    ka.save_adapter_weights(model, str(tmp_path / "loftq.weights.h5"))
    fresh = CASE.build(0)
    ka.quantization.loftq(fresh, adapter, list(TARGETS), mode=mode, iterations=1)
    ka.load_adapter_weights(fresh, str(tmp_path / "loftq.weights.h5"))
    np.testing.assert_allclose(_numpy(fresh(CASE.x)), outputs, rtol=1e-5, atol=1e-6)


@backend_independent
def test_loftq_needs_the_float_layer():
    model = CASE.build(0)
    with pytest.raises(ValueError, match=r"init='loftq'.*ka.quantization.loftq"):
        ka.enable_adapter(model, ka.LoRA(rank=2, init="loftq"), targets=["hidden"])
    assert ka.adapted_layers(model) == []
    with pytest.raises(ValueError, match=r"must be ka.LoRA\(..., init='loftq'\)"):
        ka.quantization.loftq(model, ka.LoRA(rank=2), ["hidden"])
    with pytest.raises(ValueError, match=r"`mode` must be one of \('int8', 'int4'\)"):
        ka.quantization.loftq(
            model, ka.LoRA(rank=2, init="loftq"), ["hidden"], mode="nf4"
        )
    model.get_layer("hidden").quantize("int8")
    with pytest.raises(ValueError, match=r"'hidden' is already quantized"):
        ka.quantization.loftq(model, ka.LoRA(rank=2, init="loftq"), ["hidden"])


def test_combining_includes_the_initial_factors(trained):
    fresh = _untouched(trained)
    ka.load_adapter_weights(fresh, trained.path)
    expected = {n: _numpy(fresh.get_layer(n).kernel) for n in TARGETS}
    ka.combine_adapters(fresh, {"default": 1.0}, name="copy")
    ka.set_active_adapters(fresh, ["copy"])
    for name in TARGETS:
        layer = fresh.get_layer(name)
        assert getattr(layer, "lora_a.copy").shape[-1] == 4  # [A, A0]
        np.testing.assert_allclose(_numpy(layer.kernel), expected[name], atol=1e-6)


@backend_independent
def test_peft_pissa_adapter_is_imported_on_the_recomputed_start(tmp_path):
    """PEFT re-runs PiSSA on the base when it loads an adapter saved with
    `init_lora_weights="pissa"`, then loads the trained factors; so does the
    import: the layer computes `W - s A0 B0 + s A B`, `s A0 B0` the truncated
    SVD of `W` (by NumPy here)."""
    import keras_hub

    def backbone():
        return keras_hub.models.BertBackbone.from_preset(
            os.path.join(PEFT_DATA, "bert")
        )

    model = backbone()
    ka.enable_adapter(model, ka.LoRA(rank=2, alpha=4))
    rng = np.random.default_rng(0)
    for variable in ka.adapter_variables(model):
        variable.assign(rng.normal(scale=0.05, size=variable.shape))
    interop.save_peft_adapter(model, tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    fresh = backbone()
    interop.load_peft_adapter(fresh, tmp_path / "peft")
    for layer in ka.adapted_layers(fresh):
        slot = ka.layers.slots(layer)["default"]
        w = _numpy(slot.kernel.to_matrix(slot.kernel.dense())).astype("float64")
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        a, b = _numpy(layer.lora_a), _numpy(layer.lora_b)
        want = w - (u[:, :2] * s[:2]) @ vt[:2] + 2.0 * a.astype("float64") @ b
        got = _numpy(slot.kernel.to_matrix(layer.kernel))
        np.testing.assert_allclose(got, want, atol=1e-5 * np.max(np.abs(want)))
    config_path.write_text(json.dumps({**config, "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(ValueError, match=r"pissa_niter_4.*randomized SVD"):
        interop.load_peft_adapter(backbone(), tmp_path / "peft")
