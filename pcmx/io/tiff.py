"""TIFFs out: ImageJ TIFFs with the pixel size and z step in their metadata, written atomically.

:func:`pcmx.io.readers.read_image` (and ImageJ/Fiji) read the calibration back: the pixel size
from the resolution tags with ``unit=um``, the z step from ImageJ's ``spacing``.
"""

from __future__ import annotations

import os

import numpy as np

from .atomic import atomic_file

__all__ = ["write_tiff"]


def write_tiff(path, data, pixel_size_um=None, *, z_step_um: float | None = None) -> str:
    """Write a 2D image or a z-stack as an ImageJ TIFF, atomically (:func:`pcmx.io.atomic.atomic_file`).

    Parameters
    ----------
    path : str or path-like
        The TIFF to create or replace (the caller decides whether replacing is allowed).
    data : array, shape (y, x) or (z, y, x)
        Written with its own dtype (ImageJ takes uint8, uint16 and float32).
    pixel_size_um : float or (float, float), optional
        Pixel size in micrometres, square or ``(y, x)``: stored as the resolution with
        ``unit=um``. None, or a pair holding a None, writes no calibration.
    z_step_um : float, optional
        Axial step of a z-stack in micrometres (ImageJ ``spacing``); ignored for 2D data.

    Returns
    -------
    str
        ``path``.

    Raises
    ------
    ValueError
        ``data`` is neither 2D nor 3D (nothing is written).
    """
    import tifffile

    data = np.ascontiguousarray(data)
    if data.ndim not in (2, 3):
        raise ValueError(f"write_tiff: data must be 2D (y, x) or 3D (z, y, x), got shape {data.shape}")
    metadata = {"axes": "ZYX" if data.ndim == 3 else "YX"}
    kwargs = {}
    sy, sx = (pixel_size_um, pixel_size_um) if np.ndim(pixel_size_um) == 0 else pixel_size_um
    if sy is not None and sx is not None:
        metadata["unit"] = "um"
        kwargs["resolution"] = (1.0 / float(sx), 1.0 / float(sy))
    if data.ndim == 3 and z_step_um is not None:
        metadata["spacing"] = float(z_step_um)
    return atomic_file(os.fspath(path), lambda tmp: tifffile.imwrite(
        tmp, data, imagej=True, metadata=metadata, **kwargs))
