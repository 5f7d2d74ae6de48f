"""Sparse+Smooth deblurring (paper App. D-b) and blind BSS deblurring (App. D).

The image ``y`` of point sources ``u1`` over a smooth background ``u2`` (auto-fluorescence),
blurred by a known operator ``H`` and recorded with a camera offset ``b``, is restored by ::

    min_{u1 >= 0, u2 >= 0, b}  1/2 ||H (u1 + u2) + b - y||^2 + gamma1 ||u1||_1 + gamma2 ||Lap u2||^2

with ``Lap`` the 5-point Laplacian with Neumann (mirror) boundaries.

Algorithm
---------
Accelerated proximal gradient (FISTA, Beck & Teboulle) with gradient-based adaptive restart
(O'Donoghue & Candes 2015) on ``(u1, u2)``:

* the offset is eliminated exactly (variable projection): for given ``u``, the best ``b`` is
  ``mean(y - H u)``, so the data term is ``1/2 ||P (H u - y)||^2`` with ``P`` the centring
  projection; its gradient is ``H^T P (H u - y)`` with the same Lipschitz bound ``||H||^2``.
  The constant part of ``u2`` is then fixed by ``u2 >= 0``: ``b`` is the largest constant
  under the background (the camera offset plus the background's minimum) and ``u2`` the
  background above it. A given ``offset`` is used as is instead;
* the data term couples ``u1`` and ``u2`` only through ``u1 + u2``: its Hessian on
  ``(u1, u2)`` is ``[[A, A], [A, A]]`` with ``A = H^T P H``, ``||A|| <= L`` (``L`` the
  power-iteration estimate of ``||H||^2``, :func:`lipschitz_estimate`: three iterations from
  the constant image, times 1.02). For any ``c > 0``, ``<x + z, A (x + z)> <= L (1 + c)
  ||x||^2 + L (1 + 1/c) ||z||^2``, so FISTA runs in the metric ``diag(L (1 + c), L (1 + 1/c))``:
  block steps ``tau1 = 1 / ((1 + c) L)`` for ``u1`` and ``tau2 = c tau1`` for ``u2``
  (:data:`SPARSE_STEP_SHARE` ``c = 0.1``: ``u1``'s step is 1.82x the former common step
  ``1 / (2 L)``, ``u2``'s 5.5x smaller). The sparse part is the slow one (a deconvolution
  concentrating each source onto one or two pixels); the smooth background converges in far
  fewer iterations (its relative step was measured 20x smaller than ``u1``'s). Both steps
  are decreased by backtracking whenever the sufficient-decrease condition of Beck &
  Teboulle, in the same metric, fails (power iteration approaches ``||H||`` from below);
* the smoothness term is *not* linearised (its curvature ``2 gamma2 ||Lap||^2 = 128 gamma2``
  would make the step tiny and the background converge in thousands of iterations): it is
  part of the proximal step of ``u2``, ``prox(v) = argmin_{u >= 0} 1/(2 tau) ||u - v||^2 +
  gamma2 ||Lap u||^2``. Without the constraint this is the filter ``1 / (1 + 2 tau gamma2
  lambda^2)`` in the DCT-II basis, which diagonalises the Neumann Laplacian exactly; with it,
  a few projected-gradient steps on the constraint's multiplier, warm-started from the
  previous iteration's (exact at once when the filtered image is non-negative, the usual
  case for a background, and exact in the limit otherwise);
* the prox of ``gamma1 ||.||_1`` plus non-negativity is the shifted ReLU
  ``max(v - tau gamma1, 0)``.

One iteration costs one application of ``H`` and one of ``H^T`` (``H`` of the extrapolated
point is the same combination of ``H`` of the iterates) and two DCTs (more while the prox's
constraint is active). Iterations stop when the proximal-gradient step at the extrapolated
point, relative to ``(u1, u2)``, falls below ``tol`` (it is zero exactly at a minimiser).

Every image-sized operation (the iterates, the Laplacian, the DCTs of the prox) asks
:mod:`pcmx._backend` for its library once, from the image: a CuPy image is restored on the GPU
(``cupyx.scipy.fft`` DCTs) and a NumPy image gives the same numbers as ever. Only the
operator's statistics for the default weights (a few PSFs) are computed on the host.

Default weights
---------------
``gamma1 = 4 sigma ||h||_2`` with ``sigma`` the noise standard deviation estimated from the
image (:func:`pcmx.noise.estimate_noise`: off any clipping plateau, never below the
quantisation floor ``q / sqrt(12)``, with a warning when degenerate) and ``||h||_2`` the
median l2 norm of the operator's PSFs over the field: at ``u1 = 0`` the optimality
condition is ``(H^T r)_p <= gamma1`` and for a residual of white noise ``(H^T r)_p`` has
standard deviation ``sigma ||h_p||_2``, so pure noise activates a pixel of ``u1`` with
probability about 3e-5 (a Gaussian tail at 4 sigma).

``gamma2 = l^4 / 2`` with ``l`` the background's smallest length scale in pixels
(``background_scale``, default twice the FWHM of the operator's PSF at the centre of the
field). The data term and the smoothness term are both quadratic in the intensities, so
``gamma2`` does not depend on the noise level or the photometric scale: it sets the cut-off
of the background's Wiener-like filter ``|H|^2 / (|H|^2 + 2 gamma2 omega^4)`` at
``omega = 1 / l``: structures wider than ``l`` go to ``u2``, point sources (width of the PSF)
cost far more there than in ``u1``.
"""

