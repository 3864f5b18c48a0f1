"""Atomic writes: a crash never leaves a half-written file or folder.

Whatever kills a save (``SIGKILL``, a power cut after the data reached the disk, a full
disk), the target is either its old complete version or its new complete version:

* a file is written to a hidden temporary file beside it, flushed to disk, then renamed over
  the target (:func:`atomic_write_bytes`);
* a folder is written to a hidden temporary folder beside it, its files flushed to disk, then
  swapped with the target in one step (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two
  renames, and a crash between them is repaired by the next save, which puts the old folder
  back) (:func:`atomic_directory`).

Temporary names are ``.<name>.tmp-<pid>-<random>`` (and ``.<name>.old-<pid>-<random>``):
hidden, and marked with the writing process. The next save of the same target removes those
whose process is gone, so a killed save leaves nothing behind for long. A full disk or a
permission error raises :class:`WriteError` (an ``OSError`` with the same ``errno``) that
says what to do, after removing the temporary copy; the target is untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from moa.errors import MoaError

logger = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)


class WriteError(MoaError, OSError):
    """A save that could not be written (disk full, no permission); the previous version is intact.

    Built as ``WriteError(errno, message)``: ``errno`` is the original one (``ENOSPC``, ``EACCES``, ...).
    """

    def __str__(self) -> str:
        return str(self.strerror or super().__str__())


def temp_name(target: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of ``target`` for a temporary copy, marked with this process id."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(target: str | os.PathLike) -> list[Path]:
    """Remove temporary copies of ``target`` left by saves whose process died; return them.

    If ``target`` itself is missing because a save died between moving the old folder aside
    and renaming the new one in (only where folders cannot be swapped in one step), the old
    folder is put back first, so ``target`` is again its last complete version.
    """
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}$")
    removed = []
    try:
        siblings = sorted(target.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        match = pattern.match(path.name)
        if match is None or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not os.path.lexists(target):
            logger.warning("Restoring %s from %s (a save was killed between two renames).", target, path)
            os.replace(path, target)
            continue
        logger.info("Removing %s, left by a killed save of %s.", path, target)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path)
    return removed


def _exchange_function():  # type: ignore[no-untyped-def]
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _exchange_function()


def exchange_paths(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step; ``False`` where the system cannot (nothing changed)."""
    if _RENAMEAT2 is None:
        return False
    result = _RENAMEAT2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # e.g. a filesystem without it
        return False
    raise OSError(code, os.strerror(code), os.fspath(first), None, os.fspath(second))


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder``, then the folders themselves, to disk."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(root))


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (new names, renames) to disk where the system allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_error(error: OSError, target: Path, what: str = "save") -> OSError:
    """``error`` as a :class:`WriteError` that names ``target`` and the next step (other errors unchanged)."""
    if isinstance(error, WriteError):
        return error
    if error.errno in _NO_SPACE:
        reason = "the disk is full (no space left on device)"
        step = f"Free some space on the disk holding {str(target.parent)!r}, or save somewhere else, then retry."
    elif error.errno in _NO_PERMISSION:
        reason = "permission denied (or a read-only filesystem)"
        step = (f"Make {str(target.parent)!r} writable for this user (check its owner and mode), or save somewhere "
                f"else, then retry.")
    else:
        return error
    return WriteError(error.errno, f"Could not {what} {str(target)!r}: {reason} ({error}). The previous version is "
                                   f"intact and no partial copy was left. {step}")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``target`` when the block succeeds.

    The folder is created beside ``target`` (same filesystem, so the final swap is atomic).
    On an exception it is removed and ``target`` is left exactly as it was. An existing
    ``target`` is swapped with the new folder in one step where the system allows it (else
    moved aside, the new folder renamed in), then deleted.

    Raises:
        WriteError: the disk is full or the folder is not writable (``target`` untouched).
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target)
        tmp = temp_name(target)
        tmp.mkdir()
    except OSError as error:
        raise write_error(error, target) from error
    try:
        yield tmp
        fsync_tree(tmp)
        _swap_in(tmp, target)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError):
            raise write_error(error, target) from error
        raise
    fsync_dir(target.parent)


def _swap_in(tmp: Path, target: Path) -> None:
    """Put the complete folder ``tmp`` at ``target``, deleting what was there."""
    if not os.path.lexists(target):
        os.replace(tmp, target)
        return
    if exchange_paths(tmp, target):  # tmp now holds the old version
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = temp_name(target, "old")
    os.replace(target, old)
    try:
        os.replace(tmp, target)  # a crash before this line: the next save puts `old` back (clean_stale)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, a flush to disk and an atomic rename.

    Raises:
        WriteError: the disk is full or the folder is not writable (``path`` untouched).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path)
        tmp = temp_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(error, OSError):
            raise write_error(error, path, "write") from error
        raise
    fsync_dir(path.parent)


__all__ = [
    "WriteError",
    "atomic_directory",
    "atomic_write_bytes",
    "clean_stale",
    "exchange_paths",
    "fsync_dir",
    "fsync_tree",
    "temp_name",
    "write_error",
]
