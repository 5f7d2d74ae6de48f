"""The PSF basis h_i: normalisation, PCA, z-score rejection, PCA again (App. A d-f, II-E-b/c).

Steps 5-7 of learning an operator, on background-free patches from :mod:`pcmx.beads` and
:mod:`pcmx.background`::

    bump multiplier     m(t) = 1 below r, 0 above r_ext = 1.2 r, a smooth bump between   (A-d)
    normalisation       each patch sums to one, then unit l2 norm for the PCA             (II-E-b)
    PCA                 uncentred, exact SVD or randomized with many large patches          (A-e)
    z-score rejection   coefficient vectors far from the field's trend (3 sigma)           (A-f)
    second PCA          on the kept patches; I given or the 2.858 * median rule         (II-E-c)

The PCA is *uncentred*: the product-convolution model ``H u = sum_i h_i * (alpha_i . u)`` has
no separate mean PSF, so the basis must span the PSFs themselves, not their deviations from a
mean; ``h_0`` is close to the normalised average PSF. It runs on the pixels of the bump's
support only: the pixels beyond ``r_ext`` are exactly zero and would add zero singular values
that drag down the median of the rank rule (and so inflate I).

Two measured refinements of the paper's z-score test (App. A-f) keep the beads that matter:

* the z-scores are those of each coefficient's deviation from a smooth polynomial trend over
  the field (the beads' positions), not from the mean: PSFs vary over the field by design, and
  a plain z-score rejects the aberrated beads of the corners, the most informative ones;
* the I coefficients and the energy left outside the I-dimensional subspace (where a double
  bead's second bead mostly lies) are tested together: their squared z-scores are summed and
  the chi-square tail probability is turned back into one z-score (for one coefficient it is
  the plain z-score), so 3 sigma rejects 0.27 % of Gaussian vectors whatever I.

On a simulated 512 x 512 field with 125 bright beads (I = 5) the paper's test rejects 10 beads,
all in the outer third of the field; this one rejects 3, and both catch planted double beads
(``tests/test_psf_basis.py``).

The coefficients ``beta`` of each kept bead are those of its sum-one patch on the orthonormal
basis, so ``sum_i beta_i h_i`` is the bead's PSF (summing to about one): they are the samples
the coefficient maps interpolate (App. C).
"""

from __future__ import annotations

import numbers

import numpy as np
import xarray as xr

from .beads import KERNEL_DIMS, R_EXT_FACTOR, bump_multiplier, radius_vector
from .errors import InputError

__all__ = ["fit_psf_basis", "normalise_patches", "principal_components", "optimal_rank",
           "R_EXT_FACTOR", "HARD_THRESHOLD"]

HARD_THRESHOLD = 2.858
"""Optimal hard threshold of singular values over their median (paper II-E-c, Gavish-Donoho)."""

#: Polynomial degree of the field trend removed before the z-score test.
_DEGREES = {"quartic": 4, "cubic": 3, "quadratic": 2, "linear": 1, "none": 0}
#: Exact SVD up to this many rows and columns (the smaller side); randomized beyond.
_EXACT_MAX = 1000


def _bump(shape, r, r_ext) -> np.ndarray:
    """The bump multiplier of App. A-d (float64); see :func:`pcmx.beads.bump_multiplier`."""
    return bump_multiplier(shape, r, r_ext).astype(np.float64)


def optimal_rank(singular_values, *, max_rank: int | None = None,
                 threshold: float = HARD_THRESHOLD) -> int:
    """Number of singular values above ``2.858 * median`` (paper II-E-c), at least 1.

    Parameters
    ----------
    singular_values : array_like (n,)
        All singular values of the patch matrix (the rule needs their median).
    max_rank : int, optional
        Upper bound (e.g. the number of patches).
    threshold : float
        The factor (2.858, Gavish & Donoho's for an unknown noise level, as in the paper).
    """
    s = np.asarray(singular_values, dtype=np.float64)
    if s.size == 0:
        return 1
    rank = max(int(np.count_nonzero(s > threshold * np.median(s))), 1)
    if max_rank is not None:
        rank = min(rank, int(max_rank))
    return max(rank, 1)


def _patch_data(patches) -> np.ndarray:
    data = patches.values if isinstance(patches, xr.DataArray) else np.asarray(patches)
    if data.ndim not in (3, 4):
        raise InputError(f"patches: expected dims (bead, ky, kx) or (bead, kz, ky, kx), got an "
                         f"array of shape {data.shape}")
    if data.shape[0] == 0:
        raise InputError("patches: no bead patch to learn a PSF basis from")
    if not np.all(np.isfinite(data)):
        raise InputError("patches: contain NaN or infinite values")
    return data


