"""Learn a family of operators from K acquisitions (paper II-D, II-E).

Steps (II-D-b): bead patches of every image (:func:`pcmx.patches.bead_patches`); one PCA over
all patches with z-score rejection and a second PCA (the shared PSF basis h_i,
:func:`pcmx.psf_basis.fit_psf_basis`); per image the coefficient maps alpha_{i,k} by weighted
thin-plate splines under the family's realism policy (:class:`pcmx.fit.Realism`: by default
non-negative PSFs, or the cone of all observed coefficients;
:func:`pcmx.coefficients.coefficient_maps`); an SVD of the K*I maps to J spatial modes a_j;
``gamma_k[i, j] = <alpha_{i,k}, a_j>``; the unit-sum normalised gammas generate the cone of
admissible operators (II-E-a).

Out of core, resumable, distributed
-----------------------------------
Every per-image result is written, as soon as it is computed, to a *checkpoint directory*
(a temporary one unless ``checkpoint=`` is given)::

    DIR/manifest.json        fingerprint of the arguments and inputs (paths and the SHA-256
                             of each file's content, or of each in-memory array's pixels)
    DIR/beads/00003.zarr     image 3's bead patches, positions and counts
    DIR/beads/00003.bad.json image 3 failed (the cause), when it did
    DIR/basis.zarr           the shared PSF basis, observed coefficients and cone generators
    DIR/maps/00003.zarr      image 3's coefficient maps (I, ny, nx) float32, uncompressed,
                             chunked (I, c, c) as the SVD streams them

The maps are stored uncompressed: on real coefficient maps (float32, 384x384, I=5) Zstd-1
saved 12 % of the space and Blosc-LZ4 with bit shuffling 33 %, for reads 8 % and 18 % slower
(559 MB/s uncompressed here), and the Gram route reads every map twice.

Each entry is written to a hidden temporary sibling and renamed into place, so a run killed
at any point (``kill -9``) leaves only complete entries; a rerun with the same arguments and
inputs skips them (their recorded fingerprint must match the manifest's) and produces the
same family: the PCA sees the same float32 patches in the same order. Inputs are keyed by
their content, not their size and modification time: an input replaced by another
acquisition (even of the same size, its mtime kept) makes the run refuse the checkpoint,
naming the image, unless ``overwrite_checkpoint``. Each file is hashed once per run, before
any other work, and the same digest is recorded in the result's provenance.

The same acquisition given twice (one path twice, or two files or arrays of identical
content) is refused, naming both: it would give two states of one condition.

The per-image steps (bead patches, then maps) run as independent tasks: on a
``dask.distributed`` cluster when a :class:`distributed.Client` is active (the checkpoint
directory must then be on a filesystem the workers see), else in a local thread pool. The
SVD streams over the maps as Dask arrays, block by spatial block, on whichever scheduler is
active:

* ``svd="gram"``: the exact route. The (K*I)^2 Gram matrix ``A A^T`` is accumulated in
  float64 one spatial block at a time (all K*I rows of one block in memory, float32), its
  eigendecomposition gives gamma and the singular values, and a second pass gives the modes.
  Every map is read twice; memory is bounded by one block.
* ``svd="randomized"``: :func:`dask.array.linalg.svd_compressed` (Halko et al., the paper's
  randomized SVD) in float64 with power iterations: ``2 q + 2`` passes over the maps.
* ``svd="auto"``: the Gram route up to K*I = :data:`GRAM_MAX_ROWS` maps (and always when J is
  chosen by the rank rule, which needs every singular value), the randomized one above.

Measured (512x512 maps, J=5, 40 smooth fields + noise, uncompressed scratch, threaded
scheduler with one BLAS thread per task on a shared 2-core machine, load ~3, best of 2 runs;
s5/s1 ~ 0.27):

====  ==========  ======================  ======================
K*I   Gram        randomized q=1          randomized q=2 (QR)
====  ==========  ======================  ======================
50    0.24 s      0.93 s (1.6e-6 deg)     1.16 s (3.8e-9 deg)
450   3.6 s       3.4 s (4.6e-7 deg)      4.2 s (8.2e-13 deg)
900   15.2 s      9.0 s (3.1e-7 deg)      8.1 s (8.2e-13 deg)
====  ==========  ======================  ======================

(in brackets: largest principal angle between the routes' mode subspaces; gamma agrees to
1e-7 relative at q=1, 1e-12 at q=2; a run under load ~6 gave 0.5/2.9/3.9 s at 50, 2.9/3.9/5.0 s
at 200, 4.6/5.8/7.5 s at 450 and 20.6/9.9/9.2 s at 900). The Gram route costs O((K*I)^2 N)
flops in two reads of the maps, the randomized one O(K*I (J + p) N) per pass in 2q + 2
passes plus Dask's tsqr overhead: against the default q=2 they meet around K*I ~ 500-600
here, hence :data:`GRAM_MAX_ROWS` = 500 (the paper's 90 images x I=5 stay exact).

Both routes return the modes in one convention: each a_j has unit norm and its entry of
largest magnitude is positive (the matching column of gamma flips with it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter

import numpy as np
import xarray as xr

from .coefficients import coefficient_maps
from .errors import InputError
from .execution import (
    active_client,
    blas_limit,
    compute_many,
    progress_bar,
    run_tasks,
    show_progress,
    task_workers,
)
from .fit import Realism
from .io.atomic import atomic_json
from .io.checkpoint import (
    entry_path,
    open_entry,
    patches_from_group,
    patches_to_arrays,
    prepare_checkpoint,
    write_entry,
)
from .io.readers import PcmxWarning, as_image, read_image
from .modes import (
    MODE_RULES,
    MODE_TOLERANCE,
    PANEL,
    choose_modes,
    gram_matrix,
    modes_of_gram,
    rank_by_energy,
    rank_by_threshold,
    realism_of_family,
)
from .patches import bead_patches, pooled_radius, radius_profiles, radius_sample
from .provenance import jsonable, provenance, sha256_file
from .psf_basis import fit_psf_basis
from .units import kernel_coords
from .units import pixel_size as axis_step

__all__ = ["learn_family", "rank_by_threshold", "rank_by_energy", "choose_modes", "gram_matrix",
           "modes_of_gram", "realism_of_family", "GRAM_MAX_ROWS", "MIN_BEADS", "MODE_RULES",
           "MODE_TOLERANCE"]

#: Largest K*I for which ``svd="auto"`` takes the exact Gram route (the measurement behind it
#: is in the module docstring).
GRAM_MAX_ROWS = 500
#: Fewest usable beads an image needs for its coefficient maps.
MIN_BEADS = 4
#: Memory budget (bytes, float32) of one spatial block of all K*I maps in the SVD.
_BLOCK_BYTES = 128 * 2**20
_CHECKPOINT_VERSION = 6  # 3: realism by non-negativity, spline outlier rejection, pooled r;
# 4: the realism policy object (pcmx.fit.Realism) in the manifest; 5: shape tests of the beads
# (only beads with a clean PSF are checkpointed), SNR weights in the PCA; 6: inputs keyed by
# the SHA-256 of their content (not size and mtime)


# --------------------------------------------------------------------------- inputs

def _labels(images) -> list[str]:
    """One distinct label per image: the file name (with as many parent directories as tell
    apart files of one name), the DataArray's ``source`` or ``state<k>``; a label still
    shared gets its index appended (``"stack.tif [3]"``)."""
    out = []
    for k, im in enumerate(images):
        if isinstance(im, (str, os.PathLike)):
            out.append(os.path.basename(os.path.normpath(os.fspath(im))))
        elif isinstance(im, xr.DataArray) and "source" in im.attrs:
            out.append(str(im.attrs["source"]))
        else:
            out.append(f"state{k}")
    counts = Counter(out)
    for lab in [lab for lab, n in counts.items() if n > 1]:
        group = [k for k, v in enumerate(out) if v == lab]
        paths = {k: os.path.abspath(os.fspath(images[k])).split(os.sep) for k in group
                 if isinstance(images[k], (str, os.PathLike))}
        for depth in range(2, max((len(p) for p in paths.values()), default=0) + 1):
            longer = {k: "/".join(p[-depth:]) for k, p in paths.items()}
            if len(set(longer.values())) == len(longer):
                for k, v in longer.items():
                    out[k] = v
                break
    counts = Counter(out)
    return [f"{lab} [{k}]" if counts[lab] > 1 else lab for k, lab in enumerate(out)]


def _array_digest(item) -> str:
    """SHA-256 of an in-memory image's pixels (a Dask array is computed)."""
    arr = np.ascontiguousarray(np.asarray(item.values if isinstance(item, xr.DataArray) else item))
    return hashlib.sha256(arr.tobytes()).hexdigest()


