"""qGOFT and GOFT against an independent NumPy reference.

The reference builds `R` as an explicit product of `d x d` Givens matrices,
`R = P_K ... P_2 P_1` (the authors' code, the default) or `P_1 P_2 ... P_K`
(`stage_order="stage1_first"`), stage `k` pairing `(2^k m, 2^k m + 2^(k-1))`,
from the values of the adapter's variables (set to random, non-identity
values), and compares the layer's output and its merged kernel with `x R W`
and `R W`. Adapter files written before the stage order was recorded
(`tests/data/qgoft_v1/`, written by keras_adapters at commit fff80cd) load
with their old meaning and give the outputs saved beside them.
"""

import math
import os

import keras
import numpy as np
import pytest
from _fixtures import backend_independent
from single_layer import LAYOUTS
from single_layer import build
from single_layer import from_matrix
from single_layer import output
from single_layer import to_matrix

import keras_adapters as ka
from keras_adapters import layers as adapter_layers
from keras_adapters import model as adapter_model

RNG = np.random.default_rng(1234)


# ----------------------------------------------------------------- reference


def reference_pairs(d):
    """Stage by stage, the pairs `(2^k m, 2^k m + 2^(k-1))` with `j < d`."""
    stages, stride = [], 1
    while stride < d:
        stages.append(
            [(i, i + stride) for i in range(0, d, 2 * stride) if i + stride < d]
        )
        stride *= 2
    return stages


def reference_blocks(adapter, layer):
    """The `(d - 1, 2, 2)` blocks `[[g00, g01], [g10, g11]]` in stage order."""
    if isinstance(adapter, ka.GOFT):
        t = np.asarray(layer.goft_cayley, "float64")
        theta = 2.0 * np.arctan(t)
        cos, sin = np.cos(theta), np.sin(theta)
        return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    return np.asarray(layer.qgoft_blocks, "float64")


def reference_rotation(blocks, d, stage_order="authors"):
    """`R` as a dense `d x d` matrix (float64): `P_K ... P_1` (authors) or
    `P_1 ... P_K` (stage1_first)."""
    factors, index = [], 0
    for stage in reference_pairs(d):
        factor = np.eye(d)
        for i, j in stage:
            factor[np.ix_([i, j], [i, j])] = blocks[index]
            index += 1
        factors.append(factor)
    assert index == len(blocks) == d - 1
    if stage_order == "authors":
        factors = factors[::-1]
    rotation = np.eye(d)
    for factor in factors:
        rotation = rotation @ factor
    return rotation


def reference_scale(adapter, layer, d):
    if not adapter.scale:
        return np.ones(d)
    return np.asarray(getattr(layer, adapter.method + "_scale"), "float64")


def randomize(layer, spread=0.5):
    """Random, non-identity values for every adapter variable of `layer`."""
    for variable in adapter_layers.adapter_variables(layer).values():
        value = np.asarray(variable) + spread * RNG.normal(size=variable.shape)
        variable.assign(value.astype("float32"))


# ------------------------------------------------------------------- layers


def layer_output(layout, layer, x, matrix):
    """`x` through `layer` with its 2-D view replaced by `matrix` (NumPy)."""
    return output(layout, layer, x, from_matrix(layout, matrix, layer._kernel.shape))


ADAPTERS = {
    "goft": lambda: ka.GOFT(),
    "goft_scaled": lambda: ka.GOFT(scale=True),
    "qgoft": lambda: ka.QGOFT(orthogonality=1e-2),
    "qgoft_scaled": lambda: ka.QGOFT(orthogonality=0.0, scale=True),
    "qgoft_stage1_first": lambda: ka.QGOFT(1e-2, stage_order="stage1_first"),
    "goft_stage1_first": lambda: ka.GOFT(scale=True, stage_order="stage1_first"),
}


def adapted(layout, adapter_id, seed=0):
    model, layer, x = build(layout, seed)
    base = keras.ops.convert_to_numpy(model(x))
    adapter = ADAPTERS[adapter_id]()
    ka.enable_adapter(model, adapter, targets="proj")
    return model, layer, x, base, adapter


