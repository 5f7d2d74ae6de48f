"""Zarr v3 stores of pcmx results: validated, lazy on read, atomic on write.

A write goes to a temporary sibling (``.NAME.pcmx-tmp-XXXX``) and is exchanged with the
previous store in one atomic step only when complete (:func:`pcmx.io.atomic.atomic_dir`), under
a lock that makes a second writer fail at once; a reader at the path finds the old or the new
store, complete, whatever is killed when, and the next write removes what killed ones left
(docs/store-format.md, "Writing safely"). An existing store is replaced only with
``overwrite=True``. Other tools read the result with plain ``xarray.open_zarr(path)``;
:func:`describe_store` is the summary ``pcmx info`` prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
import warnings
from urllib.parse import urlparse

import numpy as np
import xarray as xr

from ..errors import SchemaError, StoreError, StoreExistsError
from ..provenance import SCHEMA_VERSION, jsonable, provenance
from ..schema import validate
from ..units import format_length, pixel_size
from .atomic import OLD_MARKER, TEMP_MARKER, atomic_dir, leftovers, recover_missing
from .readers import PcmxWarning

__all__ = ["open_store", "save_store", "is_store", "describe_store"]

_SPATIAL_CHUNK = 1024


def _is_local(path: str) -> bool:
    scheme = urlparse(path).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def is_store(path) -> bool:
    """True if ``path`` is a local directory holding a Zarr group with a ``pcmx_type``."""
    p = os.fspath(path)
    meta = os.path.join(p, "zarr.json")
    if not os.path.isfile(meta):
        return False
    try:
        with open(meta) as f:
            return "pcmx_type" in json.load(f).get("attributes", {})
    except (OSError, ValueError):
        return False


def _with_provenance(ds: xr.Dataset) -> xr.Dataset:
    missing = {k: v for k, v in provenance().items() if k not in ds.attrs}
    if not missing:
        return ds
    ds = ds.copy(deep=False)
    ds.attrs = {**missing, **ds.attrs}
    ds.attrs.setdefault("pcmx_schema_version", SCHEMA_VERSION)
    return ds


def _encoding(ds: xr.Dataset) -> dict:
    """Chunk big in-memory variables along y/x; keep dask chunks as they are."""
    enc = {}
    for name, var in ds.variables.items():
        if var.chunks is not None or var.ndim < 2:
            continue
        chunks = []
        for dim, size in zip(var.dims, var.shape, strict=True):
            if dim in ("y", "x"):
                chunks.append(min(size, _SPATIAL_CHUNK))
            elif dim == "z":
                chunks.append(min(size, 16))
            elif dim in ("ky", "kx", "kz", "component", "mode", "bead", "generator"):
                chunks.append(size)
            else:
                chunks.append(1 if size * np.prod(var.shape) > 2**26 else size)
        enc[name] = {"chunks": tuple(int(max(c, 1)) for c in chunks)}
    return enc


def _portable_strings(ds: xr.Dataset) -> xr.Dataset:
    """Fixed-width unicode arrays have no stable Zarr v3 spec: store them as variable-length."""
    fixed = [k for k, v in ds.variables.items() if v.dtype.kind == "U"]
    if not fixed:
        return ds
    return ds.assign_coords({k: ds[k].astype(object) for k in fixed if k in ds.coords}).assign(
        {k: ds[k].astype(object) for k in fixed if k in ds.data_vars})


def save_store(ds: xr.Dataset, path, *, overwrite: bool = False, group: str | None = None) -> str:
    """Validate ``ds`` and write it as a Zarr v3 store at ``path``, atomically.

    Parameters
    ----------
    ds : Dataset
        A pcmx result (``attrs["pcmx_type"]``). Missing provenance attrs are filled in.
        pint-quantified Datasets are dequantified first.
    path : str or path-like
        Local path or an fsspec URL xarray accepts. Local writes are atomic and locked; on
        fsspec targets the store is written under a temporary prefix and moved, which is as
        close as the store allows (no lock; docs/store-format.md says what is guaranteed where).
    overwrite : bool
        Replace an existing pcmx store at ``path``. Never replaces something that is not a
        pcmx store.
    group : str, optional
        Write into a subgroup of an existing Zarr (e.g. ``"pcmx/operator"`` of an OME-Zarr);
        not atomic at the group level.

    Returns
    -------
    str
        The path written.

    Raises
    ------
    StoreExistsError
        ``path`` exists and ``overwrite`` is False.
    SchemaError
        ``ds`` is not a valid pcmx Dataset (nothing is written).
    StoreLockedError
        Another process is writing ``path`` (the message names it); nothing is written.
    StoreError
        The write failed (the old store, if any, is left intact).
    """
    path = os.fspath(path)
    try:
        ds = ds.pint.dequantify()
    except (AttributeError, ValueError):
        pass
    ds = _with_provenance(ds)
    validate(ds, source=path, require_provenance=True, check_values="in-memory")
    ds = _portable_strings(ds)
    if group is not None:
        ds.to_zarr(path, group=group, mode="w" if overwrite else "w-", zarr_format=3,
                   consolidated=False, encoding=_encoding(ds))
        return path
    if not _is_local(path):
        return _save_remote(ds, path, overwrite)

    path = _local(path).rstrip(os.sep)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)

    def check(final: str) -> None:  # under the writer lock, after leftovers are cleaned
        if os.path.lexists(final):
            if not overwrite:
                raise StoreExistsError(f"{path}: already exists; use overwrite=True (--overwrite) to replace it")
            if not is_store(final):
                raise StoreExistsError(f"{path}: exists and is not a pcmx store; refusing to replace it")

    def write(tmp: str) -> None:
        try:
            ds.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False, encoding=_encoding(ds))
        except (OSError, ValueError, TypeError) as exc:
            raise StoreError(f"{path}: write failed ({type(exc).__name__}: {exc}); nothing changed") from exc

    try:
        atomic_dir(path, write, check=check)
    except StoreError:
        raise
    except OSError as exc:  # the lock file, the swap: the previous store is in place
        raise StoreError(f"{path}: write failed ({type(exc).__name__}: {exc}); nothing changed") from exc
    return path


def _save_remote(ds: xr.Dataset, url: str, overwrite: bool) -> str:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root) and not overwrite:
        raise StoreExistsError(f"{url}: already exists; use overwrite=True (--overwrite) to replace it")
    tmp_root = f"{root.rstrip('/')}{TEMP_MARKER}{uuid.uuid4().hex[:8]}"
    tmp_url = url.replace(root.rstrip("/"), tmp_root, 1)
    try:
        ds.to_zarr(tmp_url, mode="w-", zarr_format=3, consolidated=False, encoding=_encoding(ds))
        if fs.exists(root):
            fs.rm(root, recursive=True)
        fs.mv(tmp_root, root, recursive=True)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp_root, recursive=True)
        raise
    return url


def _restore(path: str) -> None:
    """Put back a store that a replacement killed between its two renames left set aside."""
    try:
        restored = recover_missing(_local(path))
    except OSError as exc:
        aside = ", ".join(os.path.basename(p) for p in leftovers(_local(path)) if OLD_MARKER in p)
        raise StoreError(f"{path}: no such store; a replacement was interrupted and the previous "
                         f"store is at {aside}, which cannot be renamed back ({type(exc).__name__}: "
                         f"{exc})") from None
    if restored:
        warnings.warn(f"{path}: restored the previous store from {os.path.basename(restored)} "
                      "(its replacement was interrupted)", PcmxWarning, stacklevel=3)


def open_store(path, *, kind: str | None = None, group: str | None = None,
               chunks="auto-stored", validate_store: bool = True) -> xr.Dataset:
    """Open a pcmx store lazily (dask-backed) and validate it.

    A store that a replacement killed between two renames left only set aside (on a
    filesystem that cannot exchange two directories) is renamed back first, with a
    :class:`~pcmx.io.readers.PcmxWarning`.

    Parameters
    ----------
    path : str or path-like
        A store written by :func:`save_store` (or any Zarr group following the schema).
    kind : str, optional
        Require this ``pcmx_type`` (``"operator"``, ``"family"``...).
    group : str, optional
        A subgroup (e.g. ``"pcmx/operator"`` inside an OME-Zarr).
    chunks : optional
        Passed to :func:`xarray.open_zarr`; by default the stored chunks.

    Raises
    ------
    StoreError
        ``path`` does not exist or is not a Zarr store.
    SchemaError
        The store is not a valid pcmx store of the expected kind.
    """
    path = os.fspath(path)
    if _is_local(path) and not os.path.exists(_local(path)):
        _restore(path)
    if _is_local(path) and not os.path.exists(_local(path)):
        raise StoreError(f"{path}: no such store")
    if _is_local(path) and os.path.isfile(_local(path)):
        raise StoreError(f"{path}: not a Zarr store (it is a file)")
    try:
        ds = xr.open_zarr(path, group=group, consolidated=False,
                          chunks={} if chunks == "auto-stored" else chunks)
    except (FileNotFoundError, KeyError, ValueError, OSError) as exc:
        raise StoreError(f"{path}: not a Zarr store ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # zarr raises its own types (GroupNotFoundError, ...)  # noqa: BLE001
        raise StoreError(f"{path}: not a Zarr store ({type(exc).__name__}: {exc})") from None
    if validate_store:
        try:
            validate(ds, kind=kind, source=path, require_provenance=True, check_values=False)
        except SchemaError:
            ds.close()
            raise
    return ds


def describe_store(ds: xr.Dataset, *, status: str = "valid") -> str:
    """A short human-readable summary of a pcmx Dataset (what ``pcmx info`` prints).

    Parameters
    ----------
    ds : Dataset
        A pcmx result, in memory or opened with :func:`open_store`.
    status : str
        The validation status to report (``"valid"``, or ``"INVALID: ..."``).

    Returns
    -------
    str
        Lines: kind, validation, dims, pixel sizes, variables with dims and dtypes, version and
        creation time, inputs with the start of their SHA-256, parameters as JSON.
    """
    lines = [f"kind: {ds.attrs.get('pcmx_type', '?')}", f"validation: {status}"]
    lines.append("dims: " + ", ".join(f"{d}={n}" for d, n in ds.sizes.items()))
    for d in ("z", "y", "x"):
        if d in ds.coords:
            lines.append(f"pixel size {d}: {format_length(pixel_size(ds, d))}")
    lines.append("variables:")
    for name, v in ds.data_vars.items():
        lines.append(f"  {name} {tuple(v.dims)} {v.dtype}")
    for key in ("pcmx_version", "pcmx_schema_version", "pcmx_created"):
        if key in ds.attrs:
            lines.append(f"{key[5:]}: {ds.attrs[key]}")
    for rec in ds.attrs.get("pcmx_inputs", []) or []:
        sha = rec.get("sha256") or "-"
        lines.append(f"input: {rec.get('name')} sha256={sha[:16]}")
    params = ds.attrs.get("pcmx_parameters")
    if isinstance(params, dict) and isinstance(params.get("cross_validation"), dict):
        cv = params["cross_validation"]
        lines.append(f"cross-validation ({cv.get('folds')} folds, {cv.get('n_beads')} held-out beads): "
                     f"median error {cv.get('median_error', float('nan')):.3f}, space-invariant "
                     f"reference {cv.get('median_error_invariant', float('nan')):.3f} "
                     f"({cv.get('improvement', float('nan')):.2f}x)")
        sel = params.get("model_selection")
        if isinstance(sel, dict):
            lines.append(f"stored model: {sel.get('chosen')} (select={sel.get('select')!r})")
    if "detection_status" in ds:
        meanings = str(ds["detection_status"].attrs.get("flag_meanings", "")).split()
        codes = np.asarray(ds["detection_status"].values)
        counts = {m: int((codes == k).sum()) for k, m in enumerate(meanings) if (codes == k).any()}
        lines.append("detections: " + ", ".join(f"{m} {n}" for m, n in counts.items()))
    if params:
        lines.append("parameters: " + json.dumps(jsonable(params), sort_keys=True))
    return "\n".join(lines)
