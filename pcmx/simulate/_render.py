"""Render point emitters, each with its own exact PSF at its own position (no product-convolution)."""

from __future__ import annotations

import math

import numpy as np

from ._model import FieldModel, State
from ._psf import Optics, engine
from ._scene import scatter_patches

__all__ = ["PATCH_SIZES", "required_size", "render_sizes", "render_emitters"]

#: Patch sizes the renderer chooses from (each PSF gets the smallest that holds its blur).
PATCH_SIZES = (33, 49, 65, 97, 129, 193, 257)
# elements (PSFs x pixels) rendered and scattered at once: bounds memory on large scenes
_CHUNK_ELEMENTS = 6_000_000


def required_size(optics: Optics, defocus_um: np.ndarray, *, max_size: int = 257) -> np.ndarray:
    """Smallest patch in :data:`PATCH_SIZES` holding each PSF: the geometric blur radius
    ``|z| tan(theta_max)`` plus four ``lambda / NA`` for the diffraction rings (capped)."""
    radius = (np.abs(defocus_um) * optics.tan_max + 4.0 * optics.wavelength / optics.na) \
        / optics.pixel_size
    sizes = np.asarray([s for s in PATCH_SIZES if s <= max_size] or [max_size])
    if sizes[-1] < max_size:
        sizes = np.append(sizes, max_size)
    idx = np.searchsorted(sizes // 2, np.ceil(radius))
    return sizes[np.minimum(idx, len(sizes) - 1)]


def render_sizes(optics: Optics, defocus_um: np.ndarray, shape, patch_size: int | None = None,
                 max_patch: int = 257) -> np.ndarray:
    """Patch side used for each PSF when rendering an image of ``shape``.

    :func:`true_psfs` renders at the same sizes (then crops), so a ground-truth PSF is the very
    function that went into the image, down to the FFT window.
    """
    defocus_um = np.asarray(defocus_um, dtype=np.float64)
    if patch_size is not None:
        return np.full(defocus_um.shape, int(patch_size))
    limit = int(min(max_patch, 2 * max(shape[-2:]) + 1))
    limit += 1 - limit % 2
    return required_size(optics, defocus_um, max_size=limit)


def render_emitters(optics: Optics, fm: FieldModel, state: State, y, x, amplitude, out_shape,
                    *, z=None, patch_size: int | None = None, max_patch: int = 257) -> np.ndarray:
    """Expected photons (float64, ``out_shape``) of point emitters at sub-pixel positions.

    Parameters
    ----------
    y, x : ndarray (n,)
        Positions in pixels. Each emitter's Zernike coefficients and defocus are evaluated at
        its own position; its sub-pixel offset from the nearest pixel is a phase ramp in the
        pupil.
    amplitude : ndarray (n,)
        Photons per emitter.
    out_shape : (ny, nx) or (nz, ny, nx)
        For 3D, ``z`` gives the emitters' axial positions in planes; plane ``k`` sees the PSF
        at defocus ``field_defocus + (z - k) * z_step``.
    patch_size : int, optional
        One patch size for all PSFs; by default each gets :func:`required_size`.
    """
    out = np.zeros(out_shape, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    amplitude = np.asarray(amplitude, dtype=np.float64)
    n = y.size
    if n == 0:
        return out
    zern, dfield = fm.at(y, x, state)
    iy, ix = np.rint(y).astype(np.int64), np.rint(x).astype(np.int64)
    dy, dx = y - iy, x - ix
    if len(out_shape) == 3:
        nz = out_shape[0]
        planes = np.arange(nz)
        defocus = (dfield[:, None] + (np.asarray(z, dtype=np.float64)[:, None] - planes[None, :])
                   * optics.z_step).ravel()
        rows = np.repeat(np.arange(n), nz)
        iz = np.tile(planes, n)
    else:
        defocus = dfield
        rows = np.arange(n)
        iz = None
    sizes = render_sizes(optics, defocus, out_shape, patch_size, max_patch)
    for size in np.unique(sizes):
        sel = np.flatnonzero(sizes == size)
        eng = engine(optics, int(size), fm.noll)
        chunk = max(1, _CHUNK_ELEMENTS // int(size) ** 2)
        for start in range(0, sel.size, chunk):
            s = sel[start:start + chunk]
            r = rows[s]
            feats = eng.features(zern[r], defocus[s], dy[r], dx[r])
            patches = eng.render(feats)
            scatter_patches(out, patches, iy[r], ix[r], None if iz is None else iz[s],
                            weights=amplitude[r])
    return out


def auto_min_separation(optics: Optics) -> float:
    """Default minimum bead separation (pixels): four times the Airy FWHM."""
    return math.ceil(4.0 * optics.airy_fwhm / optics.pixel_size)
