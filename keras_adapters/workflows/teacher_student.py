"""A low-rank teacher-student lab (after Dayi & Chen, COLT 2025).

Dayi & Chen ("Low-rank fine-tuning lies between lazy training and feature
learning", arXiv 2411.15385) study a two-layer network with `k` hidden units
on Gaussian inputs: the teacher is a base network whose first-layer weights
are perturbed by a rank-1 matrix comparable in norm to the base weights, and
a student started at the base network and trained with online SGD on a
rank-1 update recovers the teacher in about `d k^O(1)` steps, where learning
from scratch can need far more.

This module is a proposed parameterization, not the paper's (which we could
not read in full; see `docs/teacher_student.md`):

- inputs `x ~ N(0, I_d)`; network `f(x) = sum_j a_j sigma((x W)_j)` with
  first-layer kernel `W` (`d x k`, a `Dense` layer named `hidden`, no bias)
  and a fixed readout `a` (`Dense` named `readout`, not trained);
- base kernel: `k` random orthonormal columns (so every hidden unit sees a
  standard Gaussian), readout `a_j = +-1 / sqrt(k)` with random signs;
- teacher kernel `W* = W + u c^T` with `u` a random unit vector in `R^d` (the
  planted direction) and `c` a random vector with
  `||u c^T||_F = perturbation_norm * ||W||_F`;
- students, trained with SGD on the squared loss, one fresh Gaussian batch
  per step generated inside the compiled train step:
  `"lora"` (the base network with `ka.LoRA(rank=1)` on `hidden`),
  `"full"` (the base network, whole first layer trained) and `"scratch"`
  (the whole first layer trained from a fresh random orthonormal kernel);
- overlap: `|<u, v>|` with `v` the top left singular vector of
  `W_student - W` (for LoRA, `v = A / ||A||`); test loss on a fixed
  Gaussian test set.
"""

import dataclasses
import math
import time

import keras
import numpy as np
from keras import ops

from keras_adapters import _validation
from keras_adapters import model as adapter_model
from keras_adapters.adapters.lora import LoRA

METHODS = ("lora", "full", "scratch")


def _rng(seed, *stream):
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=stream))


def _orthonormal_columns(rng, dim, hidden):
    q, r = np.linalg.qr(rng.standard_normal((dim, hidden)))
    return q * np.sign(np.diag(r))  # Haar-distributed.


@dataclasses.dataclass(frozen=True)
class TeacherStudentProblem:
    """A base network and its rank-1-perturbed teacher (see the module doc).

    Attributes:
        dim: input dimension `d`.
        hidden: hidden units `k`.
        base_kernel: `(d, k)` first-layer kernel `W` of the base network.
        readout: `(k,)` fixed second-layer weights `a`.
        direction: `(d,)` unit vector `u`, the planted direction.
        coefficients: `(k,)` vector `c`; the teacher kernel is
            `W + u c^T`.
        activation: the hidden activation's Keras name.
        seed: the seed the problem was drawn with.
    """

    dim: int
    hidden: int
    base_kernel: np.ndarray
    readout: np.ndarray
    direction: np.ndarray
    coefficients: np.ndarray
    activation: str
    seed: int

    @property
    def teacher_kernel(self):
        return self.base_kernel + np.outer(self.direction, self.coefficients)


