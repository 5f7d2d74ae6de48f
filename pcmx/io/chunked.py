"""Results larger than memory: a lazy (Dask) array written to a Zarr store chunk by chunk, resumable.

:func:`write_chunked` computes each chunk of the output and writes it into its region of a
Zarr v3 store that is being built in a hidden sibling of the final path
(``DIR/.NAME.pcmx-partial/store``). Beside that store, a manifest records what the run is
(``manifest.json``: the fingerprint of the inputs, the operator, the method and its
parameters, the shape and chunks) and which chunks are finished (``done.log``: one line per
chunk, appended only once the chunk's file is written and fsynced). A run that is killed
leaves the partial store; rerun with the same inputs and parameters, it writes only the
chunks not listed (a chunk half-written by the killed run is simply rewritten). A partial
store made with other inputs or parameters is refused, naming what differs, unless
``overwrite`` (then it is discarded). When every chunk is written, the store's metadata is
consolidated, it is validated against its schema (``schemas/restoration.json``), and it is
put in place in one atomic step (as :func:`pcmx.io.store.save_store` does): a reader at the
final path never finds a half-written store. The writer lock of the final path is held
throughout (:func:`pcmx.io.atomic.writer_lock`).

The chunks are computed by the active Dask scheduler: threads by default, or the workers of a
``dask.distributed`` Client when one is running; each worker then writes its chunks itself
(the store must be on a filesystem the workers see, e.g. a local directory for a
``LocalCluster`` of processes).

:func:`pcmx.io.readers.open_image_lazy` reads an image without loading it: a TIFF region by region (through
tifffile's Zarr interface), a Zarr/OME-Zarr as a Dask array of its chunks, a ``.npy`` memory
mapped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import warnings

import numpy as np
import xarray as xr

from ..errors import InputError, StoreError, StoreExistsError
from ..provenance import jsonable
from .atomic import fsync_path

__all__ = ["PARTIAL_MARKER", "Written", "partial_path", "input_record", "write_chunked",
           "ome_multiscales"]

PARTIAL_MARKER = ".pcmx-partial"
"""In the name of the partial store of an unfinished :func:`write_chunked` (``.NAME.pcmx-partial``)."""
_ZARR_TMP = re.compile(r"\.[0-9a-f]{32}\.partial$")  # zarr's own temporary chunk files
_MANIFEST = "manifest.json"
_DONE = "done.log"
_STORE = "store"


@dataclasses.dataclass(frozen=True)
class Written:
    """What :func:`write_chunked` did: the ``path`` written, its ``chunks`` in all, and how many
    of them a killed run had already written (``resumed``)."""

    path: str
    chunks: int
    resumed: int


def partial_path(final) -> str:
    """The partial store directory of ``final``: ``DIR/.NAME.pcmx-partial``."""
    parent, name = os.path.split(os.path.abspath(os.fspath(final)).rstrip(os.sep))
    return os.path.join(parent, f".{name}{PARTIAL_MARKER}")


def input_record(path) -> dict:
    """A cheap identity of an input file or directory (a Zarr store): its absolute path, size
    in bytes and latest modification time (ns) (for a directory: of all its files, and their
    number). Content hashes of inputs of tens of GB would cost a pass over them."""
    p = os.path.abspath(os.fspath(path))
    if os.path.isdir(p):
        size = count = latest = 0
        for root, _, files in os.walk(p):
            for name in files:
                st = os.stat(os.path.join(root, name))
                size, count, latest = size + st.st_size, count + 1, max(latest, st.st_mtime_ns)
        return {"name": p, "size": size, "files": count, "mtime_ns": latest}
    st = os.stat(p)
    return {"name": p, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _regular_chunks(chunks) -> tuple[int, ...]:
    """The Zarr chunk shape for Dask ``chunks``: per axis, the most common chunk (the largest
    of the most common ones), e.g. the tile edge where a last small tile was merged."""
    out = []
    for c in chunks:
        values, counts = np.unique(np.asarray(c, dtype=int), return_counts=True)
        out.append(int(values[counts == counts.max()].max()))
    return tuple(max(v, 1) for v in out)


def _write_block(block, store: str, name: str, index: tuple, starts: tuple) -> tuple:
    """Write one computed chunk into its region of ``store/name`` and fsync it (on the worker
    that computed it). Returns the chunk's index, for the manifest."""
    import zarr

    arr = zarr.open_array(os.path.join(store, name), mode="r+", config={"write_empty_chunks": True})
    region = tuple(slice(s, s + n) for s, n in zip(starts, block.shape, strict=True))
    arr[region] = np.asarray(block, dtype=arr.dtype)
    chunk = os.path.join(store, name, *arr.metadata.encode_chunk_key(tuple(index)).split("/"))
    fsync_path(chunk)
    fsync_path(os.path.dirname(chunk), directory=True)
    return tuple(int(i) for i in index)


