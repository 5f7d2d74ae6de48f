"""What the commands share: arguments and output targets checked before any work, outputs
written all-or-nothing, input stores read in full, library messages worded for the command line.

The rules every command follows (docs/cli.md, "Errors and outputs"):

* **Outputs are checked before any work starts**: an empty path, a missing parent directory
  (no command creates the parent of an output: create it first), a parent that is a file, a
  directory that is not writable, a directory given as a TIFF file, an existing output without
  ``--overwrite``, an existing non-store given as a store to replace, two outputs at one path:
  each is refused at once with exit status 2 and one line naming the option and the cause.
* **Outputs are all-or-nothing per command** (:class:`Outputs`): every output is written to a
  hidden temporary sibling first; only when all are complete are they put in place, each by
  one atomic exchange with the previous one (or a rename where there is none); if one cannot
  be put in place, those already in place are swapped back. The writer lock of each output
  (:func:`pcmx.io.atomic.writer_lock`) is held from the checks to the end, so a second command
  writing the same output fails at once, before its work.
* **Input stores are read in full** (:func:`open_input_store`): a damaged chunk is reported as
  the store and the variable that cannot be read, before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil

from ..errors import InputError, PcmxError, StoreError, StoreExistsError

__all__ = ["int_at_least", "real", "check_output", "check_distinct", "Outputs", "open_input_store",
           "worded", "store_target", "add_channel_arguments", "add_scheduler_arguments",
           "check_scheduler", "scheduler_client"]


# -- argument types (argparse reports their errors as "argument --OPTION: MESSAGE") -------------
def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    parse.__name__ = "int"
    return parse


def real(minimum: float | None = None, *, strict: bool = False):
    """An argparse type: a finite number, ``>= minimum`` (``> minimum`` if ``strict``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
        if minimum is not None and (value <= minimum if strict else value < minimum):
            raise argparse.ArgumentTypeError(
                f"{value:g} must be {'greater than' if strict else 'at least'} {minimum:g}")
        return value

    parse.__name__ = "float"
    return parse


# -- output targets ---------------------------------------------------------------------------
def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    path = path[len("file://"):] if path.startswith("file://") else path
    return path.rstrip(os.sep) or path


def _check_parent(path: str, option: str) -> None:
    parent = os.path.dirname(os.path.abspath(_local(path)))
    if not os.path.isdir(parent):
        up = parent
        while not os.path.exists(up) and os.path.dirname(up) != up:
            up = os.path.dirname(up)
        if os.path.exists(up) and not os.path.isdir(up):
            raise InputError(f"{option} {path}: {up} is a file, not a directory")
        raise InputError(f"{option} {path}: directory {parent} does not exist (pcmx creates no "
                         "parent directories: create it first)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: directory {parent} is not writable (permission denied)")


def check_output(path: str, option: str, *, kind: str, overwrite: bool) -> str:
    """Check an output target before any work; raise :class:`InputError` if it cannot be written.

    Parameters
    ----------
    path : str
        The target as given.
    option : str
        The option that gave it (``"--output"``), named in the message.
    kind : {"tiff", "store", "directory"}
        A TIFF file, a Zarr store (a local path or an fsspec URL, whose checks are left to
        the write) or a directory (created if missing; its files are checked separately).
    overwrite : bool
        Whether an existing target may be replaced (``--overwrite``).

    Returns
    -------
    str
        ``path``.

    Raises
    ------
    InputError
        An empty path, a missing or unwritable parent directory, a parent that is a file, a
        TIFF that is a directory or lacks the .tif suffix, a directory that is a file.
    StoreExistsError
        The target exists and ``overwrite`` is False, or a store target exists and is not a
        pcmx store.
    """
    from ..io.store import is_store

    what = {"tiff": "TIFF file", "store": "store", "directory": "directory"}[kind]
    if not path or not path.strip():
        raise InputError(f"{option} {path!r}: an empty path; give the {what} to write")
    if kind == "store" and _is_url(path):
        return path
    if kind == "tiff" and not path.lower().endswith((".tif", ".tiff")):
        raise InputError(f"{option} {path}: must be a .tif or .tiff file")
    _check_parent(path, option)
    target = _local(path)
    if kind == "directory":
        if os.path.exists(target) and not os.path.isdir(target):
            raise InputError(f"{option} {path}: exists and is not a directory")
        if os.path.isdir(target) and not os.access(target, os.W_OK | os.X_OK):
            raise InputError(f"{option} {path}: directory is not writable (permission denied)")
        return path
    if os.path.lexists(target):
        if kind == "tiff" and os.path.isdir(target):
            raise InputError(f"{option} {path}: is a directory; give the name of a TIFF file to write")
        if not overwrite:
            raise StoreExistsError(f"{option} {path}: already exists; use --overwrite to replace it")
        if kind == "store" and not is_store(target):
            raise StoreExistsError(f"{option} {path}: exists and is not a pcmx store; refusing to "
                                   "replace it")
    return path


def store_target(path: str, group: str | None, option: str = "--output") -> str:
    """The directory a store output is written to: ``path``, or its ``group`` (``--group``).

    With a group, ``path`` must be an existing local Zarr v3 hierarchy (e.g. an OME-Zarr 0.5
    image); the groups above ``group`` are created where missing, and the group itself is
    then written all-or-nothing like a store (:meth:`Outputs.store` with ``root``).

    Raises
    ------
    InputError
        ``path`` is a URL or does not exist, or cannot hold the group (the message says why).
    """
    if group is None:
        return path
    from ..io.store import group_dir

    if _is_url(path):
        raise InputError(f"{option} {path}: --group is for local Zarr hierarchies")
    if not os.path.isdir(_local(path)):
        raise InputError(f"{option} {path}: no such Zarr; --group writes inside an existing Zarr "
                         "(e.g. an OME-Zarr image)")
    try:
        return group_dir(_local(path), group, create=True)
    except StoreError as exc:
        raise InputError(f"{option} {path} --group {group}: {exc}") from None


def add_channel_arguments(parser) -> None:
    """``--channel`` and ``--time``: one channel and time point of a multi-axis image."""
    parser.add_argument("--channel", default=None,
                        help="channel of a multi-channel image (OME-Zarr, ImageJ hyperstack): an "
                             "index or a name (default: the first, with a warning)")
    parser.add_argument("--time", type=int_at_least(0), default=None,
                        help="time point of a time series (default: the first, with a warning)")


def add_scheduler_arguments(parser, *, memory_limit: bool = False) -> None:
    """``--scheduler ADDRESS|local:N`` (and ``--memory-limit``): where the Dask work runs."""
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="run on a dask.distributed cluster: a scheduler address "
                             "(tcp://host:8786), or local:N to start a local cluster of N worker "
                             "processes; outputs must be on a filesystem the workers see "
                             "(default: threads of this process)")
    if memory_limit:
        parser.add_argument("--memory-limit", default=None, metavar="SIZE",
                            help="memory limit of each worker of --scheduler local:N, e.g. 2GB "
                                 "(default: the machine's memory shared among the workers); it "
                                 "also sizes the automatic tiles")