def make_problem(
    dim: int,
    hidden: int = 4,
    *,
    perturbation_norm: float = 1.0,
    activation: str = "relu",
    seed: int = 0,
) -> TeacherStudentProblem:
    """Draws a base network and a teacher `W + u c^T` (see the module doc).

    Args:
        dim: int >= 2, the input dimension `d`.
        hidden: int in [1, dim], the number of hidden units `k`.
        perturbation_norm: float > 0, `||u c^T||_F / ||W||_F` (1: the
            perturbation is as large as the base weights).
        activation: name of a Keras activation (`"relu"`, `"tanh"`, ...).
        seed: int >= 0.

    Returns:
        A `TeacherStudentProblem`.

    Example:

    ```python
    from keras_adapters.workflows import teacher_student as ts
    problem = ts.make_problem(dim=64, hidden=4, seed=0)
    ```
    """
    dim = _validation.check_number("dim", dim, low=2, integer=True)
    hidden = _validation.check_number("hidden", hidden, low=1, integer=True)
    if hidden > dim:
        raise ValueError(f"`hidden` must be <= `dim` = {dim}; received {hidden}.")
    perturbation_norm = _validation.check_number(
        "perturbation_norm", perturbation_norm, low=0, low_inclusive=False
    )
    if not isinstance(activation, str):
        raise ValueError(f"`activation` must be a name; received {activation!r}.")
    try:
        keras.activations.get(activation)
    except ValueError:
        raise ValueError(
            f"Unknown activation {activation!r}; use a Keras activation name "
            "such as 'relu' or 'tanh'."
        ) from None
    seed = _validation.check_number("seed", seed, low=0, integer=True)
    # Separate streams for the d-dimensional and the k-dimensional draws, so
    # that problems of different `dim` with one seed share `a` and `c`.
    rng = _rng(seed, 0)
    base = _orthonormal_columns(rng, dim, hidden)
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    small = _rng(seed, 1)
    readout = small.choice([-1.0, 1.0], size=hidden) / math.sqrt(hidden)
    coefficients = small.standard_normal(hidden)
    coefficients *= perturbation_norm * math.sqrt(hidden) / np.linalg.norm(coefficients)
    return TeacherStudentProblem(
        dim=dim,
        hidden=hidden,
        base_kernel=base.astype("float32"),
        readout=readout.astype("float32"),
        direction=direction.astype("float32"),
        coefficients=coefficients.astype("float32"),
        activation=activation,
        seed=seed,
    )


def _check_problem(problem):
    if not isinstance(problem, TeacherStudentProblem):
        raise ValueError(
            "`problem` must be a TeacherStudentProblem from make_problem(); "
            f"received {type(problem).__name__}."
        )


def build_network(problem, kernel=None, name=None):
    """The two-layer network `x -> sigma(x W) a` as a functional Keras model.

    Args:
        problem: a `TeacherStudentProblem`.
        kernel: `(d, k)` first-layer kernel; default the base kernel.
        name: optional model name.

    Returns:
        A `keras.Model` with layers `hidden` (`Dense(k)`, no bias) and
        `readout` (`Dense(1)`, no bias, not trainable).

    Example:

    ```python
    teacher = ts.build_network(problem, problem.teacher_kernel, name="teacher")
    ```
    """
    _check_problem(problem)
    kernel = problem.base_kernel if kernel is None else np.asarray(kernel, "float32")
    if kernel.shape != (problem.dim, problem.hidden):
        raise ValueError(
            f"`kernel` must have shape {(problem.dim, problem.hidden)}; received "
            f"{kernel.shape}."
        )
    inputs = keras.Input((problem.dim,), name="x")
    hidden = keras.layers.Dense(
        problem.hidden, activation=problem.activation, use_bias=False, name="hidden"
    )
    readout = keras.layers.Dense(1, use_bias=False, name="readout", trainable=False)
    model = keras.Model(inputs, readout(hidden(inputs)), name=name)
    hidden.kernel.assign(kernel)
    readout.kernel.assign(problem.readout[:, None])
    return model


class GaussianInputs(keras.layers.Layer):
    """Draws a fresh `N(0, I_dim)` batch on every call (inside `jit` too).

    Its input only sets the batch size: online SGD data generated in the
    compiled train step, with the random state in a `SeedGenerator`.

    Args:
        dim: int >= 1, the dimension of the samples.
        seed: optional int, the seed of the generator.

    Call arguments:
        inputs: a tensor whose first axis is the batch.

    Returns:
        A `(batch, dim)` float tensor.
    """

    def __init__(self, dim, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.dim = _validation.check_number("dim", dim, low=1, integer=True)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs):
        shape = (ops.shape(inputs)[0], self.dim)
        return keras.random.normal(
            shape, dtype=self.compute_dtype, seed=self.seed_generator
        )

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.dim)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "seed": self.seed}


