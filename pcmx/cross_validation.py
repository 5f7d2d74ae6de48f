"""Validation without ground truth: k-fold cross-validation over held-out beads (paper II-C, II-D).

Each fold's beads are held out; the models are learned from the other beads only, and each
held-out bead's normalised patch is predicted at its own position. Real users have no ground
truth: this is how they see whether a model is worth it on their microscope.

:func:`cross_validate`
    One image: the space-varying operator (PSF basis, cone and thin-plate coefficient maps
    learned without the held-out beads) beside the space-invariant model (the average
    normalised PSF of the training beads).
:func:`cross_validate_family`
    K images of one microscope in K states (paper II-D): per image, the family learned from
    the training beads of *all* images (one PCA, per-image maps, SVD to J spatial modes,
    ``gamma_k``), that image's single operator, and its average PSF, on the same folds.
"""

from __future__ import annotations

import os

import numpy as np
import xarray as xr

from .errors import InputError
from .io.readers import as_image

__all__ = ["cross_validate", "cross_validate_family"]


def _normalised(patches: np.ndarray) -> np.ndarray:
    s = patches.reshape(len(patches), -1).sum(axis=1)
    s = np.where(np.abs(s) > 0, s, 1.0)
    return patches / s.reshape((-1,) + (1,) * (patches.ndim - 1))


def _folds(m: int, folds: int, seed: int) -> np.ndarray:
    """Fold index of each of ``m`` beads: balanced, at random (``seed``)."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(m) % folds)


def _targets(bp) -> np.ndarray:
    """Sum-one patches on the model's support (the bump of App. A-d), float64 (M, [kz,] ky, kx)."""
    from .beads import bump_multiplier

    raw = np.asarray(bp.patches.values, dtype=np.float64)
    # the model is zero beyond r_ext (App. A-d): compare on the same support, or the average PSF
    # is favoured by the noise the bump removes
    return _normalised(raw * bump_multiplier(raw.shape[1:], bp.radius))


