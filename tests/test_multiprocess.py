"""Two processes, one data-parallel job, on this machine (loopback only).

`multiprocess_check.py` runs one worker per process. JAX (JAX session only):
`jax.distributed` with gloo CPU collectives and `keras.distribution.
DataParallel`; the trained adapter (and head) equal a single-process run on
the same global batches, and when one worker dies (SIGKILL) the other fails
with JAX's error instead of hanging. TensorFlow (TF session only):
`MultiWorkerMirroredStrategy`, whose Keras 3 `fit` fails before the first
step (keras-team/keras#20585): the test pins that failure, so that it
notices when Keras fixes it.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork"), reason="POSIX processes and signals"
)
HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "multiprocess_check.py")
BACKEND = keras.backend.backend()
TIMEOUT = 600  # seconds for the job (imports on a busy machine)
# After a worker dies: JAX's heartbeat timeout (10 s in the script), the
# shutdown barrier, and slack for a busy machine.
FAILURE_BOUND = 120


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start(tmp_path, process_id, ports, die_after_step=-1):
    root = os.path.dirname(HERE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [root, HERE] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    log = open(tmp_path / f"worker{process_id}.log", "w+")
    command = [
        sys.executable,
        SCRIPT,
        str(tmp_path / f"worker{process_id}.npz"),
        "--process-id",
        str(process_id),
        "--ports",
        ",".join(map(str, ports)),
        "--die-after-step",
        str(die_after_step),
    ]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    return process, log


def _output(log):
    log.seek(0)
    return log.read()


def _wait(process, log, timeout):
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"hung for {timeout} s:\n{_output(log)[-3000:]}") from None
    return process.returncode


@pytest.mark.skipif(BACKEND != "jax", reason="the JAX job runs in the JAX session")
def test_two_jax_processes_train_as_one_and_fail_together(tmp_path):
    import multiprocess_check

    ports = _free_ports(2)
    workers = [
        _start(tmp_path, 0, ports),
        _start(tmp_path, 1, ports, die_after_step=1),
    ]
    try:
        # Meanwhile, the single-process run in this process.
        want = multiprocess_check.reference()
        (p0, log0), (p1, log1) = workers
        assert _wait(p1, log1, TIMEOUT) == -signal.SIGKILL, _output(log1)[-3000:]
        died = time.monotonic()
        code = _wait(p0, log0, FAILURE_BOUND)
        failed_after = time.monotonic() - died
    finally:
        for process, _ in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
    out0, out1 = _output(log0), _output(log1)
    assert "trained" in out0 and "dying" in out1
    # One job: both processes hold the same adapter, the single run's.
    got = [np.load(tmp_path / f"worker{i}.npz") for i in (0, 1)]
    assert sorted(got[0]) == sorted(want) and len(want) > 3
    for key in want:
        np.testing.assert_array_equal(got[0][key], got[1][key])
        # Float32 sums in another order (measured: 1.5e-8 at most).
        np.testing.assert_allclose(got[0][key], want[key], rtol=1e-5, atol=1e-6)
    # The survivor fails, with JAX's message, within the bound.
    assert code != 0, out0[-3000:]
    assert (
        "another task died" in out0
        or "heartbeat timeout" in out0
        or "error after" in out0
    ), out0[-3000:]
    print(f"the surviving worker failed {failed_after:.0f} s after the other died")


@pytest.mark.skipif(
    BACKEND != "tensorflow", reason="the TensorFlow job runs in the TF session"
)
def test_two_tensorflow_workers_fail_in_keras_fit(tmp_path):
    ports = _free_ports(2)
    workers = [_start(tmp_path, i, ports) for i in (0, 1)]
    try:
        codes = [_wait(p, log, TIMEOUT) for p, log in workers]
    finally:
        for process, _ in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
    outputs = [_output(log) for _, log in workers]
    # Keras' symbolic build reduces a dict of distributed inputs across the
    # workers (keras-team/keras#20585, #20329).
    assert codes == [1, 1], outputs[0][-3000:]
    for output in outputs:
        assert "with an unsupported type (<class 'dict'>) to a Tensor" in output
        assert "trained" not in output
