"""simulate_point_sources: sparse emitters on filaments over a smooth background (paper Fig. 6-7)."""

from __future__ import annotations

import numbers

import numpy as np
import xarray as xr

from ..errors import InputError
from ..provenance import provenance
from ..units import pixel_size, spatial_coords
from ._beads import check_shape, optics_from, pixels, positive, seed_streams
from ._model import FieldModel, State, random_field
from ._render import render_emitters
from ._scene import lognormal_brightness, scatter_patches, smooth_background
from ._truth import simulation_model

__all__ = ["simulate_point_sources"]

_MODEL_KEYS = ("pixel_size", "na", "wavelength", "n_immersion", "aberrations",
               "aberration_strength", "supersample", "z_step")


def _filaments(rng, ny, nx, n_filaments, persistence):
    """Smooth random curves (worm-like chains, 0.5-pixel steps), arrays (n_filaments, L)."""
    length = int(2 * 0.6 * max(ny, nx))
    y0 = rng.uniform(0, ny - 1, n_filaments)
    x0 = rng.uniform(0, nx - 1, n_filaments)
    theta0 = rng.uniform(0, 2 * np.pi, n_filaments)
    # angle random walk: tangent correlation decays over ``persistence`` pixels
    dtheta = rng.normal(0.0, np.sqrt(0.5 / persistence), (n_filaments, length))
    theta = theta0[:, None] + np.cumsum(dtheta, axis=1)
    # a filament runs both ways from its seed point: centre the path on it
    ys = np.cumsum(0.5 * np.sin(theta), axis=1)
    xs = np.cumsum(0.5 * np.cos(theta), axis=1)
    ys += y0[:, None] - ys[:, length // 2:length // 2 + 1]
    xs += x0[:, None] - xs[:, length // 2:length // 2 + 1]
    return ys, xs, theta


def _resolve_model(operator, rng, lateral, model_kw):
    """(optics, field model, state) or (None, operator Dataset, None)."""
    if operator is None or isinstance(operator, dict):
        kw = {**model_kw, **(operator or {})}
        unknown = set(kw) - set(_MODEL_KEYS)
        if unknown:
            raise InputError(f"operator parameters {sorted(unknown)} are unknown; "
                             f"expected some of {_MODEL_KEYS}")
        optics = optics_from(kw.get("pixel_size", "65nm"), kw.get("na", 1.49),
                             kw.get("wavelength", "670nm"), kw.get("n_immersion", 1.518),
                             kw.get("z_step", "200nm"), kw.get("supersample"))
        if kw.get("aberrations") is None:
            fm = random_field(lateral, rng, positive(kw.get("aberration_strength", 1.0),
                                                      "aberration_strength", allow_zero=True))
        else:
            fm = FieldModel.from_user(lateral, kw["aberrations"])
        return optics, fm, State()
    if isinstance(operator, xr.Dataset) and operator.attrs.get("pcmx_type") == "simulation":
        optics, fm, states, shape = simulation_model(operator)
        if tuple(shape[-2:]) != tuple(lateral):
            # the field polynomials are in normalised coordinates: rescale to this image
            fm = FieldModel(shape=tuple(lateral), defocus=fm.defocus, zernike=fm.zernike)
        return optics, fm, states[0]
    if isinstance(operator, xr.Dataset) and operator.attrs.get("pcmx_type") == "operator":
        if "kz" in operator.dims:
            raise InputError("operator is 3D; simulate_point_sources renders 2D images")
        shape = (operator.sizes["y"], operator.sizes["x"])
        if shape != tuple(lateral):
            raise InputError(f"operator covers {shape[0]} x {shape[1]} pixels but "
                             f"shape={tuple(lateral)}")
        return None, operator, None
    raise InputError("operator must be None, a dict of optics/aberration parameters, a "
                     "simulation Dataset or an operator Dataset")


def _render_with_operator(op: xr.Dataset, iy, ix, amp, shape) -> np.ndarray:
    """Product-convolution rendering of on-grid sources: PSF = sum_i alpha_i[p] h_i."""
    basis = np.asarray(op["psf_basis"].values, dtype=np.float64)
    coeff = np.asarray(op["coefficients"].values[:, iy, ix], dtype=np.float64)  # (I, n)
    patches = np.einsum("in,iyx->nyx", coeff, basis)
    out = np.zeros(shape, dtype=np.float64)
    scatter_patches(out, patches, iy, ix, weights=amp)
    return out


def simulate_point_sources(
    shape=(256, 256),
    *,
    n_sources: int = 300,
    n_filaments: int | None = None,
    pairs_closer_than_psf: int = 10,
    photons: float = 2000.0,
    photon_spread: float = 0.3,
    background: float = 30.0,
    background_variation: float = 0.5,
    background_scale=None,
    persistence=None,
    operator=None,
    noise: bool = True,
    seed=0,
    **model,
) -> xr.Dataset:
    """Point sources along filament-like curves over a smooth auto-fluorescent background,
    blurred by a space-varying microscope, with Poisson noise (paper III-C, Fig. 6-7).

    The test scene of Sparse+Smooth deblurring: a sparse component (the sources) plus a
    smooth one (the background).

    Parameters
    ----------
    shape : (ny, nx)
    n_sources : int
        Number of sources along the filaments (including both members of the close pairs).
    n_filaments : int, optional
        Number of curves (default ``max(2, n_sources // 40)``).
    pairs_closer_than_psf : int
        Number of sources given a partner closer than the in-focus PSF's FWHM (between 0.5
        and 1 FWHM, along the filament): the resolution test.
    photons, photon_spread : float
        Median photons per source and log-normal spread.
    background, background_variation, background_scale
        Mean background (photons / pixel), relative amplitude and correlation length (pixels
        or a length; default a third of the field) of its smooth variations. The background is
        smooth on the PSF's scale, so it is added unblurred.
    persistence : float or length, optional
        Persistence length of the filaments (pixels; default a quarter of the field).
    operator : None, dict, simulation Dataset or operator Dataset
        The blur. None: the exact scalar pupil model with a random field drawn from ``seed``
        (each source rendered with its own PSF at its own sub-pixel position, as in
        :func:`simulate_beads`); a dict: the same with these optics/aberrations (keys
        ``pixel_size``, ``na``, ``wavelength``, ``n_immersion``, ``aberrations``,
        ``aberration_strength``, ``supersample``); a simulation Dataset: its model (state 0);
        an operator Dataset: product-convolution with it (sources then sit on pixel centres).
    noise : bool
        Poisson noise on the photon counts (float32 either way).
    seed : int, optional
    **model
        Same keys as a dict ``operator`` (e.g. ``pixel_size="65nm"``).

    Returns
    -------
    Dataset
        ``image`` (noisy photons), ``clean`` (expected photons), ``background``, ``sources``
        (amplitudes deposited at the nearest pixels: the sparse truth on the grid), all
        ``("y", "x")`` float32; ``source_y``, ``source_x``, ``amplitude``, ``filament``,
        ``partner`` (index of the close partner or -1) over dim ``source``. With a model blur
        the attrs hold ``optics``/``field_model``/``states`` so :func:`true_psf` works on it.
    """
    shape = check_shape(shape, ndims=(2,))
    for name, value in (("n_sources", n_sources), ("pairs_closer_than_psf", pairs_closer_than_psf)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise InputError(f"{name}={value!r} must be a non-negative integer")
    if pairs_closer_than_psf * 2 > n_sources:
        raise InputError(f"pairs_closer_than_psf={pairs_closer_than_psf} pairs need "
                         f"{2 * pairs_closer_than_psf} sources but n_sources={n_sources}")
    if n_filaments is None:
        n_filaments = max(2, n_sources // 40)
    if isinstance(n_filaments, bool) or not isinstance(n_filaments, numbers.Integral) or n_filaments < 1:
        raise InputError(f"n_filaments={n_filaments!r} must be a positive integer")
    positive(photons, "photons", allow_zero=True)
    positive(photon_spread, "photon_spread", allow_zero=True)
    positive(background, "background", allow_zero=True)
    positive(background_variation, "background_variation", allow_zero=True)
    ny, nx = shape
    rng, entropy = seed_streams(seed, ("field", "filaments", "sources", "brightness",
                                       "background", "noise"))
    optics, fm, state = _resolve_model(operator, rng["field"], shape, model)
    p = optics.pixel_size if optics is not None else pixel_size(fm, "y")
    fwhm_px = (optics.airy_fwhm / p) if optics is not None else _operator_fwhm(fm)
    pers = max(ny, nx) / 4.0 if persistence is None else pixels(persistence, p, "persistence")
    if pers <= 0:
        raise InputError(f"persistence={persistence!r} must be positive")
    bg_scale = max(ny, nx) / 3.0 if background_scale is None else \
        pixels(background_scale, p, "background_scale")

    # sources: random arc positions on the filaments, kept inside the image
    fy, fx, ftheta = _filaments(rng["filaments"], ny, nx, int(n_filaments), pers)
    inside = (fy >= 0) & (fy <= ny - 1) & (fx >= 0) & (fx <= nx - 1)
    if not inside.any():  # pragma: no cover - a filament always starts inside
        raise InputError("no filament crosses the image")
    cand = np.flatnonzero(inside.ravel())
    n_single = n_sources - 2 * pairs_closer_than_psf
    n_seed = n_single + pairs_closer_than_psf
    pick = rng["sources"].choice(cand, size=n_seed, replace=cand.size < n_seed)
    sy, sx, st = fy.ravel()[pick], fx.ravel()[pick], ftheta.ravel()[pick]
    fil = pick // fy.shape[1]
    partner = np.full(n_sources, -1, dtype=np.int64)
    if pairs_closer_than_psf:
        k = pairs_closer_than_psf
        first = np.arange(n_single, n_seed)
        d = rng["sources"].uniform(0.5, 1.0, k) * fwhm_px
        py = np.clip(sy[first] + d * np.sin(st[first]), 0, ny - 1)
        px = np.clip(sx[first] + d * np.cos(st[first]), 0, nx - 1)
        second = np.arange(n_seed, n_sources)
        sy, sx = np.concatenate([sy, py]), np.concatenate([sx, px])
        fil = np.concatenate([fil, fil[first]])
        partner[first], partner[second] = second, first
    amp = lognormal_brightness(rng["brightness"], n_sources, photons, photon_spread)
    if optics is None:
        sy, sx = np.rint(sy), np.rint(sx)
        iy, ix = sy.astype(np.int64), sx.astype(np.int64)
        blurred = _render_with_operator(fm, iy, ix, amp, shape)
    else:
        iy, ix = np.rint(sy).astype(np.int64), np.rint(sx).astype(np.int64)
        blurred = render_emitters(optics, fm, state, sy, sx, amp, shape)
    bg = smooth_background(rng["background"], shape, level=background,
                           variation=background_variation, scale=bg_scale)
    clean = (blurred + bg).astype(np.float32)
    image = rng["noise"].poisson(clean).astype(np.float32) if noise else clean.copy()
    sources = np.zeros(shape, dtype=np.float64)
    np.add.at(sources, (iy, ix), amp)

    coords = {**spatial_coords(shape, p), "source": np.arange(n_sources)}
    data = {
        "image": (("y", "x"), image, {"long_name": "photon counts" + (" (Poisson)" if noise else "")}),
        "clean": (("y", "x"), clean, {"long_name": "expected photons"}),
        "background": (("y", "x"), bg, {"long_name": "smooth background photons"}),
        "sources": (("y", "x"), sources.astype(np.float32),
                    {"long_name": "source photons at the nearest pixel"}),
        "source_y": ("source", sy, {"units": "pixel"}),
        "source_x": ("source", sx, {"units": "pixel"}),
        "amplitude": ("source", amp, {"long_name": "photons per source"}),
        "filament": ("source", fil.astype(np.int64)),
        "partner": ("source", partner),
    }
    params = {"shape": list(shape), "n_sources": n_sources, "n_filaments": n_filaments,
              "pairs_closer_than_psf": pairs_closer_than_psf, "photons": photons,
              "photon_spread": photon_spread, "background": background,
              "background_variation": background_variation,
              "background_scale": background_scale, "persistence": persistence,
              "operator": operator if isinstance(operator, dict) or operator is None
              else operator.attrs.get("pcmx_type"), "noise": noise, "seed": seed, **model}
    attrs = {"pcmx_type": "simulation", **provenance(params), "simulation": "point_sources",
             "seed_entropy": entropy, "pair_fwhm_px": float(fwhm_px)}
    if optics is not None:
        attrs.update({"optics": optics.to_attrs(), "field_model": fm.to_attrs(),
                      "states": [state.to_attrs()], "has_state_dim": False})
    return xr.Dataset(data, coords=coords, attrs=attrs)


def _operator_fwhm(op: xr.Dataset) -> float:
    """FWHM (pixels) of an operator's PSF at the image centre, along x."""
    cy, cx = op.sizes["y"] // 2, op.sizes["x"] // 2
    coeff = np.asarray(op["coefficients"].values[:, cy, cx], dtype=np.float64)
    psf = np.einsum("i,iyx->yx", coeff, np.asarray(op["psf_basis"].values, dtype=np.float64))
    row = psf[psf.shape[0] // 2]
    return max(1.0, float(np.count_nonzero(row >= row.max() / 2.0)))
