"""One restoration entry point, in memory or tile by tile (issue 15, items 1 and 2, 2D).

:func:`restore` runs one of the deconvolution methods of :mod:`pcmx.deblur` with a
space-varying operator ``H u = sum_i h_i * (alpha_i . u)`` (:class:`pcmx.ProductConvolution`),
either on the whole image (``chunks=None``) or on tiles grown by a halo, each restored with the
operator restricted to its window (the coefficient maps cropped, the PSF basis shared), then
cropped and stitched by Dask (the default scheduler: threads).

Halo rule (measured, Richardson-Lucy, boundary "reflect", the true operator of a 96 x 128
simulated scene, 15 x 15 kernels (radius ``r = 7``), tiles of 37 and 50 px): the largest
relative difference ``max |u_tiled - u| / max |u|`` between the tiled and the in-memory result,
for halos of 1, 2, 3, 4 and 6 ``r``, is 1.5e-3, 1.3e-4, 4.7e-5, 2.6e-5, 4.9e-6 after 10
iterations; 7.0e-3, 1.2e-3, 1.0e-4, 5.4e-6, 6.7e-6 after 50; 1.6e-2, 1.4e-3, 3.1e-4, 8.1e-6,
1.1e-5 after 100 (the floor, about 1e-5, is float32 rounding); after 300 iterations 4.5e-1
with no halo, 1.8e-4, 3.7e-5, 1.6e-5 with 3, 4, 5 ``r``. The default halo
``ceil(r (3 + log10 I))`` (at most ``8 r``) keeps rl and rl-tv within
:data:`TILED_TOLERANCE` = 2e-4 (measured with it, 50 iterations: rl 2.8e-6 and 3.7e-6, rl-tv
7.5e-5 and 7.6e-5, for 37 and 50 px tiles). Tikhonov, FISTA-Haar and Sparse+Smooth, tiled,
differ by 4.9e-2, 1.1e-1 and 9.8e-3 (30 iterations): per-tile defaults and stopping rules.
"""

from __future__ import annotations

import math
import os

import numpy as np
import xarray as xr

from . import _backend
from .errors import InputError

__all__ = ["restore", "default_halo", "METHODS", "TILED_TOLERANCE"]

METHODS = ("rl", "rl-tv", "tikhonov", "fista-haar", "sparse-smooth")
# max |tiled - in memory| / max |in memory| that the default halo achieves for "rl" and "rl-tv"
# (measured at most 3.7e-5 for rl, 10-300 iterations, and 7.7e-5 for rl-tv; module docstring)
TILED_TOLERANCE = 2e-4


def default_halo(radius: int, iterations: int) -> int:
    """The default halo (pixels) of a tiled restoration: ``ceil(r (3 + log10 I))``, at most
    ``8 r`` (``r`` the kernel radius, ``I`` the iterations).

    Each Richardson-Lucy iteration lets information travel ``r`` further, but its weight
    decays fast: the tiled-versus-in-memory difference falls about 10 times per extra ``r``
    of halo and grows slowly with the iterations (measured, module docstring).
    """
    r = max(int(radius), 1)
    i = max(int(iterations), 1)
    return int(min(math.ceil(r * (3 + math.log10(i))), 8 * r))


def _check_iterations(iterations) -> int:
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise InputError(f"iterations={iterations!r} must be a positive integer")
    return int(iterations)


def _check_chunks(chunks, shape) -> int | None:
    if chunks is None:
        return None
    if isinstance(chunks, bool) or not isinstance(chunks, (int, np.integer)) or chunks < 1:
        raise InputError(f"chunks={chunks!r} must be a positive integer (the tile edge in pixels) or None")
    return int(chunks)


def _engine(operator, boundary: str):
    from .operator import ProductConvolution

    if isinstance(operator, ProductConvolution):
        return operator
    if isinstance(operator, (xr.Dataset, str, os.PathLike)):
        return ProductConvolution(operator, boundary=boundary)
    raise InputError("operator: expected a ProductConvolution, an operator Dataset or store path; "
                     f"got {type(operator).__name__}")


