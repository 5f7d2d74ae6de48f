"""Learn one space-varying operator from a bead image (paper II-C, Appendices A, B, C).

The steps, each owned by one module::

    pcmx.patches.bead_patches   detect, isolate, centre, extract, background  (App. A a-c, App. B)
    pcmx.fit.fit_operator       PSF basis, realism, coefficient maps           (App. A d-f, App. C)

:func:`learn_operator` reads the image once, runs both, records provenance and, by default,
cross-validates the very same fit on the same beads (:func:`pcmx.cross_validation.cross_validate`)
together with one alternative to each automatic choice (fewer components, more smoothing, the
non-negativity projection instead of the cone) and the space-invariant model, on the same folds,
and stores the simplest candidate within one standard error of the best (model selection by
held-out error, ``select=``; a warning where that is the space-invariant model). 2D images ``(y, x)`` and z-stacks ``(z, y, x)`` of beads in a gel go
through the same steps, in three dimensions for z-stacks.
"""

from __future__ import annotations

import os
import time
import warnings
from functools import partial

import numpy as np
import xarray as xr

from .cross_validation import (
    cross_validate,
    heldout_summary,
    invariant_reference,
    model_candidates,
    select_model,
)
from .errors import InputError
from .fit import fit_basis, fit_operator, realism_policy, used_bead_mask
from .io.readers import PcmxWarning, as_image
from .neighbours import neighbour_passes, refit_without_neighbours
from .patches import bead_patches, source_name
from .provenance import provenance
from .units import parse_length, spatial_coords

__all__ = ["learn_operator", "invariant_operator", "SELECT"]

#: ``select=`` choices of :func:`learn_operator`.
SELECT = ("auto", "space-varying")


def invariant_operator(model: xr.Dataset, psf: np.ndarray) -> xr.Dataset:
    """The space-invariant operator with PSF ``psf`` (sum one) on the grid of ``model``: one
    component ``h = psf / ||psf||`` and a constant coefficient map ``||psf||``; the model's
    bead and detection diagnostics are kept."""
    norm = float(np.linalg.norm(psf))
    kdims = model["psf_basis"].dims[1:]
    sdims = model["coefficients"].dims[1:]
    ds = model.drop_vars([v for v in ("psf_basis", "coefficients", "observed_coefficients",
                                      "cone_generators", "component") if v in model.variables])
    shape = tuple(model.sizes[d] for d in sdims)
    ds["psf_basis"] = (("component", *kdims), (psf / norm)[None].astype(np.float32))
    ds["coefficients"] = (("component", *sdims), np.full((1, *shape), norm, dtype=np.float32))
    ds = ds.assign_coords(component=[0])
    ds.attrs = dict(model.attrs)
    return ds


