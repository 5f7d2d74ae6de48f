"""Validation without ground truth: k-fold cross-validation over held-out beads (issue: learn).

Each fold's beads are held out; the PSF basis, the cone and the thin-plate coefficient maps
are learned from the other beads only, and each held-out bead's normalised patch is predicted
at its own position. The same is done for the space-invariant model (the average normalised
PSF of the training beads). Real users have no ground truth: this is how they see whether the
space-varying model is worth it on their microscope.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .errors import InputError
from .io.readers import as_image

__all__ = ["cross_validate"]


def _normalised(patches: np.ndarray) -> np.ndarray:
    s = patches.reshape(len(patches), -1).sum(axis=1)
    s = np.where(np.abs(s) > 0, s, 1.0)
    return patches / s[:, None, None]


def cross_validate(image, *, folds: int = 5, n_components: int | None = None,
                   psf_radius: int | None = None, background: str | None = None,
                   realism: bool = True, eta: float | None = None, seed: int = 0,
                   pixel_size: str | None = None, _patches=None) -> xr.Dataset:
    """Per-bead relative prediction error of held-out beads, space-varying vs invariant.

    Parameters
    ----------
    image : path, array or DataArray (y, x)
    folds : int
        k; beads are split at random (``seed``) into k folds.
    n_components, psf_radius, background, realism, eta :
        As in :func:`pcmx.learn.learn_operator` (fixed across folds).

    Returns
    -------
    Dataset
        ``cv_error (bead)`` relative l2 error of the space-varying prediction of each held-out
        (normalised) bead patch, ``cv_error_invariant (bead)`` the same for the average PSF,
        ``cv_bead_y``, ``cv_bead_x``; attrs with the medians and their ratio.
    """
    from .cone import project_onto_cone, reduce_cone
    from .learn import bead_patches
    from .psf_basis import fit_psf_basis
    from .coefficients import fit_tps

    bp = _patches if _patches is not None else bead_patches(
        as_image(image, pixel_size=pixel_size), psf_radius=psf_radius, background=background)
    m = len(bp.positions)
    if folds < 2 or m < 2 * folds:
        raise InputError(f"folds={folds}: need at least 2 folds and 2 beads per fold ({m} beads)")
    rng = np.random.default_rng(seed)
    fold_of = rng.permutation(np.arange(m) % folds)
    from .beads import bump_multiplier

    raw = np.asarray(bp.patches.values, dtype=np.float64)
    # the model is zero beyond r_ext (App. A-d): compare on the same support, or the average PSF
    # is favoured by the noise the bump removes
    target = _normalised(raw * bump_multiplier(raw.shape[1:], bp.radius))
    err = np.full(m, np.nan)
    err_inv = np.full(m, np.nan)
    for f in range(folds):
        test = fold_of == f
        train = ~test
        sub = bp.patches.isel(bead=np.flatnonzero(train))
        basis = fit_psf_basis(sub, n_components, r=bp.radius)
        kept = np.asarray(basis["kept"].values, dtype=bool)
        h = np.asarray(basis["psf_basis"].values, dtype=np.float64)
        beta = np.asarray(basis["beta"].values, dtype=np.float64)
        pts = bp.positions[train][kept]
        tps = fit_tps(pts, beta, domain_shape=bp.shape, eta=eta)
        pred_beta = np.asarray(tps(bp.positions[test]), dtype=np.float64)
        if realism:
            gens = reduce_cone(beta, psf_basis=h.astype(np.float32))
            pred_beta = project_onto_cone(pred_beta, gens)
        pred = np.einsum("mi,ijk->mjk", pred_beta, h)
        pred = _normalised(pred)
        truth = target[test]
        norm = np.linalg.norm(truth.reshape(test.sum(), -1), axis=1)
        err[test] = np.linalg.norm((pred - truth).reshape(test.sum(), -1), axis=1) / norm
        mean_psf = target[train][kept].mean(axis=0)
        err_inv[test] = np.linalg.norm((mean_psf[None] - truth).reshape(test.sum(), -1), axis=1) / norm
    med, med_inv = float(np.nanmedian(err)), float(np.nanmedian(err_inv))
    ds = xr.Dataset(
        {"cv_error": ("bead", err.astype(np.float32)),
         "cv_error_invariant": ("bead", err_inv.astype(np.float32)),
         "cv_bead_y": ("bead", bp.positions[:, 0]),
         "cv_bead_x": ("bead", bp.positions[:, 1])},
        attrs={"folds": int(folds), "median_error": med, "median_error_invariant": med_inv,
               "improvement": med_inv / med if med > 0 else float("inf"), "n_beads": int(m)},
    )
    return ds
