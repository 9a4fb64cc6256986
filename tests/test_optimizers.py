"""Per-variable learning-rate multipliers (`ka.optimizers`).

Each test runs under the session's Keras backend; run the file once with
`KERAS_BACKEND=jax` and once with `KERAS_BACKEND=tensorflow`.
"""

import math

import keras
import numpy as np
import pytest
from _fixtures import Checkpoint
from _fixtures import backend_independent
from cases import MODELS

import keras_adapters as ka
from keras_adapters import optimizers as kopt

LR = 0.01
BATCH = 8
rng = np.random.default_rng(0)
X = rng.normal(size=(BATCH, 3, 4)).astype("float32")
Y = rng.normal(size=(BATCH, 2)).astype("float32")


def _model(seed=0):
    """Dense + EinsumDense, paths `proj/kernel`, `proj/bias`, `head/...`."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3, 4))
    x = keras.layers.EinsumDense(
        "abc,cd->abd", output_shape=(3, 6), bias_axes="d", name="proj"
    )(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inputs, outputs)


def _fit(optimizer, steps=1, seed=0, batch_size=BATCH):
    model = _model(seed)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=True)
    model.fit(X, Y, epochs=steps, batch_size=batch_size, shuffle=False, verbose=0)
    return model


def _weights(model):
    return {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}


def _state(optimizer):
    return [keras.ops.convert_to_numpy(v) for v in optimizer.variables]


OPTIMIZERS = {
    "sgd": lambda lr: keras.optimizers.SGD(lr, momentum=0.9),
    "adam": lambda lr: keras.optimizers.Adam(lr),
    "adamw": lambda lr: keras.optimizers.AdamW(lr, weight_decay=0.1),
    "lion": lambda lr: keras.optimizers.Lion(lr, weight_decay=0.05),
    # Nadam overrides `_backend_update_step` with a once-per-step update.
    "nadam": lambda lr: keras.optimizers.Nadam(lr),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_one_step_equals_bare_optimizer_at_multiplied_rate(name):
    make = OPTIMIZERS[name]
    m = 3.0
    wrapped = _weights(_fit(kopt.lr_multipliers(make(LR), {r"head/.*": m})))
    # The bare optimizer at LR and at LR * m: one model and one compiled train
    # step (the learning rate is a variable), put back to its initial state
    # between the two runs.
    model = _model()
    optimizer = make(LR)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=True)
    optimizer.build(model.trainable_variables)
    initial = Checkpoint(model)
    model.fit(X, Y, epochs=1, batch_size=BATCH, shuffle=False, verbose=0)
    bare = _weights(model)
    initial.restore()
    optimizer.learning_rate = LR * m
    model.fit(X, Y, epochs=1, batch_size=BATCH, shuffle=False, verbose=0)
    scaled = _weights(model)
    for path in ("head/kernel", "head/bias"):
        np.testing.assert_allclose(wrapped[path], scaled[path], rtol=1e-6, atol=1e-7)
    for path in ("proj/kernel", "proj/bias"):
        np.testing.assert_array_equal(wrapped[path], bare[path])
    # The update is not the bare optimizer's at the base rate.
    assert not np.allclose(wrapped["head/kernel"], bare["head/kernel"])


def test_multiplier_one_is_bit_identical_to_the_bare_optimizer():
    def make():
        return keras.optimizers.AdamW(LR, weight_decay=0.1, clipnorm=1.0)

    wrapper = kopt.lr_multipliers(make(), {r"head/.*": 1.0, r"proj/.*": 1})
    wrapped = _fit(wrapper, steps=3, batch_size=4)
    bare = _fit(make(), steps=3, batch_size=4)
    for path, value in _weights(bare).items():
        np.testing.assert_array_equal(_weights(wrapped)[path], value)
    # One state set: the wrapped optimizer's, variable for variable.
    assert len(wrapped.optimizer.variables) == len(bare.optimizer.variables)
    for a, b in zip(_state(wrapped.optimizer), _state(bare.optimizer), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(wrapped.optimizer.iterations) == 6
    # An empty mapping, and attention_lr with every ratio 1, change nothing.
    assert kopt.lr_multipliers(make(), {}).rule_sets == ((),)
    assert kopt.attention_lr(make(), value_ratio=1).rule_sets == ((),)


def test_weight_decay_scales_with_the_multiplied_rate_by_default():
    wd, m = 0.5, 4.0
    model = _model()
    head = model.get_layer("head").kernel
    w0 = keras.ops.convert_to_numpy(head)
    grads = [keras.ops.ones(v.shape) for v in model.trainable_variables]
    index = [v.path for v in model.trainable_variables].index("head/kernel")

    def step(scale_weight_decay):
        head.assign(w0)
        optimizer = kopt.lr_multipliers(
            keras.optimizers.SGD(LR, weight_decay=wd),
            {"head/kernel": m},
            scale_weight_decay=scale_weight_decay,
        )
        optimizer.apply(grads, model.trainable_variables)
        assert optimizer.multiplier(model.trainable_variables[index]) == m
        return keras.ops.convert_to_numpy(head)

    # Keras decays first (v -= v * wd * lr), then steps (v -= lr * g).
    scaled = (w0 - w0 * wd * LR * m) - LR * m
    base = (w0 - w0 * wd * LR) - LR * m
    np.testing.assert_allclose(step(True), scaled, rtol=1e-6)
    np.testing.assert_allclose(step(False), base, rtol=1e-6)
    assert not np.allclose(scaled, base)


def _two_rates(make, head_scale):
    """A MultiOptimizer reference: `make(1)` for proj, `make(head_scale)` for head."""
    return keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(make(1.0), {r"head/.*": make(head_scale)})
    )


def _assert_same_weights(model, reference, rtol=1e-6, atol=1e-7):
    expected = _weights(reference)
    for path, value in _weights(model).items():
        np.testing.assert_allclose(value, expected[path], rtol=rtol, atol=atol)


def test_learning_rate_schedules():
    def sgd(scale):
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
            [1, 2], [LR * scale, LR * scale / 2, LR * scale / 10]
        )
        return keras.optimizers.SGD(schedule, momentum=0.5)

    wrapper = kopt.lr_multipliers(sgd(1), {"head/.*": 2.0})
    wrapped = _fit(wrapper, steps=3)
    _assert_same_weights(wrapped, _fit(_two_rates(sgd, 2.0), steps=3))
    # The wrapper reports the wrapped optimizer's (scheduled) learning rate.
    assert math.isclose(float(wrapper.learning_rate), LR / 10, rel_tol=1e-6)
    assert int(wrapper.iterations) == 3


@backend_independent
def test_learning_rate_and_iterations_delegate_to_the_wrapped_optimizer():
    inner = keras.optimizers.Adam(LR)
    wrapper = kopt.lr_multipliers(inner, {"head/.*": 2.0})
    wrapper.learning_rate = 0.5
    assert math.isclose(float(inner.learning_rate), 0.5)
    assert math.isclose(float(wrapper.learning_rate), 0.5)
    assert wrapper.iterations is inner.iterations


def _attention_model(seed=0):
    """A functional model around Keras' MultiHeadAttention, with LoRA on q, v."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 8))
    x = keras.layers.MultiHeadAttention(2, 4, name="self_attention")(inputs, inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    model = keras.Model(inputs, outputs, name="attention_model")
    ka.enable_adapter(
        model,
        ka.LoRA(rank=2, b_initializer="ones"),
        targets=ka.attention("query", "value"),
        keep_trainable="head",
    )
    return model


X_SEQ = rng.normal(size=(BATCH, 4, 8)).astype("float32")


# LoRA on a tiny BERT classifier: query and value of 2 layers, plus the head.


@pytest.fixture(scope="module")
def bert_lora():
    """Read only: the tests build optimizers on its variables, never train it."""
    case = MODELS["bert"]
    model = case.build(0)
    ka.enable_adapter(model, ka.LoRA(rank=2, alpha=4), targets=case.targets)
    return model


# Which variable gets which multiplier: paths and rules, the same under every
# backend (the training tests above run under both).
@backend_independent
def test_roles_and_recipes_compose_by_multiplying(bert_lora):
    model = bert_lora
    optimizer = kopt.loraplus(kopt.attention_lr(keras.optimizers.AdamW(LR), 4), 16)
    optimizer.build(model.trainable_variables)
    got = {v.path: optimizer.multiplier(v) for v in model.trainable_variables}
    expected = {}
    for i in range(2):
        prefix = f"transformer_layer_{i}/self_attention_layer"
        expected[f"{prefix}/query/lora_a"] = 1.0
        expected[f"{prefix}/query/lora_b"] = 16.0
        expected[f"{prefix}/value/lora_a"] = 4.0
        expected[f"{prefix}/value/lora_b"] = 64.0
    expected["logits/kernel"] = expected["logits/bias"] = 1.0
    assert got == expected
    assert len(optimizer.rule_sets) == 2
    # `ka.role` by attention role and by adapter variable name.
    value = kopt.role("value")
    assert {v.path for v in model.trainable_variables if value.matches(v)} == {
        p for p in expected if "/value/" in p
    }


def test_loraplus_matches_multi_optimizer():
    ratio = 8.0

    def adamw(lr):
        return keras.optimizers.AdamW(lr, weight_decay=0.01)

    def fit(optimizer):
        model = _attention_model()
        model.compile(optimizer=optimizer, loss="mse", jit_compile=True)
        model.fit(X_SEQ, Y, epochs=3, batch_size=4, shuffle=False, verbose=0)
        return model

    wrapped = fit(kopt.loraplus(adamw(LR), ratio))
    multi = keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(adamw(LR), {r".*/lora_b": adamw(LR * ratio)})
    )
    _assert_same_weights(wrapped, fit(multi), rtol=1e-5, atol=1e-6)
    # One state set, the size of the MultiOptimizer's sub-optimizers' minus
    # their second iteration and learning-rate scalars.
    n_multi = sum(len(o.variables) for o in multi.optimizers)
    assert len(wrapped.optimizer.variables) == n_multi - 2