from __future__ import annotations

import os
import time

import numpy as np
import xarray as xr

from .. import _backend
from ..errors import InputError
from ..noise import estimate_noise
from .identify import check_family_grid, checked_image

__all__ = ["sparse_smooth", "deblur", "laplacian", "default_weights", "lipschitz_estimate"]

GAMMA1_FACTOR = 4.0
"""gamma1 = GAMMA1_FACTOR * sigma * ||h||_2 (see the module docstring)."""
BACKGROUND_SCALE_FWHM = 2.0
"""Default background length scale, in FWHMs of the PSF."""
_LIPSCHITZ_SAFETY = 1.02
SPARSE_STEP_SHARE = 0.1
"""``c`` of the block step sizes ``tau1 = 1 / ((1 + c) L)`` (u1), ``tau2 = c tau1`` (u2)."""
_BACKTRACK = 1.1  # step divided by this when the sufficient-decrease test fails


# --------------------------------------------------------------------------------------------
# small pieces
# --------------------------------------------------------------------------------------------
def laplacian(u):
    """5-point Laplacian with Neumann (mirror) boundaries, ``-(D_y^T D_y + D_x^T D_x) u``.

    Symmetric and negative semi-definite, eigenvalues in ``[-8, 0]``, diagonalised by the
    DCT-II (the constant image is its kernel).

    Parameters
    ----------
    u : array (ny, nx), NumPy or CuPy

    Returns
    -------
    array (ny, nx)
        Of ``u``'s library and dtype.
    """
    xp = _backend.xp(u)
    u = xp.asarray(u)
    out = xp.zeros_like(u)
    dy = xp.diff(u, axis=0)
    out[:-1] += dy
    out[1:] -= dy
    dx = xp.diff(u, axis=1)
    out[:, :-1] += dx
    out[:, 1:] -= dx
    return out


def _laplacian_eigenvalues(shape) -> np.ndarray:
    """Eigenvalues of ``-laplacian`` in the DCT-II basis, (ny, nx) float32."""
    ly = 2.0 - 2.0 * np.cos(np.pi * np.arange(shape[0]) / shape[0])
    lx = 2.0 - 2.0 * np.cos(np.pi * np.arange(shape[1]) / shape[1])
    return (ly[:, None] + lx[None, :]).astype(np.float32)


