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
fork).

    train BACKUP OUT KILL_EPOCH KILL_STEP

forks a process that trains that model (`train`) with
`keras.callbacks.BackupAndRestore(BACKUP)` (BACKUP `-`: without), and kills
itself with SIGKILL after step KILL_STEP of epoch KILL_EPOCH (both
zero-based; `-1`: no kill), printing `killing` just before; or, if it
completes, writes the trained variables and the optimizer's to OUT (`.npz`)
and prints `trained`. `quit` ends it.
"""

import os
import signal
import sys
import tempfile

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


def _share_compilation_cache():
    if keras.backend.backend() == "jax":
        import jax

        jax.config.update(
            "jax_compilation_cache_dir",
            os.path.join(tempfile.gettempdir(), "keras_adapters_tests_jax_cache"),
        )


def loop(kind, path, version):
    _share_compilation_cache()
    model = build()
    while True:
        set_version(model, version)
        print(f"begin {version}", flush=True)
        save(model, kind, path)
        print(f"saved {version}", flush=True)
        version = 3 - version


EPOCHS = 3
BATCH_SIZE = 4  # 4 steps per epoch


class _KillAfter(keras.callbacks.Callback):
    """SIGKILLs this process after step `step` of epoch `epoch`."""

    def __init__(self, epoch, step):
        super().__init__()
        self.kill_epoch, self.kill_step = epoch, step
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == (self.kill_epoch, self.kill_step):
            print("killing", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def train(backup, out, kill_epoch, kill_step):
    """Trains the adapter (Adam, `jit_compile=True`, no shuffling)."""
    _share_compilation_cache()
    model = build()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2), loss=CASE.loss, jit_compile=True
    )
    callbacks = []
    if backup != "-":
        callbacks.append(
            keras.callbacks.BackupAndRestore(backup, double_checkpoint=True)
        )
    if kill_epoch >= 0:
        callbacks.append(_KillAfter(kill_epoch, kill_step))
    model.fit(
        CASE.x,
        CASE.y,
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    arrays = {f"model/{v.path}": v for v in model.trainable_weights}
    arrays.update({f"optimizer/{v.path}": v for v in model.optimizer.variables})
    np.savez(out, **{k: keras.ops.convert_to_numpy(v) for k, v in arrays.items()})
    print("trained", flush=True)


def main():
    # Killed children are reaped at once (no zombies pile up).
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.split()
        if command == ["quit"]:
            return
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = 1
            try:
                if command[0] == "save":
                    loop(command[1], command[2], int(command[3]))
                else:
                    train(command[1], command[2], int(command[3]), int(command[4]))
                    code = 0
            finally:
                sys.stdout.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)


if __name__ == "__main__":
    main()
