"""Bead detection, isolation, sub-pixel centring and patch extraction (paper App. A a-d).

The steps, each a public function a user can call and inspect::

    detect_beads        maxima of the Laplacian of a blurred image above a threshold    (A-a)
    estimate_psf_radius r, the PSF radius bound, from the radial profiles of bright beads
    reject_beads        keep beads r_ext from the border, 2r from any other bead,
                        and not saturated                                              (A-b)
    center_beads        maximum of the correlation with a continuous Gaussian          (A-c)
    extract_patches     bicubic (cubic B-spline) re-sampling around that centre        (A-c)
    bump_multiplier     the radial multiplier m(t), 1 below r, 0 above r_ext = 1.2 r    (A-d)

Conventions
-----------
Positions are ``(N, ndim)`` float arrays in pixel units, ``(y, x)`` or ``(z, y, x)``, sorted
by decreasing detection strength (:func:`detect_beads` returns them so and every later step
keeps the order). A radius ``r`` is one number of pixels or one per axis (z-stacks usually
have coarser planes than pixels); distances between beads are measured in units of ``r``
(``sqrt(sum_d (delta_d / r_d)^2)``). Patches are a DataArray ``(bead, ky, kx)`` (3D:
``(bead, kz, ky, kx)``) of odd side ``2 * ceil(1.2 r) + 1`` with the centre at index
``size // 2``, coordinates ``bead_y``, ``bead_x`` (and ``bead_z``) along ``bead`` (sub-pixel
centres, pixel units) and kernel offsets ``ky``, ``kx`` in pixels; attrs ``psf_radius`` and
``r_ext`` (pixels, one per axis).

Every step vectorises over beads (gathered windows, batched matrix products); nothing loops
over pixels. Float32 in, float32 out.
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.ndimage as ndi
import xarray as xr
from scipy.spatial import cKDTree

from .errors import InputError
from .noise import MAD_TO_SIGMA, quantisation_step, robust_sigma
from .units import kernel_coords

__all__ = [
    "as_image_array",
    "detect_beads",
    "estimate_psf_radius",
    "pooled_psf_radius",
    "saturation_level",
    "classify_beads",
    "reject_beads",
    "center_beads",
    "extract_patches",
    "bump_multiplier",
    "patch_half_size",
    "as_positions",
    "offset_grids",
    "normalised_radius",
    "radius_vector",
    "REJECTION_REASONS",
    "hot_pixels",
    "patch_shapes",
    "classify_shapes",
    "field_trend",
    "SHAPE_REASONS",
]

SPATIAL_DIMS = ("z", "y", "x")
KERNEL_DIMS = ("kz", "ky", "kx")
#: Reasons :func:`classify_beads` gives, in order of priority (a bead is counted once).
REJECTION_REASONS = ("border", "saturated", "hot_pixel", "crowded")
#: A detection whose brightest face-neighbour pixel rises less than this fraction as far above
#: the local background as its centre pixel is one bright pixel (a hot pixel, a cosmic ray),
#: not a PSF. Measured on the real star fields (``docs/realdata.md``): 0.003-0.12 for the
#: sensor's hot pixels, 0.2 and more for stars of FWHM 0.9-2.2 px; 0.6-0.9 for beads. A
#: Gaussian PSF integrated over the pixels gives 0.157 at FWHM 1.0 px centred on a pixel (the
#: worst phase): PSFs sampled at 1 px FWHM or finer are never taken for hot pixels.
HOT_PIXEL_RATIO = 0.15
#: r_ext / r (App. A-d: "In practice, we set r_ext = 1.2 r").
R_EXT_FACTOR = 1.2
#: Extra pixels gathered around each patch so the B-spline prefilter's boundary does not reach it.
_SPLINE_MARGIN = 6
#: Smallest image side that can hold a bead.
_MIN_SIDE = 8


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
def as_image_array(image, *, name: str = "image") -> np.ndarray:
    """A validated float32 copy-free view of a 2D ``(y, x)`` or 3D ``(z, y, x)`` image.

    Parameters
    ----------
    image : array_like or DataArray
        Any real array with 2 or 3 dimensions (a DataArray's values are used).
    name : str
        The argument's name in error messages.

    Returns
    -------
    ndarray float32

    Raises
    ------
    InputError
        Wrong number of dimensions, a side shorter than 8 pixels, NaN or infinite values, a
        constant image, or a non-numeric array.
    """
    data = image.values if isinstance(image, xr.DataArray) else np.asarray(image)
    if data.ndim not in (2, 3):
        raise InputError(f"{name}: expected a 2D (y, x) or 3D (z, y, x) array, got "
                         f"{data.ndim} dimensions with shape {tuple(data.shape)}")
    if data.dtype.kind not in "uifb":
        raise InputError(f"{name}: expected a real numeric array, got dtype {data.dtype}")
    spatial = data.shape[-2:]
    if min(spatial) < _MIN_SIDE:
        raise InputError(f"{name}: shape {tuple(data.shape)} is too small to hold a bead "
                         f"(need at least {_MIN_SIDE} pixels along y and x)")
    out = data.astype(np.float32, copy=False)
    if data.dtype.kind == "f":
        bad = ~np.isfinite(out)
        if bad.any():
            raise InputError(f"{name}: contains {int(bad.sum())} NaN or infinite values; "
                             "fill or crop them before detecting beads")
    lo, hi = float(out.min()), float(out.max())
    if lo == hi:
        raise InputError(f"{name}: is constant ({lo:g}); there are no beads to detect")
    return out


def radius_vector(r, ndim: int, *, name: str = "psf_radius") -> np.ndarray:
    """``r`` as one positive float per axis (a scalar is broadcast)."""
    try:
        vec = np.asarray(r, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{name}={r!r} must be a positive number of pixels (or one per axis)") from None
    if vec.size == 1:
        vec = np.repeat(vec, ndim)
    if vec.size != ndim or not np.all(np.isfinite(vec)) or np.any(vec <= 0):
        raise InputError(f"{name}={r!r} must be a positive number of pixels (or one per axis, "
                         f"{ndim} values)")
    return vec


def patch_half_size(r, ndim: int, *, r_ext_factor: float = R_EXT_FACTOR) -> np.ndarray:
    """Half side of the patches, ``ceil(r_ext)`` per axis with ``r_ext = 1.2 r`` (App. A-d)."""
    return np.ceil(radius_vector(r, ndim) * r_ext_factor - 1e-9).astype(np.int64)


def as_positions(positions, ndim: int, *, name: str = "positions") -> np.ndarray:
    """Bead positions as a checked ``(N, ndim)`` float64 array in pixel units.

    Parameters
    ----------
    positions : array_like (N, ndim)
        ``(y, x)`` or ``(z, y, x)`` per bead; an empty 1D array means no bead.
    ndim : int
        Number of spatial axes.
    name : str
        Argument name for error messages.

    Returns
    -------
    ndarray (N, ndim) float64

    Raises
    ------
    InputError
        Another shape, NaN or infinite values.
    """
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim == 1 and pos.size == 0:
        pos = pos.reshape(0, ndim)
    if pos.ndim != 2 or pos.shape[1] != ndim:
        raise InputError(f"{name}: expected an (N, {ndim}) array of pixel positions, got shape "
                         f"{pos.shape}")
    if not np.all(np.isfinite(pos)):
        raise InputError(f"{name}: contains NaN or infinite positions")
    return pos


def _sigma_vector(sigma, ndim: int, name: str = "sigma") -> np.ndarray:
    return radius_vector(sigma, ndim, name=name)


# --------------------------------------------------------------------------------------------
# gathering windows (vectorised over beads)
# --------------------------------------------------------------------------------------------
def _gather(image: np.ndarray, centres: np.ndarray, half) -> np.ndarray:
    """Windows ``image[c - half : c + half + 1]`` around integer centres, edges replicated.

    Returns ``(M, 2 half_0 + 1, ..., 2 half_{d-1} + 1)``; indices outside the image are clipped
    (edge replication), so the call never fails near borders.
    """
    nd = image.ndim
    half = np.broadcast_to(np.asarray(half, dtype=np.int64), (nd,))
    idx = []
    for d in range(nd):
        k = np.arange(-half[d], half[d] + 1)
        ii = np.clip(centres[:, d, None].astype(np.int64) + k[None, :], 0, image.shape[d] - 1)
        shape = [len(centres)] + [1] * nd
        shape[1 + d] = k.size
        idx.append(ii.reshape(shape))
    return image[tuple(idx)]


def offset_grids(half) -> list[np.ndarray]:
    """Kernel offsets ``-h .. h`` along each axis (float64), for half sides ``half``.

    Parameters
    ----------
    half : sequence of int
        Half side of the kernel along each axis; the kernel has ``2 h + 1`` pixels, its
        centre at offset 0.

    Returns
    -------
    list of ndarray
        One 1D array per axis.
    """
    return [np.arange(-h, h + 1, dtype=np.float64) for h in half]


def normalised_radius(half, r) -> np.ndarray:
    """Distance to the kernel centre in units of the radius, ``sqrt(sum_d (k_d / r_d)^2)``.

    Parameters
    ----------
    half : sequence of int
        Half sides of the kernel grid (see :func:`offset_grids`).
    r : sequence of float
        Radius along each axis (pixels); per-axis radii make the level sets ellipsoids.

    Returns
    -------
    ndarray, shape ``(2 h_0 + 1, ..., 2 h_{d-1} + 1)``, float64
        1 on the ellipse (ellipsoid) of radii ``r``.
    """
    grids = np.meshgrid(*offset_grids(half), indexing="ij")
    return np.sqrt(sum((g / rd) ** 2 for g, rd in zip(grids, r, strict=True)))


# --------------------------------------------------------------------------------------------
# A-a: detection
# --------------------------------------------------------------------------------------------
def _log_kernel_norm(sigma: np.ndarray) -> float:
    """l2 norm of the (scale-normalised) LoG filter: noise gain for white noise of unit std."""
    half = np.ceil(4 * sigma).astype(int) + 1
    delta = np.zeros(tuple(2 * half + 1), dtype=np.float64)
    delta[tuple(half)] = 1.0
    resp = ndi.gaussian_laplace(delta, sigma) * float(np.mean(sigma)) ** 2
    return float(np.sqrt(np.sum(resp**2)))


def _suppress(positions: np.ndarray, radius: np.ndarray, values: np.ndarray | None = None,
              ratio: float | None = None) -> np.ndarray:
    """Greedy non-maximum suppression: drop any position within ``radius`` (normalised
    distance < 1) of an earlier (stronger) kept one, and, with ``values`` and ``ratio``, only
    if its value is below ``ratio`` times that one's. Returns the kept mask."""
    n = len(positions)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    tree = cKDTree(positions / radius)
    pairs = tree.query_pairs(1.0 - 1e-9, output_type="ndarray")
    if len(pairs) == 0:
        return keep
    pairs = np.sort(pairs, axis=1)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    # neighbours of each i among later (weaker) detections, in CSR form
    starts = np.searchsorted(pairs[:, 0], np.arange(n + 1))
    for i in np.unique(pairs[:, 0]):  # loop over detections with neighbours, not pixels
        if keep[i]:
            js = pairs[starts[i]:starts[i + 1], 1]
            if ratio is not None:
                js = js[values[js] < ratio * values[i]]
            keep[js] = False
    return keep


def detect_beads(image, *, threshold: float | None = None, sigma=1.5, snr: float = 6.0,
                 merge_radius="auto", merge_ratio: float = 0.05) -> tuple[np.ndarray, dict]:
    """Rough bead detection: maxima of the Laplacian of a blurred image (paper App. A-a).

    The response is ``-sigma^2 * LoG_sigma(u)`` (a bright blob gives a positive maximum).
    Its local maxima above ``threshold`` are the candidate beads. Without a threshold, it is
    ``snr`` times a robust noise estimate of the response (1.4826 x its median absolute
    deviation over the image; beads are sparse so the median sees noise), floored by the
    quantisation noise of integer images.

    Aberrated PSFs have several maxima (Airy rings, coma lobes): maxima within
    ``merge_radius`` of a stronger one are merged into it (they belong to its PSF), and so are
    maxima within twice that distance (the crowding distance of :func:`reject_beads`) whose
    response is below ``merge_ratio`` times the stronger one's (outer Airy rings of bright
    beads; a bead that faint would add less than that fraction to the patch, where the bump
    multiplier is already small). A real neighbour that close and brighter is merged too; the
    patch then holds two beads and the z-score test of
    :func:`pcmx.psf_basis.fit_psf_basis` (App. A-f) removes it.

    Parameters
    ----------
    image : array_like or DataArray, (y, x) or (z, y, x)
    threshold : float, optional
        Detection threshold on the response (image units); automatic when None.
    sigma : float or sequence
        Blur of the Laplacian of Gaussian, pixels (one per axis allowed).
    snr : float
        Automatic threshold in units of the response's noise.
    merge_radius : "auto", float, sequence or None
        Maxima closer than this to a stronger maximum are merged into it. ``"auto"``: the PSF
        radius :func:`estimate_psf_radius` measures on the maxima; None: no merging.
    merge_ratio : float
        Relative response below which a maximum within ``2 merge_radius`` of a stronger one is
        merged into it.

    Returns
    -------
    positions : ndarray float64 (N, ndim)
        Integer pixel positions of the beads, strongest first.
    info : dict
        ``threshold``, ``noise`` (response noise), ``sigma``, ``response`` (N,),
        ``n_maxima`` (before merging), ``n_merged``, ``merge_radius``, ``n_detected``.

    Raises
    ------
    InputError
        Bad image (see :func:`as_image_array`), a non-positive threshold or sigma, or no
        maximum above the threshold.
    """
    img = as_image_array(image)
    nd = img.ndim
    sig = _sigma_vector(sigma, nd)
    if threshold is not None and (not isinstance(threshold, numbers.Real) or not np.isfinite(threshold)
                                  or threshold <= 0):
        raise InputError(f"threshold={threshold!r} must be a positive number")
    if not isinstance(snr, numbers.Real) or not snr > 0:
        raise InputError(f"snr={snr!r} must be a positive number")
    if isinstance(merge_radius, str) and merge_radius != "auto":
        raise InputError(f"merge_radius={merge_radius!r} must be 'auto', a number of pixels or None")
    if merge_radius is not None and not isinstance(merge_radius, str):
        radius_vector(merge_radius, nd, name="merge_radius")
    resp = ndi.gaussian_laplace(img, sig, output=np.float32)
    resp *= np.float32(-float(np.mean(sig)) ** 2)
    noise = robust_sigma(resp)
    q = quantisation_step(img)
    floor = q / np.sqrt(12.0) * _log_kernel_norm(sig)
    noise = max(noise, floor)
    thr = float(threshold) if threshold is not None else float(snr * noise)
    if thr <= 0:
        thr = float(np.finfo(np.float32).tiny)
    # local maxima over a (2 ceil(sigma) + 1) box, tested only where the response exceeds the
    # threshold (a few pixels per bead) instead of max-filtering the whole image
    half = np.ceil(sig).astype(np.int64)
    above = np.argwhere(resp > thr)
    if len(above):
        win = _gather(resp, above, half).reshape(len(above), -1)
        is_max = win.max(axis=1) <= resp[tuple(above.T)]
        coords = above[is_max]
    else:
        coords = above
    values = resp[tuple(coords.T)]
    if len(coords) == 0:
        raise InputError(f"image: no beads detected (no Laplacian-of-Gaussian maximum above "
                         f"threshold={thr:.4g}; response noise {noise:.4g}); lower the threshold")
    order = np.argsort(-values, kind="stable")
    coords, values = coords[order].astype(np.float64), values[order]
    # exact ties (plateaus of the response, e.g. saturated cores) give adjacent duplicates
    keep = _suppress(coords, np.full(nd, 1.5))
    coords, values = coords[keep], values[keep]
    n_maxima = len(coords)
    if isinstance(merge_radius, str):
        mr = radius_vector(estimate_psf_radius(img, coords, sigma=sig), nd)
    elif merge_radius is None:
        mr = None
    else:
        mr = radius_vector(merge_radius, nd, name="merge_radius")
    if mr is not None:
        keep = _suppress(coords, mr)
        coords, values = coords[keep], values[keep]
        # much weaker maxima out to the crowding distance 2r: Airy rings, halos
        keep = _suppress(coords, 2 * mr, values, merge_ratio)
        coords, values = coords[keep], values[keep]
    info = {
        "threshold": thr,
        "noise": float(noise),
        "sigma": sig.tolist(),
        "snr": float(snr),
        "response": values.astype(np.float64),
        "n_maxima": int(n_maxima),
        "n_merged": int(n_maxima - len(coords)),
        "merge_radius": None if mr is None else mr.tolist(),
        "n_detected": int(len(coords)),
    }
    return coords, info


# --------------------------------------------------------------------------------------------
# the PSF radius r
# --------------------------------------------------------------------------------------------
def _ring_profiles(windows: np.ndarray, rho: np.ndarray, nbins: int) -> np.ndarray:
    """Median over each integer-radius ring of each window: ``(M, nbins)``."""
    ring = np.rint(rho).astype(np.int64).ravel()
    flat = windows.reshape(len(windows), -1)
    out = np.full((len(windows), nbins), np.nan)
    for b in range(nbins):  # loop over radii (tens), vectorised over beads and pixels
        sel = ring == b
        if sel.any():
            out[:, b] = np.median(flat[:, sel], axis=1)
    return out


def _crossing(excess: np.ndarray, level: np.ndarray, run: int = 3) -> np.ndarray:
    """First radius from which ``excess <= level`` holds for ``run`` consecutive radii."""
    below = excess <= level[:, None]
    n = below.shape[1]
    ok = np.ones((below.shape[0], n - run + 1), dtype=bool)
    for j in range(run):
        ok &= below[:, j:n - run + 1 + j]
    first = np.where(ok.any(axis=1), ok.argmax(axis=1), n - 1)
    return first.astype(np.float64)


def estimate_psf_radius(image, positions, *, max_radius: int | None = None, n_candidates: int = 16,
                        noise_factor: float = 1.0, sigma=1.5, return_info: bool = False):
    """Estimate r, an upper bound of the PSF radius, where bead profiles drop into noise.

    Paper App. A-b: r bounds the radius beyond which "the information brought by the image is
    dominated by noise". For up to ``n_candidates`` of the strongest beads that are the
    strongest within ``max_radius`` (so not a lobe of a brighter bead) and lie ``max_radius``
    from the border, the radial profile (median over each 1-pixel ring, robust to a neighbour
    crossing the ring) minus the background (median of the outermost rings) is compared with
    ``noise_factor`` x the pixel noise (1.4826 x MAD of the outer rings, pooled over beads,
    floored by the quantisation noise of integer images). A bead's radius is the first radius
    from which its profile stays below that level for three rings; r is the median over beads.
    For z-stacks the lateral radius is measured in each bead's plane and the axial one along
    the axis through its centre.

    Parameters
    ----------
    image : array_like or DataArray, (y, x) or (z, y, x)
    positions : array_like (N, ndim)
        Detections, strongest first (as :func:`detect_beads` returns them).
    max_radius : int, optional
        Largest radius measured (pixels); ``min(40, (side - 1) // 4)`` by default.
    n_candidates : int
        Number of beads measured.
    noise_factor : float
        The profile is "in the noise" below this many pixel-noise standard deviations.
    sigma : float or sequence
        The detection blur; r is at least ``2 sigma``.
    return_info : bool
        Also return a dict with the per-bead radii, the noise level and the mean profile.

    Returns
    -------
    r : int (2D) or tuple of ints ``(r_z, r_y, r_x)`` (3D)
    info : dict, only if ``return_info``

    Raises
    ------
    InputError
        Bad image or positions.
    """
    img = as_image_array(image)
    nd = img.ndim
    pos = as_positions(positions, nd)
    sig = _sigma_vector(sigma, nd)
    lateral = img.shape[-2:]
    rmax = int(max_radius) if max_radius is not None else int(min(40, (min(lateral) - 1) // 4))
    rmin = int(np.ceil(2 * sig.max()))
    rmax = max(rmax, rmin + 3)
    info: dict = {"max_radius": rmax, "fallback": False}
    ci = np.rint(pos).astype(np.int64)
    inside = np.all((ci[:, -2:] >= rmax) & (ci[:, -2:] <= np.asarray(lateral) - 1 - rmax), axis=1)
    # strongest within rmax: no earlier (stronger) detection closer than rmax
    strongest = _suppress(pos[:, -2:], np.full(2, float(rmax))) if len(pos) else np.zeros(0, bool)
    cand = np.flatnonzero(inside & strongest)
    if cand.size == 0:
        cand = np.flatnonzero(inside)
    if cand.size == 0:
        r = max(rmin, int(np.ceil(3 * sig.max())))
        info.update(fallback=True, radii=[], noise=float("nan"))
        out = r if nd == 2 else (r, r, r)
        return (out, info) if return_info else out
    cand = cand[:n_candidates]
    c = ci[cand]
    # lateral profile in each bead's plane
    plane = img if nd == 2 else None
    if nd == 3:
        win = _gather(img, c, (0, rmax, rmax))[:, 0]
    else:
        win = _gather(plane, c, (rmax, rmax))
    win = win.astype(np.float64)
    rho = normalised_radius((rmax, rmax), np.ones(2))
    outer = (rho >= rmax - 2.5) & (rho <= rmax)
    outer_px = win.reshape(len(c), -1)[:, outer.ravel()]
    bg = np.median(outer_px, axis=1)
    mad = 1.4826 * np.median(np.abs(outer_px - bg[:, None]), axis=1)
    q = quantisation_step(img)
    noise = max(float(np.median(mad)), q / np.sqrt(12.0))
    prof = _ring_profiles(win, rho, rmax + 1) - bg[:, None]
    radii = _crossing(prof, np.full(len(c), noise_factor * noise))
    r_lat = int(np.clip(np.round(np.median(radii)), rmin, rmax))
    info.update(radii=radii.tolist(), noise=noise, profile=np.nanmean(prof, axis=0).tolist(),
                n_beads=int(len(c)))
    if nd == 2:
        return (r_lat, info) if return_info else r_lat
    # axial: mean over the 3x3 core at each plane offset minus that plane's own background
    # (median of the outer rings in the plane): in a gel, the out-of-focus light of all the
    # beads makes the background change from plane to plane
    nz = img.shape[0]
    rz_max = max(2, (nz - 1) // 2)
    col = _gather(img, c, (rz_max, 1, 1)).reshape(len(c), 2 * rz_max + 1, -1).mean(axis=2)
    vol = _gather(img, c, (rz_max, rmax, rmax)).reshape(len(c), 2 * rz_max + 1, -1)
    bg_z = np.median(vol[:, :, outer.ravel()], axis=2)
    planes = c[:, :1] + np.arange(-rz_max, rz_max + 1)[None, :]
    inside_z = (planes >= 0) & (planes < nz)
    prof_z = np.where(inside_z, col - bg_z, -np.inf)  # planes beyond the stack: no signal
    up = prof_z[:, rz_max:]
    down = prof_z[:, rz_max::-1]
    prof_zs = np.maximum(up, down)
    radii_z = _crossing(prof_zs, np.full(len(c), noise_factor * noise))
    r_ax = int(np.clip(np.round(np.median(radii_z)), max(1, int(np.ceil(2 * sig[0]))), rz_max))
    info.update(radii_z=radii_z.tolist())
    out = (r_ax, r_lat, r_lat)
    return (out, info) if return_info else out


def pooled_psf_radius(infos, *, significance: float = 3.0, run: int = 3) -> int:
    """r from the bead profiles of several images at once (a family's acquisitions).

    :func:`estimate_psf_radius` bounds r where *each* bead's profile sinks into the pixel
    noise; on dim beads that cuts the PSF's wings (r = 8-10 px on 1500-photon beads whose
    wings reach 15 px), and a PCA over many patches recovers wings that no single patch shows.
    Here the mean profile of all the measured beads (``n`` of them) is compared with the noise
    of that mean, ``sqrt(sum_i n_i noise_i^2) / n``: r is the first radius from which it stays
    below ``significance`` times that noise for ``run`` rings, and at least the largest
    per-image estimate. Measured on 10 simulated states of 30 dim beads (PSF error of the
    family against the truth on a 49 x 49 window): r = 9 (one image's estimate) 0.142,
    12: 0.090, 15 (this, with ``significance=3``): 0.057, 16: 0.051, 18: 0.065, 20: 0.088.

    Parameters
    ----------
    infos : sequence of dict
        The ``info`` of :func:`estimate_psf_radius` (``return_info=True``) for each image (2D).
    significance : float
        Multiple of the noise of the mean profile below which the profile is noise.
    run : int
        Consecutive rings required below the level.

    Returns
    -------
    int
    """
    use = [i for i in infos if not i.get("fallback") and i.get("n_beads", 0) > 0]
    if not use:
        raise InputError("no bead profile to estimate the PSF radius from")
    n = np.array([i["n_beads"] for i in use], dtype=np.float64)
    length = min(len(i["profile"]) for i in use)
    prof = np.stack([np.asarray(i["profile"][:length], dtype=np.float64) for i in use])
    mean = np.nansum(prof * n[:, None], axis=0) / n.sum()
    noise = float(np.sqrt(np.sum(n * np.array([i["noise"] for i in use]) ** 2)) / n.sum())
    r = int(_crossing(mean[None, :], np.array([significance * noise]), run=run)[0])
    per_image = max(int(np.round(np.median(i["radii"]))) for i in use)
    return int(np.clip(r, per_image, min(i["max_radius"] for i in use)))


# --------------------------------------------------------------------------------------------
# A-b: rejection
# --------------------------------------------------------------------------------------------
def saturation_level(image, saturation: float | None = None) -> float | None:
    """The level at or above which a pixel is saturated (None: no saturation seen).

    Given ``saturation`` is returned as is. Otherwise the image maximum counts as saturation
    when it forms a plateau (two adjacent pixels at the maximum, the signature of clipping) or,
    for integer images, when it is the largest value of the dtype.
    """
    if saturation is not None:
        if not isinstance(saturation, numbers.Real) or not np.isfinite(saturation):
            raise InputError(f"saturation={saturation!r} must be a finite number")
        return float(saturation)
    data = image.values if isinstance(image, xr.DataArray) else np.asarray(image)
    vmax = data.max()
    if data.dtype.kind in "ui" and vmax == np.iinfo(data.dtype).max:
        return float(vmax)
    at_max = data == vmax
    if at_max.sum() < 2:
        return None
    for d in range(data.ndim):
        a = np.swapaxes(at_max, 0, d)
        if np.any(a[1:] & a[:-1]):
            return float(vmax)
    return None


def classify_beads(positions, shape, r, *, image=None, saturation: float | None = None,
                   r_ext_factor: float = R_EXT_FACTOR) -> np.ndarray:
    """Why each detection is rejected (App. A-b): ``""`` (kept), ``"border"``, ``"saturated"``,
    ``"hot_pixel"`` or ``"crowded"``, in that priority.

    * border: the patch (half side ``ceil(r_ext)``, ``r_ext = 1.2 r``) does not fit in the image;
    * saturated: a pixel within 2 pixels of the detection reaches :func:`saturation_level`
      (needs ``image``);
    * hot_pixel: one bright pixel, not a PSF (:func:`hot_pixels`; needs ``image``);
    * crowded: another detection (not a hot pixel) closer than ``2 r``.

    Returns
    -------
    ndarray of str (N,)
    """
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    pos = as_positions(positions, nd)
    rv = radius_vector(r, nd)
    half = patch_half_size(rv, nd, r_ext_factor=r_ext_factor)
    reason = np.full(len(pos), "", dtype=object)
    if len(pos) == 0:
        return reason.astype(str)
    ci = np.rint(pos).astype(np.int64)
    border = ~np.all((ci >= half) & (ci <= np.asarray(shape) - 1 - half), axis=1)
    saturated = np.zeros(len(pos), dtype=bool)
    hot = np.zeros(len(pos), dtype=bool)
    if image is not None:
        data = image.values if isinstance(image, xr.DataArray) else np.asarray(image)
        level = saturation_level(data, saturation)
        if level is not None:
            core = _gather(data, ci, 2)
            saturated = core.reshape(len(pos), -1).max(axis=1) >= level
        hot = hot_pixels(data, ci) & ~saturated
    crowded = np.zeros(len(pos), dtype=bool)
    real = np.flatnonzero(~hot)  # one bright pixel crowds no bead
    if len(real) > 1:
        pairs = cKDTree(pos[real] / rv).query_pairs(2.0 - 1e-9, output_type="ndarray")
        if len(pairs):
            crowded[real[pairs.ravel()]] = True
    reason[crowded] = "crowded"
    reason[hot] = "hot_pixel"
    reason[saturated] = "saturated"
    reason[border] = "border"
    return reason.astype(str)


def hot_pixels(image, centres, *, ratio: float = HOT_PIXEL_RATIO) -> np.ndarray:
    """Detections that are one bright pixel (:data:`HOT_PIXEL_RATIO`).

    Parameters
    ----------
    image : ndarray ([z,] y, x)
    centres : ndarray (N, ndim) of int
        Detections, rounded to pixels.

    Returns
    -------
    ndarray bool (N,)
    """
    data = np.asarray(image)
    nd = data.ndim
    ci = np.asarray(centres, dtype=np.int64)
    if len(ci) == 0:
        return np.zeros(0, dtype=bool)
    win = _gather(data.astype(np.float64, copy=False), ci, 3).reshape((len(ci),) + (7,) * nd)
    edge = np.ones((7,) * nd, dtype=bool)
    edge[(slice(1, -1),) * nd] = False
    background = np.median(win[:, edge], axis=1)
    centre = win[(slice(None),) + (3,) * nd] - background
    faces = []
    for d in range(nd):
        for step in (-1, 1):
            idx = [3] * nd
            idx[d] += step
            faces.append(win[(slice(None), *idx)])
    neighbour = np.max(np.stack(faces, axis=1), axis=1) - background
    return (centre > 0) & (neighbour < ratio * centre)


def reject_beads(positions, shape, r, *, image=None, saturation: float | None = None,
                 r_ext_factor: float = R_EXT_FACTOR) -> tuple[np.ndarray, dict]:
    """Keep isolated, unsaturated beads whose patch fits in the image (paper App. A-b).

    Parameters
    ----------
    positions : array_like (N, ndim)
    shape : tuple
        Image shape.
    r : float or sequence
        PSF radius bound, pixels.
    image : array_like, optional
        The raw image (its own dtype), to find saturated beads.
    saturation : float, optional
        Saturation level; see :func:`saturation_level`.

    Returns
    -------
    keep : ndarray bool (N,)
    counts : dict
        Number of rejected detections per reason ``{"border", "saturated", "crowded"}``.
    """
    reason = classify_beads(positions, shape, r, image=image, saturation=saturation,
                            r_ext_factor=r_ext_factor)
    counts = {k: int(np.sum(reason == k)) for k in REJECTION_REASONS}
    return reason == "", counts


# --------------------------------------------------------------------------------------------
# A-c: sub-pixel centring
# --------------------------------------------------------------------------------------------
def _einsum_weighted(vals: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """``sum_k vals[m, k0, k1, ...] * w0[m, k0] * w1[m, k1] ...`` -> (M,)."""
    letters = "abc"[: len(weights)]
    spec = "m" + letters + "," + ",".join("m" + a for a in letters) + "->m"
    return np.einsum(spec, vals, *weights, optimize=True)


def center_beads(image, positions, r=None, *, sigma=None, max_iter: int = 50,
                 tol: float = 1e-4) -> np.ndarray:
    """Sub-pixel bead centres: maxima of the correlation with a continuous Gaussian (App. A-c).

    The correlation ``c(t) = sum_p (u(p) - b) G_sigma(p - t)`` is maximal where
    ``t = sum_p (u(p) - b) G(p - t) p / sum_p (u(p) - b) G(p - t)``; this fixed point (a
    Gaussian mean shift, monotone in ``c``) is iterated for all beads at once from the
    detections. ``b`` is the median of each window's border (the local background), so a
    sloped background does not pull the centre.

    Parameters
    ----------
    image : array_like or DataArray, (y, x) or (z, y, x)
    positions : array_like (M, ndim)
        Initial positions (detections).
    r : float or sequence, optional
        PSF radius; the default Gaussian width is ``max(1, r / 4)``.
    sigma : float or sequence, optional
        Width of the Gaussian (pixels); overrides the default from ``r`` (1.5 without ``r``).

    Returns
    -------
    ndarray float64 (M, ndim)
        Sub-pixel centres, pixel units. A centre moving more than ``2 sigma`` from its
        detection (no clear maximum) keeps its detection.
    """
    img = as_image_array(image)
    nd = img.ndim
    pos = as_positions(positions, nd)
    if sigma is not None:
        sig = _sigma_vector(sigma, nd)
    elif r is not None:
        sig = np.maximum(1.0, radius_vector(r, nd) / 4.0)
    else:
        sig = np.full(nd, 1.5)
    if len(pos) == 0:
        return pos.copy()
    half = np.ceil(3 * sig).astype(np.int64) + 2
    ci = np.rint(pos).astype(np.int64)
    win = _gather(img, ci, half).astype(np.float64)
    border = normalised_radius(half, half.astype(np.float64)) >= 1.0
    bg = np.median(win.reshape(len(pos), -1)[:, border.ravel()], axis=1)
    vals = win - bg.reshape((-1,) + (1,) * nd)
    grids = offset_grids(half)
    t = pos - ci
    for _ in range(max_iter):
        g = [np.exp(-0.5 * ((k[None, :] - t[:, d, None]) / sig[d]) ** 2) for d, k in enumerate(grids)]
        s0 = _einsum_weighted(vals, g)
        new = np.empty_like(t)
        for d, k in enumerate(grids):
            gd = list(g)
            gd[d] = g[d] * k[None, :]
            new[:, d] = _einsum_weighted(vals, gd) / np.where(s0 > 0, s0, 1.0)
        new[s0 <= 0] = t[s0 <= 0]
        step = np.max(np.abs(new - t))
        t = new
        if step < tol:
            break
    lost = np.any(np.abs(t - (pos - ci)) > 2 * sig, axis=1)
    t[lost] = (pos - ci)[lost]
    return ci + t


# --------------------------------------------------------------------------------------------
# A-c: patches by bicubic re-sampling
# --------------------------------------------------------------------------------------------
def _bspline_matrices(frac: np.ndarray, half: int, whalf: int) -> np.ndarray:
    """Cubic B-spline interpolation matrices ``(M, 2 half + 1, 2 whalf + 1)``: row k samples
    window position ``whalf + frac + k`` from B-spline coefficients on the window grid."""
    m = len(frac)
    k = np.arange(-half, half + 1)
    x = whalf + frac[:, None] + k[None, :]
    fl = np.floor(x)
    t = (x - fl)[:, :1]  # same fraction for every k of a bead
    w = np.stack([(1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6,
                  (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6], axis=-1)  # (M, 1, 4)
    cols = fl.astype(np.int64)[:, :, None] - 1 + np.arange(4)[None, None, :]  # (M, P, 4)
    a = np.zeros((m, k.size, 2 * whalf + 1))
    mi = np.broadcast_to(np.arange(m)[:, None, None], cols.shape)
    pi = np.broadcast_to(np.arange(k.size)[None, :, None], cols.shape)
    np.add.at(a, (mi, pi, np.clip(cols, 0, 2 * whalf)), np.broadcast_to(w, cols.shape))
    return a


def extract_patches(image, positions, r, *, half_size=None,
                    r_ext_factor: float = R_EXT_FACTOR) -> xr.DataArray:
    """Re-sample a patch around each sub-pixel centre by cubic B-spline interpolation (App. A-c).

    Each patch's samples all share the bead's sub-pixel shift, so the interpolation is
    separable: the gathered windows are prefiltered into B-spline coefficients along each axis
    (``scipy.ndimage.spline_filter1d``, vectorised over beads) and multiplied by one small
    4-tap interpolation matrix per bead and axis (batched matrix products). This is what
    ``scipy.ndimage.map_coordinates(order=3)`` computes, without a prefilter of the whole image.

    Parameters
    ----------
    image : array_like or DataArray, (y, x) or (z, y, x)
    positions : array_like (M, ndim)
        Sub-pixel centres (:func:`center_beads`).
    r : float or sequence
        PSF radius bound; patches have half side ``ceil(1.2 r)`` (App. A-d).
    half_size : int or sequence, optional
        Override the half side.

    Returns
    -------
    DataArray float32, dims ("bead", "ky", "kx") or ("bead", "kz", "ky", "kx")
        Centre of each bead at index ``size // 2``; coords ``bead_y``, ``bead_x`` [``bead_z``]
        (pixel units) and kernel offsets in pixels; attrs ``psf_radius``, ``r_ext``.

    Raises
    ------
    InputError
        No positions, or bad image, radius or positions.
    """
    img = as_image_array(image)
    nd = img.ndim
    pos = as_positions(positions, nd)
    if len(pos) == 0:
        raise InputError("positions: no beads to extract patches from (0 positions)")
    rv = radius_vector(r, nd)
    half = (patch_half_size(rv, nd, r_ext_factor=r_ext_factor) if half_size is None
            else np.broadcast_to(np.asarray(half_size, dtype=np.int64), (nd,)).copy())
    whalf = half + _SPLINE_MARGIN
    ci = np.rint(pos).astype(np.int64)
    frac = pos - ci
    coef = _gather(img, ci, whalf)
    for d in range(nd):
        coef = ndi.spline_filter1d(coef, order=3, axis=1 + d, mode="mirror", output=np.float32)
    out = coef
    m = len(pos)
    for d in range(nd):
        a = _bspline_matrices(frac[:, d], int(half[d]), int(whalf[d])).astype(np.float32)
        moved = np.moveaxis(out, 1 + d, -1)  # (M, ..., W_d)
        at = np.swapaxes(a, 1, 2).reshape((m,) + (1,) * (nd - 2) + a.shape[2:0:-1])
        out = np.moveaxis(moved @ at, -1, 1 + d)
    out = np.ascontiguousarray(out, dtype=np.float32)
    kdims = KERNEL_DIMS[-nd:]
    sdims = SPATIAL_DIMS[-nd:]
    coords = {"bead": np.arange(m),
              **{f"bead_{s}": ("bead", pos[:, d], {"units": "pixel"}) for d, s in enumerate(sdims)},
              **kernel_coords(tuple(2 * half + 1), None, dims=kdims)}
    return xr.DataArray(out, dims=("bead", *kdims), coords=coords, name="patches",
                        attrs={"psf_radius": rv.tolist(), "r_ext": (rv * r_ext_factor).tolist()})


# --------------------------------------------------------------------------------------------
# A-d: compact support
# --------------------------------------------------------------------------------------------
# The one bump of App. A-d, here where the patches are cut (at r_ext) and used by every step
# that weighs them: the PSF basis (pcmx.psf_basis, float64), cross-validation, identification
# and the background study (float32 by default, as the patches).
def bump_multiplier(shape, r, r_ext=None, *, dtype=np.float32) -> np.ndarray:
    """The radial multiplier of App. A-d on a kernel grid centred at ``size // 2``.

    ``m(t) = 1`` for ``t <= r``, ``0`` for ``t >= r_ext``, and
    ``exp(-1 / (1 - ((t - r) / (r_ext - r))^2) + 1)`` in between, with ``t`` the distance to
    the centre (per-axis radii: ``t / r`` is ``sqrt(sum_d (k_d / r_d)^2)``, and ``r_ext / r``
    is the mean of the per-axis ratios).

    Parameters
    ----------
    shape : tuple of int
        Kernel shape, e.g. ``patches.shape[1:]`` (odd sides; an even side has offsets
        ``-n/2 .. n/2 - 1``).
    r : float or sequence
        Radius (pixels), one number or one per axis.
    r_ext : float or sequence, optional
        Outer radius, at least ``r``. Default ``R_EXT_FACTOR * r`` (1.2 r). ``r_ext = r``
        gives the indicator of ``t <= r``.
    dtype : dtype, default float32
        Output dtype; computed in float64.

    Returns
    -------
    ndarray of ``dtype``, ``shape``

    Raises
    ------
    InputError
        A non-positive radius, or ``r_ext`` smaller than ``r``.
    """
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    rv = radius_vector(r, nd)
    ext = R_EXT_FACTOR if r_ext is None else float(np.mean(radius_vector(r_ext, nd, name="r_ext") / rv))
    if ext < 1:
        raise InputError(f"r_ext={r_ext!r} must not be smaller than r={r!r}")
    grids = np.meshgrid(*[np.arange(n) - n // 2 for n in shape], indexing="ij")
    t = np.sqrt(sum((g / rd) ** 2 for g, rd in zip(grids, rv, strict=True)))
    m = np.zeros(shape)
    m[t <= 1.0] = 1.0
    if ext > 1.0:
        mid = (t > 1.0) & (t < ext)
        s = (t[mid] - 1.0) / (ext - 1.0)
        m[mid] = np.exp(-1.0 / (1.0 - s * s) + 1.0)
    return m.astype(dtype, copy=False)


# --------------------------------------------------------------------------------------------
# A-b, for real samples: shape and contamination tests against the field's robust distribution
# --------------------------------------------------------------------------------------------
#: Reasons :func:`classify_shapes` gives, in order of priority (a bead is counted once).
SHAPE_REASONS = ("second_peak", "width", "elongated", "off_centre")
#: Fewest beads for the shape tests: fewer give no robust distribution to judge against.
MIN_SHAPE_BEADS = 8
#: Robust standard deviations beyond which a statistic is an outlier ...
SHAPE_SIGMA = 4.0
#: ... and the least excess that counts, whatever the spread: relative width, ellipticity,
#: centroid offset (pixels), second peak relative to the central one.
SHAPE_MARGINS = {"width": 0.15, "elongated": 0.10, "off_centre": 1.0, "second_peak": 0.05}


def patch_shapes(patches, r) -> dict:
    """Shape statistics of background-free bead patches, for :func:`classify_shapes`.

    Parameters
    ----------
    patches : DataArray or array (M, [kz,] ky, kx)
        Centred, background-free patches (:func:`extract_patches` then
        :func:`pcmx.background.subtract_background`).
    r : float or sequence
        PSF radius (pixels).

    Returns
    -------
    dict of ndarrays (M,) unless noted
        ``width``: RMS second-moment radius of the bumped, non-negative patch (pixels);
        ``concentration``: the share of the light within ``r`` that lies within ``0.3 r``
        (defocus spreads it: on the real wide-field stack, 0.55-0.76 in focus against
        0.16-0.42 for beads 0.6-1.8 um away from the focal plane);
        ``ellipticity``: ``1 - minor / major`` axis of its lateral ``(y, x)`` second moments;
        ``offset`` (M, ndim): its centroid minus the patch centre (pixels);
        ``second_peak``: the largest rise of a local maximum of the patch smoothed by a unit
        Gaussian, between ``r / 2`` and ``r_ext`` from the centre, above the median of its
        ring (the smoothed pixels at the same distance), relative to the smoothed central peak
        (a faint neighbour; a ring or a lobe of the PSF rises little above its ring);
        ``second_peak_snr``: that maximum in units of the smoothed noise;
        ``second_peak_offset`` (M, ndim): where it lies from the centre (pixels);
        ``noise``: the robust noise of each patch beyond ``r_ext`` (its corners);
        ``flux``: the sum of the bumped patch; ``snr``: ``flux / (noise sqrt(support))``.
    """
    data = np.asarray(getattr(patches, "values", patches), dtype=np.float64)
    m, kshape = len(data), data.shape[1:]
    nd = len(kshape)
    rv = radius_vector(r, nd)
    bump = bump_multiplier(kshape, rv, dtype=np.float64)
    rho = normalised_radius([n // 2 for n in kshape], rv)
    w = np.clip(data, 0, None) * bump
    s = w.reshape(m, -1).sum(axis=1)
    s = np.where(s > 0, s, 1.0)
    grids = np.meshgrid(*offset_grids([n // 2 for n in kshape]), indexing="ij")
    mean = np.stack([(w * g).reshape(m, -1).sum(axis=1) / s for g in grids], axis=1)
    cov = np.empty((m, nd, nd))
    for a in range(nd):
        for b in range(a, nd):
            da = grids[a][None] - mean[:, a].reshape((m,) + (1,) * nd)
            db = grids[b][None] - mean[:, b].reshape((m,) + (1,) * nd)
            cov[:, a, b] = cov[:, b, a] = (w * da * db).reshape(m, -1).sum(axis=1) / s
    width = np.sqrt(np.clip(np.trace(cov, axis1=1, axis2=2) / nd, 0, None))
    lat = np.linalg.eigvalsh(cov[:, -2:, -2:])  # ascending
    ellipticity = 1.0 - np.sqrt(np.clip(lat[:, 0], 0, None) / np.maximum(lat[:, 1], 1e-300))
    outside = bump == 0
    if outside.sum() >= 8:
        noise = _row_mad(data[:, outside])
    else:  # no corners: the whole patch's spread (an upper bound)
        noise = _row_mad(data.reshape(m, -1))
    smooth = ndi.gaussian_filter(data, sigma=(0,) + (1.0,) * nd)
    peak = smooth[(slice(None),) + tuple(n // 2 for n in kshape)]
    core = rho < 0.5
    peak = np.maximum(peak, smooth[:, core].max(axis=1))
    is_max = smooth == ndi.maximum_filter(smooth, size=(1,) + (3,) * nd)
    ring = (rho >= 0.5) & (bump > 0)
    # a maximum counts by how far it rises above the median of its own ring (the pixels at the
    # same distance from the centre): Airy rings and aberration lobes are ring-shaped or
    # repeat from bead to bead, a neighbour is a compact bump on top of them
    dist = np.rint(np.sqrt(sum(g**2 for g in np.meshgrid(
        *offset_grids([n // 2 for n in kshape]), indexing="ij")))).astype(np.int64)
    flat = smooth.reshape(m, -1)
    rings = np.stack([np.median(flat[:, dist.ravel() == k], axis=1) for k in range(int(dist.max()) + 1)],
                     axis=1)  # (M, radii): one median per integer radius, all beads at once
    above = flat - rings[:, dist.ravel()]
    ringed = np.where((is_max & ring[None]).reshape(m, -1), above, -np.inf)
    where = np.argmax(ringed, axis=1)
    cand = ringed[np.arange(m), where]
    cand = np.where(np.isfinite(cand), cand, 0.0)
    where_off = np.stack(np.unravel_index(where, kshape), axis=1) - np.array([n // 2 for n in kshape])
    # smoothing by a unit Gaussian divides white noise by sqrt(4 pi)^(nd/2)... per axis 2 sqrt(pi)
    snoise = noise / (2.0 * np.sqrt(np.pi)) ** (nd / 2)
    flux = (data * bump).reshape(m, -1).sum(axis=1)
    support = float(bump.sum())
    inner = (data * (rho <= 1.0)).reshape(m, -1).sum(axis=1)
    concentration = (data * (rho <= 0.3)).reshape(m, -1).sum(axis=1) / np.where(inner > 0, inner, np.inf)
    return {
        "width": width, "concentration": concentration, "ellipticity": ellipticity, "offset": mean,
        "second_peak": cand / np.where(peak > 0, peak, np.inf),
        "second_peak_snr": cand / np.where(snoise > 0, snoise, np.inf),
        "second_peak_offset": where_off.astype(np.float64),
        "noise": noise, "flux": flux,
        "snr": flux / np.where(noise > 0, noise * np.sqrt(support), np.inf),
    }


def _row_mad(rows: np.ndarray) -> np.ndarray:
    """:func:`pcmx.noise.robust_sigma` of each row at once (rows of a few hundred values)."""
    med = np.median(rows, axis=1, keepdims=True)
    return MAD_TO_SIGMA * np.median(np.abs(rows - med), axis=1)


def field_trend(values, positions, *, sigma: float = 2.5, iterations: int = 5) -> np.ndarray:
    """A statistic's smooth trend over the field, robust to a minority of odd beads.

    A quadratic in the positions (``1, y, x, y^2, y x, x^2`` and the same with ``z`` in 3D; a
    plane with fewer than 20 beads, a constant with fewer than 8) is fitted by least squares on
    the beads within ``sigma`` robust deviations of the median, then again on the beads within
    ``sigma`` robust deviations of the fit, ``iterations`` times.
    PSFs vary smoothly over a field (field curvature, astigmatism); beads above or below the
    focal plane of a thick sample, or with a neighbour, are scattered odd ones.

    Returns
    -------
    ndarray (M,): the trend at each bead.
    """
    v = np.asarray(values, dtype=np.float64)
    pos = np.asarray(positions, dtype=np.float64)
    m, nd = pos.shape
    span = np.ptp(pos, axis=0)
    t = (pos - pos.mean(axis=0)) / np.where(span > 0, span, 1.0)
    cols = [np.ones(m)]
    if m >= 8:
        cols += [t[:, d] for d in range(nd)]
    if m >= 20:
        cols += [t[:, a] * t[:, b] for a in range(nd) for b in range(a, nd)]
    a = np.stack(cols, axis=1)
    tiny = 1e-12 * max(float(np.abs(v).max()), 1e-300)

    def inliers(res):
        # the spread of the residuals on the quieter side of their median: odd beads lie
        # mostly on one side (wider, more elongated) and would inflate a two-sided spread
        med = np.median(res)
        spread = 1.4826 * min(np.median(med - res[res <= med]), np.median(res[res >= med] - med))
        return np.abs(res - med) <= max(sigma * spread, tiny)

    # start from the majority around the median (a least-squares start bends towards a third
    # of odd beads), then let the trend follow the field
    keep = inliers(v - np.median(v))
    fit = np.full(m, np.median(v))
    for _ in range(iterations):
        if keep.sum() < a.shape[1] + 2:
            break
        coef, *_ = np.linalg.lstsq(a[keep], v[keep], rcond=None)
        fit = a @ coef
        new = inliers(v - fit)
        if new.sum() < max(a.shape[1] + 2, m // 2) or np.array_equal(new, keep):
            break
        keep = new
    return fit


def _excess(excess: np.ndarray, margin: float, sigma: float) -> np.ndarray:
    """Beads whose ``excess`` lies ``sigma`` robust standard deviations above its median and
    ``margin`` above it. The spread is that of the values below the median: the odd beads
    lie on one side (wider, farther off centre), and would inflate a two-sided spread."""
    med = np.median(excess)
    low = excess[excess <= med]
    spread = 1.4826 * np.median(med - low)
    return excess - med > max(sigma * spread, margin)


def _shared_feature(ratio: np.ndarray, offset: np.ndarray, positions: np.ndarray,
                    candidates: np.ndarray, *, neighbours: int = 6, tolerance: float = 2.0,
                    agree: int = 1) -> np.ndarray:
    """Candidates whose second peak is a feature of the PSF there, not a neighbour: at least
    ``agree`` of their ``neighbours`` nearest beads have one at the same offset (within
    ``tolerance`` pixels) and at least half as strong (a faint neighbour at a random offset
    in the ring between r/2 and r_ext matches one of 6 beads' by chance a few % of the time). A coma or astigmatism lobe in a corner
    of the field repeats from bead to bead; a faint neighbour sits at a random offset."""
    k = min(neighbours, len(positions) - 1)
    _, idx = cKDTree(positions).query(positions, k=k + 1)
    shared = np.zeros(len(positions), dtype=bool)
    for i in np.flatnonzero(candidates):  # the candidates only: a few beads
        nb = idx[i, 1:]
        close = np.linalg.norm(offset[nb] - offset[i], axis=1) <= tolerance
        strong = ratio[nb] >= 0.5 * ratio[i]
        shared[i] = int(np.sum(close & strong)) >= agree
    return shared


def classify_shapes(shapes: dict, positions, *, sigma: float = SHAPE_SIGMA,
                    margins: dict | None = None) -> np.ndarray:
    """Why each bead's patch is not a clean PSF: ``""`` (clean) or one of :data:`SHAPE_REASONS`.

    Each statistic of :func:`patch_shapes` is judged against the field's robust distribution,
    so that a field whose PSF is broad, elongated or ringed everywhere keeps its beads and
    only the odd ones go:

    * ``second_peak``: a local maximum away from the core, relative to the central peak,
      ``sigma`` robust deviations and ``margins["second_peak"]`` above the beads' median and
      above 5 times the smoothed noise, unless nearby beads have the same one (a lobe of the
      PSF there): a faint neighbour no detector saw;
    * ``width``: the concentration of the light (:func:`patch_shapes`; it falls as the PSF
      widens) relative to its smooth trend over the field (:func:`field_trend`: the PSF may
      vary over the field), ``sigma`` robust deviations and 15% below or above it (a bead
      above or below the focal plane of a thick sample, two merged beads, a hot pixel);
    * ``elongated``: the ellipticity, likewise relative to its trend, 0.1 above;
    * ``off_centre``: the distance of the centroid from the beads' median offset (a PSF with
      coma has a consistent one), 1 px and ``sigma`` robust deviations above the median
      distance (light of a neighbour pulling the centroid).

    With fewer than :data:`MIN_SHAPE_BEADS` beads there is no distribution: every bead is kept.

    Returns
    -------
    ndarray of str (M,)
    """
    pos = np.asarray(positions, dtype=np.float64)
    m = len(pos)
    out = np.full(m, "", dtype=object)
    if m < MIN_SHAPE_BEADS:
        return out.astype(str)
    marg = {**SHAPE_MARGINS, **(margins or {})}
    log_conc = np.log(np.maximum(shapes["concentration"], 1e-12))
    rel_width = field_trend(log_conc, pos) - log_conc  # > 0: wider than the field
    ell = shapes["ellipticity"]
    rel_ell = ell - field_trend(ell, pos)
    off = shapes["offset"]
    dist = np.linalg.norm(off - np.median(off, axis=0), axis=1)
    second = _excess(shapes["second_peak"], marg["second_peak"], sigma) & (shapes["second_peak_snr"] > 5.0)
    if second.any() and "second_peak_offset" in shapes:
        second &= ~_shared_feature(shapes["second_peak"], shapes["second_peak_offset"], pos, second)
    tests = {
        "second_peak": second,
        "width": _excess(rel_width, np.log1p(marg["width"]), sigma)
        | _excess(-rel_width, -np.log1p(-marg["width"]), sigma),
        "elongated": _excess(rel_ell, marg["elongated"], sigma),
        "off_centre": _excess(dist, marg["off_centre"], sigma),
    }
    for reason in reversed(SHAPE_REASONS):  # the first reason wins
        out[tests[reason]] = reason
    return out.astype(str)
