"""Atomic files and directories (keras_adapters._io), on real files."""

import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from keras_adapters import _io


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _dead_pid():
    """The id of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write(path, text):
    with _io.atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_existing_file_keeps_its_mode(tmp_path, umask_022):
    path = tmp_path / "a.h5"
    path.write_text("old")
    os.chmod(path, 0o644)
    _write(path, "new")
    assert path.read_text() == "new"
    assert _mode(path) == 0o644
    os.chmod(path, 0o640)
    _write(path, "newer")
    assert _mode(path) == 0o640


def test_new_file_gets_the_umask_mode(tmp_path, umask_022):
    _write(tmp_path / "a.h5", "x")
    assert _mode(tmp_path / "a.h5") == 0o644
    os.umask(0o027)
    _write(tmp_path / "b.h5", "x")
    assert _mode(tmp_path / "b.h5") == 0o640


def test_symlink_is_written_through(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "weights.h5"
    target.write_text("old")
    link = tmp_path / "link.h5"
    link.symlink_to(target)
    _write(link, "new")
    assert link.is_symlink()
    assert os.readlink(link) == str(target)
    assert target.read_text() == "new"
    assert sorted(os.listdir(tmp_path / "real")) == ["weights.h5"]


def test_failure_removes_the_temporary_file(tmp_path):
    path = tmp_path / "a.h5"
    path.write_text("old")
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error):
            with _io.atomic_file(path) as tmp:
                with open(tmp, "w") as f:
                    f.write("partial")
                raise error("interrupted")
        assert os.listdir(tmp_path) == ["a.h5"]
        assert path.read_text() == "old"


def test_temporary_names_and_stale_temporaries(tmp_path):
    path = tmp_path / "a.h5"
    with _io.atomic_file(path) as tmp:
        name = os.path.basename(tmp)
        assert name.startswith(f".a.h5.tmp-{os.getpid()}-")
    dead = tmp_path / f".a.h5.tmp-{_dead_pid()}-0123abcd"
    dead.write_text("left by a killed save")
    alive = tmp_path / f".a.h5.tmp-{os.getppid()}-0123abcd"  # a live process
    alive.write_text("another save in progress")
    other = tmp_path / f".b.h5.tmp-{_dead_pid()}-0123abcd"
    other.write_text("another file's")
    dead_keras = tmp_path / f".a.h5.tmp-{_dead_pid()}-4567cdef.keras"
    dead_keras.write_text("left by a killed save with a suffix")
    _write(path, "new")
    assert not dead.exists() and not dead_keras.exists()
    assert alive.exists() and other.exists()
    with _io.atomic_file(tmp_path / "m.keras", suffix=".keras") as tmp:
        assert tmp.endswith(".keras")
        open(tmp, "w").write("model")
    assert (tmp_path / "m.keras").read_text() == "model"


def test_temporaries_of_a_killed_unreaped_process_are_stale(tmp_path):
    # A process killed while its parent runs on without reaping it stays a
    # zombie: its id still answers kill(pid, 0), but it writes no more.
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        process.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _io._is_zombie(process.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _io._is_zombie(process.pid)
        stale = tmp_path / f".a.h5.tmp-{process.pid}-0123abcd"
        stale.write_text("left by a killed save")
        _write(tmp_path / "a.h5", "new")
        assert os.listdir(tmp_path) == ["a.h5"]
    finally:
        process.wait()
    assert not _io._is_zombie(os.getpid())


def test_atomic_file_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="`path` must be a str"):
        with _io.atomic_file(3):
            pass
    with pytest.raises(ValueError, match="is a directory"):
        with _io.atomic_file(tmp_path):
            pass
    with pytest.raises(FileNotFoundError, match="No directory"):
        with _io.atomic_file(tmp_path / "missing" / "a.h5"):
            pass
    with pytest.raises(ValueError, match="`suffix` must be"):
        with _io.atomic_file(tmp_path / "a.h5", suffix="/x"):
            pass
    assert os.listdir(tmp_path) == []


def _export(path, content, overwrite=True, fail=False):
    with _io.atomic_directory(path, overwrite=overwrite) as staging:
        for name, text in content.items():
            with open(os.path.join(staging, name), "w") as f:
                f.write(text)
        if fail:
            raise RuntimeError("the export failed")


def _read(path):
    return {n: open(os.path.join(path, n)).read() for n in sorted(os.listdir(path))}


def test_directory_is_replaced_whole(tmp_path, umask_022):
    path = tmp_path / "serving"
    _export(path, {"a": "1", "b": "1"})
    assert _mode(path) == 0o755
    os.chmod(path, 0o750)
    _export(path, {"a": "2"})
    assert _read(path) == {"a": "2"}
    assert _mode(path) == 0o750
    assert os.listdir(tmp_path) == ["serving"]


def test_failed_build_leaves_the_old_directory(tmp_path):
    path = tmp_path / "serving"
    _export(path, {"a": "1"})
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises((RuntimeError, KeyboardInterrupt)):
            with _io.atomic_directory(path, overwrite=True) as staging:
                open(os.path.join(staging, "a"), "w").write("partial")
                raise error("interrupted")
        assert _read(path) == {"a": "1"}
        assert os.listdir(tmp_path) == ["serving"]


def test_existing_directory_needs_overwrite(tmp_path):
    path = tmp_path / "serving"
    _export(path, {"a": "1"})
    with pytest.raises(ValueError, match="overwrite=True"):
        _export(path, {"a": "2"}, overwrite=False)
    assert _read(path) == {"a": "1"}
    (tmp_path / "empty").mkdir()
    _export(tmp_path / "empty", {"a": "3"}, overwrite=False)
    assert _read(tmp_path / "empty") == {"a": "3"}
    with pytest.raises(ValueError, match="`overwrite` must be a bool"):
        _export(path, {}, overwrite="yes")


def test_swap_without_renameat2(tmp_path, monkeypatch):
    # The portable path: rename the old directory aside, then the new in.
    monkeypatch.setattr(_io, "_renameat2", None)
    path = tmp_path / "serving"
    _export(path, {"a": "1"})
    _export(path, {"a": "2"})
    assert _read(path) == {"a": "2"}
    assert os.listdir(tmp_path) == ["serving"]


def test_crash_between_renames_is_restored(tmp_path):
    # What a kill between the two renames of the portable swap leaves: the
    # old export under a backup name of a dead process, nothing at the path.
    path = tmp_path / "serving"
    _export(path, {"a": "old"})
    dead = _dead_pid()
    os.rename(path, tmp_path / f".serving.backup-{dead}-0123abcd")
    (tmp_path / f".serving.staging-{dead}-4567cdef").mkdir()
    assert _io.recover_directory(path)
    assert _read(path) == {"a": "old"}
    assert not _io.recover_directory(path)  # nothing left to restore
    # The next export restores it too, and cleans the leftovers.
    os.rename(path, tmp_path / f".serving.backup-{dead}-0123abcd")
    with pytest.raises(ValueError, match="overwrite=True"):
        _export(path, {"a": "new"}, overwrite=False)
    assert _read(path) == {"a": "old"}
    assert os.listdir(tmp_path) == ["serving"]


def test_stale_staging_of_a_live_process_is_kept(tmp_path):
    path = tmp_path / "serving"
    live = tmp_path / f".serving.staging-{os.getppid()}-0123abcd"
    live.mkdir()
    _export(path, {"a": "1"})
    assert live.exists()


# Kill tests: a child process writes in a loop through _io and is killed
# (SIGKILL) at a random moment; the path must then hold a complete old or
# new artifact, and the next write leaves no leftovers. The child loads
# `_io.py` alone (no Keras import), so each round takes a fraction of a second.

_CHILD = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("_io", sys.argv[1])
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
path, kind = sys.argv[2], sys.argv[3]
if sys.argv[4] == "portable":
    io._renameat2 = None  # the two-rename swap, with a backup
size = 4 << 20
print("started", flush=True)
generation = 0
while True:
    generation = (generation + 1) % 200
    data = bytes([generation + 1]) * size
    if kind == "file":
        with io.atomic_file(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
    else:
        with io.atomic_directory(path, overwrite=True) as staging:
            for name in ("a", "b"):
                with open(os.path.join(staging, name), "wb") as f:
                    f.write(data)
"""

