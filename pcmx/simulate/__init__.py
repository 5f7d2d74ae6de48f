"""Ground-truth microscopes and acquisitions: micro-beads, point sources, exact PSFs (paper III-A-1).

Every estimator in pcmx is tested on data whose true operator is known. This module renders
such data with a model the estimators do **not** share: each bead gets its own exact PSF,
computed at its own position from a scalar Fourier-optics pupil model, instead of a
product-convolution.

PSF model (paper eq. (6)-(7))
    ``h(x, z) = |F^-1[ 1_D(xi) exp(2 i pi (sum_j c_j Z_j(xi) + z sqrt(n^2/lambda^2 - |xi|^2)))] |^2``
    with ``D`` the pupil disk of radius NA/lambda, ``Z_j`` Noll-indexed Zernike polynomials
    (RMS-normalised, coefficients in waves), ``z`` the emitter's distance from the focal plane.
    A bead's sub-pixel offset is a phase ramp in the pupil; the intensity is integrated exactly
    over each pixel (supersampled alias-free, multiplied by the pixel's transfer function,
    decimated). Many PSFs are computed at once by batched FFTs (``1000`` PSFs of ``64 x 64`` in
    a fraction of a second).

Space variation and states
    Defocus (micrometers) and each Zernike coefficient are low-degree polynomials of the
    normalised field position ``u = (x - cx)/cx``, ``v = (y - cy)/cy`` (``cx = (nx-1)/2``):
    a tilted, curved focal surface, astigmatism growing towards the corners
    (``Z6 ~ u^2 - v^2``, ``Z5 ~ 2uv``), coma growing linearly (``Z8 ~ u``, ``Z7 ~ v``),
    trefoil, spherical aberration. A *state* (one of the paper's K acquisitions) adds a
    defocus offset, a focal-plane tilt, scales the aberrations (temperature-like drift) and
    adds constant Zernike offsets.

Public API
----------
``simulate_beads(shape=(512, 512), n_beads=150, *, states=None, pixel_size="65nm", na=1.49,
wavelength="670nm", n_immersion=1.518, z_step="200nm", aberrations=None,
aberration_strength=1.0, photons=10000.0, photon_spread=0.3, min_separation=None, margin=0.0,
grid=False, background_level=50.0, background_variation=0.3, background_scale=None, gain=2.0,
offset=100.0, read_noise=1.5, saturation=65535, noise=True, patch_size=None, supersample=None,
seed=0) -> xr.Dataset``
    Bead images. Variables ``image`` (dims ``("y", "x")``, ``("state", "y", "x")`` when
    ``states`` is an int or a list, ``"z"`` before ``"y"`` for a 3D ``shape``; uint16 ADU with
    ``noise=True``, float32 expected photons otherwise), ``background`` (same dims, float32
    photons), ``bead_y``, ``bead_x`` [``bead_z``] (dim ``bead``, sub-pixel positions in pixel
    units), ``amplitude`` (photons per bead). Coordinates from :func:`pcmx.units.spatial_coords`.
    ``attrs``: ``pcmx_type="simulation"``, provenance, ``optics``, ``field_model``, ``states``,
    ``camera``, ``scene``: everything needed to recompute the exact PSF anywhere.

``true_psf(sim, y=, x=, *, index=False, extrapolate=False, state=0, size=33, size_z=None, defocus=0.0) -> ndarray``
    float32 ``(size, size)`` exact PSF of a unit bead at ``(y, x)``, centred at index
    ``size // 2`` (sub-pixel offset removed), normalised to sum one over the infinite plane
    before cropping; ``(size_z, size, size)`` for 3D simulations. Positions by pcmx's one
    convention (:func:`pcmx.units.to_pixels`): micrometers, ``"27um"``, pint Quantities, or
    pixels with ``index=True``; ``true_psf(sim, 100.3, 20.7)`` (positional) takes pixels.

``true_psfs(sim, y=, x=, ...)`` or ``true_psfs(sim, ys, xs, ...)`` (pixels) -> ndarray
    Vectorised: ``(n, size, size)``.

``true_operator(sim, *, state=0, n_components=5, kernel_size=33, grid=16) -> xr.Dataset``
    The ground truth as an operator Dataset of the data model (truncated SVD of exact PSFs on
    a ``grid x grid`` lattice, coefficients interpolated bicubically to every pixel).

``simulate_point_sources(shape=(256, 256), *, n_sources=300, n_filaments=None,
pairs_closer_than_psf=10, photons=2000.0, photon_spread=0.3, background=30.0,
background_variation=0.5, background_scale=None, persistence=None, operator=None, noise=True,
seed=0, **model) -> xr.Dataset``
    Deblurring scenes: sources on filament-like curves, close pairs, smooth background,
    Poisson noise; truth ``source_y``, ``source_x``, ``amplitude``, ``background``, ``clean``.

``scalar_psfs(zernike, defocus=0.0, *, shift_y=0.0, shift_x=0.0, size=33, noll=(4, ..., 11),
pixel_size="65nm", na=1.49, wavelength="670nm", n_immersion=1.518, supersample=None)``
    The PSF engine itself for explicit parameters: ``(n, size, size)`` float32.

Lower-level pieces: :class:`Optics`, :class:`PsfEngine`, :func:`zernike`, :func:`noll_to_nm`,
:class:`FieldModel`, :class:`State`, :func:`simulation_model`.

Examples
--------
>>> from pcmx.simulate import simulate_beads, true_psf, true_operator
>>> sim = simulate_beads((256, 256), 40, states=3, seed=1)
>>> sim["image"].dims
('state', 'y', 'x')
>>> psf = true_psf(sim, 100.3, 20.7, state=2)
>>> op = true_operator(sim, state=2, n_components=4)
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ._beads import optics_from, simulate_beads
from ._model import MONOMIALS, FieldModel, State
from ._psf import DEFAULT_NOLL, Optics, PsfEngine, engine, noll_to_nm, zernike
from ._sources import simulate_point_sources
from ._truth import simulation_model, true_operator, true_psf, true_psfs

__all__ = [
    "simulate_beads",
    "simulate_point_sources",
    "true_psf",
    "true_psfs",
    "true_operator",
    "scalar_psfs",
    "simulation_model",
    "Optics",
    "PsfEngine",
    "FieldModel",
    "State",
    "MONOMIALS",
    "DEFAULT_NOLL",
    "zernike",
    "noll_to_nm",
]


def scalar_psfs(zernike_waves=None, defocus=0.0, *, shift_y=0.0, shift_x=0.0, size: int = 33,
                noll=DEFAULT_NOLL, pixel_size="65nm", na: float = 1.49, wavelength="670nm",
                n_immersion: float = 1.518, supersample: int | None = None) -> np.ndarray:
    """Pixel-integrated scalar PSFs for explicit parameters (eq. (6)-(7)).

    Parameters
    ----------
    zernike_waves : array_like (n, J) or (J,), optional
        Zernike coefficients (waves RMS) of the Noll terms ``noll``; None for none.
    defocus : float or array_like (n,)
        Distance of the emitter from the focal plane, micrometers.
    shift_y, shift_x : float or array_like (n,)
        Sub-pixel offsets of the PSF centre from index ``size // 2`` (pixels).
    size : int
        Side of the patches.

    Returns
    -------
    ndarray float32 (n, size, size)
        Each normalised to sum one over the infinite plane (before cropping).
    """
    optics = optics_from(pixel_size, na, wavelength, n_immersion, supersample=supersample)
    noll = tuple(int(j) for j in noll)
    n = max(np.size(defocus), np.size(shift_y), np.size(shift_x),
            1 if zernike_waves is None else np.atleast_2d(zernike_waves).shape[0])
    if zernike_waves is None:
        zernike_waves = np.zeros((n, len(noll)))
    zw = np.atleast_2d(np.asarray(zernike_waves, dtype=np.float64))
    if zw.shape[0] == 1 and n > 1:
        zw = np.repeat(zw, n, axis=0)
    try:
        eng = engine(optics, int(size), noll)
        return eng.render(eng.features(zw, defocus, shift_y, shift_x))
    except ValueError as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"scalar_psfs: inconsistent parameter lengths ({exc})") from None