def learned_direction(problem, kernel):
    """The top left singular vector of `kernel - W`.

    Zeros if `kernel == W`; NaNs if `kernel` is not finite.
    """
    delta = np.asarray(kernel, "float64") - problem.base_kernel.astype("float64")
    if not np.all(np.isfinite(delta)):  # A diverged student.
        return np.full(problem.dim, np.nan)
    if not np.any(delta):
        return np.zeros(problem.dim)
    left, _, _ = np.linalg.svd(delta, full_matrices=False)
    return left[:, 0]


def overlap(problem, kernel) -> float:
    """`|<u, v>|`, v the learned direction of a student's first-layer kernel.

    Args:
        problem: a `TeacherStudentProblem`.
        kernel: the student's (effective) `(d, k)` first-layer kernel.

    Returns:
        A float in [0, 1]; 1 when `kernel - W` is along the planted `u`
        (NaN for a diverged, non-finite kernel).
    """
    _check_problem(problem)
    direction = learned_direction(problem, kernel)
    return float(abs(direction @ problem.direction.astype("float64")))


@dataclasses.dataclass
class StudentRun:
    """A student's training curve, logged every `log_every` steps.

    Attributes:
        method: `"lora"`, `"full"` or `"scratch"`.
        dim: input dimension.
        steps: `(n,)` SGD steps at each log point (the first is 0).
        test_loss: `(n,)` test MSE against the teacher.
        overlap: `(n,)` overlap with the planted direction.
        base_loss: test MSE of the base network (the reference scale).
        learning_rate: the SGD learning rate used.
        batch_size: fresh samples per step.
        seconds: wall time of training.
    """

    method: str
    dim: int
    steps: np.ndarray
    test_loss: np.ndarray
    overlap: np.ndarray
    base_loss: float
    learning_rate: float
    batch_size: int
    seconds: float

    @property
    def relative_loss(self):
        """`test_loss / base_loss`."""
        return self.test_loss / self.base_loss

    def steps_to(self, overlap=None, relative_loss=None):
        """The first logged step with `overlap >= overlap` (or relative test
        loss `<= relative_loss`), or None if never reached."""
        if (overlap is None) == (relative_loss is None):
            raise ValueError("Pass exactly one of `overlap` and `relative_loss`.")
        if overlap is not None:
            hits = np.flatnonzero(self.overlap >= overlap)
        else:
            hits = np.flatnonzero(self.relative_loss <= relative_loss)
        return int(self.steps[hits[0]]) if hits.size else None


class _Tracker(keras.callbacks.Callback):
    def __init__(self, problem, student, test_x, test_y):
        super().__init__()
        self.problem, self.student = problem, student
        self.test_x, self.test_y = test_x, test_y
        self.losses, self.overlaps = [], []

    def record(self):
        layer = self.student.get_layer("hidden")
        kernel = ops.convert_to_numpy(layer.kernel)
        predictions = ops.convert_to_numpy(self.student(self.test_x))
        self.losses.append(float(np.mean((predictions - self.test_y) ** 2)))
        self.overlaps.append(overlap(self.problem, kernel))

    def on_train_batch_end(self, batch, logs=None):
        # With `steps_per_execution=log_every`, once every `log_every` steps.
        # The JAX trainer writes variables back only at the end of an epoch
        # unless asked to.
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()
        self.record()


