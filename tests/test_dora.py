"""DoRA against NumPy, and against Hugging Face PEFT's `use_dora=True`.

The NumPy reference is the paper's formula on the 2-D view of the kernel,
written out here independently of the library: `W' = m * V / ||V||_c` with
`V = W + s A B` and `||.||_c` the norm of each column over the input axis.
The shared matrix (`test_adapter_matrix.py`, `Test_dora`) adds the rest:
training under XLA, files, `.keras`, int8 bases, mixed precision, other
backend, several devices.
"""

import os
import shutil
import warnings

import keras
import keras_hub
import numpy as np
import pytest
import single_layer
from _fixtures import backend_independent
from single_layer import LAYOUTS
from single_layer import from_matrix
from single_layer import to_matrix

import keras_adapters as ka
from keras_adapters import interop
from keras_adapters import layers as adapter_layers

BACKEND = keras.backend.backend()
RNG = np.random.default_rng(11)
DATA = os.path.join(os.path.dirname(__file__), "data", "peft")


def build(layout, adapter=None, seed=0):
    """A one-layer model (random kernel and bias), inputs, and the layer,
    with `adapter` on it if given (`single_layer.build`)."""
    model, layer, x = single_layer.build(layout, seed)
    if adapter is not None:
        ka.enable_adapter(model, adapter, targets="proj")
    return model, layer, x


def numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x), "float64")


def project(layout, x, kernel):
    """The layer's contraction (no bias), in float64."""
    equation = LAYOUTS[layout][0]
    x = np.asarray(x, "float64")
    return x @ kernel if equation is None else np.einsum(equation, x, kernel)


def bias_of(layer):
    return 0.0 if layer.bias is None else numpy(layer.bias)


def randomize(layer, scale=0.5):
    """Random factors (a sizable update) and magnitudes away from ||V||_c."""
    for variable in adapter_layers.adapter_variables(layer).values():
        noise = RNG.normal(size=variable.shape) * scale
        if "magnitude" in variable.name:
            noise = np.abs(numpy(variable)) * (1.0 + noise)
        variable.assign(noise.astype("float32"))


def dora_values(layer):
    return {
        "a": numpy(layer.lora_a),
        "b": numpy(layer.lora_b),
        "m": numpy(layer.lora_magnitude),
    }


def reference_matrix(w, a, b, m, s):
    """`m * V / ||V||_c`, `V = W + s A B`, in float64."""
    v = w + s * a @ b
    return v * (m / np.linalg.norm(v, axis=0))[None, :]


