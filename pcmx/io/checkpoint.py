"""Checkpoint directories of long runs (:func:`pcmx.family.learn_family`): resumable, step by step.

Layout::

    CKPT/manifest.json            {"fingerprint": ..., "arguments": {...}, "inputs": [...], ...}
    CKPT/STEP/00000.zarr          one Zarr v3 group per image and step ("beads", "maps")
    CKPT/STEP/00000.bad.json      or the reason an image failed
    CKPT/basis.zarr               ...

Every entry is written atomically (:func:`pcmx.io.atomic.atomic_dir`) and carries the
fingerprint of what made it plus ``complete = True`` written last: :func:`open_entry` returns
only entries of the present run that were written through, so a killed run resumes where it
stopped and a run with other arguments or inputs is refused (:func:`prepare_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import xarray as xr

from ..errors import InputError
from ..provenance import jsonable
from .atomic import atomic_dir, atomic_json, remove_temporaries

__all__ = ["STEPS", "entry_path", "open_entry", "write_entry", "prepare_checkpoint",
           "manifest_differences", "patches_to_arrays", "patches_from_group"]

STEPS = ("beads", "maps")
"""The per-image steps, one subdirectory each."""


def entry_path(ckpt: str, step: str, k: int, suffix: str = ".zarr") -> str:
    """The path of image ``k``'s entry of ``step``: ``CKPT/STEP/0000k{suffix}``."""
    return os.path.join(ckpt, step, f"{k:05d}{suffix}")


def open_entry(path: str, fingerprint: str):
    """The complete checkpoint group at ``path`` made under ``fingerprint``, else None.

    Returns
    -------
    zarr.Group or None
        None when ``path`` is missing, damaged, unfinished (no ``complete`` mark) or made under
        another fingerprint: the entry is then to be redone.
    """
    import zarr

    if not os.path.isdir(path):
        return None
    try:
        g = zarr.open_group(path, mode="r")
        if g.attrs.get("fingerprint") != fingerprint or not g.attrs.get("complete"):
            return None
        return g
    except Exception:  # noqa: BLE001  (a damaged entry is redone)
        return None


def _write_group(tmp: str, arrays: dict, attrs: dict, chunks: dict | None) -> None:
    import zarr

    g = zarr.open_group(tmp, mode="w-", zarr_format=3)
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        c = (chunks or {}).get(name, arr.shape if arr.size else None)
        g.create_array(name, data=arr, chunks=tuple(max(int(v), 1) for v in c) if c else "auto",
                       compressors=None)
    # written last: an entry without it was interrupted
    g.attrs.update(jsonable({**attrs, "complete": True}))


def write_entry(path: str, arrays: dict, attrs: dict, *, chunks: dict | None = None) -> str:
    """Write one checkpoint entry atomically: a Zarr v3 group of uncompressed arrays.

    Parameters
    ----------
    path : str
        The entry (:func:`entry_path`); an existing one is replaced.
    arrays : dict of str to array
        Written as they are (C-contiguous).
    attrs : dict
        JSON-able attributes, ``fingerprint`` among them; ``complete = True`` is added last.
    chunks : dict of str to tuple, optional
        Chunk shape per array name; by default one chunk per array.

    Returns
    -------
    str
        ``path``.
    """
    return atomic_dir(path, lambda tmp: _write_group(tmp, arrays, attrs, chunks))


