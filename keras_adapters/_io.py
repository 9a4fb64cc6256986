"""Atomic writes: the one implementation every file and directory writer uses.

A save either leaves the old complete artifact at its path or the new one,
never neither and never a partial one, even if the process is killed.

Files (`atomic_file`): the writer fills a temporary file in the target's own
directory, named `.<name>.tmp-<pid>-<random>`; it is fsynced, given the
existing file's permission mode (a new file gets the mode the umask gives,
as `open()` would), renamed over the target (`os.replace`, atomic on POSIX
and Windows) and the directory is fsynced. A symlink at the path is written
through: its target is replaced and the link kept. The owner and group of a
replaced file are not carried over (that needs privileges); the mode is.

Directories (`atomic_directory`): the writer fills a staging directory
`.<name>.staging-<pid>-<random>` beside the target. On Linux the staging
directory and the existing target are swapped with one
`renameat2(RENAME_EXCHANGE)` call, so the path always holds a complete
directory; the old one, now under the staging name, is then deleted.
Elsewhere (or on file systems without the call) the old directory is first
renamed to `.<name>.backup-<pid>-<random>` and the new one renamed into
place: a crash between those two renames leaves only the backup, which the
next `atomic_directory` or `recover_directory` call for that path renames
back.

Temporary files, staging directories and backups left by a process that no
longer runs (killed mid-save) are removed by the next save to the same path.
The check is by process id on this machine; on a file system shared between
machines, a leftover of another machine's live process is kept.
"""

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import sys

_TMP = "tmp"
_STAGING = "staging"
_BACKUP = "backup"


def _temporary_name(name, kind, suffix=""):
    return f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _leftovers(directory, name, kind):
    """`[(path, pid)]` of leftovers of kind `kind` for `name` in `directory`."""
    pattern = re.compile(
        re.escape(f".{name}.{kind}-") + r"(\d+)-[0-9a-f]{8}(?:\.[\w.]+)?"
    )
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    found = []
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match:
            found.append((os.path.join(directory, entry), int(match[1])))
    return found


def _process_is_running(pid):
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:  # e.g. Windows: cannot tell, so keep the leftover
        return True
    return not _is_zombie(pid)


def _is_zombie(pid):
    """Whether `pid` has exited but not been reaped by its parent (Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # "pid (command) state ...": the command may hold spaces or ")".
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def _remove(path):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass


def _remove_stale(directory, name, kinds):
    """Removes leftovers of dead processes; returns the paths removed."""
    removed = []
    for kind in kinds:
        for path, pid in _leftovers(directory, name, kind):
            if not _process_is_running(pid):
                try:
                    _remove(path)
                except OSError:
                    continue  # not ours to remove (permissions): leave it
                removed.append(path)
    return removed


def _fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory):
    # Makes a rename in `directory` durable. Not possible on every platform
    # (Windows cannot open a directory): then the rename is atomic, but only
    # as durable as the file system makes it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root):
    for directory, _, files in os.walk(root):
        for file in files:
            path = os.path.join(directory, file)
            if not os.path.islink(path):
                _fsync_file(path)
        _fsync_directory(directory)


def _resolve(path):
    """The absolute path a write to `path` lands on (symlinks followed)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"`path` must be a str or os.PathLike; received {path!r}.")
    return os.path.realpath(os.fspath(path))


