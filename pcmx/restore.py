"""One restoration entry point, 2D and 3D, in memory or tile by tile (issue 15, items 1 and 2).

:func:`restore` runs one of the deconvolution methods of :mod:`pcmx.deblur` with a
space-varying operator ``H u = sum_i h_i * (alpha_i . u)`` (:class:`pcmx.ProductConvolution`),
either on the whole image (``chunks=None`` with a NumPy or CuPy image) or on tiles grown by a
halo, each restored with the operator restricted to its window (the coefficient maps cropped,
the PSF basis shared), then cropped and stitched by Dask: on threads (the default), on a local
cluster of processes or on a ``dask.distributed`` scheduler (the active Client).

Halo rule, 2D (measured, Richardson-Lucy, boundary "reflect", the true operator of a 96 x 128
simulated scene, 15 x 15 kernels (radius ``r = 7``), tiles of 37 and 50 px, the larger of the
two): the largest relative difference ``max |u_tiled - u| / max |u|`` between the tiled and
the in-memory result, for halos of 1, 2, 3, 4 and 6 ``r``, is 1.5e-3, 1.3e-4, 7.9e-6,
1.1e-6, 1.7e-6 after 10 iterations; 7.0e-3, 1.2e-3, 1.0e-4, 6.1e-6, 5.3e-6 after 50;
1.6e-2, 1.4e-3, 3.1e-4, 9.1e-6, 9.5e-6 after 100 (the floor, about 1e-5, is float32
rounding); after 300 iterations 4.5e-1 with no halo, 4.3e-4, 3.6e-5, 1.8e-5 with 3, 4, 5
``r``. The default halo ``ceil(r (3 + log10 I))`` (at most ``8 r``) keeps rl and rl-tv
within :data:`TILED_TOLERANCE` = 2e-4: rl 1.1e-6, 3.3e-6, 7.2e-6 and 2.2e-5 after 10, 50,
100 and 300 iterations; rl-tv 1.4e-4 and 1.2e-4 (50 iterations, 37 and 50 px tiles: the TV
term amplifies float32 rounding, as between two orderings of the same in-memory update).
Tikhonov, FISTA-Haar and Sparse+Smooth, tiled, differ by 4.9e-2, 1.1e-1 and 9.8e-3
(30 iterations): per-tile defaults and stopping rules.

Halo rule, 3D (measured, rl, boundary "reflect", the simulator's true operator of a
24 x 96 x 96 bead stack (0.3 um planes, 0.1 um pixels, NA 1.2), 5 components of
7 x 15 x 15 kernels, ``(rz, ry, rx) = (3, 7, 7)``, tiles of 11 x 37 x 37 voxels): the halo is
taken per axis from that axis' radius, ``h_a = ceil(k r_a)``. For ``k`` = 1, 2, 3 and 4 the
difference is 1.7e-2, 1.9e-3, 5.7e-4, 7.7e-6 after 10 iterations; 3.7e-2, 7.3e-3, 2.4e-3,
4.0e-5 after 50; 3.8e-2, 1.4e-2, 4.9e-3, 8.3e-5 after 100. The 2D rule applied axis by axis
(:func:`default_halo` of ``(rz, ry, rx)``: ``k = 3 + log10 I``) gives 7.7e-6, 5.2e-6 and
6.9e-6 after 10, 50 and 100 iterations, and rl-tv 5.9e-6 and 4.6e-6 (50 iterations, tiles of
11 x 37 x 37 and 9 x 41 x 29): within :data:`TILED_TOLERANCE`. Every tile starts from the
whole image's constant (``flux(y - b) / flux(H^T 1)``, as the in-memory run): with its own,
the difference was 2.2e-4 after 10 iterations (the start is not forgotten when ``b > 0``).

Memory per tile (per Dask thread), with ``V`` the voxels of a tile grown by its halo
(clipped to the image), ``V_e`` those of that window grown by the kernel radius ``r`` (the
mirror padding of the boundary), ``P`` those of the FFT buffer (``next_fast_len(w_a + 2 r_a)``
per axis) and ``I`` the components, all float32 (4 bytes)::

    bytes = 4 (k_m V + I V_e + 5 P + 2 I P)

``k_m`` counts the arrays the method keeps, of the window's size: for rl, the input window,
``max(y, 0)``, ``H^T 1``, ``u``, ``H u`` (overwritten by the ratio), ``H^T ratio`` and the
mirror-padded ``u`` of the operator: ``k_rl = 7``; rl-tv adds the ``ndim`` gradients, their
norm and the divergence (``k = 9 + ndim``). ``I V_e``: the maps mirrored beyond the window
(the maps themselves are views of the operator's); ``5 P``: the FFT buffers of one
application (real buffer, a component's spectrum, the accumulator, the inverse's
intermediates); ``2 I P``: the forward and conjugate kernel spectra (``I`` half-spectra of
``P / 2`` complex64 each), cached per worker and shared by the tiles of one shape
(:data:`pcmx.execution.spectrum_cache`). Checked with ``tracemalloc`` (the peak of one tile
over the allocations before it, NumPy arrays; FFT scratch is not traced): rl 0.92-0.93 of
the formula for 2D windows of 126 x 126 and 166 x 186 px (3 components of 15 x 15), 0.96 for
3D windows of 24 x 90 x 90 and 24 x 96 x 96 voxels (5 of 7 x 15 x 15); rl-tv 0.86-0.90.
:func:`restore_memory` computes it; :func:`auto_chunks` picks the largest tile edge that fits
a budget. A worker running ``T`` threads holds ``T`` tiles, plus the operator once (its maps:
``4 I N`` bytes for an image of ``N`` voxels). An operator whose maps are lazy (opened from a
store) is sent without them: each tile receives its window of the maps instead (``I V``
more per tile, nothing per worker).
"""

