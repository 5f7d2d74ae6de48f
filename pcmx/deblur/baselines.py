"""Baseline deconvolution methods with a space-varying operator (the three of the paper's Fig. 10).

* :func:`tikhonov`: regularized inverse filtering, ``min_u ||H u - (y - b)||^2 +
  lam ||grad u||^2``, by conjugate gradients on the normal equations;
  :func:`tikhonov_fourier` is its closed form (the Wiener-type filter) for a space-invariant,
  periodic operator.
* :func:`richardson_lucy_tv`: Richardson-Lucy with total-variation regularisation (Dey et al.
  2006), positivity-preserving multiplicative updates normalised by ``H^T 1``.
* :func:`fista_haar`: FISTA with an l1 penalty on the orthonormal Haar wavelet coefficients,
  non-negativity by projection, monotone variant (the objective never increases).
* :func:`scale_operator`: the same operator with every PSF dilated by a factor (the "PSF 2x too
  small / too large" experiment of Fig. 10).

Every method takes the image (NumPy or CuPy array, or a DataArray of either: the result has
the same kind, array library, dims and coords, float32; the array operations dispatch through
:mod:`pcmx._backend`) and an operator: a :class:`pcmx.ProductConvolution`, an operator Dataset
or store path (built with ``boundary``, default ``"reflect"`` as in
:func:`pcmx.deblur.sparse_smooth`: a mirror image beyond the field, no dark rims), or any
object with ``apply(u)`` and ``adjoint(v)`` on arrays of the image's shape. The camera offset
``b`` (a constant added to every pixel) is subtracted (or, for Richardson-Lucy, added to the
model) explicitly: given as ``offset``, or estimated by :func:`estimate_offset`. The default
weights come from the noise level :func:`pcmx.noise.estimate_noise`.
"""

from __future__ import annotations

import math
import os

import numpy as np
import scipy.ndimage as ndi
import xarray as xr

from .. import _backend
from ..errors import InputError
from ..noise import estimate_noise
from .identify import checked_image

__all__ = ["tikhonov", "tikhonov_fourier", "richardson_lucy_tv", "fista_haar",
           "scale_operator", "estimate_offset", "gradient", "divergence", "HaarTransform"]


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------
def _engine(operator, boundary: str):
    """A ProductConvolution from a Dataset/store path (with ``boundary``); any apply/adjoint
    object as is."""
    from ..operator import ProductConvolution

    if isinstance(operator, ProductConvolution):
        return operator
    if isinstance(operator, (xr.Dataset, str, os.PathLike)):
        return ProductConvolution(operator, boundary=boundary)
    if callable(getattr(operator, "apply", None)) and callable(getattr(operator, "adjoint", None)):
        return operator
    raise InputError("operator: expected a ProductConvolution, an operator Dataset or store path, "
                     f"or an object with apply() and adjoint(); got {type(operator).__name__}")


def _image(image, op, ndims=(2,)):
    """The image as a float32 array of its own library (checked as
    :func:`pcmx.deblur.checked_image` does, in 2D or, where ``ndims`` allows, 3D), and the
    DataArray to rebuild the output from."""
    template = image if isinstance(image, xr.DataArray) else None
    if 3 in ndims and getattr(image, "ndim", None) != 2:
        from ..io.readers import as_image

        img = as_image(image)
        if img.ndim not in ndims:
            raise InputError(f"image: expected a 2D (y, x) or 3D (z, y, x) image, got dims {img.dims}")
        data = img.data
        if img.ndim == 2:
            data = checked_image(img).data
        else:
            if data.dtype.kind not in "fiu":
                raise InputError(f"image: dtype {data.dtype} is not a real number type")
            if data.dtype.kind == "f":
                n = int(_backend.xp(data).count_nonzero(~_backend.xp(data).isfinite(data)))
                if n:
                    raise InputError(f"image: contains {n} NaN or infinite values")
    else:
        data = checked_image(image).data
    xp = _backend.xp(data)
    a = xp.ascontiguousarray(xp.asarray(data), dtype=np.float32)
    shape = getattr(op, "shape", None)
    if shape is not None and tuple(shape) != a.shape:
        raise InputError(f"image: shape {a.shape} does not match the operator's grid {tuple(shape)}")
    return a, template