def _radii(patches, kshape, r, r_ext) -> tuple[np.ndarray, np.ndarray]:
    nd = len(kshape)
    if r is None and isinstance(patches, xr.DataArray) and "psf_radius" in patches.attrs:
        r = patches.attrs["psf_radius"]
        if r_ext is None:
            r_ext = patches.attrs.get("r_ext")
    if r is None:  # the patch was cut at r_ext
        r = np.asarray([s // 2 for s in kshape], dtype=np.float64) / R_EXT_FACTOR
    rv = radius_vector(r, nd, name="r")
    ext = rv * R_EXT_FACTOR if r_ext is None else radius_vector(r_ext, nd, name="r_ext")
    if np.any(ext <= rv):
        raise InputError(f"r: need 0 < r < r_ext, got r={rv.tolist()}, r_ext={ext.tolist()}")
    return rv, ext


def normalise_patches(patches, r=None, *, r_ext=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bump multiplier, then sum one, then unit l2 (App. A-d, II-E-b).

    Parameters
    ----------
    patches : DataArray or ndarray (bead, ky, kx) or (bead, kz, ky, kx)
        Background-free patches.
    r, r_ext : float or sequence, optional
        Radii of the bump multiplier; the patches' ``psf_radius`` / ``r_ext`` attrs when None,
        else ``r_ext`` is the patch half side.

    Returns
    -------
    sum_one : ndarray float64 (M, n_pixels)
        Bumped patches summing to one (rows with a non-positive sum are zero).
    unit : ndarray float64 (M, n_pixels)
        The same scaled to unit l2 norm.
    sums : ndarray (M,)
        The bumped sums before normalisation (each bead's flux within the support).
    """
    data = _patch_data(patches)
    kshape = data.shape[1:]
    rv, ext = _radii(patches, kshape, r, r_ext)
    flat = data.reshape(len(data), -1).astype(np.float64) * _bump(kshape, rv, ext).ravel()[None]
    sums = flat.sum(axis=1)
    ok = sums > 0
    sum_one = np.zeros_like(flat)
    sum_one[ok] = flat[ok] / sums[ok, None]
    norms = np.linalg.norm(sum_one, axis=1)
    unit = np.zeros_like(flat)
    unit[ok] = sum_one[ok] / norms[ok, None]
    return sum_one, unit, sums


def principal_components(x: np.ndarray, n_components: int | None, *, method: str = "auto",
                         threshold: float = HARD_THRESHOLD, seed: int = 0):
    """Uncentred PCA of the rows of ``x``: all singular values and the first components.

    ``"exact"`` is a thin SVD; ``"randomized"`` is :func:`sklearn.utils.extmath.randomized_svd`
    for the vectors, with all singular values (the rank rule needs their median) from the
    eigenvalues of the smaller Gram matrix; ``"auto"`` is exact when the smaller side of ``x``
    is at most 1000.

    Returns
    -------
    s : ndarray (min(M, D),)
        Singular values, decreasing.
    v : ndarray (I, D)
        The first I right singular vectors (I given, or by :func:`optimal_rank`).
    method : str
        The method used.
    """
    m, d = x.shape
    if method == "auto":
        method = "exact" if min(m, d) <= _EXACT_MAX else "randomized"
    if method == "exact":
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        n = optimal_rank(s, threshold=threshold) if n_components is None else n_components
        return s, vt[:n], method
    if method != "randomized":
        raise InputError(f"svd={method!r} must be 'auto', 'exact' or 'randomized'")
    from sklearn.utils.extmath import randomized_svd

    gram = x @ x.T if m <= d else x.T @ x
    s = np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0, None))
    n = optimal_rank(s, threshold=threshold) if n_components is None else n_components
    _, s_top, vt = randomized_svd(x, n_components=n, n_oversamples=10, n_iter=5,
                                  random_state=seed)
    s[:n] = s_top
    return s, vt, method


def _bead_positions(patches, nd: int) -> np.ndarray | None:
    if not isinstance(patches, xr.DataArray):
        return None
    names = [f"bead_{d}" for d in ("z", "y", "x")[-nd:]]
    if not all(n in patches.coords for n in names):
        return None
    return np.stack([np.asarray(patches.coords[n].values, dtype=np.float64) for n in names], axis=1)


def _field_trend(positions: np.ndarray | None, coef: np.ndarray, detrend: str) -> np.ndarray:
    """Least-squares polynomial trend of each coefficient over the bead positions."""
    mean = coef.mean(axis=0, keepdims=True)
    degree = _DEGREES[detrend]
    if degree == 0 or positions is None:
        return np.broadcast_to(mean, coef.shape)
    p = positions - positions.mean(axis=0)
    scale = np.abs(p).max(axis=0)
    p = p / np.where(scale > 0, scale, 1.0)
    nd = p.shape[1]
    while degree > 0:  # the highest degree with at least three beads per term
        exps = [e for e in np.ndindex(*([degree + 1] * nd)) if sum(e) <= degree]
        if len(coef) >= 3 * len(exps):
            break
        degree -= 1
    if degree == 0:
        return np.broadcast_to(mean, coef.shape)
    design = np.stack([np.prod(p ** np.asarray(e)[None, :], axis=1) for e in exps], axis=1)
    sol, *_ = np.linalg.lstsq(design, coef, rcond=None)
    return design @ sol


def _vector_zscore(d2: np.ndarray, dof: int) -> np.ndarray:
    """The one-dimensional z-score with the same two-sided tail probability as a chi-square
    statistic ``d2`` with ``dof`` degrees of freedom (``sqrt(d2)`` when ``dof = 1``)."""
    from scipy.stats import chi2, norm

    return norm.isf(np.clip(chi2.sf(d2, dof) / 2, 1e-300, None))


def _zscores(unit: np.ndarray, v: np.ndarray, positions, detrend: str, test: str) -> np.ndarray:
    """Outlier statistic of each row of ``unit`` on the components ``v`` (App. A-f)."""
    coef = unit @ v.T
    dev = coef - _field_trend(positions, coef, detrend)
    sd = dev.std(axis=0)
    z = np.abs(dev) / np.where(sd > 0, sd, np.inf)
    resid = np.sum(unit**2, axis=1) - np.sum(coef**2, axis=1)  # energy outside the subspace
    rsd = resid.std()
    zr = np.clip((resid - resid.mean()) / (rsd if rsd > 0 else np.inf), 0, None)
    zall = np.concatenate([z, zr[:, None]], axis=1)
    if test == "component":
        return zall.max(axis=1)
    return _vector_zscore(np.sum(zall**2, axis=1), zall.shape[1])


def fit_psf_basis(patches, n_components: int | None = None, *, outlier_sigma: float = 3.0,
                  r=None, r_ext=None, outlier_test: str = "vector", detrend: str = "quartic",
                  rank_threshold: float = HARD_THRESHOLD, svd: str = "auto",
                  seed: int = 0) -> xr.Dataset:
    """Learn the PSF basis h_i by PCA of normalised bead patches (paper App. A d-f, II-E).

    Parameters
    ----------
    patches : DataArray (bead, ky, kx) or (bead, kz, ky, kx), or ndarray of the same shape
        Background-free bead patches centred at index ``size // 2``
        (:func:`pcmx.beads.extract_patches` then :func:`pcmx.background.subtract_background`).
        Coordinates along ``bead`` (``bead_y``, ``bead_x``) are carried to the kept beads and
        used by the z-score test's trend.
    n_components : int, optional
        I. When None, the optimal hard threshold ``2.858 * median singular value`` (II-E-c),
        on the first PCA for the z-score test and on the second for the basis.
    outlier_sigma : float
        z-score threshold (App. A-f); ``inf`` disables the test.
    r, r_ext : float or sequence, optional
        Radii of the bump multiplier (App. A-d): ``patches.attrs["psf_radius"]`` / ``["r_ext"]``,
        else ``r_ext`` is the patch half side and ``r = r_ext / 1.2``.
    outlier_test : {"vector", "component"}
        ``"vector"``: the squared z-scores of the I coefficients and of the energy outside the
        subspace are summed and the chi-square tail probability turned back into one z-score;
        ``"component"``: any of them beyond ``outlier_sigma`` (the paper's test, which rejects
        about (I + 1) x 0.27 % of Gaussian vectors).
    detrend : {"quartic", "cubic", "quadratic", "linear", "none"}
        Polynomial trend over the bead positions removed from the coefficients before the
        z-scores ("none": deviations from the mean, the paper's). The degree is lowered until
        there are three beads per term; "none" without positions.
    rank_threshold : float
        The rank rule's factor.
    svd : {"auto", "exact", "randomized"}
        See :func:`principal_components`.
    seed : int
        Seed of the randomized SVD.

    Returns
    -------
    Dataset
        ``psf_basis (component, ky, kx)`` float32: orthonormal, each with a non-negative sum.
        ``beta (bead, component)`` float32: for every *kept* patch ``p`` (after the bump), the
        coefficients of ``p / sum(p)``: ``sum_i beta_i h_i`` is the orthogonal projection of
        the sum-one PSF onto span(h); ``bead`` enumerates ``patch[kept]`` with the input's
        ``bead`` coordinates. ``singular_values (rank)``: all singular values of the second
        PCA, ``singular_values_first (rank_first)`` of the first.
        Per input patch: ``kept (patch)`` bool, ``rejection (patch)`` (``""``,
        ``"nonpositive"``: no light left after background removal, ``"outlier"``),
        ``zscore (patch)`` (the outlier statistic), ``flux (patch)`` (bumped sum).
        attrs: ``n_components``, ``n_components_rule`` ("given" or "2.858 median"),
        ``n_components_by_rule``, ``n_outliers``, ``counts``, ``outlier_sigma``,
        ``psf_radius``, ``r_ext``, ``svd``.

    Raises
    ------
    InputError
        Not 3- or 4-dimensional, no patch, NaNs, every patch with a non-positive sum, a bad
        ``n_components``, or fewer kept beads than components (the message gives both).
    """
    data = _patch_data(patches)
    if n_components is not None and (isinstance(n_components, bool)
                                     or not isinstance(n_components, numbers.Integral)
                                     or n_components < 1):
        raise InputError(f"n_components: must be a positive integer, got {n_components!r}")
    if outlier_test not in ("vector", "component"):
        raise InputError(f"outlier_test: must be 'vector' or 'component', got {outlier_test!r}")
    if detrend not in _DEGREES:
        raise InputError(f"detrend: must be one of {', '.join(map(repr, _DEGREES))}, got {detrend!r}")
    m = data.shape[0]
    kshape = data.shape[1:]
    nd = len(kshape)
    rv, ext = _radii(patches, kshape, r, r_ext)
    sum_one, unit, sums = normalise_patches(data, rv, r_ext=ext)
    support = _bump(kshape, rv, ext).ravel() > 0
    unit_s = unit[:, support]
    reason = np.full(m, "", dtype=object)
    reason[~(sums > 0)] = "nonpositive"
    good = np.flatnonzero(reason == "")
    if len(good) == 0:
        raise InputError("patches: every patch has a non-positive sum after background removal")

    def _enough(count: int, stage: str) -> None:
        if n_components is not None and count < n_components:
            raise InputError(f"n_components: {n_components} components need at least as many "
                             f"beads, only {count} remain {stage}")

    _enough(len(good), "with positive light")
    positions = _bead_positions(patches, nd)
    # first PCA and the z-score test (App. A-e, A-f)
    s1, v1, _ = principal_components(unit_s[good], n_components, threshold=rank_threshold,
                                     seed=seed)
    zscore = np.full(m, np.nan)
    if np.isfinite(outlier_sigma) and len(good) > 2:
        zscore[good] = _zscores(unit_s[good], v1, None if positions is None else positions[good],
                                detrend, outlier_test)
        reason[good[zscore[good] > outlier_sigma]] = "outlier"
    kept = reason == ""
    if not kept.any():
        raise InputError("patches: every patch was rejected as an outlier by the z-score test")
    kidx = np.flatnonzero(kept)
    _enough(len(kidx), "after the z-score test")
    # second PCA on the kept patches
    s2, v2s, used = principal_components(unit_s[kidx], n_components, threshold=rank_threshold,
                                         seed=seed)
    by_rule = optimal_rank(s2, threshold=rank_threshold)
    n_i = len(v2s)
    h = np.zeros((n_i, support.size))
    h[:, support] = v2s
    h *= np.where(h.sum(axis=1) < 0, -1.0, 1.0)[:, None]
    beta = sum_one[kidx] @ h.T

    kdims = KERNEL_DIMS[-nd:]
    coords = {"component": np.arange(n_i)}
    if isinstance(patches, xr.DataArray):
        for name, cvar in patches.coords.items():
            if cvar.dims == (patches.dims[0],):
                coords[name] = ("bead", np.asarray(cvar.values)[kidx], dict(cvar.attrs))
            elif cvar.dims and tuple(patches.dims[1:]) == kdims and set(cvar.dims) <= set(kdims):
                coords[name] = cvar
    counts = {"input": int(m), "rejected_nonpositive": int(np.sum(reason == "nonpositive")),
              "rejected_outlier": int(np.sum(reason == "outlier")), "used": int(len(kidx))}
    return xr.Dataset(
        {
            "psf_basis": (("component", *kdims), h.reshape(n_i, *kshape).astype(np.float32)),
            "beta": (("bead", "component"), beta.astype(np.float32)),
            "singular_values": ("rank", s2),
            "singular_values_first": ("rank_first", s1),
            "kept": ("patch", kept),
            "rejection": ("patch", reason.astype(str)),
            "zscore": ("patch", zscore),
            "flux": ("patch", sums),
        },
        coords=coords,
        attrs={"n_components": int(n_i),
               "n_components_rule": "given" if n_components is not None else "2.858 median",
               "n_components_by_rule": int(by_rule), "n_outliers": int((~kept).sum()),
               "counts": counts, "outlier_sigma": float(outlier_sigma),
               "outlier_test": outlier_test, "detrend": detrend,
               "psf_radius": rv.tolist(), "r_ext": ext.tolist(), "svd": used},
    )
