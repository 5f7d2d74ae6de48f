"""Learn one space-varying operator from a bead image (paper II-C, Appendices A, B, C).

The pipeline, each step owned by its module and callable on its own::

    detect_beads -> estimate_psf_radius -> reject_beads -> center_beads -> extract_patches
      (pcmx.beads, App. A a-c)
    -> subtract_background (pcmx.background, App. B)
    -> fit_psf_basis: bump, normalisation, PCA, z-score rejection, PCA (pcmx.psf_basis, App. A d-f)
    -> reduce_cone (pcmx.cone, App. C-b/c) -> coefficient_maps: weighted TPS + cone (pcmx.coefficients, App. C-a)

:func:`bead_patches` runs the bead steps (shared with families and cross-validation);
:func:`learn_operator` runs everything and returns an operator Dataset with diagnostics.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from .errors import InputError
from .io.readers import as_image
from .provenance import provenance
from .units import kernel_coords, pixel_size

__all__ = ["BeadPatches", "bead_patches", "learn_operator"]


@dataclass
class BeadPatches:
    """The isolated, centred, background-free bead patches of one image, with diagnostics."""

    patches: xr.DataArray  # (bead, ky, kx) with bead_y, bead_x coords
    positions: np.ndarray  # (M, 2) sub-pixel (y, x)
    radius: int
    shape: tuple
    counts: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def _source_name(image) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, xr.DataArray):
        return str(image.attrs.get("source", image.name or "image"))
    return "image"


def _checked_data(img: xr.DataArray, source: str) -> np.ndarray:
    data = np.asarray(img.values)
    if data.ndim != 2:
        raise InputError(
            f"{source}: learning from a {data.ndim}D image is not implemented yet; pass one 2D plane "
            "(e.g. the focal plane of a z-stack)"
        )
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise InputError(f"{source}: image contains NaN or infinite values")
    if min(data.shape) < 16:
        raise InputError(f"{source}: image of shape {data.shape} is too small to hold beads")
    if float(data.max()) == float(data.min()):
        raise InputError(f"{source}: image is constant ({float(data.min())}); no beads to learn from")
    return data


def bead_patches(image, *, psf_radius: int | None = None, threshold: float | None = None,
                 background: str | None = None, saturation: float | None = None,
                 pixel_size_: str | None = None) -> BeadPatches:
    """Detect, isolate, centre and extract background-free bead patches (App. A a-c, App. B).

    Parameters
    ----------
    image : path, array or DataArray (y, x)
    psf_radius : int, optional
        r, the PSF radius bound in pixels; estimated from the data when None.
    threshold : float, optional
        Detection threshold on the Laplacian-of-Gaussian response; automatic when None.
    background : {"global", "local"}, optional
        Background estimator (:mod:`pcmx.background`); its default when None.
    saturation : float, optional
        Saturation level; the dtype's maximum for integer images when None.

    Raises
    ------
    InputError
        No beads, all beads rejected (counts by reason), NaNs, constant or tiny image.
    """
    from . import background as bg
    from . import beads

    source = _source_name(image)
    img = as_image(image, pixel_size=pixel_size_)
    data = _checked_data(img, source)
    # saturation=None lets pcmx.beads find the clipping plateau (a 12-bit camera saves 4095 in uint16)
    work = data.astype(np.float32, copy=False)
    t = {}
    t0 = time.perf_counter()
    positions, dinfo = beads.detect_beads(work, threshold=threshold)
    t["detect"] = time.perf_counter() - t0
    if len(positions) == 0:
        raise InputError(f"{source}: no beads detected (threshold {dinfo.get('threshold', '?'):.3g})")
    t0 = time.perf_counter()
    r = int(psf_radius) if psf_radius is not None else int(beads.estimate_psf_radius(work, positions))
    if r < 1:
        raise InputError(f"psf_radius={psf_radius!r} must be a positive number of pixels")
    keep, reasons = beads.reject_beads(positions, work.shape, r, image=data, saturation=saturation)
    t["reject"] = time.perf_counter() - t0
    counts = {"detected": int(len(positions)), **{f"rejected_{k}": int(v) for k, v in reasons.items()}}
    if not np.any(keep):
        why = ", ".join(f"{k} {v}" for k, v in reasons.items())
        raise InputError(f"{source}: all {len(positions)} detected beads were rejected ({why}); "
                         f"psf_radius r={r} px")
    t0 = time.perf_counter()
    pos = beads.center_beads(work, positions[keep], r)
    patches = beads.extract_patches(work, pos, r)
    t["centre"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    kw = {} if background is None else {"method": background}
    # mask every detection (not only the kept beads) when estimating the smooth background
    patches = bg.subtract_background(patches, r, image=work, positions=pos, mask_positions=positions, **kw)
    t["background"] = time.perf_counter() - t0
    counts["isolated"] = int(len(pos))
    return BeadPatches(patches=patches, positions=np.asarray(pos, dtype=np.float64), radius=r,
                       shape=tuple(work.shape), counts=counts, timings=t)


def learn_operator(image, *, n_components: int | None = None, psf_radius: int | None = None,
                   pixel_size: str | None = None, threshold: float | None = None,
                   background: str | None = None, eta: float | None = None, realism: bool = True,
                   angle_threshold_deg: float = 1.0, validate: bool = False, folds: int = 5,
                   seed: int = 0) -> xr.Dataset:
    """Learn the space-varying operator of a microscope from one bead image (paper II-C).

    Parameters
    ----------
    image : path, array or DataArray (y, x)
        A 2D image of isolated micro-beads (TIFF, Zarr, NumPy, xarray).
    n_components : int, optional
        I, the size of the PSF basis; the 2.858 * median singular value rule when None (II-E-c).
    psf_radius : int, optional
        r in pixels; estimated from the data when None (the chosen r is stored).
    pixel_size : str, optional
        e.g. ``"65nm"`` when the file's metadata lacks it.
    threshold, background :
        See :func:`bead_patches`.
    eta : float, optional
        Thin-plate smoothing weight; generalized cross-validation when None (App. C-a).
    realism : bool
        Project the coefficient maps onto the cone of observed coefficients (App. C-b, C-c).
    angle_threshold_deg : float
        Greedy cone reduction threshold.
    validate : bool
        Also run :func:`pcmx.cross_validation.cross_validate` and store its per-bead errors.

    Returns
    -------
    Dataset
        An operator (``psf_basis``, ``coefficients``) with diagnostics: ``bead_y``, ``bead_x``,
        ``observed_coefficients (bead, component)``, ``cone_generators``, ``singular_values``,
        and attrs ``pcmx_parameters`` (the chosen r, I, eta, per-step counts and timings).
    """
    from .coefficients import coefficient_maps
    from .cone import reduce_cone
    from .psf_basis import fit_psf_basis

    source = _source_name(image)
    t_start = time.perf_counter()
    img = as_image(image, pixel_size=pixel_size)
    bp = bead_patches(img, psf_radius=psf_radius, threshold=threshold, background=background)
    t = dict(bp.timings)
    t0 = time.perf_counter()
    basis = fit_psf_basis(bp.patches, n_components, r=bp.radius)
    t["psf_basis"] = time.perf_counter() - t0
    kept = np.asarray(basis["kept"].values, dtype=bool)
    h = np.asarray(basis["psf_basis"].values, dtype=np.float32)
    beta = np.asarray(basis["beta"].values, dtype=np.float64)
    points = bp.positions[kept]
    n_i = h.shape[0]
    min_beads = 4
    if len(points) < min_beads:
        raise InputError(f"{source}: only {len(points)} usable beads after rejection; at least "
                         f"{min_beads} are needed to interpolate the PSF over the field")
    t0 = time.perf_counter()
    generators = reduce_cone(beta, angle_threshold_deg=angle_threshold_deg, psf_basis=h) if realism else None
    t["cone"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    maps, tps, info = coefficient_maps(points, beta, bp.shape, eta=eta, generators=generators,
                                       return_spline=True)
    t["coefficients"] = time.perf_counter() - t0

    py, px = pixel_size_of(img)
    ksize = h.shape[1:]
    comp = np.arange(n_i)
    ds = xr.Dataset(
        {
            "psf_basis": (("component", "ky", "kx"), h),
            "coefficients": (("component", "y", "x"), maps.astype(np.float32, copy=False)),
            "bead_y": ("bead", points[:, 0]),
            "bead_x": ("bead", points[:, 1]),
            "observed_coefficients": (("bead", "component"), beta.astype(np.float32)),
            "singular_values": ("rank", np.asarray(basis["singular_values"].values, dtype=np.float64)),
        },
        coords={"component": comp, "y": img["y"], "x": img["x"],
                **kernel_coords(ksize, None if px is None else (py, px))},
    )
    ds["bead_y"].attrs["units"] = ds["bead_x"].attrs["units"] = "pixel"
    if generators is not None:
        ds["cone_generators"] = (("generator", "component"), np.asarray(generators, dtype=np.float32))
    t["total"] = time.perf_counter() - t_start
    eta_used = np.atleast_1d(np.asarray(tps.eta, dtype=float))
    params = {
        "n_components": int(n_i), "n_components_requested": n_components,
        "psf_radius": int(bp.radius), "psf_radius_requested": psf_radius,
        "eta": eta_used.tolist(), "eta_requested": eta, "threshold": threshold,
        "background": background or "default", "realism": realism,
        "angle_threshold_deg": angle_threshold_deg,
        "counts": {**bp.counts, "rejected_outlier": int((~kept).sum()), "used": int(kept.sum())},
        "lattice_step": int(info.get("step", 0)), "lattice_max_error": float(info.get("max_error", 0.0)),
        "timings_s": {k: round(v, 4) for k, v in t.items()},
    }
    inputs = [source] if isinstance(image, (str, os.PathLike)) else []
    ds.attrs = {"pcmx_type": "operator", **provenance(params, inputs)}
    if validate:
        from .cross_validation import cross_validate

        cv = cross_validate(img, folds=folds, n_components=n_i, psf_radius=bp.radius,
                            background=background, realism=realism, seed=seed, _patches=bp)
        ds = ds.merge(cv.rename({"bead": "cv_bead"}))
        ds.attrs["pcmx_parameters"]["cross_validation"] = dict(cv.attrs)
    return ds


def pixel_size_of(img: xr.DataArray) -> tuple:
    """(y, x) pixel sizes in micrometers of an image, None where unknown."""
    return pixel_size(img, "y"), pixel_size(img, "x")
