"""Saves in a loop until killed; run by `tests/test_kills.py`.

Usage (KERAS_BACKEND set): `python tests/kill_check.py`, then one command per
line on stdin:

    save KIND PATH VERSION

forks a process that builds the tiny functional model of `tests/cases.py`
with a LoRA adapter and saves it to PATH, again and again, alternating
between two versions of the adapter values (`version_values`), VERSION (1
or 2) first. KIND is
`adapter` (`ka.save_adapter_weights`), `keras` (`model.save`) or `export`
(`ka.export_saved_model(overwrite=True, verify=False)`). It prints
`pid N` (the forked process, which the test kills with SIGKILL), then
`begin V` before and `saved V` after each save of version V.

Importing TensorFlow, Keras and KerasHub takes seconds, so this process
imports them once and forks per round: the forked process has them imported
and initializes the backend itself (nothing runs on a backend before the
fork). `quit` ends it.
"""

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402, F401  (export; imported before the fork)
from cases import MODELS  # noqa: E402

import keras_adapters as ka  # noqa: E402

CASE = MODELS["functional"]
TARGETS = ["proj", "hidden"]


def build():
    """The tiny functional model with a LoRA adapter, as the test builds it."""
    model = CASE.build(0)
    ka.enable_adapter(model, ka.LoRA(rank=2), targets=TARGETS, keep_trainable="head")
    return model


def version_values(model, version):
    """Deterministic, distinct adapter values of `version` (1 or 2)."""
    rng = np.random.default_rng(version)
    return [rng.normal(size=v.shape).astype("float32") for v in model.trainable_weights]


def set_version(model, version):
    for variable, value in zip(
        model.trainable_weights, version_values(model, version), strict=True
    ):
        variable.assign(value)


def save(model, kind, path):
    if kind == "adapter":
        ka.save_adapter_weights(model, path)
    elif kind == "keras":
        model.save(path)
    elif kind == "export":
        ka.export_saved_model(model, path, overwrite=True, verify=False)
    else:
        raise ValueError(f"unknown kind {kind!r}")


def loop(kind, path, version):
    if keras.backend.backend() == "jax":
        import jax

        jax.config.update(
            "jax_compilation_cache_dir",
            os.path.join(
                __import__("tempfile").gettempdir(), "keras_adapters_tests_jax_cache"
            ),
        )
    model = build()
    while True:
        set_version(model, version)
        print(f"begin {version}", flush=True)
        save(model, kind, path)
        print(f"saved {version}", flush=True)
        version = 3 - version


def main():
    # Killed children are reaped at once: a zombie would count as a live
    # process, whose temporary files the next save must keep.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.split()
        if command == ["quit"]:
            return
        _, kind, path, version = command
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                loop(kind, path, int(version))
            finally:
                os._exit(1)
        print(f"pid {pid}", flush=True)


if __name__ == "__main__":
    main()
