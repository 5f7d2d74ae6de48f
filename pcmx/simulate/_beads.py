"""simulate_beads: micro-bead acquisitions with exact ground truth (paper III-A-1)."""

from __future__ import annotations

import numbers

import numpy as np
import xarray as xr

from ..errors import InputError
from ..provenance import provenance
from ..units import parse_length, spatial_coords
from ._model import FieldModel, parse_states, random_field
from ._psf import Optics
from ._render import auto_min_separation, render_emitters
from ._scene import camera, lognormal_brightness, sample_positions, smooth_background

__all__ = ["simulate_beads", "optics_from", "check_shape", "pixels", "positive", "seed_streams"]


def check_shape(shape, *, ndims=(2, 3)) -> tuple:
    """Validate an image shape: 2 or 3 positive integers."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise InputError(f"shape={shape!r} must be (ny, nx) or (nz, ny, nx)") from None
    if len(dims) not in ndims or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in dims):
        raise InputError(f"shape={shape!r} must be {' or '.join(f'{n} integers' for n in ndims)}")
    if any(s <= 0 for s in dims):
        raise InputError(f"shape={shape!r} must have positive sizes")
    return tuple(int(s) for s in dims)


def pixels(value, pixel_size_um: float | None, name: str) -> float:
    """A distance in pixels: a number is pixels, a string or Quantity is a length."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not np.isfinite(value) or value < 0:
            raise InputError(f"{name}={value!r} must be a non-negative number of pixels or a length")
        return float(value)
    if pixel_size_um is None:
        raise InputError(f"{name}={value!r} is a length but the pixel size is unknown; "
                         "give a number of pixels")
    return parse_length(value, name=name) / pixel_size_um


def positive(value, name: str, *, allow_zero: bool = False) -> float:
    """``value`` as a float, checked finite and positive (non-negative with ``allow_zero``).

    Raises
    ------
    InputError
        A bool, a non-number, NaN, infinity or a value out of range; the message names
        ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise InputError(f"{name}={value!r} must be a {kind} finite number")
    return float(value)


def optics_from(pixel_size, na, wavelength, n_immersion, z_step="200nm",
                supersample=None) -> Optics:
    """An :class:`Optics` from user parameters (lengths as ``"65nm"`` or Quantities)."""
    return Optics(
        pixel_size=parse_length(pixel_size, name="pixel_size"),
        na=positive(na, "na"),
        wavelength=parse_length(wavelength, name="wavelength"),
        n_immersion=positive(n_immersion, "n_immersion"),
        z_step=parse_length(z_step, name="z_step"),
        supersample=supersample,
    )


def seed_streams(seed, names) -> tuple[dict, str]:
    """Independent generators per purpose (changing the noise never moves the beads).

    Returns the generators and the seed's entropy as a string (``seed=None`` draws fresh
    entropy; ``np.random.SeedSequence(int(entropy))`` replays it).
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or seed < 0):
        raise InputError(f"seed={seed!r} must be a non-negative integer or None")
    ss = np.random.SeedSequence(seed)
    children = ss.spawn(len(names))
    return {n: np.random.default_rng(c) for n, c in zip(names, children, strict=True)}, str(ss.entropy)