def _owned(a, xp, fresh: bool):
    """``a`` (an operator's output) as a float32 array this module may overwrite: a
    :class:`pcmx.ProductConvolution` returns a new array on every call (``fresh``); any other
    apply/adjoint object's output is copied, since it might be a view of its input or a
    buffer it reuses."""
    a = xp.asarray(a, dtype=np.float32)
    owned = fresh and a.flags.c_contiguous and getattr(a.flags, "writeable", True)
    return a if owned else a.copy()


def _fresh_outputs(op) -> bool:
    from ..operator import ProductConvolution

    return isinstance(op, ProductConvolution)


def _wrap(u, template, name: str, attrs: dict):
    u = u.astype(np.float32, copy=False)
    if template is None:
        return u
    return xr.DataArray(u, dims=template.dims, coords=template.coords, name=name,
                        attrs={**template.attrs, **attrs})


def estimate_offset(image) -> float:
    """The camera offset plus the background's minimum: the lowest local mean of the image.

    The image is averaged over 9 x 9 windows (the noise of the mean drops 9 times) and the
    0.1th percentile of the result is taken: the largest constant that lies under the
    background almost everywhere (the convention of :func:`pcmx.deblur.sparse_smooth`).

    Parameters
    ----------
    image : array or DataArray ([z,] y, x), NumPy, CuPy or Dask
        A Dask image is never loaded whole: the local means are computed block by block
        (the same value as on the whole image).

    Returns
    -------
    float
    """
    data = _backend.unwrap(image)
    if _backend.is_dask(data):
        return _lazy_offset(data)
    xp, nd = _backend.xp(data), _backend.ndimage_module(data)
    y = xp.asarray(data, dtype=np.float32)
    return float(xp.percentile(nd.uniform_filter(y, 9, mode="reflect"), 0.1))


def _lazy_offset(data) -> float:
    """:func:`estimate_offset` of a Dask image without loading it whole.

    The 9-pixel local means are computed block by block with a 4-pixel overlap (reflected at
    the image's edge: the same values as on the whole image), on blocks of about Dask's
    ``array.chunk-size``; each block gives its smallest values, enough to hold the 0.1th
    percentile's two neighbours, and the percentile is interpolated between those as NumPy
    does. Memory: a few blocks and 0.1 % of the pixels per block.
    """
    import dask
    import dask.array as da
    from scipy import ndimage

    y = data.astype(np.float32) if da.core.is_dask_collection(data) else da.from_array(
        np.asarray(data, dtype=np.float32))
    n = int(y.size)
    position = 0.001 * (n - 1)
    lo = int(math.floor(position))
    keep = min(lo + 2, n)
    y = y.rechunk("auto")  # few blocks of about dask's array.chunk-size (128 MiB): few tasks
    y = y.rechunk(tuple(tuple(c) if sum(c) < 5 else da.overlap.ensure_minimum_chunksize(4, c)
                        for c in y.chunks))
    means = da.map_overlap(lambda b: ndimage.uniform_filter(b, 9, mode="reflect"), y, depth=4,
                           boundary="reflect", dtype=np.float32)

    def smallest(block):
        flat = np.asarray(block, dtype=np.float32).ravel()
        return np.partition(flat, keep - 1)[:keep] if flat.size > keep else flat

    parts = dask.compute(*[dask.delayed(smallest)(b) for b in means.to_delayed().ravel()])
    values = np.sort(np.concatenate(parts))[:keep]
    a = float(values[lo])
    b = float(values[min(lo + 1, len(values) - 1)])
    t = position - lo
    value = a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)
    return float(np.float32(value))  # NumPy's percentile of float32 values is float32


def _offset(y, offset) -> float:
    if offset is None:
        return estimate_offset(y)
    offset = float(offset)
    if not np.isfinite(offset):
        raise InputError(f"offset={offset!r} must be finite")
    return offset


def _positive(value, name: str, *, allow_zero: bool = False) -> float:
    v = float(value)
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise InputError(f"{name}={value!r} must be a {'non-negative' if allow_zero else 'positive'} number")
    return v


def _count(value, name: str) -> int:
    if int(value) != value or value < 1:
        raise InputError(f"{name}={value!r} must be a positive integer")
    return int(value)