def test_mixed_float16_wraps_in_a_loss_scale_optimizer():
    def adam(scale):
        return keras.optimizers.Adam(LR * scale)

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        wrapper = kopt.lr_multipliers(adam(1), {"head/.*": 4.0})
        wrapped = _fit(wrapper, steps=3, batch_size=4)
        reference = _fit(_two_rates(adam, 4.0), steps=3, batch_size=4)
    finally:
        keras.config.set_dtype_policy(previous)
    outer = wrapped.optimizer
    assert isinstance(outer, keras.optimizers.LossScaleOptimizer)
    assert outer.inner_optimizer is wrapper
    assert wrapper.loss_scale_factor is None
    assert wrapped.get_layer("head").kernel.dtype == "float32"
    # Steps with non-finite scaled gradients are skipped, alike in both.
    assert int(outer.iterations) == int(reference.optimizer.inner_optimizer._iterations)
    assert int(outer.iterations) > 0
    assert float(outer.dynamic_scale) == float(reference.optimizer.dynamic_scale)
    _assert_same_weights(wrapped, reference, rtol=1e-5, atol=1e-6)


def _resume_optimizer():
    return kopt.loraplus(
        kopt.attention_lr(
            keras.optimizers.AdamW(
                keras.optimizers.schedules.ExponentialDecay(LR, 2, 0.5),
                weight_decay=0.01,
            ),
            value_ratio=4,
        ),
        ratio=16,
    )


