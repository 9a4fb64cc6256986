"""A save killed at a random moment leaves the old or the new artifact.

A child process (`kill_check.py`) saves a tiny adapted model again and again,
alternating two versions of its adapter values, with
`ka.save_adapter_weights`, `model.save` (`.keras`) or
`ka.export_saved_model(overwrite=True)`; the test kills it with SIGKILL at a
random moment during a save, then loads the path with the public loaders
and checks it holds one of the two versions the save could have left: the
one on disk before the save began, or the one being saved (each child first
saves the version the path does not hold, so the two differ). After the last
kill, one more save must leave nothing but the artifact (the temporary
files of the killed saves are removed).

`KERAS_ADAPTERS_KILLS` sets the number of kills per kind (5 by default).
"""

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import pytest

import keras_adapters as ka

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
import kill_check  # noqa: E402
from _fixtures import backend_independent  # noqa: E402

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork"), reason="POSIX processes and signals"
)
KILLS = int(os.environ.get("KERAS_ADAPTERS_KILLS", "5"))
TIMEOUT = 600  # seconds for one line of the child (imports on a busy machine)
ARTIFACTS = {
    "adapter": "model.adapter.weights.h5",
    "keras": "model.keras",
    "export": "serving",
}


class _Child:
    """`kill_check.py` in a process, read line by line with a timeout."""

    def __init__(self):
        root = os.path.dirname(os.path.dirname(os.path.abspath(ka.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [root, HERE] + [p for p in [env.get("PYTHONPATH")] if p]
        )
        self.stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "kill_check.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=env,
        )
        self.buffer = b""

    def _fail(self, why):
        self.stderr.seek(0)
        tail = self.stderr.read().decode(errors="replace")[-3000:]
        raise AssertionError(f"kill_check.py: {why}\n{tail}")

    def line(self, timeout=TIMEOUT):
        """The next line, or None if none comes within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.process.stdout], [], [], left)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    self._fail("its output ended")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def expect(self, prefix):
        line = self.line()
        if line is None or not line.startswith(prefix):
            self._fail(f"expected {prefix!r}, got {line!r}")
        return line

    def send(self, command):
        self.process.stdin.write(f"{command}\n".encode())
        self.process.stdin.flush()

    def close(self):
        try:
            self.send("quit")
            self.process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.stderr.close()


@pytest.fixture(scope="module")
def child():
    process = _Child()
    try:
        process.expect("ready")
        yield process
    finally:
        process.close()


@pytest.fixture(scope="module")
def model():
    return kill_check.build()


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _which_version(values, model):
    """1 or 2: the version whose values `values` are (exactly)."""
    found = [
        version
        for version in (1, 2)
        if all(
            np.array_equal(a, b)
            for a, b in zip(
                values, kill_check.version_values(model, version), strict=True
            )
        )
    ]
    assert len(found) == 1, "the artifact holds neither version"
    return found[0]


def _load(kind, path, model):
    """The version the artifact at `path` holds, loaded as a user would."""
    if kind == "adapter":
        ka.load_adapter_weights(model, path)  # restores the values in place
        return _which_version([_numpy(v) for v in model.trainable_weights], model)
    if kind == "keras":
        loaded = keras.saving.load_model(path)
        assert ka.active_adapters(loaded) == ["default"]
        return _which_version([_numpy(v) for v in loaded.trainable_weights], model)
    import tensorflow as tf

    x = kill_check.CASE.x[:4]
    serve = tf.saved_model.load(path).signatures["serving_default"]
    (outputs,) = serve(features=tf.constant(x)).values()
    found = []
    for version in (1, 2):
        kill_check.set_version(model, version)
        expected = _numpy(model(x, training=False))
        if np.allclose(outputs.numpy(), expected, rtol=1e-5, atol=1e-6):
            found.append(version)
    assert len(found) == 1, "the export computes neither version"
    return found[0]


# What a kill can leave depends on the writes (`keras_adapters._io`), not on
# the backend that computed the values: one backend runs it.
@backend_independent
@pytest.mark.parametrize("kind", sorted(ARTIFACTS))
def test_a_killed_save_leaves_the_old_or_the_new_artifact(kind, child, model, tmp_path):
    path = str(tmp_path / ARTIFACTS[kind])
    rng = np.random.default_rng(sorted(ARTIFACTS).index(kind))
    on_disk, duration, leftovers = None, None, 0
    for _ in range(KILLS):
        # Each child first saves the version the path does not hold.
        child.send(f"save {kind} {path} {3 - on_disk if on_disk else 1}")
        pid = int(child.expect("pid ").split()[1])
        in_progress = int(child.expect("begin ").split()[1])
        if duration is None:
            # The first round measures a save, then kills during the next.
            start = time.monotonic()
            on_disk = int(child.expect("saved ").split()[1])
            duration = time.monotonic() - start
            in_progress = int(child.expect("begin ").split()[1])
        time.sleep(rng.uniform(0, 1.2 * duration))
        os.kill(pid, signal.SIGKILL)
        # What the child printed before it died: the versions the path may hold.
        while (line := child.line(timeout=0.5)) is not None:
            word, version = line.split()
            if word == "begin":
                in_progress = int(version)
            else:
                on_disk, in_progress = int(version), None
        allowed = {on_disk, in_progress} - {None}
        leftovers += len(os.listdir(tmp_path)) - 1
        version = _load(kind, path, model)
        assert version in allowed, (version, allowed)
        on_disk = version
    # The next save removes what the killed saves left.
    kill_check.set_version(model, 1)
    kill_check.save(model, kind, path)
    assert os.listdir(tmp_path) == [ARTIFACTS[kind]], leftovers
    assert _load(kind, path, model) == 1


def _wait_until_gone(pid, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} is still running")


def _train(child, backup, out, kill_epoch=-1, kill_step=-1):
    child.send(f"train {backup} {out} {kill_epoch} {kill_step}")
    pid = int(child.expect("pid ").split()[1])
    if kill_epoch >= 0:
        child.expect("killing")
        _wait_until_gone(pid)
        assert not os.path.exists(out)
    else:
        child.expect("trained")
    return pid


def test_training_killed_mid_epoch_resumes_to_the_same_adapter(child, tmp_path):
    """`BackupAndRestore` (backups at epoch ends): killed in the middle of
    epoch 2 of 3, a new process resumes from the end of epoch 1 and ends
    with the adapter and optimizer state of an uninterrupted run."""
    backup = str(tmp_path / "backup")
    _train(child, "-", tmp_path / "uninterrupted.npz")
    _train(child, backup, tmp_path / "killed.npz", kill_epoch=1, kill_step=1)
    # The backup of epoch 1: the resumed run trains epochs 2 and 3 only, so
    # it matches only if the weights and Adam's moments were restored.
    with open(os.path.join(backup, "training_metadata.json")) as f:
        assert json.load(f)["epoch"] == 1
    _train(child, backup, tmp_path / "resumed.npz")
    want = np.load(tmp_path / "uninterrupted.npz")
    got = np.load(tmp_path / "resumed.npz")
    assert sorted(got) == sorted(want)
    assert any("lora_b" in k for k in got) and any("optimizer/" in k for k in got)
    for key in want:
        # The same compiled steps on the same values: equal to float32
        # rounding (measured: bit for bit).
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7)
    assert not os.path.exists(backup)  # removed at the end of a completed fit
