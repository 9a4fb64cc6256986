"""LP-FT (`ka.workflows`) and the low-rank teacher-student lab.

LP-FT runs on a tiny KerasHub BERT classifier and on a small functional
model: the linear probe leaves everything but the head unchanged and grows
the head's norm, fine-tuning starts from the probed head, and the head norm
and feature change are logged per epoch.
"""

import keras
import numpy as np
import pytest

import keras_adapters as ka
from keras_adapters.workflows import teacher_student as ts

INPUTS = ("token_ids", "segment_ids", "padding_mask")


def _numpy(x):
    return np.array(keras.ops.convert_to_numpy(x))


def _tiny_bert():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=64,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
    )
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=3, preprocessor=None
    )


def _token_data(n=24, seed=0):
    """Token sequences whose second token gives away the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n).astype("int32")
    tokens = rng.integers(4, 64, (n, 8)).astype("int32")
    tokens[:, 1] = labels + 1
    x = {
        "token_ids": tokens,
        "segment_ids": np.zeros((n, 8), "int32"),
        "padding_mask": np.ones((n, 8), "bool"),
    }
    return x, labels


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,), name="x")
    hidden = keras.layers.Dense(8, activation="tanh", name="body")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))


def _blobs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n).astype("int32")
    centers = rng.normal(size=(3, 6)) * 3
    x = centers[labels] + rng.normal(size=(n, 6))
    return x.astype("float32"), labels


class _Capture(keras.callbacks.Callback):
    """Captures the model's weights when training starts."""

    def on_train_begin(self, logs=None):
        self.weights = {v.path: _numpy(v).copy() for v in self.model.weights}


# Heads and features.


def test_find_head_and_features_of_a_keras_hub_classifier():
    classifier = _tiny_bert()
    head = ka.workflows.find_head(classifier)
    assert head.name == "logits"
    assert ka.workflows.find_head(classifier, "logits") is head
    x, _ = _token_data(5)
    features = ka.workflows.feature_extractor(classifier)(x, training=False)
    pooled = classifier.backbone(x, training=False)["pooled_output"]
    np.testing.assert_allclose(_numpy(features), _numpy(pooled), rtol=1e-6, atol=1e-6)


def test_find_head_errors():
    model = _mlp()
    assert ka.workflows.find_head(model).name == "head"
    with pytest.raises(ValueError, match="'nope' names no layer"):
        ka.workflows.find_head(model, "nope")
    with pytest.raises(ValueError, match="head"):
        ka.workflows.find_head(model, 3)
    inputs = keras.Input((4,))
    logits = keras.layers.Dense(2, name="dense")(inputs)
    softmax = keras.Model(inputs, keras.layers.Softmax(name="probs")(logits))
    with pytest.raises(ValueError, match="is a Softmax"):
        ka.workflows.find_head(softmax)
    two = keras.Model(inputs, [logits, logits])
    with pytest.raises(ValueError, match="single output"):
        ka.workflows.find_head(two)
    with pytest.raises(ValueError, match="Keras model"):
        ka.workflows.find_head("model")


# The head-norm callback.


def test_head_norm_callback_logs_norm_and_feature_change():
    model = _mlp()
    x, y = _blobs()
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    callback = ka.workflows.HeadNormCallback("head", probe=x[:16])
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    norms = history.history["head_norm"]
    assert len(norms) == 2
    kernel = _numpy(model.get_layer("head").kernel)
    assert norms[-1] == pytest.approx(np.linalg.norm(kernel), rel=1e-6)
    features = ka.workflows.feature_extractor(model).predict(x[:16], verbose=0)
    rms = np.sqrt(np.mean(np.sum((features - callback.initial_features) ** 2, 1)))
    assert history.history["feature_change"][-1] == pytest.approx(rms, rel=1e-5)
    assert history.history["feature_change"][-1] > 0

    # Only the head trains: the features do not move.
    model.get_layer("body").trainable = False
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    frozen = ka.workflows.HeadNormCallback(probe=x[:16])
    history = model.fit(x, y, epochs=1, verbose=0, callbacks=[frozen])
    assert history.history["feature_change"] == [0.0]