def _digests(images, keyed: bool) -> list[str | None]:
    """The SHA-256 of each input, computed once per run: of a file's content (a directory's
    files, for a Zarr image) or of an in-memory array's pixels. Missing files give None (the
    checks report them); lazy (Dask) arrays are hashed only when ``keyed`` (a checkpoint
    needs their content)."""
    out = []
    for item in images:
        if isinstance(item, (str, os.PathLike)):
            p = os.fspath(item)
            try:
                out.append(sha256_file(p) if os.path.exists(p) else None)
            except OSError:
                out.append(None)  # unreadable: the checks name it
        elif _is_lazy(item) and not keyed:
            out.append(None)
        else:
            out.append(_array_digest(item))
    return out


def _is_lazy(item) -> bool:
    data = item.data if isinstance(item, xr.DataArray) else item
    return hasattr(data, "dask")


def _refuse_duplicates(images, digests) -> None:
    """The same acquisition twice (one path twice, identical content, one Dask graph) -> error
    naming both."""
    def named(k):
        item = images[k]
        return f"images[{k}] {os.fspath(item)!r}" if isinstance(item, (str, os.PathLike)) else f"images[{k}]"

    seen: dict = {}
    for k, item in enumerate(images):
        keys = []
        if isinstance(item, (str, os.PathLike)):
            keys.append(("path", os.path.realpath(os.fspath(item))))
        elif _is_lazy(item):
            keys.append(("dask", (item.data if isinstance(item, xr.DataArray) else item).name))
        if digests[k] is not None:
            keys.append(("content", isinstance(item, (str, os.PathLike)), digests[k]))
        for key in keys:
            if key in seen:
                j = seen[key]
                what = ("are the same file" if key[0] == "path" else
                        "are the same Dask array" if key[0] == "dask" else
                        f"have the same content (SHA-256 {digests[k][:12]}...)")
                raise InputError(f"{named(j)} and {named(k)} {what}: each acquisition may be "
                                 "given once (two states of one condition would skew the family)")
            seen[key] = k


