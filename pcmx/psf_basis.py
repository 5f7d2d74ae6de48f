"""The PSF basis h_i: PCA of normalised bead patches with outlier rejection (paper App. A d-f).

Steps (issue 5, steps 5-7)::

    bump multiplier     m(t) = 1 below r, 0 above r_ext = 1.2 r, a smooth bump between   (A-d)
    normalisation       each patch sums to one, then unit l2 norm for the PCA             (II-E-b)
    PCA                 (uncentred) SVD on the bump's support, randomized for many patches (A-e)
    outlier rejection   3-sigma test of each bead's coefficients against the field's trend (A-f)
    second PCA          on the kept patches; I from the optimal hard threshold          (II-E-c)

The PCA is *uncentred*: the product-convolution model ``H u = sum_i h_i * (alpha_i . u)`` has
no separate mean PSF, so the basis must span the PSFs themselves, not their deviations from a
mean. ``h_0`` is then close to the normalised average PSF.

Rank rule (II-E-c)
    Gavish & Donoho's optimal hard threshold for an unknown noise level keeps the singular
    values above ``omega(beta) * median``, ``beta = min(M, P) / max(M, P)`` the aspect ratio of
    the ``M x P`` matrix; ``omega(1) = 2.858`` is the paper's (square) case and
    ``omega(beta) ~ 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43``. It assumes white noise.
    Bead patches carry Poisson-Gaussian noise, much stronger at a bright PSF's core than in its
    wings and, after normalisation, for dim beads: its singular values spread far above the
    white-noise bulk and the median rule keeps noise components (I = 28 on dim simulated
    beads over whole patches, 16 instead of 3 on patches of known rank 3). The default rule
    (``rank_rule="noise"``) estimates the noise variance ``a + b * signal`` from the residual
    of a low-rank fit, draws Gaussian matrices with that variance (parallel analysis) and keeps
    the singular values above Gavish & Donoho's known-noise optimal threshold for that noise
    (:func:`noise_threshold`). The matrices are the patches restricted to the bump's support
    (``t <= r_ext``): the pixels beyond are exactly zero and, with more beads than pixels,
    add zero singular values that pull a median down.

Outlier rejection (App. A-f)
    The paper's z-score compares each coefficient with its mean over all beads. PSFs vary over
    the field by design, so that test flags the field's edge (on a simulated 512 x 512 field
    it rejected 21 of 125 clean beads, at a mean field radius of 0.89). The default test
    (``outlier_test="field"``) predicts each bead's coefficients from its nearest neighbours
    (a local affine fit, leave-one-out) and scales the deviation locally (where the PSFs change
    fast, every bead deviates more), and compares the energy outside the I-dimensional
    subspace (where a second bead or a hot pixel mostly lies) with what the bead's brightness
    predicts. A bead is an outlier when either robust z-score exceeds ``outlier_sigma`` (3):
    it rejects no bead of that field and catches planted doublets and hot pixels.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import xarray as xr

from .beads import KERNEL_DIMS, R_EXT_FACTOR, bump_multiplier
from .errors import InputError
from .execution import blas_limit
from .io.readers import PcmxWarning

__all__ = ["fit_psf_basis", "optimal_rank", "hard_threshold", "normalise_patches",
           "outlier_scores", "noise_threshold", "bead_snr", "snr_weights", "HARD_THRESHOLD",
           "OUTLIER_TESTS", "RANK_RULES", "WEIGHTINGS", "SNR_REF"]

HARD_THRESHOLD = 2.858
"""Optimal hard threshold of singular values over their median for a square matrix (II-E-c)."""

WEIGHTINGS = ("snr", "equal")
"""Row weights of the PCA: ``"snr"`` from each bead's signal-to-noise ratio, capped
(:func:`snr_weights`); ``"equal"``: every normalised patch counts the same."""
SNR_REF = 10.0
"""Default ``snr_ref`` of :func:`snr_weights`: a bead whose normalised patch carries a noise
of 10% of its norm (1% of its energy) has half the weight of a clean one."""

OUTLIER_TESTS = ("field", "paper")
"""``"field"``: robust deviations from the field's polynomial trend (default); ``"paper"``:
deviations from the mean, any coefficient beyond ``outlier_sigma`` standard deviations."""

_RANDOMIZED_ABOVE = 2000  # patches and pixels; below, an exact SVD is cheap enough
_NEIGHBOURS = {2: 12, 3: 18}  # beads in the local fit of the field trend, by dimension


def hard_threshold(beta: float = 1.0) -> float:
    """Gavish & Donoho's ``omega(beta)``: the optimal hard threshold over the median singular
    value for an unknown noise level, ``beta`` the aspect ratio ``min(M, P) / max(M, P)``.

    ``omega(beta) ~ 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43`` (their eq. (5), accurate to
    about 0.02 on ``(0, 1]``); ``omega(1) = 2.86``, the paper's 2.858 (II-E-c).
    """
    b = float(beta)
    if not 0 < b <= 1:
        raise InputError(f"beta={beta!r}: the aspect ratio must be in (0, 1]")
    return 0.56 * b**3 - 0.95 * b**2 + 1.82 * b + 1.43


def optimal_rank(singular_values, *, max_rank: int | None = None, shape=None) -> int:
    """Number of singular values above ``omega(beta) * median`` (paper II-E-c), at least 1.

    Parameters
    ----------
    singular_values : array_like (n,)
        All ``min(M, P)`` singular values of the ``M x P`` matrix (the rule needs their median).
    max_rank : int, optional
        Upper bound (e.g. the number of patches).
    shape : (M, P), optional
        The matrix's shape, for the aspect ratio ``beta``; without it ``beta = 1`` and the
        threshold is the paper's ``2.858 * median``.
    """
    s = np.asarray(singular_values, dtype=np.float64)
    if s.size == 0:
        return 1
    beta = 1.0 if shape is None else min(shape) / max(shape)
    rank = max(int(np.count_nonzero(s > hard_threshold(beta) * np.median(s))), 1)
    if max_rank is not None:
        rank = min(rank, int(max_rank))
    return max(rank, 1)


def _svd(a: np.ndarray, n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All singular values of ``a`` (M, P) and its first right singular vectors.

    Exact thin SVD when the smaller side is at most 2000; otherwise the singular values come
    from the eigenvalues of the smaller Gram matrix and the first ``n`` vectors from a
    randomized SVD (Halko et al.; App. A-e).
    """
    m, p = a.shape
    if min(m, p) <= _RANDOMIZED_ABOVE:
        _, s, vt = np.linalg.svd(a, full_matrices=False)
        return s, vt
    from sklearn.utils.extmath import randomized_svd

    gram = a @ a.T if m <= p else a.T @ a
    s = np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0, None))
    k = n if n is not None else optimal_rank(s, shape=a.shape)
    _, s_top, vt = randomized_svd(a, n_components=k, n_oversamples=10, n_iter=5, random_state=seed)
    s[:k] = s_top
    return s, vt