def _run(method: str, image, op, iterations: int, kw: dict):
    """The method on one (in-memory) image with the operator ``op``; a float32 array."""
    from .deblur.baselines import fista_haar, richardson_lucy_tv, tikhonov
    from .deblur.sparse_smooth import sparse_smooth

    if method == "rl":
        out = richardson_lucy_tv(image, op, n_iter=iterations, **{**kw, "lam": 0.0})
    elif method == "rl-tv":
        out = richardson_lucy_tv(image, op, n_iter=iterations, **kw)
    elif method == "tikhonov":
        out = tikhonov(image, op, max_iter=iterations, **kw)
    elif method == "fista-haar":
        out = fista_haar(image, op, n_iter=iterations, **kw)
    else:
        out = sparse_smooth(image, op, max_iter=iterations, **kw)["restored"].data
    return _backend.unwrap(out)


def _global_parameters(method: str, y, kw: dict) -> dict:
    """Data-dependent defaults computed once on the whole image, so every tile uses the
    values of the in-memory run: the offset (all but sparse-smooth, which estimates it
    jointly) and, for rl-tv, the TV smoothing ``eps``."""
    from .deblur.baselines import estimate_offset

    kw = dict(kw)
    if method == "sparse-smooth":
        return kw
    if kw.get("offset") is None:
        kw["offset"] = estimate_offset(y)
    if method == "rl-tv" and kw.get("eps") is None:
        xp = _backend.xp(y)
        flux = max(float(xp.sum(xp.maximum(y - np.float32(kw["offset"]), 0), dtype=np.float64)), 1e-12)
        kw["eps"] = 1e-3 * flux / y.size
    return kw


def restore(image, operator, *, method: str = "rl", iterations: int = 50, chunks: int | None = None,
            halo: int | None = None, boundary: str = "reflect", **method_kwargs):
    """Restore a 2D image with a space-varying operator, in memory or tile by tile.

    Parameters
    ----------
    image : array (ny, nx), DataArray (y, x) or Dask array
        NumPy or Dask (a DataArray of either). The result has the same kind: a Dask input
        gives a lazy Dask array, a DataArray a DataArray with its dims, coords and attrs.
    operator : ProductConvolution, operator Dataset or store path
        ``H`` on the image's grid (a Dataset or path is applied with ``boundary``).
    method : {"rl", "rl-tv", "tikhonov", "fista-haar", "sparse-smooth"}
        Richardson-Lucy (:func:`pcmx.deblur.richardson_lucy_tv` with ``lam=0``), with TV
        (``lam`` default 0.002), Tikhonov (:func:`pcmx.deblur.tikhonov`), FISTA with a Haar
        penalty (:func:`pcmx.deblur.fista_haar`), Sparse+Smooth
        (:func:`pcmx.deblur.sparse_smooth`, its ``restored`` variable).
    iterations : int
        ``n_iter`` of rl, rl-tv and fista-haar; ``max_iter`` of tikhonov and sparse-smooth.
    chunks : int, optional
        Tile edge in pixels; None: the whole image in memory.
    halo : int, optional
        Pixels added on each side of a tile (clipped at the image's edge, so edge tiles see
        the same boundary as the in-memory run); default :func:`default_halo` of the kernel
        radius and ``iterations``. Tiles are widened to at least the halo.
    boundary : {"reflect", "zero"}
        Boundary of an operator built from a Dataset or path (a ProductConvolution keeps
        its own).
    **method_kwargs
        Passed to the method (``lam``, ``offset``, ``eps``, ``gamma1``, ...).

    Returns
    -------
    Same kind as ``image``, float32 (ny, nx)

    Raises
    ------
    InputError
        An unknown method, bad ``iterations``, ``chunks`` or ``halo``, an image that is not
        2D or not on the operator's grid, a tiled run with a periodic operator, and the
        errors of the method.

    Notes
    -----
    The offset (and the TV smoothing ``eps`` of rl-tv) are estimated once on the whole image
    (:func:`pcmx.deblur.estimate_offset`: a Dask image is computed once for it; give
    ``offset=`` to avoid that pass) and given to every tile. With the default halo, rl and
    rl-tv agree with the in-memory run to :data:`TILED_TOLERANCE` (relative to the maximum
    of the result). The other methods keep their own per-tile defaults (noise level, step,
    weights, the Haar transform of the tile, CG and FISTA stopping rules): their tiled result
    is an approximation whose error is not stated.
    """
    if method not in METHODS:
        raise InputError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    iterations = _check_iterations(iterations)
    op = _engine(operator, boundary)
    template = image if isinstance(image, xr.DataArray) else None
    data = image.data if template is not None else image
    if getattr(data, "ndim", None) != 2:
        raise InputError(f"image: expected a 2D image (y, x), got shape {getattr(data, 'shape', None)}")
    if tuple(data.shape) != tuple(op.shape):
        raise InputError(f"image: shape {tuple(data.shape)} does not match the operator's grid {tuple(op.shape)}")
    tile = _check_chunks(chunks, data.shape)
    lazy = _backend.is_dask(data)
    if halo is not None and (isinstance(halo, bool) or not isinstance(halo, (int, np.integer)) or halo < 0):
        raise InputError(f"halo={halo!r} must be a non-negative integer or None")
    if tile is None:
        if lazy:
            import dask.array as da

            out = da.from_delayed(_delayed_whole(method, data, op, iterations, method_kwargs),
                                  shape=data.shape, dtype=np.float32)
        else:
            out = _run(method, np.asarray(data, dtype=np.float32) if not _backend.is_cupy(data) else data,
                       op, iterations, method_kwargs)
    else:
        if op.boundary == "periodic":
            raise InputError("chunks: a tiled restoration needs boundary 'reflect' or 'zero', "
                             "not 'periodic' (a tile cannot wrap around the field)")
        h = default_halo(max(op.radius), iterations) if halo is None else int(halo)
        out = _tiled(method, data, op, iterations, tile, h, method_kwargs, lazy)
    if template is None:
        return out
    return xr.DataArray(out, dims=template.dims, coords=template.coords, name=method,
                        attrs={**template.attrs, "method": method, "iterations": iterations})


