"""The one bead pipeline: an image in, isolated, centred, background-free bead patches out.

Every consumer of bead patches goes through this module, with the same steps and defaults:
learning one operator (:mod:`pcmx.learn`), families (:mod:`pcmx.family`), cross-validation
(:mod:`pcmx.cross_validation`), blind identification (:mod:`pcmx.deblur.identify`) and the
background study (:mod:`pcmx.truth`)::

    check the image -> detect_beads -> PSF radius r -> reject_beads        (App. A a-b)
      -> center_beads -> extract_patches                                    (App. A c)
      -> subtract_background                                                (App. B)

:func:`bead_patches` runs them all; :func:`patches_at` runs the steps after detection at given
positions (point sources a user picked); :func:`raw_bead_patches` stops before the background
(to compare background estimators on the same patches). The steps themselves live in
:mod:`pcmx.beads` and :mod:`pcmx.background`.

2D images ``(y, x)`` and z-stacks ``(z, y, x)`` of beads in a gel take the same steps, in three
dimensions for z-stacks (radii per axis, 3D patches).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from . import background as bg
from . import beads
from .errors import InputError
from .io.readers import as_image

__all__ = [
    "BeadPatches",
    "bead_patches",
    "raw_bead_patches",
    "patches_at",
    "checked_image_data",
    "source_name",
    "resolve_radius",
    "radius_profiles",
    "radius_sample",
    "pooled_radius",
    "RADIUS_IMAGES",
]

#: Images whose bead profiles are pooled to estimate a shared r (evenly spaced over the inputs).
RADIUS_IMAGES = 8


@dataclass
class BeadPatches:
    """The isolated, centred, background-free bead patches of one image, with diagnostics.

    Attributes
    ----------
    patches : DataArray (bead, [kz,] ky, kx)
        With ``bead_[z,] y, x`` coordinates (pixels).
    positions : ndarray (M, ndim)
        Sub-pixel centres ``([z,] y, x)`` in pixels, float64.
    radius : int or tuple
        r in pixels; ``(r_z, r_y, r_x)`` for z-stacks.
    shape : tuple
        The image's shape.
    counts : dict
        Beads detected and rejected (by reason) and kept.
    timings : dict
        Seconds per step.
    reasons : ndarray of str (M,), optional
        Why a bead's patch is not a clean PSF (:func:`pcmx.beads.classify_shapes`: a faint
        neighbour, a bead out of the focal plane, ...), ``""`` where it is; None: not judged.
        Such beads stay here (they are isolated beads: cross-validation holds them out like
        any other) but no model is fitted on them (:attr:`usable`).
    shapes : dict, optional
        The statistics they were judged on (:func:`pcmx.beads.patch_shapes`).
    detections : ndarray (N, ndim), optional
        Every detection of the image (pixels), strongest first.
    detection_reasons : ndarray of str (N,), optional
        Why each detection is not among the beads (:func:`pcmx.beads.classify_beads`: border,
        saturated, hot_pixel, crowded), ``""`` for the beads.
    bead_detection : ndarray of int (M,), optional
        The detection each bead comes from.
    """

    patches: xr.DataArray
    positions: np.ndarray
    radius: int | tuple
    shape: tuple
    counts: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    reasons: np.ndarray | None = None
    shapes: dict | None = None
    detections: np.ndarray | None = None
    detection_reasons: np.ndarray | None = None
    bead_detection: np.ndarray | None = None

    @property
    def usable(self) -> np.ndarray:
        """Boolean mask of the beads a model may be fitted on (no shape reason against them)."""
        if self.reasons is None:
            return np.ones(len(self.positions), dtype=bool)
        return np.asarray(self.reasons) == ""

    def subset(self, index) -> BeadPatches:
        """The beads ``index`` (boolean mask or integer indices), in that order; counts kept."""
        idx = np.asarray(index)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(int)
        return BeadPatches(patches=self.patches.isel(bead=idx), positions=self.positions[idx],
                           radius=self.radius, shape=self.shape, counts=dict(self.counts),
                           timings=dict(self.timings),
                           reasons=None if self.reasons is None else np.asarray(self.reasons)[idx],
                           shapes=None if self.shapes is None else {
                               k: np.asarray(v)[idx] for k, v in self.shapes.items()},
                           detections=self.detections, detection_reasons=self.detection_reasons,
                           bead_detection=None if self.bead_detection is None else self.bead_detection[idx])

    def detection_status(self) -> np.ndarray:
        """Each detection's status: its rejection reason, the shape reason of a bead, or
        ``"used"`` for a bead a model may be fitted on (a fit adds ``"outlier"`` and
        ``"map_outlier"``); None without detections."""
        if self.detections is None:
            return None
        status = np.asarray(self.detection_reasons, dtype=object).copy()
        reasons = self.reasons if self.reasons is not None else np.full(len(self), "")
        for i, d in enumerate(self.bead_detection):  # M beads, a few hundred
            status[d] = reasons[i] or "used"
        return status.astype(str)

    def usable_beads(self) -> BeadPatches:
        """The beads a model may be fitted on (:attr:`usable`)."""
        return self if self.reasons is None or self.usable.all() else self.subset(self.usable)

    def __len__(self) -> int:
        return len(self.positions)


def source_name(image) -> str:
    """The name an error message gives ``image``: its path, its ``source`` attr, or "image"."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, xr.DataArray):
        return str(image.attrs.get("source", image.name or "image"))
    return "image"