# ------------------------------------------------------------------- tests


@backend_independent
@pytest.mark.parametrize("d", [2, 3, 4, 5, 7, 8, 384, 768])
def test_reference_pairing_has_d_minus_1_blocks(d):
    stages = ka.adapters.qgoft.givens_pairs(d)
    assert stages == reference_pairs(d)
    assert len(stages) == math.ceil(math.log2(d))
    assert sum(len(s) for s in stages) == d - 1
    assert ka.adapters.qgoft.givens_pairs(5) == [[(0, 1), (2, 3)], [(0, 2)], [(0, 4)]]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("adapter_id", list(ADAPTERS))
def test_identity_at_init(layout, adapter_id):
    model, _, x, base, _ = adapted(layout, adapter_id)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), base, atol=1e-6)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("adapter_id", list(ADAPTERS))
def test_output_and_merge_match_reference(layout, adapter_id):
    model, layer, x, _, adapter = adapted(layout, adapter_id)
    randomize(layer)
    base = to_matrix(layout, layer._kernel)
    d = base.shape[0]
    rotation = reference_rotation(
        reference_blocks(adapter, layer), d, adapter.stage_order
    )
    merged = rotation @ np.diag(reference_scale(adapter, layer, d)) @ base
    expected = layer_output(layout, layer, x, merged)
    # The reference R is not the identity: the test can tell.
    assert np.max(np.abs(rotation - np.eye(d))) > 0.1

    outputs = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)
    # The effective kernel (the merge computation) equals R diag(c) W.
    kernel = to_matrix(layout, keras.ops.convert_to_numpy(layer.kernel))
    np.testing.assert_allclose(kernel, merged, rtol=1e-4, atol=1e-4)

    ka.merge_adapters(model)
    assert not adapter_layers.is_adapted(layer)
    np.testing.assert_allclose(
        to_matrix(layout, layer._kernel), merged, rtol=1e-4, atol=1e-4
    )
    # float32 sums over up to 384 inputs: tolerance relative to the outputs.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x)),
        outputs,
        rtol=1e-5,
        atol=1e-6 * np.max(np.abs(outputs)),
    )


@pytest.mark.parametrize("d", [2, 3, 5, 8, 13])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("stage_order", ["authors", "stage1_first"])
def test_apply_givens_matches_reference(d, transpose, stage_order):
    blocks = RNG.normal(size=(d - 1, 2, 2))
    stages, start = [], 0
    for _, pairs in ka.adapters.qgoft.givens_stages(d):
        chunk = blocks[start : start + pairs].astype("float32")
        stages.append(tuple(chunk[:, i, j] for i in (0, 1) for j in (0, 1)))
        start += pairs
    x = RNG.normal(size=(6, d)).astype("float32")
    out = ka.adapters.qgoft.apply_givens(
        x, stages, d, transpose=transpose, stage_order=stage_order
    )
    rotation = reference_rotation(blocks, d, stage_order)
    expected = x @ (rotation.T if transpose else rotation)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(out), expected, rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("d", [5, 64, 384])
def test_goft_rotation_is_orthogonal(d):
    model, layer = build_dense(d)
    ka.enable_adapter(model, ka.GOFT(), targets="proj")
    layer.goft_cayley.assign(RNG.normal(size=(d - 1,)).astype("float32") * 2.0)
    # R = R I: the adapted matrix of the identity, computed by the layer.
    rotation = keras.ops.convert_to_numpy(
        ka.GOFT().adapted_matrix(
            adapter_layers.slots(layer)["default"], keras.ops.eye(d)
        )
    ).astype("float64")
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(d), atol=1e-6)
    reference = reference_rotation(reference_blocks(ka.GOFT(), layer), d)
    np.testing.assert_allclose(rotation, reference, atol=1e-5)


def build_dense(d_in, d_out=3):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((d_in,))
    layer = keras.layers.Dense(d_out, name="proj")
    return keras.Model(inputs, layer(inputs)), layer