def _manifest(array, name, dims, zchunks, fingerprint) -> dict:
    fp = jsonable(fingerprint if fingerprint is not None else {"graph": array.name})
    what = {"name": name, "dims": list(dims), "shape": [int(s) for s in array.shape],
            "dtype": str(array.dtype), "chunks": list(zchunks)}
    digest = hashlib.sha256(json.dumps([fp, what], sort_keys=True).encode()).hexdigest()
    arguments = dict(fp.get("arguments", {})) if isinstance(fp, dict) else {}
    if not (isinstance(fp, dict) and "arguments" in fp):
        arguments = {"fingerprint": fp}
    arguments.update({f"output {k}": v for k, v in what.items()})
    inputs = fp.get("inputs", []) if isinstance(fp, dict) else []
    return {"fingerprint": digest, "arguments": arguments, "inputs": inputs}


def _read_done(path: str, nblocks: tuple) -> set:
    """The chunks listed in ``done.log``: complete lines of in-range indices (a line cut by a
    kill is ignored: its chunk is rewritten)."""
    done = set()
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return done
    for line in text.split("\n")[:-1]:  # the last piece has no newline: unfinished
        try:
            idx = tuple(int(v) for v in line.split(","))
        except ValueError:
            continue
        if len(idx) == len(nblocks) and all(0 <= i < n for i, n in zip(idx, nblocks, strict=True)):
            done.add(idx)
    return done


def _prepare_partial(partial: str, manifest: dict, *, overwrite: bool, resume: bool,
                     path: str) -> bool:
    """Keep a partial store of the same fingerprint (True), or make a fresh one (False)."""
    from .checkpoint import manifest_differences

    mpath = os.path.join(partial, _MANIFEST)
    if os.path.isdir(partial):
        try:
            with open(mpath) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None  # written atomically: missing means the killed run had not started
        same = old is not None and old.get("fingerprint") == manifest["fingerprint"]
        if same and resume and os.path.isdir(os.path.join(partial, _STORE)):
            return True
        if old is not None and not same and not overwrite and resume:
            diff = ", ".join(manifest_differences(old, manifest)) or "fingerprint"
            raise InputError(
                f"{path}: an interrupted write in {partial} was made with other inputs or "
                f"parameters (differs in: {diff}); rerun with the same ones to resume it, or "
                "overwrite=True (--overwrite) to discard it and start over")
        shutil.rmtree(partial)
    return False


def _template(array, name, dims, coords, attrs, zchunks) -> xr.Dataset:
    import dask.array as da

    placeholder = da.zeros(array.shape, chunks=zchunks, dtype=array.dtype)
    return xr.Dataset({name: (tuple(dims), placeholder)}, coords=coords or {}, attrs=dict(attrs or {}))


def _create(store: str, template: xr.Dataset, name: str, zchunks) -> None:
    """The Zarr v3 store with every coordinate and attribute and the empty output array."""
    from .store import CONSOLIDATED_WARNING, portable_strings

    enc = {name: {"chunks": tuple(zchunks)}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=CONSOLIDATED_WARNING)
        portable_strings(template).to_zarr(store, mode="w-", zarr_format=3, consolidated=False,
                                            compute=False, encoding=enc)