def checked_image_data(img: xr.DataArray, source: str) -> np.ndarray:
    """The pixels of a bead image after the checks every learning step needs.

    Raises
    ------
    InputError
        Not 2D or 3D, NaN or infinite values, too small to hold beads, constant.
    """
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


def resolve_radius(psf_radius, work: np.ndarray, positions: np.ndarray):
    """r in pixels: given (validated) or estimated from the beads (App. A-b).

    Returns an int for 2D images and ``(r_z, r_y, r_x)`` for z-stacks (one given number is then
    the lateral radius; the axial one is estimated).
    """

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


@dataclass
class _Detected:
    work: np.ndarray  # float32 pixels
    data: np.ndarray  # the original pixels (saturation is judged on them)
    detections: np.ndarray  # every detection, strongest first
    reasons: np.ndarray  # why each detection is not a bead ("" for the beads)
    index: np.ndarray  # the detection of each kept bead
    kept: np.ndarray  # centred positions of the kept beads
    radius: int | tuple
    counts: dict
    timings: dict


def _detect(image, *, psf_radius, threshold, saturation, pixel_size, max_beads) -> _Detected:
    source = source_name(image)
    img = as_image(image, pixel_size=pixel_size)
    data = checked_image_data(img, source)
    # saturation=None lets pcmx.beads find the clipping plateau (a 12-bit camera saves 4095 in uint16)
    work = data.astype(np.float32, copy=False)
    t = {}
    t0 = time.perf_counter()
    positions, dinfo = beads.detect_beads(work, threshold=threshold)
    t["detect"] = time.perf_counter() - t0
    if len(positions) == 0:
        raise InputError(f"{source}: no beads detected (threshold {dinfo.get('threshold', '?'):.3g})")
    t0 = time.perf_counter()
    r = resolve_radius(psf_radius, work, positions)
    why_not = beads.classify_beads(positions, work.shape, r, image=data, saturation=saturation)
    keep = why_not == ""
    reasons = {k: int(np.sum(why_not == k)) for k in beads.REJECTION_REASONS}
    t["reject"] = time.perf_counter() - t0
    counts = {"detected": int(len(positions)), **{f"rejected_{k}": int(v) for k, v in reasons.items()}}
    if not np.any(keep):
        why = ", ".join(f"{k} {v}" for k, v in reasons.items())
        raise InputError(f"{source}: all {len(positions)} detected beads were rejected ({why}); "
                         f"psf_radius r={r} px")
    t0 = time.perf_counter()
    pos = beads.center_beads(work, positions[keep], r)
    index = np.flatnonzero(keep)
    if max_beads is not None:  # detections come sorted by strength: keep the strongest
        pos, index = pos[: int(max_beads)], index[: int(max_beads)]
    t["centre"] = time.perf_counter() - t0
    return _Detected(work=work, data=data, detections=positions, reasons=why_not, index=index,
                     kept=np.asarray(pos, np.float64), radius=r, counts=counts, timings=t)


def raw_bead_patches(image, *, psf_radius=None, threshold: float | None = None,
                     saturation: float | None = None, pixel_size: str | None = None,
                     max_beads: int | None = None):
    """The bead steps of :func:`bead_patches` before the background (App. A a-c).

    Returns
    -------
    patches : DataArray (bead, [kz,] ky, kx)
        Centred patches, background included.
    positions : ndarray (M, ndim)
        Their sub-pixel centres.
    detections : ndarray
        Every detection (to mask when estimating a background).
    radius : int or tuple
    work : ndarray
        The image as float32.
    """
    d = _detect(image, psf_radius=psf_radius, threshold=threshold, saturation=saturation,
                pixel_size=pixel_size, max_beads=max_beads)
    patches = beads.extract_patches(d.work, d.kept, d.radius)
    return patches, d.kept, d.detections, d.radius, d.work


