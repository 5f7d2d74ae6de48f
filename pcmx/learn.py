"""Learn one space-varying operator from a bead image (paper II-C, Appendices A, B, C).

The steps, each owned by one module::

    pcmx.patches.bead_patches   detect, isolate, centre, extract, background  (App. A a-c, App. B)
    pcmx.fit.fit_operator       PSF basis, realism, coefficient maps           (App. A d-f, App. C)

:func:`learn_operator` reads the image once, runs both, records provenance and, with
``validate=True``, cross-validates the very same fit on the same beads
(:func:`pcmx.cross_validation.cross_validate`). 2D images ``(y, x)`` and z-stacks
``(z, y, x)`` of beads in a gel go through the same steps, in three dimensions for z-stacks.
"""

from __future__ import annotations

import os
import time
from functools import partial

import xarray as xr

from .cross_validation import cross_validate
from .errors import InputError
from .fit import fit_operator, realism_policy
from .io.readers import as_image
from .neighbours import neighbour_passes, refit_without_neighbours
from .patches import bead_patches, source_name
from .provenance import provenance
from .units import parse_length, spatial_coords

__all__ = ["learn_operator"]


def learn_operator(image, *, n_components: int | None = None, psf_radius=None,
                   pixel_size: str | None = None, z_step: str | None = None,
                   threshold: float | None = None, background: str | None = None,
                   eta: float | None = None, realism="cone",
                   angle_threshold_deg: float = 1.0, validate: bool = False, folds: int = 5,
                   seed: int = 0, neighbours: int | str = "auto") -> xr.Dataset:
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
    validate : bool
        Also cross-validate (:func:`pcmx.cross_validation.cross_validate`) the same fit on the
        same beads, ``folds`` folds split at random by ``seed``, and store its per-bead errors.
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
    if validate:
        cv = cross_validate(bp, folds=folds, seed=seed, **fit_options)
        ds = ds.merge(cv.rename({"bead": "cv_bead"}))
        ds.attrs["pcmx_parameters"]["cross_validation"] = dict(cv.attrs)
    return ds