# Counts of variables (shapes), the same under every backend.
@backend_independent
@pytest.mark.parametrize(
    "d, qgoft, goft", [(768, 3068, 767), (384, 1532, 383), (5, 16, 4), (2, 4, 1)]
)
def test_parameter_counts(d, qgoft, goft):
    for adapter, expected in [
        (ka.QGOFT(), qgoft),
        (ka.GOFT(), goft),
        (ka.QGOFT(scale=True), qgoft + d),
        (ka.GOFT(scale=True), goft + d),
    ]:
        model, _ = build_dense(d)
        report = ka.enable_adapter(model, adapter, targets="proj")
        actual = sum(math.prod(v.shape) for v in ka.adapter_variables(model))
        assert report.adapter_params == actual == expected, adapter


def soft_orthogonality_reference(blocks, strength):
    """Value and analytic gradient of `strength * sum <alpha, beta>^2`."""
    blocks = np.asarray(blocks, "float64")
    alpha, beta = blocks[..., :, 0], blocks[..., :, 1]
    inner = np.sum(alpha * beta, axis=-1)
    value = strength * np.sum(inner**2)
    gradient = np.empty_like(blocks)
    gradient[..., :, 0] = 2.0 * strength * inner[..., None] * beta
    gradient[..., :, 1] = 2.0 * strength * inner[..., None] * alpha
    return value, gradient


