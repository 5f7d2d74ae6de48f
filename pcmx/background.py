"""Background estimation and removal for bead patches (paper App. B).

Two estimators, both vectorised over all beads:

``"local"`` -- the paper's (App. B, eq. (8))
    A degree-2 polynomial (``1, y, x, y^2, yx, x^2``; 10 monomials in 3D) is fitted by least
    squares to the pixels of each patch outside the disk of radius ``r``, and subtracted. All
    patches share the same pixel grid, so the fits are one matrix product with the
    pseudo-inverse of the masked design matrix.

``"global"`` -- a smooth background of the whole image with the beads masked
    Pixels near beads are masked: boxes of half side ``2.5 r`` around the given positions (all
    detections), then, against that first estimate, ``r / 2`` around every pixel where the
    band-passed residual rises above the noise (halos, undetected beads) and outliers. A
    tensor-product cubic B-spline with knots every ``~4 r`` pixels is fitted by weighted least
    squares to all unmasked pixels (the normal equations accumulated axis by axis with sparse
    products), with a small third-difference penalty that fills the holes left by the beads
    and extrapolates to the borders; it is evaluated at every patch pixel.

Real PSFs have wings beyond any practical ``r`` (Airy rings, aberration halos). The local fit
sees those wings as background and subtracts them from the whole patch: it removes part of
every bead's own light, a bias proportional to the bead's brightness. The global estimate sees
far fewer wing pixels. :func:`pcmx.truth.background_bias` measures both against the simulator's truth
(see ``docs/background.md``); the least biased, ``"global"``, is the default. Either way the
camera offset is part of the background and disappears with it.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.ndimage as ndi
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import xarray as xr

from .beads import (
    as_image_array,
    as_positions,
    normalised_radius,
    offset_grids,
    radius_vector,
)
from .errors import InputError
from .execution import blas_limit
from .noise import quantisation_step, robust_sigma
from .units import PIXEL_ALIASES

__all__ = [
    "METHODS",
    "DEFAULT_METHOD",
    "polynomial_design",
    "local_background",
    "global_background",
    "background_at",
    "background_image",
    "fit_cell_spline",
    "fit_masked_spline",
    "patch_coordinates",
    "subtract_background",
]

METHODS = ("global", "local")
#: The least biased estimator measured by :func:`pcmx.truth.background_bias` (docs/background.md).
DEFAULT_METHOD = "global"
_KERNEL_DIMS = ("kz", "ky", "kx")
_SPATIAL_DIMS = ("z", "y", "x")


def _patch_array(patches) -> tuple[np.ndarray, int]:
    if isinstance(patches, xr.DataArray):
        data = patches.values
    else:
        data = np.asarray(patches)
    if data.ndim not in (3, 4):
        raise InputError(f"patches: expected dims (bead, ky, kx) or (bead, kz, ky, kx), got "
                         f"{data.ndim} dimensions with shape {data.shape}")
    if any(s % 2 == 0 for s in data.shape[1:]):
        raise InputError(f"patches: kernel sides must be odd, got shape {data.shape[1:]}")
    return data, data.ndim - 1


def _radius_of(patches, r, nd: int) -> np.ndarray:
    if r is None:
        if isinstance(patches, xr.DataArray) and "psf_radius" in patches.attrs:
            r = patches.attrs["psf_radius"]
        else:
            raise InputError("r: the PSF radius is needed (patches carry no psf_radius attribute)")
    return radius_vector(r, nd)


# --------------------------------------------------------------------------------------------
# local (paper): degree-2 polynomial outside the disk of radius r
# --------------------------------------------------------------------------------------------
def polynomial_design(kernel_shape, degree: int = 2) -> np.ndarray:
    """Monomials of total degree <= ``degree`` in the kernel offsets (scaled to [-1, 1]).

    Returns
    -------
    ndarray float64 (n_pixels, P)
        ``P = 6`` in 2D and ``10`` in 3D for degree 2 (App. B).
    """
    half = [s // 2 for s in kernel_shape]
    grids = np.meshgrid(*[g / max(h, 1) for g, h in zip(offset_grids(half), half, strict=True)],
                        indexing="ij")
    flat = [g.ravel() for g in grids]
    nd = len(flat)
    cols = []
    exps = [e for e in np.ndindex(*([degree + 1] * nd)) if sum(e) <= degree]
    exps.sort(key=lambda e: (sum(e), tuple(-x for x in e)))
    for e in exps:
        col = np.ones_like(flat[0])
        for d in range(nd):
            if e[d]:
                col = col * flat[d] ** e[d]
        cols.append(col)
    return np.stack(cols, axis=1)


def local_background(patches, r=None, *, degree: int = 2) -> np.ndarray:
    """The paper's background of each patch (App. B, eq. (8)).

    Least squares fit of a degree-``degree`` polynomial to the pixels outside the disk of
    radius ``r`` (the domain omega), for all patches at once:
    ``lambda = pinv(M_omega) p_omega``, background ``M lambda``.

    Parameters
    ----------
    patches : DataArray or ndarray (bead, ky, kx) or (bead, kz, ky, kx)
    r : float or sequence, optional
        PSF radius (pixels); the patches' ``psf_radius`` attribute when None.

    Returns
    -------
    ndarray float32, the patches' shape

    Raises
    ------
    InputError
        Fewer pixels outside the disk than monomials (r too large for the patch).
    """
    data, nd = _patch_array(patches)
    rv = _radius_of(patches, r, nd)
    kshape = data.shape[1:]
    design = polynomial_design(kshape, degree)
    rho = normalised_radius([s // 2 for s in kshape], rv).ravel()
    omega = rho >= 1.0
    if omega.sum() < 2 * design.shape[1]:
        raise InputError(f"r={rv.tolist()}: only {int(omega.sum())} patch pixels lie outside the "
                         f"disk of radius r; need at least {2 * design.shape[1]} to fit the background")
    pinv = np.linalg.pinv(design[omega])  # (P, |omega|)
    flat = data.reshape(len(data), -1).astype(np.float64)
    lam = flat[:, omega] @ pinv.T  # (M, P)
    return (lam @ design.T).reshape(data.shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# global: smooth background of the whole image, beads masked
# --------------------------------------------------------------------------------------------
# averages over cells j-2..j+2 of the cubic B-spline centred on cell j: [1, 76, 230, 76, 1] / 384
_HISTO = np.array([1.0, 76.0, 230.0, 76.0, 1.0]) / 384.0
#: Extra spline coefficients beyond the outer cells, per side (free, set by the smoothness term).
_GHOST = 2
#: Default largest number of blocks per axis (the background is smooth; keeps the solve small).
_MAX_BLOCKS = 32
#: Order of the differences penalised by the smoothness term (3: holes and borders are filled
#: by continuing the curvature, so a curved background is extrapolated without a kink).
_PENALTY_ORDER = 3


def _histopolation_matrix(n: int) -> sp.csr_matrix:
    """``(n, n + 2 _GHOST)``: cell averages of a cubic spline from its coefficients."""
    rows = np.repeat(np.arange(n), 5)
    cols = (np.arange(n)[:, None] + _GHOST + np.arange(-2, 3)[None, :]).ravel()
    return sp.csr_matrix((np.tile(_HISTO, n), (rows, cols)), shape=(n, n + 2 * _GHOST))


def _difference(m: int, order: int = _PENALTY_ORDER) -> sp.csr_matrix:
    """Finite differences of the given order, ``(m - order, m)``."""
    if m <= order:
        return sp.csr_matrix((0, m))
    taps = np.diff(np.eye(order + 1), n=order, axis=0)[0]  # e.g. [-1, 3, -3, 1]
    return sp.diags([np.full(m - order, t) for t in taps], list(range(order + 1)),
                    shape=(m - order, m), format="csr")


def _kron_axis(mats: list, ax: int, op) -> sp.csr_matrix:
    """``I x ... x op x ... x I`` with ``op`` on axis ``ax``."""
    out = None
    for d, m in enumerate(mats):
        f = op if d == ax else sp.identity(m, format="csr")
        out = f if out is None else sp.kron(out, f, format="csr")
    return out


def fit_cell_spline(means: np.ndarray, weights: np.ndarray, *, smoothing: float = 1e-4) -> np.ndarray:
    """Cubic B-spline coefficients whose cell averages fit ``means`` (weighted), smoothly.

    Minimises ``sum_j w_j (A c - m)_j^2 + smoothing * mean(w) * sum_axes ||D3 c||^2`` where
    ``A`` gives the average of the spline over each cell (``[1, 76, 230, 76, 1] / 384`` along
    each axis: a "histopolation", so a background in the spline space is reproduced without
    the bias that point interpolation of cell means has where the background curves) and
    ``D3`` the third differences of the coefficients along each axis. Cells with zero weight
    (covered by beads) and the ``_GHOST`` outer coefficients are set by the smoothness term,
    i.e. interpolated and extrapolated continuing the curvature. One linear solve.

    Returns
    -------
    ndarray float64, ``means.shape + 2 * _GHOST`` per axis
    """
    means = np.asarray(means, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64).ravel()
    if not np.any(w > 0):
        raise InputError("image: every block of the image is covered by beads; no pixel is left "
                         "to estimate the background (use background='local')")
    ext = [n + 2 * _GHOST for n in means.shape]
    a = None
    for n in means.shape:
        h = _histopolation_matrix(n)
        a = h if a is None else sp.kron(a, h, format="csr")
    lam = smoothing * float(w[w > 0].mean())
    lhs = a.T @ sp.diags(w) @ a + lam * _penalty(ext) + 1e-10 * lam * sp.identity(a.shape[1])
    rhs = a.T @ (w * means.ravel())
    return _solve(lhs, rhs).reshape(ext)


def _penalty(ext: list[int]) -> sp.csr_matrix:
    """Third differences of the coefficients along each axis, plus a little of the second ones
    so that an axis with fewer cells than a quadratic needs (one or two blocks) is
    extrapolated linearly, not arbitrarily."""
    reg = 0
    for d, m in enumerate(ext):
        d3 = _kron_axis(ext, d, _difference(m))
        d2 = _kron_axis(ext, d, _difference(m, 2))
        reg = reg + d3.T @ d3 + 1e-3 * (d2.T @ d2)
    return reg


def _solve(lhs: sp.spmatrix, rhs: np.ndarray) -> np.ndarray:
    """Solve the symmetric positive definite, banded normal equations."""
    n = lhs.shape[0]
    coo = lhs.tocoo()
    band = int(np.max(np.abs(coo.col - coo.row))) if coo.nnz else 0
    if n <= 300:
        return scipy.linalg.solve(lhs.toarray(), rhs, assume_a="pos")
    if band < n // 4:  # banded Cholesky: n band^2 operations
        ab = np.zeros((band + 1, n))
        upper = coo.col >= coo.row
        ab[band + coo.row[upper] - coo.col[upper], coo.col[upper]] = coo.data[upper]
        # one BLAS thread: this small banded factorisation is slower with several (measured
        # 6 ms with one, 0.3-0.6 s with two on a busy 2-core machine)
        with blas_limit(1):
            return scipy.linalg.solveh_banded(ab, rhs)
    return spla.spsolve(lhs.tocsc(), rhs)


def _basis_sparse(coords: np.ndarray, n: int) -> sp.csr_matrix:
    """``(n, K)`` cubic B-spline values of the K coefficients at pixels ``0..n-1`` (4 per row)."""
    t = _index(coords, np.arange(n))
    k = len(coords)
    fl = np.floor(t).astype(np.int64)
    u = t - fl
    w = np.stack([(1 - u) ** 3 / 6, (3 * u**3 - 6 * u**2 + 4) / 6,
                  (-3 * u**3 + 3 * u**2 + 3 * u + 1) / 6, u**3 / 6], axis=1)
    cols = np.clip(fl[:, None] - 1 + np.arange(4)[None, :], 0, k - 1)
    return sp.csr_matrix((w.ravel(), (np.repeat(np.arange(n), 4), cols.ravel())), shape=(n, k))


def _contract(t: np.ndarray, mats: list[sp.csr_matrix]) -> np.ndarray:
    """``t`` contracted along each axis d with ``mats[d]`` (n_d x q_d): ``(q_0, q_1, ...)``."""
    for d, mat in enumerate(mats):
        moved = np.moveaxis(t, d, 0)
        out = mat.T @ moved.reshape(moved.shape[0], -1)
        t = np.moveaxis(np.asarray(out).reshape((mat.shape[1],) + moved.shape[1:]), 0, d)
    return t


def fit_masked_spline(image: np.ndarray, weights: np.ndarray, coords: list[np.ndarray], *,
                      smoothing: float = 1e-4) -> np.ndarray:
    """Weighted least-squares cubic B-spline fit to every unmasked pixel, smoothly.

    Minimises ``sum_p w_p (s(p) - u_p)^2 + lambda sum_axes (||D3 c||^2 + 1e-3 ||D2 c||^2)``
    with ``lambda = smoothing`` x the number of unmasked pixels per coefficient. Fitting the
    pixels themselves (not block means) is exact for a background in the spline space however
    the mask cuts the blocks: the mean of a partly masked block is the background at the
    centroid of its unmasked pixels, not at its centre, a bias of (gradient x offset). Holes
    (blocks covered by beads) and the ``_GHOST`` outer coefficients are set by the smoothness
    term. The normal equations of the tensor-product basis are accumulated axis by axis with
    sparse products (``~16`` products per pixel), then solved once.

    Parameters
    ----------
    image, weights : ndarray, same shape
    coords : list of ndarray
        Pixel positions of the coefficients along each axis (uniform; see
        :func:`global_background`).

    Returns
    -------
    ndarray float64 of shape ``tuple(len(c) for c in coords)``
    """
    w = np.asarray(weights, dtype=np.float32)
    if not np.any(w > 0):
        raise InputError("image: every block of the image is covered by beads; no pixel is left "
                         "to estimate the background (use background='local')")
    ks = [len(c) for c in coords]
    bases = [_basis_sparse(c, n) for c, n in zip(coords, image.shape, strict=True)]
    offsets = np.arange(-3, 4)
    pairs = []
    for b, k in zip(bases, ks, strict=True):
        cols = []
        for o in offsets:  # column (o, j): b_j(x) b_{j+o}(x)
            shifted = sp.csr_matrix((b.shape[0], k))
            if abs(o) < k:
                sl = b[:, max(o, 0):k + min(o, 0)]
                shifted = sp.hstack([sp.csr_matrix((b.shape[0], max(-o, 0))), sl,
                                     sp.csr_matrix((b.shape[0], max(o, 0)))], format="csr")
            cols.append(b.multiply(shifted))
        pairs.append(sp.hstack(cols, format="csr"))
    gram = _contract(w.astype(np.float64), pairs)  # (7 k_0, 7 k_1, ...)
    rhs = _contract((w * image).astype(np.float64), bases).ravel()
    # assemble N[(j_0, ...), (j_0 + o_0, ...)] = gram[(o_0, j_0), ...]
    grids = np.meshgrid(*[np.arange(7 * k) for k in ks], indexing="ij")
    row = np.zeros(grids[0].shape, dtype=np.int64)
    col = np.zeros(grids[0].shape, dtype=np.int64)
    ok = np.ones(grids[0].shape, dtype=bool)
    for d, (g, k) in enumerate(zip(grids, ks, strict=True)):
        o, j = offsets[g // k], g % k
        ok &= (j + o >= 0) & (j + o < k)
        stride = int(np.prod(ks[d + 1:]))
        row += j * stride
        col += (j + o) * stride
    vals = gram[ok]
    size = int(np.prod(ks))
    normal = sp.csr_matrix((vals, (row[ok], col[ok])), shape=(size, size))
    lam = smoothing * float(w.sum()) / size
    lhs = normal + lam * _penalty(ks) + 1e-10 * max(lam, 1e-12) * sp.identity(size)
    return _solve(lhs, rhs).reshape(ks)


def _coefficient_coords(edges: np.ndarray) -> np.ndarray:
    """Pixel positions of the spline coefficients of a block grid (cell centres, plus
    ``_GHOST`` extrapolation cells on each side); a single block spans the whole axis."""
    c = (edges[:-1] + edges[1:] - 1) / 2.0
    step = (c[-1] - c[0]) / (len(c) - 1) if len(c) > 1 else float(edges[-1] - edges[0])
    return c[0] + step * (np.arange(len(c) + 2 * _GHOST) - _GHOST)


def _index(coords: np.ndarray, x) -> np.ndarray:
    """Continuous coefficient index of pixel coordinates ``x``."""
    return (np.asarray(x, dtype=np.float64) - coords[0]) / (coords[1] - coords[0])


def _bspline_weights(t: np.ndarray, ncoef: int) -> np.ndarray:
    """Dense ``(len(t), ncoef)`` cubic B-spline evaluation matrix at coefficient indices t."""
    fl = np.floor(t).astype(np.int64)
    u = t - fl
    w = np.stack([(1 - u) ** 3 / 6, (3 * u**3 - 6 * u**2 + 4) / 6,
                  (-3 * u**3 + 3 * u**2 + 3 * u + 1) / 6, u**3 / 6], axis=1)
    out = np.zeros((len(t), ncoef))
    for j in range(4):
        col = np.clip(fl - 1 + j, 0, ncoef - 1)
        np.add.at(out, (np.arange(len(t)), col), w[:, j])
    return out


def _evaluate_grid(coef: np.ndarray, coords: list[np.ndarray], shape) -> np.ndarray:
    """The spline at every pixel, separably (one small matrix per axis), float32."""
    out = coef
    for d, (c, n) in enumerate(zip(coords, shape, strict=True)):
        w = _bspline_weights(_index(c, np.arange(n)), coef.shape[d])
        out = np.moveaxis(np.tensordot(w, out, axes=([1], [d])), 0, d)
    return out.astype(np.float32)


def _block_medians(img: np.ndarray, edges: list[np.ndarray]) -> np.ndarray:
    """Median of up to 8 evenly spaced samples per block and axis, for every block at once."""
    nd = img.ndim
    sample_idx = []
    for d, e in enumerate(edges):
        k = int(min(8, np.diff(e).min()))
        off = np.floor((np.arange(k) + 0.5) * np.diff(e)[:, None] / k).astype(np.int64)
        shape = [1] * (2 * nd)
        shape[2 * d], shape[2 * d + 1] = len(e) - 1, k
        sample_idx.append((e[:-1, None] + off).reshape(shape))
    samples = img[tuple(sample_idx)]  # (nb_0, k_0, nb_1, k_1, ...)
    samples = samples.transpose(list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2)))
    return np.median(samples.reshape(samples.shape[:nd] + (-1,)), axis=-1).astype(np.float64)


def _block_edges(n: int, block: int) -> np.ndarray:
    nb = max(1, int(round(n / block)))
    return np.round(np.linspace(0, n, nb + 1)).astype(np.int64)


def _block_sums(a: np.ndarray, edges: list[np.ndarray]) -> np.ndarray:
    out = a
    for d, e in enumerate(edges):
        out = np.add.reduceat(out, e[:-1], axis=d, dtype=np.float64)
    return out


def global_background(image, positions=None, r=None, *, block=None, mask_radius=None,
                      snr: float = 5.0, clip: float = 5.0, smoothing: float = 1e-4,
                      passes: int = 2, max_masked: float = 0.6) -> xr.DataArray:
    """A smooth background of the whole image estimated with the beads masked.

    1. Mask boxes of half side ``mask_radius`` (default ``2.5 r``) around the given positions
       (in crowded fields the default shrinks until at most ``max_masked`` of the pixels are
       masked) and fit the spline of step 3 (without positions: fit the block medians).
    2. Against the current estimate, also mask pixels within ``r / 2`` of a pixel where the
       residual, band-passed (a 2-pixel Gaussian blur minus a 13-pixel box mean), exceeds
       ``snr`` times its noise (bright halos, undetected beads), and pixels deviating by more
       than ``clip`` robust sigmas (hot pixels). The noise has a floor (quantisation, or 1e-3
       of the median level) so that noise-free images are not masked everywhere.
    3. Fit a cubic B-spline with a knot every ``block`` pixels to every unmasked pixel by
       weighted least squares (:func:`fit_masked_spline`); holes and borders are filled by
       its smoothness term. :func:`background_at` and :func:`background_image` evaluate it.

    Steps 2-3 run ``passes - 1`` times.

    Parameters
    ----------
    image : array_like or DataArray, (y, x) or (z, y, x)
    positions : array_like (N, ndim), optional
        Beads to mask for sure (all detections, not only the kept ones, is best).
    r : float or sequence, optional
        PSF radius (pixels); sets the default block (``max(16, 4 r, side / 32)``; at least 4
        planes along z) and mask radius (``ceil(2.5 r)``). 8 pixels when None.
    block : int or sequence, optional
        Knot spacing in pixels.
    mask_radius : float or sequence, optional
    snr, clip : float
        Mask thresholds (see above).
    smoothing : float
        Relative weight of the smoothness term of :func:`fit_masked_spline`.
    passes : int
        Number of mask-and-fit passes.
    max_masked : float
        In crowded fields the default mask radius shrinks (``2.5 r`` to ``2 r``, ``1.5 r``,
        ``1.2 r``, ``r``) until at most this fraction of the pixels is masked, and a later
        pass's mask that would mask more (than this and than the first pass) is not used.

    Returns
    -------
    DataArray float64, dims ("y", "x") or ("z", "y", "x")
        The spline coefficients; coords are their pixel positions (the block centres, plus
        ``2`` extrapolation knots beyond each border). attrs: ``block``, ``mask_radius``,
        ``masked_fraction``, ``empty_blocks``, ``noise``, ``shape``.
    """
    img = as_image_array(image)
    nd = img.ndim
    rv = radius_vector(8.0 if r is None else r, nd)
    if block is None:  # ~4 r, at least 16 pixels (4 planes), at most _MAX_BLOCKS per axis
        least = np.array([4, 16, 16][-nd:]) if nd == 3 else np.array([16, 16])
        blk = np.maximum(np.maximum(least, np.ceil(4 * rv)),
                         np.ceil(np.asarray(img.shape) / _MAX_BLOCKS)).astype(np.int64)
    else:
        blk = np.broadcast_to(np.asarray(block, dtype=np.int64), (nd,)).copy()
    if np.any(blk < 2):
        raise InputError(f"block={block!r} must be at least 2 pixels")
    blk = np.minimum(blk, img.shape)
    mr = (np.ceil(2.5 * rv) if mask_radius is None
          else radius_vector(mask_radius, nd, name="mask_radius")).astype(np.int64)
    sr = np.ceil(rv / 2).astype(np.int64)  # margin around pixels above the noise
    edges = [_block_edges(n, b) for n, b in zip(img.shape, blk, strict=True)]
    centres = [_coefficient_coords(e) for e in edges]
    counts = np.ones([len(e) - 1 for e in edges])
    for d, e in enumerate(edges):
        shape = [1] * nd
        shape[d] = len(e) - 1
        counts = counts * np.diff(e).reshape(shape)
    # noise floor: quantisation of integer images, else 1e-3 of the median level (noise-free
    # simulations would otherwise mask every rounding error of the fit)
    floor = max(quantisation_step(img) / np.sqrt(12.0) / 4,
                1e-3 * float(np.median(np.abs(img[tuple(slice(None, None, 4) for _ in range(nd))]))),
                1e-12)
    seeds0 = None
    if positions is not None and len(as_positions(positions, nd)):
        pos = as_positions(positions, nd)
        ci = np.clip(np.rint(pos).astype(np.int64), 0, np.asarray(img.shape) - 1)
        seeds0 = np.zeros(img.shape, dtype=bool)
        seeds0[tuple(ci.T)] = True

    def _fit(masked):
        return fit_masked_spline(img, (~masked).astype(np.float32), centres, smoothing=smoothing)

    # 1. first estimate: the given beads masked, else block medians (robust to beads)
    if seeds0 is not None:
        mask0 = ndi.maximum_filter(seeds0.view(np.uint8), size=tuple(2 * mr + 1)).astype(bool)
        if mask_radius is None:  # crowded fields: shrink the mask until enough pixels are left
            for f in (2.0, 1.5, 1.2, 1.0):
                if mask0.mean() <= max_masked:
                    break
                mr = np.ceil(f * rv).astype(np.int64)
                mask0 = ndi.maximum_filter(seeds0.view(np.uint8),
                                           size=tuple(2 * mr + 1)).astype(bool)
        masked = mask0
        coef = _fit(masked)
    else:
        masked = np.zeros(img.shape, dtype=bool)
        coef = fit_cell_spline(_block_medians(img, edges), np.ones(counts.shape),
                               smoothing=smoothing)
    noise = float("nan")
    for _ in range(max(passes - 1, 0)):
        # 2. mask beads and outliers against the current estimate: band-pass (a 2-pixel blur
        # minus a 13-pixel box mean) to find compact bright things, not the estimate's slow
        # errors; 3.-4. cell means and the spline
        resid = img - _evaluate_grid(coef, centres, img.shape)
        noise = max(robust_sigma(resid), floor)
        hp = ndi.gaussian_filter(resid, 2.0)
        hp -= ndi.uniform_filter(resid, size=13)
        seeds = hp > snr * max(robust_sigma(hp), floor)
        extra = ndi.maximum_filter(seeds.view(np.uint8), size=tuple(2 * sr + 1)).astype(bool)
        extra |= np.abs(resid) > clip * noise
        new = extra if seeds0 is None else (extra | mask0)
        if new.mean() > max(max_masked, masked.mean()):
            break  # the faint-signal mask would leave too little: keep the previous estimate
        masked = new
        coef = _fit(masked)
    coords = {d: (d, c, {"units": "pixel"})
              for d, c in zip(_SPATIAL_DIMS[-nd:], centres, strict=True)}
    return xr.DataArray(
        coef, dims=_SPATIAL_DIMS[-nd:], coords=coords, name="background_spline",
        attrs={"block": blk.tolist(), "mask_radius": mr.tolist(),
               "masked_fraction": float(masked.mean()),
               "empty_blocks": int((_block_sums((~masked).astype(np.float32), edges) == 0).sum()),
               "noise": float(noise), "shape": list(img.shape)})


def _coef_index(background: xr.DataArray, d: int, x: np.ndarray) -> np.ndarray:
    return _index(background[background.dims[d]].values.astype(np.float64), x)


def background_at(background: xr.DataArray, points) -> np.ndarray:
    """Evaluate a :func:`global_background` at pixel positions.

    Parameters
    ----------
    background : DataArray from :func:`global_background`
    points : array_like (..., ndim)
        Pixel coordinates (sub-pixel allowed).

    Returns
    -------
    ndarray float32 (...)
    """
    nd = background.ndim
    pts = np.asarray(points, dtype=np.float64)
    if pts.shape[-1] != nd:
        raise InputError(f"points: last axis must have {nd} coordinates, got shape {pts.shape}")
    flat = [_coef_index(background, d, pts[..., d].ravel()) for d in range(nd)]
    vals = ndi.map_coordinates(background.values, flat, order=3, mode="nearest", prefilter=False)
    return vals.reshape(pts.shape[:-1]).astype(np.float32)


def background_image(background: xr.DataArray, shape=None) -> np.ndarray:
    """A :func:`global_background` evaluated at every pixel (float32, separable evaluation)."""
    shape = tuple(background.attrs["shape"]) if shape is None else tuple(shape)
    out = background.values
    for d, n in enumerate(shape):
        w = _bspline_weights(_coef_index(background, d, np.arange(n)), out.shape[d])
        out = np.moveaxis(np.tensordot(w, out, axes=([1], [d])), 0, d)
    return out.astype(np.float32)


def patch_coordinates(patches: xr.DataArray, positions=None) -> np.ndarray:
    """Pixel coordinates ``(bead, k..., ndim)`` of every patch sample (centre + offsets)."""
    data, nd = _patch_array(patches)
    if positions is None:
        dims = _SPATIAL_DIMS[-nd:]
        missing = [f"bead_{d}" for d in dims if f"bead_{d}" not in patches.coords]
        if missing:
            raise InputError(f"positions: not given and patches lack coords {missing}")
        units = {str(patches[f"bead_{d}"].attrs.get("units", "pixel")) for d in dims}
        if not units <= set(PIXEL_ALIASES):
            # patches carry pixel centres (pcmx.beads.extract_patches); micrometres here would
            # be read as pixels without a word
            raise InputError(f"positions: the patches' bead_* coords are in {sorted(units)}, not "
                             "pixels; pass positions= in pixels")
        positions = np.stack([patches[f"bead_{d}"].values for d in dims], axis=1)
    pos = as_positions(positions, nd)
    if len(pos) != data.shape[0]:
        raise InputError(f"positions: {len(pos)} positions for {data.shape[0]} patches")
    grids = np.meshgrid(*offset_grids([s // 2 for s in data.shape[1:]]), indexing="ij")
    off = np.stack(grids, axis=-1)
    return pos.reshape((len(pos),) + (1,) * nd + (nd,)) + off[None]


# --------------------------------------------------------------------------------------------
# the step
# --------------------------------------------------------------------------------------------
def subtract_background(patches: xr.DataArray, r=None, *, method: str = DEFAULT_METHOD,
                        image=None, positions=None, mask_positions=None,
                        return_background: bool = False, **kwargs):
    """Remove the background of bead patches (paper App. B, step 4 of learning an operator).

    Parameters
    ----------
    patches : DataArray (bead, ky, kx) or (bead, kz, ky, kx)
        From :func:`pcmx.beads.extract_patches` (in camera units: the offset goes too).
    r : float or sequence, optional
        PSF radius; the patches' ``psf_radius`` attribute when None.
    method : {"global", "local"}
        ``"global"`` (default, least biased, see docs/background.md) needs ``image``;
        ``"local"`` is the paper's degree-2 fit outside the disk of radius r.
    image : array_like, optional
        The image the patches come from (for ``"global"``).
    positions : array_like (M, ndim), optional
        The patches' centres; their ``bead_y``, ``bead_x`` coords when None.
    mask_positions : array_like (N, ndim), optional
        Every detection (to mask in the global estimate); ``positions`` when None.
    return_background : bool
        Also return the subtracted background (same shape as the patches).
    **kwargs
        Passed to :func:`global_background` or :func:`local_background`.

    Returns
    -------
    DataArray float32 like ``patches`` (attrs ``background`` = method), and the background
    ndarray if ``return_background``.

    Raises
    ------
    InputError
        Unknown method, ``"global"`` without the image.
    """
    if method not in METHODS:
        raise InputError(f"background={method!r} must be one of {', '.join(map(repr, METHODS))}")
    data, nd = _patch_array(patches)
    rv = _radius_of(patches, r, nd)
    if method == "local":
        bg = local_background(patches, rv, **kwargs)
    else:
        if image is None:
            raise InputError("image: the 'global' background needs the image the patches come from")
        pts = patch_coordinates(patches, positions)
        centres = pts[(slice(None), *(s // 2 for s in data.shape[1:]))]
        masks = centres if mask_positions is None else np.concatenate(
            [as_positions(mask_positions, nd), centres])
        coarse = global_background(image, masks, rv, **kwargs)
        bg = background_at(coarse, pts)
    out = (data.astype(np.float32) - bg).astype(np.float32)
    if isinstance(patches, xr.DataArray):
        res = patches.copy(data=out)
        res.attrs = {**patches.attrs, "background": method}
    else:
        res = out
    return (res, bg) if return_background else res