def bead_patches(image, *, psf_radius=None, threshold: float | None = None,
                 background: str | None = None, saturation: float | None = None,
                 pixel_size: str | None = None, max_beads: int | None = None,
                 shape_tests: bool = True) -> BeadPatches:
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
        Saturation level; found from the clipping plateau when None.
    pixel_size : str, optional
        e.g. ``"65nm"`` where the file's metadata lacks it.
    max_beads : int, optional
        Keep at most this many beads, the strongest detections.
    shape_tests : bool
        Judge each patch's shape against the field's (:func:`pcmx.beads.classify_shapes`):
        faint neighbours, beads out of the focal plane of a thick sample, off-centre light.
        Such beads get a reason in ``reasons`` and no model is fitted on them.

    Raises
    ------
    InputError
        No beads, all beads rejected (counts by reason), NaNs, constant or tiny image.
    """
    d = _detect(image, psf_radius=psf_radius, threshold=threshold, saturation=saturation,
                pixel_size=pixel_size, max_beads=max_beads)
    t0 = time.perf_counter()
    patches = beads.extract_patches(d.work, d.kept, d.radius)
    d.timings["centre"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    kw = {} if background is None else {"method": background}
    # mask every detection (not only the kept beads) when estimating the smooth background
    patches = bg.subtract_background(patches, d.radius, image=d.work, positions=d.kept,
                                     mask_positions=d.detections, **kw)
    d.timings["background"] = time.perf_counter() - t0
    d.counts["isolated"] = int(len(d.kept))
    reasons = shapes = None
    if shape_tests:
        t0 = time.perf_counter()
        shapes = beads.patch_shapes(patches, d.radius)
        reasons = beads.classify_shapes(shapes, d.kept)
        d.counts.update({f"rejected_{k}": int(np.sum(reasons == k)) for k in beads.SHAPE_REASONS})
        d.timings["shapes"] = time.perf_counter() - t0
    return BeadPatches(patches=patches, positions=d.kept, radius=d.radius,
                       shape=tuple(d.work.shape), counts=d.counts, timings=d.timings,
                       reasons=reasons, shapes=shapes, detections=np.asarray(d.detections, np.float64),
                       detection_reasons=np.asarray(d.reasons, dtype=str), bead_detection=d.index)


def patches_at(image, positions, r, *, background: str | None = None) -> BeadPatches:
    """The steps after detection at given point-source positions: centre, extract, background.

    Parameters
    ----------
    image : DataArray or array (y, x)
    positions : array (P, 2)
        Approximate ``(y, x)`` pixel positions, each at least the patch half side from the border.
    r : int
        PSF radius in pixels (the patches' size follows from it).

    Raises
    ------
    InputError
        Positions not a finite (P, 2) array, or too close to the border.
    """
    img = image if isinstance(image, xr.DataArray) else xr.DataArray(np.asarray(image), dims=("y", "x"))
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or not np.all(np.isfinite(pos)):
        raise InputError(f"positions: expected a finite (P, 2) array of (y, x) pixels, got shape {pos.shape}")
    ny, nx = img.shape
    half = int(beads.patch_half_size(r, 2)[0])
    outside = (pos[:, 0] < half) | (pos[:, 0] > ny - 1 - half) | (pos[:, 1] < half) | (pos[:, 1] > nx - 1 - half)
    if outside.any():
        raise InputError(f"positions: {int(outside.sum())} of {len(pos)} point sources lie closer than "
                         f"the patch half side {half} px to the border (e.g. {pos[outside][0].tolist()})")
    work = np.asarray(img.values, dtype=np.float32)
    pos = np.asarray(beads.center_beads(work, pos, r), dtype=np.float64)
    patches = beads.extract_patches(work, pos, r)
    kw = {} if background is None else {"method": background}
    patches = bg.subtract_background(patches, r, image=work, positions=pos, mask_positions=pos, **kw)
    return BeadPatches(patches=patches, positions=pos, radius=r, shape=tuple(work.shape),
                       counts={"given": int(len(pos))})


# --------------------------------------------------------------------------- shared r of K images

def radius_profiles(image) -> dict | None:
    """Bead profiles of one image for :func:`pcmx.beads.pooled_psf_radius` (None: no beads).

    ``image`` is a DataArray or array; an image whose beads cannot be found gives None (the
    bead step, which sees the same image, reports why).
    """
    try:
        work = np.asarray(getattr(image, "values", image), dtype=np.float32)
        positions, _ = beads.detect_beads(work)
        if len(positions) == 0:
            return None
        _, info = beads.estimate_psf_radius(work, positions, return_info=True)
    except InputError:
        return None
    if info.get("fallback"):
        return None
    return {key: info[key] for key in ("profile", "noise", "n_beads", "radii", "max_radius")}


def radius_sample(n: int) -> np.ndarray:
    """Indices of the (at most :data:`RADIUS_IMAGES`) images, spread over n, whose beads set r."""
    return np.unique(np.linspace(0, n - 1, min(RADIUS_IMAGES, n)).astype(int))


def pooled_radius(infos) -> tuple[int | None, dict | None]:
    """r from :func:`radius_profiles` results (None where an image had no beads) and its record
    for ``pcmx_parameters``; ``(None, None)`` when no image had beads."""
    infos = [i for i in infos if i is not None]
    if not infos:
        return None, None
    return beads.pooled_psf_radius(infos), {
        "pooled_from_images": len(infos), "pooled_beads": int(sum(i["n_beads"] for i in infos)),
        "per_image": [int(np.round(np.median(i["radii"]))) for i in infos]}