def check_scheduler(spec: str | None, memory_limit: str | None = None) -> None:
    """Check ``--scheduler`` and ``--memory-limit`` before any work (:func:`scheduler_client`).

    Raises
    ------
    InputError
        ``local:N`` with N not a positive integer, an address that is not ``host:port`` or a
        URL (``tcp://host:8786``), a ``--memory-limit`` that is not a size, or one given
        without ``--scheduler local:N``.
    """
    if spec is not None:
        if not spec.strip():
            raise InputError("--scheduler '': an empty address; give tcp://HOST:PORT or local:N")
        if spec.startswith("local:"):
            n = spec.split(":", 1)[1]
            if not n.isdigit() or int(n) < 1:
                raise InputError(f"--scheduler {spec}: expected local:N with N >= 1 workers")
        elif not re.fullmatch(r"([a-z][a-z0-9+.-]*://)?[^\s:/]+(:\d+)?/?", spec):
            raise InputError(f"--scheduler {spec}: not a scheduler address; give tcp://HOST:PORT "
                             "or local:N")
    if memory_limit is not None:
        from dask.utils import parse_bytes

        try:
            ok = parse_bytes(memory_limit) > 0
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise InputError(f"--memory-limit {memory_limit}: not a memory size (e.g. 2GB, 512MiB)")
        if spec is None or not spec.startswith("local:"):
            raise InputError("--memory-limit is the limit of the workers of --scheduler local:N; "
                             "a cluster's workers have their own")


