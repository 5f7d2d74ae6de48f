"""Background estimation and removal for bead patches (paper App. B), and its bias.

Two estimators, both vectorised over all beads:

``"local"`` -- the paper's (App. B, eq. (8))
    A degree-2 polynomial (``1, y, x, y^2, yx, x^2``; 10 monomials in 3D) is fitted by least
    squares to the pixels of each patch outside the disk of radius ``r``, and subtracted. All
    patches share the same pixel grid, so the fits are one matrix product with the
    pseudo-inverse of the masked design matrix.

``"global"`` -- a smooth background of the whole image with the beads masked
    Pixels near beads (the given positions and every pixel where the blurred image rises above
    the noise, both dilated by ``2 r``) and outliers (``clip`` robust sigmas) are masked; the
    mean of the remaining pixels of each block (``~4 r`` pixels) is a cell average of the
    background, and a cubic spline whose cell averages match them (the "histopolation"
    prefilter ``[1, 76, 230, 76, 1] / 384`` inverted along each axis) is evaluated at every patch
    pixel. Blocks with too few unmasked pixels are filled from their neighbours.

Real PSFs have wings beyond any practical ``r`` (Airy rings, aberration halos). The local fit
sees those wings as background and subtracts them from the whole patch: it removes part of
every bead's own light, a bias proportional to the bead's brightness. The global estimate sees
far fewer wing pixels. :func:`background_bias` measures both against the simulator's truth
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
    R_EXT_FACTOR,
    _normalised_radius,
    _offset_grids,
    _positions,
    _quantisation_step,
    _robust_noise,
    as_image_array,
    radius_vector,
)
from .errors import InputError

__all__ = [
    "METHODS",
    "DEFAULT_METHOD",
    "polynomial_design",
    "local_background",
    "global_background",
    "background_at",
    "background_image",
    "fit_cell_spline",
    "patch_coordinates",
    "subtract_background",
    "background_bias",
]

METHODS = ("global", "local")
#: The least biased estimator measured by :func:`background_bias` (docs/background.md).
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
    grids = np.meshgrid(*[g / max(h, 1) for g, h in zip(_offset_grids(half), half, strict=True)],
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
    rho = _normalised_radius([s // 2 for s in kshape], rv).ravel()
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
    reg = sum(_kron_axis(ext, d, _difference(m)).T @ _kron_axis(ext, d, _difference(m))
              for d, m in enumerate(ext))
    lhs = a.T @ sp.diags(w) @ a + lam * reg + 1e-10 * lam * sp.identity(a.shape[1])
    rhs = a.T @ (w * means.ravel())
    if lhs.shape[0] <= 2500:  # a dense Cholesky is faster than SuperLU at this size
        return scipy.linalg.solve(lhs.toarray(), rhs, assume_a="pos").reshape(ext)
    return spla.spsolve(lhs.tocsc(), rhs).reshape(ext)


def _cell_index(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Continuous coefficient index of pixel coordinates ``x`` (cells of the block grid)."""
    if len(centres) == 1:
        return np.zeros_like(x, dtype=np.float64) + _GHOST
    step = (centres[-1] - centres[0]) / (len(centres) - 1)
    return (np.asarray(x, dtype=np.float64) - centres[0]) / step + _GHOST


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