_SIZE = 4 << 20


def _kill_while_writing(path, kind, seed, rounds=4, swap="renameat2"):
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, _io.__file__, str(path), kind, swap],
            stdout=subprocess.PIPE,
        )
        assert child.stdout.readline().strip() == b"started"
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        yield


def _complete_file(path):
    data = open(path, "rb").read()
    return len(data) == _SIZE and data == data[:1] * _SIZE


@pytest.mark.parametrize("seed", [0, 1])
def test_killed_file_writes_leave_a_complete_file(tmp_path, seed):
    path = tmp_path / "a.h5"
    path.write_bytes(b"\x00" * _SIZE)
    for _ in _kill_while_writing(path, "file", seed):
        assert _complete_file(path)
    _write(path, "next")
    assert os.listdir(tmp_path) == ["a.h5"]


@pytest.mark.parametrize("seed", [0, 1])
def test_killed_directory_writes_leave_a_complete_directory(tmp_path, seed):
    path = tmp_path / "serving"
    for swap in ("renameat2", "portable"):
        for _ in _kill_while_writing(path, "directory", seed, swap=swap):
            _io.recover_directory(path)
            if path.exists():
                a, b = (open(path / n, "rb").read() for n in ("a", "b"))
                assert _complete_file(path / "a") and a == b
        _export(path, {"a": "next"})
        assert os.listdir(tmp_path) == ["serving"]
