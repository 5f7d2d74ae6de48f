"""Learn one space-varying operator from a bead image (paper II-C, Appendices A, B, C).

The pipeline, each step owned by its module and callable on its own::

    detect_beads -> estimate_psf_radius -> reject_beads -> center_beads -> extract_patches
      (pcmx.beads, App. A a-c)
    -> subtract_background (pcmx.background, App. B)
    -> fit_psf_basis: bump, normalisation, PCA, z-score rejection, PCA (pcmx.psf_basis, App. A d-f)
    -> reduce_cone (pcmx.cone, App. C-b/c) -> coefficient_maps: weighted TPS + cone (pcmx.coefficients, App. C-a)

:func:`bead_patches` runs the bead steps (shared with families and cross-validation);
:func:`learn_from_patches` runs the later steps on given patches (e.g. noise-free true PSFs,
the model's own accuracy floor); :func:`learn_operator` runs everything and returns an operator
Dataset with diagnostics. 2D images ``(y, x)`` and z-stacks ``(z, y, x)`` of beads in a gel go
through the same steps, in three dimensions for z-stacks (radii per axis, 3D patches, 3D thin
plate splines on the ``(z, y, x)`` grid).
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
from .units import kernel_coords, parse_length, pixel_size, spatial_coords

__all__ = ["BeadPatches", "bead_patches", "learn_from_patches", "learn_operator", "CONE_FLOOR"]

#: Negative part allowed in the cone's generators, relative to their peak (App. C-b); the
#: predicted PSFs are then non-negative to within 1% of their peak (tests/test_learn_quality.py).
CONE_FLOOR = 0.005


@dataclass
class BeadPatches:
    """The isolated, centred, background-free bead patches of one image, with diagnostics."""

    patches: xr.DataArray  # (bead, [kz,] ky, kx) with bead_[z,] y, x coords
    positions: np.ndarray  # (M, ndim) sub-pixel ([z,] y, x)
    radius: int | tuple  # r in pixels; (r_z, r_y, r_x) for z-stacks
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
    if data.ndim not in (2, 3):
        raise InputError(f"{source}: expected a 2D (y, x) image or a 3D (z, y, x) z-stack, got "
                         f"{data.ndim} dimensions")
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise InputError(f"{source}: image contains NaN or infinite values")
    if min(data.shape[-2:]) < 16 or (data.ndim == 3 and data.shape[0] < 3):
        raise InputError(f"{source}: image of shape {data.shape} is too small to hold beads")
    if float(data.max()) == float(data.min()):
        raise InputError(f"{source}: image is constant ({float(data.min())}); no beads to learn from")
    return data


def _radius(psf_radius, work: np.ndarray, positions: np.ndarray):
    """r in pixels: given or estimated (App. A-b); (r_z, r_y, r_x) for z-stacks."""
    from . import beads

    def bad():
        return InputError(f"psf_radius={psf_radius!r} must be a positive number of pixels"
                          + (" or three (r_z, r_y, r_x)" if work.ndim == 3 else ""))

    if psf_radius is None:
        est = beads.estimate_psf_radius(work, positions)
        return int(est) if work.ndim == 2 else tuple(int(v) for v in est)
    vals = np.atleast_1d(np.asarray(psf_radius, dtype=object)).ravel()
    if vals.size not in ((1,) if work.ndim == 2 else (1, 3)) or any(isinstance(v, bool) for v in vals):
        raise bad()
    try:
        floats = [float(v) for v in vals]
    except (TypeError, ValueError):
        raise bad() from None
    if not all(np.isfinite(v) and v >= 0.5 for v in floats):
        raise bad()
    nums = [int(round(v)) for v in floats]  # whole pixels (patches have odd integer sides)
    if work.ndim == 2:
        return nums[0]
    if len(nums) == 3:
        return tuple(nums)
    rz = beads.estimate_psf_radius(work, positions)[0]
    return (int(rz), nums[0], nums[0])


def bead_patches(image, *, psf_radius: int | None = None, threshold: float | None = None,
                 background: str | None = None, saturation: float | None = None,
                 pixel_size_: str | None = None) -> BeadPatches:
    """Detect, isolate, centre and extract background-free bead patches (App. A a-c, App. B).

    Parameters
    ----------
    image : path, array or DataArray (y, x) or (z, y, x)
    psf_radius : int or sequence, optional
        r, the PSF radius bound in pixels; estimated from the data when None. For a z-stack,
        one number is the lateral radius (the axial one is then estimated) and three numbers
        are ``(r_z, r_y, r_x)`` in planes and pixels.
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
    r = _radius(psf_radius, work, positions)
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