def train_student(
    problem,
    method: str = "lora",
    *,
    steps: int = 10_000,
    log_every: int = 100,
    batch_size: int = 1,
    learning_rate: float | None = None,
    test_size: int = 4096,
    seed: int = 0,
    jit_compile=True,
) -> StudentRun:
    """Trains one student on fresh Gaussian batches and logs its progress.

    The training model draws `x ~ N(0, I_d)` inside the compiled train step
    (`GaussianInputs`), and outputs `student(x) - teacher(x)`, fitted to zero
    with the mean squared error by `keras.optimizers.SGD`: online SGD with a
    fresh batch every step. `fit` runs `log_every` steps per call of its
    compiled function (`steps_per_execution`); after each, the test loss and
    the overlap are recorded.

    Args:
        problem: a `TeacherStudentProblem`.
        method: `"lora"` (rank-1 `ka.LoRA` on the base network's `hidden`
            layer), `"full"` (the base network's whole first layer) or
            `"scratch"` (the whole first layer, from a random kernel).
        steps: int >= 1, SGD steps (rounded up to a multiple of
            `log_every`).
        log_every: int >= 1.
        batch_size: int >= 1, fresh samples per step.
        learning_rate: float > 0; default `batch_size / d` (so that the
            steps needed scale like `d`; at `d = 128`, twice that made the
            `"full"` and `"scratch"` students diverge).
        test_size: int >= 1, size of the fixed Gaussian test set.
        seed: int >= 0; seeds the LoRA factor `A`, the scratch kernel, the
            test set and the training samples.
        jit_compile: passed to `compile`.

    Returns:
        A `StudentRun`.

    Example:

    ```python
    problem = ts.make_problem(dim=64, hidden=4)
    run = ts.train_student(problem, "lora", steps=4000, log_every=200)
    run.steps_to(overlap=0.9)
    ```
    """
    _check_problem(problem)
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}; received {method!r}.")
    steps = _validation.check_number("steps", steps, low=1, integer=True)
    log_every = _validation.check_number("log_every", log_every, low=1, integer=True)
    batch_size = _validation.check_number("batch_size", batch_size, low=1, integer=True)
    test_size = _validation.check_number("test_size", test_size, low=1, integer=True)
    seed = _validation.check_number("seed", seed, low=0, integer=True)
    if learning_rate is None:
        learning_rate = batch_size / problem.dim
    learning_rate = _validation.check_number(
        "learning_rate", learning_rate, low=0, low_inclusive=False
    )
    num_logs = -(-steps // log_every)

    rng = _rng(seed, 2, problem.seed)
    if method == "scratch":
        student = build_network(
            problem, _orthonormal_columns(rng, problem.dim, problem.hidden), "student"
        )
    else:
        student = build_network(problem, name="student")
    teacher = build_network(problem, problem.teacher_kernel, name="teacher")
    teacher.trainable = False
    if method == "lora":
        # PEFT's default A initialization, seeded.
        initializer = keras.initializers.VarianceScaling(
            scale=1.0 / 3.0, mode="fan_in", distribution="uniform", seed=seed
        )
        adapter_model.enable_adapter(
            student, LoRA(rank=1, a_initializer=initializer), targets="hidden"
        )
    else:
        student.get_layer("hidden").trainable = True

    test_x = rng.standard_normal((test_size, problem.dim)).astype("float32")
    test_y = ops.convert_to_numpy(teacher(test_x))
    marker = keras.Input((1,), name="batch_marker")
    x = GaussianInputs(problem.dim, seed=seed, name="gaussian_inputs")(marker)
    difference = keras.layers.Subtract(name="difference")([student(x), teacher(x)])
    trainer = keras.Model(marker, difference, name=f"{method}_online_sgd")
    trainer.compile(
        optimizer=keras.optimizers.SGD(learning_rate),
        loss="mean_squared_error",
        jit_compile=jit_compile,
        steps_per_execution=log_every,
    )
    tracker = _Tracker(problem, student, test_x, test_y)
    tracker.record()
    zeros = np.zeros((num_logs * log_every * batch_size, 1), "float32")
    start = time.perf_counter()
    trainer.fit(
        zeros,
        zeros,
        batch_size=batch_size,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[tracker],
    )
    seconds = time.perf_counter() - start
    base = build_network(problem)
    base_loss = float(np.mean((ops.convert_to_numpy(base(test_x)) - test_y) ** 2))
    return StudentRun(
        method=method,
        dim=problem.dim,
        steps=np.arange(num_logs + 1) * log_every,
        test_loss=np.array(tracker.losses),
        overlap=np.array(tracker.overlaps),
        base_loss=base_loss,
        learning_rate=learning_rate,
        batch_size=batch_size,
        seconds=seconds,
    )