def _probe(item, label: str, pixel_size) -> tuple[xr.DataArray | None, str | None]:
    """Cheap checks of one image (readable, 2D, numeric, finite, not tiny, not constant).

    Returns the image (coordinates and shape only are used afterwards) or the cause of failure.
    """
    try:
        img = as_image(item, pixel_size=pixel_size)
    except InputError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001  (readers may let a parser's own error through)
        return None, f"cannot read ({type(exc).__name__}: {exc})"
    if img.ndim != 2:
        return None, (f"dims {img.dims} of shape {tuple(img.shape)}; a family state is one 2D "
                      "plane (use planes-as-states for z-stacks)")
    if img.dtype.kind not in "uif":
        return None, f"unsupported pixel type {img.dtype}"
    if min(img.shape) < 16:
        return None, f"shape {tuple(img.shape)} is too small to hold beads"
    data = img.data
    if img.dtype.kind == "f":
        finite = data.map_blocks(np.isfinite).all() if hasattr(data, "map_blocks") else np.isfinite(data).all()
        if not bool(finite):
            return None, "contains NaN or infinite values"
    lo, hi = img.min(), img.max()
    if float(lo) == float(hi):
        return None, f"image is constant ({float(lo)}); no beads to learn from"
    return img, None


def _input_record(item, label: str, digest: str | None) -> dict:
    """An input as the checkpoint manifest keys it: by the SHA-256 of its content
    (:func:`_digests`), so a file replaced by another of the same size and mtime differs."""
    if isinstance(item, (str, os.PathLike)):
        rec = {"name": label, "path": os.path.abspath(os.fspath(item)), "sha256": digest}
        if digest is None:
            rec["missing"] = True
        return rec
    data = item.data if isinstance(item, xr.DataArray) else item
    return {"name": label, "shape": [int(n) for n in data.shape], "dtype": str(data.dtype),
            "sha256": digest}


# --------------------------------------------------------------------------- per-image tasks

def _task_image(item, pixel_size):
    """The image of one task as a DataArray (the bead steps use its pixels only)."""
    if isinstance(item, (str, os.PathLike)):
        # a given size keeps the reader from warning about missing metadata in worker threads
        return read_image(item, pixel_size=pixel_size or "1um")
    if isinstance(item, xr.DataArray):
        return item
    return xr.DataArray(np.asarray(item), dims=("y", "x"))


def _bead_task(item, k: int, label: str, ckpt: str, fingerprint: str, r, background,
               pixel_size) -> dict:
    """Bead patches of image k, checkpointed; returns a small summary (or the failure)."""
    path = entry_path(ckpt, "beads", k)
    g = open_entry(path, fingerprint)
    if g is not None:
        return {"k": k, "radius": int(g.attrs["radius"]), "n": int(g["positions"].shape[0]), "resumed": True}
    bad = entry_path(ckpt, "beads", k, ".bad.json")
    if os.path.exists(bad):
        with open(bad) as f:
            rec = json.load(f)
        if rec.get("fingerprint") == fingerprint:
            return {"k": k, "error": rec["error"], "resumed": True}
    img = _task_image(item, pixel_size)
    try:
        # the beads a model may be fitted on, as pcmx.fit.fit_operator takes them
        bp = bead_patches(img, psf_radius=r, background=background).usable_beads()
        if len(bp.positions) < MIN_BEADS:
            raise InputError(f"only {len(bp.positions)} isolated beads with a clean PSF; at least "
                             f"{MIN_BEADS} are needed for the coefficient maps")
    except InputError as exc:
        msg, source = str(exc), str(img.attrs.get("source", img.name or "image"))
        for prefix in (f"{source}: ", "image: ", "array: "):  # the label names the image
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
        atomic_json(bad, {"name": label, "error": msg, "fingerprint": fingerprint})
        return {"k": k, "error": msg, "resumed": False}
    arrays, meta = patches_to_arrays(bp.patches)
    write_entry(path, {**arrays, "positions": bp.positions},
                {"fingerprint": fingerprint, "name": label, "radius": int(bp.radius),
                 "counts": bp.counts, "timings_s": bp.timings, "patches_meta": meta})
    return {"k": k, "radius": int(bp.radius), "n": len(bp.positions), "resumed": False}


def _radius_task(item, pixel_size):
    """Bead profiles of one image for the pooled r (:func:`pcmx.patches.radius_profiles`)."""
    try:
        img = _task_image(item, pixel_size)
    except InputError:
        return None  # reported by the bead step, which sees the same image
    return radius_profiles(img)


def _maps_task(k: int, ckpt: str, fingerprint: str, positions, beta, shape, realism_setup: dict,
               chunk: int) -> dict:
    """Coefficient maps alpha_{i,k} of image k, written (I, c, c)-chunked, uncompressed.

    ``realism_setup``: the family's :meth:`pcmx.fit.Realism.setup` (the cone of all images'
    coefficients, or the non-negativity projection), the same for every image."""
    path = entry_path(ckpt, "maps", k)
    g = open_entry(path, fingerprint)
    if g is not None:
        return {"k": k, "resumed": True, "rejected": int(g.attrs.get("rejected", 0))}
    maps, _, info = coefficient_maps(positions, beta, tuple(shape), return_spline=True,
                                     **realism_setup)
    n_i = maps.shape[0]
    rejected = int(len(info["rejected"]))
    write_entry(path, {"maps": maps.astype(np.float32, copy=False)},
                {"fingerprint": fingerprint, "rejected": rejected, "lattice_step": int(info["step"])},
                chunks={"maps": (n_i, min(chunk, shape[0]), min(chunk, shape[1]))})
    return {"k": k, "resumed": False, "rejected": rejected}


# --------------------------------------------------------------------------- SVD routes

def _block_slices(shape, chunk: int) -> list[tuple[slice, slice]]:
    ny, nx = shape
    return [(slice(y, min(y + chunk, ny)), slice(x, min(x + chunk, nx)))
            for y in range(0, ny, chunk) for x in range(0, nx, chunk)]


def _project_block(blk, proj) -> np.ndarray:
    """``proj^T B`` of one block: the modes on it, float32."""
    b = np.asarray(blk).reshape(blk.shape[0], -1)
    out = np.empty((proj.shape[1], b.shape[1]), np.float32)
    for start in range(0, b.shape[1], PANEL):
        out[:, start:start + PANEL] = proj.T @ b[:, start:start + PANEL].astype(np.float64)
    return out.reshape(proj.shape[1], *blk.shape[1:])


def _blocks(maps, shape, chunk):
    """One delayed (K*I, c, c) block of all maps per spatial block."""
    return [maps[:, ys, xs].rechunk({0: -1, 1: -1, 2: -1}).to_delayed().ravel()[0]
            for ys, xs in _block_slices(shape, chunk)]


def _modes_from(maps, shape, chunk, proj, *, progress, client) -> np.ndarray:
    import dask

    blocks = _blocks(maps, shape, chunk)
    parts = compute_many([dask.delayed(_project_block)(b, proj) for b in blocks],
                          desc="SVD (modes)", progress=progress, client=client)
    modes = np.empty((proj.shape[1], *shape), np.float32)
    for (ys, xs), p in zip(_block_slices(shape, chunk), parts, strict=True):
        modes[:, ys, xs] = p
    return modes


def _svd_gram(maps, shape, chunk, n_modes, *, progress, client, mode_rule="capped"):
    import dask

    blocks = _blocks(maps, shape, chunk)
    parts = compute_many([dask.delayed(gram_matrix)(b) for b in blocks],
                          desc="SVD (Gram)", progress=progress, client=client)
    u, sv, j = modes_of_gram(np.sum(parts, axis=0), n_modes, mode_rule)
    proj = u / np.where(sv[:j] > 0, sv[:j], 1.0)
    modes = _modes_from(maps, shape, chunk, proj, progress=progress, client=client)
    # gamma_k[i, j] = <alpha_{i,k}, a_j> = s_j U[k*I + i, j] (no third pass over the maps)
    return modes, u * sv[:j], sv


def _svd_randomized(maps, shape, chunk, n_modes, *, power_iterations, oversamples, seed,
                    progress, client):
    import dask
    import dask.array as da

    n_rows = maps.shape[0]
    slices = _block_slices(shape, chunk)
    cols = [maps[:, ys, xs].rechunk({0: -1}).reshape(n_rows, -1).astype(np.float64)
            for ys, xs in slices]
    mat = da.concatenate(cols, axis=1).rechunk({0: -1})
    k = min(n_modes, n_rows)
    # re-orthonormalised power iterations: plain ones lose the trailing modes in float64 when
    # the spectrum decays fast (measured: 1e-3 degree subspace error at q=3 against 5e-7 at q=2)
    u, s, v = da.linalg.svd_compressed(mat, k=k, n_power_iter=power_iterations,
                                       iterator="QR" if power_iterations else "power",
                                       n_oversamples=oversamples, seed=seed)
    with progress_bar(progress, 1, "SVD (randomized)", "step") as bar:
        if client is not None:
            u, s, v = client.compute([u, s, v], sync=True)
        else:
            with blas_limit(1):
                u, s, v = dask.compute(u, s, v)
        bar.update(1)
    modes = np.empty((k, *shape), np.float32)
    offset = 0
    for ys, xs in slices:
        n = (ys.stop - ys.start) * (xs.stop - xs.start)
        modes[:, ys, xs] = v[:, offset:offset + n].reshape(k, ys.stop - ys.start, xs.stop - xs.start)
        offset += n
    return modes, u * s, np.asarray(s)


def _fix_signs(modes: np.ndarray, gamma: np.ndarray) -> None:
    """Make each mode's entry of largest magnitude positive (in place, gamma's column too)."""
    flat = modes.reshape(len(modes), -1)
    peak = flat[np.arange(len(flat)), np.argmax(np.abs(flat), axis=1)]
    sign = np.where(peak < 0, -1, 1).astype(modes.dtype)
    modes *= sign[:, None, None]
    gamma *= sign[None, :]


def _svd_chunk(n_rows: int, shape) -> int:
    """Side of the SVD's spatial blocks: K*I rows x c^2 float32 within the block budget."""
    c = int(np.sqrt(_BLOCK_BYTES / (4 * max(n_rows, 1))))
    c = max(64, min(2048, c // 64 * 64))
    return min(c, max(shape))


# --------------------------------------------------------------------------- the pipeline

def learn_family(images, *, n_components: int | None = None, n_modes: int | None = None,
                 psf_radius: int | None = None, pixel_size: str | None = None,
                 background: str | None = None, realism: Realism | str | bool = "nonnegative",
                 scratch: str | None = None, chunk: int | None = None,
                 checkpoint: str | os.PathLike | None = None, overwrite_checkpoint: bool = False,
                 skip_bad: bool = False, svd: str = "auto", power_iterations: int = 2,
                 oversamples: int = 10, seed: int = 0, progress: bool | None = None,
                 client=None, workers: int | None = None,
                 mode_rule: str = "capped", validate: bool | str = "auto",
                 folds: int = 5) -> xr.Dataset:
    """Learn the family of a microscope's operators from K bead images (paper II-D).

    Parameters
    ----------
    images : sequence of paths/arrays/DataArrays, or a DataArray with a ``state`` dim
        K 2D bead images on the same grid, taken under varying conditions.
    n_components : int, optional
        I; when None, Gavish & Donoho's optimal hard threshold for the patches' estimated
        noise (the "noise" rank rule of :func:`pcmx.psf_basis.fit_psf_basis`, as for one
        operator).
    n_modes : int, optional
        J; chosen from the maps' singular values by ``mode_rule`` when None (needs the Gram
        route, which ``svd="auto"`` takes then).
    mode_rule : {"capped", "threshold", "energy"}
        ``"threshold"``: the paper's 2.858 * median rule (II-E-c). It assumes white noise on
        the maps; smooth spline maps have none, and on many maps it keeps modes that change
        no PSF: 38-44 modes where 8 give the same PSF error (``docs/family.md``), a family
        store 5x larger and blind deblurring needing 5x more point sources (P >= J).
        ``"energy"``: the fewest modes that reproduce all K*I maps to 1% RMS
        (:func:`rank_by_energy`). ``"capped"`` (default): the smaller of the two.
    psf_radius : int, optional
        r, shared by all images (patches must have one size); estimated when None from the
        pooled bead profiles of up to ``RADIUS_IMAGES`` images spread over the inputs
        (:func:`pcmx.beads.pooled_psf_radius`: the PCA over many patches sees wings that each
        dim bead's profile hides; reported in ``pcmx_parameters["psf_radius_estimate"]``).
    pixel_size : str, optional
        e.g. ``"65nm"`` when the files lack it.
    background : str, optional
        Background estimator of :func:`pcmx.patches.bead_patches`.
    realism : {"nonnegative", "cone", "none"}, bool or :class:`pcmx.fit.Realism`
        The realism projection of each image's maps (App. C-b), applied at the lattice nodes
        of the maps before bilinear upsampling. ``"nonnegative"``: each coefficient vector
        moved to the nearest one whose PSF is >= -1% of its peak
        (:func:`pcmx.cone.project_nonnegative`). ``"cone"`` (or True): the paper's
        projection onto the conical hull of all observed coefficients, reduced greedily to
        within 1 degree (:func:`pcmx.cone.reduce_cone`, as many generators as that takes).
        Both keep every predicted PSF non-negative within ~1% of its peak; against the
        simulator's truth the cone costs +11% of PSF error on dim beads with the 12
        components a family needs (its hull of a few hundred noisy 12-vectors is thin),
        the non-negativity projection nothing measurable (``docs/family.md``).
        "none" or False: no projection.
    scratch : str, optional
        Parent directory of the temporary scratch (the system's temporary directory by
        default); unused with ``checkpoint``.
    chunk : int, optional
        Side of the square spatial blocks of the maps in the scratch and of the SVD's
        streaming; by default as large as keeps one block of all K*I maps within 128 MiB
        (float32; the Gram route works on it in float64 panels of 16384 pixels).
    checkpoint : path, optional
        Persistent checkpoint directory (layout in the module docstring). Created when
        missing; resumed when its manifest matches these arguments and inputs; kept after the
        run (remove it once the result is saved; the CLI does). The default is a temporary
        scratch directory removed at the end.
    overwrite_checkpoint : bool
        Discard a ``checkpoint`` made with other arguments or inputs instead of raising.
    skip_bad : bool
        Leave out, with a :class:`~pcmx.io.readers.PcmxWarning`, images that cannot be used
        (unreadable, wrong shape, non-finite, no or too few beads); they are listed in
        ``attrs["pcmx_skipped"]``. Otherwise such an image stops the run with an
        :class:`~pcmx.errors.InputError` naming it and the cause (the cheap checks of every
        image come before any heavy work).
    svd : {"auto", "gram", "randomized"}
        The SVD route (module docstring); "auto" picks by K*I.
    power_iterations, oversamples, seed :
        Of the randomized route (:func:`dask.array.linalg.svd_compressed`).
    progress : bool, optional
        Show a progress bar per step (:mod:`tqdm.auto`: terminal or notebook); None: the
        option ``progress`` (:func:`pcmx.set_options`, default False).
    client : distributed.Client, optional
        Cluster for the per-image tasks and the SVD; by default the active Client if any. The
        workers read the images and write and read the checkpoint (or the scratch, in
        ``scratch``): both must be on a filesystem they see.
    workers : int, optional
        Threads for the per-image tasks without a Client (default: dask's ``num_workers``
        setting or the option ``threads``); 1 runs them in turn.
    validate : "auto" or bool
        Cross-validate the family on held-out beads of its images
        (:func:`pcmx.cross_validation.cross_validate_family`, ``folds`` folds split by
        ``seed``, the same options, on the beads already extracted) against each image's own
        operator and the space-invariant reference. The figures go into the store
        (``cv_error_family``, ``cv_error_single``, ``cv_error_invariant`` per held-out bead,
        ``cv_median_error_*`` per validated state, ``pcmx_parameters["cross_validation"]``,
        with the paired comparison of :func:`pcmx.cross_validation.select_model`), and a
        :class:`~pcmx.io.readers.PcmxWarning` says so when the reference predicts the held-out
        beads better than the family (``family_better`` in the record: the family beats it by
        more than one standard error of the paired difference). ``"auto"`` (default): when affordable, i.e. its
        estimated cost (``2 folds`` times the family's PCA, maps and SVD per image) stays
        within :data:`VALIDATE_SHARE` of the family's own time or :data:`VALIDATE_MIN_S`
        seconds; beyond, on as many images as fit, spread over the states (the sub-family is
        learned and validated as the family would be; the record says so); images with fewer
        than ``2 folds`` beads are left out of it. True: on every image, whatever it costs
        (an error where it cannot run); False: never.
    folds : int
        Folds of the validation (at least 2).

    Returns
    -------
    Dataset
        ``psf_basis (component, ky, kx)``, ``spatial_basis (mode, y, x)``,
        ``gamma (state, component, mode)`` (coefficients of state k =
        ``einsum("ij,jyx->iyx", gamma[k], spatial_basis)``), ``gamma_normalised`` (unit sum,
        the cone's generators, II-E-a), ``map_singular_values``, ``patch_singular_values``,
        per-state bead counts; attrs ``pcmx_parameters`` (I, J, r, SVD route, timings,
        skipped images) and ``pcmx_skipped`` (``[{"name", "reason"}]``).

    Raises
    ------
    InputError
        Fewer than 2 usable images; a bad image without ``skip_bad`` (named, with the cause);
        a checkpoint made with other arguments or inputs; bad ``svd``/``n_modes``.
    """
    t_all = time.perf_counter()
    policy = realism_of_family(realism)
    if mode_rule not in MODE_RULES:
        raise InputError(f"mode_rule={mode_rule!r}: expected one of {', '.join(map(repr, MODE_RULES))}")
    if svd not in ("auto", "gram", "randomized"):
        raise InputError(f"svd={svd!r}: expected 'auto', 'gram' or 'randomized'")
    if not (validate == "auto" or isinstance(validate, bool)):
        raise InputError(f"validate={validate!r}: expected 'auto', True or False")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise InputError(f"folds={folds!r}: need an integer of at least 2")
    if svd == "randomized" and n_modes is None:
        raise InputError("svd='randomized' needs n_modes: the rules choosing J need every "
                         "singular value of the maps (use svd='gram' or 'auto')")
    for name, v in (("n_modes", n_modes), ("n_components", n_components), ("psf_radius", psf_radius)):
        if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
            raise InputError(f"{name}={v!r} must be a positive integer")
    if isinstance(images, xr.DataArray) and "state" in images.dims:
        labels = [str(v) for v in images["state"].values] if "state" in images.coords else None
        state_values = list(images["state"].values) if "state" in images.coords else None
        repeated = sorted(lab for lab, n in Counter(labels or []).items() if n > 1)
        if repeated:
            raise InputError(f"images: state labels must be distinct; {repeated[0]!r} labels "
                             f"{Counter(labels)[repeated[0]]} states")
        images = [images.isel(state=k) for k in range(images.sizes["state"])]
    elif isinstance(images, (str, os.PathLike)):
        raise InputError(f"images={os.fspath(images)!r}: expected a sequence of images (a list of "
                         "paths), or a DataArray with a 'state' dimension")
    else:
        images = list(images)
        labels = state_values = None
    if len(images) < 2:
        raise InputError(f"a family needs at least 2 images, got {len(images)}")
    # each input hashed once: duplicates, the checkpoint's keys and the provenance
    digests = _digests(images, keyed=checkpoint is not None)
    _refuse_duplicates(images, digests)
    labels = labels or _labels(images)
    client = active_client(client)
    workers = task_workers(workers)
    progress = show_progress(progress)
    t = {}

    # 1. cheap checks of every image before any heavy work
    t0 = time.perf_counter()
    probed, bad = {}, {}
    for k, (lab, item) in enumerate(zip(labels, images, strict=True)):
        img, why = _probe(item, lab, pixel_size)
        if why is None:
            probed[k] = img
        else:
            bad[k] = why
    shapes = Counter(tuple(im.shape) for im in probed.values())
    ref_shape = max(shapes, key=shapes.get) if shapes else None  # ties: the first image's
    for k in list(probed):
        if tuple(probed[k].shape) != ref_shape:
            bad[k] = f"shape {tuple(probed[k].shape)} differs from {ref_shape} of the other images"
            del probed[k]
    _handle_bad(bad, labels, skip_bad, len(images), "cannot be used")
    first = probed[min(probed)]
    ycoord, xcoord = first["y"], first["x"]
    py, px = axis_step(first, "y"), axis_step(first, "x")
    probed = sorted(probed)  # the indices of the images that passed
    t["checks"] = time.perf_counter() - t0

    # 2. checkpoint directory and its manifest
    arguments = {"n_components": n_components, "psf_radius": psf_radius, "pixel_size": pixel_size,
                 "background": background, "realism": policy.record(), "min_beads": MIN_BEADS,
                 "checkpoint_version": _CHECKPOINT_VERSION}
    own = checkpoint is None
    if own:
        if scratch is not None:
            os.makedirs(scratch, exist_ok=True)
        ckpt = tempfile.mkdtemp(prefix="pcmx-family-", dir=scratch)
        inputs = [{"name": lab} for lab in labels]
    else:
        ckpt = os.path.abspath(os.fspath(checkpoint))
        if os.path.exists(ckpt) and not os.path.isdir(ckpt):
            raise InputError(f"checkpoint {ckpt}: exists and is not a directory")
        inputs = [_input_record(item, lab, d) for item, lab, d in zip(images, labels, digests, strict=True)]
    fingerprint = hashlib.sha256(json.dumps(jsonable({"arguments": arguments, "inputs": inputs}),
                                            sort_keys=True).encode()).hexdigest()
    manifest = {"pcmx_checkpoint": _CHECKPOINT_VERSION, "fingerprint": fingerprint,
                "arguments": arguments, "inputs": inputs}
    try:
        if own:
            for step in ("beads", "maps"):
                os.makedirs(os.path.join(ckpt, step))
        else:
            prepare_checkpoint(ckpt, manifest, overwrite_checkpoint)
        return _state_labels(state_values, _pipeline(
                         images, labels, digests, probed, bad, ckpt, fingerprint, t, t_all,
                         n_components=n_components, n_modes=n_modes, mode_rule=mode_rule,
                         psf_radius=psf_radius,
                         pixel_size=pixel_size, background=background, realism=policy,
                         chunk=chunk, skip_bad=skip_bad, svd=svd,
                         power_iterations=power_iterations, oversamples=oversamples, seed=seed,
                         progress=progress, client=client, workers=workers,
                         coords=(ycoord, xcoord, py, px), ref_shape=ref_shape,
                         validate=validate, folds=folds, grid=first))
    finally:
        if own:
            shutil.rmtree(ckpt, ignore_errors=True)


#: ``validate="auto"``: the family's validation may cost this share of the family's own time...
VALIDATE_SHARE = 0.2
#: ... or this many seconds, whichever is more (a small family is always validated in full).
VALIDATE_MIN_S = 30.0


def _validation(validate, folds, good, labels, ckpt, summaries, r, shape, t, t_family, grid, *,
                n_components, n_modes, realism, mode_rule, seed):
    """The family's cross-validation on its checkpointed beads (``validate`` of
    :func:`learn_family`): the per-bead figures (``cv_*`` variables, the states on their own
    ``cv_state`` dim) and the record for ``pcmx_parameters["cross_validation"]``."""
    import zarr

    from .cross_validation import cross_validate_family, select_model
    from .patches import BeadPatches

    record = {"requested": validate, "folds": int(folds)}
    if validate is False:
        return None, {**record, "skipped": "not requested (validate=False)"}
    enough = [k for k in good if int(summaries[k]["n"]) >= 2 * folds]
    if validate is True:
        enough = list(good)
    # one fold repeats the family's PCA, maps and SVD on 1 - 1/folds of the beads, and fits each
    # image's own operator beside it (a PCA of its beads, its spline read at the held-out beads
    # only): about the family's per-image cost with its PCA twice (measured: 13.7 s estimated,
    # 13.1 s taken, for 3 of 12 images of 1024^2 in benchmarks/learn_family.py --quick)
    per_image = (2.0 * t["psf_basis"] + t["coefficients"] + t["svd"]) / max(len(good), 1)
    budget = max(VALIDATE_SHARE * t_family, VALIDATE_MIN_S)
    n_fit = len(enough) if validate is True else min(len(enough), int(budget / max(folds * per_image, 1e-9)))
    record.update(images=len(good), budget_s=round(budget, 2), estimate_s_per_image=round(folds * per_image, 3))
    if n_fit < 2:
        why = (f"too costly: {len(enough)} images with at least {2 * folds} beads, "
               f"~{folds * per_image:.1f} s each against a budget of {budget:.0f} s" if len(enough) >= 2
               else f"fewer than 2 images with at least {2 * folds} beads ({2} per fold)")
        warnings.warn(f"the family is not cross-validated ({why}); pass validate=True to force it",
                      PcmxWarning, stacklevel=4)
        return None, {**record, "skipped": why}
    sample = sorted({enough[i] for i in np.linspace(0, len(enough) - 1, n_fit).astype(int)})
    bps = []
    for k in sample:
        g = zarr.open_group(entry_path(ckpt, "beads", k), mode="r")
        bps.append(BeadPatches(patches=patches_from_group(g), positions=g["positions"][...], radius=r,
                               shape=tuple(shape)))
    t0 = time.perf_counter()
    try:
        cv = cross_validate_family(bps, labels=[labels[k] for k in sample], folds=folds,
                                   n_components=n_components, n_modes=n_modes, psf_radius=r,
                                   realism=realism, mode_rule=mode_rule, seed=seed, grid=grid)
    except InputError as exc:
        if validate is True:
            raise InputError(f"validate=True: {exc}") from None
        warnings.warn(f"the family is not cross-validated ({exc})", PcmxWarning, stacklevel=4)
        return None, {**record, "skipped": str(exc)}
    fam, single, inv = (cv.attrs[f"median_error_{k}"] for k in ("family", "single", "invariant"))
    paired = select_model({"space-invariant": cv["cv_error_invariant"].values,
                           "automatic": cv["cv_error_family"].values}, seed=seed)
    record.update({
        "seconds": round(time.perf_counter() - t0, 3), "validated_images": len(sample),
        "subsampled": len(sample) < len(good), "states": [labels[k] for k in sample],
        "n_beads": int(cv.sizes["bead"]), "median_error_family": fam, "median_error_single": single,
        "median_error_invariant": inv, "improvement": inv / fam if fam > 0 else float("inf"),
        # median over the held-out beads of (reference's error - family's), and its bootstrap
        # standard error: the family is better beyond the noise where it exceeds one
        "paired_gain": (paired["paired_difference"]["space-invariant"] if paired["best"] == "automatic"
                        else -paired["paired_difference"]["automatic"]),
        "standard_error": max(paired["standard_error"].values()),
        "family_better": paired["chosen"] == "automatic",
        "n_components": cv.attrs["n_components"], "n_modes": cv.attrs["n_modes"],
        "per_state": {str(s): {k: float(cv[f"median_error_{k}"].sel(state=s))
                               for k in ("family", "single", "invariant")} for s in cv["state"].values}})
    if inv < fam:
        warnings.warn(f"cross-validation finds the space-invariant reference predicts held-out beads "
                      f"better than the family (median held-out error {inv:.3f} vs {fam:.3f} for the "
                      "family)", PcmxWarning, stacklevel=4)
    out = cv.rename({"bead": "cv_bead", "state": "cv_state", "n_beads": "cv_n_beads",
                     **{f"median_error_{k}": f"cv_median_error_{k}" for k in ("family", "single", "invariant")}})
    out.attrs = {}
    return out, record


def _state_labels(values, ds: xr.Dataset) -> xr.Dataset:
    """The ``state`` coordinate with the input's own labels (ints stay ints), not their str."""
    if values is None:
        return ds
    own = {str(v): v for v in values}
    ds = ds.assign_coords(state=np.asarray([own[str(v)] for v in ds["state"].values]))
    if "cv_state" in ds.coords:  # the validated states, labelled alike
        ds = ds.assign_coords(cv_state=np.asarray([own[str(v)] for v in ds["cv_state"].values]))
    return ds


def _handle_bad(bad: dict, labels, skip_bad: bool, total: int, what: str, usable: int | None = None):
    if not bad:
        return
    causes = "; ".join(f"{labels[k]}: {why}" for k, why in sorted(bad.items()))
    if not skip_bad:
        n = len(bad)
        raise InputError(f"{n} of {total} images {what}: {causes}; pass skip_bad=True (--skip-bad) "
                         "to leave them out")
    for k, why in sorted(bad.items()):
        warnings.warn(f"{labels[k]}: skipped ({why})", PcmxWarning, stacklevel=4)
    left = total - len(bad) if usable is None else usable
    if left < 2:
        raise InputError(f"only {left} usable image(s) of {total} after skipping {causes}; a family "
                         "needs at least 2")


def _pipeline(images, labels, digests, probed, bad, ckpt, fingerprint, t, t_all, *, n_components,
              n_modes, mode_rule, psf_radius, pixel_size, background, realism, chunk, skip_bad, svd,
              power_iterations, oversamples, seed, progress, client, workers, coords, ref_shape,
              validate, folds, grid):
    import dask.array as da
    import zarr

    shape = ref_shape
    n_images = len(images)
    # 3. bead patches: r (when not given) from the pooled bead profiles of up to
    # RADIUS_IMAGES images, then every image in parallel
    t0 = time.perf_counter()
    summaries = {}
    r = psf_radius
    radius_info = None
    if r is None:
        infos = run_tasks(_radius_task, [(images[probed[i]], pixel_size) for i in radius_sample(len(probed))],
                           desc="PSF radius", progress=progress, client=client, workers=workers)
        r, radius_info = pooled_radius(infos)
    todo = list(probed)
    with progress_bar(progress and r is None, 1, "beads (radius)", "image") as bar:
        while r is None and todo:
            k = todo.pop(0)
            (s,) = run_tasks(_bead_task, [(images[k], k, labels[k], ckpt, fingerprint, None,
                                            background, pixel_size)],
                              desc="beads (radius)", progress=False, client=client, workers=1)
            summaries[k] = s
            if "error" not in s:
                r = s["radius"]
                bar.update(1)
    args = [(images[k], k, labels[k], ckpt, fingerprint, r, background, pixel_size) for k in todo]
    for s in run_tasks(_bead_task, args, desc="beads", progress=progress, client=client,
                        workers=workers):
        summaries[s["k"]] = s
    heavy_bad = {k: s["error"] for k, s in summaries.items() if "error" in s}
    bad.update(heavy_bad)
    good = [k for k in probed if k not in heavy_bad]
    _handle_bad(heavy_bad, labels, skip_bad, n_images, "have no usable beads",
                usable=len(good))
    resumed = {"beads": sum(bool(summaries[k].get("resumed")) for k in good)}
    t["beads"] = time.perf_counter() - t0

    # 4. shared PSF basis over the patches of all usable images (in image order)
    t0 = time.perf_counter()
    with progress_bar(progress, 1, "PSF basis", "step") as bar:
        basis_fp = hashlib.sha256(f"{fingerprint}:{good}:{n_components}".encode()).hexdigest()
        bpath = os.path.join(ckpt, "basis.zarr")
        g = open_entry(bpath, basis_fp)
        if g is None:
            patches, positions, owner = [], [], []
            for k in good:
                e = zarr.open_group(entry_path(ckpt, "beads", k), mode="r")
                patches.append(patches_from_group(e))
                positions.append(e["positions"][...])
                owner.append(np.full(len(positions[-1]), k))
            # as bead_patches made them: coordinates (bead_y, bead_x, ky, kx) and attrs travel
            patches = xr.concat(patches, dim="bead")
            positions = np.concatenate(positions)
            owner = np.concatenate(owner)
            basis = fit_psf_basis(patches, n_components, r=r)
            kept = np.asarray(basis["kept"].values, dtype=bool)
            h = np.asarray(basis["psf_basis"].values, dtype=np.float32)
            beta = np.asarray(basis["beta"].values, dtype=np.float64)
            psv = np.asarray(basis["singular_values"].values)
            generators = (realism.setup(beta, h)["generators"] if realism.kind == "cone"
                          else np.zeros((0, h.shape[0])))
            write_entry(bpath, {"psf_basis": h, "beta": beta, "positions": positions[kept],
                                "owner": owner[kept], "singular_values": psv,
                                "generators": np.asarray(generators, dtype=np.float64)},
                        {"fingerprint": basis_fp, "n_patches": int(len(kept))})
            resumed["basis"] = False
        else:
            resumed["basis"] = True
        g = zarr.open_group(bpath, mode="r")
        h = g["psf_basis"][...]
        beta = g["beta"][...]
        positions = g["positions"][...]
        owner = g["owner"][...]
        psv = g["singular_values"][...]
        setup = ({"generators": g["generators"][...], "project": None} if realism.kind == "cone"
                 else realism.setup(beta, h))
        n_patches = int(g.attrs["n_patches"])
        bar.update(1)
    n_i = h.shape[0]
    counts = np.bincount(owner, minlength=n_images)
    few = {k: f"only {int(counts[k])} beads left after the z-score test; at least {MIN_BEADS} "
              "are needed for the coefficient maps" for k in good if counts[k] < MIN_BEADS}
    bad.update(few)
    good = [k for k in good if k not in few]
    _handle_bad(few, labels, skip_bad, n_images, "have too few usable beads", usable=len(good))
    t["psf_basis"] = time.perf_counter() - t0

    # 5. coefficient maps, one task per image, written chunked to the checkpoint
    t0 = time.perf_counter()
    n_rows = len(good) * n_i
    c = int(chunk) if chunk else _svd_chunk(n_rows, shape)
    maps_fp = hashlib.sha256(f"{basis_fp}:{c}".encode()).hexdigest()
    args = [(k, ckpt, maps_fp, positions[owner == k], beta[owner == k], shape, setup, c)
            for k in good]
    ms = run_tasks(_maps_task, args, desc="maps", progress=progress, client=client, workers=workers)
    resumed["maps"] = sum(bool(s.get("resumed")) for s in ms)
    # beads left out of each image's spline as gross outliers (coefficient_maps' outlier_z)
    map_outliers = {labels[s["k"]]: s["rejected"] for s in ms if s.get("rejected")}
    t["coefficients"] = time.perf_counter() - t0

    # 6. SVD of the K*I maps, streamed block by block
    t0 = time.perf_counter()
    maps = da.concatenate([da.from_zarr(entry_path(ckpt, "maps", k), component="maps") for k in good],
                          axis=0)
    route = svd if svd != "auto" else ("gram" if n_modes is None or n_rows <= GRAM_MAX_ROWS else "randomized")
    if n_modes is not None and n_modes > n_rows:
        raise InputError(f"n_modes={n_modes} exceeds K*I = {n_rows}")
    if route == "gram":
        modes, gamma, sv = _svd_gram(maps, shape, c, n_modes, progress=progress, client=client,
                                     mode_rule=mode_rule)
    else:
        modes, gamma, sv = _svd_randomized(maps, shape, c, n_modes, power_iterations=power_iterations,
                                           oversamples=oversamples, seed=seed, progress=progress,
                                           client=client)
    j = modes.shape[0]
    gamma = gamma.reshape(len(good), n_i, j).astype(np.float32)
    modes = modes.astype(np.float32, copy=False)
    _fix_signs(modes, gamma)
    sums = gamma.sum(axis=(1, 2), keepdims=True)
    gamma_norm = gamma / np.where(np.abs(sums) > 0, sums, 1.0)
    t["svd"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cv, cv_record = _validation(validate, folds, good, labels, ckpt, summaries, r, shape, t,
                                time.perf_counter() - t_all, grid, n_components=n_components,
                                n_modes=n_modes, realism=realism, mode_rule=mode_rule, seed=seed)
    if cv_record.get("seconds") is not None:
        t["validation"] = time.perf_counter() - t0
    t["total"] = time.perf_counter() - t_all

    ycoord, xcoord, py, px = coords
    skipped = [{"name": labels[k], "reason": why} for k, why in sorted(bad.items())]
    ds = xr.Dataset(
        {
            "psf_basis": (("component", "ky", "kx"), h.astype(np.float32)),
            "spatial_basis": (("mode", "y", "x"), modes),
            "gamma": (("state", "component", "mode"), gamma),
            "gamma_normalised": (("state", "component", "mode"), gamma_norm.astype(np.float32)),
            "map_singular_values": ("map_rank", np.asarray(sv, dtype=np.float64)),
            "patch_singular_values": ("patch_rank", psv),
            "beads_used": ("state", counts[good]),
        },
        coords={"state": [labels[k] for k in good], "component": np.arange(n_i),
                "mode": np.arange(j), "y": ycoord, "x": xcoord,
                **kernel_coords(h.shape[1:], None if px is None else (py, px))},
    )
    params = {"n_components": int(n_i), "n_modes": int(j),
              "mode_rule": None if n_modes is not None else mode_rule, "psf_radius": int(r),
              "psf_radius_estimate": radius_info, "map_outliers": map_outliers,
              "realism": realism.record(), "background": background or "default", "svd": route,
              "svd_chunk": c, "n_patches": n_patches, "n_images": n_images,
              "skipped": skipped, "resumed": resumed,
              "scheduler": "distributed" if client is not None else f"threads ({workers})",
              "timings_s": {k: round(v, 4) for k, v in t.items()}}
    if route == "randomized":
        params.update(power_iterations=power_iterations, oversamples=oversamples, seed=seed)
    params["cross_validation"] = cv_record
    if cv is not None:
        ds = ds.merge(cv)
    # the digests the run was keyed by (hashed once, before any work), not a second reading
    inputs = [(labels[k], digests[k]) for k in good if isinstance(images[k], (str, os.PathLike))]
    ds.attrs = {"pcmx_type": "family", **provenance(params, inputs), "pcmx_skipped": skipped}
    return ds

