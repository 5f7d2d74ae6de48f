"""Provenance attributes carried by every pcmx result (schema version, inputs, parameters)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["SCHEMA_VERSION", "provenance", "sha256_file", "jsonable"]

#: Version of the store layout (``schemas/*.json``). Minor bumps stay readable by older pcmx.
SCHEMA_VERSION = "1.0"


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file (or, for a directory such as a Zarr store, of its sorted files)."""
    h = hashlib.sha256()
    p = os.fspath(path)
    if os.path.isdir(p):
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                h.update(os.path.relpath(full, p).encode())
                with open(full, "rb") as f:
                    for block in iter(lambda: f.read(chunk), b""):
                        h.update(block)
        return h.hexdigest()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def jsonable(value):
    """Turn numpy scalars/arrays, tuples and paths into JSON-compatible values (recursively)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):  # via .item(), so numpy NaN/inf become strings like float's
        item = value.item()
        return repr(value) if isinstance(item, np.generic) else jsonable(item)  # longdouble stays numpy
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def provenance(parameters: Mapping | None = None, inputs: Iterable = ()) -> dict:
    """Attributes describing how a result was made.

    Parameters
    ----------
    parameters : mapping
        The parameters used (JSON-serialisable after :func:`jsonable`).
    inputs : iterable of paths or (name, sha256) pairs
        Input files; paths that exist are hashed, other names are recorded without a hash.

    Returns
    -------
    dict
        ``pcmx_schema_version``, ``pcmx_version``, ``pcmx_created`` (ISO 8601, UTC),
        ``pcmx_parameters`` (dict) and ``pcmx_inputs`` (list of ``{"name", "sha256"}``).
    """
    from . import __version__

    records = []
    for item in inputs:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            records.append({"name": str(item[0]), "sha256": item[1]})
            continue
        name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else str(item)
        digest = sha256_file(name) if os.path.exists(name) else None
        records.append({"name": os.path.basename(os.path.normpath(name)), "sha256": digest})
    return {
        "pcmx_schema_version": SCHEMA_VERSION,
        "pcmx_version": __version__,
        "pcmx_created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "pcmx_parameters": jsonable(dict(parameters or {})),
        "pcmx_inputs": records,
    }


def dumps(attrs: Mapping) -> str:
    """Pretty JSON of provenance attrs (for ``pcmx info``)."""
    return json.dumps(jsonable(attrs), indent=2, sort_keys=True)
