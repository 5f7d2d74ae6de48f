"""The PSF basis h_i: PCA of normalised bead patches with outlier rejection (paper App. A d-f).

Steps (issue 5, steps 5-7)::

    bump multiplier     m(t) = 1 below r, 0 above r_ext = 1.2 r, a smooth bump between   (A-d)
    normalisation       each patch sums to one, then unit l2 norm for the PCA             (II-E-b)
    PCA                 (uncentred) SVD, randomized when there are many patches            (A-e)
    z-score rejection   coefficient vectors deviating more than 3 sigma in any component   (A-f)
    second PCA          on the kept patches; I from the 2.858 * median rule             (II-E-c)

The PCA is *uncentred*: the product-convolution model ``H u = sum_i h_i * (alpha_i . u)`` has
no separate mean PSF, so the basis must span the PSFs themselves, not their deviations from a
mean. ``h_0`` is then close to the normalised average PSF.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .errors import InputError

__all__ = ["fit_psf_basis", "optimal_rank", "R_EXT_FACTOR", "HARD_THRESHOLD"]

R_EXT_FACTOR = 1.2
"""r_ext = 1.2 r (paper App. A-d)."""

HARD_THRESHOLD = 2.858
"""Optimal hard threshold of singular values over their median (paper II-E-c, Gavish-Donoho)."""

_RANDOMIZED_ABOVE = 2000  # patches; below, an exact SVD is cheap enough


def optimal_rank(singular_values, *, max_rank: int | None = None) -> int:
    """Number of singular values above ``2.858 * median`` (paper II-E-c), at least 1.

    Parameters
    ----------
    singular_values : array_like (n,)
        All singular values of the patch matrix (the rule needs their median).
    max_rank : int, optional
        Upper bound (e.g. the number of patches).
    """
    s = np.asarray(singular_values, dtype=np.float64)
    if s.size == 0:
        return 1
    rank = int(np.count_nonzero(s > HARD_THRESHOLD * np.median(s)))
    rank = max(rank, 1)
    if max_rank is not None:
        rank = min(rank, int(max_rank))
    return max(rank, 1)


def _bump(shape, r: float, r_ext: float) -> np.ndarray:
    """Radial bump of App. A-d on a kernel grid centred at index size // 2 (float64)."""
    grids = np.meshgrid(*[np.arange(n) - n // 2 for n in shape], indexing="ij")
    t = np.sqrt(sum(g.astype(np.float64) ** 2 for g in grids))
    m = np.zeros(shape)
    m[t <= r] = 1.0
    mid = (t > r) & (t < r_ext)
    s = (t[mid] - r) / (r_ext - r)
    m[mid] = np.exp(-1.0 / (1.0 - s * s) + 1.0)
    return m


def _svd(a: np.ndarray, n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of ``a`` (M, P): exact, or randomized (Halko et al.) for many rows and known n."""
    if n is not None and a.shape[0] > _RANDOMIZED_ABOVE and n < min(a.shape) // 4:
        from sklearn.utils.extmath import randomized_svd

        return randomized_svd(a, n_components=n, n_oversamples=10, n_iter=4, random_state=seed)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    return u, s, vt


def fit_psf_basis(patches, n_components: int | None = None, *, outlier_sigma: float = 3.0,
                  r: float | None = None, r_ext: float | None = None, seed: int = 0) -> xr.Dataset:
    """Learn the PSF basis h_i by PCA of normalised bead patches (paper App. A d-f, II-E).

    Parameters
    ----------
    patches : DataArray (bead, ky, kx) or (bead, kz, ky, kx), or ndarray of the same shape
        Background-free bead patches centred at index ``size // 2`` (:func:`pcmx.beads.extract_patches`
        then :func:`pcmx.background.subtract_background`). Coordinates along ``bead`` (e.g.
        ``bead_y``, ``bead_x``) are carried to the kept beads.
    n_components : int, optional
        I. When None, the optimal hard threshold ``2.858 * median singular value`` (II-E-c),
        computed on the kept patches. Clipped to ``[1, number of kept patches]``.
    outlier_sigma : float
        z-score threshold of the outlier test (App. A-f); ``inf`` disables it.
    r, r_ext : float, optional
        Radii of the bump multiplier (App. A-d). ``r`` defaults to ``patches.attrs["psf_radius"]``
        or ``(size // 2) / 1.2``; ``r_ext`` to ``1.2 r``.
    seed : int
        Seed of the randomized SVD (used only for more than 2000 patches and a given I).

    Returns
    -------
    Dataset
        ``psf_basis (component, ky, kx)`` float32: orthonormal (unit l2, mutually orthogonal),
        the sign chosen so that each h_i has a non-negative sum.
        ``beta (bead, component)`` float32: for every *kept* patch ``p`` (after the bump), the
        coefficients of ``p / sum(p)`` in the basis, ``beta_i = <p / sum(p), h_i>``, so
        ``sum_i beta_i h_i`` is the orthogonal projection of the **sum-one** PSF onto span(h)
        and ``sum_i beta_i sum(h_i) ~= 1``.
        ``singular_values (rank)`` float32: all singular values of the second PCA (patches
        normalised to sum one then unit l2).
        ``kept (patch)`` bool: which input patches survived the z-score test; beta's ``bead``
        dimension enumerates ``patch[kept]``, with the input's ``bead`` coordinates.
        attrs: ``n_components``, ``n_components_rule`` ("given" or "2.858 median"),
        ``n_outliers``, ``outlier_sigma``, ``psf_radius``, ``r_ext``.

    Raises
    ------
    InputError
        Not 3- or 4-dimensional, no patch, NaNs, a patch with a non-positive sum, bad
        ``n_components``.

    Notes
    -----
    The first PCA uses ``I`` (or the rank rule) to define the coefficient vectors of the
    z-score test: a patch is an outlier if any of its I coefficients (of the unit-l2 patch)
    deviates from the mean by more than ``outlier_sigma`` standard deviations. Double beads,
    bead aggregates and cosmic rays are caught this way.
    """
    data = patches.values if isinstance(patches, xr.DataArray) else np.asarray(patches)
    if data.ndim not in (3, 4):
        raise InputError(f"patches: expected dims (bead, ky, kx) or (bead, kz, ky, kx), got an "
                         f"array of shape {data.shape}")
    m = data.shape[0]
    if m == 0:
        raise InputError("patches: no bead patch to learn a PSF basis from")
    if not np.all(np.isfinite(data)):
        raise InputError("patches: contain NaN or infinite values")
    if n_components is not None and (int(n_components) != n_components or n_components < 1):
        raise InputError(f"n_components: must be a positive integer, got {n_components!r}")
    kshape = data.shape[1:]
    half = min(kshape) // 2
    if r is None and isinstance(patches, xr.DataArray) and "psf_radius" in patches.attrs:
        r = float(np.min(np.atleast_1d(patches.attrs["psf_radius"])))
    if r is None:
        r = half / R_EXT_FACTOR
    r = float(r)
    if r_ext is None:
        r_ext = R_EXT_FACTOR * r
    r_ext = float(r_ext)
    if not r > 0 or r_ext < r:
        raise InputError(f"r: need 0 < r <= r_ext, got r={r}, r_ext={r_ext}")

    bump = _bump(kshape, r, r_ext) if r_ext > r else (_bump(kshape, r, r + 1e-9))
    flat = (data.reshape(m, -1).astype(np.float64)) * bump.reshape(1, -1)
    sums = flat.sum(axis=1)
    bad = ~(sums > 0)
    if bad.all():
        raise InputError("patches: every patch has a non-positive sum after background removal")
    # patches with non-positive energy cannot be normalised: they are outliers by construction
    unit_sum = np.zeros_like(flat)
    unit_sum[~bad] = flat[~bad] / sums[~bad, None]
    norms = np.linalg.norm(unit_sum, axis=1)
    unit_l2 = np.zeros_like(flat)
    unit_l2[~bad] = unit_sum[~bad] / norms[~bad, None]

    # first PCA and the z-score test (App. A-e, A-f)
    good = np.flatnonzero(~bad)
    u, s, vt = _svd(unit_l2[good], n_components, seed)
    n1 = int(n_components) if n_components is not None else optimal_rank(s)
    n1 = max(1, min(n1, len(good)))
    kept = ~bad
    if np.isfinite(outlier_sigma) and len(good) > 2:
        c = unit_l2[good] @ vt[:n1].T
        sd = c.std(axis=0)
        z = np.abs(c - c.mean(axis=0)) / np.where(sd > 0, sd, np.inf)
        kept[good[(z > outlier_sigma).any(axis=1)]] = False
    if not kept.any():
        raise InputError("patches: every patch was rejected as an outlier by the z-score test")

    # second PCA on the kept patches
    u, s, vt = _svd(unit_l2[kept], n_components, seed)
    n_kept = int(kept.sum())
    if n_components is None:
        n_i, rule = optimal_rank(s, max_rank=n_kept), "2.858 median"
    else:
        n_i, rule = min(int(n_components), n_kept, vt.shape[0]), "given"
    h = vt[:n_i].copy()
    sign = np.where(h.sum(axis=1) < 0, -1.0, 1.0)
    h *= sign[:, None]
    beta = unit_sum[kept] @ h.T

    coords = {"component": np.arange(n_i)}
    kdims = ("ky", "kx") if len(kshape) == 2 else ("kz", "ky", "kx")
    if isinstance(patches, xr.DataArray):
        for name, cvar in patches.coords.items():
            if cvar.dims == (patches.dims[0],):
                coords[name] = ("bead", np.asarray(cvar.values)[kept], dict(cvar.attrs))
            elif cvar.dims and tuple(patches.dims[1:]) == kdims and set(cvar.dims) <= set(kdims):
                coords[name] = cvar
    ds = xr.Dataset(
        {
            "psf_basis": (("component", *kdims), h.reshape(n_i, *kshape).astype(np.float32)),
            "beta": (("bead", "component"), beta.astype(np.float32)),
            "singular_values": ("rank", s.astype(np.float32)),
            "kept": ("patch", kept),
        },
        coords=coords,
        attrs={"n_components": int(n_i), "n_components_rule": rule,
               "n_outliers": int((~kept).sum()), "outlier_sigma": float(outlier_sigma),
               "psf_radius": r, "r_ext": r_ext},
    )
    return ds
