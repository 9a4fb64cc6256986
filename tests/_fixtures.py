"""Shared helpers that keep the suite fast without testing less.

Most of the suite's time goes to compiling: every `compile` + `fit` traces and
XLA-compiles a new train step (seconds for a tiny KerasHub model, more under
TensorFlow), every `predict` after a `compile` or an adapter switch a new
predict step, and JAX compiles each eager op once per new shape. So the tests:

- build a model once per module where they only read it (module-scoped
  fixtures), or build it once and put it back with `Checkpoint.restore()`
  between runs that would otherwise each build and compile their own copy;
- reuse one compiled train step for runs that differ only in the values of
  variables (the learning rate of a Keras optimizer is a variable);
- call models directly (`model(x, training=False)`) where `predict` adds
  nothing;
- run tests that never touch backend math (pure Python, NumPy, regexes,
  config validation, which layer of a model gets which role) under one
  backend only: mark them `@backend_independent`. They run under TensorFlow,
  where building a model costs a fraction of a second; JAX compiles each of
  its initializers once per new shape, which makes a first build of an
  architecture cost seconds. `nox -s tests` runs both backends, so they
  still run once; `KERAS_BACKEND=jax pytest` reports them as skipped.
"""

import keras
import numpy as np
import pytest

BACKEND_INDEPENDENT_TESTS_RUN_UNDER = "tensorflow"
backend_independent = pytest.mark.skipif(
    keras.backend.backend() != BACKEND_INDEPENDENT_TESTS_RUN_UNDER,
    reason="backend-independent: runs under the "
    f"{BACKEND_INDEPENDENT_TESTS_RUN_UNDER} backend only",
)


def numpy_values(variables):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


class Checkpoint:
    """The values of a model's variables, and of its optimizer's if built.

    `restore()` assigns them back, so that a model (and its compiled train
    step) can be trained again from the same state: bit for bit the run a
    freshly built and compiled copy would do. `model.variables` includes the
    seed-generator states, so dropout draws the same masks again.
    """

    def __init__(self, model, optimizer=None):
        self.model = model
        self.optimizer = optimizer or getattr(model, "optimizer", None)
        self.values = numpy_values(model.variables)
        self.optimizer_values = None
        if self.optimizer is not None and self.optimizer.built:
            self.optimizer_values = numpy_values(self.optimizer.variables)

    def restore(self):
        variables = self.model.variables
        assert len(variables) == len(self.values), "the model's variables changed"
        for variable, value in zip(variables, self.values, strict=True):
            variable.assign(value)
        if self.optimizer_values is not None:
            optimizer_variables = self.optimizer.variables
            for variable, value in zip(
                optimizer_variables, self.optimizer_values, strict=True
            ):
                variable.assign(value)
        return self.model