def normalise_patches(patches, r=None, *, r_ext=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bump multiplier, then sum one, then unit l2 (App. A-d, II-E-b), over all pixels.

    Parameters
    ----------
    patches : DataArray or ndarray (bead, ky, kx) or (bead, kz, ky, kx)
        Background-free patches centred at index ``size // 2``.
    r, r_ext : float or sequence, optional
        Radii of the bump multiplier (one per axis allowed); as in :func:`fit_psf_basis`.

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
    rv, ev = _radii(patches, data.shape[1:], r, r_ext)
    return _normalise(data, bump_multiplier(data.shape[1:], rv, ev, dtype=np.float64))


def _normalise(data: np.ndarray, bump: np.ndarray):
    flat = data.reshape(len(data), -1).astype(np.float64) * bump.reshape(1, -1)
    sums = flat.sum(axis=1)
    ok = sums > 0
    sum_one = np.zeros_like(flat)
    sum_one[ok] = flat[ok] / sums[ok, None]
    norms = np.linalg.norm(sum_one, axis=1)
    unit = np.zeros_like(flat)
    unit[ok] = sum_one[ok] / norms[ok, None]
    return sum_one, unit, sums


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
    """r and r_ext per axis: given, else the patches' attrs, else from the patch half side."""
    nd = len(kshape)
    if r is None and isinstance(patches, xr.DataArray) and "psf_radius" in patches.attrs:
        r = patches.attrs["psf_radius"]
    if r is None:  # the patch was cut at r_ext
        r = np.asarray([n // 2 for n in kshape], dtype=np.float64) / R_EXT_FACTOR
    try:
        rv = np.broadcast_to(np.asarray(r, dtype=np.float64).reshape(-1), (nd,)).copy() \
            if np.size(r) in (1, nd) else None
    except (TypeError, ValueError):
        rv = None
    ev = None
    if rv is not None:
        try:
            ev = rv * R_EXT_FACTOR if r_ext is None else np.broadcast_to(
                np.asarray(r_ext, dtype=np.float64).reshape(-1), (nd,)).copy()
        except (TypeError, ValueError):
            ev = None
    if rv is None or ev is None or not (np.all(rv > 0) and np.all(ev >= rv)):
        raise InputError(f"r: need 0 < r <= r_ext, got r={r}, r_ext={r_ext}")
    return rv, ev


def _bead_positions(patches, nd: int) -> np.ndarray | None:
    if not isinstance(patches, xr.DataArray):
        return None
    names = [f"bead_{d}" for d in ("z", "y", "x")[-nd:]]
    if not all(n in patches.coords for n in names):
        return None
    return np.stack([np.asarray(patches.coords[n].values, dtype=np.float64) for n in names], axis=1)


def _local_prediction(positions: np.ndarray, feats: np.ndarray, inliers: np.ndarray,
                      k: int) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out prediction of each bead's features from its ``k`` nearest inlier
    neighbours by an affine least-squares fit (local linear regression over the field).

    The PSFs vary smoothly over the field but not as one low-degree polynomial (aberrations
    grow fast towards the corners): the local fit follows any smooth variation, and a bead's
    own value never enters its prediction.
    """
    from scipy.spatial import cKDTree

    m, nd = positions.shape
    cand = np.flatnonzero(inliers)
    k = min(k, len(cand) - 1)
    tree = cKDTree(positions[cand])
    _, idx = tree.query(positions, k + 1)
    nb = cand[idx]  # (M, k + 1), global indices
    drop = nb == np.arange(m)[:, None]
    drop[~drop.any(axis=1), -1] = True  # beads that are not inliers: drop the farthest
    nb = nb[~drop].reshape(m, k)
    off = positions[nb] - positions[:, None, :]  # (M, k, nd)
    scale = np.sqrt(np.mean(np.sum(off**2, axis=2), axis=1))[:, None, None]
    a = np.concatenate([np.ones((m, k, 1)), off / np.where(scale > 0, scale, 1.0)], axis=2)
    ata = np.einsum("mkp,mkq->mpq", a, a) + 1e-6 * np.eye(nd + 1)[None]
    atf = np.einsum("mkp,mkf->mpf", a, feats[nb])
    return np.linalg.solve(ata, atf)[:, 0, :], nb


def _vector_zscore(d2: np.ndarray, dof: int) -> np.ndarray:
    """The one-dimensional z-score with the same two-sided tail probability as a chi-square
    statistic ``d2`` with ``dof`` degrees of freedom (``sqrt(d2)`` when ``dof = 1``)."""
    from scipy.stats import chi2, norm

    return norm.isf(np.clip(chi2.sf(d2, dof) / 2, 1e-300, None))


def _robust_z(dev: np.ndarray, inliers: np.ndarray) -> np.ndarray:
    """(dev - median) / (1.4826 MAD), the statistics taken over ``inliers``."""
    med = np.median(dev[inliers], axis=0)
    mad = 1.4826 * np.median(np.abs(dev[inliers] - med), axis=0)
    tiny = 1e-12 * np.maximum(np.abs(dev).max(axis=0), 1e-300)
    return (dev - med) / np.maximum(mad, tiny)


def outlier_scores(unit, components, positions=None, *, flux=None, test: str = "field",
                   sigma: float = 3.0) -> np.ndarray:
    """The outlier statistic of each bead (App. A-f), in units of standard deviations.

    Parameters
    ----------
    unit : ndarray (M, P)
        Normalised patches (unit l2), one per row.
    components : ndarray (I, P)
        Orthonormal principal components.
    positions : ndarray (M, ndim), optional
        Bead positions for the field trend (``"field"`` test); a constant trend without them.
    flux : ndarray (M,), optional
        Each bead's flux (any unit): the expected noise energy follows ``log flux``.
    test : {"field", "paper"}
        ``"paper"``: the largest ``|c_i - mean(c_i)| / std(c_i)`` over the coefficients
        ``c = unit @ components.T``. ``"field"``: the larger of two one-sided robust z-scores
        (deviation over 1.4826 x median absolute deviation): (1) *energy*: the log of the
        energy outside span(components), minus its least-squares fit on ``log flux`` and minus
        its leave-one-out local affine prediction from the nearest beads; (2) *shape*: the log
        mean square of the coefficients (each divided by the bead's noise level, the square
        root of its off-subspace energy per dimension) minus their local prediction, each
        scaled by the median absolute deviation of the neighbours' own deviations (at least
        half the global one). Both are computed twice, the second time with the first pass's
        outliers out of the fits and scales.
    sigma : float
        Threshold of the first pass's inliers (``"field"``).

    Returns
    -------
    ndarray (M,)
        A bead is an outlier when its score exceeds ``sigma``.
    """
    if test not in OUTLIER_TESTS:
        raise InputError(f"outlier_test: must be one of {', '.join(map(repr, OUTLIER_TESTS))}, "
                         f"got {test!r}")
    coef = unit @ components.T
    if test == "paper":
        sd = coef.std(axis=0)
        return (np.abs(coef - coef.mean(axis=0)) / np.where(sd > 0, sd, np.inf)).max(axis=1)
    m, n_i = coef.shape
    energy = np.clip(np.sum(unit**2, axis=1) - np.sum(coef**2, axis=1), 0, None)
    floor = max(float(np.median(energy)) * 1e-6, 1e-30)
    log_e = np.log(energy + floor)
    # each bead's noise level: the energy off the subspace per remaining dimension (dim beads
    # and spread PSFs, whose unit-l2 patches carry more noise, get a larger scale)
    noise = np.sqrt((energy + floor) / max(unit.shape[1] - n_i, 1))
    if flux is not None:
        lf = np.log(np.clip(flux, 1e-300, None))
        design = np.stack([np.ones(m), lf - np.median(lf)], axis=1)
    else:
        design = np.ones((m, 1))
    inliers = np.ones(m, dtype=bool)
    score = np.zeros(m)
    nd = 0 if positions is None else positions.shape[1]
    for _ in range(2):
        if inliers.sum() < nd + 3:
            inliers = np.ones(m, dtype=bool)
        # expected noise energy from the bead's brightness, over the beads kept so far
        sol, *_ = np.linalg.lstsq(design[inliers], log_e[inliers], rcond=None)
        feats = np.concatenate([coef / noise[:, None], (log_e - design @ sol)[:, None]], axis=1)
        if positions is None:
            dev = feats - np.median(feats[inliers], axis=0)[None, :]
            local = None
        else:
            trend, nb = _local_prediction(positions, feats, inliers, _NEIGHBOURS.get(nd, 12))
            dev = feats - trend
            local = 1.4826 * np.median(np.abs(dev[nb]), axis=1)
        glob = 1.4826 * np.median(np.abs(dev[inliers]), axis=0)
        glob = np.maximum(glob, 1e-12 * np.abs(dev).max(axis=0) + 1e-300)
        # energy off the subspace: a second bead, a hot pixel, a cosmic ray
        z_energy = np.clip(dev[:, -1] / glob[-1], 0, None)
        # shape: the coefficients' deviations, each scaled locally where the PSFs change fast
        # (the field's edge: every bead deviates more from its neighbours' fit, an outlier
        # much more than its neighbours), floored at half the global scale; their mean square
        # is heavy-tailed, so its log is compared with the beads' median robustly
        scale = glob[:-1] if local is None else np.maximum(local[:, :-1], 0.5 * glob[None, :-1])
        msq = np.mean((dev[:, :-1] / scale) ** 2, axis=1)
        z_shape = np.clip(_robust_z(np.log(msq + 1e-300)[:, None], inliers)[:, 0], 0, None)
        score = np.maximum(z_energy, z_shape)
        inliers = score <= sigma
    return score


RANK_RULES = ("noise", "support", "paper")
"""``"noise"``: Gavish-Donoho's known-noise threshold for the estimated Poisson-Gaussian noise
(default); ``"support"``: ``omega(beta) * median`` on the bump's support; ``"paper"``:
2.858 x median over the whole patches (II-E-c as printed)."""


def _gd_known_noise(beta: float) -> float:
    """Gavish & Donoho's optimal threshold over ``sqrt(n) sigma`` for a known noise level."""
    return float(np.sqrt(2 * (beta + 1) + 8 * beta / (beta + 1 + np.sqrt(beta**2 + 14 * beta + 1))))


def _largest_singular_value(a: np.ndarray) -> float:
    """sqrt of the largest eigenvalue of the smaller Gram matrix."""
    from scipy.linalg import eigvalsh

    g = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    n = len(g)
    return float(np.sqrt(max(eigvalsh(g, subset_by_index=[n - 1, n - 1])[0], 0.0)))


def _noise_model(raw, bump, components):
    """The Poisson-Gaussian noise of the patches from their rank-``k`` residual.

    Returns ``(a, b, signal, scale)``: the per-pixel variance ``a + b * signal`` in camera
    units (``signal (M, P)`` the unbumped rank-``k`` fit, clipped at zero) and ``scale (M,)``,
    each patch's flux times the l2 norm of its sum-one patch: dividing a bumped patch by it
    gives its unit-l2 row. See :func:`noise_threshold`.

    Memory: three ``(M, P)`` float64 arrays at a time (operations in place): a family of 90
    images of 600 beads has M = 54000 patches.
    """
    m, p = raw.shape
    k = len(components)
    x = raw * bump[None, :]
    flux = x.sum(axis=1)
    x /= flux[:, None]  # sum one
    norm = np.linalg.norm(x, axis=1)
    x /= norm[:, None]  # unit l2
    scale = flux * norm
    # Unbump only where the bump is not vanishing: near r_ext it can be ~1e-200 at a pixel,
    # and dividing by it overflowed (r = 17 on 130 dim patches: NaN threshold, crash). There
    # the unbumped signal cannot be recovered, and the entries' noise is ~0 after bumping.
    ok = bump > _UNBUMP_MIN
    safe_bump = np.where(ok, bump, 1.0)[None, :]
    fit = (x @ components.T) @ components  # camera units, unbumped, below
    del x
    fit *= scale[:, None]
    fit /= safe_bump
    fit[:, ~ok] = 0.0
    resid = raw - fit
    resid[:, ~ok] = 0.0
    resid *= resid
    resid *= m * p / max((m - k) * (p - k), 1)
    np.clip(fit, 0, None, out=fit)  # the signal
    # least squares of resid^2 ~ a + b * signal over the pixels where the bump is not
    # vanishing, by its 2x2 normal equations: the same solution as lstsq on the (M P) x 2
    # design matrix, without that matrix (1.5 GB at K = 90 images of 600 beads: the memory
    # peak of a family's PSF basis). Both are zero elsewhere.
    n = float(m * int(ok.sum()))
    s1, s2 = float(fit.sum()), float(np.vdot(fit, fit))
    r1, rs = float(resid.sum()), float(np.vdot(fit, resid))
    del resid
    (a, b), *_ = np.linalg.lstsq(np.array([[n, s1], [s1, s2]]), np.array([r1, rs]), rcond=None)
    tiny = 1e-12 * float(np.vdot(raw, raw)) / max(raw.size, 1) + 1e-300
    return max(float(a), tiny), max(float(b), 0.0), fit, scale


def noise_threshold(raw, bump, components, *, draws: int = 3, seed: int = 0,
                    weights=None) -> float:
    """The optimal hard threshold of the unit-l2 patch matrix for its own (estimated) noise.

    The unknown-noise rule ``omega(beta) * median`` assumes white noise. Bead patches carry
    Poisson-Gaussian noise of variance ``a + b * signal`` per pixel in camera units: much
    larger at a bright PSF's core than in its wings, larger after normalisation for dim beads
    and spread PSFs. That heteroscedastic noise has singular values far above the white-noise
    bulk, and the median rule keeps noise components (I = 28 on a bright simulated field,
    16 on patches of rank 3). Here ``a`` and ``b`` are fitted by least squares to the
    squared residuals of the rank-``k`` reconstruction (``k = len(components)``, corrected for
    the ``k`` fitted dimensions), the variance of every entry of the normalised matrix follows,
    and Gaussian matrices with exactly that variance are drawn (parallel analysis): their
    largest singular value is the bulk edge ``(1 + sqrt(beta)) sqrt(n) sigma`` of this noise,
    and the threshold is Gavish & Donoho's known-noise optimum relative to that edge,
    ``lambda*(beta) / (1 + sqrt(beta))`` times the largest edge over ``draws`` draws.

    Parameters
    ----------
    raw : ndarray (M, P)
        Background-free patches (camera units) on the support, without the bump.
    bump : ndarray (P,)
        The bump multiplier on the support.
    components : ndarray (k, P)
        Orthonormal leading components of the unit-l2 bumped patches.
    weights : ndarray (M,), optional
        Row weights of a weighted PCA (rows scaled by ``sqrt(weights)``): the noise rows are
        scaled alike.

    Returns
    -------
    float
        Singular values of the (row-weighted) unit-l2 patch matrix above this are signal.
    """
    m, p = raw.shape
    a, b, sd, scale = _noise_model(raw, bump, components)
    sd *= b  # in place on the signal: the noise's standard deviation of each entry
    sd += a
    np.sqrt(sd, out=sd)
    sd *= bump[None, :]
    sd /= scale[:, None]
    if weights is not None:
        sd *= np.sqrt(np.asarray(weights, dtype=np.float64))[:, None]
    rng = np.random.default_rng(seed)

    def draw():
        z = rng.standard_normal(sd.shape)
        z *= sd  # in place: one (M, P) array per draw, not two
        return _largest_singular_value(z)

    edge = max(draw() for _ in range(draws))
    beta = min(m, p) / max(m, p)
    return edge * _gd_known_noise(beta) / (1 + np.sqrt(beta))


def bead_snr(raw, bump, components) -> np.ndarray:
    """Signal-to-noise ratio of each bead's normalised patch (issue 12, weights).

    The l2 norm of the patch's signal over that of its noise, both after the bump multiplier
    (App. A-d), with the Poisson-Gaussian noise ``a + b * signal`` of :func:`noise_threshold`
    (fitted to the residual of the rank-``k`` fit of all the patches, the signal of each
    patch its own rank-``k`` fit):

        snr_m = 1 / sqrt(sum_p bump_p^2 (a + b s_mp)) / (f_m ||p_m / f_m||)

    with ``f_m`` the bead's bumped flux. For background-limited beads this is
    ``f_m ||p_m / f_m|| / (sigma sqrt(n_support))``, i.e. the flux over the noise summed over
    the support, times the sum-one patch's l2 norm (a broad, defocused blob has a smaller
    norm: for the same flux, its shape is noisier).

    Parameters
    ----------
    raw : ndarray (M, P)
        Background-free patches (camera units) on the bump's support, without the bump; each
        with a positive bumped sum.
    bump : ndarray (P,)
        The bump multiplier on the support.
    components : ndarray (k, P)
        Orthonormal leading components of the unit-l2 bumped patches.

    Returns
    -------
    ndarray (M,) float64
        The ratio of the unit-l2 row's signal norm to its noise norm (expected).
    """
    raw = np.asarray(raw, dtype=np.float64)
    bump = np.asarray(bump, dtype=np.float64)
    a, b, signal, scale = _noise_model(raw, bump, np.asarray(components, dtype=np.float64))
    b2 = bump**2
    energy = (a * b2.sum() + b * (signal @ b2)) / scale**2  # sum_p (a + b s_mp) bump_p^2, no (M, P) temporary
    return 1.0 / np.sqrt(np.maximum(energy, 1e-300))


def snr_weights(snr, snr_ref) -> np.ndarray:
    """Row weights from signal-to-noise ratios, capped: ``w = snr^2 / (snr^2 + snr_ref^2)``.

    Inverse noise variance (``snr^2 / snr_ref^2``) for beads much noisier than ``snr_ref``,
    one for beads much cleaner: a few very bright beads do not take over the PCA (the PSFs
    vary over the field, every region must count), a noisy patch counts by what it carries.
    Normalised to mean one (equal ratios give exactly equal weights, one).

    Parameters
    ----------
    snr : array (M,)
        From :func:`bead_snr`.
    snr_ref : float or "median"
        The ratio at which the weight is half its cap; ``"median"``: the beads' median.
    """
    s2 = np.asarray(snr, dtype=np.float64) ** 2
    ref = float(np.median(s2)) if isinstance(snr_ref, str) else float(snr_ref) ** 2
    return _mean_one(s2 / (s2 + ref))


def _mean_one(w: np.ndarray) -> np.ndarray:
    """``w`` over its mean; exactly ones when the values are equal (or not positive)."""
    mean = float(np.mean(w))
    return w / mean if mean > 0 and not np.all(w == w[0]) else np.ones_like(w)


#: Bump values below this are not divided by in :func:`noise_threshold`.
_UNBUMP_MIN = 1e-3


def fit_psf_basis(patches, n_components: int | None = None, *, outlier_sigma: float = 3.0,
                  r=None, r_ext=None, seed: int = 0, outlier_test: str = "field",
                  rank_rule: str = "noise", weights="snr", snr_ref=SNR_REF) -> xr.Dataset:
    """Learn the PSF basis h_i by PCA of normalised bead patches (paper App. A d-f, II-E).

    Parameters
    ----------
    patches : DataArray (bead, ky, kx) or (bead, kz, ky, kx), or ndarray of the same shape
        Background-free bead patches centred at index ``size // 2`` (:func:`pcmx.beads.extract_patches`
        then :func:`pcmx.background.subtract_background`). Coordinates along ``bead``
        (``bead_y``, ``bead_x`` [, ``bead_z``]) are carried to the kept beads and give the
        field trend of the outlier test.
    n_components : int, optional
        I. When None, the optimal hard threshold (module docstring, II-E-c) on the kept
        patches. A given I beyond what the data supports (the number of kept patches, or of
        pixels within the bump's support) is reduced to it with a
        :class:`~pcmx.io.readers.PcmxWarning` saying to what and why.
    outlier_sigma : float
        Threshold of the outlier test (App. A-f), standard deviations; ``inf`` disables it.
    r, r_ext : float or sequence, optional
        Radii of the bump multiplier (App. A-d), one per axis allowed (anisotropic voxels).
        ``r`` defaults to ``patches.attrs["psf_radius"]`` or ``(size // 2) / 1.2``; ``r_ext``
        to ``1.2 r``.
    seed : int
        Seed of the randomized SVD (used only for more than 2000 patches and pixels).
    outlier_test : {"field", "paper"}
        See :func:`outlier_scores`.
    rank_rule : {"noise", "support", "paper"}
        ``"noise"``: the known-noise optimal threshold for the estimated Poisson-Gaussian
        noise of the patches restricted to the bump's support (:func:`noise_threshold`);
        ``"support"``: ``omega(beta) * median`` on the support; ``"paper"``:
        ``2.858 * median`` over the whole patches (II-E-c as printed). Only used when
        ``n_components`` is None.
    weights : {"snr", "equal"} or array (bead,)
        Row weights of both PCAs (rows scaled by ``sqrt(w)``, issue 12): ``"snr"`` (default)
        from each bead's signal-to-noise ratio (:func:`bead_snr`, estimated after the
        unweighted first PCA) capped by :func:`snr_weights`; ``"equal"``: the unweighted PCA;
        an array: given (positive, any scale: normalised to mean one over the patches used).
        Weighting changes the basis, never a bead's own coefficients ``beta``.
    snr_ref : float or "median"
        The cap of ``weights="snr"`` (:func:`snr_weights`).

    Returns
    -------
    Dataset
        ``psf_basis (component, ky, kx)`` float32: orthonormal (unit l2, mutually orthogonal),
        zero beyond r_ext, the sign chosen so that each h_i has a non-negative sum.
        ``beta (bead, component)`` float32: for every *kept* patch ``p`` (after the bump), the
        coefficients of ``p / sum(p)`` in the basis, ``beta_i = <p / sum(p), h_i>``, so
        ``sum_i beta_i h_i`` is the orthogonal projection of the **sum-one** PSF onto span(h)
        and ``sum_i beta_i sum(h_i) ~= 1``.
        ``singular_values (rank)`` float32: the singular values of the second PCA (kept
        patches normalised to sum one then unit l2, on the support for ``rank_rule="support"``).
        ``kept (patch)`` bool: which input patches survived the outlier test; beta's ``bead``
        dimension enumerates ``patch[kept]``, with the input's ``bead`` coordinates.
        ``zscore (patch)`` float: the outlier statistic (NaN when not tested).
        ``snr (patch)`` float: :func:`bead_snr` of each patch (NaN where not estimated: a
        non-positive sum, or ``weights`` not ``"snr"``).
        ``weight (patch)`` float: the row weight of the second PCA (mean one over the kept
        patches, 0 for the others).
        attrs: ``n_components``, ``n_components_rule`` ("given", "gavish-donoho support" or
        "2.858 median"), ``n_components_first`` (I of the first PCA's test),
        ``rank_threshold`` (the factor on the median), ``n_outliers``, ``outlier_sigma``,
        ``outlier_test``, ``weights`` ("snr", "equal" or "given"), ``snr_ref``, ``psf_radius``,
        ``r_ext`` (numbers, or one per axis when they differ).

    Raises
    ------
    InputError
        Not 3- or 4-dimensional, no patch, NaNs, every patch with a non-positive sum, every
        patch an outlier, bad ``n_components``, ``outlier_test`` or ``rank_rule``.
    """
    # small dense problems (a few hundred patches): one BLAS thread is fastest, and much
    # faster than several on a busy machine
    with blas_limit(1):
        return _fit_psf_basis(patches, n_components, outlier_sigma=outlier_sigma, r=r,
                              r_ext=r_ext, seed=seed, outlier_test=outlier_test,
                              rank_rule=rank_rule, weights=weights, snr_ref=snr_ref)


def _row_weights(weights, m: int) -> tuple[str, np.ndarray | None]:
    if isinstance(weights, str):
        if weights not in WEIGHTINGS:
            raise InputError(f"weights: must be one of {', '.join(map(repr, WEIGHTINGS))} or an "
                             f"array of {m} positive values, got {weights!r}")
        return weights, None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (m,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise InputError(f"weights: expected {m} finite positive values (one per patch), got "
                         f"shape {w.shape}")
    return "given", w


def _fit_psf_basis(patches, n_components, *, outlier_sigma, r, r_ext, seed, outlier_test,
                   rank_rule, weights, snr_ref) -> xr.Dataset:
    data = _patch_data(patches)
    if n_components is not None and (isinstance(n_components, bool)
                                     or not isinstance(n_components, numbers.Integral)
                                     or n_components < 1):
        raise InputError(f"n_components: must be a positive integer, got {n_components!r}")
    if outlier_test not in OUTLIER_TESTS:
        raise InputError(f"outlier_test: must be one of {', '.join(map(repr, OUTLIER_TESTS))}, "
                         f"got {outlier_test!r}")
    if rank_rule not in RANK_RULES:
        raise InputError(f"rank_rule: must be one of {', '.join(map(repr, RANK_RULES))}, "
                         f"got {rank_rule!r}")
    m = data.shape[0]
    weighting, given = _row_weights(weights, m)
    if weighting == "snr" and not (snr_ref == "median" or (isinstance(snr_ref, numbers.Real)
                                                          and np.isfinite(snr_ref) and snr_ref > 0)):
        raise InputError(f"snr_ref: must be a positive number or 'median', got {snr_ref!r}")
    kshape = data.shape[1:]
    nd = len(kshape)
    rv, ev = _radii(patches, kshape, r, r_ext)
    bump = bump_multiplier(kshape, rv, ev, dtype=np.float64)
    sum_one, unit, sums = _normalise(data, bump)
    bad = ~(sums > 0)
    if bad.all():
        raise InputError("patches: every patch has a non-positive sum after background removal")
    # the PCA runs on the support (the pixels beyond r_ext are zero in every patch); the
    # paper's rule sees the whole patch, zeros included
    support = bump.ravel() > 0
    cols = np.ones_like(support) if rank_rule == "paper" else support
    x = unit[:, cols]
    raw_support = data.reshape(m, -1)[:, support].astype(np.float64)
    bump_support = bump.ravel()[support]
    snr = np.full(m, np.nan)
    row_w = np.ones(m)

    def reweight(rows, vt, k):
        """Row weights of the patches ``rows`` (mean one over them); SNR from a rank-k fit."""
        if weighting == "equal":
            return
        if weighting == "given":
            row_w[rows] = _mean_one(given[rows])
            return
        # the components on the support (the paper's rule decomposes whole patches, zero
        # beyond r_ext)
        snr[rows] = bead_snr(raw_support[rows], bump_support, vt[:k][:, support[cols]])
        row_w[rows] = snr_weights(snr[rows], snr_ref)

    def svd(rows):
        n = None if n_components is None else min(int(n_components), len(rows), x.shape[1])
        xw = x[rows]  # a copy (fancy indexing), weighted in place
        xw *= np.sqrt(row_w[rows])[:, None]
        return _svd(xw, n, seed)

    def rank(s, vt, rows):
        if rank_rule == "paper":
            return optimal_rank(s)
        k = optimal_rank(s, shape=x[rows].shape)
        if rank_rule == "noise":
            # the noise is estimated from the residual of a rank-j fit: a j too large fits
            # noise (the estimate falls, and I with it rises), a j too small leaves signal in
            # the residual (the estimate rises): grow j from 1 to the first fixed point
            limit, j = k, 1
            while True:
                thr = noise_threshold(raw_support[rows], bump_support, vt[:j], seed=seed,
                                      weights=None if weighting == "equal" else row_w[rows])
                count = max(1, int(np.count_nonzero(s > thr)))
                if count <= j or j >= limit:
                    return min(count, limit)
                j = count
        return k

    # first PCA and the outlier test (App. A-e, A-f)
    good = np.flatnonzero(~bad)
    s, vt = svd(good)
    n1 = int(n_components) if n_components is not None else rank(s, vt, good)
    n1 = max(1, min(n1, len(good), vt.shape[0]))
    if weighting != "equal":
        # the SNR of every bead from the unweighted PCA's rank-n1 fit, then the weighted PCA
        reweight(good, vt, n1)
        s, vt = svd(good)
        n1 = int(n_components) if n_components is not None else rank(s, vt, good)
        n1 = max(1, min(n1, len(good), vt.shape[0]))
    kept = ~bad
    zscore = np.full(m, np.nan)
    if np.isfinite(outlier_sigma) and len(good) > 2:
        positions = _bead_positions(patches, nd)
        zscore[good] = outlier_scores(x[good], vt[:n1], None if positions is None else positions[good],
                                      flux=sums[good], test=outlier_test, sigma=outlier_sigma)
        kept[good[zscore[good] > outlier_sigma]] = False
    if not kept.any():
        raise InputError("patches: every patch was rejected as an outlier by the z-score test")

    # second PCA on the kept patches, weighted anew among them (the noise model without the
    # outliers' residuals)
    kept_rows = np.flatnonzero(kept)
    reweight(kept_rows, vt, n1)
    row_w[~kept] = 0.0
    s, vt = svd(kept_rows)
    n_kept = int(kept.sum())
    if n_components is None:
        n_i = min(rank(s, vt, kept), n_kept, vt.shape[0])
        rule = {"noise": "gavish-donoho noise", "support": "gavish-donoho support",
                "paper": "2.858 median"}[rank_rule]
    else:
        n_i, rule = min(int(n_components), n_kept, vt.shape[0]), "given"
        if n_i < n_components:
            why = (f"the PCA of {n_kept} kept patches has at most {n_kept} components"
                   if n_kept <= x.shape[1] else
                   f"patches of {x.shape[1]} pixels within the PSF support (r_ext) have at most "
                   f"{x.shape[1]} components")
            warnings.warn(f"n_components={n_components} reduced to {n_i}: {why}", PcmxWarning,
                          stacklevel=3)
    h = np.zeros((n_i, support.size))
    h[:, cols] = vt[:n_i]
    h *= np.where(h.sum(axis=1) < 0, -1.0, 1.0)[:, None]
    beta = sum_one[kept] @ h.T
    shape_used = x[kept].shape
    factor = HARD_THRESHOLD if rank_rule == "paper" else hard_threshold(min(shape_used) / max(shape_used))

    coords = {"component": np.arange(n_i)}
    kdims = KERNEL_DIMS[-nd:]
    if isinstance(patches, xr.DataArray):
        for name, cvar in patches.coords.items():
            if cvar.dims == (patches.dims[0],):
                coords[name] = ("bead", np.asarray(cvar.values)[kept], dict(cvar.attrs))
            elif cvar.dims and tuple(patches.dims[1:]) == kdims and set(cvar.dims) <= set(kdims):
                coords[name] = cvar

    def _num(v):
        return float(v[0]) if np.all(v == v[0]) else [float(a) for a in v]

    return xr.Dataset(
        {
            "psf_basis": (("component", *kdims), h.reshape(n_i, *kshape).astype(np.float32)),
            "beta": (("bead", "component"), beta.astype(np.float32)),
            "singular_values": ("rank", s.astype(np.float32)),
            "kept": ("patch", kept),
            "zscore": ("patch", zscore),
            "snr": ("patch", snr),
            "weight": ("patch", row_w),
        },
        coords=coords,
        attrs={"n_components": int(n_i), "n_components_rule": rule,
               "n_components_first": int(n1), "rank_threshold": float(factor),
               "n_outliers": int((~kept).sum()), "outlier_sigma": float(outlier_sigma),
               "outlier_test": outlier_test, "weights": weighting,
               "snr_ref": snr_ref if isinstance(snr_ref, str) else float(snr_ref),
               "psf_radius": _num(rv), "r_ext": _num(ev)},
    )