def learn_operator(image, *, n_components: int | None = None, psf_radius=None,
                   pixel_size: str | None = None, z_step: str | None = None,
                   threshold: float | None = None, background: str | None = None,
                   eta: float | None = None, realism="auto",
                   angle_threshold_deg: float = 1.0, validate: bool | str = "auto", folds: int = 5,
                   seed: int = 0, select: str = "auto",
                   neighbours: int | str = "auto") -> xr.Dataset:
    """Learn the space-varying operator of a microscope from one bead image (paper II-C).

    Parameters
    ----------
    image : path, array or DataArray (y, x) or (z, y, x)
        A 2D image of isolated micro-beads, or a z-stack of beads in a gel (TIFF, Zarr,
        NumPy, xarray).
    n_components : int, optional
        I, the size of the PSF basis; when None, Gavish & Donoho's optimal hard threshold for
        the patches' estimated noise (the "noise" rank rule of :mod:`pcmx.psf_basis`, II-E-c).
    psf_radius : int or sequence, optional
        r in pixels; estimated from the data when None (the chosen r is stored). See
        :func:`pcmx.patches.bead_patches` for z-stacks.
    pixel_size : str, optional
        e.g. ``"65nm"`` when the file's metadata lacks it (every axis, unless ``z_step``).
    z_step : str, optional
        Distance between the planes of a z-stack, e.g. ``"200nm"``, when the metadata lacks it.
    threshold, background :
        See :func:`pcmx.patches.bead_patches`.
    eta : float, optional
        Thin-plate smoothing weight; generalized cross-validation when None (App. C-a).
    realism : {"auto", "cone", "nonnegative", "none"}, bool or :class:`pcmx.fit.Realism`
        How predicted PSFs are kept realistic (App. C-b, C-c); False or "none" for no
        projection. "auto" (default): the cone, checked by the model selection against no
        projection; a given policy is kept.
    angle_threshold_deg : float
        Greedy cone reduction threshold (realism "cone").
    validate : "auto" or bool
        Cross-validate (:func:`pcmx.cross_validation.cross_validate`) the same fit on the same
        beads, ``folds`` folds split at random by ``seed``, against the space-invariant
        reference, and store the per-bead errors. "auto" (default): when there are at least
        ``2 * folds`` beads with a clean PSF (else a :class:`~pcmx.io.readers.PcmxWarning`
        says the model is unchecked); True: always (an error with too few beads); False: never.
    select : {"auto", "space-varying"}
        Model selection by held-out error. "auto": the automatic choices (I when
        ``n_components`` is None, eta when None, the realism when "auto") are each checked
        against one alternative (:func:`pcmx.cross_validation.model_candidates`: half the
        components, 4x the GCV smoothing, no projection) and the space-invariant model (one
        component, the reference's PSF everywhere, :func:`invariant_operator`), all on the
        same folds; the simplest candidate within one standard error of the best is stored
        (:func:`pcmx.cross_validation.select_model`), refitted on all beads. "space-varying":
        the automatic fit is stored whatever the validation says. A
        :class:`~pcmx.io.readers.PcmxWarning` says so whenever the stored model is the
        space-invariant one or predicts the held-out beads worse than it;
        ``pcmx_parameters["model_selection"]`` records every candidate's median held-out
        error, its paired difference to the best and its standard error, and the choice
        (``cv_error_candidates`` in the store: per bead).
    neighbours : "auto" or int
        Passes that subtract every other detected bead's light, predicted by the model fitted
        so far, from each bead's patch and refit (:func:`pcmx.neighbours.refit_without_neighbours`);
        ``"auto"``: one for z-stacks, none for 2D images; 0: off. With ``validate``, the folds
        are fitted on the same cleaned patches as the stored model (their neighbours'
        light predicted by the model fitted on all beads).

    Returns
    -------
    Dataset
        An operator (``psf_basis (component, [kz,] ky, kx)``, ``coefficients (component,
        [z,] y, x)``) with diagnostics: ``bead_[z,] y, x``, ``observed_coefficients (bead,
        component)``, ``cone_generators``, ``singular_values``, and attrs ``pcmx_parameters``
        (the chosen r, I and its rule, eta, per-step counts and timings).
    """
    source = source_name(image)
    t_start = time.perf_counter()
    check_realism = isinstance(realism, str) and realism.lower() == "auto"
    policy = realism_policy("cone" if check_realism else realism, angle_threshold_deg=angle_threshold_deg)
    if select not in SELECT:
        raise InputError(f"select={select!r}: expected one of {', '.join(map(repr, SELECT))}")
    if not (validate == "auto" or isinstance(validate, bool)):
        raise InputError(f"validate={validate!r}: expected 'auto', True or False")
    img = as_image(image, pixel_size=pixel_size)
    if z_step is not None:
        if img.ndim != 3:
            raise InputError(f"z_step={z_step!r}: {source} is a 2D image, not a z-stack")
        dz = parse_length(z_step, name="z_step")
        img = img.assign_coords(spatial_coords(img.shape[:1], dz, dims=("z",)))
    bp = bead_patches(img, psf_radius=psf_radius, threshold=threshold, background=background)
    fit_options = {"n_components": n_components, "eta": eta, "realism": policy}
    try:
        # the PSF basis of all beads, kept for a candidate of the same I that model selection
        # may refit (its spline or projection differ, not its PCA)
        basis = fit_basis(bp.usable_beads(), n_components)
        ds = fit_operator(bp, image=img, basis=basis, **fit_options)
        n_passes = neighbour_passes(neighbours, img.ndim)
        record = []
        if n_passes:
            # the stored model is fitted on the cleaned patches: so is every fold below
            ds, bp, record = refit_without_neighbours(bp, img, partial(fit_operator, image=img, **fit_options),
                                                      passes=n_passes, threshold=threshold, first=ds)
            basis = None  # of the uncleaned patches
    except InputError as err:
        raise InputError(f"{source}: {err}") from None
    if validate == "auto":
        validate = int(bp.usable.sum()) >= 2 * folds
        if not validate:
            warnings.warn(f"{source}: only {int(bp.usable.sum())} beads with a clean PSF: too few to "
                          f"cross-validate ({2 * folds} needed for {folds} folds); the model is not "
                          "checked against the space-invariant reference", PcmxWarning, stacklevel=2)
    selection = None
    if validate:
        specs = model_candidates(n_components=n_components, eta=eta, realism=policy,
                                 n_chosen=int(ds.sizes["component"]), check_realism=check_realism)
        if select != "auto":
            specs = specs[:1]
        t0 = time.perf_counter()
        cv = cross_validate(bp, folds=folds, seed=seed, candidates=specs, grid=img)
        ds, cv, selection = _select(ds, cv, bp, img, specs, select, source, seed, basis)
        selection["seconds"] = round(time.perf_counter() - t0, 4)
    params = ds.attrs["pcmx_parameters"]
    params["neighbours"] = {"requested": neighbours, "passes": record}
    params.update({"psf_radius_requested": psf_radius, "threshold": threshold,
                   "background": background or "default", "realism_requested": str(realism)})
    if validate:
        params["model_selection"] = selection
        params["cross_validation"] = dict(cv.attrs)
        ds = ds.merge(cv.rename({"bead": "cv_bead"}))
    params["timings_s"]["total"] = round(time.perf_counter() - t_start, 4)
    inputs = [source] if isinstance(image, (str, os.PathLike)) else []
    attrs = {"pcmx_type": "operator", **provenance(params, inputs)}
    ds.attrs = attrs
    return ds


