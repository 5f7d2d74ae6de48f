"""Atomic writes: a file or a directory appears complete at its path, or not at all.

Every pcmx output (stores, TIFFs, checkpoint entries, manifests) is written to a hidden
temporary sibling ``.NAME.pcmx-tmp-XXXXXXXX`` in the same directory and put in place only
when complete: a file by :func:`os.replace`, a directory by :func:`exchange` (one atomic swap
of the two directories, so a reader at the path finds the old or the new one at every
instant). A crash or a kill mid-write leaves at most such a sibling, never a half-written
result and never a damaged previous one; the next write to the same path removes it
(:func:`clean_leftovers`). Directory writers hold a lock (:func:`writer_lock`), so two
writers to one path never interleave: the second fails at once, naming the first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator

from ..errors import StoreLockedError
from ..provenance import jsonable

try:  # POSIX; where it is missing (Windows) directory writes take no lock (docs/store-format.md)
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms the tests run on
    fcntl = None

__all__ = ["TEMP_MARKER", "OLD_MARKER", "LOCK_MARKER", "temporary_sibling", "lock_path",
           "is_temporary", "remove_temporaries", "leftovers", "clean_leftovers", "recover_missing",
           "writer_lock", "exchange", "atomic_file", "atomic_json", "atomic_dir"]

TEMP_MARKER = ".pcmx-tmp-"
"""In the name of a sibling being written (``.NAME.pcmx-tmp-XXXXXXXX``)."""
OLD_MARKER = ".pcmx-old-"
"""In the name of a directory set aside while its replacement is renamed into place (only
where :func:`exchange` is not supported, and by pcmx before it)."""
LOCK_MARKER = ".pcmx-lock"
"""Suffix of the lock file of a directory being written (``.NAME.pcmx-lock``)."""
_LEGACY_MARKER = ".tmp-"  # checkpoint entries of pcmx before this module (``.NAME.tmp-XXXX``)
_RESTORE_WAIT_S = 5.0  # how long a reader waits for a live writer to finish its two renames


def temporary_sibling(final: str, marker: str = TEMP_MARKER) -> str:
    """A fresh hidden path beside ``final``: ``DIR/.NAME{marker}XXXXXXXX``.

    Parameters
    ----------
    final : str
        The path the result will have.
    marker : str
        :data:`TEMP_MARKER` (a result being written) or :data:`OLD_MARKER` (a previous
        result set aside).
    """
    parent, name = os.path.split(os.path.abspath(final))
    return os.path.join(parent, f".{name}{marker}{uuid.uuid4().hex[:8]}")


def lock_path(final) -> str:
    """The lock file of ``final``: ``DIR/.NAME.pcmx-lock`` (it exists only while a writer runs)."""
    parent, name = os.path.split(os.path.abspath(os.fspath(final)))
    return os.path.join(parent, f".{name}{LOCK_MARKER}")


def is_temporary(name: str) -> bool:
    """True for the name of a leftover made by this module (or by pcmx checkpoints before it)."""
    return name.startswith(".") and any(m in name for m in (TEMP_MARKER, OLD_MARKER, _LEGACY_MARKER))


def remove_temporaries(directory: str) -> list[str]:
    """Delete the leftovers of interrupted writes directly in ``directory``.

    For a directory no other process writes in (a checkpoint of the caller's own run); beside
    stores, :func:`clean_leftovers` removes the leftovers of one path under its lock.

    Returns
    -------
    list of str
        The names removed (sorted).
    """
    removed = sorted(n for n in os.listdir(directory) if is_temporary(n))
    for name in removed:
        _remove(os.path.join(directory, name))
    return removed


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def fsync_path(path: str, *, directory: bool = False) -> None:
    """Flush a file's (or, with ``directory=True``, a directory's entries') data to disk; a
    path that no longer exists is skipped, and so is a filesystem refusing to fsync a
    directory (a file's fsync error is raised: its data may not be on disk)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - filesystems refusing fsync on directories
        if not directory:
            raise
    finally:
        os.close(fd)


def leftovers(final) -> list[str]:
    """The hidden siblings that interrupted writes of ``final`` left: ``.NAME.pcmx-tmp-*`` and
    ``.NAME.pcmx-old-*`` (full paths, sorted; not the lock file)."""
    parent, name = os.path.split(os.path.abspath(os.fspath(final)))
    pattern = re.compile(rf"\.{re.escape(name)}({re.escape(TEMP_MARKER)}|{re.escape(OLD_MARKER)})[0-9a-f]{{8}}")
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(parent, n) for n in names if pattern.fullmatch(n))


def clean_leftovers(final) -> tuple[str | None, list[str]]:
    """Recover ``final`` from an interrupted replacement and delete the leftovers of killed writes.

    Call it holding :func:`writer_lock` (no live writer then owns any of them). Where ``final``
    is missing and a directory set aside by an interrupted replacement exists
    (``.NAME.pcmx-old-*``: complete, it was at ``final``), the most recently set aside one is
    renamed back; every other leftover (temporary siblings, half-written or complete but never
    put in place, older copies) is deleted.

    Returns
    -------
    restored : str or None
        The sibling renamed back to ``final``, if any.
    removed : list of str
        The siblings deleted.
    """
    final = os.path.abspath(os.fspath(final))
    found = leftovers(final)
    restored = None
    if not os.path.lexists(final):
        aside = [p for p in found if OLD_MARKER in os.path.basename(p)
                 and os.path.isdir(p) and not os.path.islink(p)]
        if aside:
            # a rename changes the ctime of what it moves: the newest is the last store in place
            restored = max(aside, key=lambda p: os.stat(p).st_ctime_ns)
            os.rename(restored, final)
            found.remove(restored)
    for path in found:
        _remove(path)
    return restored, found


def _holder(fd: int) -> str:
    """Who holds a lock, from its lock file, as a phrase for the message."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 65536).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or not info.get("pid"):
        return "another process (it has not said which yet)"
    command = f", running `{info['command']}`" if info.get("command") else ""
    return f"pid {info['pid']} on host {info.get('host', '?')} since {info.get('since', '?')}{command}"


@contextlib.contextmanager
def writer_lock(final) -> Iterator[str]:
    """Hold the exclusive writer lock of ``final`` for the duration of a ``with`` block.

    The lock is an ``flock`` on ``DIR/.NAME.pcmx-lock`` (:func:`lock_path`), which records the
    holder (pid, host, start time, command line) and is deleted when the block ends. The
    kernel releases ``flock`` when its process dies, so a lock file left by a killed writer
    locks nothing: the next writer takes it over. Without ``fcntl`` (Windows) no lock is taken.

    Yields
    ------
    str
        The lock file's path.

    Raises
    ------
    StoreLockedError
        Another process (or another open of the lock in this one) holds the lock; the message
        names ``final`` and the holder. Nothing is changed.
    OSError
        The lock file cannot be created (a read-only or missing directory).
    """
    path = lock_path(final)
    if fcntl is None:  # pragma: no cover - Windows
        yield path
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StoreLockedError(
                f"{os.fspath(final)}: being written by {holder}; wait for that write to end, or "
                "stop it (its lock goes with it)") from None
        except BaseException:
            os.close(fd)
            raise
        # the previous holder deletes the file as it lets go: lock the file at the path, not a
        # deleted one this open may have caught
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": " ".join(sys.argv)[:300]}
        with contextlib.suppress(OSError):  # who holds it is for messages only (a full disk...)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # still holding the lock: no one can have taken this file over
        os.close(fd)


def recover_missing(final) -> str | None:
    """For readers: put back ``final`` if an interrupted replacement left it only set aside.

    Only does something where ``final`` is missing and a ``.NAME.pcmx-old-*`` sibling exists,
    which happens only where :func:`exchange` is not supported (two renames) and a writer was
    killed between them. A live writer in that instant is waited for (a few seconds at most).

    Returns
    -------
    str or None
        The sibling restored, if any.

    Raises
    ------
    OSError
        The sibling cannot be renamed back (e.g. a read-only directory).
    """
    final = os.path.abspath(os.fspath(final))
    if os.path.lexists(final) or not any(OLD_MARKER in os.path.basename(p) for p in leftovers(final)):
        return None
    deadline = time.monotonic() + _RESTORE_WAIT_S
    while True:
        try:
            with writer_lock(final):
                return clean_leftovers(final)[0]
        except StoreLockedError:
            if os.path.lexists(final) or time.monotonic() > deadline:
                return None
            time.sleep(0.05)


_EXCHANGE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM,
                         errno.EXDEV}


@functools.lru_cache(maxsize=1)
def _libc_exchange() -> Callable[[bytes, bytes], int] | None:
    """The C call swapping two paths (``f(a, b) -> 0`` or -1 and errno), or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no C library to load (Windows)
        return None
    if hasattr(libc, "renameat2"):  # Linux >= 3.15, glibc >= 2.28
        renameat2 = libc.renameat2
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        at_fdcwd, rename_exchange = -100, 2
        return lambda a, b: renameat2(at_fdcwd, a, at_fdcwd, b, rename_exchange)
    if hasattr(libc, "renamex_np"):  # pragma: no cover - macOS (APFS)
        renamex_np = libc.renamex_np
        renamex_np.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        rename_swap = 2
        return lambda a, b: renamex_np(a, b, rename_swap)
    return None  # pragma: no cover - another C library


def exchange(a, b) -> bool:
    """Swap two existing paths in one atomic step (each name then holds the other's content).

    Linux ``renameat2(RENAME_EXCHANGE)`` (ext4, xfs, btrfs, tmpfs, overlayfs...) or macOS
    ``renamex_np(RENAME_SWAP)`` (APFS).

    Returns
    -------
    bool
        True once swapped; False where the system or the filesystem cannot (nothing changed:
        NFS, SMB, FAT, Windows, a container forbidding the call), for the caller to fall back.

    Raises
    ------
    OSError
        Any other failure (a path missing, permission denied); nothing changed.
    """
    swap = _libc_exchange()
    if swap is None:
        return False
    if swap(os.fsencode(os.fspath(a)), os.fsencode(os.fspath(b))) == 0:
        return True
    err = ctypes.get_errno()
    if err in _EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def atomic_file(final, write: Callable[[str], object]) -> str:
    """Write one file atomically: ``write(tmp)`` to a hidden sibling, fsync, rename into place.

    Parameters
    ----------
    final : str or path-like
        The file to create or replace (its directory must exist).
    write : callable
        Called with the temporary path; must create that file (e.g. ``tifffile.imwrite``).

    Returns
    -------
    str
        ``final``.

    Raises
    ------
    Exception
        Whatever ``write`` or the rename raises; the temporary file is removed first and a
        previous file at ``final`` is left unchanged.
    """
    final = os.fspath(final)
    tmp = temporary_sibling(final)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
    return final


def atomic_json(final, obj) -> str:
    """Write ``obj`` as JSON (through :func:`pcmx.provenance.jsonable`, indented, sorted keys),
    atomically (:func:`atomic_file`).

    Returns
    -------
    str
        ``final``.
    """
    text = json.dumps(jsonable(obj), indent=1, sort_keys=True)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_file(final, write)


def put_in_place(tmp: str, final: str) -> None:
    """Move the complete ``tmp`` to ``final``; a reader at ``final`` never finds it missing
    where :func:`exchange` works."""
    if not os.path.lexists(final):
        os.rename(tmp, final)  # refuses (ENOTEMPTY) a non-empty directory appearing meanwhile
        return
    if exchange(tmp, final):
        _remove(tmp)  # now the previous directory
        return
    # no atomic swap here: two renames, a kill between them is undone by clean_leftovers
    old = temporary_sibling(final, OLD_MARKER)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    _remove(old)


def atomic_dir(final, write: Callable[[str], object], *,
               check: Callable[[str], object] | None = None) -> str:
    """Write one directory (e.g. a Zarr group) atomically: ``write(tmp)``, then swap into place.

    Under :func:`writer_lock`: the leftovers of killed writes of ``final`` are cleaned (and
    ``final`` restored if a killed replacement left it only set aside, :func:`clean_leftovers`),
    ``check(final)`` is called, the new directory is written beside, and put in place by one
    atomic :func:`exchange` with the existing directory, which is then deleted. Where the
    filesystem cannot exchange, the existing directory is renamed aside
    (``.NAME.pcmx-old-XXXXXXXX``), the new one renamed in (the old one put back if that
    fails), and the old one deleted.

    Parameters
    ----------
    final : str or path-like
        The directory to create or replace (its parent must exist).
    write : callable
        Called with the temporary path, which does not exist yet; must create it.
    check : callable, optional
        Called with ``final`` under the lock before anything is written; raises to refuse
        (whether replacing is allowed is the caller's decision).

    Returns
    -------
    str
        ``final``.

    Raises
    ------
    StoreLockedError
        Another writer holds ``final``'s lock (nothing changed).
    Exception
        Whatever ``check``, ``write`` or the renames raise; the temporary directory is removed
        and a previous directory at ``final`` is left in place, unchanged.
    """
    final = os.fspath(final)
    with writer_lock(final):
        clean_leftovers(final)
        if check is not None:
            check(final)
        tmp = temporary_sibling(final)
        try:
            write(tmp)
            put_in_place(tmp, final)
        except BaseException:
            _remove(tmp)
            raise
    return final