def scheduler_client(spec: str, memory_limit: str | None = None):
    """A ``dask.distributed`` Client for ``--scheduler``: ``(client, cluster)``.

    ``local:N`` starts a :class:`distributed.LocalCluster` of N single-threaded worker
    processes (each with ``memory_limit``; cluster is then to be closed after the client);
    another value is the address of a running scheduler (cluster None).

    Raises
    ------
    InputError
        A malformed spec (:func:`check_scheduler`) or a scheduler that cannot be reached.
    """
    from distributed import Client, LocalCluster

    check_scheduler(spec, memory_limit)
    if spec.startswith("local:"):
        n = int(spec.split(":", 1)[1])
        kw = {"memory_limit": memory_limit} if memory_limit is not None else {}
        # the scheduler's HTTP server on a free port (":8787", its default, may be taken)
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, dashboard_address=":0", **kw)
        return Client(cluster), cluster
    try:
        return Client(spec, timeout="20s"), None
    except (OSError, TimeoutError, ValueError) as exc:
        raise InputError(f"--scheduler {spec}: cannot connect ({type(exc).__name__}: {exc})") from None


def check_distinct(targets) -> None:
    """Refuse two outputs at one path (``[("--output", path), ("--store", path), ...]``)."""
    seen: dict[str, str] = {}
    for option, path in targets:
        if _is_url(path):
            continue
        key = os.path.realpath(_local(path))
        if key in seen:
            raise InputError(f"{option} {path}: the same path as {seen[key]}; give each output "
                             "its own path")
        seen[key] = f"{option} {path}"


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


class Outputs:
    """The outputs of one command, written all-or-nothing (a context manager).

    On entry the writer lock of every path in ``lock`` is taken (a concurrent writer of one
    of them fails at once, :class:`pcmx.errors.StoreLockedError`) and the leftovers of its
    killed writes are cleaned. Inside the block, :meth:`tiff`, :meth:`store` and
    :meth:`directory` stage the outputs: each is written completely to a hidden temporary
    sibling of its final path. When the block ends without an exception every staged output
    is put in place (:meth:`commit`); with an exception, the staged temporaries and the
    directories created are removed and nothing at a final path has changed.

    Parameters
    ----------
    lock : list of str
        The final paths to lock (local paths whose parent exists; URLs are skipped).
    """

    def __init__(self, lock=()) -> None:
        self._lock = [p for p in lock if not _is_url(p)]
        self._stack = contextlib.ExitStack()
        self._staged: list[tuple[str, str]] = []  # (final, temporary)
        self._created: list[str] = []  # directories made by directory()
        self._roots: list[str] = []  # Zarr hierarchies whose metadata to consolidate at the end

    def __enter__(self) -> Outputs:
        from ..io.atomic import clean_leftovers, writer_lock

        try:
            for path in self._lock:
                self._stack.enter_context(writer_lock(_local(path)))
                clean_leftovers(_local(path))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
            else:
                self.discard()
        finally:
            self._stack.close()

    # -- staging --------------------------------------------------------------------------
    def _temporary(self, final: str) -> str:
        from ..io.atomic import temporary_sibling

        tmp = temporary_sibling(final)
        self._staged.append((os.path.abspath(final), tmp))
        return tmp

    def directory(self, path: str) -> str:
        """Create directory ``path`` if missing (removed again if the command fails)."""
        if not os.path.isdir(path):
            os.mkdir(path)
            self._created.append(os.path.abspath(path))
        return path

    def tiff(self, final: str, data, pixel_size_um=None, *, z_step_um=None) -> str:
        """Stage a TIFF (:func:`pcmx.io.tiff.write_tiff`) for ``final``."""
        from ..io.tiff import write_tiff

        write_tiff(self._temporary(final), data, pixel_size_um, z_step_um=z_step_um)
        return final

    def store(self, final: str, ds, *, overwrite: bool = False, root: str | None = None) -> str:
        """Stage a store (:func:`pcmx.io.store.save_store`: validated, complete) for ``final``.

        A URL (fsspec) is written at once by :func:`save_store` with ``overwrite``: object
        stores have no atomic rename, so it is not part of the all-or-nothing set. ``final``
        may be a group inside the Zarr hierarchy ``root`` (:func:`store_target`): the root's
        consolidated metadata is rewritten once everything is in place.
        """
        from ..io.store import save_store

        if _is_url(final):
            return save_store(ds, final, overwrite=overwrite)
        save_store(ds, self._temporary(_local(final)))
        if root is not None:
            self._roots.append(root)
        return final

    # -- the end ----------------------------------------------------------------------------
    def discard(self) -> None:
        """Remove what was staged and the directories created; the final paths are untouched."""
        for _, tmp in self._staged:
            _remove(tmp)
        self._staged.clear()
        for path in reversed(self._created):
            with contextlib.suppress(OSError):
                os.rmdir(path)
        self._created.clear()

    def commit(self) -> None:
        """Put every staged output in place, or none.

        Each output replaces the previous one by one atomic exchange
        (:func:`pcmx.io.atomic.exchange`; a reader finds the old or the new one), or, where
        the filesystem cannot exchange, by setting the previous one aside and renaming the new
        one in. If an output cannot be put in place, those already in place get their previous
        version back (or are removed if there was none), and the error is raised.
        """
        from ..io.atomic import OLD_MARKER, exchange, temporary_sibling

        done: list[tuple[str, str | None]] = []  # (final, where the previous version is)
        try:
            while self._staged:
                final, tmp = self._staged[0]
                previous = None
                if os.path.lexists(final):
                    if exchange(tmp, final):
                        previous = tmp
                    else:
                        previous = temporary_sibling(final, OLD_MARKER)
                        os.replace(final, previous)
                        try:
                            os.replace(tmp, final)
                        except BaseException:
                            os.replace(previous, final)
                            raise
                else:
                    os.rename(tmp, final)
                self._staged.pop(0)
                done.append((final, previous))
        except BaseException:
            for final, previous in reversed(done):
                with contextlib.suppress(OSError):
                    if previous is None:
                        _remove(final)
                    elif exchange(previous, final):  # the previous version back in one step
                        _remove(previous)
                    else:
                        trash = temporary_sibling(final)
                        os.replace(final, trash)
                        os.replace(previous, final)
                        _remove(trash)
            self.discard()
            raise
        for _, previous in done:
            if previous is not None:
                _remove(previous)
        self._created.clear()
        if self._roots:
            from ..io.store import consolidate

            for root in self._roots:
                consolidate(_local(root))
            self._roots.clear()


