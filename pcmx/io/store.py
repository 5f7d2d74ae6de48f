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

__all__ = ["open_store", "save_store", "is_store", "describe_store", "consolidate", "group_dir",
           "find_stores"]

_SPATIAL_CHUNK = 1024
# zarr 3 warns that consolidated metadata is not (yet) in the v3 spec; xarray and zarr read it
CONSOLIDATED_WARNING = ".*Consolidated metadata is currently not part in the Zarr format 3"


def _is_local(path: str) -> bool:
    scheme = urlparse(path).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def local_path(path: str) -> str:
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


def consolidate(path, group: str | None = None) -> None:
    """Write the consolidated metadata of the Zarr hierarchy at ``path`` (or of its ``group``).

    Plain ``xarray.open_zarr(path)`` then opens the store without its warning about
    consolidated metadata and without listing every array. pcmx itself reads the arrays'
    own metadata (``consolidated=False``), so stale consolidated metadata never misleads it.
    """
    import zarr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=CONSOLIDATED_WARNING)
        zarr.consolidate_metadata(path, path=group or "", zarr_format=3)


def _to_zarr(ds: xr.Dataset, target: str) -> None:
    """Write ``ds`` as a new Zarr v3 store at ``target``, with consolidated metadata."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=CONSOLIDATED_WARNING)
        ds.to_zarr(target, mode="w-", zarr_format=3, consolidated=True, encoding=_encoding(ds))


def group_dir(path, group: str, *, create: bool = False) -> str:
    """The local directory of ``group`` inside the Zarr v3 hierarchy at ``path``.

    Parameters
    ----------
    path : str or path-like
        A local Zarr v3 hierarchy (e.g. an OME-Zarr 0.5 image).
    group : str
        ``"pcmx/operator"``: a path of group names separated by ``/``.
    create : bool
        Create ``path`` (as an empty group) and the groups above ``group`` where missing.

    Raises
    ------
    StoreError
        ``group`` is not a relative path of names, ``path`` is missing (and ``create`` is
        False), not a Zarr group, or a Zarr v2 hierarchy (pcmx writes Zarr v3 only; write
        the store beside it), or a node above ``group`` is an array.
    """
    path = local_path(os.fspath(path)).rstrip(os.sep)
    parts = [p for p in str(group).strip("/").split("/") if p]
    if not parts or any(p in (".", "..") or p.startswith(".") or os.sep in p for p in parts):
        raise StoreError(f"group {group!r}: give a path of group names, e.g. 'pcmx/operator'")
    levels = [path] + [os.path.join(path, *parts[:i]) for i in range(1, len(parts))]
    for level in levels:
        meta = os.path.join(level, "zarr.json")
        if os.path.isfile(meta):
            try:
                with open(meta) as f:
                    node = json.load(f).get("node_type")
            except (OSError, ValueError) as exc:
                raise StoreError(f"{level}: unreadable zarr.json ({exc})") from None
            if node != "group":
                raise StoreError(f"{level}: a Zarr {node}, not a group; cannot hold group {group!r}")
            continue
        if os.path.isfile(os.path.join(level, ".zgroup")) or os.path.isfile(os.path.join(level, ".zarray")):
            raise StoreError(f"{level}: a Zarr v2 hierarchy (e.g. OME-Zarr 0.4); pcmx writes Zarr v3 "
                             "groups only: write the store beside the image instead")
        if os.path.exists(level) and (not os.path.isdir(level) or os.listdir(level)):
            raise StoreError(f"{path}: not a Zarr store (no zarr.json at {level})")
        if not create:
            raise StoreError(f"{path}: no Zarr group {os.path.relpath(level, path)!r}"
                             if level != path else f"{path}: no such store")
        os.makedirs(level, exist_ok=True)
        with open(meta, "w") as f:
            json.dump({"zarr_format": 3, "node_type": "group", "attributes": {}}, f)
    return os.path.join(path, *parts)


def find_stores(path) -> list[tuple[str, str]]:
    """The pcmx stores inside the Zarr hierarchy at ``path``: ``[(group, pcmx_type), ...]``.

    Walks the groups (not their arrays) through each group's own metadata; a group with a
    ``pcmx_type`` attribute is a store (its subgroups are not searched). ``""`` is the root.
    """
    import zarr

    found = []

    def walk(g, name):
        kind = g.attrs.get("pcmx_type")
        if kind is not None:
            found.append((name, str(kind)))
            return
        for key, child in sorted(g.groups()):
            if not key.startswith("."):
                walk(child, f"{name}/{key}" if name else key)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # v2/v3 mixtures, unknown nodes: listed as far as readable
        root = zarr.open_group(os.fspath(path), mode="r", use_consolidated=False)
        walk(root, "")
    return found


def with_provenance(ds: xr.Dataset) -> xr.Dataset:
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


def portable_strings(ds: xr.Dataset) -> xr.Dataset:
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
        Write into this group of a local Zarr v3 hierarchy (e.g. ``"pcmx/operator"`` inside an
        OME-Zarr 0.5 image), created with the groups above it where missing. The group is
        written atomically like a store; then the consolidated metadata of the whole hierarchy
        is rewritten, so that ``xarray.open_zarr(path, group=group)`` reads it.

    Returns
    -------
    str
        The path written.

    Notes
    -----
    Every store is written with consolidated metadata (inside the temporary, before it is
    put in place), so plain ``xarray.open_zarr(path)`` opens it without a warning.

    Raises
    ------
    StoreExistsError
        ``path`` (or its ``group``) exists and ``overwrite`` is False.
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
    ds = with_provenance(ds)
    validate(ds, source=path, require_provenance=True, check_values="in-memory")
    ds = portable_strings(ds)
    root = None
    if group is not None:
        if not _is_local(path):
            raise StoreError(f"{path}: group= is for local Zarr hierarchies; give the group's URL "
                             "as the path instead")
        root, path = local_path(path).rstrip(os.sep), group_dir(path, group, create=True)
    elif not _is_local(path):
        return _save_remote(ds, path, overwrite)

    path = local_path(path).rstrip(os.sep)
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
            _to_zarr(ds, tmp)
        except (OSError, ValueError, TypeError) as exc:
            raise StoreError(f"{path}: write failed ({type(exc).__name__}: {exc}); nothing changed") from exc

    try:
        atomic_dir(path, write, check=check)
    except StoreError:
        raise
    except OSError as exc:  # the lock file, the swap: the previous store is in place
        raise StoreError(f"{path}: write failed ({type(exc).__name__}: {exc}); nothing changed") from exc
    if root is not None:
        consolidate(root)  # plain xr.open_zarr(root, group=...) reads the root's metadata
        return root
    return path


def _save_remote(ds: xr.Dataset, url: str, overwrite: bool) -> str:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root) and not overwrite:
        raise StoreExistsError(f"{url}: already exists; use overwrite=True (--overwrite) to replace it")
    tmp_root = f"{root.rstrip('/')}{TEMP_MARKER}{uuid.uuid4().hex[:8]}"
    tmp_url = url.replace(root.rstrip("/"), tmp_root, 1)
    try:
        _to_zarr(ds, tmp_url)
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
        restored = recover_missing(local_path(path))
    except OSError as exc:
        aside = ", ".join(os.path.basename(p) for p in leftovers(local_path(path)) if OLD_MARKER in p)
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
    if _is_local(path) and not os.path.exists(local_path(path)):
        _restore(path)
    if _is_local(path) and not os.path.exists(local_path(path)):
        raise StoreError(f"{path}: no such store")
    if _is_local(path) and os.path.isfile(local_path(path)):
        raise StoreError(f"{path}: not a Zarr store (it is a file)")
    if _is_local(path):
        _check_hierarchy(local_path(path), group)
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


def _stores_inside(path: str) -> str:
    try:
        found = find_stores(path)
    except Exception:  # noqa: BLE001  (an unreadable hierarchy: nothing to list)
        found = []
    if not found:
        return "no pcmx store inside it"
    listed = ", ".join(f"{g or '(root)'!r} ({kind})" for g, kind in found)
    return f"pcmx stores inside it: {listed}; open one with group= (--group)"


def _stores_inside_any(path: str) -> bool:
    try:
        return bool(find_stores(path))
    except Exception:  # noqa: BLE001
        return False


def _check_hierarchy(path: str, group: str | None) -> None:
    """Name the pcmx groups of a Zarr hierarchy (e.g. an OME-Zarr) opened at the wrong level."""
    meta = os.path.join(path, "zarr.json")
    has_v2 = os.path.isfile(os.path.join(path, ".zgroup"))
    if not (os.path.isfile(meta) or has_v2):
        return
    if group is not None:
        target = os.path.join(path, *[p for p in str(group).split("/") if p])
        if not (os.path.isfile(os.path.join(target, "zarr.json"))
                or os.path.isfile(os.path.join(target, ".zgroup"))):
            raise StoreError(f"{path}: no group {group!r}; {_stores_inside(path)}")
        return
    if is_store(path):
        return
    try:
        with open(meta if not has_v2 else os.path.join(path, ".zattrs")) as f:
            node = json.load(f)
    except (OSError, ValueError):
        node = {"node_type": "group"} if has_v2 else {}
    attrs = (node if has_v2 else node.get("attributes", {})) if isinstance(node, dict) else {}
    if (has_v2 or node.get("node_type") == "group") and ("ome" in attrs or "multiscales" in attrs
                                                         or _stores_inside_any(path)):
        raise StoreError(f"{path}: a Zarr hierarchy (an OME-Zarr image or another), not a pcmx "
                         f"store; {_stores_inside(path)}")


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
    if isinstance(params, dict) and isinstance(params.get("cross_validation"), dict) and \
            "median_error_family" in params["cross_validation"]:  # a family's validation
        cv = params["cross_validation"]
        sub = (f", on {cv.get('validated_images')} of {cv.get('images')} states" if cv.get("subsampled")
               else "")
        lines.append(f"cross-validation ({cv.get('folds')} folds, {cv.get('n_beads')} held-out beads{sub}): "
                     f"median error family {cv['median_error_family']:.3f}, single operators "
                     f"{cv.get('median_error_single', float('nan')):.3f}, space-invariant reference "
                     f"{cv.get('median_error_invariant', float('nan')):.3f} "
                     f"({cv.get('improvement', float('nan')):.2f}x)")
    elif isinstance(params, dict) and isinstance(params.get("cross_validation"), dict) and \
            "skipped" in params["cross_validation"]:
        lines.append(f"cross-validation: not run ({params['cross_validation']['skipped']})")
    elif isinstance(params, dict) and isinstance(params.get("cross_validation"), dict):
        cv = params["cross_validation"]
        lines.append(f"cross-validation ({cv.get('folds')} folds, {cv.get('n_beads')} held-out beads): "
                     f"median error {cv.get('median_error', float('nan')):.3f}, space-invariant "
                     f"reference {cv.get('median_error_invariant', float('nan')):.3f} "
                     f"({cv.get('improvement', float('nan')):.2f}x)")
        sel = params.get("model_selection")
        if isinstance(sel, dict):
            med = sel.get("median_error")
            cands = (" among " + ", ".join(f"{k} {v:.3f}" for k, v in med.items())
                     if isinstance(med, dict) else "")
            lines.append(f"stored model: {sel.get('chosen')} (select={sel.get('select')!r}){cands}")
    if "detection_status" in ds:
        meanings = str(ds["detection_status"].attrs.get("flag_meanings", "")).split()
        codes = np.asarray(ds["detection_status"].values)
        counts = {m: int((codes == k).sum()) for k, m in enumerate(meanings) if (codes == k).any()}
        lines.append("detections: " + ", ".join(f"{m} {n}" for m, n in counts.items()))
    if params:
        lines.append("parameters: " + json.dumps(jsonable(params), sort_keys=True))
    return "\n".join(lines)