@contextlib.contextmanager
def atomic_file(path, suffix: str = ""):
    """Writes a file atomically: yields a temporary path to write to.

    When the `with` block ends normally, the temporary file replaces `path`
    (through a symlink at `path`, its target); if the block raises (any
    exception, `KeyboardInterrupt` included), the temporary file is removed
    and `path` is untouched. See the module docstring for the guarantees.

    Args:
        path: the file to write (str or os.PathLike). Its directory must
            exist.
        suffix: an extension the temporary file's name ends with, for
            writers that check it (Keras' `model.save` wants `.keras`).

    Yields:
        The temporary file's path (str), in the same directory as the final
        file. It exists, empty, with the final file's mode; the writer may
        truncate or recreate it.

    Raises:
        ValueError: `path` is not a str or os.PathLike, or is a directory.
        FileNotFoundError: the directory of `path` does not exist.

    Example:

    ```python
    with atomic_file("weights.h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f["x"] = x
    ```
    """
    target = _resolve(path)
    if not isinstance(suffix, str) or not re.fullmatch(r"(\.\w+)*", suffix):
        raise ValueError(
            f"`suffix` must be '' or an extension such as '.keras'; received "
            f"{suffix!r}."
        )
    if os.path.isdir(target):
        raise ValueError(f"{target!r} is a directory; expected a file path.")
    directory, name = os.path.split(target)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No directory {directory!r} to write {name!r} in.")
    _remove_stale(directory, name, (_TMP,))
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = None
    tmp = os.path.join(directory, _temporary_name(name, _TMP, suffix))
    # 0o666 minus the umask, as for any new file (mkstemp would give 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode)
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)  # the writer may have recreated the file
        _fsync_file(tmp)
        os.replace(tmp, target)
        _fsync_directory(directory)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_bytes(path, data: bytes) -> None:
    """Writes `data` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def recover_directory(path) -> bool:
    """Restores a directory that a killed `atomic_directory` swap left aside.

    If nothing is at `path` but a backup of a dead process is beside it
    (only possible without `renameat2`, between the two renames of a swap),
    the newest such backup is renamed back to `path`.

    Args:
        path: the directory path.

    Returns:
        Whether a backup was restored.
    """
    target = _resolve(path)
    directory, name = os.path.split(target)
    if os.path.lexists(target):
        return False
    backups = [
        backup
        for backup, pid in _leftovers(directory, name, _BACKUP)
        if not _process_is_running(pid)
    ]
    if not backups:
        return False
    backups.sort(key=lambda backup: os.lstat(backup).st_mtime)
    try:
        os.rename(backups[-1], target)
    except OSError:
        return False
    _fsync_directory(directory)
    return True


# renameat2(2) flags (linux/fs.h).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def _exchange(a, b) -> bool:
    """Atomically swaps `a` and `b`; False if the system cannot."""
    if _renameat2 is None:
        return False
    result = _renameat2(
        _AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # no such call, or a file system without it
    raise OSError(code, os.strerror(code), a)


def _swap_into_place(staging, target):
    directory, name = os.path.split(target)
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        # `staging` now holds the old artifact: a crash from here on leaves
        # the new one at `target` and a stale staging directory.
        _fsync_directory(directory)
        _remove(staging)
        return
    backup = os.path.join(directory, _temporary_name(name, _BACKUP))
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)
        raise
    _fsync_directory(directory)
    _remove(backup)


@contextlib.contextmanager
def atomic_directory(path, overwrite: bool = False):
    """Writes a directory atomically: yields a staging directory to fill.

    When the `with` block ends normally, the staging directory takes the
    place of `path` (an existing directory or file there is replaced only if
    `overwrite`); if the block raises, the staging directory is removed and
    `path` is untouched. A directory that a killed swap left aside is
    restored first, and leftovers of dead processes are removed. See the
    module docstring for the guarantees.

    Args:
        path: the directory to write (str or os.PathLike). Its parent is
            created if needed.
        overwrite: replace an existing non-empty directory (or a file) at
            `path`. An empty directory is always replaced.

    Yields:
        The staging directory's path (str), empty, with the mode the final
        directory will have (an existing directory's, else the umask's).

    Raises:
        ValueError: a bad argument, or something at `path` and not
            `overwrite`.

    Example:

    ```python
    with atomic_directory("serving/news", overwrite=True) as staging:
        model.export(staging)
    ```
    """
    if not isinstance(overwrite, bool):
        raise ValueError(f"`overwrite` must be a bool; received {overwrite!r}.")
    target = _resolve(path)
    directory, name = os.path.split(target)
    os.makedirs(directory, exist_ok=True)
    recover_directory(target)
    _remove_stale(directory, name, (_STAGING, _BACKUP))
    if os.path.lexists(target) and not overwrite:
        if not os.path.isdir(target) or os.listdir(target):
            raise ValueError(
                f"{target!r} exists and is not an empty directory; pass "
                "overwrite=True to replace it."
            )
    staging = os.path.join(directory, _temporary_name(name, _STAGING))
    os.mkdir(staging, 0o777)  # minus the umask
    try:
        if os.path.isdir(target):
            os.chmod(staging, stat.S_IMODE(os.stat(target).st_mode))
        yield staging
        _fsync_tree(staging)
        _swap_into_place(staging, target)
    except BaseException:
        with contextlib.suppress(OSError):
            _remove(staging)
        raise
