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

Every method takes the image (NumPy array or DataArray: the result has the same kind, dims and
coords, float32) and an operator: a :class:`pcmx.ProductConvolution`, an operator Dataset or
store path (built with ``boundary="zero"``), or any object with ``apply(u)`` and
``adjoint(v)`` on arrays of the image's shape. The camera offset ``b`` (a constant added to
every pixel) is subtracted (or, for Richardson-Lucy, added to the model) explicitly: given as
``offset``, or estimated by :func:`estimate_offset`.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.ndimage as ndi
import xarray as xr

from ..errors import InputError

__all__ = ["tikhonov", "tikhonov_fourier", "richardson_lucy_tv", "fista_haar",
           "scale_operator", "estimate_offset"]


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------
def _engine(operator):
    """A ProductConvolution from a Dataset/store path; any apply/adjoint object as is."""
    from ..operator import ProductConvolution

    if isinstance(operator, ProductConvolution):
        return operator
    if isinstance(operator, (xr.Dataset, str, os.PathLike)):
        return ProductConvolution(operator, boundary="zero")
    if callable(getattr(operator, "apply", None)) and callable(getattr(operator, "adjoint", None)):
        return operator
    raise InputError("operator: expected a ProductConvolution, an operator Dataset or store path, "
                     f"or an object with apply() and adjoint(); got {type(operator).__name__}")


def _image(image, op) -> tuple[np.ndarray, xr.DataArray | None]:
    """The image as float32 NumPy (checked), and the DataArray to rebuild the output from."""
    template = image if isinstance(image, xr.DataArray) else None
    a = np.asarray(image.values if template is not None else image)
    if a.ndim != 2:
        raise InputError(f"image must be 2D (y, x), got shape {a.shape}")
    if a.dtype.kind not in "fiu":
        raise InputError(f"image: dtype {a.dtype} is not a real number type")
    a = np.ascontiguousarray(a, dtype=np.float32)
    n_bad = int(np.count_nonzero(~np.isfinite(a)))
    if n_bad:
        raise InputError(f"image has {n_bad} non-finite pixels (NaN or inf)")
    shape = getattr(op, "shape", None)
    if shape is not None and tuple(shape) != a.shape:
        raise InputError(f"image: shape {a.shape} does not match the operator's grid {tuple(shape)}")
    return a, template