# The formula.


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_identity_at_init_and_magnitude_is_the_column_norm(layout):
    model, layer, x = build(layout)
    base = numpy(model(x))
    w = to_matrix(layout, numpy(layer.kernel))
    ka.enable_adapter(model, ka.DoRA(rank=2, alpha=4), targets="proj")
    np.testing.assert_allclose(
        numpy(layer.lora_magnitude), np.linalg.norm(w, axis=0), rtol=1e-6
    )
    np.testing.assert_allclose(numpy(model(x)), base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layer_and_merge_match_the_numpy_formula(layout):
    adapter = ka.DoRA(rank=2, alpha=3, use_rslora=True)
    model, layer, x = build(layout, adapter)
    randomize(layer)
    w = to_matrix(layout, numpy(layer._kernel))
    values = dora_values(layer)
    adapted = reference_matrix(w, **values, s=3 / np.sqrt(2))
    kernel = from_matrix(layout, adapted, layer._kernel.shape)
    expected = project(layout, x, kernel) + bias_of(layer)
    # The bias is added after the magnitude scaling (PEFT's DoRA too).
    np.testing.assert_allclose(numpy(model(x)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(numpy(layer.kernel), kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        adapter.reference_matrix(values_by_name(layer), w), adapted, rtol=1e-12
    )
    # Merged == unmerged, and the merged kernel is the formula's.
    unmerged = numpy(model(x))
    ka.merge_adapters(model)
    assert type(layer) in adapter_layers.SUPPORTED_LAYERS
    np.testing.assert_allclose(numpy(layer.kernel), kernel, rtol=1e-5, atol=1e-6)
    difference = np.max(np.abs(numpy(model(x)) - unmerged)) / np.max(np.abs(unmerged))
    # float32 over a 384-wide contraction: TensorFlow's threaded reductions
    # reached 1.2e-6 once under load (a wrong merge is off by far more).
    assert difference <= 5e-6


def values_by_name(layer):
    return {
        name: numpy(v) for name, v in adapter_layers.slots(layer)["default"].items()
    }


@pytest.mark.parametrize("layout", ["dense", "gemma"])
def test_column_norms_without_the_full_matrix_are_exact(layout):
    """`column_norms` (`||W||^2 + 2 s colsum((A^T W) B) + s^2 ...`, no
    `d_in x d_out` temporary) against `||W + s A B||_c` in float64, for an
    update as large as the kernel."""
    adapter = ka.DoRA(rank=2, alpha=4)
    _, layer, _ = build(layout, adapter)
    randomize(layer, scale=1.0)
    slot = adapter_layers.slots(layer)["default"]
    w = to_matrix(layout, numpy(layer._kernel))
    v = w + adapter.scale * numpy(layer.lora_a) @ numpy(layer.lora_b)
    assert np.linalg.norm(v - w) > 0.5 * np.linalg.norm(w)
    norms = numpy(adapter.column_norms(slot, slot.kernel))
    np.testing.assert_allclose(norms, np.linalg.norm(v, axis=0), rtol=2e-6)


def value_and_gradients(model, layer, x, upstream, names):
    """`sum(model(x) * upstream)` and its gradient for the variables `names`
    of `layer`, with the current backend's autodiff."""
    variables = [getattr(layer, name) for name in names]
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss(trainable):
            y, _ = model.stateless_call(trainable, non_trainable, x)
            return jnp.sum(y * upstream)

        value, grads = jax.value_and_grad(loss)(trainable)
        by_id = {
            id(v): g for v, g in zip(model.trainable_variables, grads, strict=True)
        }
        return float(value), [np.asarray(by_id[id(v)], "float64") for v in variables]
    import tensorflow as tf

    with tf.GradientTape() as tape:
        value = tf.reduce_sum(model(x) * upstream)
    grads = tape.gradient(value, variables)
    return float(value), [np.asarray(g, "float64") for g in grads]


@pytest.mark.parametrize("layout", ["dense", "gemma"])
def test_gradients_treat_the_norm_as_a_constant(layout):
    """Gradients of `m`, `A`, `B` against central finite differences in
    float64 of the formula with `||V||_c` frozen at its current value (the
    paper's and PEFT's stop-gradient); the gradient through the norm
    differs, so the check would see a norm that is not detached."""
    adapter = ka.DoRA(rank=2, alpha=4)
    model, layer, x = build(layout, adapter)
    randomize(layer)
    upstream = RNG.normal(size=numpy(model(x)).shape).astype("float32")
    names = ["lora_magnitude", "lora_a", "lora_b"]
    value, grads = value_and_gradients(model, layer, x, upstream, names)
    w = to_matrix(layout, numpy(layer._kernel))
    start = dora_values(layer)
    s = adapter.scale
    frozen = np.linalg.norm(w + s * start["a"] @ start["b"], axis=0)

    def loss(values, detached):
        v = w + s * values["a"] @ values["b"]
        norms = frozen if detached else np.linalg.norm(v, axis=0)
        kernel = from_matrix(layout, v * (values["m"] / norms), layer._kernel.shape)
        return np.sum((project(layout, x, kernel) + bias_of(layer)) * upstream)

    def finite_differences(detached, eps=1e-6):
        result = []
        for key in ("m", "a", "b"):
            grad = np.zeros_like(start[key])
            for index in np.ndindex(grad.shape):
                plus = {k: v.copy() for k, v in start.items()}
                minus = {k: v.copy() for k, v in start.items()}
                plus[key][index] += eps
                minus[key][index] -= eps
                grad[index] = (loss(plus, detached) - loss(minus, detached)) / (2 * eps)
            result.append(grad)
        return result

    assert value == pytest.approx(loss(start, True), rel=1e-5)
    detached = finite_differences(True)
    through_norm = finite_differences(False)
    for name, got, want, other in zip(
        names, grads, detached, through_norm, strict=True
    ):
        scale = np.max(np.abs(want))
        np.testing.assert_allclose(got, want, atol=1e-4 * scale, err_msg=name)
        if name != "lora_magnitude":  # `m` does not enter the norm.
            assert np.max(np.abs(other - want)) > 1e-2 * scale, name


def test_dropout_follows_peft():
    """Training with dropout: `x W + (f - 1) (d(x) W) + f s (d(x) A) B` with
    `f = m / ||V||_c` and `d(x)` the dropped-out inputs, as PEFT computes
    it (the base term on the undropped inputs)."""
    adapter = ka.DoRA(rank=2, alpha=4, dropout=0.5)
    _, layer, x = build("bert", adapter)
    randomize(layer)
    seed = layer.lora_dropout_seed
    state = numpy(seed.state).astype(seed.state.dtype)
    got = numpy(layer(x, training=True))
    replay = keras.random.SeedGenerator()
    replay.state.assign(state)
    dropped = numpy(
        keras.random.dropout(keras.ops.convert_to_tensor(x), 0.5, seed=replay)
    )
    assert 0 < np.mean(dropped == 0) < 1
    w = to_matrix("bert", numpy(layer._kernel))
    values = dora_values(layer)
    s = adapter.scale
    factor = values["m"] / np.linalg.norm(w + s * values["a"] @ values["b"], axis=0)
    shape = layer._kernel.shape

    def through(matrix, inputs):
        return project("bert", inputs, from_matrix("bert", matrix, shape))

    expected = (
        through(w, x)
        + through((factor - 1) * w, dropped)
        + through(factor * (s * values["a"] @ values["b"]), dropped)
        + bias_of(layer)
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # Without `training`, no dropout: the formula of the other tests.
    adapted = reference_matrix(w, **values, s=s)
    np.testing.assert_allclose(
        numpy(layer(x)), through(adapted, x) + bias_of(layer), rtol=1e-5, atol=1e-5
    )


def test_on_top_of_a_lora_adapter_of_the_same_layer():
    """Named adapters apply in the order they were added: DoRA then
    decomposes `W + s_l A_l B_l`, the kernel LoRA left."""
    model, layer, x = build("dense", ka.LoRA(rank=2, alpha=2))
    ka.enable_adapter(model, ka.DoRA(rank=2, alpha=4), targets="proj", name="dora")
    randomize(layer)
    slots = adapter_layers.slots(layer)
    lora = {k: numpy(v) for k, v in slots["default"].items()}
    dora = {k: numpy(v) for k, v in slots["dora"].items()}
    w = numpy(layer._kernel) + lora["lora_a"] @ lora["lora_b"]
    adapted = reference_matrix(
        w, dora["lora_a"], dora["lora_b"], dora["lora_magnitude"], s=2.0
    )
    expected = x @ adapted + bias_of(layer)
    np.testing.assert_allclose(numpy(model(x)), expected, rtol=1e-5, atol=1e-5)


# Construction and errors.


@backend_independent
def test_config_round_trip_and_validation():
    dora = ka.DoRA(rank=4, alpha=8, use_rslora=True, dropout=0.1)
    assert ka.Adapter.deserialize(dora.serialize()) == dora
    assert dora.scale == pytest.approx(4.0)
    assert ka.DoRA(rank=4).scale == 1.0
    with pytest.raises(ValueError, match=r"`rank` must be a positive int.*received 0"):
        ka.DoRA(rank=0)
    with pytest.raises(ValueError, match=r"`dropout` must be .*\[0, 1\)"):
        ka.DoRA(rank=2, dropout=1.0)
    with pytest.raises(ValueError, match=r"`alpha` must be .*received nan"):
        ka.DoRA(rank=2, alpha=float("nan"))
    with pytest.raises(ValueError, match=r"`use_rslora` must be a bool"):
        ka.DoRA(rank=2, use_rslora="yes")


def test_parameter_count_and_rank_check():
    model, layer, _ = build("gemma")
    report = ka.enable_adapter(model, ka.DoRA(rank=3), targets="proj")
    # A (6 x 3) + B (3 x 8) + m (8,)
    assert report.adapter_params == 6 * 3 + 3 * 8 + 8
    model, _, _ = build("dense")
    with pytest.raises(ValueError, match=r"DoRA rank 6 is larger than min"):
        ka.enable_adapter(model, ka.DoRA(rank=6), targets="proj")
    assert ka.adapted_layers(model) == []


@backend_independent
def test_roles_select_factors_and_magnitudes():
    model, layer, _ = build("dense", ka.DoRA(rank=2))
    selected = {
        name: [v.name for v in model.trainable_variables if ka.role(name).matches(v)]
        for name in ("A", "B", "magnitude")
    }
    assert selected == {
        "A": ["lora_a"],
        "B": ["lora_b"],
        "magnitude": ["lora_magnitude"],
    }


# Hugging Face PEFT (`use_dora=True`): fixtures written by
# `tests/data/make_peft_fixtures.py --dora`.

PEFT_OUTPUTS = np.load(os.path.join(DATA, "outputs.npz"))
DORA_OUTPUTS = np.load(os.path.join(DATA, "outputs_dora.npz"))
DORA_FIXTURES = {"bert_dora": "bert", "gemma_dora": "gemma"}
BACKBONES = {
    "bert": keras_hub.models.BertBackbone,
    "gemma": keras_hub.models.GemmaBackbone,
}


def backbone(kind):
    return BACKBONES[kind].from_preset(os.path.join(DATA, kind))


def sequence_output(model):
    inputs = {
        "token_ids": PEFT_OUTPUTS["token_ids"],
        "padding_mask": PEFT_OUTPUTS["padding_mask"],
    }
    if isinstance(model, keras_hub.models.BertBackbone):
        inputs["segment_ids"] = np.zeros_like(PEFT_OUTPUTS["token_ids"])
    outputs = model(inputs)
    if isinstance(outputs, dict):
        outputs = outputs["sequence_output"]
    return numpy(outputs)


@pytest.mark.parametrize("fixture", sorted(DORA_FIXTURES))
def test_peft_dora_adapter_matches_pytorch(fixture, tmp_path):
    kind = DORA_FIXTURES[fixture]
    model = backbone(kind)
    report = interop.load_peft_adapter(model, os.path.join(DATA, fixture))
    assert isinstance(report.adapter, ka.DoRA)
    expected = DORA_OUTPUTS[f"{fixture}/sequence_output"]
    np.testing.assert_allclose(sequence_output(model), expected, atol=1e-4, rtol=1e-4)
    # The adapter (its magnitudes) changes the outputs: not a vacuous check.
    assert np.max(np.abs(expected - PEFT_OUTPUTS[f"{kind}/sequence_output"])) > 1.0

    # Saved as PEFT and imported into a fresh model: the same tensors.
    path = tmp_path / "exported"
    interop.save_peft_adapter(model, path)
    config = interop._read_config(path)
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    original = interop._read_safetensors(
        os.path.join(DATA, fixture, interop.WEIGHTS_FILE)
    )
    exported = interop._read_safetensors(os.path.join(path, interop.WEIGHTS_FILE))
    assert exported.keys() == original.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)

    # Merged: the formula folded into the kernels, same outputs.
    ka.merge_adapters(model)
    np.testing.assert_allclose(sequence_output(model), expected, atol=1e-4, rtol=1e-4)


@backend_independent
def test_dora_tensors_must_be_complete(tmp_path):
    directory = tmp_path / "no_magnitudes"
    shutil.copytree(os.path.join(DATA, "bert_dora"), directory)
    path = str(directory / interop.WEIGHTS_FILE)
    tensors = interop._read_safetensors(path)
    tensors = {k: v for k, v in tensors.items() if "magnitude" not in k}
    pytest.importorskip("safetensors.numpy").save_file(tensors, path)
    model = backbone("bert")
    with pytest.raises(ValueError, match=r"lacks lora_A or lora_B or lora_magnitude"):
        interop.load_peft_adapter(model, directory)
    assert ka.adapted_layers(model) == []


def test_live_export_loads_in_peft_with_the_same_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = backbone("gemma")
    ka.enable_adapter(model, ka.DoRA(rank=2, alpha=3), targets=[r".*"])
    for layer in ka.adapted_layers(model):
        randomize(layer, scale=0.3)
    expected = sequence_output(model)
    path = str(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        interop.save_peft_adapter(model, path)
    hf_model = transformers.GemmaForCausalLM.from_pretrained(
        os.path.join(DATA, "gemma")
    )
    peft_model = peft.PeftModel.from_pretrained(hf_model, path).eval()
    with torch.no_grad():
        outputs = peft_model.base_model.model.model(
            input_ids=torch.tensor(PEFT_OUTPUTS["token_ids"], dtype=torch.long),
            attention_mask=torch.tensor(PEFT_OUTPUTS["padding_mask"], dtype=torch.long),
        )
    actual = outputs.last_hidden_state.numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-4)
    base = PEFT_OUTPUTS["gemma/sequence_output"]
    assert np.abs(actual - base).max() > 0.1