def _evaluate_grid(coef: np.ndarray, centres: list[np.ndarray], shape) -> np.ndarray:
    """The spline at every pixel, separably (one small matrix per axis), float32."""
    out = coef
    for d, (c, n) in enumerate(zip(centres, shape, strict=True)):
        w = _bspline_weights(_cell_index(np.arange(n), c), coef.shape[d])
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
                      passes: int = 2) -> xr.DataArray:
    """A smooth background of the whole image estimated with the beads masked.

    1. A first estimate: steps 3-4 with only the given positions masked (without positions,
       the block medians).
    2. Mask: pixels within ``mask_radius`` (per axis, a box) of a given position, within
       ``r / 2`` of a pixel where the residual, band-passed (a 2-pixel Gaussian blur minus a
       13-pixel box mean), exceeds ``snr`` times its noise (bright wings and halos, undetected
       beads), and pixels deviating by more than ``clip`` robust sigmas (hot pixels). The noise has a
       floor (quantisation, or 1e-3 of the median level) for noise-free images.
    3. The mean of the unmasked pixels of each block, weighted by their number.
    4. The cubic spline whose cell averages fit those means (:func:`fit_cell_spline`):
       unbiased by the background's curvature within blocks, blocks hidden by beads filled
       smoothly. :func:`background_at` evaluates it anywhere.

    Steps 2-4 run ``passes - 1`` times, each masking against the previous estimate.

    Parameters
    ----------
    image : array_like or DataArray, (y, x) or (z, y, x)
    positions : array_like (N, ndim), optional
        Beads to mask for sure (all detections, not only the kept ones, is best).
    r : float or sequence, optional
        PSF radius (pixels); sets the default block (``max(16, 4 r, side / 32)``) and mask radius
        (``ceil(2 r)``, the crowding distance). 8 pixels when None.
    block : int or sequence, optional
        Block side in pixels.
    mask_radius : float or sequence, optional
    snr, clip : float
        Mask thresholds (see above).
    smoothing : float
        Relative weight of the smoothness term of :func:`fit_cell_spline`.
    passes : int
        Number of mask-and-fit passes.

    Returns
    -------
    DataArray float64, dims ("y", "x") or ("z", "y", "x")
        The spline coefficients; coords are the pixel positions of their cells' centres
        (including ``2`` extrapolation cells beyond each border). attrs: ``block``,
        ``mask_radius``, ``masked_fraction``, ``empty_blocks``, ``noise``.
    """
    img = as_image_array(image)
    nd = img.ndim
    rv = radius_vector(8.0 if r is None else r, nd)
    if block is None:  # ~4 r, at least 16 pixels, at most _MAX_BLOCKS blocks per axis
        blk = np.maximum(np.maximum(16, np.ceil(4 * rv)),
                         np.ceil(np.asarray(img.shape) / _MAX_BLOCKS)).astype(np.int64)
    else:
        blk = np.broadcast_to(np.asarray(block, dtype=np.int64), (nd,)).copy()
    if np.any(blk < 2):
        raise InputError(f"block={block!r} must be at least 2 pixels")
    blk = np.minimum(blk, img.shape)
    mr = (np.ceil(2 * rv) if mask_radius is None
          else radius_vector(mask_radius, nd, name="mask_radius")).astype(np.int64)
    sr = np.ceil(rv / 2).astype(np.int64)  # margin around pixels above the noise
    edges = [_block_edges(n, b) for n, b in zip(img.shape, blk, strict=True)]
    centres = [(e[:-1] + e[1:] - 1) / 2.0 for e in edges]
    counts = np.ones([len(e) - 1 for e in edges])
    for d, e in enumerate(edges):
        shape = [1] * nd
        shape[d] = len(e) - 1
        counts = counts * np.diff(e).reshape(shape)
    # noise floor: quantisation of integer images, else 1e-3 of the median level (noise-free
    # simulations would otherwise mask every rounding error of the fit)
    floor = max(_quantisation_step(img) / np.sqrt(12.0) / 4,
                1e-3 * float(np.median(np.abs(img[tuple(slice(None, None, 4) for _ in range(nd))]))),
                1e-12)
    seeds0 = None
    if positions is not None and len(_positions(positions, nd)):
        pos = _positions(positions, nd)
        ci = np.clip(np.rint(pos).astype(np.int64), 0, np.asarray(img.shape) - 1)
        seeds0 = np.zeros(img.shape, dtype=bool)
        seeds0[tuple(ci.T)] = True

    def _fit(masked):
        w = (~masked).astype(np.float32)
        num = _block_sums(img * w, edges)
        den = _block_sums(w, edges)
        return fit_cell_spline(num / np.maximum(den, 1.0), den / counts, smoothing=smoothing), den

    # 1. first estimate: the given beads masked, else block medians (robust to beads)
    if seeds0 is not None:
        mask0 = ndi.maximum_filter(seeds0.view(np.uint8), size=tuple(2 * mr + 1)).astype(bool)
        masked = mask0
        coef, den = _fit(masked)
    else:
        masked = np.zeros(img.shape, dtype=bool)
        coef = fit_cell_spline(_block_medians(img, edges), np.ones(counts.shape),
                               smoothing=smoothing)
        den = counts
    noise = float("nan")
    for _ in range(max(passes - 1, 0)):
        # 2. mask beads and outliers against the current estimate: band-pass (a 2-pixel blur
        # minus a 13-pixel box mean) to find compact bright things, not the estimate's slow
        # errors; 3.-4. cell means and the spline
        resid = img - _evaluate_grid(coef, centres, img.shape)
        noise = max(_robust_noise(resid), floor)
        hp = ndi.gaussian_filter(resid, 2.0)
        hp -= ndi.uniform_filter(resid, size=13)
        seeds = hp > snr * max(_robust_noise(hp), floor)
        masked = ndi.maximum_filter(seeds.view(np.uint8), size=tuple(2 * sr + 1)).astype(bool)
        if seeds0 is not None:
            masked |= mask0
        masked |= np.abs(resid) > clip * noise
        coef, den = _fit(masked)
    cc = []
    for c in centres:
        step = (c[-1] - c[0]) / (len(c) - 1) if len(c) > 1 else 1.0
        cc.append(c[0] + step * (np.arange(len(c) + 2 * _GHOST) - _GHOST))
    coords = {d: (d, c, {"units": "pixel"}) for d, c in zip(_SPATIAL_DIMS[-nd:], cc, strict=True)}
    return xr.DataArray(
        coef, dims=_SPATIAL_DIMS[-nd:], coords=coords, name="background_spline",
        attrs={"block": blk.tolist(), "mask_radius": mr.tolist(),
               "masked_fraction": float(masked.mean()), "empty_blocks": int((den == 0).sum()),
               "noise": float(noise), "shape": list(img.shape)})