def _relative_errors(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    n = len(truth)
    norm = np.linalg.norm(truth.reshape(n, -1), axis=1)
    return np.linalg.norm((pred - truth).reshape(n, -1), axis=1) / norm


def _single_fold(bp, target, train, test, *, n_components, realism, eta):
    """Errors of one image's operator and of its average PSF on the beads ``test``."""
    from .coefficients import fit_tps
    from .cone import project_onto_cone, reduce_cone
    from .psf_basis import fit_psf_basis

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
    pred = _normalised(np.tensordot(pred_beta, h, axes=1))  # (m, [kz,] ky, kx)
    truth = target[test]
    mean_psf = target[train][kept].mean(axis=0)
    return _relative_errors(pred, truth), _relative_errors(np.broadcast_to(mean_psf, truth.shape), truth)


def cross_validate(image, *, folds: int = 5, n_components: int | None = None,
                   psf_radius: int | None = None, background: str | None = None,
                   realism: bool = True, eta: float | None = None, seed: int = 0,
                   pixel_size: str | None = None, _patches=None) -> xr.Dataset:
    """Per-bead relative prediction error of held-out beads, space-varying vs invariant.

    Parameters
    ----------
    image : path, array or DataArray (y, x), or a z-stack (z, y, x) of beads in a gel
    folds : int
        k; beads are split at random (``seed``) into k folds.
    n_components, psf_radius, background, realism, eta :
        As in :func:`pcmx.learn.learn_operator` (fixed across folds); for a z-stack
        ``psf_radius`` may be ``(r_z, r_y, r_x)`` (see :func:`pcmx.learn.bead_patches`).

    Returns
    -------
    Dataset
        ``cv_error (bead)`` relative l2 error of the space-varying prediction of each held-out
        (normalised) bead patch, ``cv_error_invariant (bead)`` the same for the average PSF,
        ``cv_bead_y``, ``cv_bead_x`` (and ``cv_bead_z`` for a z-stack); attrs with the medians
        and their ratio.

    Notes
    -----
    2D images and z-stacks take the same steps, in three dimensions for stacks: 3D patches
    ``(bead, kz, ky, kx)``, the PCA basis, the cone and the 3D thin-plate spline of the
    coefficients fitted on the training beads' ``(z, y, x)`` positions, evaluated at the
    held-out positions (the values the coefficient maps interpolate there; no map is built).

    Raises
    ------
    InputError
        Fewer than 2 folds or fewer than 2 beads per fold.
    """
    from .learn import bead_patches

    bp = _patches if _patches is not None else bead_patches(
        as_image(image, pixel_size=pixel_size), psf_radius=psf_radius, background=background)
    m = len(bp.positions)
    if folds < 2 or m < 2 * folds:
        raise InputError(f"folds={folds}: need at least 2 folds and 2 beads per fold ({m} beads)")
    fold_of = _folds(m, folds, seed)
    target = _targets(bp)
    err = np.full(m, np.nan)
    err_inv = np.full(m, np.nan)
    for f in range(folds):
        test = fold_of == f
        err[test], err_inv[test] = _single_fold(bp, target, ~test, test, n_components=n_components,
                                                realism=realism, eta=eta)
    med, med_inv = float(np.nanmedian(err)), float(np.nanmedian(err_inv))
    ds = xr.Dataset(
        {"cv_error": ("bead", err.astype(np.float32)),
         "cv_error_invariant": ("bead", err_inv.astype(np.float32)),
         **{f"cv_bead_{d}": ("bead", bp.positions[:, k])
            for k, d in enumerate(("z", "y", "x")[-bp.positions.shape[1]:])}},
        attrs={"folds": int(folds), "median_error": med, "median_error_invariant": med_inv,
               "improvement": med_inv / med if med > 0 else float("inf"), "n_beads": int(m)},
    )
    return ds


def _family_inputs(images) -> tuple[list, list[str]]:
    """The K images of a family and their labels (as :func:`pcmx.family.learn_family` takes them)."""
    if isinstance(images, xr.DataArray) and "state" in images.dims:
        labels = ([str(v) for v in images["state"].values] if "state" in images.coords
                  else [f"state{k}" for k in range(images.sizes["state"])])
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


def _gram(maps: list[np.ndarray], block: int = 1 << 16) -> np.ndarray:
    """``A A^T`` in float64 of the rows of all maps (each ``(I, *shape)``), by pixel blocks."""
    rows = [m.reshape(m.shape[0], -1) for m in maps]
    n = sum(len(r) for r in rows)
    p = rows[0].shape[1]
    gram = np.zeros((n, n))
    for start in range(0, p, block):
        a = np.concatenate([r[:, start:start + block] for r in rows]).astype(np.float64)
        gram += a @ a.T
    return gram


def _sample(maps: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bi/trilinear values of maps ``(n, [nz,] ny, nx)`` at sub-pixel points ``(m, 2 or 3)``: ``(n, m)``."""
    from scipy.ndimage import map_coordinates

    return np.stack([map_coordinates(mp, points.T, order=1, mode="nearest") for mp in maps])


def cross_validate_family(images, *, folds: int = 5, n_components: int | None = None,
                          n_modes: int | None = None, psf_radius: int | None = None,
                          background: str | None = None, realism: bool | str = "nonnegative",
                          eta: float | None = None, seed: int = 0,
                          pixel_size: str | None = None, mode_rule: str = "capped") -> xr.Dataset:
    """Held-out bead errors of a family, of each image's own operator and of the average PSF.

    The beads of every image are split into ``folds`` folds (the split of image k is the one
    :func:`cross_validate` makes with the same ``seed``). For fold f, the beads of fold f of
    *every* image are left out of everything: the one PCA over all images' patches (the shared
    PSF basis h_i, z-score rejection included), the cone of observed coefficients, each image's
    coefficient maps alpha_{i,k} and so the SVD to the spatial modes a_j and the gammas
    (paper II-D-b, steps 2-8). Each held-out bead of image k is then predicted at its position
    by the family, ``sum_ij gamma_k[i, j] a_j(z) h_i``, by image k's single operator learned
    from its training beads alone (as in :func:`cross_validate`), and by the average
    normalised PSF of those beads (the space-invariant model).

    Parameters
    ----------
    images : sequence of paths/arrays/DataArrays (y, x), or a DataArray with a ``state`` dim
        K >= 2 bead images on one grid (e.g. planes of a z-stack around focus).
    folds : int
        k; at least 2, and every image needs at least 2 beads per fold.
    n_components : int, optional
        I of the family (and of each single operator); the 2.858 * median rule per fold when
        None (II-E-c).
    n_modes : int, optional
        J; per fold from the maps' singular values by ``mode_rule`` (as in
        :func:`pcmx.family.learn_family`) when None.
    psf_radius : int, optional
        r, shared by all images; when None, from the pooled bead profiles of up to
        ``pcmx.family.RADIUS_IMAGES`` images, as :func:`pcmx.family.learn_family` does.
    realism : {"nonnegative", "cone", False}
        The family's realism projection, as in :func:`pcmx.family.learn_family`; each single
        operator projects onto its cone unless False.
    background, eta :
        As in :func:`pcmx.learn.learn_operator`; fixed across folds and images.
    seed : int
        Seed of the split into folds.
    pixel_size : str, optional
        For images whose metadata lacks it.

    Returns
    -------
    Dataset
        Per held-out bead (dim ``bead``, all images' beads one after the other):
        ``cv_error_family``, ``cv_error_single``, ``cv_error_invariant`` (relative l2 errors of
        the sum-one predictions against the sum-one observed patch on the model's support),
        ``cv_bead_y``, ``cv_bead_x``, ``cv_bead_state`` (the image's index).
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
    matrix, accumulated over pixel blocks. The maps of one fold are held in memory (float32,
    ``K I ny nx`` values): cross-validate on a subset of images or a crop for very large data.
    """
    from .coefficients import coefficient_maps
    from .family import (
        _cone_generators,
        _nonnegative_projector,
        _pooled_radius,
        _radius_picks,
        _radius_task,
        _realism_mode,
        choose_modes,
    )
    from .learn import bead_patches
    from .psf_basis import fit_psf_basis

    mode = _realism_mode(realism)

    images, labels = _family_inputs(images)
    if len(images) < 2:
        raise InputError(f"images: a family needs at least 2 images, got {len(images)}")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise InputError(f"folds={folds!r}: need an integer of at least 2")
    imgs = [as_image(im, pixel_size=pixel_size) for im in images]
    shape = imgs[0].shape
    for lab, im in zip(labels, imgs, strict=True):
        if im.shape != shape:
            raise InputError(f"{lab}: shape {im.shape} differs from {shape} of {labels[0]}")
    bps, r = [], psf_radius
    if r is None:
        r, _ = _pooled_radius([_radius_task(imgs[k], None) for k in _radius_picks(len(imgs))])
    for lab, im in zip(labels, imgs, strict=True):
        try:
            bp = bead_patches(im, psf_radius=r, background=background)
        except InputError as exc:
            raise InputError(f"{lab}: {exc}") from None
        r = bp.radius
        bps.append(bp)
    for lab, bp in zip(labels, bps, strict=True):
        if len(bp.positions) < 2 * folds:
            raise InputError(f"{lab}: folds={folds} needs at least 2 beads per fold, "
                             f"{len(bp.positions)} beads")
    k_count = len(bps)
    fold_of = [_folds(len(bp.positions), folds, seed) for bp in bps]
    targets = [_targets(bp) for bp in bps]
    errs = {name: [np.full(len(bp.positions), np.nan) for bp in bps]
            for name in ("family", "single", "invariant")}
    used_i, used_j = [], []
    for f in range(folds):
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
        generators = _cone_generators(beta, h) if mode == "cone" else None
        project = _nonnegative_projector(h) if mode == "nonnegative" else None
        maps = []
        for k in range(k_count):
            sel = owner == k
            if sel.sum() < 4:
                raise InputError(f"{labels[k]}: only {int(sel.sum())} training beads in fold {f}; "
                                 "at least 4 are needed for its coefficient maps")
            maps.append(coefficient_maps(positions[sel], beta[sel], shape, eta=eta,
                                         generators=generators, project=project))
        evals, evecs = np.linalg.eigh(_gram(maps))
        order = np.argsort(evals)[::-1]
        sv = np.sqrt(np.clip(evals[order], 0, None))
        evecs = evecs[:, order]
        j = n_modes or min(choose_modes(sv, mode_rule), k_count * n_i)
        if j > k_count * n_i:
            raise InputError(f"n_modes={n_modes} exceeds K*I = {k_count * n_i}")
        proj = evecs[:, :j] @ evecs[:, :j].T  # U_J U_J^T
        used_i.append(int(n_i))
        used_j.append(int(j))
        for k, (bp, fo) in enumerate(zip(bps, fold_of, strict=True)):
            test = fo == f
            pts = bp.positions[test]
            values = np.concatenate([_sample(mp, pts) for mp in maps]).astype(np.float64)
            pred_beta = (proj[k * n_i:(k + 1) * n_i] @ values).T
            pred = _normalised(np.einsum("mi,ijk->mjk", pred_beta, h.astype(np.float64)))
            truth = targets[k][test]
            errs["family"][k][test] = _relative_errors(pred, truth)
            errs["single"][k][test], errs["invariant"][k][test] = _single_fold(
                bp, targets[k], ~test, test, n_components=n_components, realism=mode is not False,
                eta=eta)
    bead_state = np.concatenate([np.full(len(bp.positions), k) for k, bp in enumerate(bps)])
    flat = {name: np.concatenate(v) for name, v in errs.items()}
    data = {f"cv_error_{name}": ("bead", v.astype(np.float32)) for name, v in flat.items()}
    data.update({
        "cv_bead_y": ("bead", np.concatenate([bp.positions[:, 0] for bp in bps])),
        "cv_bead_x": ("bead", np.concatenate([bp.positions[:, 1] for bp in bps])),
        "cv_bead_state": ("bead", bead_state),
        "n_beads": ("state", np.array([len(bp.positions) for bp in bps])),
    })
    for name, v in errs.items():
        data[f"median_error_{name}"] = ("state", np.array([np.nanmedian(e) for e in v]))
    attrs = {"folds": int(folds), "psf_radius": int(r), "n_components": used_i, "n_modes": used_j,
             **{f"median_error_{name}": float(np.nanmedian(v)) for name, v in flat.items()}}
    return xr.Dataset(data, coords={"state": labels}, attrs=attrs)