from __future__ import annotations

import math
import os

import numpy as np
import xarray as xr

from . import _backend
from .errors import InputError

__all__ = ["restore", "default_halo", "restore_memory", "auto_chunks",
           "local_operator", "METHODS", "METHODS_3D", "DEFAULT_ITERATIONS", "TILED_TOLERANCE",
           "WORKER_OVERHEAD"]

METHODS = ("rl", "rl-tv", "tikhonov", "fista-haar", "sparse-smooth")
#: The methods that restore 3D (z, y, x) stacks (the others are 2D: pcmx.deblur's functions).
METHODS_3D = ("rl", "rl-tv")
#: What a tile's process really grows by over :func:`restore_memory`'s count: measured 1.6x in a
#: dask.distributed worker restoring a 64 x 2304 x 2304 stack (710 MiB above the worker's idle
#: 154 MiB against 450 MiB counted: the allocator, the input and output blocks Dask holds, FFT
#: scratch; benchmarks/restore.py). :func:`auto_chunks` sizes tiles with it.
WORKER_OVERHEAD = 1.6
#: Iterations when ``iterations=None``: each method's own default (Sparse+Smooth's is a maximum:
#: crowded scenes need 180-230 FISTA iterations to separate close pairs, docs/deblurring.md).
DEFAULT_ITERATIONS = {"rl": 50, "rl-tv": 50, "tikhonov": 200, "fista-haar": 100, "sparse-smooth": 300}
# max |tiled - in memory| / max |in memory| that the default halo achieves for "rl" and "rl-tv"
# (measured at most 2.2e-5 for rl, 10-300 iterations, 2D and 3D, and 1.4e-4 for rl-tv; module
# docstring)
TILED_TOLERANCE = 2e-4
# arrays of the window's size a tile of each method keeps (module docstring, measured for rl)
_ARRAYS = {"rl": 7, "rl-tv": 9}
_DIMS = {2: ("y", "x"), 3: ("z", "y", "x")}