def test_head_norm_callback_validation():
    with pytest.raises(ValueError, match="head"):
        ka.workflows.HeadNormCallback(head=1.5)
    with pytest.raises(ValueError, match="feature_model"):
        ka.workflows.HeadNormCallback(feature_model="model")
    with pytest.raises(ValueError, match="probe"):
        ka.workflows.HeadNormCallback(feature_model=_mlp())


# Linear probing and LP-FT on a functional model.


def test_linear_probe_fits_the_head_only():
    model = _mlp()
    x, y = _blobs()
    before = {v.path: _numpy(v).copy() for v in model.weights}
    norm_before = ka.workflows.head_norm(model)
    history = ka.workflows.linear_probe(model, (x, y), l2=1e-4, epochs=10)
    for v in model.weights:
        changed = not np.array_equal(_numpy(v), before[v.path])
        assert changed == v.path.startswith("head/"), v.path
    assert ka.workflows.head_norm(model) > 2 * norm_before
    assert history.history["head_norm"][-1] == pytest.approx(
        ka.workflows.head_norm(model), rel=1e-6
    )
    assert history.l2 == 1e-4
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_linear_probe_matches_newton_solution():
    """Full-batch Adam reaches the optimum of the convex LP problem."""
    model = _mlp()
    x, y = _blobs(seed=1)
    l2 = 1e-2
    ka.workflows.linear_probe(model, (x, y), l2=l2)
    features = ka.workflows.feature_extractor(model).predict(x, verbose=0)
    kernel = _numpy(model.get_layer("head").kernel)
    bias = _numpy(model.get_layer("head").bias)
    # At the optimum the gradient of mean CE + l2 ||W||^2 vanishes.
    z = features @ kernel + bias
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    grad_kernel = features.T @ p / len(y) + 2 * l2 * kernel
    grad_bias = p.mean(0)
    assert np.abs(grad_kernel).max() < 2e-3
    assert np.abs(grad_bias).max() < 2e-3


def test_linear_probe_chooses_l2_on_validation():
    model = _mlp()
    x, y = _blobs(n=90, seed=2)
    history = ka.workflows.linear_probe(
        model,
        (x[:60], y[:60]),
        l2=[1e-3, 10.0],
        validation_data=(x[60:], y[60:]),
        epochs=10,
    )
    assert set(history.l2_scores) == {1e-3, 10.0}
    assert history.l2 == min(history.l2_scores, key=history.l2_scores.get)
    assert history.l2 == 1e-3  # l2 = 10 squashes the head to ~0.
    with pytest.raises(ValueError, match="validation_data"):
        ka.workflows.linear_probe(model, (x, y), l2=[1e-3, 1e-2])


def test_lp_ft_functional_model_full():
    model = _mlp()
    x, y = _blobs()
    capture = _Capture()
    result = ka.workflows.lp_ft(
        model,
        (x, y),
        finetune="full",
        epochs=2,
        batch_size=16,
        optimizer=keras.optimizers.SGD(0.01),
        callbacks=[capture],
        lp_l2=1e-3,
        lp_epochs=10,
    )
    assert result.head == "head"
    assert result.head_norm_after_lp > result.head_norm_initial
    kernel, bias = result.lp_head_weights
    np.testing.assert_array_equal(capture.weights["head/kernel"], kernel)
    np.testing.assert_array_equal(capture.weights["head/bias"], bias)
    logs = result.ft_history.history
    assert len(logs["head_norm"]) == 2 and len(logs["feature_change"]) == 2
    assert logs["feature_change"][-1] > 0
    assert "LP-FT on head 'head'" in str(result)


def test_lp_ft_lp_only_and_ft_only():
    x, y = _blobs()
    lp = ka.workflows.lp_ft(_mlp(), (x, y), finetune=None, lp_epochs=5)
    assert lp.ft_history is None and lp.lp_history is not None
    assert lp.head_norm_final == lp.head_norm_after_lp
    ft = ka.workflows.lp_ft(_mlp(), (x, y), probe_first=False, epochs=1)
    assert ft.lp_history is None and ft.lp_head_weights is None
    assert ft.head_norm_after_lp is None


