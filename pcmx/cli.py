"""The ``pcmx`` command line.

Subcommands live in :mod:`pcmx.commands`, one module each, discovered at start-up. Every fault
of the input (a bad file, option, store or output path) gives one line
``pcmx CMD: error: ...`` on stderr, naming the file or option and the cause, and exit status 2:
pcmx's own errors (:class:`pcmx.errors.PcmxError`), argparse's, file-system errors naming a path
(permission denied, a directory where a file is expected, a missing file, a full disk) and
undecodable chunks of a Zarr store. Anything else is a bug of pcmx: one line with "internal
error" and exit status 1 (``--debug`` shows the traceback). Warnings print as one line
``pcmx CMD: warning: ...``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pkgutil
import sys
import warnings

from . import __version__
from .errors import PcmxError

__all__ = ["main", "build_parser"]

# errno values of the file-system faults a user fixes (the path, its permissions, the disk)
_USER_ERRNO = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT,
               errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP,
               errno.ENOTEMPTY, errno.EFBIG}


_EPILOG = """\
outputs:
  Every command checks all its outputs before any work: the directory of each must
  exist (pcmx creates no parent directories; simulate creates its --output directory
  itself, in an existing one) and be writable, a TIFF output must not be a directory,
  and an existing output is replaced only with --overwrite (a store only by a store).
  The outputs of one command are written all-or-nothing: each to a hidden temporary
  beside it, then all put in place (each atomically); if one fails, none changes.
  A second command writing the same output meanwhile fails at once.

exit status:
  0 done; 2 a fault of the input (a file, option, store or output path: one line
  "pcmx COMMAND: error: ..." naming it and the cause); 1 an internal error of pcmx
  (--debug shows the traceback); 130 interrupted. Warnings are one line
  "pcmx COMMAND: warning: ...".
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line like every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _commands():
    from . import commands

    mods = []
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"pcmx.commands.{info.name}")
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            mods.append(mod)
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pcmx",
        description="Learn low-dimensional models of fluorescence microscopes from bead images.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pcmx {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in _commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _os_error(exc: OSError) -> str | None:
    """One line for a file-system fault the user can fix (naming the path), else None."""
    if not isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError,
                            FileNotFoundError, FileExistsError)) and exc.errno not in _USER_ERRNO:
        return None
    from .io.atomic import is_temporary

    name = exc.filename
    if exc.filename2 is not None and (name is None or is_temporary(os.path.basename(str(name)))):
        name = exc.filename2  # a rename of a temporary into place: the final path is the one
    cause = exc.strerror or str(exc)
    return f"{name}: {cause}" if name is not None else cause


def _chained(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _store_paths(values, depth: int = 3):
    """The zarr ``StorePath`` objects among ``values`` (a frame's locals), looking into tuples
    and lists (the batches of chunks a codec pipeline decodes)."""
    for value in values:
        if type(value).__name__ == "StorePath":
            yield str(value)
        elif depth > 0 and isinstance(value, (tuple, list)):
            yield from _store_paths(value[:64], depth - 1)


def _damaged_chunk(exc: BaseException) -> str | None:
    """One line for an error raised while decoding a Zarr chunk (a damaged store), else None.

    The commands read their input stores first and name the store and variable themselves
    (:func:`pcmx.commands._common.open_input_store`); this catches the other reads (a Zarr
    image, a checkpoint), naming the chunk where the traceback shows it.
    """
    for e in _chained(exc):
        tb, decoding, where = e.__traceback__, False, None
        while tb is not None:
            frame = tb.tb_frame
            filename = frame.f_code.co_filename.replace(os.sep, "/")
            if "numcodecs" in filename or "/zarr/codecs/" in filename:
                decoding = True
            if "/zarr/" in filename:
                for path in _store_paths(frame.f_locals.values()):
                    if where is None or len(path) > len(where):  # the chunk's, not its array's
                        where = path
            tb = tb.tb_next
        if decoding:
            if where is not None and where.startswith("file://"):
                where = where[len("file://"):]
            chunk = f"the chunk {where}" if where else "a chunk"
            return (f"cannot decode {chunk} of a Zarr store: {type(e).__name__}: {e} (the store "
                    "is damaged: a corrupt or truncated chunk)")
    return None


def _one_line_warnings(command: str):
    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        print(f"pcmx {command}: warning: {text}", file=file if file is not None else sys.stderr)

    return show


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error (one line printed), --help or --version
        return exc.code if isinstance(exc.code, int) else 0
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings(args.command)
        try:
            from .options import set_options

            # progress bars where a step takes a while, on a terminal only (--no-progress: none)
            progress = sys.stderr.isatty() and not getattr(args, "no_progress", False)
            with set_options(any_pixel_size=bool(getattr(args, "any_pixel_size", False)),
                             progress=progress):
                return int(args._run(args) or 0)
        except PcmxError as exc:
            if args.debug:
                raise
            message = str(exc)
        except KeyboardInterrupt:
            print(f"pcmx {args.command}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001
            if args.debug:
                raise
            message = _os_error(exc) if isinstance(exc, OSError) else None
            message = message or _damaged_chunk(exc)
            if message is None:
                print(f"pcmx {args.command}: internal error: {type(exc).__name__}: {exc} "
                      "(run with --debug for the traceback)", file=sys.stderr)
                return 1
    print(f"pcmx {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
