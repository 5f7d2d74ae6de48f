"""Validation without ground truth: k-fold cross-validation over held-out beads (paper II-C, II-D).

Each fold's beads are held out; the models are learned from the other beads only, and each
held-out bead's normalised patch is predicted at its own position. Real users have no ground
truth: this is how they see whether a model is worth it on their microscope.

:func:`cross_validate`
    One image: every fold is fitted by :func:`pcmx.fit.fit_operator`, the fit that
    :func:`pcmx.learn.learn_operator` stores, with the same options (automatic choices made
    again on the training beads), so a fold differs from the stored model only by the beads it
    leaves out; the held-out PSFs are the fold's fit read at their positions (the exact spline
    under the realism projection, which the stored maps sample on a lattice within 3e-3).
    Beside it, the space-invariant reference: the flux-weighted mean of the same training beads'
    centred, background-free patches; and model selection's candidates
    (:func:`model_candidates`), chosen among by :func:`select_model`.
:func:`cross_validate_family`
    K images of one microscope in K states (paper II-D): per image, the family learned from
    the training beads of *all* images (one PCA, per-image maps under the family's realism
    policy, the family's SVD to J spatial modes, ``gamma_k``), that image's single operator
    (as above), and the space-invariant reference, on the same folds.
"""

from __future__ import annotations

import os

import numpy as np
import xarray as xr
from scipy.ndimage import map_coordinates

from .beads import bump_multiplier
from .coefficients import coefficient_maps
from .errors import InputError
from .execution import progress_bar, run_tasks
from .fit import fit_basis, fit_operator, realism_policy
from .io.readers import as_image
from .modes import gram_matrix, modes_of_gram, realism_of_family
from .patches import BeadPatches, bead_patches, pooled_radius, radius_profiles, radius_sample
from .psf_basis import fit_psf_basis
from .units import from_pixels

__all__ = ["cross_validate", "cross_validate_family", "fold_labels", "heldout_flux", "heldout_targets",
           "heldout_summary", "invariant_reference", "model_candidates", "position_vars", "predict_psfs",
           "select_model", "CANDIDATES", "SMOOTHER"]


def _normalised(patches: np.ndarray) -> np.ndarray:
    s = patches.reshape(len(patches), -1).sum(axis=1)
    s = np.where(np.abs(s) > 0, s, 1.0)
    return patches / s.reshape((-1,) + (1,) * (patches.ndim - 1))