def _train(model, epochs, compile=True):
    if compile:
        model.compile(optimizer=_resume_optimizer(), loss="mse", jit_compile=True)
    model.fit(X_SEQ, Y, epochs=epochs, batch_size=4, shuffle=False, verbose=0)
    return {v.path: keras.ops.convert_to_numpy(v) for v in model.trainable_weights}


N_EPOCHS, M_EPOCHS = 2, 2  # epochs of 2 steps each: trained, then resumed


@pytest.fixture(scope="module")
def resume_runs():
    """The uninterrupted run of n + m epochs and a model trained for n epochs.

    Both from one model and one compiled train step: trained n + m epochs,
    put back to its initial state (weights and optimizer), trained n epochs.
    The tests only save the half-trained model; they never train it.
    """
    model = _attention_model()
    model.compile(optimizer=_resume_optimizer(), loss="mse", jit_compile=True)
    model.optimizer.build(model.trainable_variables)
    initial = Checkpoint(model)
    straight = _train(model, N_EPOCHS + M_EPOCHS, compile=False)
    initial.restore()
    assert int(model.optimizer.iterations) == 0
    _train(model, N_EPOCHS, compile=False)
    return straight, model, _state(model.optimizer)


@pytest.mark.parametrize("fmt", ["keras", "weights"])
def test_resumed_training_continues_identically(tmp_path, fmt, resume_runs):
    n, m = N_EPOCHS, M_EPOCHS
    straight, model, state = resume_runs
    if fmt == "keras":
        path = str(tmp_path / "model.keras")
        model.save(path)
        restored = keras.saving.load_model(path)
        assert isinstance(restored.optimizer, kopt.LearningRateMultipliers)
        assert restored.optimizer.get_config() == model.optimizer.get_config()
    else:
        path = str(tmp_path / "model.weights.h5")
        model.save_weights(path)
        restored = _attention_model(seed=1)  # other initial weights
        restored.compile(optimizer=_resume_optimizer(), loss="mse", jit_compile=True)
        restored.optimizer.build(restored.trainable_variables)
        restored.load_weights(path)
    for a, b in zip(_state(restored.optimizer), state, strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(restored.optimizer.iterations) == 2 * n
    resumed = _train(restored, m, compile=False)
    assert resumed.keys() == straight.keys()
    for path, value in straight.items():
        np.testing.assert_allclose(resumed[path], value, rtol=1e-6, atol=1e-7)


@keras.saving.register_keras_serializable(package="keras_adapters_tests")
def is_head(variable):
    return variable.path.startswith("head/")


@backend_independent
def test_get_config_round_trip():
    optimizer = kopt.lr_multipliers(
        kopt.lr_multipliers(
            keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(LR, 10)),
            {ka.role("value"): 4, r".*/lora_b": 2.5},
            scale_weight_decay=False,
        ),
        {is_head: 3.0},
        scale_weight_decay=False,
    )
    config = optimizer.get_config()
    clone = kopt.LearningRateMultipliers.from_config(config)
    assert clone.get_config() == config
    assert clone.rule_sets == (
        ((ka.role("value"), 4.0), (clone.rule_sets[0][1][0], 2.5)),
        ((clone.rule_sets[1][0][0], 3.0),),
    )
    assert clone.rule_sets[0][1][0].pattern == r".*/lora_b"
    assert clone.rule_sets[1][0][0].function is is_head
    assert clone.scale_weight_decay is False
    assert isinstance(clone.inner_optimizer, keras.optimizers.Adam)
    # Through Keras' own (de)serialization, as `model.save` does.
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert again.get_config() == config
    unregistered = kopt.lr_multipliers(keras.optimizers.SGD(), {lambda v: True: 2.0})
    with pytest.raises(ValueError, match="register the function"):
        unregistered.get_config()