def _boundary(op) -> str:
    """The boundary the operator applies (``"zero"`` for an object that does not say)."""
    return getattr(op, "boundary", "zero")


def gradient(u, periodic: bool):
    """Forward differences ``(D_y u, D_x u)`` (``(D_z u, D_y u, D_x u)`` in 3D) of the total
    variation and the Tikhonov penalty.

    Parameters
    ----------
    u : array (ny, nx) or (nz, ny, nx), NumPy or CuPy
    periodic : bool
        Periodic differences (``u[0] - u[-1]`` across the edge), else Neumann: zero difference
        across the last row and column (plane).

    Returns
    -------
    tuple of arrays
        One per axis, of ``u``'s shape and library; the adjoint is ``-divergence``.
    """
    xp = _backend.xp(u)
    if periodic:
        return tuple(xp.roll(u, -1, ax) - u for ax in range(u.ndim))
    out = []
    for ax in range(u.ndim):
        g = xp.zeros_like(u)
        lo, hi = _axis(ax, None, -1), _axis(ax, 1, None)
        g[lo] = u[hi] - u[lo]
        out.append(g)
    return tuple(out)


def _axis(ax: int, start, stop):
    return (slice(None),) * ax + (slice(start, stop),)


def divergence(*p, periodic: bool | None = None):
    """Divergence, the negative adjoint of :func:`gradient`: ``<gradient(u), p> = -<u, div p>``.

    Called ``divergence(py, px, periodic)`` (``divergence(pz, py, px, periodic)`` in 3D), or
    with ``periodic=`` by keyword.

    Parameters
    ----------
    *p : arrays (ny, nx) or (nz, ny, nx), NumPy or CuPy
        One per axis, as :func:`gradient` returns them.
    periodic : bool
        As for :func:`gradient`.

    Returns
    -------
    array of ``p[0]``'s shape
    """
    if periodic is None:
        *p, periodic = p
    xp = _backend.xp(p[0])
    if periodic:
        d = p[0] - xp.roll(p[0], 1, 0)
        for ax, q in enumerate(p[1:], start=1):
            d += q
            d -= xp.roll(q, 1, ax)
        return d
    d = xp.zeros_like(p[0])
    for ax, q in enumerate(p):
        inner = q[_axis(ax, None, -1)]
        d[_axis(ax, None, -1)] += inner
        d[_axis(ax, 1, None)] -= inner
    return d


# --------------------------------------------------------------------------------------------
# Tikhonov
# --------------------------------------------------------------------------------------------
def _default_lam(y, sigma: float) -> float:
    """Noise-to-signal power ratio ``sigma^2 / (var(y) - sigma^2)`` (the Wiener constant)."""
    signal = max(float(_backend.xp(y).var(y, dtype=np.float64)) - sigma ** 2, 1e-12)
    return max(sigma ** 2 / signal, 1e-8)