def _delayed_whole(method, data, op, iterations, kw):
    import dask

    return dask.delayed(_run)(method, data, op, iterations, kw)


def _tiled(method, data, op, iterations, tile, halo, kw, lazy):
    import dask.array as da
    from dask.array.overlap import ensure_minimum_chunksize, overlap

    y = data.astype(np.float32) if lazy else np.ascontiguousarray(data, dtype=np.float32)
    if method != "sparse-smooth" and (kw.get("offset") is None or (method == "rl-tv" and kw.get("eps") is None)):
        kw = _global_parameters(method, np.asarray(y.compute()) if lazy else y, kw)
    x = y.rechunk(tile) if lazy else da.from_array(y, chunks=tile)
    x = x.rechunk(tuple(ensure_minimum_chunksize(max(halo, 1), c) for c in x.chunks))
    grown = overlap(x, depth={0: halo, 1: halo}, boundary={0: "none", 1: "none"}) if halo else x
    return da.map_blocks(_restore_tile, grown, chunks=x.chunks, dtype=np.float32,
                         meta=np.empty((0, 0), np.float32), method=method, engine=op,
                         iterations=iterations, halo=halo, kw=kw)


def _restore_tile(block, *, method, engine, iterations, halo, kw, block_info=None):
    """One tile: the window ``block`` (the tile grown by the halo, clipped at the image's
    edge) restored with the operator's maps cropped to it; the tile cut out."""
    from .operator import ProductConvolution

    (y0, y1), (x0, x1) = block_info[None]["array-location"]
    ny, nx = engine.shape
    wy0, wx0 = max(y0 - halo, 0), max(x0 - halo, 0)
    wy1, wx1 = min(y1 + halo, ny), min(x1 + halo, nx)
    ds = engine.dataset.isel(y=slice(wy0, wy1), x=slice(wx0, wx1))
    local = ProductConvolution(ds, boundary=engine.boundary, dtype=engine.dtype, workers=1,
                               check_finite=False)
    u = _run(method, np.ascontiguousarray(block, dtype=np.float32), local, iterations, kw)
    return np.asarray(u)[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0]