# Error paths.


def _built(multipliers):
    optimizer = kopt.lr_multipliers(keras.optimizers.SGD(LR), multipliers)
    optimizer.build(_model().trainable_variables)
    return optimizer


@backend_independent
def test_a_variable_matched_by_two_rules_is_an_error_naming_both():
    with pytest.raises(ValueError) as error:
        _built({r"head/.*": 2.0, r".*/kernel": 3.0})
    message = str(error.value)
    assert "'head/kernel'" in message
    assert "'head/.*' (x2)" in message and "'.*/kernel' (x3)" in message


@backend_independent
def test_a_rule_matching_nothing_is_an_error_at_build_time(bert_lora):
    optimizer = kopt.lr_multipliers(keras.optimizers.SGD(LR), {ka.role("value"): 4})
    model = _model()
    with pytest.raises(ValueError, match=r"role\('value'\) \(x4\).*matches none"):
        optimizer.build(model.trainable_variables)
    assert not optimizer.built
    with pytest.raises(ValueError, match="head/kernel"):  # lists the variables
        _built({"heads/.*": 2.0})
    # LoRA+ on a model without LoRA.
    with pytest.raises(ValueError, match=r"role\('B'\)"):
        kopt.loraplus(keras.optimizers.SGD(LR)).build(model.trainable_variables)
    # attention_lr for a role without trainable variables.
    optimizer = kopt.attention_lr(keras.optimizers.SGD(LR), 2, key_ratio=3)
    with pytest.raises(ValueError, match=r"role\('key'\) \(x3\)"):
        optimizer.build(bert_lora.trainable_variables)