def test_lp_ft_with_a_dataset():
    tf = pytest.importorskip("tensorflow")
    x, y = _blobs()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model = _mlp()
    result = ka.workflows.lp_ft(
        model, dataset, epochs=1, lp_epochs=5, optimizer=keras.optimizers.SGD(0.01)
    )
    assert result.head_norm_after_lp > result.head_norm_initial
    assert "head_norm" in result.ft_history.history
    assert "feature_change" not in result.ft_history.history  # No probe given.
    probed = ka.workflows.lp_ft(
        _mlp(), dataset, finetune=None, lp_epochs=5
    )  # Same data, same (deterministic) linear probe.
    np.testing.assert_allclose(
        probed.lp_head_weights[0], result.lp_head_weights[0], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"finetune": "lora"}, "finetune"),
        ({"targets": "body"}, "targets"),
        ({"finetune": None, "probe_first": False}, "does nothing"),
        ({"probe_first": 1}, "probe_first"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": -1}, "batch_size"),
        ({"probe_size": -1}, "probe_size"),
        ({"seed": -1}, "seed"),
        ({"callbacks": "cb"}, "callbacks"),
        ({"lp_l2": -1.0}, "l2"),
        ({"lp_epochs": 0}, "epochs"),
        ({"lp_learning_rate": 0}, "learning_rate"),
        ({"lp_learning_rate": float("nan")}, "`learning_rate` must be .* received nan"),
        ({"lp_l2": float("inf")}, "`l2` must be a finite number >= 0; received inf"),
        ({"epochs": 2.0}, "`epochs` must be an int >= 1; received 2.0"),
        ({"head": "body2"}, "body2"),
    ],
)
def test_lp_ft_validation(kwargs, message):
    model = _mlp()
    x, y = _blobs(n=12)
    before = [_numpy(v).copy() for v in model.weights]
    with pytest.raises(ValueError, match=message):
        ka.workflows.lp_ft(model, (x, y), **kwargs)
    for v, old in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(_numpy(v), old)


@pytest.mark.parametrize(
    "data, message",
    [
        ("xy", "tuple"),
        ((np.zeros((4, 6)), np.zeros((3,), "int32")), r"shape \(4,\)"),
        ((np.zeros((4, 6)), np.array([0, 1, 2, 3])), r"\[0, 3\)"),
        ((np.zeros((4, 6)), np.array([0.5, 1, 2, 0])), "integer"),
        ((np.zeros((4, 6)), None), "None"),
    ],
)
def test_lp_ft_data_validation(data, message):
    with pytest.raises(ValueError, match=message):
        ka.workflows.lp_ft(_mlp(), data)


def test_lp_ft_refuses_adapted_models():
    model = _mlp()
    ka.enable_adapter(model, ka.LoRA(rank=2), targets="body")
    with pytest.raises(ValueError, match="already has adapters"):
        ka.workflows.lp_ft(model, _blobs(n=12))


# LP-FT and LP-LoRA on a tiny KerasHub BERT classifier.


def test_lp_ft_on_bert_classifier():
    classifier = _tiny_bert()
    x, y = _token_data()
    initial = {v.path: _numpy(v).copy() for v in classifier.weights}
    capture = _Capture()
    result = ka.workflows.lp_ft(
        classifier,
        (x, y),
        finetune="full",
        epochs=1,
        batch_size=8,
        optimizer=keras.optimizers.Adam(1e-3),
        callbacks=[capture],
        probe_size=8,
        lp_l2=1e-3,
        seed=0,
    )
    # Stage 1 changed the head only and grew its norm ...
    head_paths = {v.path for v in classifier.get_layer("logits").weights}
    for path, value in initial.items():
        changed = not np.array_equal(capture.weights[path], value)
        assert changed == (path in head_paths), path
    assert result.head_norm_after_lp > 5 * result.head_norm_initial
    # ... and stage 2 started from the LP head and moved the features.
    kernel, bias = result.lp_head_weights
    np.testing.assert_array_equal(capture.weights["logits/kernel"], kernel)
    np.testing.assert_array_equal(capture.weights["logits/bias"], bias)
    logs = result.ft_history.history
    assert logs["feature_change"][-1] > 0
    assert logs["head_norm"][-1] == pytest.approx(result.head_norm_final)