def fold_labels(m: int, folds: int, seed: int) -> np.ndarray:
    """Fold index of each of ``m`` beads: balanced, at random (``seed``)."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(m) % folds)


def heldout_targets(bp: BeadPatches) -> np.ndarray:
    """Sum-one patches on the model's support (the bump of App. A-d), float64 (M, [kz,] ky, kx).

    The model is zero beyond r_ext: predictions are compared on the same support, or the
    space-invariant reference would be favoured by the noise the bump removes.
    """
    raw = np.asarray(bp.patches.values, dtype=np.float64)
    return _normalised(raw * bump_multiplier(raw.shape[1:], bp.radius))


def invariant_reference(bp: BeadPatches) -> np.ndarray:
    """The space-invariant model of beads ``bp``: the flux-weighted mean of their centred,
    background-free patches on the model's support, sum one.

    With ``p_m`` the bumped patches and ``f_m`` their fluxes, ``sum_m f_m (p_m / f_m) /
    sum_m f_m = sum_m p_m / sum_m f_m``: bright beads count by their signal, where an
    equal-weight mean of normalised patches gives a faint, broad blob the weight of a bright
    in-focus bead.
    """
    raw = np.asarray(bp.patches.values, dtype=np.float64)
    total = (raw * bump_multiplier(raw.shape[1:], bp.radius)).sum(axis=0)
    return total / total.sum() if total.sum() != 0 else total


def heldout_flux(bp: BeadPatches) -> np.ndarray:
    """Each bead's flux on the model's support (the bumped, background-free patch's sum)."""
    raw = np.asarray(bp.patches.values, dtype=np.float64)
    return (raw * bump_multiplier(raw.shape[1:], bp.radius)).reshape(len(raw), -1).sum(axis=1)


def _relative_errors(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    n = len(truth)
    norm = np.linalg.norm(truth.reshape(n, -1), axis=1)
    return np.linalg.norm((pred - truth).reshape(n, -1), axis=1) / norm


def predict_psfs(coefficients: np.ndarray, psf_basis: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Sum-one PSFs ``sum_i alpha_i(z) h_i`` at sub-pixel ``points (m, ndim)`` (pixels), the maps
    ``coefficients (I, [nz,] ny, nx)`` read bi/trilinearly; float64 ``(m, [kz,] ky, kx)``."""
    alpha = np.stack([map_coordinates(np.asarray(c, dtype=np.float64), points.T, order=1,
                                      mode="nearest") for c in coefficients], axis=1)
    return _normalised(np.tensordot(alpha, np.asarray(psf_basis, dtype=np.float64), axes=1))


def _used_beads(bp: BeadPatches, op: xr.Dataset) -> np.ndarray:
    """Mask of the beads of ``bp`` that the fitted operator ``op`` used (its ``bead_*``)."""
    dims = ("z", "y", "x")[-bp.positions.shape[1]:]
    used = np.stack([np.asarray(op[f"bead_{d}"].values) for d in dims], axis=1)
    key = {tuple(p) for p in used.tolist()}
    return np.array([tuple(p) in key for p in bp.positions.tolist()], dtype=bool)


#: Model selection's candidate names (:func:`model_candidates`), simplest first: the order
#: in which :func:`select_model`'s one-standard-error rule prefers them. An alternative of the
#: same complexity as the automatic choices ("smoother", "no realism") is preferred after
#: them: it is chosen only where it beats them by more than the noise.
CANDIDATES = ("space-invariant", "fewer components", "automatic", "smoother", "non-negative", "no realism")
#: Candidates whose held-out error is measured and recorded but that are never stored: without
#: a realism projection predicted PSFs may go negative (what the projection costs, or gains,
#: is reported all the same).
CHECKED_ONLY = ("no realism",)
#: The smoother candidate's factor on the GCV smoothing weight eta.
SMOOTHER = 4.0
#: Bootstrap resamples of :func:`select_model`'s standard error.
BOOTSTRAP = 200


def model_candidates(*, n_components: int | None, eta: float | None, realism,
                     n_chosen: int, check_realism: bool = True) -> list[dict]:
    """The space-varying candidates of model selection by held-out error (issue 12).

    ``"automatic"``: the options as given (I by the rank rule, eta by GCV, the realism policy);
    each automatic choice is checked against one alternative, fitted on the same folds:
    ``"fewer components"`` (I = ``n_chosen // 2``, half the I the rank rule chose on all the
    beads; only when I is automatic and that is at least 2), ``"smoother"`` (:data:`SMOOTHER`
    times the GCV eta; only when eta is automatic), and with ``check_realism`` and the cone
    ``"non-negative"`` (the same spline under the non-negativity projection instead) and
    ``"no realism"`` (the same spline unprojected: recorded, never stored,
    :data:`CHECKED_ONLY`). The space-invariant reference is a candidate too, always there.

    Returns
    -------
    list of dict
        ``{"name", "n_components", "eta", "eta_scale", "realism"}`` (the options of
        :func:`pcmx.fit.fit_operator`), the automatic one first.
    """
    policy = realism_policy(realism)
    base = {"n_components": n_components, "eta": eta, "eta_scale": 1.0, "realism": policy}
    out = [{"name": "automatic", **base}]
    if n_components is None and n_chosen >= 2:
        out.append({"name": "fewer components", **base, "n_components": int(n_chosen) // 2})
    if eta is None:
        out.append({"name": "smoother", **base, "eta_scale": SMOOTHER})
    if check_realism and policy.kind == "cone":
        out.append({"name": "non-negative", **base, "realism": realism_policy("nonnegative")})
    if check_realism and policy.enabled:
        out.append({"name": "no realism", **base, "realism": realism_policy("none")})
    return out


def select_model(errors: dict, *, seed: int = 0, n_boot: int = BOOTSTRAP,
                 checked_only=CHECKED_ONLY) -> dict:
    """Model selection by held-out error with the one-standard-error rule.

    ``errors``: candidate name -> per-bead held-out errors (the same beads and folds for all).
    The best candidate has the smallest median error; each candidate's paired difference to
    it, ``median_m (e_c,m - e_best,m)``, is compared with its noise, the standard deviation of
    that median over ``n_boot`` bootstrap resamples of the beads (``seed``). The chosen model
    is the simplest (first in :data:`CANDIDATES` order) whose difference is within one
    standard error: a more complex model must beat a simpler one by more than the noise.
    Candidates in ``checked_only`` are measured against the best too but neither chosen nor
    the best.

    Returns
    -------
    dict
        ``chosen``, ``best``, and per candidate ``median_error``, ``paired_difference`` and
        ``standard_error`` (dicts by name), ``rule``.
    """
    names = sorted(errors, key=lambda n: CANDIDATES.index(n) if n in CANDIDATES else len(CANDIDATES))
    e = np.stack([np.asarray(errors[n], dtype=np.float64) for n in names])
    ok = np.isfinite(e).all(axis=0)
    e = e[:, ok]
    med = np.median(e, axis=1)
    b = int(np.argmin(np.where([n in checked_only for n in names], np.inf, med)))
    diff = e - e[b]
    idx = np.random.default_rng(seed).integers(0, e.shape[1], size=(n_boot, e.shape[1]))
    paired = np.median(diff, axis=1)
    se = np.array([np.std(np.median(d[idx], axis=1)) for d in diff])
    chosen = next(n for n, p, s_ in zip(names, paired, se, strict=True)
                  if p <= s_ and n not in checked_only)
    return {"chosen": chosen, "best": names[b], "rule": "one standard error (bootstrap of the "
            f"median paired difference, {n_boot} resamples)",
            "median_error": {n: float(v) for n, v in zip(names, med, strict=True)},
            "paired_difference": {n: float(v) for n, v in zip(names, paired, strict=True)},
            "standard_error": {n: float(v) for n, v in zip(names, se, strict=True)}}


def _fold(bp: BeadPatches, target: np.ndarray, test: np.ndarray, specs: list[dict]):
    """Held-out errors of beads ``test`` under every candidate ``specs`` fitted on the others
    (:func:`pcmx.fit.fit_operator` read at the held-out positions), and under the space-
    invariant reference fitted on the beads the automatic candidate used.

    One fold's PCA (and cone) is shared by the candidates of one I, one spline by those of one
    eta scale: "no realism" is the automatic fit's spline before its projection.
    """
    train = bp.subset(~test)
    pts = bp.positions[test]
    truth = target[test]
    errs, first, n_auto = {}, None, None
    groups: dict = {}
    for c in specs:
        groups.setdefault(c["n_components"], {}).setdefault(c["eta_scale"], []).append(c)
    for n_i, by_scale in groups.items():
        basis = fit_basis(train, n_i)
        gens = None
        for scale, group in by_scale.items():
            policy = next((c["realism"] for c in group if c["realism"].enabled), group[0]["realism"])
            op = fit_operator(train, n_components=n_i, eta=group[0]["eta"], realism=policy,
                              eta_scale=scale, at=pts, basis=basis, generators=gens)
            if "cone_generators" in op:
                gens = op["cone_generators"].values
            h = np.asarray(op["psf_basis"].values, dtype=np.float64)
            for c in group:
                if c["realism"] == policy:
                    coef = op["heldout_coefficients"].values
                else:  # another projection of the same spline (its setup needs no cone)
                    coef = op["heldout_spline_coefficients"].values
                    other = c["realism"].setup(None, h)["project"]
                    coef = coef if other is None else np.asarray(other(coef), dtype=np.float64)
                pred = _normalised(np.tensordot(coef, h, axes=1))
                errs[c["name"]] = _relative_errors(pred, truth)
                if c is specs[0]:
                    first, n_auto = op, int(op.sizes["component"])
    ref = invariant_reference(train.subset(_used_beads(train, first)))
    errs["space-invariant"] = _relative_errors(np.broadcast_to(ref, truth.shape), truth)
    return errs, n_auto


def heldout_summary(err: np.ndarray, err_inv: np.ndarray, flux: np.ndarray) -> dict:
    """The medians of held-out errors ``err`` (a model) and ``err_inv`` (the reference), their
    ratio ``improvement`` (reference / model), and the same over the brightest third of the
    beads by ``flux`` (``*_bright``: on dim beads both errors are the noise's, and tie)."""
    med, med_inv = float(np.nanmedian(err)), float(np.nanmedian(err_inv))
    bright = flux >= np.quantile(flux, 2 / 3)
    med_b, med_inv_b = float(np.nanmedian(err[bright])), float(np.nanmedian(err_inv[bright]))
    return {"median_error": med, "median_error_invariant": med_inv,
            "improvement": med_inv / med if med > 0 else float("inf"),
            "median_error_bright": med_b, "median_error_invariant_bright": med_inv_b,
            "improvement_bright": med_inv_b / med_b if med_b > 0 else float("inf"),
            "n_bright": int(bright.sum())}


def position_vars(prefix: str, dim: str, positions: np.ndarray, grid=None) -> dict:
    """``{prefix}_[z,] y, x`` variables along ``dim`` for pixel ``positions (M, ndim)``, in the
    units of ``grid``'s coordinates (:func:`pcmx.units.from_pixels`: micrometres for a
    calibrated image; pixels, ``units="pixel"``, without ``grid``); read back with
    :func:`pcmx.units.to_pixels`."""
    pos = np.asarray(positions, dtype=np.float64)
    dims = ("z", "y", "x")[-pos.shape[1]:]
    if grid is None:
        vals = {d: (pos[:, k], "pixel") for k, d in enumerate(dims)}
    else:
        vals = from_pixels(grid, **{d: pos[:, k] for k, d in enumerate(dims)})
    return {f"{prefix}_{d}": (dim, np.asarray(vals[d][0], dtype=np.float64), {"units": str(vals[d][1])})
            for d in dims}


def cross_validate(image, *, folds: int = 5, seed: int = 0, n_components: int | None = None,
                   psf_radius=None, threshold: float | None = None, background: str | None = None,
                   realism="cone", eta: float | None = None,
                   pixel_size: str | None = None, candidates: list[dict] | None = None,
                   grid=None) -> xr.Dataset:
    """Per-bead relative prediction error of held-out beads, space-varying vs invariant.

    Parameters
    ----------
    image : path, array, DataArray (y, x) or (z, y, x), or :class:`pcmx.patches.BeadPatches`
        A bead image (its beads found by :func:`pcmx.patches.bead_patches`), or its beads
        already extracted (:func:`pcmx.learn.learn_operator` passes its own: the image is read
        and the beads detected once).
    folds : int
        k; beads are split at random (``seed``) into k folds.
    n_components, realism, eta :
        The options of :func:`pcmx.fit.fit_operator`, as given to
        :func:`pcmx.learn.learn_operator`: each fold makes the automatic choices again on its
        training beads, as the stored model made them on all beads.
    psf_radius, threshold, background, pixel_size :
        The bead steps' options (:func:`pcmx.patches.bead_patches`) when ``image`` is an image.
    candidates : list of dict, optional
        Model selection's space-varying candidates (:func:`model_candidates`), fitted on the
        same folds; the first is the automatic fit (default: that one alone, from the options).
    grid : DataArray or Dataset, optional
        Whose coordinates the stored positions ``cv_bead_*`` are given in (the image; by
        default the image read here, or pixels for given bead patches).

    Returns
    -------
    Dataset
        ``cv_error (bead)`` relative l2 error of the automatic fit's prediction of each
        held-out (sum-one, bumped) bead patch, ``cv_error_invariant (bead)`` the same for the
        space-invariant reference, ``cv_error_candidates (candidate, bead)`` every candidate's
        (with ``candidates``), ``cv_bead_[z,] y, x`` (the image's coordinate units:
        micrometres where calibrated, else pixels; ``units`` attrs), ``cv_fold``, ``cv_flux``;
        attrs with the medians, their ratio ``improvement`` (reference / model), the same over
        the brightest third of the beads (``*_bright``) and the components chosen per fold.

    Notes
    -----
    Each fold is :func:`pcmx.fit.fit_operator` on the training beads with the stored model's
    options, its maps read at the held-out positions only (the exact spline there, under the
    realism projection): the stored maps are the same spline and projection on a lattice,
    within 1e-3-3e-3 of the PSF (:func:`pcmx.coefficients.coefficient_maps`' tolerance).

    Raises
    ------
    InputError
        Fewer than 2 folds or fewer than 2 beads per fold.
    """
    if isinstance(image, BeadPatches):
        bp = image
    else:
        img = as_image(image, pixel_size=pixel_size)
        grid = img if grid is None else grid
        bp = bead_patches(img, psf_radius=psf_radius, threshold=threshold, background=background)
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)):
        raise InputError(f"folds={folds!r}: need an integer of at least 2")
    # held-out beads: every bead of the bead pipeline's fixed criterion (isolated, unsaturated,
    # inside the field, a clean PSF shape against the field's), whatever the fit then rejects
    bp = bp.usable_beads()
    m = len(bp.positions)
    if folds < 2 or m < 2 * folds:
        raise InputError(f"folds={folds}: need at least 2 folds and 2 beads per fold ({m} beads)")
    specs = candidates or [{"name": "automatic", "n_components": n_components, "eta": eta,
                            "eta_scale": 1.0, "realism": realism_policy(realism)}]
    fold_of = fold_labels(m, folds, seed)
    target = heldout_targets(bp)
    err = {name: np.full(m, np.nan) for name in [c["name"] for c in specs] + ["space-invariant"]}
    chosen = []
    # the folds are independent: on the thread pool, one BLAS thread each (the PCA's SVDs, the
    # cone's and the spline's solves release the GIL: learn_operator's default on 2304^2 with 600
    # beads, 6.3-6.5 s in turn, 5.2-6.0 s on 2 threads: the shared 2-core machine's noise is ~10%)
    results = run_tasks(_fold, [(bp, target, fold_of == f, specs) for f in range(folds)],
                        desc="cross-validation", unit="fold")
    for f, (fold_err, n_i) in enumerate(results):
        test = fold_of == f
        for name, v in fold_err.items():
            err[name][test] = v
        chosen.append(n_i)
    flux = heldout_flux(bp)
    auto, inv = err[specs[0]["name"]], err["space-invariant"]
    data = {"cv_error": ("bead", auto.astype(np.float32)),
            "cv_error_invariant": ("bead", inv.astype(np.float32)),
            "cv_fold": ("bead", fold_of.astype(np.int16)),
            "cv_flux": ("bead", flux.astype(np.float32), {"long_name": "bead flux on the model's support"}),
            **position_vars("cv_bead", "bead", bp.positions, grid)}
    coords = {}
    if len(specs) > 1:
        names = [c["name"] for c in specs] + ["space-invariant"]
        data["cv_error_candidates"] = (("candidate", "bead"), np.stack([err[n] for n in names]).astype(np.float32),
                                       {"long_name": "held-out error of each model selection candidate"})
        coords["candidate"] = names
    return xr.Dataset(
        data, coords=coords,
        attrs={"folds": int(folds), "seed": int(seed), **heldout_summary(auto, inv, flux),
               "n_beads": int(m), "n_components": chosen,
               "invariant_reference": "flux-weighted mean of training beads"},
    )


def _family_inputs(images) -> tuple[list, list]:
    """The K images of a family and their labels (as :func:`pcmx.family.learn_family` takes them)."""
    if isinstance(images, xr.DataArray) and "state" in images.dims:
        labels = ([v.item() if isinstance(v, np.generic) else v for v in images["state"].values] if "state" in images.coords
                  else [f"state{k}" for k in range(images.sizes["state"])])  # ints stay ints
        return [images.isel(state=k) for k in range(images.sizes["state"])], labels
    if isinstance(images, (str, os.PathLike, np.ndarray)) or (
            isinstance(images, xr.DataArray) and images.ndim == 2):
        raise InputError("images: expected a sequence of K images or a DataArray with a 'state' "
                         f"dimension, got one {type(images).__name__}")
    images = list(images)
    labels = []
    for k, im in enumerate(images):
        if isinstance(im, (str, os.PathLike)):
            labels.append(os.path.basename(os.fspath(im)))
        elif isinstance(im, xr.DataArray) and "source" in im.attrs:
            labels.append(str(im.attrs["source"]))
        else:
            labels.append(f"state{k}")
    return images, labels


def cross_validate_family(images, *, folds: int = 5, n_components: int | None = None,
                          n_modes: int | None = None, psf_radius: int | None = None,
                          background: str | None = None, realism="nonnegative",
                          eta: float | None = None, seed: int = 0,
                          pixel_size: str | None = None, mode_rule: str = "capped",
                          labels=None, grid=None) -> xr.Dataset:
    """Held-out bead errors of a family, of each image's own operator and of the invariant reference.

    The beads of every image are split into ``folds`` folds (the split of image k is the one
    :func:`cross_validate` makes with the same ``seed``). For fold f, the beads of fold f of
    *every* image are left out of everything: the one PCA over all images' patches (the shared
    PSF basis h_i, z-score rejection included), the realism policy's cone or projection, each
    image's coefficient maps alpha_{i,k} and so the SVD to the spatial modes a_j and the
    gammas (paper II-D-b, steps 2-8). Each held-out bead of image k is then predicted at its
    position by the family, ``sum_ij gamma_k[i, j] a_j(z) h_i``, by image k's single operator
    learned from its training beads alone (exactly as in :func:`cross_validate`), and by the
    space-invariant reference of those beads (:func:`invariant_reference`).

    Parameters
    ----------
    images : sequence of paths/arrays/DataArrays (y, x), or a DataArray with a ``state`` dim
        K >= 2 bead images on one grid (e.g. planes of a z-stack around focus); or K
        :class:`pcmx.patches.BeadPatches` of one radius, the images' beads already extracted
        (:func:`pcmx.family.learn_family` passes its own: nothing is detected twice).
    folds : int
        k; at least 2, and every image needs at least 2 beads per fold.
    n_components : int, optional
        I of the family (and of each single operator); by the rank rule per fold when None.
    n_modes : int, optional
        J; per fold from the maps' singular values by ``mode_rule`` (as in
        :func:`pcmx.family.learn_family`) when None.
    psf_radius : int, optional
        r, shared by all images; when None, from the pooled bead profiles of up to
        :data:`pcmx.patches.RADIUS_IMAGES` images, as :func:`pcmx.family.learn_family` does.
    realism : {"nonnegative", "cone", "none"}, bool or :class:`pcmx.fit.Realism`
        The family's realism policy, as in :func:`pcmx.family.learn_family`; each single
        operator uses the same policy.
    background, eta :
        As in :func:`pcmx.learn.learn_operator`; fixed across folds and images.
    seed : int
        Seed of the split into folds.
    pixel_size : str, optional
        For images whose metadata lacks it.
    labels : sequence of str, optional
        The states' labels (default: the file names, ``source`` attrs or ``state<k>``).
    grid : DataArray, optional
        Whose coordinates ``cv_bead_y``, ``cv_bead_x`` are given in (default: the first image;
        pixels for given bead patches without it).

    Returns
    -------
    Dataset
        Per held-out bead (dim ``bead``, all images' beads one after the other):
        ``cv_error_family``, ``cv_error_single``, ``cv_error_invariant`` (relative l2 errors of
        the sum-one predictions against the sum-one observed patch on the model's support),
        ``cv_bead_y``, ``cv_bead_x`` (the images' coordinate units, micrometres where
        calibrated; ``units`` attrs), ``cv_bead_state`` (the image's index).
        Per image (dim ``state``, the images' labels): ``median_error_family``,
        ``median_error_single``, ``median_error_invariant``, ``n_beads``.
        attrs: ``folds``, ``psf_radius``, ``n_components`` and ``n_modes`` per fold, and the
        medians over all held-out beads.

    Raises
    ------
    InputError
        Fewer than 2 images, images of different shapes, an image without beads (its label in
        the message), too few beads for the folds, fewer than 4 training beads in a fold of an
        image, ``n_modes`` larger than K * I.

    Notes
    -----
    With ``U_J`` the first J left singular vectors of the ``(K I) x P`` matrix A of all maps,
    ``gamma_k[i, j] = <alpha_{i,k}, a_j>`` and ``a_j = A^T U[:, j] / s_j``, so the family's
    coefficients are ``U_J U_J^T`` applied to the vector of all K*I maps' values at the bead:
    the prediction needs the maps only at the held-out positions (bilinear) and their Gram
    matrix (:func:`pcmx.family.gram_matrix`, :func:`pcmx.family.modes_of_gram`: the family's
    own SVD). The maps of one fold are held in memory (float32, ``K I ny nx`` values):
    cross-validate on a subset of images or a crop for very large data.
    """
    policy = realism_of_family(realism)
    given = not isinstance(images, xr.DataArray) and not isinstance(images, (str, os.PathLike)) and \
        all(isinstance(im, BeadPatches) for im in images)
    images, own_labels = (list(images), [f"state{k}" for k in range(len(images))]) if given \
        else _family_inputs(images)
    labels = own_labels if labels is None else list(labels)
    if len(images) < 2:
        raise InputError(f"images: a family needs at least 2 images, got {len(images)}")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise InputError(f"folds={folds!r}: need an integer of at least 2")
    if given:  # the family's own beads (pcmx.family.learn_family passes its checkpointed ones)
        bps = [bp.usable_beads() for bp in images]
        r = bps[0].radius
    else:
        imgs = [as_image(im, pixel_size=pixel_size) for im in images]
        grid = imgs[0] if grid is None else grid
        shape = imgs[0].shape
        for lab, im in zip(labels, imgs, strict=True):
            if im.shape != shape:
                raise InputError(f"{lab}: shape {im.shape} differs from {shape} of {labels[0]}")
        bps, r = [], psf_radius
        if r is None:
            r, _ = pooled_radius([radius_profiles(imgs[k]) for k in radius_sample(len(imgs))])
        for lab, im in zip(labels, imgs, strict=True):
            try:
                # the beads a model may be fitted on, as learn_family checkpoints them
                bp = bead_patches(im, psf_radius=r, background=background).usable_beads()
            except InputError as exc:
                raise InputError(f"{lab}: {exc}") from None
            r = bp.radius
            bps.append(bp)
    shape = bps[0].shape
    for lab, bp in zip(labels, bps, strict=True):
        if len(bp.positions) < 2 * folds:
            raise InputError(f"{lab}: folds={folds} needs at least 2 beads per fold, "
                             f"{len(bp.positions)} beads")
    k_count = len(bps)
    fold_of = [fold_labels(len(bp.positions), folds, seed) for bp in bps]
    targets = [heldout_targets(bp) for bp in bps]
    errs = {name: [np.full(len(bp.positions), np.nan) for bp in bps]
            for name in ("family", "single", "invariant")}
    single_specs = [{"name": "automatic", "n_components": n_components, "eta": eta, "eta_scale": 1.0,
                     "realism": policy}]
    used_i, used_j = [], []
    bar = progress_bar(None, folds, "family cross-validation", "fold")
    for f in range(folds):
        bar.update(1 if f else 0)
        train = [fo != f for fo in fold_of]
        patches = xr.concat([bp.patches.isel(bead=np.flatnonzero(t)) for bp, t in zip(bps, train, strict=True)],
                            dim="bead")
        owner = np.concatenate([np.full(int(t.sum()), k) for k, t in enumerate(train)])
        positions = np.concatenate([bp.positions[t] for bp, t in zip(bps, train, strict=True)])
        basis = fit_psf_basis(patches, n_components, r=r)
        kept = np.asarray(basis["kept"].values, dtype=bool)
        h = np.asarray(basis["psf_basis"].values, dtype=np.float32)
        beta = np.asarray(basis["beta"].values, dtype=np.float64)
        owner, positions = owner[kept], positions[kept]
        n_i = h.shape[0]
        proj = policy.setup(beta, h)
        maps = []
        for k in range(k_count):
            sel = owner == k
            if sel.sum() < 4:
                raise InputError(f"{labels[k]}: only {int(sel.sum())} training beads in fold {f}; "
                                 "at least 4 are needed for its coefficient maps")
            maps.append(coefficient_maps(positions[sel], beta[sel], shape, eta=eta, **proj))
        stacked = np.concatenate(maps)
        u_j, _, j = modes_of_gram(gram_matrix(stacked), n_modes, mode_rule)
        proj_j = u_j @ u_j.T  # U_J U_J^T
        used_i.append(int(n_i))
        used_j.append(int(j))
        for k, (bp, fo) in enumerate(zip(bps, fold_of, strict=True)):
            test = fo == f
            pts = bp.positions[test]
            values = np.stack([map_coordinates(mp, pts.T, order=1, mode="nearest")
                               for mp in stacked]).astype(np.float64)
            pred_beta = (proj_j[k * n_i:(k + 1) * n_i] @ values).T
            pred = _normalised(np.tensordot(pred_beta, h.astype(np.float64), axes=1))
            truth = targets[k][test]
            errs["family"][k][test] = _relative_errors(pred, truth)
            one, _ = _fold(bp, targets[k], test, single_specs)
            errs["single"][k][test], errs["invariant"][k][test] = one["automatic"], one["space-invariant"]
    bar.update(1)
    bar.close()
    bead_state = np.concatenate([np.full(len(bp.positions), k) for k, bp in enumerate(bps)])
    flat = {name: np.concatenate(v) for name, v in errs.items()}
    data = {f"cv_error_{name}": ("bead", v.astype(np.float32)) for name, v in flat.items()}
    data.update({
        **position_vars("cv_bead", "bead", np.concatenate([bp.positions for bp in bps]), grid),
        "cv_bead_state": ("bead", bead_state),
        "n_beads": ("state", np.array([len(bp.positions) for bp in bps])),
    })
    for name, v in errs.items():
        data[f"median_error_{name}"] = ("state", np.array([np.nanmedian(e) for e in v]))
    attrs = {"folds": int(folds), "psf_radius": int(r), "n_components": used_i, "n_modes": used_j,
             **{f"median_error_{name}": float(np.nanmedian(v)) for name, v in flat.items()}}
    return xr.Dataset(data, coords={"state": labels}, attrs=attrs)