def _select(ds: xr.Dataset, cv: xr.Dataset, bp, img, specs: list[dict], select: str, source: str,
            seed: int, basis=None) -> tuple[xr.Dataset, xr.Dataset, dict]:
    """Model selection by held-out error (:func:`pcmx.cross_validation.select_model`): the
    stored model (``ds``: the automatic fit; a candidate refitted on all beads, or the
    space-invariant model), ``cv`` with ``cv_error`` and its figures those of the stored
    model, and the record."""
    names = [c["name"] for c in specs]
    if "cv_error_candidates" in cv:
        errors = {str(n): cv["cv_error_candidates"].sel(candidate=n).values for n in cv["candidate"].values}
    else:
        errors = {"automatic": cv["cv_error"].values, "space-invariant": cv["cv_error_invariant"].values}
    rec = select_model(errors, seed=seed)
    chosen = rec["chosen"] if select == "auto" else "automatic"
    record = {"select": select, **rec, "chosen": chosen,
              "candidates": {c["name"]: {"n_components": c["n_components"], "eta_scale": c["eta_scale"],
                                         "realism": c["realism"].kind} for c in specs}}
    params = ds.attrs["pcmx_parameters"]
    if chosen == "space-invariant":
        # the reference of all the beads the model used: the flux-weighted mean of their patches
        # (stored in the image's units: matched to bp's pixel positions by used_bead_mask)
        psf = invariant_reference(bp.subset(used_bead_mask(bp, ds)))
        out = invariant_operator(ds, psf)
        out.attrs["pcmx_parameters"] = {**params, "n_components": 1,
                                        "n_components_rule": "model selection: space-invariant"}
    elif chosen != "automatic":
        spec = specs[names.index(chosen)]
        same_i = basis is not None and spec["n_components"] == specs[0]["n_components"]
        try:
            out = fit_operator(bp, image=img, n_components=spec["n_components"], eta=spec["eta"],
                               realism=spec["realism"], eta_scale=spec["eta_scale"],
                               basis=basis if same_i else None)
        except InputError as err:
            raise InputError(f"{source}: {err}") from None
        out.attrs["pcmx_parameters"]["n_components_rule"] = (
            f"model selection: {chosen} (rank rule: {params['n_components']})"
            if chosen == "fewer components" else out.attrs["pcmx_parameters"]["n_components_rule"])
    else:
        out = ds
    err = np.asarray(errors[chosen], dtype=np.float64)
    cv = cv.assign(cv_error=("bead", err.astype(np.float32)))
    cv.attrs.update(heldout_summary(err, cv["cv_error_invariant"].values.astype(np.float64),
                                    cv["cv_flux"].values.astype(np.float64)))
    cv.attrs["model"] = chosen
    med, med_inv = record["median_error"][chosen], record["median_error"]["space-invariant"]
    auto = record["median_error"]["automatic"]
    if chosen == "space-invariant":
        warnings.warn(f"{source}: cross-validation finds the space-varying model no better than the "
                      f"space-invariant reference (median held-out error {auto:.3f} vs {med_inv:.3f}, "
                      f"within one standard error {record['standard_error']['automatic']:.3f} or worse): "
                      "stored the space-invariant model (select='auto')", PcmxWarning, stacklevel=3)
    elif med > med_inv:
        warnings.warn(f"{source}: cross-validation finds the stored space-varying model worse than the "
                      f"space-invariant reference (median held-out error {med:.3f} vs {med_inv:.3f}); "
                      f"stored it all the same (select={select!r})", PcmxWarning, stacklevel=3)
    return out, cv, record
