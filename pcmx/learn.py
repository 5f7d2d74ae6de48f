"""Learn one space-varying operator from a bead image (paper II-C, Appendices A, B, C).

The steps, each owned by one module::

    pcmx.patches.bead_patches   detect, isolate, centre, extract, background  (App. A a-c, App. B)
    pcmx.fit.fit_operator       PSF basis, realism, coefficient maps           (App. A d-f, App. C)

:func:`learn_operator` reads the image once, runs both, records provenance and, by default,
cross-validates the very same fit on the same beads (:func:`pcmx.cross_validation.cross_validate`)
against the space-invariant reference: where the held-out beads say the reference predicts
better, it stores the space-invariant model instead and warns (model selection by held-out
error, ``select=``). 2D images ``(y, x)`` and z-stacks ``(z, y, x)`` of beads in a gel go
through the same steps, in three dimensions for z-stacks.
"""

from __future__ import annotations

import os
import time
import warnings
from functools import partial

import numpy as np
import xarray as xr

from .cross_validation import cross_validate, invariant_reference
from .errors import InputError
from .fit import fit_operator, realism_policy
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
                   eta: float | None = None, realism="cone",
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
    realism : {"cone", "nonnegative", "none"}, bool or :class:`pcmx.fit.Realism`
        How predicted PSFs are kept realistic (App. C-b, C-c); "cone" (True) by default,
        False or "none" for no projection.
    angle_threshold_deg : float
        Greedy cone reduction threshold (realism "cone").
    validate : "auto" or bool
        Cross-validate (:func:`pcmx.cross_validation.cross_validate`) the same fit on the same
        beads, ``folds`` folds split at random by ``seed``, against the space-invariant
        reference, and store the per-bead errors. "auto" (default): when there are at least
        ``2 * folds`` beads with a clean PSF (else a :class:`~pcmx.io.readers.PcmxWarning`
        says the model is unchecked); True: always (an error with too few beads); False: never.
    select : {"auto", "space-varying"}
        What to store when the validation finds the space-varying model worse than the
        space-invariant reference (a larger median held-out error): "auto" stores the
        space-invariant model (one component, the reference's PSF everywhere,
        :func:`invariant_operator`), "space-varying" keeps the model; a
        :class:`~pcmx.io.readers.PcmxWarning` says so either way, and
        ``pcmx_parameters["model_selection"]`` records both errors and the choice.
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
    policy = realism_policy(realism, angle_threshold_deg=angle_threshold_deg)
    img = as_image(image, pixel_size=pixel_size)
    if z_step is not None:
        if img.ndim != 3:
            raise InputError(f"z_step={z_step!r}: {source} is a 2D image, not a z-stack")
        dz = parse_length(z_step, name="z_step")
        img = img.assign_coords(spatial_coords(img.shape[:1], dz, dims=("z",)))
    bp = bead_patches(img, psf_radius=psf_radius, threshold=threshold, background=background)
    fit_options = {"n_components": n_components, "eta": eta, "realism": policy}
    try:
        ds = fit_operator(bp, image=img, **fit_options)
        n_passes = neighbour_passes(neighbours, img.ndim)
        record = []
        if n_passes:
            # the stored model is fitted on the cleaned patches: so is every fold below
            ds, bp, record = refit_without_neighbours(bp, img, partial(fit_operator, image=img, **fit_options),
                                                      passes=n_passes, threshold=threshold, first=ds)
    except InputError as err:
        raise InputError(f"{source}: {err}") from None
    params = ds.attrs["pcmx_parameters"]
    params["neighbours"] = {"requested": neighbours, "passes": record}
    params.update({"psf_radius_requested": psf_radius, "threshold": threshold,
                   "background": background or "default"})
    params["timings_s"]["total"] = round(time.perf_counter() - t_start, 4)
    inputs = [source] if isinstance(image, (str, os.PathLike)) else []
    ds.attrs = {"pcmx_type": "operator", **provenance(params, inputs)}
    if select not in SELECT:
        raise InputError(f"select={select!r}: expected one of {', '.join(map(repr, SELECT))}")
    if validate == "auto":
        validate = int(bp.usable.sum()) >= 2 * folds
        if not validate:
            warnings.warn(f"{source}: only {int(bp.usable.sum())} beads with a clean PSF: too few to "
                          f"cross-validate ({2 * folds} needed for {folds} folds); the model is not "
                          "checked against the space-invariant reference", PcmxWarning, stacklevel=2)
    elif not isinstance(validate, bool):
        raise InputError(f"validate={validate!r}: expected 'auto', True or False")
    if validate:
        cv = cross_validate(bp, folds=folds, seed=seed, **fit_options)
        ds = _select(ds, cv, bp, select, source)
        ds = ds.merge(cv.rename({"bead": "cv_bead"}))
        ds.attrs["pcmx_parameters"]["cross_validation"] = dict(cv.attrs)
    return ds


def _select(ds: xr.Dataset, cv: xr.Dataset, bp, select: str, source: str) -> xr.Dataset:
    """Model selection by held-out error: the space-varying model, or the space-invariant one."""
    med, med_inv = cv.attrs["median_error"], cv.attrs["median_error_invariant"]
    worse = med > med_inv
    record = {"median_error": med, "median_error_invariant": med_inv,
              "ratio": med_inv / med if med > 0 else float("inf"),
              "chosen": "space-invariant" if worse and select == "auto" else "space-varying",
              "select": select}
    params = ds.attrs["pcmx_parameters"]
    params["model_selection"] = record
    if not worse:
        return ds
    if select == "auto":
        # the reference of all the beads the model used: the flux-weighted mean of their patches
        dims = ("z", "y", "x")[-bp.positions.shape[1]:]
        used = np.stack([ds[f"bead_{d}"].values for d in dims], axis=1)
        key = {tuple(p) for p in used.tolist()}
        mask = np.array([tuple(p) in key for p in bp.positions.tolist()], dtype=bool)
        psf = invariant_reference(bp.subset(mask))
        out = invariant_operator(ds, psf)
        out.attrs["pcmx_parameters"] = {**params, "n_components": 1,
                                        "n_components_rule": "model selection: space-invariant"}
        warnings.warn(f"{source}: cross-validation finds the space-varying model worse than the "
                      f"space-invariant reference (median held-out error {med:.3f} vs {med_inv:.3f}): "
                      "stored the space-invariant model (select='auto')", PcmxWarning, stacklevel=3)
        return out
    warnings.warn(f"{source}: cross-validation finds the space-varying model worse than the "
                  f"space-invariant reference (median held-out error {med:.3f} vs {med_inv:.3f}); "
                  "stored it all the same (select='space-varying')", PcmxWarning, stacklevel=3)
    return ds