def _psf_stats(op) -> tuple[float, float]:
    """(median l2 norm of the PSFs over a 3 x 3 grid of the field, FWHM in pixels at the centre).

    Uses ``op.psf_at`` when the operator has it, else the response to a Dirac at the centre.
    """
    ny, nx = op.shape
    cy, cx = (ny - 1) // 2, (nx - 1) // 2
    if hasattr(op, "psf_at"):
        norms = [np.linalg.norm(np.asarray(op.psf_at(int(fy * (ny - 1)), int(fx * (nx - 1))), dtype=np.float64))
                 for fy in (0.2, 0.5, 0.8) for fx in (0.2, 0.5, 0.8)]
        psf = np.asarray(op.psf_at(cy, cx), dtype=np.float64)
    else:
        delta = np.zeros((ny, nx), dtype=np.float32)
        delta[cy, cx] = 1.0
        psf = np.asarray(op.apply(delta), dtype=np.float64)
        norms = [np.linalg.norm(psf)]
    peak = float(psf.max())
    # FWHM as the diameter of the disk with the area above half maximum (isotropic)
    area = float(np.count_nonzero(psf >= 0.5 * peak)) if peak > 0 else 1.0
    return float(np.median(norms)), float(max(1.0, 2.0 * np.sqrt(area / np.pi)))


def default_weights(image, op, *, sigma: float | None = None,
                    background_scale: float | None = None, warn: bool = True) -> dict:
    """The default ``gamma1``, ``gamma2`` of :func:`sparse_smooth` and what they come from.

    Parameters
    ----------
    image : array (y, x), NumPy or CuPy
    op : object with ``apply``, ``adjoint``, ``shape`` (``psf_at`` used when present)
    sigma : float, optional
        The noise level; estimated by :func:`pcmx.noise.estimate_noise` when None (which
        leaves out a clipping plateau and never goes below the quantisation floor).
    background_scale : float, optional
        ``l`` in pixels (default 2 PSF FWHMs).
    warn : bool
        Let :func:`pcmx.noise.estimate_noise` warn (a :class:`pcmx.PcmxWarning`) when its
        estimate is degenerate; the message is returned in ``noise_warning`` either way.

    Returns
    -------
    dict
        ``gamma1``, ``gamma2``, ``noise_sigma``, ``psf_l2``, ``psf_fwhm_px``,
        ``background_scale_px``, and the noise's provenance: ``noise_source`` (``"given"``
        or the ``source`` of :func:`pcmx.noise.estimate_noise`), ``noise_estimate`` (before
        the floor; -1 when there was none), ``noise_floor``, ``noise_clipped_fraction``,
        ``noise_warning`` ("" when none).
    """
    if sigma is None:
        info = estimate_noise(image, return_info=True, warn=warn)
        noise = {"noise_sigma": info["sigma"], "noise_source": info["source"],
                 "noise_estimate": -1.0 if info["estimate"] is None else float(info["estimate"]),
                 "noise_floor": info["floor"], "noise_clipped_fraction": float(info["clipped_fraction"]),
                 "noise_warning": info["warning"] or ""}
    else:
        noise = {"noise_sigma": float(sigma), "noise_source": "given", "noise_estimate": float(sigma),
                 "noise_floor": 0.0, "noise_clipped_fraction": 0.0, "noise_warning": ""}
    l2, fwhm = _psf_stats(op)
    ell = BACKGROUND_SCALE_FWHM * fwhm if background_scale is None else float(background_scale)
    if not ell > 0:
        raise InputError(f"background_scale={background_scale!r} must be a positive number of pixels")
    return {"gamma1": GAMMA1_FACTOR * noise["noise_sigma"] * l2, "gamma2": ell**4 / 2.0, **noise,
            "psf_l2": l2, "psf_fwhm_px": fwhm, "background_scale_px": ell}