def _wrap(u: np.ndarray, template, name: str, attrs: dict):
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
    """
    y = np.asarray(getattr(image, "values", image), dtype=np.float32)
    return float(np.percentile(ndi.uniform_filter(y, 9, mode="reflect"), 0.1))


def _offset(y: np.ndarray, offset) -> float:
    if offset is None:
        return estimate_offset(y)
    offset = float(offset)
    if not np.isfinite(offset):
        raise InputError(f"offset={offset!r} must be finite")
    return offset


def _noise(y: np.ndarray) -> float:
    """Robust noise standard deviation (Immerkaer's high-pass, median absolute value)."""
    hp = (y[:-2, :-2] - 2 * y[:-2, 1:-1] + y[:-2, 2:]
          - 2 * y[1:-1, :-2] + 4 * y[1:-1, 1:-1] - 2 * y[1:-1, 2:]
          + y[2:, :-2] - 2 * y[2:, 1:-1] + y[2:, 2:])
    return float(np.median(np.abs(hp))) / (0.6745 * 6.0)


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
    return getattr(op, "boundary", "zero")


def _grad(u: np.ndarray, periodic: bool) -> tuple[np.ndarray, np.ndarray]:
    """Forward differences: periodic, or Neumann (zero difference across the last pixel)."""
    if periodic:
        return np.roll(u, -1, 0) - u, np.roll(u, -1, 1) - u
    gy = np.zeros_like(u)
    gx = np.zeros_like(u)
    gy[:-1] = u[1:] - u[:-1]
    gx[:, :-1] = u[:, 1:] - u[:, :-1]
    return gy, gx


def _div(py: np.ndarray, px: np.ndarray, periodic: bool) -> np.ndarray:
    """Divergence, the negative adjoint of :func:`_grad`."""
    if periodic:
        return py - np.roll(py, 1, 0) + px - np.roll(px, 1, 1)
    d = np.zeros_like(py)
    d[:-1] += py[:-1]
    d[1:] -= py[:-1]
    d[:, :-1] += px[:, :-1]
    d[:, 1:] -= px[:, :-1]
    return d


# --------------------------------------------------------------------------------------------
# Tikhonov
# --------------------------------------------------------------------------------------------
def _default_lam(y: np.ndarray, sigma: float) -> float:
    """Noise-to-signal power ratio ``sigma^2 / (var(y) - sigma^2)`` (the Wiener constant)."""
    signal = max(float(np.var(y, dtype=np.float64)) - sigma ** 2, 1e-12)
    return max(sigma ** 2 / signal, 1e-8)


def tikhonov(image, operator, *, lam: float | None = None, offset: float | None = None,
             max_iter: int = 200, tol: float = 1e-4, x0=None):
    r"""Regularized inverse filtering with a space-varying operator (Tikhonov, gradient penalty).

    Solves ``min_u ||H u - (y - b)||^2 + lam ||grad u||^2`` by conjugate gradients on the
    normal equations ``(H^T H - lam Lap) u = H^T (y - b)``.

    Parameters
    ----------
    image : array or DataArray, shape (ny, nx)
        The blurred image ``y``.
    operator : ProductConvolution, operator Dataset, store path, or apply/adjoint object
        ``H``.
    lam : float, optional
        Weight of the penalty. Default: the noise-to-signal power ratio
        ``sigma^2 / (var(y) - sigma^2)`` with ``sigma`` the noise level estimated from the
        image (the constant of the classical Wiener filter).
    offset : float, optional
        Camera offset ``b`` subtracted from the image; :func:`estimate_offset` when None.
    max_iter : int
        Maximum number of CG iterations (each one ``apply`` and one ``adjoint``).
    tol : float
        Stop when the normal-equation residual is below ``tol`` times its initial value.
    x0 : array, optional
        Starting point (default zero).

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
    op = _engine(operator)
    y, template = _image(image, op)
    b = _offset(y, offset)
    lam = _default_lam(y - b, _noise(y)) if lam is None else _positive(lam, "lam", allow_zero=True)
    max_iter = _count(max_iter, "max_iter")
    tol = _positive(tol, "tol", allow_zero=True)
    periodic = _boundary(op) == "periodic"

    def normal(u):
        gy, gx = _grad(u, periodic)
        return op.adjoint(op.apply(u)) - np.float32(lam) * _div(gy, gx, periodic)

    u = np.zeros_like(y) if x0 is None else np.array(x0, dtype=np.float32)
    r = op.adjoint(y - np.float32(b)) - (normal(u) if x0 is not None else 0)
    r = np.asarray(r, dtype=np.float32)
    p = r.copy()
    rr = float(np.vdot(r.astype(np.float64), r))
    rr0 = rr
    k = 0
    while k < max_iter and rr > (tol ** 2) * rr0 and rr > 0:
        q = normal(p)
        alpha = rr / float(np.vdot(p.astype(np.float64), q))
        u += np.float32(alpha) * p
        r -= np.float32(alpha) * q
        rr_new = float(np.vdot(r.astype(np.float64), r))
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
    image : array, shape (ny, nx)
    psf : array, shape (ky, kx), odd sizes, centre at ``size // 2``
    lam : float
    offset : float

    Returns
    -------
    ndarray, float32
    """
    y = np.asarray(image, dtype=np.float64) - float(offset)
    h = np.asarray(psf, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] % 2 == 0 or h.shape[1] % 2 == 0:
        raise InputError(f"psf must be a 2D kernel with odd sizes, got shape {h.shape}")
    if h.shape[0] > y.shape[0] or h.shape[1] > y.shape[1]:
        raise InputError(f"psf {h.shape} is larger than the image {y.shape}")
    pad = np.zeros_like(y)
    pad[:h.shape[0], :h.shape[1]] = h
    pad = np.roll(pad, (-(h.shape[0] // 2), -(h.shape[1] // 2)), axis=(0, 1))
    hf = np.fft.rfft2(pad)
    ky = np.fft.fftfreq(y.shape[0])[:, None]
    kx = np.fft.rfftfreq(y.shape[1])[None, :]
    d2 = 4 * np.sin(np.pi * ky) ** 2 + 4 * np.sin(np.pi * kx) ** 2
    uf = np.conj(hf) * np.fft.rfft2(y) / (np.abs(hf) ** 2 + float(lam) * d2)
    return np.fft.irfft2(uf, s=y.shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Richardson-Lucy with TV
# --------------------------------------------------------------------------------------------
def richardson_lucy_tv(image, operator, *, lam: float = 0.002, n_iter: int = 50,
                       offset: float | None = None, eps: float | None = None):
    r"""Richardson-Lucy deconvolution with total-variation regularisation (Dey et al. 2006).

    Poisson maximum likelihood with the model ``y ~ Poisson(H u + b)`` and the penalty
    ``lam TV(u)``; the multiplicative update ::

        u <- u / (H^T 1 - lam div(grad u / |grad u|_eps)) . H^T (y / (H u + b))

    Parameters
    ----------
    image : array or DataArray, shape (ny, nx)
        The blurred image ``y`` (photon counts plus the offset).
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
    op = _engine(operator)
    y, template = _image(image, op)
    b = _offset(y, offset)
    lam = _positive(lam, "lam", allow_zero=True)
    n_iter = _count(n_iter, "n_iter")
    periodic = _boundary(op) == "periodic"
    ht1 = np.asarray(op.adjoint(np.ones_like(y)), dtype=np.float32)
    floor = np.float32(1e-3) * float(ht1.max())
    if not floor > 0:
        raise InputError("operator: H^T 1 is zero everywhere; nothing to deconvolve")
    ht1 = np.maximum(ht1, floor)
    flux = max(float(np.sum(np.clip(y - b, 0, None), dtype=np.float64)), 1e-12)
    eps = np.float32(1e-3 * flux / y.size if eps is None else _positive(eps, "eps"))
    u = np.full_like(y, flux / float(np.sum(ht1, dtype=np.float64)))
    y_pos = np.clip(y, 0, None)  # read noise can make counts negative; Poisson needs >= 0
    b32 = np.float32(b)
    tiny = np.float32(1e-12 * max(flux / y.size, 1e-30))
    for _ in range(n_iter):
        model = np.asarray(op.apply(u), dtype=np.float32)
        ratio = y_pos / np.maximum(model + b32, tiny)
        corr = np.asarray(op.adjoint(ratio), dtype=np.float32)
        if lam > 0:
            gy, gx = _grad(u, periodic)
            norm = np.sqrt(gy * gy + gx * gx + eps * eps)
            denom = ht1 - np.float32(lam) * _div(gy / norm, gx / norm, periodic)
            denom = np.maximum(denom, np.float32(0.1) * ht1)
        else:
            denom = ht1
        u = u * corr / denom
    return _wrap(u, template, "richardson_lucy_tv",
                 {"method": "richardson_lucy_tv", "lam": lam, "offset": b, "iterations": n_iter})


# --------------------------------------------------------------------------------------------
# FISTA with a Haar l1 penalty
# --------------------------------------------------------------------------------------------
class _Haar:
    """Orthonormal 2D Haar transform (PyWavelets, periodization) as flat coefficient arrays."""

    def __init__(self, shape, levels: int):
        import pywt

        self.pywt = pywt
        self.shape = shape
        self.levels = levels
        coeffs = pywt.wavedec2(np.zeros(shape, np.float32), "haar", mode="periodization", level=levels)
        _, self.slices = pywt.coeffs_to_array(coeffs)
        self.approx = self.slices[0]  # the coarse approximation: not penalised

    def forward(self, u):
        c = self.pywt.wavedec2(u, "haar", mode="periodization", level=self.levels)
        return self.pywt.coeffs_to_array(c)[0]

    def inverse(self, arr):
        c = self.pywt.array_to_coeffs(arr, self.slices, output_format="wavedec2")
        u = self.pywt.waverec2(c, "haar", mode="periodization")
        return np.ascontiguousarray(u[:self.shape[0], :self.shape[1]], dtype=np.float32)

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
               return_objective: bool = False):
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
    ``adjoint``.
    """
    import pywt

    op = _engine(operator)
    y, template = _image(image, op)
    b = _offset(y, offset)
    d = y - np.float32(b)
    lam = _noise(y) if lam is None else _positive(lam, "lam", allow_zero=True)
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
    W = _Haar(y.shape, levels)

    def objective(hu, u):
        r = (hu - d).astype(np.float64)
        return 0.5 * float(np.vdot(r, r)) + lam * W.l1(W.forward(u))

    u = np.zeros_like(y)
    hu = np.zeros_like(y)
    v, hv = u, hu  # extrapolated point and H of it
    f = objective(hu, u)
    history = [f]
    t = 1.0
    for _ in range(n_iter):
        g = np.asarray(op.adjoint(hv - d), dtype=np.float32)
        z = np.maximum(W.inverse(W.shrink(W.forward(v - np.float32(step) * g), lam * step)), 0)
        hz = np.asarray(op.apply(z), dtype=np.float32)
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

