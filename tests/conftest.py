import gc
import os
import sys
import tempfile

# Cheaper XLA compilation (see xla_flags.py), set before Keras imports its
# backend; the scripts the tests start inherit it.
import xla_flags  # noqa: E402

xla_flags.add(*xla_flags.FAST_COMPILE)

import keras  # noqa: E402
import pytest  # noqa: E402

# `cases.py`, `matrix.py` and the helper scripts live next to the tests.
sys.path.insert(0, os.path.dirname(__file__))

if keras.backend.backend() == "jax":
    import jax

    # Many tests compile the same programs (the same tiny models and adapters
    # in different tests and processes); JAX's persistent compilation cache
    # shares them, across pytest-xdist workers and runs too.
    jax.config.update(
        "jax_compilation_cache_dir",
        os.path.join(tempfile.gettempdir(), "keras_adapters_tests_jax_cache"),
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_collection_finish(session):
    """Moves everything imported so far (TensorFlow, JAX, Keras, the test
    modules: about 400,000 objects) out of the garbage collector's sight.

    Keras' `quantize` runs a full `gc.collect()` per variable it deletes, and
    each full collection walks every tracked object: with the import-time
    objects frozen, quantizing a tiny BERT takes 0.7-2 s instead of 6-12 s,
    and the interpreter's own collections get cheaper too.
    """
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True, scope="class")
def _freeze_survivors():
    """After each test class (and module): collect its garbage, then freeze
    what is left.

    Keras' `quantize` runs a full `gc.collect()` per variable, and a full
    collection walks every tracked object, so its cost grows with everything
    earlier tests left alive in the worker (models held by other modules'
    fixtures, Keras' caches). Frozen objects are skipped by later collections
    (measured on 2 cores, TensorFlow: three modules in one process 176 s ->
    136 s).
    """
    yield
    gc.collect()
    gc.freeze()


def pytest_generate_tests(metafunc):
    """Parametrizes the shared matrix's fixtures from the class's `methods`
    (see `matrix.py`): `trained` per (method, model), `quantized` and
    `method` per method."""
    methods = tuple(getattr(metafunc.cls, "methods", ()) or ())
    if not methods:
        return
    names = metafunc.fixturenames
    if "trained" in names:
        from cases import MODELS

        from keras_adapters.adapters.base import ADAPTER_METHODS
        from keras_adapters.kernels import adapts_kind

        def runs(method, model):
            case = MODELS[model]
            if case.methods is not None and method not in case.methods:
                return False
            kind = case.requires_kind
            return kind is None or adapts_kind(
                ADAPTER_METHODS[method].layer_kinds, kind
            )

        cases = [
            (m, model)
            for m in methods
            for model in metafunc.cls.models
            if runs(m, model)
        ]
        metafunc.parametrize(
            "trained",
            cases,
            indirect=True,
            scope="class",
            ids=[f"{m}-{model}" for m, model in cases],
        )
    if "quantized" in names:
        metafunc.parametrize("quantized", methods, indirect=True, scope="class")
    if "method" in names:
        metafunc.parametrize("method", methods)