def lipschitz_estimate(op, *, n_iter: int = 3, rtol: float = 1e-3, like=None) -> float:
    """``||H||^2`` by power iteration on ``H^T H`` started from the constant image.

    The largest singular vector of a blur (non-negative PSFs) is non-negative and smooth
    (Perron-Frobenius), so the constant image is a good start: a few iterations give the
    value within a few percent, where a random start needs a hundred at the size of a
    camera frame. Power iteration approaches the value from below: :func:`sparse_smooth`
    uses it as the initial guess of a backtracking line search, which corrects it. A cached
    :meth:`ProductConvolution.norm_estimate` is used when available.

    Parameters
    ----------
    op : object with ``apply``, ``adjoint`` and ``shape``
    n_iter : int
        Power iterations at most.
    rtol : float
        Stop when the estimate changes by less than this (relative).
    like : array, optional
        Iterate with this array's library (NumPy or CuPy, :mod:`pcmx._backend`); NumPy when
        None.

    Returns
    -------
    float
        The estimate of ``||H||^2`` (from below).
    """
    cached = getattr(op, "_norm", None)
    if cached is not None:
        return float(cached) ** 2
    xp = _backend.xp(like)  # NumPy for None
    x = xp.ones(tuple(op.shape), dtype=np.float32)
    x /= np.float32(xp.linalg.norm(x))
    lam = 0.0
    for _ in range(int(n_iter)):
        z = xp.asarray(op.adjoint(op.apply(x)), dtype=np.float32)
        new = float(xp.vdot(x, z))
        nz = float(xp.linalg.norm(z))
        if nz == 0:
            return 0.0
        x = z / np.float32(nz)
        if abs(new - lam) <= rtol * abs(new):
            lam = new
            break
        lam = new
    return float(lam)


def _as_engine(operator, boundary: str):
    from ..operator import ProductConvolution

    if isinstance(operator, ProductConvolution):
        return operator
    if isinstance(operator, xr.Dataset) or isinstance(operator, (str, os.PathLike)):
        return ProductConvolution(operator, boundary=boundary)
    if hasattr(operator, "apply") and hasattr(operator, "adjoint") and hasattr(operator, "shape"):
        return operator
    raise InputError(f"operator: expected an operator Dataset, store path or ProductConvolution, "
                     f"got {type(operator).__name__}")


def _check_weight(value, name: str) -> float | None:
    if value is None:
        return None
    v = float(value)
    if not np.isfinite(v) or v < 0:
        raise InputError(f"{name}={value!r} must be a finite non-negative number")
    return v


class _SmoothProx:
    """``argmin_{u >= 0} 1/(2 tau) ||u - v||^2 + gamma2 ||Lap u||^2``, warm-started dual ascent.

    With ``M = I + 2 tau gamma2 Lap^2`` (diagonal in the DCT-II basis), the solution is
    ``u = M^-1 (v + lambda)`` with the multiplier ``lambda >= 0`` of the constraint
    (``lambda . u = 0``), the minimiser of the dual ``1/2 (v + lambda)^T M^-1 (v + lambda)``
    over ``lambda >= 0``. Its gradient is ``u`` and ``||M^-1|| = 1``, so projected gradient
    with unit step is ``lambda <- max(lambda - u, 0)``. The multiplier is kept between calls:
    consecutive FISTA iterates ask for nearly the same prox, so a few steps per call suffice
    and the prox becomes exact as the iterates converge. When the filtered image is already
    non-negative (the usual case for a background above the estimated offset) the first
    step is the exact answer.
    """

    def __init__(self, shape, tau_gamma2: float, *, max_inner: int = 3, tol: float = 1e-4,
                 workers: int | None = -1, like=None) -> None:
        self.xp = _backend.xp(like)  # the arrays' library (NumPy for None)
        self._lam2 = self.xp.asarray(_laplacian_eigenvalues(shape) ** 2)
        self.set_step(tau_gamma2)
        self.max_inner = max_inner
        self.tol = tol
        self.workers = workers
        self.inner = 0
        self.multiplier = None

    def set_step(self, tau_gamma2: float) -> None:
        """Use ``M = I + 2 tau_gamma2 Lap^2`` (after a change of the step ``tau``)."""
        self.filter = (1.0 / (1.0 + 2.0 * tau_gamma2 * self._lam2)).astype(np.float32)

    def quadratic(self, v):
        """``M^-1 v``: the prox without the constraint (exact, two DCTs)."""
        fft = _backend.fft_module(v)
        kw = _backend.fft_kwargs(fft, self.workers)
        c = fft.dctn(v, type=2, norm="ortho", **kw)
        c *= self.filter
        return fft.idctn(c, type=2, norm="ortho", **kw).astype(np.float32, copy=False)

    def __call__(self, v):
        xp = _backend.xp(v)
        lam = self.multiplier
        scale = float(xp.abs(v).max()) if v.size else 0.0
        for _ in range(self.max_inner):
            u = self.quadratic(v if lam is None else v + lam)
            self.inner += 1
            neg = float(u.min())
            if lam is None:
                if neg >= 0.0:
                    return u
                lam = xp.zeros_like(u)
            # optimal when feasible and complementary (up to tol of the data's scale)
            active = lam > 0
            slack = float(xp.abs(u[active]).max()) if bool(xp.any(active)) else 0.0
            if neg >= -self.tol * scale and slack <= self.tol * scale:
                break
            lam = xp.maximum(lam - u, 0.0)
        self.multiplier = lam if lam is not None and bool(xp.any(lam > 0)) else None
        return xp.maximum(u, 0.0)