def tikhonov(image, operator, *, lam: float | None = None, offset: float | None = None,
             max_iter: int = 200, tol: float = 1e-4, x0=None, boundary: str = "reflect"):
    r"""Regularized inverse filtering with a space-varying operator (Tikhonov, gradient penalty).

    Solves ``min_u ||H u - (y - b)||^2 + lam ||grad u||^2`` by conjugate gradients on the
    normal equations ``(H^T H - lam Lap) u = H^T (y - b)``.

    Parameters
    ----------
    image : array or DataArray, shape (ny, nx) or (nz, ny, nx)
        The blurred image ``y`` (a z-stack with a 3D operator).
    operator : ProductConvolution, operator Dataset, store path, or apply/adjoint object
        ``H``.
    lam : float, optional
        Weight of the penalty. Default: the noise-to-signal power ratio
        ``sigma^2 / (var(y) - sigma^2)`` with ``sigma`` the noise level estimated from the
        image (the constant of the classical Wiener filter; of the central plane of a stack).
    offset : float, optional
        Camera offset ``b`` subtracted from the image; :func:`estimate_offset` when None.
    max_iter : int
        Maximum number of CG iterations (each one ``apply`` and one ``adjoint``).
    tol : float
        Stop when the normal-equation residual is below ``tol`` times its initial value.
    x0 : array, optional
        Starting point (default zero).
    boundary : {"reflect", "zero", "periodic"}
        Boundary of the operator built from a Dataset or store path (default "reflect", as
        in :func:`pcmx.deblur.sparse_smooth`); a ProductConvolution keeps its own.

    Returns
    -------
    Same kind as ``image``, float32
        ``u``; may be negative (the method has no positivity). A DataArray carries attrs
        ``lam``, ``offset``, ``iterations``, ``method``.

    Raises
    ------
    InputError
        A non-finite image, a shape that differs from the operator's, bad parameters.

    Notes
    -----
    ``grad`` is the forward difference, periodic when the operator's boundary is
    ``"periodic"`` and Neumann otherwise. With a space-invariant periodic operator (one
    component, a constant map), the solution is :func:`tikhonov_fourier`'s closed form
    ``conj(h^) y^ / (|h^|^2 + lam |d^|^2)``; CG converges to it.
    """
    op = _engine(operator, boundary)
    y, template = _image(image, op, ndims=(2, 3))
    xp = _backend.xp(y)
    b = _offset(y, offset)
    lam = _default_lam(y - b, estimate_noise(y if y.ndim == 2 else y[y.shape[0] // 2])) if lam is None else _positive(lam, "lam", allow_zero=True)
    max_iter = _count(max_iter, "max_iter")
    tol = _positive(tol, "tol", allow_zero=True)
    periodic = _boundary(op) == "periodic"

    def normal(u):
        return op.adjoint(op.apply(u)) - np.float32(lam) * divergence(*gradient(u, periodic),
                                                                      periodic=periodic)

    u = xp.zeros_like(y) if x0 is None else xp.array(x0, dtype=np.float32)
    r = op.adjoint(y - np.float32(b)) - (normal(u) if x0 is not None else 0)
    r = xp.asarray(r, dtype=np.float32)
    p = r.copy()
    rr = float(xp.vdot(r.astype(np.float64), r))
    rr0 = rr
    k = 0
    while k < max_iter and rr > (tol ** 2) * rr0 and rr > 0:
        q = normal(p)
        alpha = rr / float(xp.vdot(p.astype(np.float64), q))
        u += np.float32(alpha) * p
        r -= np.float32(alpha) * q
        rr_new = float(xp.vdot(r.astype(np.float64), r))
        p = r + np.float32(rr_new / rr) * p
        rr = rr_new
        k += 1
    return _wrap(u, template, "tikhonov",
                 {"method": "tikhonov", "lam": lam, "offset": b, "iterations": k})


def tikhonov_fourier(image, psf, *, lam: float, offset: float = 0.0) -> np.ndarray:
    """Closed-form Tikhonov/Wiener solution for a space-invariant blur with periodic boundaries.

    ``u^ = conj(h^) (y - b)^ / (|h^|^2 + lam |d^|^2)`` with ``|d^|^2 = 4 sin^2(pi k_y / n_y) +
    4 sin^2(pi k_x / n_x)`` (the periodic forward-difference gradient).

    Parameters
    ----------
    image : array or DataArray, shape (ny, nx), NumPy or CuPy
    psf : array, shape (ky, kx), odd sizes, centre at ``size // 2``
    lam : float
    offset : float

    Returns
    -------
    array (ny, nx), float32
        Of the image's array library (``xp.fft`` of :mod:`pcmx._backend`'s namespace).
    """
    data = _backend.unwrap(image)
    xp = _backend.xp(data)
    y = xp.asarray(data, dtype=np.float64) - float(offset)
    h = xp.asarray(psf, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] % 2 == 0 or h.shape[1] % 2 == 0:
        raise InputError(f"psf must be a 2D kernel with odd sizes, got shape {h.shape}")
    if h.shape[0] > y.shape[0] or h.shape[1] > y.shape[1]:
        raise InputError(f"psf {h.shape} is larger than the image {y.shape}")
    pad = xp.zeros_like(y)
    pad[:h.shape[0], :h.shape[1]] = h
    pad = xp.roll(pad, (-(h.shape[0] // 2), -(h.shape[1] // 2)), axis=(0, 1))
    hf = xp.fft.rfft2(pad)
    ky = xp.fft.fftfreq(y.shape[0])[:, None]
    kx = xp.fft.rfftfreq(y.shape[1])[None, :]
    d2 = 4 * xp.sin(np.pi * ky) ** 2 + 4 * xp.sin(np.pi * kx) ** 2
    uf = xp.conj(hf) * xp.fft.rfft2(y) / (xp.abs(hf) ** 2 + float(lam) * d2)
    return xp.fft.irfft2(uf, s=y.shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Richardson-Lucy with TV
# --------------------------------------------------------------------------------------------
def richardson_lucy_tv(image, operator, *, lam: float = 0.002, n_iter: int = 50,
                       offset: float | None = None, eps: float | None = None,
                       boundary: str = "reflect", start: float | None = None):
    r"""Richardson-Lucy deconvolution with total-variation regularisation (Dey et al. 2006).

    Poisson maximum likelihood with the model ``y ~ Poisson(H u + b)`` and the penalty
    ``lam TV(u)``; the multiplicative update ::

        u <- u / (H^T 1 - lam div(grad u / |grad u|_eps)) . H^T (y / (H u + b))

    Parameters
    ----------
    image : array or DataArray, shape (ny, nx) or (nz, ny, nx)
        The blurred image ``y`` (photon counts plus the offset); a z-stack with a 3D
        operator.
    operator : ProductConvolution, operator Dataset, store path, or apply/adjoint object
    lam : float
        TV weight (dimensionless: the TV gradient is scale invariant; Dey et al. use about
        0.002). 0 gives plain Richardson-Lucy.
    n_iter : int
        Iterations (each one ``apply`` and one ``adjoint``).
    offset : float, optional
        Camera offset ``b`` (kept in the model, not subtracted, so that the Poisson
        likelihood and positivity stay exact); :func:`estimate_offset` when None.
    eps : float, optional
        Smoothing of ``|grad u|`` (default 1e-3 times the mean of ``y - b``).
    boundary : {"reflect", "zero", "periodic"}
        Boundary of the operator built from a Dataset or store path (default "reflect", as
        in :func:`pcmx.deblur.sparse_smooth`); a ProductConvolution keeps its own.
    start : float, optional
        The value of the constant start image; default ``flux(y - b) / sum(H^T 1)`` (the
        flux of ``y - b`` spread evenly). A tile of a larger image takes the whole image's
        value, so that tiles start where the whole-image run does.

    Returns
    -------
    Same kind as ``image``, float32, ``u >= 0``

    Raises
    ------
    InputError
        A non-finite image, a shape mismatch, bad parameters.

    Notes
    -----
    ``H^T 1`` is not constant for a space-varying operator nor near the borders with the zero
    boundary (light spreads out of the field): it normalises each pixel, so that the flux of
    ``H u`` matches the flux of ``y - b`` at convergence. The denominator is kept above
    ``0.1 H^T 1`` (Dey et al. require ``lam`` small enough for it to stay positive; the clamp
    only acts on isolated pixels when ``lam`` is too large). Start: the constant image of
    the same flux.
    """
    op = _engine(operator, boundary)
    y, template = _image(image, op, ndims=(2, 3))
    xp = _backend.xp(y)
    b = _offset(y, offset)
    lam = _positive(lam, "lam", allow_zero=True)
    n_iter = _count(n_iter, "n_iter")
    periodic = _boundary(op) == "periodic"
    fresh = _fresh_outputs(op)
    ht1 = _owned(op.adjoint(xp.ones_like(y)), xp, fresh)
    floor = np.float32(1e-3) * float(ht1.max())
    if not floor > 0:
        raise InputError("operator: H^T 1 is zero everywhere; nothing to deconvolve")
    xp.maximum(ht1, floor, out=ht1)
    flux = max(float(xp.sum(xp.maximum(y - b, 0), dtype=np.float64)), 1e-12)
    eps = np.float32(1e-3 * flux / y.size if eps is None else _positive(eps, "eps"))
    if start is None:
        start = flux / float(xp.sum(ht1, dtype=np.float64))
    u = xp.full_like(y, _positive(start, "start"))
    y_pos = xp.maximum(y, 0)  # read noise can make counts negative; Poisson needs >= 0
    del y
    b32 = np.float32(b)
    tiny = np.float32(1e-12 * max(flux / u.size, 1e-30))
    if lam > 0:
        lam32, eps2 = np.float32(lam), eps * eps
        clamp = np.float32(0.1) * ht1
    # Every step in place on arrays this loop owns (no temporaries of the image's size
    # beyond the operator's own), in the order of the textbook expressions, so the result
    # is bit for bit that of ``u * H^T(y / max(H u + b, tiny)) / denom``.
    for _ in range(n_iter):
        ratio = _owned(op.apply(u), xp, fresh)  # H u, turned into y / max(H u + b, tiny)
        xp.add(ratio, b32, out=ratio)
        xp.maximum(ratio, tiny, out=ratio)
        xp.divide(y_pos, ratio, out=ratio)
        corr = xp.asarray(op.adjoint(ratio), dtype=np.float32)
        del ratio
        if lam > 0:
            denom = _tv_denominator(u, ht1, clamp, lam32, eps2, periodic, xp)
        else:
            denom = ht1
        xp.multiply(u, corr, out=u)
        xp.divide(u, denom, out=u)
        del corr
    return _wrap(u, template, "richardson_lucy_tv",
                 {"method": "richardson_lucy_tv", "lam": lam, "offset": b, "iterations": n_iter})


def _tv_denominator(u, ht1, clamp, lam32, eps2, periodic: bool, xp):
    """``max(H^T 1 - lam div(grad u / |grad u|_eps), 0.1 H^T 1)``, the gradient's arrays
    reused in place."""
    g = gradient(u, periodic)
    norm = g[0] * g[0]
    for q in g[1:]:
        norm += q * q
    norm += eps2
    xp.sqrt(norm, out=norm)
    for q in g:
        xp.divide(q, norm, out=q)
    del norm
    d = divergence(*g, periodic=periodic)
    del g
    xp.multiply(d, lam32, out=d)
    xp.subtract(ht1, d, out=d)
    return xp.maximum(d, clamp, out=d)


# --------------------------------------------------------------------------------------------
# FISTA with a Haar l1 penalty
# --------------------------------------------------------------------------------------------
class HaarTransform:
    """Orthonormal 2D Haar transform (PyWavelets, ``mode="periodization"``) as flat arrays.

    ``forward`` (analysis ``W``) maps an image to the array of its wavelet coefficients
    (``pywt.coeffs_to_array`` layout, the coarse approximation in the top-left block
    ``approx``), ``inverse`` (synthesis ``W^T = W^-1``) maps it back.

    Parameters
    ----------
    shape : (int, int)
        The image shape. Sizes divisible by ``2**levels`` make ``W`` square and orthonormal
        (``inverse`` is its adjoint). Other sizes are padded by the periodization: ``W`` then
        has more coefficients than pixels and ``inverse`` is a left inverse, not the adjoint
        (the soft-threshold step of :func:`fista_haar` is then an approximate prox).
    levels : int
        Decomposition levels (at most ``pywt.dwtn_max_level(shape, "haar")``).
    like : array, optional
        Images in and out are of this array's library (NumPy when None). PyWavelets has no
        CuPy implementation: the transform runs on the host, and this class is the one place
        where a CuPy image is copied there and back; the coefficients are NumPy arrays.
    """

    def __init__(self, shape, levels: int, *, like=None):
        import pywt

        self.pywt = pywt
        self.shape = tuple(shape)
        self.levels = levels
        self.xp = _backend.xp(like)
        coeffs = pywt.wavedec2(np.zeros(shape, np.float32), "haar", mode="periodization", level=levels)
        _, self.slices = pywt.coeffs_to_array(coeffs)
        self.approx = self.slices[0]  # the coarse approximation: not penalised

    def forward(self, u) -> np.ndarray:
        """``W u``: the flat coefficient array (NumPy) of an image (NumPy or CuPy)."""
        c = self.pywt.wavedec2(_backend.asnumpy(u), "haar", mode="periodization", level=self.levels)
        return self.pywt.coeffs_to_array(c)[0]

    def inverse(self, arr):
        """``W^T c``: the image (float32, the library of ``like``) of a coefficient array."""
        c = self.pywt.array_to_coeffs(arr, self.slices, output_format="wavedec2")
        u = self.pywt.waverec2(c, "haar", mode="periodization")
        u = np.ascontiguousarray(u[:self.shape[0], :self.shape[1]], dtype=np.float32)
        return u if self.xp is np else self.xp.asarray(u)

    def l1(self, arr) -> float:
        a = arr.copy()
        a[self.approx] = 0
        return float(np.abs(a).sum(dtype=np.float64))

    def shrink(self, arr, t: float):
        out = np.sign(arr) * np.maximum(np.abs(arr) - np.float32(t), 0)
        out[self.approx] = arr[self.approx]
        return out


def fista_haar(image, operator, *, lam: float | None = None, levels: int | None = None,
               n_iter: int = 100, offset: float | None = None, step: float | None = None,
               return_objective: bool = False, boundary: str = "reflect"):
    r"""FISTA with an l1 penalty on Haar wavelet coefficients and non-negativity.

    ``min_{u >= 0} 1/2 ||H u - (y - b)||^2 + lam ||W u||_1`` with ``W`` the orthonormal 2D
    Haar transform (PyWavelets, ``mode="periodization"``; the coarse approximation is not
    penalised).

    Parameters
    ----------
    image : array or DataArray, shape (ny, nx)
    operator : ProductConvolution, operator Dataset, store path, or apply/adjoint object
    lam : float, optional
        Default: the image's noise level ``sigma`` (a soft threshold of one noise standard
        deviation per unit step when ``||H|| = 1``).
    levels : int, optional
        Wavelet levels (default: ``min(4, pywt.dwtn_max_level)``).
    n_iter : int
        Iterations (each one ``apply`` and one ``adjoint``).
    offset : float, optional
        Camera offset ``b`` subtracted from the image; :func:`estimate_offset` when None.
    step : float, optional
        Gradient step; default ``1 / (1.01 ||H||^2)`` from ``operator.norm_estimate()``.
    return_objective : bool
        Also return the objective after each iteration (float64 array, length ``n_iter + 1``,
        the first entry at the start ``u = 0``).
    boundary : {"reflect", "zero", "periodic"}
        Boundary of the operator built from a Dataset or store path (default "reflect", as
        in :func:`pcmx.deblur.sparse_smooth`); a ProductConvolution keeps its own.

    Returns
    -------
    Same kind as ``image``, float32, ``u >= 0`` (and the objective history if asked)

    Raises
    ------
    InputError
        A non-finite image, a shape mismatch, bad parameters, an operator without
        ``norm_estimate`` and no ``step``.

    Notes
    -----
    The proximal step is the soft threshold of the wavelet coefficients followed by the
    projection on ``u >= 0`` (the exact prox of the sum has no closed form; this composition
    is the usual approximation). The monotone variant of FISTA (MFISTA, Beck & Teboulle
    2009) keeps the previous iterate whenever the proximal point does not decrease the
    objective, so the objective never increases; ``H`` of the extrapolated point is the same
    combination of ``H`` of the iterates, so an iteration costs one ``apply`` and one
    ``adjoint``. PyWavelets has no CuPy path: with a CuPy image the wavelet step runs on the
    host (:class:`HaarTransform`), everything else on the device.
    """
    import pywt

    op = _engine(operator, boundary)
    y, template = _image(image, op)
    xp = _backend.xp(y)
    b = _offset(y, offset)
    d = y - np.float32(b)
    lam = estimate_noise(y) if lam is None else _positive(lam, "lam", allow_zero=True)
    n_iter = _count(n_iter, "n_iter")
    max_level = pywt.dwtn_max_level(y.shape, "haar")
    levels = min(4, max_level) if levels is None else _count(levels, "levels")
    if levels > max_level:
        raise InputError(f"levels={levels} exceeds the maximum {max_level} for an image of shape {y.shape}")
    if step is None:
        if not callable(getattr(op, "norm_estimate", None)):
            raise InputError("operator: has no norm_estimate(); give step=1/||H||^2")
        step = 1.0 / (1.01 * float(op.norm_estimate()) ** 2)
    else:
        step = _positive(step, "step")
    W = HaarTransform(y.shape, levels, like=y)

    def objective(hu, u):
        r = (hu - d).astype(np.float64)
        return 0.5 * float(xp.vdot(r, r)) + lam * W.l1(W.forward(u))

    u = xp.zeros_like(y)
    hu = xp.zeros_like(y)
    v, hv = u, hu  # extrapolated point and H of it
    f = objective(hu, u)
    history = [f]
    t = 1.0
    for _ in range(n_iter):
        g = xp.asarray(op.adjoint(hv - d), dtype=np.float32)
        z = xp.maximum(W.inverse(W.shrink(W.forward(v - np.float32(step) * g), lam * step)), 0)
        hz = xp.asarray(op.apply(z), dtype=np.float32)
        fz = objective(hz, z)
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        if fz <= f:
            u_new, hu_new, f = z, hz, fz
        else:
            u_new, hu_new = u, hu
        c1, c2 = np.float32(t / t_new), np.float32((t - 1) / t_new)
        # v = u_new + t/t_new (z - u_new) + (t-1)/t_new (u_new - u)
        v = u_new + c1 * (z - u_new) + c2 * (u_new - u)
        hv = hu_new + c1 * (hz - hu_new) + c2 * (hu_new - hu)
        u, hu, t = u_new, hu_new, t_new
        history.append(f)
    out = _wrap(u, template, "fista_haar",
                {"method": "fista_haar", "lam": lam, "offset": b, "iterations": n_iter,
                 "levels": levels})
    return (out, np.array(history)) if return_objective else out


# --------------------------------------------------------------------------------------------
# mis-scaled operators
# --------------------------------------------------------------------------------------------
def scale_operator(op, factor: float) -> xr.Dataset:
    """The operator with every PSF dilated by ``factor`` about its centre (Fig. 10's wrong PSFs).

    Each kernel ``h_i`` is resampled as ``h_i(x / factor) / factor^2`` (cubic spline,
    ``scipy.ndimage.affine_transform`` about the kernel's centre, so the centre stays at
    ``size // 2``) on a kernel of odd size ``2 round(factor r) + 1`` (``r`` the original
    radius, at least 1), then all kernels are multiplied by one constant so that the PSF at
    the field's centre keeps its original sum (the flux). The coefficient maps are unchanged.

    Parameters
    ----------
    op : ProductConvolution, operator Dataset or store path
    factor : float
        Positive; 2 gives PSFs twice as wide, 0.5 half as wide.

    Returns
    -------
    Dataset
        An operator Dataset (``psf_basis``, ``coefficients``), ``attrs["scale_factor"]``.

    Raises
    ------
    InputError
        If ``factor`` is not positive or ``op`` is not an operator.
    """
    from ..operator import ProductConvolution

    factor = _positive(factor, "factor")
    if isinstance(op, ProductConvolution):
        ds = op.dataset
    elif isinstance(op, (str, os.PathLike)):
        from ..io.store import open_store

        ds = open_store(op, kind="operator")
    elif isinstance(op, xr.Dataset):
        ds = op
    else:
        raise InputError(f"op: expected a ProductConvolution, operator Dataset or store path, got "
                         f"{type(op).__name__}")
    if "psf_basis" not in ds or ds["psf_basis"].dims != ("component", "ky", "kx"):
        raise InputError("op: needs a 2D operator with psf_basis (component, ky, kx)")
    h = np.asarray(ds["psf_basis"].values, dtype=np.float64)
    ky, kx = h.shape[1:]
    new = tuple(2 * max(1, int(round(factor * (k // 2)))) + 1 for k in (ky, kx))
    c_in = np.array([ky // 2, kx // 2], float)
    c_out = np.array([n // 2 for n in new], float)
    # output index j samples input c_in + (j - c_out) / factor
    scaled = np.stack([
        ndi.affine_transform(hi, np.full(2, 1.0 / factor), offset=c_in - c_out / factor,
                             output_shape=new, order=3, mode="constant", cval=0.0)
        for hi in h
    ]) / factor ** 2
    coeff = ds["coefficients"]
    centre = {d: coeff.sizes[d] // 2 for d in coeff.dims[1:]}
    a0 = np.asarray(coeff.isel(centre).values, dtype=np.float64)
    s_old = float(np.tensordot(a0, h, axes=1).sum())
    s_new = float(np.tensordot(a0, scaled, axes=1).sum())
    if s_new != 0 and s_old != 0:
        scaled *= s_old / s_new
    basis = xr.DataArray(scaled.astype(ds["psf_basis"].dtype), dims=("component", "ky", "kx"),
                         attrs=ds["psf_basis"].attrs)
    out = xr.Dataset({"psf_basis": basis, "coefficients": coeff},
                     attrs={**ds.attrs, "pcmx_type": "operator", "scale_factor": factor})
    return out