def value_and_gradient(fn, x):
    """`fn(x)` and its gradient with the current backend's autodiff."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        value, gradient = jax.value_and_grad(fn)(keras.ops.convert_to_tensor(x))
    elif backend == "tensorflow":
        import tensorflow as tf

        variable = tf.Variable(x)
        with tf.GradientTape() as tape:
            value = fn(variable)
        gradient = tape.gradient(value, variable)
    elif backend == "torch":
        import torch

        tensor = torch.tensor(x, requires_grad=True)
        value = fn(tensor)
        value.backward()
        gradient = tensor.grad
    else:
        pytest.skip(f"no autodiff helper for backend {backend!r}")
    return (
        float(keras.ops.convert_to_numpy(value)),
        keras.ops.convert_to_numpy(gradient),
    )


def test_soft_orthogonality_value_and_gradient():
    blocks = RNG.normal(size=(7, 2, 2)).astype("float32")
    penalty = ka.SoftOrthogonality(0.3)
    expected_value, expected_gradient = soft_orthogonality_reference(blocks, 0.3)
    value, gradient = value_and_gradient(penalty, blocks)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-4, atol=1e-6)
    # And a central finite difference of the NumPy value, for the analytic form.
    eps, index = 1e-6, (3, 1, 0)
    shifted = [blocks.astype("float64") for _ in range(2)]
    shifted[0][index] += eps
    shifted[1][index] -= eps
    numeric = (
        soft_orthogonality_reference(shifted[0], 0.3)[0]
        - soft_orthogonality_reference(shifted[1], 0.3)[0]
    ) / (2 * eps)
    np.testing.assert_allclose(expected_gradient[index], numeric, rtol=1e-5)
    # Orthogonal columns cost nothing; the identity neither.
    assert float(penalty(keras.ops.eye(2)[None])) == 0.0


def test_penalty_is_in_model_losses_and_in_fit_loss():
    model, layer = build_dense(6, 2)
    ka.enable_adapter(model, ka.QGOFT(orthogonality=0.05), targets="proj")
    assert [float(v) for v in model.losses] == [0.0]  # identity blocks
    randomize(layer)
    expected, _ = soft_orthogonality_reference(layer.qgoft_blocks, 0.05)
    assert expected > 1e-3
    losses = model.losses
    assert len(losses) == 1
    np.testing.assert_allclose(float(losses[0]), expected, rtol=1e-5)

    x = RNG.normal(size=(8, 6)).astype("float32")
    y = RNG.normal(size=(8, 2)).astype("float32")
    task = np.mean((keras.ops.convert_to_numpy(model(x)) - y) ** 2)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", jit_compile=True)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], task + expected, rtol=1e-4)


def test_penalty_is_trained_away_by_fit():
    model, layer = build_dense(6, 2)
    ka.enable_adapter(model, ka.QGOFT(orthogonality=1.0), targets="proj")
    randomize(layer)
    before = float(model.losses[0])
    steps = 30
    # No task gradient: only the penalty. One epoch of 30 identical batches is
    # the same 30 Adam steps as 30 epochs of one, without 29 epoch overheads.
    x = np.zeros((8 * steps, 6), "float32")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", jit_compile=True)
    model.fit(x, np.zeros((8 * steps, 2), "float32"), batch_size=8, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == steps
    assert float(model.losses[0]) < 0.5 * before


@pytest.mark.parametrize("adapter", [ka.QGOFT(orthogonality=0), ka.GOFT()])
def test_no_penalty_without_orthogonality(adapter):
    model, layer = build_dense(6, 2)
    ka.enable_adapter(model, adapter, targets="proj")
    randomize(layer)
    assert model.losses == []
    x = RNG.normal(size=(8, 6)).astype("float32")
    y = RNG.normal(size=(8, 2)).astype("float32")
    task = np.mean((keras.ops.convert_to_numpy(model(x)) - y) ** 2)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], task, rtol=1e-4)


@backend_independent
@pytest.mark.parametrize(
    "adapter",
    [
        ka.GOFT(),
        ka.GOFT(scale=True),
        ka.QGOFT(),
        ka.QGOFT(0.05, scale=True),
        ka.QGOFT(stage_order="stage1_first"),
    ],
    ids=repr,
)
def test_config_round_trip(adapter):
    config = adapter.get_config()
    assert type(adapter).from_config(config) == adapter
    assert ka.Adapter.deserialize(adapter.serialize()) == adapter
    assert (
        keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(adapter)
        )
        == adapter
    )


@backend_independent
def test_regularizer_config_round_trip():
    penalty = ka.SoftOrthogonality(0.25)
    assert penalty.get_config() == {"strength": 0.25}
    restored = keras.regularizers.deserialize(keras.regularizers.serialize(penalty))
    assert isinstance(restored, ka.SoftOrthogonality)
    assert restored.strength == 0.25
    assert ka.SoftOrthogonality.from_config(penalty.get_config()).strength == 0.25


@backend_independent
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ka.QGOFT(orthogonality=-1e-3), "orthogonality"),
        (lambda: ka.QGOFT(orthogonality="0.1"), "orthogonality"),
        (lambda: ka.QGOFT(orthogonality=True), "orthogonality"),
        (lambda: ka.QGOFT(orthogonality=None), "orthogonality"),
        (lambda: ka.QGOFT(scale=1), "scale"),
        (lambda: ka.QGOFT(scale="yes"), "scale"),
        (lambda: ka.GOFT(scale=None), "scale"),
        (lambda: ka.GOFT(scale=0), "scale"),
        (lambda: ka.GOFT(stage_order="reverse"), "stage_order"),
        (lambda: ka.QGOFT(stage_order=None), "stage_order"),
        (lambda: ka.SoftOrthogonality(0), "strength"),
        (lambda: ka.SoftOrthogonality(-1.0), "strength"),
        (lambda: ka.SoftOrthogonality("big"), "strength"),
    ],
)
def test_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("adapter", [ka.GOFT(), ka.QGOFT()], ids=repr)
def test_input_dimension_one_is_rejected(adapter):
    model, layer = build_dense(1, 4)
    with pytest.raises(ValueError, match="d_in >= 2"):
        ka.enable_adapter(model, adapter, targets="proj")
    assert not adapter_layers.is_adapted(layer)
    assert ka.adapter_variables(model) == []


@pytest.mark.parametrize("adapter", [ka.GOFT(scale=True), ka.QGOFT(0.01)], ids=repr)
def test_mixed_precision_keeps_adapter_float32(adapter):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model, layer = build_dense(6, 3)
        ka.enable_adapter(model, adapter, targets="proj")
        randomize(layer, spread=0.1)
        x = RNG.normal(size=(4, 6)).astype("float32")
        outputs = model(x)
        assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
        assert all(v.dtype == "float32" for v in ka.adapter_variables(model))
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        expected = x @ kernel + keras.ops.convert_to_numpy(layer.bias)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(keras.ops.cast(outputs, "float32")),
            expected,
            rtol=5e-2,
            atol=5e-2,
        )
    finally:
        keras.config.set_dtype_policy(previous)


# ------------------------------------------------------- stage order and files


@backend_independent
def test_orders_differ_from_d_3_and_are_transposes():
    blocks = RNG.normal(size=(2, 2, 2))
    authors = reference_rotation(blocks, 3, "authors")
    stage1_first = reference_rotation(blocks, 3, "stage1_first")
    assert np.max(np.abs(authors - stage1_first)) > 0.1
    # Neither family contains the other: structural zeros differ.
    assert authors[1, 2] == 0 and stage1_first[2, 1] == 0
    transposed = reference_rotation(np.swapaxes(blocks, -1, -2), 3, "authors")
    np.testing.assert_allclose(stage1_first, transposed.T)
    # d = 2 has one stage: both orders agree.
    one = RNG.normal(size=(1, 2, 2))
    np.testing.assert_allclose(
        reference_rotation(one, 2, "authors"),
        reference_rotation(one, 2, "stage1_first"),
    )


@backend_independent
def test_config_without_stage_order_means_stage1_first():
    # What adapter files written before the key existed contain.
    assert ka.QGOFT.from_config({"orthogonality": 0.01, "scale": False}) == ka.QGOFT(
        0.01, stage_order="stage1_first"
    )
    assert ka.Adapter.deserialize({"method": "goft", "config": {"scale": True}}) == (
        ka.GOFT(scale=True, stage_order="stage1_first")
    )
    assert ka.QGOFT().stage_order == "authors"


OLD_FILES = os.path.join(os.path.dirname(__file__), "data", "qgoft_v1")


@pytest.mark.parametrize(
    "name, adapter",
    [
        ("qgoft", ka.QGOFT(orthogonality=1e-2, stage_order="stage1_first")),
        ("goft_scaled", ka.GOFT(scale=True, stage_order="stage1_first")),
    ],
)
def test_old_adapter_file_loads_with_its_meaning(name, adapter):
    saved = np.load(os.path.join(OLD_FILES, f"{name}.npz"))
    path = os.path.join(OLD_FILES, f"{name}.adapter.weights.h5")
    spec = ka.read_adapter_spec(path)
    assert "stage_order" not in spec["groups"][0]["adapter"]["config"]

    def fresh(config=None):
        inputs = keras.Input((5,))
        layer = keras.layers.Dense(3, name="proj")
        model = keras.Model(inputs, layer(inputs))
        layer.kernel.assign(saved["kernel"])
        layer.bias.assign(saved["bias"])
        if config is not None:
            ka.enable_adapter(model, config, targets="proj")
        return model, layer

    # Into a fresh base model: the file's config (no key: stage 1 first)
    # re-creates the adapter, and the outputs are the ones saved with it.
    model, layer = fresh()
    ka.load_adapter_weights(model, path)
    assert [g.adapter for g in adapter_model.adapter_groups(model)] == [adapter]
    outputs = keras.ops.convert_to_numpy(model(saved["x"]))
    np.testing.assert_allclose(outputs, saved["y"], rtol=1e-5, atol=1e-5)
    # Into a model adapted in today's default order: refused, model unchanged.
    authors = type(adapter)(**{**adapter.get_config(), "stage_order": "authors"})
    other, other_layer = fresh(authors)
    with pytest.raises(ValueError, match="differ from the file"):
        ka.load_adapter_weights(other, path)
    assert [g.adapter for g in adapter_model.adapter_groups(other)] == [authors]
    # The same blocks in the authors' order are another matrix (d = 5).
    for variable, value in zip(
        ka.adapter_variables(other), ka.adapter_variables(model), strict=True
    ):
        variable.assign(value)
    different = keras.ops.convert_to_numpy(other(saved["x"]))
    assert np.max(np.abs(different - saved["y"])) > 1e-3