# --------------------------------------------------------------------------------------------
# Sparse+Smooth
# --------------------------------------------------------------------------------------------
def sparse_smooth(image, operator, *, gamma1: float | None = None, gamma2: float | None = None,
                  offset: float | None = None, max_iter: int = 300, tol: float = 1e-4,
                  restart: bool = True, background_scale: float | None = None,
                  boundary: str = "reflect", callback=None) -> xr.Dataset:
    """Sparse+Smooth deblurring with a known operator (paper App. D-b).

    Solves ``min_{u1, u2 >= 0} 1/2 ||H (u1 + u2) + b - y||^2 + gamma1 ||u1||_1 +
    gamma2 ||Lap u2||^2`` by FISTA with adaptive restart (see the module docstring).

    Parameters
    ----------
    image : array_like or DataArray (y, x)
        The blurred image ``y`` (photons or camera units; float32 is used). NumPy or CuPy:
        every image-sized operation runs on its library (:mod:`pcmx._backend`), and the
        results are of the same library.
    operator : ProductConvolution, operator Dataset or store path
        ``H`` on the image's grid (a Dataset or path is applied with ``boundary``); any object
        with ``apply``, ``adjoint`` and ``shape`` works (``psf_at`` is used when present).
    gamma1 : float, optional
        Weight of the l1 norm of the sparse part; ``4 sigma ||h||_2`` when None.
    gamma2 : float, optional
        Weight of the smoothness of the background; ``l^4 / 2`` when None (``l`` =
        ``background_scale``).
    offset : float, optional
        The camera offset ``b``; estimated jointly (variable projection) when None.
    max_iter : int
        Maximum FISTA iterations.
    tol : float
        Stop when the proximal-gradient step is small: ``||x_{k+1} - y_k|| <= tol ||x_{k+1}||``
        with ``x = (u1, u2)`` and ``y_k`` the extrapolated point (the step vanishes exactly at
        a minimiser). A small relative step is not a converged sparse part: on crowded
        scenes (sources 2-3 px apart, FWHM 3.5 px) the former default 5e-4 stopped after
        80 iterations with each source still spread over 5-8 pixels of ``u1`` and close
        pairs merged into one maximum (F1 0.82 on the 384 x 384 scene of
        ``docs/deblurring.md``, 0.80 on the 256 x 256 one of ``tests/test_deblur.py``).
        1e-4 takes 180-210 iterations there (F1 0.90 and 0.89, precision 1); running to
        convergence (3000 iterations) adds 0.01.
    restart : bool
        Gradient-based adaptive restart of the momentum (O'Donoghue & Candes).
    background_scale : float, optional
        ``l``, the background's smallest length scale in pixels (default 2 PSF FWHMs).
    boundary : str
        Boundary of a ``ProductConvolution`` built from a Dataset or path (default "reflect":
        no dark rims, so a constant background stays constant).
    callback : callable, optional
        ``callback(k, u1, u2, objective)`` after each iteration.

    Returns
    -------
    Dataset (pcmx_type "restoration")
        ``restored = sparse + smooth``, ``sparse`` (u1), ``smooth`` (u2), ``fit``
        (``H (u1 + u2) + b``), all (y, x) float32 (NumPy or CuPy, as the image) with the
        image's coordinates, and
        ``objective (iteration)``; attrs ``gamma1``, ``gamma2``, ``offset``, ``iterations``,
        ``converged``, ``noise_sigma`` and its provenance (``noise_source``,
        ``noise_estimate``, ``noise_floor``, ``noise_clipped_fraction``, ``noise_warning``:
        see :func:`default_weights`), ``lipschitz``, ``background_scale_px``, ``restarts``.

    Warns
    -----
    PcmxWarning
        When ``gamma1`` is None and the noise estimate is degenerate (quantised or clipped
        data: :func:`pcmx.noise.estimate_noise`); the same line is kept in ``noise_warning``.

    Raises
    ------
    InputError
        A non-finite image, an image off the operator's grid (shape or pixel size), negative
        or non-finite weights.
    """
    img = checked_image(image)
    op = _as_engine(operator, boundary)
    if tuple(op.shape) != tuple(img.shape):
        raise InputError(f"image: shape {tuple(img.shape)} does not match the operator's grid {tuple(op.shape)}")
    if isinstance(getattr(op, "dataset", None), xr.Dataset) and "y" in op.dataset.coords:
        check_family_grid(img, op.dataset, what="operator")
        if not any(img[d].attrs.get("units") not in (None, "pixel") for d in ("y", "x")):
            img = img.assign_coords(y=op.dataset["y"], x=op.dataset["x"])  # inherit physical coords
    gamma1, gamma2 = _check_weight(gamma1, "gamma1"), _check_weight(gamma2, "gamma2")
    if offset is not None and not np.isfinite(float(offset)):
        raise InputError(f"offset={offset!r} must be finite")
    if int(max_iter) != max_iter or max_iter < 1:
        raise InputError(f"max_iter={max_iter!r} must be a positive integer")
    if not tol >= 0:
        raise InputError(f"tol={tol!r} must be non-negative")
    t_start = time.perf_counter()
    data = img.data
    xp = _backend.xp(data)  # the one dispatch: NumPy in, NumPy out; CuPy in, CuPy out
    y = xp.ascontiguousarray(xp.asarray(data), dtype=np.float32)
    dw = default_weights(y, op, background_scale=background_scale, warn=gamma1 is None)
    g1 = dw["gamma1"] if gamma1 is None else gamma1
    g2 = dw["gamma2"] if gamma2 is None else gamma2
    lip = lipschitz_estimate(op, like=y) * _LIPSCHITZ_SAFETY
    if not lip > 0:
        raise InputError("operator: H is zero (its norm estimate is 0); nothing to deblur")
    share = SPARSE_STEP_SHARE
    tau = 1.0 / ((1.0 + share) * lip)  # u1's step; u2's is share * tau (see the module docstring)
    prox2 = _SmoothProx(y.shape, share * tau * g2, like=y)
    fixed_b = None if offset is None else float(offset)

    def dot(a, b) -> float:
        return float(xp.vdot(a, b))

    def residual(hx):
        r = hx - y
        b = -float(xp.mean(r, dtype=np.float64)) if fixed_b is None else fixed_b
        r += np.float32(b)
        return r, b

    def penalties(u1, u2):
        lap = laplacian(u2)
        return g1 * float(xp.sum(u1, dtype=np.float64)) + g2 * dot(lap, lap)

    u1 = xp.zeros_like(y)
    u2 = xp.zeros_like(y)
    hx = xp.zeros_like(y)
    v1, v2, hv = u1, u2, hx  # extrapolated point and H of it
    t = 1.0
    r0 = residual(hx)[0]
    history = [0.5 * dot(r0, r0)]
    restarts = backtracks = 0
    converged = False
    k = 0
    for k in range(1, int(max_iter) + 1):
        r, _ = residual(hv)
        f_v = 0.5 * dot(r, r)
        grad = xp.asarray(op.adjoint(r), dtype=np.float32)
        while True:  # backtracking on the step (Beck & Teboulle); rarely more than one pass
            tau32 = np.float32(tau)
            step = grad * tau32
            n1 = v1 - step
            n1 -= np.float32(tau * g1)
            xp.maximum(n1, 0.0, out=n1)
            step *= np.float32(share)
            step = xp.subtract(v2, step, out=step)
            n2 = prox2(step)
            hn = xp.asarray(op.apply(n1 + n2), dtype=np.float32)
            rn, _ = residual(hn)
            f_n = 0.5 * dot(rn, rn)
            e1, e2 = n1 - v1, n2 - v2
            bound = (f_v + dot(grad, e1) + dot(grad, e2)
                     + (dot(e1, e1) + dot(e2, e2) / share) / (2.0 * tau))
            if f_n <= bound + 1e-6 * abs(f_v) + 1e-12:
                break
            tau /= _BACKTRACK
            prox2.set_step(share * tau * g2)
            backtracks += 1
        d1, d2 = n1 - u1, n2 - u2
        # the proximal-gradient step at the extrapolated point: zero exactly at a minimiser
        change = np.sqrt(dot(e1, e1) + dot(e2, e2))
        size = np.sqrt(dot(n1, n1) + dot(n2, n2))
        if restart and dot(e1, d1) + dot(e2, d2) / share < 0:
            # gradient restart: <y_k - x_{k+1}, x_{k+1} - x_k> > 0 in the steps' metric
            # (O'Donoghue & Candes)
            t_new, beta = 1.0, 0.0
            restarts += 1
        else:
            t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
            beta = (t - 1.0) / t_new
        if beta > 0:
            bt = np.float32(beta)
            d1 *= bt
            d2 *= bt
            v1, v2 = n1 + d1, n2 + d2
            hv = hn - hx
            hv *= bt
            hv += hn
        else:
            v1, v2, hv = n1, n2, hn
        u1, u2, hx, t = n1, n2, hn, t_new
        history.append(f_n + penalties(u1, u2))
        if callback is not None:
            callback(k, u1, u2, history[-1])
        if k >= 5 and change <= tol * max(size, 1e-30):
            converged = True
            break
    r, b = residual(hx)
    elapsed = time.perf_counter() - t_start

    coords = {d: img[d] for d in ("y", "x")}
    dims = ("y", "x")
    ds = xr.Dataset(
        {
            "restored": (dims, u1 + u2, {"long_name": "restored image u1 + u2 (offset removed)"}),
            "sparse": (dims, u1, {"long_name": "sparse component u1 (point sources)"}),
            "smooth": (dims, u2, {"long_name": "smooth component u2 (background above the offset)"}),
            "fit": (dims, (hx + np.float32(b)).astype(np.float32), {"long_name": "H (u1 + u2) + b"}),
            "objective": ("iteration", np.asarray(history, dtype=np.float64)),
        },
        coords=coords,
        attrs={
            "pcmx_type": "restoration", "method": "sparse_smooth",
            "gamma1": float(g1), "gamma2": float(g2), "offset": float(b),
            "offset_estimated": fixed_b is None, "iterations": int(k), "converged": bool(converged),
            "restarts": int(restarts), "prox_inner_iterations": int(prox2.inner),
            "noise_sigma": float(dw["noise_sigma"]), "noise_source": dw["noise_source"],
            "noise_estimate": float(dw["noise_estimate"]), "noise_floor": float(dw["noise_floor"]),
            "noise_clipped_fraction": float(dw["noise_clipped_fraction"]),
            "noise_warning": dw["noise_warning"], "lipschitz": float(1.0 / ((1.0 + share) * tau)),
            "backtracks": int(backtracks),
            "background_scale_px": float(dw["background_scale_px"]),
            "psf_fwhm_px": float(dw["psf_fwhm_px"]), "psf_l2": float(dw["psf_l2"]),
            "seconds": round(elapsed, 3),
        },
    )
    for d in ("y", "x"):
        ds[d].attrs = dict(img[d].attrs)
    return ds