def _run_chunks(array, store: str, name: str, todo: list, log, *, progress, callback,
                total: int, done_before: int) -> None:
    """Compute and write the chunks ``todo`` on the active scheduler, recording each in
    ``log`` as it finishes."""
    import dask

    from ..execution import active_client, progress_bar

    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(int) for c in array.chunks]
    blocks = array.to_delayed()
    write = dask.delayed(_write_block, pure=True)
    tasks = [write(blocks[idx], store, name, idx, tuple(int(s[i]) for s, i in zip(starts, idx, strict=True)),
                   dask_key_name=f"pcmx-write-{array.name}-{'-'.join(map(str, idx))}")
             for idx in todo]
    count = [done_before]

    def record(idx) -> None:
        log.write(",".join(str(i) for i in idx) + "\n")
        log.flush()
        os.fsync(log.fileno())
        count[0] += 1
        bar.update(1)
        if callback is not None:
            callback(idx, count[0], total)

    client = active_client()
    with progress_bar(progress, total, "chunks written", "chunk") as bar:
        bar.update(done_before)
        if not tasks:
            return
        if client is not None:
            from distributed import as_completed

            futures = client.compute(tasks)
            try:
                for f in as_completed(futures):
                    record(f.result())
            finally:
                client.cancel([f for f in futures if not f.done()])
            return
        from dask.callbacks import Callback

        keys = {t.key for t in tasks}

        class _Record(Callback):
            def _posttask(self, key, result, dsk, state, id):  # noqa: A002
                if key in keys:
                    record(result)

        with _Record():
            dask.compute(*tasks)


def _remove_zarr_temporaries(store: str) -> None:
    for root, _, files in os.walk(store):
        for name in files:
            if _ZARR_TMP.search(name):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(root, name))