# -- inputs -----------------------------------------------------------------------------------
def open_input_store(path: str, kind: str, group: str | None = None):
    """Open a pcmx store of ``kind`` and read all its variables, naming what cannot be read.

    Returns
    -------
    Dataset
        In memory (the store is closed).

    Raises
    ------
    StoreError, SchemaError
        Not a store, the wrong kind, or a variable that cannot be read or decoded (a damaged
        chunk: the message names the store and the variable).
    """
    from ..io.store import open_store

    try:
        ds = open_store(path, kind=kind, group=group)
    except PcmxError:
        raise
    except Exception as exc:  # noqa: BLE001  (a codec's error on a small variable read to validate)
        raise StoreError(f"{path}: cannot be read, the store is damaged ({type(exc).__name__}: "
                         f"{exc})") from exc
    try:
        for name, var in ds.variables.items():
            try:
                var.load()
            except Exception as exc:  # noqa: BLE001  (zarr/numcodecs raise their own types)
                raise StoreError(
                    f"{path}: variable {name!r} cannot be read, the store is damaged (a corrupt "
                    f"or truncated chunk: {type(exc).__name__}: {exc})") from exc
    finally:
        ds.close()
    return ds


# -- messages ---------------------------------------------------------------------------------
def _reword(text: str, image: str | None, options: dict[str, str], replace: dict[str, str]) -> str:
    if image is not None:
        for prefix in ("image: ", "array: "):
            if text.startswith(prefix):
                text = f"{image}: {text[len(prefix):]}"
    for name, option in options.items():
        # at the start, or after the leading "FILE: " only (not inside a list of differences)
        text = re.sub(rf"^([^\s:]+: )?{re.escape(name)}(=|: )",
                      lambda m, o=option: f"{m.group(1) or ''}{o} ", text)
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


@contextlib.contextmanager
def worded(*, image: str | None = None, options: dict[str, str] | None = None,
           replace: dict[str, str] | None = None):
    """Reword the library's :class:`PcmxError` messages for the command line.

    ``image: ...`` becomes ``FILE: ...``; a leading ``name=`` or ``name:`` of a keyword argument
    (at the start, or after a leading ``FILE: ``) becomes its option (``options={"n_sources": "--sources"}``); ``replace`` substitutes
    fragments (advice naming something the command does not have).
    """
    try:
        yield
    except PcmxError as exc:
        text = _reword(str(exc), image, options or {}, replace or {})
        if text == str(exc):
            raise
        try:
            new = type(exc)(text)
        except TypeError:  # pragma: no cover - an error type with another constructor
            new = InputError(text)
        raise new from exc