# --------------------------------------------------------------------------------------------
# BSS: identification + Sparse+Smooth
# --------------------------------------------------------------------------------------------
_IDENTIFY_KEYS = ("psf_radius", "gamma0")
_SS_KEYS = ("offset", "max_iter", "tol", "restart", "background_scale", "boundary", "callback")


def deblur(image, family=None, *, operator=None, positions=None, n_sources: int | None = None,
           gamma1: float | None = None, gamma2: float | None = None, **kw) -> xr.Dataset:
    """Blind Sparse+Smooth (BSS) deblurring with a family, or Sparse+Smooth with an operator
    (paper App. D).

    With ``family``: the operator is identified from the image's isolated point sources
    (:func:`pcmx.deblur.identify_operator`), then the image is restored with it
    (:func:`sparse_smooth`). With ``operator``: the restoration alone.

    Parameters
    ----------
    image : path, array or DataArray (y, x)
    family : Dataset or path, optional
        A family of operators (blind deblurring).
    operator : operator Dataset, store path or ProductConvolution, optional
        A known operator (non-blind). Exactly one of ``family`` and ``operator``.
    positions, n_sources :
        Point sources for the identification (see :func:`identify_operator`).
    gamma1, gamma2 : float, optional
        Weights of :func:`sparse_smooth` (set from the noise level when None).
    **kw
        ``psf_radius``, ``gamma0`` (identification); ``offset``, ``max_iter``, ``tol``,
        ``restart``, ``background_scale``, ``boundary``, ``callback`` (restoration).

    Returns
    -------
    Dataset (pcmx_type "restoration", valid against ``schemas/restoration.json``)
        ``restored``, ``sparse``, ``smooth``, ``fit`` (y, x) with the image's coordinates
        and units, ``objective``; with a family also ``gamma (component, mode)``,
        ``state_weights (state)``, the sources used (``source_y``, ``source_x``,
        ``source_amplitude``, ``source_residual`` over ``id_source``) and the attr
        ``identification_residual``; provenance in ``pcmx_parameters`` (the weights used,
        offset, iterations, timings).

    Raises
    ------
    InputError
        Both or neither of ``family``/``operator``; unknown keywords; and the errors of
        :func:`identify_operator` and :func:`sparse_smooth`.
    """
    from ..io.readers import as_image
    from ..provenance import provenance

    if (family is None) == (operator is None):
        raise InputError("deblur: give exactly one of family= (blind: identify the operator, then "
                         "restore) or operator= (non-blind)")
    unknown = set(kw) - set(_IDENTIFY_KEYS) - set(_SS_KEYS)
    if unknown:
        raise InputError(f"deblur: unknown keyword(s) {sorted(unknown)}; expected among "
                         f"{sorted(_IDENTIFY_KEYS + _SS_KEYS)}")
    if family is None and (positions is not None or n_sources is not None
                           or any(k in kw for k in _IDENTIFY_KEYS)):
        raise InputError("deblur: positions/n_sources/psf_radius/gamma0 are for blind identification "
                         "with family=, not with operator=")
    inputs = [x for x in (image, family, operator) if isinstance(x, (str, os.PathLike))]
    img = as_image(image)
    timings = {}
    ident = None
    if family is not None:
        from .identify import identify_operator

        t0 = time.perf_counter()
        ident = identify_operator(img, family, positions=positions, n_sources=n_sources,
                                  **{k: kw[k] for k in _IDENTIFY_KEYS if k in kw})
        timings["identify"] = time.perf_counter() - t0
        op_in = ident.operator
    else:
        op_in = operator
    t0 = time.perf_counter()
    ds = sparse_smooth(img, op_in, gamma1=gamma1, gamma2=gamma2,
                       **{k: kw[k] for k in _SS_KEYS if k in kw})
    timings["restore"] = time.perf_counter() - t0
    solver = dict(ds.attrs)
    solver.pop("pcmx_type", None)
    params = {**solver, "mode": "blind" if family is not None else "known operator",
              "gamma1_given": gamma1, "gamma2_given": gamma2,
              **{k: v for k, v in kw.items() if k != "callback"},
              "timings_s": {k: round(v, 4) for k, v in timings.items()}}
    if ident is not None:
        ds = ds.merge(ident.to_dataset(), combine_attrs="override")
        params.update({"identification_residual": float(ident.residual),
                       "identification_iterations": int(ident.iterations),
                       "n_sources_used": int(len(ident.positions)),
                       "psf_radius": int(ident.info["psf_radius"])})
    ds.attrs = {"pcmx_type": "restoration", **provenance(params, inputs),
                **{k: v for k, v in solver.items() if isinstance(v, (int, float, str, bool))}}
    if ident is not None:
        ds.attrs["identification_residual"] = float(ident.residual)
    return ds
