"""One worker of a two-process data-parallel job; run by `test_multiprocess.py`.

Usage (KERAS_BACKEND set; one process per worker, all on this machine):

    python tests/multiprocess_check.py OUT.npz --process-id I \
        --ports P0,P1 [--die-after-step K]

JAX: `keras.distribution.initialize` (`jax.distributed`, coordinator at
127.0.0.1:P0, gloo collectives on CPU) and `keras.distribution.DataParallel`
over the two processes' devices. TensorFlow:
`tf.distribute.MultiWorkerMirroredStrategy` with TF_CONFIG naming
127.0.0.1:P0 and 127.0.0.1:P1. Each worker feeds the whole data set (a
`tf.data.Dataset` batched at the global batch size), which the distribution
shards. (Keras 3.15's TensorFlow `fit` fails under that strategy before the
first step: keras-team/keras#20585, #20329; `test_multiprocess.py` pins it.)

The job trains the BERT case of `tests/cases.py` with LoRA (`jit_compile=True`
on JAX) for `EPOCHS` full-batch epochs and writes the adapter and head
values to OUT.npz (`model/<path>`), then runs a second `fit`, in which the
worker given `--die-after-step` kills itself (SIGKILL) after that step.
The other worker prints `error: <type>: <message>` if its `fit` raises, and
exits with status 3; the test bounds the wait.

`--process-id -1` trains the same model in one process, without a
distribution, on the same global batches (the reference).
"""

import argparse
import contextlib
import json
import os
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

EPOCHS = 3
LEARNING_RATE = 1e-2
HEARTBEAT_TIMEOUT = 10  # seconds


def _parse(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--ports", default="")
    parser.add_argument("--die-after-step", type=int, default=-1)
    return parser.parse_args(argv)


ARGS = _parse() if __name__ == "__main__" else _parse(["-", "--process-id", "-1"])
BACKEND = os.environ.get("KERAS_BACKEND", "jax")
ADDRESSES = [f"127.0.0.1:{p}" for p in ARGS.ports.split(",") if p]
DISTRIBUTED = ARGS.process_id >= 0

import keras  # noqa: E402
import numpy as np  # noqa: E402
from cases import MODELS  # noqa: E402

import keras_adapters as ka  # noqa: E402

CASE = MODELS["bert"]
GLOBAL_BATCH = len(CASE.y)


def strategy_scope():
    """Sets up the distribution; returns the scope to build the model in."""
    if not DISTRIBUTED:
        return contextlib.nullcontext()
    if BACKEND == "jax":
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # `keras.distribution.initialize` calls this without the timeouts: a
        # dead worker is detected after `heartbeat_timeout_seconds`.
        jax.distributed.initialize(
            coordinator_address=ADDRESSES[0],
            num_processes=2,
            process_id=ARGS.process_id,
            initialization_timeout=300,
            heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT,
            shutdown_timeout_seconds=HEARTBEAT_TIMEOUT,
        )
        assert jax.process_count() == 2 and len(jax.devices()) == 2
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        return contextlib.nullcontext()
    import tensorflow as tf

    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": ADDRESSES},
            "task": {"type": "worker", "index": ARGS.process_id},
        }
    )
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=HEARTBEAT_TIMEOUT
        )
    )
    assert strategy.num_replicas_in_sync == 2
    return strategy.scope()


class _DieAfter(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.step:
            print("dying", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def dataset(repeat=1):
    """The data set, batched at the global batch size; each worker feeds all
    of it, and the distribution shards it (Keras' `DataParallel` on JAX,
    the strategy on TensorFlow)."""
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((CASE.x, CASE.y.astype("int32")))
    return data.repeat(repeat).batch(GLOBAL_BATCH, drop_remainder=True)


def train(model, output=None):
    """Compiles and fits `model`; returns `{"loss": ..., "model/<path>": ...}`
    (and writes it to `output`)."""
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=CASE.loss,
        jit_compile=BACKEND == "jax",
    )
    history = model.fit(dataset(), epochs=EPOCHS, verbose=0)
    values = {
        f"model/{v.path}": keras.ops.convert_to_numpy(v)
        for v in model.trainable_weights
    }
    values["loss"] = np.array(history.history["loss"])
    if output is not None:
        np.savez(output, **values)
        print("trained", flush=True)
    return values


def reference():
    """The single-process run on the same global batches (no distribution)."""
    model = CASE.build(0)
    ka.enable_adapter(model, ka.LoRA(rank=2), targets=CASE.targets)
    return train(model)


def fail_one_worker(model):
    """A second `fit`: one worker dies, the other must fail, not hang."""
    callbacks = [_DieAfter(ARGS.die_after_step)] if ARGS.die_after_step >= 0 else []
    start = time.monotonic()
    try:
        history = model.fit(dataset(repeat=8), epochs=1, verbose=0, callbacks=callbacks)
        # JAX dispatches the steps asynchronously: a failed collective
        # surfaces when the results are read.
        losses = [float(v) for v in history.history["loss"]]
    except Exception as error:  # what the surviving worker's user sees
        message = " ".join(str(error).split())[:500]
        print(
            f"error after {time.monotonic() - start:.1f} s: "
            f"{type(error).__name__}: {message}",
            flush=True,
        )
        os._exit(3)  # skip the distributed shutdown, which waits for the peer
    print(f"second fit completed: loss {losses}", flush=True)


def main():
    # TensorFlow builds, compiles and fits under the strategy's scope.
    with strategy_scope():
        model = CASE.build(0)
        ka.enable_adapter(model, ka.LoRA(rank=2), targets=CASE.targets)
        train(model, ARGS.output)
        if DISTRIBUTED:
            fail_one_worker(model)


if __name__ == "__main__":
    main()