def simulate_beads(
    shape=(512, 512),
    n_beads: int = 150,
    *,
    states=None,
    pixel_size="65nm",
    na: float = 1.49,
    wavelength="670nm",
    n_immersion: float = 1.518,
    z_step="200nm",
    aberrations: dict | None = None,
    aberration_strength: float = 1.0,
    photons: float = 10_000.0,
    photon_spread: float = 0.3,
    min_separation=None,
    margin=0.0,
    grid: bool = False,
    background_level: float = 50.0,
    background_variation: float = 0.3,
    background_scale=None,
    gain: float = 2.0,
    offset: float = 100.0,
    read_noise: float = 1.5,
    saturation: int = 65535,
    noise: bool = True,
    patch_size: int | None = None,
    supersample: int | None = None,
    seed=0,
) -> xr.Dataset:
    """Simulate images of micro-beads through a space-varying microscope (paper III-A-1).

    Each bead is rendered with its own exact PSF (scalar pupil model, eq. (6)-(7)) evaluated at
    its own sub-pixel position, never through a product-convolution, so estimators are tested
    against a model they do not share.

    Parameters
    ----------
    shape : (ny, nx) or (nz, ny, nx)
        Image shape; three values give z-stacks of beads spread through a volume.
    n_beads : int
        Number of beads.
    states : None, int or list of dict
        None: one acquisition, image dims ``("y", "x")``. An int K: K random acquisitions under
        varying conditions; a list of dicts: one acquisition per dict with keys ``defocus``
        (length, e.g. ``"300nm"``, or micrometers), ``tilt`` (pair of lengths: focal-plane
        shift at the bottom and right edges), ``aberration_scale`` (factor on the aberration
        polynomials) and ``zernike`` ({noll: waves} added everywhere). Both give image dims
        ``("state", "y", "x")``. All states image the same beads.
    pixel_size, wavelength, z_step : str or pint.Quantity
        Object-plane pixel size, emission wavelength, axial step of z-stacks.
    na, n_immersion : float
        Numerical aperture and immersion refractive index (``na < n_immersion``).
    aberrations : dict, optional
        The field model: ``{"defocus": poly, j: poly, ...}`` with ``j`` a Noll index and each
        ``poly`` 1, 3, 6 or 10 coefficients over the monomials ``1, u, v, u^2, uv, v^2, ...``
        of the normalised field coordinates (see ``pcmx.simulate`` docs); defocus in
        micrometers, Zernike terms in waves RMS. ``{}`` gives an ideal in-focus microscope.
        None (default) draws a plausible random field from ``seed``.
    aberration_strength : float
        Scale of the random field model (ignored when ``aberrations`` is given).
    photons, photon_spread : float
        Median photons per bead and the log-normal spread of bead brightness.
    min_separation : float or length, optional
        Minimum distance between beads (pixels if a number). Default four Airy FWHMs.
    margin : float or length
        Keep bead centres this far from the image borders.
    grid : bool
        Beads on a regular lattice (random sub-pixel offsets) instead of at random.
    background_level, background_variation, background_scale
        Mean background (photons / pixel), relative amplitude of its smooth variations, their
        correlation length (pixels or a length; default a quarter of the field).
    gain, offset, read_noise, saturation
        Camera: ADU per photo-electron, ADU offset, read noise (electrons RMS), clipping level.
    noise : bool
        Apply the camera (Poisson shot noise, read noise, gain, offset, uint16 clipping). False
        returns the expected photon counts (float32).
    patch_size : int, optional
        Side of the rendered PSF patches; by default chosen per bead from its defocus.
    supersample : int, optional
        Supersampling of the intensity before pixel integration (default: alias-free minimum).
    seed : int, optional
        Seeds every random draw (field model, states, positions, brightness, background, noise
        from independent streams).

    Returns
    -------
    Dataset
        ``image`` (uint16 ADU, or float32 photons if ``noise=False``), ``background`` (float32
        photons, same dims), ``bead_y``, ``bead_x`` [, ``bead_z``] (dim ``bead``, pixel units),
        ``amplitude`` (photons per bead); physical coordinates; ``attrs`` with
        ``pcmx_type="simulation"``, provenance, and ``optics``, ``field_model``, ``states``,
        ``camera``, ``scene`` from which :func:`true_psf` recomputes any exact PSF.

    Raises
    ------
    InputError
        Bad shape, ``na >= n_immersion``, non-positive lengths, or beads that cannot fit at
        ``min_separation``.
    """
    shape = check_shape(shape)
    if isinstance(n_beads, bool) or not isinstance(n_beads, numbers.Integral) or n_beads < 0:
        raise InputError(f"n_beads={n_beads!r} must be a non-negative integer")
    optics = optics_from(pixel_size, na, wavelength, n_immersion, z_step, supersample)
    positive(photons, "photons", allow_zero=True)
    positive(photon_spread, "photon_spread", allow_zero=True)
    positive(background_level, "background_level", allow_zero=True)
    positive(background_variation, "background_variation", allow_zero=True)
    positive(gain, "gain")
    positive(offset, "offset", allow_zero=True)
    positive(read_noise, "read_noise", allow_zero=True)
    positive(aberration_strength, "aberration_strength", allow_zero=True)
    if isinstance(saturation, bool) or not isinstance(saturation, numbers.Integral) \
            or not 0 < saturation <= 65535:
        raise InputError(f"saturation={saturation!r} must be an integer in 1..65535 (uint16)")
    if patch_size is not None and (isinstance(patch_size, bool) or not isinstance(patch_size, numbers.Integral)
                                   or patch_size < 1 or patch_size % 2 == 0):
        raise InputError(f"patch_size={patch_size!r} must be a positive odd integer")
    p = optics.pixel_size
    sep = auto_min_separation(optics) if min_separation is None else \
        pixels(min_separation, p, "min_separation")
    margin_px = pixels(margin, p, "margin")
    bg_scale = max(shape[-2:]) / 4.0 if background_scale is None else \
        pixels(background_scale, p, "background_scale")
    if bg_scale <= 0:
        raise InputError(f"background_scale={background_scale!r} must be positive")

    rng, entropy = seed_streams(seed, ("field", "states", "positions", "brightness",
                                       "background", "noise"))
    lateral = shape[-2:]
    if aberrations is None:
        fm = random_field(lateral, rng["field"], aberration_strength)
    else:
        fm = FieldModel.from_user(lateral, aberrations)
    state_list, has_state = parse_states(states, rng["states"])

    by, bx = sample_positions(rng["positions"], lateral, int(n_beads), min_separation=sep,
                              margin=margin_px, grid=grid)
    bz = rng["positions"].uniform(0, shape[0] - 1, by.size) if len(shape) == 3 else None
    amp = lognormal_brightness(rng["brightness"], by.size, photons, photon_spread)

    images, backgrounds = [], []
    for st in state_list:
        beads = render_emitters(optics, fm, st, by, bx, amp, shape, z=bz, patch_size=patch_size)
        bg = smooth_background(rng["background"], lateral, level=background_level,
                               variation=background_variation, scale=bg_scale)
        bg = np.broadcast_to(bg, shape)
        expected = (beads + bg).astype(np.float32)
        if noise:
            img = camera(rng["noise"], expected, gain=gain, offset=offset,
                         read_noise=read_noise, saturation=int(saturation))
        else:
            img = expected
        images.append(img)
        backgrounds.append(np.ascontiguousarray(bg, dtype=np.float32))

    spatial = ("z", "y", "x")[-len(shape):]
    pix = (optics.z_step, p, p)[-len(shape):]
    coords = dict(spatial_coords(shape, pix, dims=spatial))
    dims = spatial
    image = images[0]
    background = backgrounds[0]
    if has_state:
        dims = ("state", *spatial)
        image = np.stack(images)
        background = np.stack(backgrounds)
        coords["state"] = np.arange(len(state_list))
    coords["bead"] = np.arange(by.size)
    img_attrs = ({"long_name": "camera counts", "unit_name": "ADU"} if noise
                 else {"long_name": "expected photons", "unit_name": "photon"})
    data = {
        "image": (dims, image, img_attrs),
        "background": (dims, background,
                       {"long_name": "expected background photons", "unit_name": "photon"}),
        "bead_y": ("bead", by, {"units": "pixel", "long_name": "bead centre row (sub-pixel)"}),
        "bead_x": ("bead", bx, {"units": "pixel", "long_name": "bead centre column (sub-pixel)"}),
        "amplitude": ("bead", amp, {"long_name": "photons per bead", "unit_name": "photon"}),
    }
    if bz is not None:
        data["bead_z"] = ("bead", bz, {"units": "pixel", "long_name": "bead plane (sub-plane)"})
    params = {
        "shape": list(shape), "n_beads": int(n_beads), "states": states,
        "pixel_size": str(pixel_size), "na": na, "wavelength": str(wavelength),
        "n_immersion": n_immersion, "z_step": str(z_step), "aberrations": aberrations,
        "aberration_strength": aberration_strength, "photons": photons,
        "photon_spread": photon_spread, "min_separation": min_separation, "margin": margin,
        "grid": grid, "background_level": background_level,
        "background_variation": background_variation, "background_scale": background_scale,
        "gain": gain, "offset": offset, "read_noise": read_noise, "saturation": saturation,
        "noise": noise, "patch_size": patch_size, "supersample": supersample, "seed": seed,
    }
    attrs = {
        "pcmx_type": "simulation",
        **provenance(params),
        "simulation": "beads",
        "seed_entropy": entropy,
        "optics": optics.to_attrs(),
        "field_model": fm.to_attrs(),
        "states": [s.to_attrs() for s in state_list],
        "has_state_dim": bool(has_state),
        "camera": {"gain_adu_per_electron": float(gain), "offset_adu": float(offset),
                   "read_noise_electrons": float(read_noise), "saturation_adu": int(saturation),
                   "applied": bool(noise)},
        "scene": {"patch_size": None if patch_size is None else int(patch_size),
                  "min_separation_px": float(sep), "margin_px": float(margin_px),
                  "grid": bool(grid), "photons_median": float(photons),
                  "photon_spread": float(photon_spread),
                  "background_level": float(background_level),
                  "background_variation": float(background_variation),
                  "background_scale_px": float(bg_scale)},
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)