def prepare_checkpoint(ckpt: str, manifest: dict, overwrite: bool) -> None:
    """Make ``ckpt`` ready for a run described by ``manifest``, keeping what it can resume.

    A checkpoint of the same fingerprint is kept (leftovers of interrupted writes removed); one
    of another fingerprint, or a non-empty directory without a manifest, is refused unless
    ``overwrite`` (then deleted). A missing manifest is written (atomically).

    Parameters
    ----------
    ckpt : str
        The checkpoint directory (made if missing).
    manifest : dict
        ``{"fingerprint": ..., "arguments": {...}, "inputs": [...]}`` of this run.
    overwrite : bool
        Start afresh over a checkpoint of other arguments or inputs.

    Raises
    ------
    InputError
        The checkpoint was made by another run (the message names the differences, see
        :func:`manifest_differences`) or is not a pcmx checkpoint, and ``overwrite`` is False.
    """
    path = os.path.join(ckpt, "manifest.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if old is not None and old.get("fingerprint") != manifest["fingerprint"]:
            if not overwrite:
                raise InputError(
                    f"checkpoint {ckpt}: made by a run with different arguments or inputs "
                    f"(differs in: {', '.join(manifest_differences(old, manifest)) or 'fingerprint'}); "
                    "remove it, or pass overwrite_checkpoint=True (--overwrite) to start afresh")
            shutil.rmtree(ckpt)
        elif old is None:
            shutil.rmtree(ckpt)  # a manifest never completes half-written: the run died at once
    elif os.path.isdir(ckpt) and os.listdir(ckpt):
        if not overwrite:
            raise InputError(f"checkpoint {ckpt}: exists without a manifest.json (not a pcmx "
                             "checkpoint?); remove it or pass overwrite_checkpoint=True (--overwrite)")
        shutil.rmtree(ckpt)
    for step in STEPS:
        os.makedirs(os.path.join(ckpt, step), exist_ok=True)
    # half-written entries of a killed run: hidden temporary siblings
    for root in (ckpt, *(os.path.join(ckpt, step) for step in STEPS)):
        remove_temporaries(root)
    if not os.path.exists(path):
        atomic_json(path, manifest)


def manifest_differences(old: dict, new: dict) -> list[str]:
    """What differs between two checkpoint manifests, for the refusal message.

    Returns
    -------
    list of str
        ``"name=old -> new"`` per differing argument, then ``"N -> M images"`` or
        ``"image NAME"`` per differing input.
    """
    out = []
    oa, na = old.get("arguments", {}), new.get("arguments", {})
    out += [f"{k}={oa.get(k)!r} -> {na.get(k)!r}" for k in sorted(set(oa) | set(na)) if oa.get(k) != na.get(k)]
    oi, ni = old.get("inputs", []), new.get("inputs", [])
    if len(oi) != len(ni):
        out.append(f"{len(oi)} -> {len(ni)} images")
    else:
        out += [f"image {n.get('name')}" for o, n in zip(oi, ni, strict=True) if o != n]
    return out


def patches_to_arrays(patches: xr.DataArray) -> tuple[dict, dict]:
    """A patches DataArray as plain arrays (values, coordinates) and JSON metadata.

    Returns
    -------
    arrays : dict
        ``"patches"`` (the values) and ``"coord0"``, ``"coord1"``... (the coordinates).
    meta : dict
        Dims, attrs and the name, dims and attrs of each coordinate; stored as the entry's
        ``patches_meta`` attribute for :func:`patches_from_group`.
    """
    arrays = {"patches": np.asarray(patches.values)}
    coords = {}
    for i, (name, c) in enumerate(patches.coords.items()):
        arrays[f"coord{i}"] = np.asarray(c.values)
        coords[f"coord{i}"] = {"name": name, "dims": list(c.dims), "attrs": jsonable(dict(c.attrs))}
    return arrays, {"dims": list(patches.dims), "attrs": jsonable(dict(patches.attrs)),
                    "coords": coords}


def patches_from_group(g) -> xr.DataArray:
    """Inverse of :func:`patches_to_arrays` (values and coordinates bit for bit).

    Parameters
    ----------
    g : zarr.Group
        An entry written with the arrays of :func:`patches_to_arrays` and its metadata as the
        ``patches_meta`` attribute.
    """
    meta = g.attrs["patches_meta"]
    coords = {c["name"]: (tuple(c["dims"]), g[key][...], c["attrs"]) for key, c in meta["coords"].items()}
    return xr.DataArray(g["patches"][...], dims=tuple(meta["dims"]), coords=coords,
                        attrs=dict(meta["attrs"]))