def default_halo(radius, iterations: int):
    """The default halo (pixels) of a tiled restoration: ``ceil(r (3 + log10 I))``, at most
    ``8 r`` (``r`` the kernel radius, ``I`` the iterations).

    Each Richardson-Lucy iteration lets information travel ``r`` further, but its weight
    decays fast: the tiled-versus-in-memory difference falls about 10 times per extra ``r``
    of halo and grows slowly with the iterations (measured, module docstring).

    Parameters
    ----------
    radius : int or tuple of int
        The kernel radius, or one per axis (``(rz, ry, rx)``): then one halo per axis, 0
        along an axis where the kernels are one pixel wide.
    iterations : int

    Returns
    -------
    int or tuple of int
    """
    if isinstance(radius, (tuple, list)):
        return tuple(0 if int(r) == 0 else default_halo(int(r), iterations) for r in radius)
    r = max(int(radius), 1)
    i = max(int(iterations), 1)
    return int(min(math.ceil(r * (3 + math.log10(i))), 8 * r))


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------
def _is_count(v, minimum: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= minimum


def _check_iterations(iterations) -> int:
    if not _is_count(iterations, 1):
        raise InputError(f"iterations={iterations!r} must be a positive integer")
    return int(iterations)


def _per_axis(value, name: str, ndim: int, minimum: int, what: str, alternatives: str = ""
              ) -> tuple[int, ...]:
    """An int for every axis or a tuple with one per axis, checked."""
    if _is_count(value, minimum):
        return (int(value),) * ndim
    if isinstance(value, (tuple, list)):
        if len(value) != ndim:
            raise InputError(f"{name}={value!r}: expected {ndim} values, one per axis {_DIMS[ndim]}, "
                             f"got {len(value)}")
        if all(_is_count(v, minimum) for v in value):
            return tuple(int(v) for v in value)
    kind = "positive" if minimum > 0 else "non-negative"
    raise InputError(f"{name}={value!r} must be a {kind} integer or a tuple of {ndim} {kind} "
                     f"integers ({what}){alternatives}")


def _check_chunks(chunks, ndim: int):
    if chunks is None or (isinstance(chunks, str) and chunks == "auto"):
        return chunks
    return _per_axis(chunks, "chunks", ndim, 1, "the tile edge per axis, in pixels", ", 'auto' or None")


def _engine(operator, boundary: str):
    from .operator import ProductConvolution

    if isinstance(operator, ProductConvolution):
        return operator
    if isinstance(operator, (xr.Dataset, str, os.PathLike)):
        return ProductConvolution(operator, boundary=boundary)
    raise InputError("operator: expected a ProductConvolution, an operator Dataset or store path; "
                     f"got {type(operator).__name__}")


# --------------------------------------------------------------------------------------------
# The methods on one in-memory image
# --------------------------------------------------------------------------------------------
def _run(method: str, image, op, iterations: int, kw: dict):
    """The method on one (in-memory) image with the operator ``op``; a float32 array."""
    if method in ("rl", "rl-tv"):
        kw = dict(kw)
        lam = kw.pop("lam", 0.002) if method == "rl-tv" else 0.0
        if method == "rl" and kw.pop("lam", 0.0):
            raise InputError("lam: method 'rl' has no TV weight; use method='rl-tv'")
        unknown = sorted(set(kw) - {"offset", "eps", "start"})
        if unknown:
            raise InputError(f"method={method!r}: unknown argument(s) {', '.join(unknown)} "
                             "(it takes lam (rl-tv), offset, eps)")
        from .deblur.baselines import richardson_lucy_tv

        return _backend.unwrap(richardson_lucy_tv(image, op, n_iter=iterations, lam=lam, **kw))
    from .deblur.baselines import fista_haar, tikhonov
    from .deblur.sparse_smooth import sparse_smooth

    if method == "tikhonov":
        out = tikhonov(image, op, max_iter=iterations, **kw)
    elif method == "fista-haar":
        out = fista_haar(image, op, n_iter=iterations, **kw)
    else:
        out = sparse_smooth(image, op, max_iter=iterations, **kw)["restored"].data
    return _backend.unwrap(out)


def _global_parameters(method: str, y, op, kw: dict) -> dict:
    """Data-dependent defaults computed once on the whole image, so every tile uses the
    values of the in-memory run: the offset (all but sparse-smooth, which estimates it
    jointly) and, for rl and rl-tv, the constant start ``flux(y - b) / flux(H^T 1)`` (a
    tile's own would differ: measured 4.4e-4 tiled-versus-whole after 20 iterations in 3D,
    2.5e-6 with the whole image's) and the TV smoothing ``eps``. A Dask image is reduced
    lazily (one pass for the flux, two for ``H^T 1``, the offset's local means block by
    block)."""
    from .deblur.baselines import estimate_offset

    kw = dict(kw)
    if method == "sparse-smooth":
        return kw
    lazy = _backend.is_dask(y)
    if kw.get("offset") is None:
        kw["offset"] = estimate_offset(y)  # a Dask image block by block, never whole
    if method not in ("rl", "rl-tv"):
        return kw
    need_eps = method == "rl-tv" and kw.get("eps") is None
    if not need_eps and kw.get("start") is not None:
        return kw
    import dask.array as da

    mod = da if lazy else _backend.xp(y)

    def value(x):
        return float(x.compute() if lazy else x)

    flux = max(value(mod.sum(mod.maximum(y - np.float32(float(kw["offset"])), 0), dtype=np.float64)), 1e-12)
    if need_eps:
        kw["eps"] = 1e-3 * flux / y.size
    if kw.get("start") is None:
        ht1 = _adjoint_of_ones(y, op) if lazy else op.adjoint(mod.ones_like(y))
        floor = np.float32(1e-3) * value(ht1.max())
        kw["start"] = flux / value(mod.sum(mod.maximum(ht1, floor), dtype=np.float64))
    return kw


def _adjoint_of_ones(y, op):
    """``H^T 1`` lazily, tile by tile on ``y``'s chunks: each tile is the adjoint of its
    window (grown by the kernel radius, so exact: ``1`` is its own mirror image) with the
    operator's maps cropped to it; a graph of one task per chunk (the operator's own Dask
    adjoint of a 3D reflect operator has thousands)."""
    import dask.array as da

    # the blocks only give their library (CuPy chunks give CuPy tiles) and the window
    x = y if _backend.is_cupy(y) else da.zeros(y.shape, dtype=np.float32, chunks=y.chunks)
    depth = tuple(r if len(c) > 1 else 0 for r, c in zip(op.radius, x.chunks, strict=True))
    return _map_tiles(_ones_window, x, depth, op, name="pcmx-restore-ht1")


def _ones_window(block, local, location, window):
    xp = _backend.xp(block)
    ht1 = local.adjoint(xp.ones(block.shape, np.float32))
    return ht1[_crop(location, window)]


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def _halos(op, iterations: int, halo) -> tuple[int, ...]:
    if halo is None:
        return default_halo(tuple(op.radius), iterations)
    return _per_axis(halo, "halo", op.ndim, 0, "pixels added on each side of a tile, per axis", " or None")


def restore_memory(shape_or_chunks, operator, method: str = "rl", *, iterations: int = 50,
                   halo=None, boundary: str = "reflect") -> int:
    """Bytes one tile of a restoration needs (module docstring: the formula).

    ``4 (k_m V + I V_e + 5 P + 2 I P)`` with ``V`` the voxels of the tile grown by its halo
    (clipped to the image), ``V_e`` those of that window grown by the kernel radius, ``P``
    those of the FFT buffer and ``k_m`` the arrays the method keeps (rl 7, rl-tv
    ``9 + ndim``; the other methods are counted as rl-tv).

    Parameters
    ----------
    shape_or_chunks : int or tuple of int
        The tile edge per axis (an int: the same along every axis; clipped to the
        operator's grid); the image's shape gives the in-memory run (no halo).
    operator : ProductConvolution, operator Dataset or store path
    method : str
        One of :data:`METHODS`.
    iterations : int
        For the default halo (:func:`default_halo`).
    halo : int or tuple of int, optional
        Instead of the default.

    Returns
    -------
    int
        Bytes, per tile (a worker holds one per thread) plus the kernel spectra it caches.
    """
    from scipy.fft import next_fast_len

    if method not in METHODS:
        raise InputError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    op = _engine(operator, boundary)
    tile = _per_axis(shape_or_chunks, "shape_or_chunks", op.ndim, 1, "the tile edge per axis")
    h = _halos(op, _check_iterations(iterations), halo)
    window = [min(t, n) + (0 if t >= n else 2 * hh) for t, n, hh in zip(tile, op.shape, h, strict=True)]
    window = [min(w, n) for w, n in zip(window, op.shape, strict=True)]
    r = op.radius
    v = math.prod(window)
    v_e = math.prod(w + 2 * rr for w, rr in zip(window, r, strict=True))
    p = math.prod(next_fast_len(w + 2 * rr, real=ax == op.ndim - 1)
                  for ax, (w, rr) in enumerate(zip(window, r, strict=True)))
    k = _ARRAYS["rl"] if method == "rl" else _ARRAYS["rl-tv"] + op.ndim
    i = op.n_components
    return int(4 * (k * v + i * v_e + 5 * p + 2 * i * p))


def auto_chunks(shape, operator, method: str = "rl", memory_limit: int = 2**30, *,
                iterations: int = 50, halo=None, boundary: str = "reflect") -> tuple[int, ...]:
    """The largest tile edge (the same along every axis, clipped to the image) whose tile
    fits ``memory_limit`` bytes (:func:`restore_memory`).

    Parameters
    ----------
    shape : tuple of int
        The image's shape (the operator's grid).
    operator, method, iterations, halo, boundary
        As for :func:`restore_memory`.
    memory_limit : int
        Bytes for one tile: a worker's memory limit divided by its threads, less the
        operator's maps (``4 I N``) and a margin. A tile fits when :data:`WORKER_OVERHEAD`
        times :func:`restore_memory` does.

    Returns
    -------
    tuple of int
        Tile edges per axis: the whole image when it fits.

    Raises
    ------
    InputError
        Not even the smallest tile (twice the halo, or 16 px) fits the budget.
    """
    op = _engine(operator, boundary)
    shape = tuple(int(n) for n in shape)
    if shape != tuple(op.shape):
        raise InputError(f"shape {shape} does not match the operator's grid {tuple(op.shape)}")
    if not _is_count(memory_limit, 1):
        raise InputError(f"memory_limit={memory_limit!r} must be a positive integer (bytes)")
    h = _halos(op, _check_iterations(iterations), halo)

    def fits(t):
        return WORKER_OVERHEAD * restore_memory(tuple(min(t, n) for n in shape), op, method,
                                                iterations=iterations, halo=h) <= memory_limit

    lo = max(16, 2 * max(h))
    if fits(max(shape)):
        return shape
    if not fits(lo):
        need = int(WORKER_OVERHEAD * restore_memory(tuple(min(lo, n) for n in shape), op, method,
                                                    iterations=iterations, halo=h))
        raise InputError(f"memory_limit={memory_limit}: the smallest tile ({lo} px, halo {h}) "
                         f"needs {need} bytes")
    hi = max(shape)
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return tuple(min(lo, n) for n in shape)


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------
def restore(image, operator, *, method: str = "rl", iterations: int | None = None, chunks=None,
            halo=None, boundary: str = "reflect", progress: bool | None = None,
            memory_limit: int = 2**30, client=None, **method_kwargs):
    """Restore a 2D image or a 3D stack with a space-varying operator, in memory or by tiles.

    Parameters
    ----------
    image : array ([z,] y, x), DataArray or Dask array
        NumPy, CuPy or Dask (of NumPy or CuPy chunks; a DataArray of any). Its dimension is
        the operator's: a 3D operator (``kz``, ``z``) restores z-stacks.
    operator : ProductConvolution, operator Dataset or store path
        ``H`` on the image's grid (a Dataset or path is applied with ``boundary``).
    method : {"rl", "rl-tv", "tikhonov", "fista-haar", "sparse-smooth"}
        Richardson-Lucy (:func:`pcmx.deblur.richardson_lucy_tv` with ``lam=0``), with TV (``lam`` default 0.002), Tikhonov
        (:func:`pcmx.deblur.tikhonov`), FISTA with a Haar penalty
        (:func:`pcmx.deblur.fista_haar`), Sparse+Smooth (:func:`pcmx.deblur.sparse_smooth`,
        its ``restored`` variable). 3D: :data:`METHODS_3D` (the others take (y, x) images).
    iterations : int, optional
        ``n_iter`` of rl, rl-tv and fista-haar; ``max_iter`` of tikhonov and sparse-smooth;
        default the method's own (:data:`DEFAULT_ITERATIONS`: 50, 50, 200, 100, 300).
    chunks : int, tuple of int, "auto" or None
        Tile edge in pixels: an int for every axis, or one per axis. ``"auto"``: the largest
        tile fitting ``memory_limit`` (:func:`auto_chunks`). None: a NumPy or CuPy image is
        restored whole in memory, a Dask image tile by tile along its own chunks (those of
        its Zarr store, say).
    halo : int or tuple of int, optional
        Pixels added on each side of a tile (clipped at the image's edge, so edge tiles see
        the same boundary as the in-memory run), one for every axis or one per axis; default
        :func:`default_halo` of each axis' kernel radius and ``iterations``. Tiles are widened
        to at least the halo.
    boundary : {"reflect", "zero"}
        Boundary of an operator built from a Dataset or path (a ProductConvolution keeps
        its own).
    progress : bool, optional
        A progress bar over the tiles while they are computed here (NumPy and CuPy images;
        a Dask image gives a lazy result, computed later). None: the option ``progress``
        (:func:`pcmx.set_options`).
    memory_limit : int
        Bytes per tile for ``chunks="auto"``.
    client : distributed.Client or False, optional
        Where the tiles of a NumPy or CuPy image are computed: None, the active Client if
        there is one (:func:`pcmx.execution.active_client`), else Dask's scheduler (threads);
        False: Dask's scheduler. A lazy result is computed wherever its ``compute`` runs.
    **method_kwargs
        Passed to the method (``lam``, ``offset``, ``eps``, ``gamma1``, ...).

    Returns
    -------
    Same kind as ``image``, float32 ``([z,] y, x)``
        A Dask image gives a lazy Dask array (tiles computed when it is), a DataArray a
        DataArray with its dims, coords and attrs.

    Raises
    ------
    InputError
        An unknown method, bad ``iterations``, ``chunks`` or ``halo``, an image that is not
        on the operator's grid, a 3D image with a 2D-only method, a tiled run with a
        periodic operator, and the errors of the method.

    Notes
    -----
    Tiles run on the active ``dask.distributed`` Client if there is one
    (:func:`pcmx.execution.active_client`), else on Dask's scheduler (threads). The operator
    is one key of the task graph that every tile depends on: it travels to each worker once,
    and each worker caches the kernel spectra once per tile shape. An operator whose maps
    are lazy (a store opened with Dask) carries only its kernels and the maps' graph: each
    tile reads its window of the maps where it runs. The offset (and the TV
    smoothing ``eps`` of rl-tv) are estimated once on the whole image
    (:func:`pcmx.deblur.estimate_offset`: a Dask image is computed once for it; give
    ``offset=`` to avoid that pass) and given to every tile. With the default halo, rl and
    rl-tv agree with the in-memory run to :data:`TILED_TOLERANCE` (relative to the maximum
    of the result), in 2D and 3D. The other methods keep their own per-tile defaults (noise
    level, step, weights, the Haar transform of the tile, CG and FISTA stopping rules): their
    tiled result is an approximation whose error is not stated.
    """
    if method not in METHODS:
        raise InputError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    if iterations is None:
        iterations = DEFAULT_ITERATIONS[method]
    iterations = _check_iterations(iterations)
    op = _engine(operator, boundary)
    template = image if isinstance(image, xr.DataArray) else None
    data = image.data if template is not None else image
    if not hasattr(data, "shape") or not hasattr(data, "dtype"):
        data = np.asarray(data)
    if data.ndim != op.ndim:
        raise InputError(f"image: expected a {op.ndim}D image {op.dims} for the operator's grid "
                         f"{tuple(op.shape)}, got shape {tuple(data.shape)}")
    if tuple(data.shape) != tuple(op.shape):
        raise InputError(f"image: shape {tuple(data.shape)} does not match the operator's grid {tuple(op.shape)}")
    if data.dtype.kind not in "fiu":
        raise InputError(f"image: dtype {data.dtype} is not a real number type")
    if op.ndim == 3 and method not in METHODS_3D:
        raise InputError(f"method={method!r} restores 2D (y, x) images only; 3D (z, y, x) stacks: "
                         f"{' or '.join(METHODS_3D)}")
    tile = _check_chunks(chunks, op.ndim)
    h = None if halo is None else _halos(op, iterations, halo)
    lazy = _backend.is_dask(data)
    if tile is None and not lazy:
        xp = _backend.xp(data)
        out = _run(method, xp.asarray(data, dtype=np.float32), op, iterations, method_kwargs)
    else:
        if op.boundary == "periodic":
            raise InputError("chunks: a tiled restoration needs boundary 'reflect' or 'zero', "
                             "not 'periodic' (a tile cannot wrap around the field)")
        if h is None:
            h = _halos(op, iterations, None)
        if tile == "auto":
            tile = auto_chunks(op.shape, op, method, memory_limit, iterations=iterations, halo=h)
        out = _tiled(method, data, op, iterations, tile, h, method_kwargs, lazy)
        if not lazy:
            out = _compute(out, progress, client, method)
    if template is None:
        return out
    return xr.DataArray(out, dims=template.dims, coords=template.coords, name=method,
                        attrs={**template.attrs, "method": method, "iterations": iterations})


def _operator_key(op):
    """The operator as one key of the graph (``dask.delayed(op, pure=True)``): every tile
    depends on it, so it is sent to each worker once, not pickled into every task."""
    import dask

    return dask.delayed(op, pure=True)


def _tiled(method, data, op, iterations, tile, halo, kw, lazy):
    import dask.array as da
    from dask.array.overlap import ensure_minimum_chunksize

    xp = _backend.xp(data)
    if lazy:
        y = data if data.dtype == np.float32 else data.astype(np.float32)
    else:
        y = xp.ascontiguousarray(xp.asarray(data, dtype=np.float32))
    if method != "sparse-smooth":
        kw = _global_parameters(method, y, op, kw)
    if lazy:
        x = y if tile is None else y.rechunk(tile)
    else:
        x = da.from_array(y, chunks=tile, meta=xp.empty((0,) * y.ndim, np.float32))
    # every chunk at least as wide as the halo it lends its neighbours and the kernel radius
    # (a mirror boundary needs a window of at least r pixels)
    # (an axis shorter than that becomes one chunk: its windows span it whole, no halo needed)
    x = x.rechunk(tuple(ensure_minimum_chunksize(min(max(hh, rr, 1), sum(c)), c)
                        for hh, rr, c in zip(halo, op.radius, x.chunks, strict=True)))
    depth = tuple(hh if len(c) > 1 else 0 for hh, c in zip(halo, x.chunks, strict=True))
    return _map_tiles(_restore_window, x, depth, op, name=f"pcmx-restore-{method}", method=method,
                      iterations=iterations, kw=kw)


def _map_tiles(fn, x, depth, op, *, name, **kwargs):
    """``fn(window block, local operator, location, window, **kwargs)`` over the chunks of
    ``x`` grown by ``depth`` (clipped at the image's edge), lazily.

    The operator is one key of the graph. Its maps, when they are in memory, travel with
    it and are cropped to each window; lazy maps (a Dask array) are cut into the same
    windows by the graph (no computation inside a task).
    """
    import dask.array as da
    from dask.array.overlap import overlap
    from dask.base import tokenize

    ndim = x.ndim
    bounds = dict.fromkeys(range(ndim + 1), "none")

    def grow(a, extra=()):
        d = dict(enumerate((*depth, *extra)))
        return overlap(a, depth=d, boundary=bounds) if any(depth) else a

    meta = _backend.xp(x).empty((0,) * ndim, np.float32)
    name = f"{name}-{tokenize(x.name, x.chunks, op, depth, fn.__name__, kwargs)}"
    maps = op._alpha_src
    if not _backend.is_dask(maps):
        return da.map_blocks(_tile, grow(x), _operator_key(op), chunks=x.chunks, dtype=np.float32,
                             meta=meta, name=name, fn=fn, depth=depth, kwargs=kwargs)
    maps = da.moveaxis(maps, 0, -1).rechunk((*x.chunks, (op.n_components,)))
    return da.map_blocks(_tile_lazy_maps, grow(x[..., None], (0,)), grow(maps, (0,)), _operator_key(op),
                         chunks=x.chunks, drop_axis=ndim, dtype=np.float32, meta=meta, name=name,
                         fn=fn, depth=depth, kwargs=kwargs)


def _window(location, depth, shape):
    return tuple(slice(max(a - d, 0), min(b + d, n))
                 for (a, b), d, n in zip(location, depth, shape, strict=True))


def _crop(location, window):
    """The tile ``location`` within the array of ``window``."""
    return tuple(slice(a - w.start, b - w.start) for (a, b), w in zip(location, window, strict=True))


def _tile(block, engine, *, fn, depth, kwargs, block_info=None):
    """One tile, the maps cropped from the operator's (in memory)."""
    location = block_info[None]["array-location"]
    window = _window(location, depth, engine.shape)
    return fn(block, local_operator(engine, window), location, window, **kwargs)


def _tile_lazy_maps(block, maps, engine, *, fn, depth, kwargs, block_info=None):
    """One tile, its window of the maps given by the graph (``maps``: component last)."""
    from .operator import ProductConvolution

    location = block_info[None]["array-location"]
    window = _window(location, depth, engine.shape)
    kernel_dims = ("component", *("kz", "ky", "kx")[3 - engine.ndim:])
    ds = xr.Dataset({"psf_basis": (kernel_dims, engine._h),
                     "coefficients": (("component", *engine.dims), _backend.xp(maps).moveaxis(maps, -1, 0))},
                    attrs={"pcmx_type": "operator"})
    local = ProductConvolution(ds, boundary=engine.boundary, dtype=engine.dtype, workers=1,
                               check_finite=False)
    return fn(block[..., 0], local, location, window, **kwargs)


def _restore_window(block, local, location, window, *, method, iterations, kw):
    """One tile: the window ``block`` (the tile grown by the halo, clipped at the image's
    edge) restored with the operator restricted to it; the tile cut out."""
    return _run(method, block, local, iterations, kw)[_crop(location, window)]


def _compute(arr, progress, client, method):
    """Compute a tiled restoration: on ``client`` (None: the active one, False: none), else
    Dask's scheduler; one progress tick per tile (:func:`pcmx.execution.progress_bar`)."""
    from .execution import active_client, progress_bar

    tiles = set(_flat_keys(arr.__dask_keys__()))
    client = None if client is False else active_client(client)
    with progress_bar(progress, len(tiles), f"restore ({method})", "tile") as bar:
        if client is not None:
            from distributed import as_completed, futures_of

            _bound_worker_caches(client)
            persisted = client.persist(arr)
            for _ in as_completed(futures_of(persisted)):
                bar.update(1)
            return persisted.compute()
        from dask.callbacks import Callback

        class _Tick(Callback):
            def _posttask(self, key, result, dsk, state, id):  # noqa: A002
                if key in tiles:
                    bar.update(1)

        with _Tick():
            return arr.compute()


#: The share of a worker's memory limit its kernel-spectra cache may hold during a restoration.
WORKER_CACHE_SHARE = 0.25


def _bound_worker_caches(client) -> None:
    """Bound each worker's spectra cache (``spectrum_cache_mb``, default 2 GiB) by
    :data:`WORKER_CACHE_SHARE` of its memory limit, so that the cache cannot push a worker of
    1 GiB past its limit (workers without a limit keep their setting)."""
    from .options import get_options, set_options

    def bound(limit_mb):
        set_options(spectrum_cache_mb=min(int(get_options()["spectrum_cache_mb"]), int(limit_mb)))

    for addr, info in client.scheduler_info().get("workers", {}).items():
        limit = info.get("memory_limit") or 0
        if limit:
            client.run(bound, WORKER_CACHE_SHARE * limit / 2**20, workers=[addr])


def _flat_keys(keys):
    out = []
    stack = [keys]
    while stack:
        k = stack.pop()
        if isinstance(k, list):
            stack.extend(k)
        else:
            out.append(k)
    return out


def local_operator(engine, window):
    """The operator restricted to ``window`` (a slice per axis): its coefficient maps
    cropped, the PSF basis shared (so its kernel spectra are those cached for any window of
    the same shape), one thread."""
    from .operator import ProductConvolution

    ds = engine.dataset.isel(dict(zip(engine.dims, window, strict=True)))
    return ProductConvolution(ds, boundary=engine.boundary, dtype=engine.dtype, workers=1,
                              check_finite=False)