def _coef_index(background: xr.DataArray, d: int, x: np.ndarray) -> np.ndarray:
    c = background[background.dims[d]].values.astype(np.float64)
    step = (c[-1] - c[0]) / (len(c) - 1) if len(c) > 1 else 1.0
    return (np.asarray(x, dtype=np.float64) - c[0]) / step


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
        positions = np.stack([patches[f"bead_{d}"].values for d in dims], axis=1)
    pos = _positions(positions, nd)
    if len(pos) != data.shape[0]:
        raise InputError(f"positions: {len(pos)} positions for {data.shape[0]} patches")
    grids = np.meshgrid(*_offset_grids([s // 2 for s in data.shape[1:]]), indexing="ij")
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
            [_positions(mask_positions, nd), centres])
        coarse = global_background(image, masks, rv, **kwargs)
        bg = background_at(coarse, pts)
    out = (data.astype(np.float32) - bg).astype(np.float32)
    if isinstance(patches, xr.DataArray):
        res = patches.copy(data=out)
        res.attrs = {**patches.attrs, "background": method}
    else:
        res = out
    return (res, bg) if return_background else res


# --------------------------------------------------------------------------------------------
# bias against the simulator's truth
# --------------------------------------------------------------------------------------------
def _frame_truth(sim, pos: np.ndarray, truth_pos: np.ndarray, amp: np.ndarray, size: int,
                 scale: float) -> np.ndarray:
    """Each bead's own noise-free image (ADU), alone, sampled in our patch frame."""
    from .simulate import true_psfs

    big = size + 8
    t = true_psfs(sim, truth_pos[:, 0], truth_pos[:, 1], size=big).astype(np.float64)
    err = pos - truth_pos  # our centre minus the true position
    out = np.empty((len(pos), size, size))
    for m in range(len(pos)):  # a few hundred beads, each a small shift
        out[m] = ndi.shift(t[m], -err[m], order=3, mode="constant")[4:-4, 4:-4]
    return out * (scale * amp)[:, None, None]


def background_bias(sim, *, methods=METHODS, psf_radius=None, max_beads: int = 400) -> xr.Dataset:
    """Bias of each background estimator against a simulation's ground truth.

    The bead steps of :mod:`pcmx.beads` run once on ``sim["image"]`` (detection, automatic r,
    rejection, centring, patches); then each method's background is compared with the truth
    on the same patches:

    ``background_error``
        mean over beads and the pixels within ``r_ext`` of (estimated - true) background, in
        image units (ADU); the true background is ``gain * background + offset``.
    ``flux_bias``
        mean over beads of ``sum(m (p - b)) / sum(m t) - 1`` with ``m`` the bump multiplier,
        ``p - b`` the background-free patch and ``t`` the bead's own noise-free image: the
        relative error of the light the PSF keeps (other beads' far wings count as background).
    ``flux_bias_sem``
        its standard error over beads (the noise's share).
    ``psf_error``
        median relative l2 error of the bumped, sum-one PSF against the same for ``t``.

    Parameters
    ----------
    sim : Dataset from :func:`pcmx.simulate.simulate_beads` (2D, one state)
    methods : sequence of str
    psf_radius : float, optional
        r; estimated from the image when None.
    max_beads : int
        At most this many (strongest) beads are compared.

    Returns
    -------
    Dataset with dim ``method``; attrs ``psf_radius``, ``n_beads``, ``photons``.
    """
    from . import beads as bd
    from .simulate import true_psfs  # noqa: F401  (fails early without the simulator)

    img = sim["image"]
    if img.ndim != 2:
        raise InputError(f"sim: background_bias needs a 2D one-state simulation, got dims {img.dims}")
    raw = img.values
    work = raw.astype(np.float32)
    cam = sim.attrs.get("camera", {})
    applied = bool(cam.get("applied", False))
    gain = float(cam.get("gain_adu_per_electron", 1.0)) if applied else 1.0
    offset = float(cam.get("offset_adu", 0.0)) if applied else 0.0
    det, info = bd.detect_beads(work)
    r = psf_radius if psf_radius is not None else bd.estimate_psf_radius(work, det)
    keep, _ = bd.reject_beads(det, work.shape, r, image=raw)
    pos = bd.center_beads(work, det[keep][:max_beads], r)
    patches = bd.extract_patches(work, pos, r)
    truth = np.c_[sim["bead_y"].values, sim["bead_x"].values]
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(truth).query(pos)
    ok = dist < 2.0
    pos, idx, patches = pos[ok], idx[ok], patches.isel(bead=np.flatnonzero(ok))
    size = patches.sizes["ky"]
    tpatch = _frame_truth(sim, pos, truth[idx], sim["amplitude"].values[idx], size, gain)
    rv = radius_vector(r, 2)
    m = bd.bump_multiplier(patches.shape[1:], rv).astype(np.float64)
    disk = _normalised_radius([size // 2] * 2, rv) <= R_EXT_FACTOR
    pts = patch_coordinates(patches)
    true_bg = gain * ndi.map_coordinates(sim["background"].values.astype(np.float64),
                                         [pts[..., 0].ravel(), pts[..., 1].ravel()], order=3,
                                         mode="nearest").reshape(patches.shape) + offset
    tflux = (m * tpatch).sum(axis=(1, 2))
    tn = m * tpatch / tflux[:, None, None]
    rows = {}
    for meth in methods:
        _, bg = subtract_background(patches, rv, method=meth, image=work, mask_positions=det,
                                    return_background=True)
        bg = bg.astype(np.float64)
        p = patches.values.astype(np.float64) - bg
        flux = (m * p).sum(axis=(1, 2))
        fb = flux / tflux - 1
        pn = m * p / flux[:, None, None]
        err = np.linalg.norm((pn - tn).reshape(len(p), -1), axis=1) / np.linalg.norm(
            tn.reshape(len(p), -1), axis=1)
        rows[meth] = (float(np.mean((bg - true_bg)[:, disk])), float(np.mean(fb)),
                      float(np.std(fb) / np.sqrt(len(fb))), float(np.median(err)))
    names = list(rows)
    vals = np.array([rows[k] for k in names])
    return xr.Dataset(
        {"background_error": ("method", vals[:, 0]), "flux_bias": ("method", vals[:, 1]),
         "flux_bias_sem": ("method", vals[:, 2]), "psf_error": ("method", vals[:, 3])},
        coords={"method": names},
        attrs={"psf_radius": rv.tolist(), "n_beads": int(len(pos)),
               "photons": float(sim.attrs.get("scene", {}).get("photons_median", np.nan))})