@backend_independent
@pytest.mark.parametrize(
    "multiplier", [0, -1.0, float("nan"), float("inf"), "2", None, True, [2.0]]
)
def test_bad_multiplier(multiplier):
    with pytest.raises(ValueError, match=r"multiplier of rule 'head/\.\*'.*> 0"):
        kopt.lr_multipliers(keras.optimizers.SGD(), {"head/.*": multiplier})


@backend_independent
@pytest.mark.parametrize(
    "rule, match",
    [
        (3, "Invalid rule 3 of type int"),
        (None, "Invalid rule None"),
        (("head", "proj"), "Invalid rule"),
        (keras.layers.Dense, "Invalid rule"),
        (ka.attention("value"), r"use ka.role\('value'\)"),
        ("head/[", "not a valid regular expression"),
    ],
)
def test_bad_rule(rule, match):
    with pytest.raises(ValueError, match=match):
        kopt.lr_multipliers(keras.optimizers.SGD(), {rule: 2.0})


@backend_independent
@pytest.mark.parametrize("name", ["", "1x", "lora b", 3, None])
def test_bad_role(name):
    with pytest.raises(ValueError, match="attention role"):
        ka.role(name)


@backend_independent
def test_bad_optimizer_and_arguments():
    SGD = keras.optimizers.SGD
    with pytest.raises(ValueError, match="Keras optimizer instance"):
        kopt.lr_multipliers("adam", {})
    with pytest.raises(ValueError, match="not a LossScaleOptimizer"):
        kopt.lr_multipliers(
            keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()), {}
        )
    multi = keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(keras.optimizers.SGD())
    )
    with pytest.raises(ValueError, match="MultiOptimizer"):
        kopt.lr_multipliers(multi, {})
    built = keras.optimizers.SGD()
    built.build(_model().trainable_variables)
    with pytest.raises(ValueError, match="already built"):
        kopt.lr_multipliers(built, {})
    inner = keras.optimizers.SGD()
    wrapper = kopt.lr_multipliers(inner, {})
    with pytest.raises(ValueError, match="already wrapped by"):
        kopt.lr_multipliers(inner, {})
    assert wrapper.inner_optimizer is inner
    # A failed attempt to add rules leaves the wrapper as it was.
    with pytest.raises(ValueError, match="multiplier"):
        kopt.lr_multipliers(wrapper, {"head/.*": -1})
    assert kopt.lr_multipliers(wrapper, {"head/.*": 2}).inner_optimizer is inner
    with pytest.raises(ValueError, match="already built"):
        kopt.lr_multipliers(_built({}), {})
    with pytest.raises(ValueError, match="must be a dict"):
        kopt.lr_multipliers(keras.optimizers.SGD(), [("head/.*", 2.0)])
    with pytest.raises(ValueError, match="has scale_weight_decay=True"):
        kopt.loraplus(kopt.attention_lr(SGD(), 4), 16, scale_weight_decay=False)
    with pytest.raises(ValueError, match="`scale_weight_decay` must be a bool"):
        kopt.lr_multipliers(keras.optimizers.SGD(), {}, scale_weight_decay="yes")
    with pytest.raises(ValueError, match="does not take"):
        kopt.LearningRateMultipliers(keras.optimizers.SGD(), {}, weight_decay=0.1)
    with pytest.raises(ValueError, match="not built"):
        kopt.lr_multipliers(keras.optimizers.SGD(), {}).multiplier(None)


@backend_independent
@pytest.mark.parametrize(
    "recipe",
    [
        lambda o: kopt.loraplus(o, ratio=0),
        lambda o: kopt.loraplus(o, ratio="16"),
        lambda o: kopt.attention_lr(o, value_ratio=-4),
        lambda o: kopt.attention_lr(o, 4, query_ratio=float("nan")),
        lambda o: kopt.attention_lr(o, 4, output_ratio=None),
        lambda o: kopt.attention_lr(o, 4, key_ratio=True),
    ],
)
def test_bad_recipe_ratio(recipe):
    with pytest.raises(
        ValueError, match=r"_ratio` must be a finite number > 0|`ratio`"
    ):
        recipe(keras.optimizers.SGD())