def learn_from_patches(bp: BeadPatches, *, n_components: int | None = None, eta: float | None = None,
                       realism: bool = True, angle_threshold_deg: float = 1.0,
                       image: xr.DataArray | None = None, outlier_test: str = "field",
                       outlier_sigma: float = 3.0, rank_rule: str = "noise") -> xr.Dataset:
    """The steps after the beads: PSF basis, cone, coefficient maps, the operator store.

    Parameters
    ----------
    bp : BeadPatches
        From :func:`bead_patches`, or built from other patches at the same positions (e.g.
        noise-free true PSFs: the model's own accuracy floor).
    n_components, eta, realism, angle_threshold_deg :
        See :func:`learn_operator`.
    image : DataArray, optional
        The image, for its coordinates (pixel sizes); pixel units without it.
    outlier_test, outlier_sigma, rank_rule :
        See :func:`pcmx.psf_basis.fit_psf_basis` (``outlier_sigma=inf``: every bead is used).

    Returns
    -------
    Dataset
        As :func:`learn_operator`, ``pcmx_parameters`` without the image-level entries.
    """
    from .coefficients import coefficient_maps
    from .cone import reduce_cone
    from .psf_basis import fit_psf_basis

    nd = len(bp.shape)
    t = {}
    t0 = time.perf_counter()
    basis = fit_psf_basis(bp.patches, n_components, r=bp.radius, outlier_test=outlier_test,
                          outlier_sigma=outlier_sigma, rank_rule=rank_rule)
    t["psf_basis"] = time.perf_counter() - t0
    kept = np.asarray(basis["kept"].values, dtype=bool)
    h = np.asarray(basis["psf_basis"].values, dtype=np.float32)
    beta = np.asarray(basis["beta"].values, dtype=np.float64)
    points = bp.positions[kept]
    n_i = h.shape[0]
    min_beads = nd + 2
    if len(points) < min_beads:
        raise InputError(f"only {len(points)} usable beads after rejection; at least {min_beads} "
                         f"are needed to interpolate the PSF over the field")
    t0 = time.perf_counter()
    # generators non-negative to within half a percent of their peak: a conical combination's
    # peak can be lower than the sum of its generators' peaks (they sit at slightly different
    # pixels), and 1% per generator measured -1.0008% for a combination on a bright field
    generators = (reduce_cone(beta, angle_threshold_deg=angle_threshold_deg, psf_basis=h,
                              floor=CONE_FLOOR) if realism else None)
    t["cone"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    maps, tps, info = coefficient_maps(points, beta, bp.shape, eta=eta, generators=generators,
                                       return_spline=True)
    t["coefficients"] = time.perf_counter() - t0

    sdims = ("z", "y", "x")[-nd:]
    kdims = ("kz", "ky", "kx")[-nd:]
    if image is not None:
        steps = [pixel_size(image, d) for d in sdims]
        grid = {d: image[d] for d in sdims}
    else:
        steps = [None] * nd
        grid = spatial_coords(bp.shape, None, dims=sdims)
    ksize = h.shape[1:]
    kstep = None if any(v is None for v in steps) else tuple(steps)
    comp = np.arange(n_i)
    ds = xr.Dataset(
        {
            "psf_basis": (("component", *kdims), h),
            "coefficients": (("component", *sdims), maps.astype(np.float32, copy=False)),
            **{f"bead_{d}": ("bead", points[:, k]) for k, d in enumerate(sdims)},
            "observed_coefficients": (("bead", "component"), beta.astype(np.float32)),
            "singular_values": ("rank", np.asarray(basis["singular_values"].values, dtype=np.float64)),
        },
        coords={"component": comp, **grid, **kernel_coords(ksize, kstep, dims=kdims)},
    )
    for d in sdims:
        ds[f"bead_{d}"].attrs["units"] = "pixel"
    if generators is not None:
        ds["cone_generators"] = (("generator", "component"), np.asarray(generators, dtype=np.float32))
    eta_used = np.atleast_1d(np.asarray(tps.eta, dtype=float))
    radius = bp.radius if np.ndim(bp.radius) == 0 else [int(v) for v in bp.radius]
    params = {
        "n_components": int(n_i), "n_components_requested": n_components,
        "n_components_rule": basis.attrs["n_components_rule"],
        "psf_radius": radius, "eta": eta_used.tolist(), "eta_requested": eta,
        "realism": realism, "angle_threshold_deg": angle_threshold_deg,
        "outlier_test": outlier_test,
        "counts": {**bp.counts, "rejected_outlier": int((~kept).sum()),
                   "rejected_map_outlier": int(len(info["rejected"])),
                   "used": int(kept.sum()) - int(len(info["rejected"]))},
        "lattice_step": int(info.get("step", 0)), "lattice_max_error": float(info.get("max_error", 0.0)),
        "timings_s": {k: round(v, 4) for k, v in {**bp.timings, **t}.items()},
    }
    ds.attrs = {"pcmx_type": "operator", "pcmx_parameters": params}
    return ds


def learn_operator(image, *, n_components: int | None = None, psf_radius=None,
                   pixel_size: str | None = None, z_step: str | None = None,
                   threshold: float | None = None, background: str | None = None,
                   eta: float | None = None, realism: bool = True,
                   angle_threshold_deg: float = 1.0, validate: bool = False, folds: int = 5,
                   seed: int = 0) -> xr.Dataset:
    """Learn the space-varying operator of a microscope from one bead image (paper II-C).

    Parameters
    ----------
    image : path, array or DataArray (y, x) or (z, y, x)
        A 2D image of isolated micro-beads, or a z-stack of beads in a gel (TIFF, Zarr,
        NumPy, xarray).
    n_components : int, optional
        I, the size of the PSF basis; when None, Gavish & Donoho's optimal hard threshold for
        the patches' estimated noise (II-E-c, :mod:`pcmx.psf_basis`).
    psf_radius : int or sequence, optional
        r in pixels; estimated from the data when None (the chosen r is stored). See
        :func:`bead_patches` for z-stacks.
    pixel_size : str, optional
        e.g. ``"65nm"`` when the file's metadata lacks it (every axis, unless ``z_step``).
    z_step : str, optional
        Distance between the planes of a z-stack, e.g. ``"200nm"``, when the metadata lacks it.
    threshold, background :
        See :func:`bead_patches`.
    eta : float, optional
        Thin-plate smoothing weight; generalized cross-validation when None (App. C-a).
    realism : bool
        Project the coefficient maps onto the cone of observed coefficients (App. C-b, C-c).
    angle_threshold_deg : float
        Greedy cone reduction threshold.
    validate : bool
        Also run :func:`pcmx.cross_validation.cross_validate` and store its per-bead errors
        (2D images and z-stacks).

    Returns
    -------
    Dataset
        An operator (``psf_basis (component, [kz,] ky, kx)``, ``coefficients (component,
        [z,] y, x)``) with diagnostics: ``bead_[z,] y, x``, ``observed_coefficients (bead,
        component)``, ``cone_generators``, ``singular_values``, and attrs ``pcmx_parameters``
        (the chosen r, I and its rule, eta, per-step counts and timings).
    """
    source = _source_name(image)
    t_start = time.perf_counter()
    img = as_image(image, pixel_size=pixel_size)
    if z_step is not None:
        if img.ndim != 3:
            raise InputError(f"z_step={z_step!r}: {source} is a 2D image, not a z-stack")
        dz = parse_length(z_step, name="z_step")
        img = img.assign_coords(spatial_coords(img.shape[:1], dz, dims=("z",)))
    bp = bead_patches(img, psf_radius=psf_radius, threshold=threshold, background=background)
    try:
        ds = learn_from_patches(bp, n_components=n_components, eta=eta, realism=realism,
                                angle_threshold_deg=angle_threshold_deg, image=img)
    except InputError as err:
        raise InputError(f"{source}: {err}") from None
    params = ds.attrs["pcmx_parameters"]
    params.update({"psf_radius_requested": psf_radius, "threshold": threshold,
                   "background": background or "default"})
    params["timings_s"]["total"] = round(time.perf_counter() - t_start, 4)
    inputs = [source] if isinstance(image, (str, os.PathLike)) else []
    ds.attrs = {"pcmx_type": "operator", **provenance(params, inputs)}
    if validate:
        from .cross_validation import cross_validate

        n_i = ds.sizes["component"]
        cv = cross_validate(img, folds=folds, n_components=n_i, psf_radius=bp.radius,
                            background=background, realism=realism, seed=seed, _patches=bp)
        ds = ds.merge(cv.rename({"bead": "cv_bead"}))
        ds.attrs["pcmx_parameters"]["cross_validation"] = dict(cv.attrs)
    return ds


def pixel_size_of(img: xr.DataArray) -> tuple:
    """(y, x) pixel sizes in micrometers of an image, None where unknown."""
    return pixel_size(img, "y"), pixel_size(img, "x")
