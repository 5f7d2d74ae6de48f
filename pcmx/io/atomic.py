"""Atomic writes: a file or a directory appears complete at its path, or not at all.

Every pcmx output (stores, TIFFs, checkpoint entries, manifests) is written to a hidden
temporary sibling ``.NAME.pcmx-tmp-XXXXXXXX`` in the same directory and renamed into place
with :func:`os.replace` only when complete. A crash or a kill mid-write leaves at most such a
sibling (which :func:`remove_temporaries` clears), never a half-written result and never a
damaged previous one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable

from ..provenance import jsonable

__all__ = ["TEMP_MARKER", "OLD_MARKER", "temporary_sibling", "is_temporary", "remove_temporaries",
           "atomic_file", "atomic_json", "atomic_dir"]

TEMP_MARKER = ".pcmx-tmp-"
"""In the name of a sibling being written (``.NAME.pcmx-tmp-XXXXXXXX``)."""
OLD_MARKER = ".pcmx-old-"
"""In the name of a directory set aside while its replacement is renamed into place."""
_LEGACY_MARKER = ".tmp-"  # checkpoint entries of pcmx before this module (``.NAME.tmp-XXXX``)


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


def is_temporary(name: str) -> bool:
    """True for the name of a leftover made by this module (or by pcmx checkpoints before it)."""
    return name.startswith(".") and any(m in name for m in (TEMP_MARKER, OLD_MARKER, _LEGACY_MARKER))


def remove_temporaries(directory: str) -> list[str]:
    """Delete the leftovers of interrupted writes directly in ``directory``.

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


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


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
        _fsync_file(tmp)
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


def atomic_dir(final, write: Callable[[str], object]) -> str:
    """Write one directory (e.g. a Zarr group) atomically: ``write(tmp)``, then rename into place.

    An existing directory at ``final`` is first renamed aside (``.NAME.pcmx-old-XXXXXXXX``),
    put back if the rename of the new one fails, and deleted once the new one is in place.

    Parameters
    ----------
    final : str or path-like
        The directory to create or replace (its parent must exist). The caller decides
        whether replacing is allowed.
    write : callable
        Called with the temporary path, which does not exist yet; must create it.

    Returns
    -------
    str
        ``final``.

    Raises
    ------
    Exception
        Whatever ``write`` or the renames raise; the temporary directory is removed and a
        previous directory at ``final`` is left in place, unchanged.
    """
    final = os.fspath(final)
    tmp = temporary_sibling(final)
    try:
        write(tmp)
        if os.path.lexists(final):
            old = temporary_sibling(final, OLD_MARKER)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            _remove(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
    return final