def test_lp_lora_on_bert_classifier():
    classifier = _tiny_bert()
    x, y = _token_data()
    backbone = {v.path: _numpy(v).copy() for v in classifier.backbone.weights}
    result = ka.workflows.lp_ft(
        classifier,
        (x, y),
        finetune=ka.LoRA(rank=2),
        epochs=1,
        batch_size=8,
        probe_size=8,
        lp_l2=1e-3,
        seed=0,
    )
    assert len(result.adapter_report.adapted) == 2  # query and value
    assert result.ft_history.history["feature_change"][-1] > 0
    # LoRA trained; the base backbone weights did not change.
    for v in classifier.backbone.weights:
        if v.path in backbone:
            np.testing.assert_array_equal(_numpy(v), backbone[v.path])
    assert ka.adapter_variables(classifier)


# The teacher-student lab.


def test_teacher_student_problem():
    problem = ts.make_problem(dim=16, hidden=2, perturbation_norm=1.0, seed=0)
    w = problem.base_kernel
    np.testing.assert_allclose(w.T @ w, np.eye(2), atol=1e-5)
    perturbation = problem.teacher_kernel - w
    assert np.linalg.matrix_rank(perturbation, tol=1e-5) == 1
    assert np.linalg.norm(perturbation) == pytest.approx(np.linalg.norm(w), rel=1e-5)
    assert ts.overlap(problem, problem.teacher_kernel) == pytest.approx(1.0)
    assert ts.overlap(problem, w) == 0.0
    # The k-dimensional draws do not depend on d.
    other = ts.make_problem(dim=32, hidden=2, seed=0)
    np.testing.assert_array_equal(other.coefficients, problem.coefficients)
    teacher = ts.build_network(problem, problem.teacher_kernel)
    x = np.random.default_rng(0).normal(size=(4, 16)).astype("float32")
    expected = np.maximum(x @ problem.teacher_kernel, 0) @ problem.readout
    np.testing.assert_allclose(
        teacher.predict(x, verbose=0)[:, 0], expected, rtol=1e-5, atol=1e-6
    )


def test_gaussian_inputs_are_fresh_every_call():
    layer = ts.GaussianInputs(5, seed=1)
    marker = np.zeros((1000, 1), "float32")
    a, b = _numpy(layer(marker)), _numpy(layer(marker))
    assert a.shape == (1000, 5) and not np.allclose(a, b)
    assert abs(a.mean()) < 0.1 and abs(a.std() - 1) < 0.1


def test_lora_student_recovers_the_planted_direction():
    problem = ts.make_problem(dim=16, hidden=2, seed=0)
    run = ts.train_student(
        problem, "lora", steps=600, log_every=150, batch_size=4, learning_rate=0.1
    )
    assert run.steps.tolist() == [0, 150, 300, 450, 600]
    assert run.overlap[0] < 0.5
    assert run.overlap[-1] > 0.9
    assert run.relative_loss[-1] < 0.1
    assert run.steps_to(overlap=0.9) is not None
    assert run.steps_to(overlap=1.5) is None
    with pytest.raises(ValueError, match="exactly one"):
        run.steps_to(overlap=0.5, relative_loss=0.5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ts.make_problem(dim=1), "dim"),
        (lambda: ts.make_problem(dim=4, hidden=5), "hidden"),
        (lambda: ts.make_problem(dim=4, perturbation_norm=0), "perturbation_norm"),
        (lambda: ts.make_problem(dim=4, activation="nope"), "nope"),
        (lambda: ts.train_student("problem"), "TeacherStudentProblem"),
        (lambda: ts.train_student(ts.make_problem(4), "lorax"), "method"),
        (lambda: ts.train_student(ts.make_problem(4), steps=0), "steps"),
        (lambda: ts.train_student(ts.make_problem(4), learning_rate=-1), "learning"),
        (
            lambda: ts.train_student(ts.make_problem(4), learning_rate=np.nan),
            "`learning_rate` must be a finite number > 0; received nan",
        ),
        (lambda: ts.make_problem(dim=4, perturbation_norm=np.inf), "received inf"),
        (lambda: ts.build_network(ts.make_problem(4), np.zeros((3, 4))), "shape"),
    ],
)
def test_teacher_student_validation(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_numpy_integers_are_accepted():
    problem = ts.make_problem(dim=np.int64(4), hidden=np.int32(1), seed=np.int64(0))
    assert problem.dim == 4 and isinstance(problem.dim, int)