def write_chunked(array, path, *, dims, coords=None, attrs=None, name: str = "restored",
                  kind: str = "restoration", overwrite: bool = False, resume: bool = True,
                  group: str | None = None, progress: bool | None = None, fingerprint=None,
                  callback=None, lock: bool = True, ome: dict | None = None) -> Written:
    """Write a (lazy) Dask array as a pcmx store at ``path``, chunk by chunk, resumably.

    Parameters
    ----------
    array : dask array or array
        The result, e.g. the lazy output of :func:`pcmx.restore.restore`. Each of its chunks
        is computed once and written to its region (a NumPy array is cut in chunks of at most
        1024 per axis). Irregular chunks are rechunked to the most common chunk per axis.
    path : str or path-like
        The local store to write (its parent directory must exist).
    dims : sequence of str
        The array's dims, e.g. ``("y", "x")`` or ``("z", "y", "x")``.
    coords : mapping, optional
        Coordinates (with ``attrs["units"]``), as for :class:`xarray.Dataset`.
    attrs : mapping, optional
        The store's attributes; ``pcmx_type`` is set to ``kind`` and the missing provenance
        attributes are filled in.
    name : str
        The variable holding the array.
    kind : str
        The ``pcmx_type`` and schema (:mod:`pcmx.schema`) the store is validated against.
    overwrite : bool
        Replace an existing pcmx store at ``path`` (never something that is not one), and
        discard a partial store made with other inputs or parameters.
    resume : bool
        Resume a partial store of the same fingerprint (default); False discards any partial
        store and starts over.
    group : str, optional
        Write the store as this group of the local Zarr v3 hierarchy ``path`` (e.g.
        ``"pcmx/restoration"`` inside an OME-Zarr image); the hierarchy's consolidated
        metadata is rewritten at the end.
    progress : bool, optional
        A progress bar over the chunks on stderr (None: the option ``progress``).
    fingerprint : JSON-able, optional
        What makes the result: ``{"arguments": {...}, "inputs": [...]}`` (the inputs' identity,
        e.g. :func:`input_record`, the operator store's hash, the method and its parameters).
        A partial store is resumed only if it matches exactly (with the output's shape,
        dtype and chunks). Default: the Dask array's name, a token of its graph.
    callback : callable, optional
        ``callback(index, done, total)`` after each chunk is recorded; an exception it raises
        stops the write, the finished chunks stay for a resume.
    lock : bool
        Take the writer lock of the final path (False: the caller holds it).
    ome : dict, optional
        OME-NGFF 0.5 metadata (:func:`ome_multiscales`), written as the store's ``ome``
        attribute: the store is then also an OME-Zarr image whose one resolution level is the
        array ``name`` (OME readers ignore the coordinate arrays beside it).

    Returns
    -------
    Written
        The path (the hierarchy's with ``group``), the number of chunks, and how many were
        resumed.

    Raises
    ------
    StoreExistsError
        ``path`` exists and ``overwrite`` is False, or exists and is not a pcmx store.
    InputError
        A partial store of other inputs or parameters exists and ``overwrite`` is False
        (the message names the differences).
    SchemaError
        The store would not be valid (before any work).
    StoreLockedError
        Another process writes ``path``.
    """
    import dask.array as da

    from ..schema import validate
    from .atomic import clean_leftovers, put_in_place, writer_lock
    from .store import consolidate, group_dir, is_store, local_path, open_store, with_provenance

    path = local_path(os.fspath(path)).rstrip(os.sep)
    root = None
    if not da.core.is_dask_collection(array):
        array = da.from_array(np.asarray(array), chunks=tuple(min(n, 1024) for n in np.shape(array)))
    if len(dims) != array.ndim:
        raise InputError(f"dims={tuple(dims)}: {len(dims)} names for a {array.ndim}D array")
    zchunks = _regular_chunks(array.chunks)
    if tuple(tuple(c) for c in array.chunks) != tuple(
            tuple(min(z, n - i) for i in range(0, n, z)) for z, n in zip(zchunks, array.shape, strict=True)):
        array = array.rechunk(zchunks)
    attrs = {**dict(attrs or {}), "pcmx_type": kind}
    if ome is not None:
        attrs["ome"] = ome
    template = with_provenance(_template(array, name, dims, coords, attrs, zchunks))
    validate(template, kind=kind, source=path, require_provenance=True, check_values=False)
    if group is not None:
        root, path = path, group_dir(path, group, create=True)
    manifest = _manifest(array, name, dims, zchunks, fingerprint)
    partial = partial_path(path)
    store = os.path.join(partial, _STORE)

    with writer_lock(path) if lock else contextlib.nullcontext():
        if lock:
            clean_leftovers(path)
        if os.path.lexists(path):
            if not overwrite:
                raise StoreExistsError(f"{path}: already exists; use overwrite=True (--overwrite) to replace it")
            if not is_store(path):
                raise StoreExistsError(f"{path}: exists and is not a pcmx store; refusing to replace it")
        resumed = _prepare_partial(partial, manifest, overwrite=overwrite, resume=resume, path=path)
        nblocks = tuple(len(c) for c in array.chunks)
        total = math.prod(nblocks)
        if not resumed:
            os.mkdir(partial)
            _create(store, template, name, zchunks)
            from .atomic import atomic_json

            atomic_json(os.path.join(partial, _MANIFEST), manifest)  # last: the partial is usable
        done = _read_done(os.path.join(partial, _DONE), nblocks)
        todo = [idx for idx in np.ndindex(*nblocks) if idx not in done]
        with open(os.path.join(partial, _DONE), "ab+") as f:
            if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                f.write(b"\n")  # end a line a kill cut (it is ignored), not glue the next to it
        with open(os.path.join(partial, _DONE), "a") as log:
            _run_chunks(array, store, name, todo, log, progress=progress, callback=callback,
                        total=total, done_before=len(done))
        missing = total - len(_read_done(os.path.join(partial, _DONE), nblocks))
        if missing:  # pragma: no cover - every task records its chunk or raises
            raise StoreError(f"{path}: {missing} of {total} chunks were not written; rerun to "
                             "write them (the others are kept)")
        import zarr

        g = zarr.open_group(store, mode="r+")
        g.attrs.update(jsonable({k: v for k, v in template.attrs.items()}))  # this run's provenance
        _remove_zarr_temporaries(store)
        consolidate(store)
        ds = open_store(store, kind=kind)  # the schema, from the store as written
        try:
            validate(ds, kind=kind, source=path, require_provenance=True, check_values=False)
            if tuple(ds[name].shape) != tuple(array.shape):  # pragma: no cover - a broken write
                raise StoreError(f"{path}: wrote shape {ds[name].shape}, expected {array.shape}")
        finally:
            ds.close()
        os.remove(os.path.join(partial, _MANIFEST))  # a kill after this: nothing to resume
        put_in_place(store, path)
        shutil.rmtree(partial, ignore_errors=True)
    if root is not None:
        consolidate(root)
        return Written(root, total, len(done))
    return Written(path, total, len(done))


def ome_multiscales(dims, pixel_size_um, *, path: str = "restored", name: str = "restored") -> dict:
    """OME-NGFF 0.5 ``ome`` attributes of one image at one resolution level, the array
    ``path`` of the store, with its axes in micrometres and the pixel sizes (micrometres,
    1 where unknown) as the level's scale."""
    axes = [{"name": d, "type": "space", "unit": "micrometer"} for d in dims]
    scale = [float(s) if s else 1.0 for s in pixel_size_um]
    return {"version": "0.5", "multiscales": [{
        "name": name, "axes": axes,
        "datasets": [{"path": path, "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
    }]}

