"""Physical units: one pint registry (pint-xarray's), length parsing, labelled coordinates.

Lengths are stored in micrometers (``attrs["units"] = "micrometer"``, pint's long name) so a
store opened with plain xarray is readable and ``ds.pint.quantify()`` works on it. Images
without a known pixel size use pixel indices with ``units = "pixel"``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import pint
import pint_xarray  # noqa: F401  (registers the .pint accessor)
import xarray as xr

from .errors import InputError

__all__ = [
    "ureg",
    "LENGTH_UNITS",
    "PIXEL_UNITS",
    "parse_length",
    "format_length",
    "spatial_coords",
    "kernel_coords",
    "pixel_size",
]

ureg: pint.UnitRegistry = pint_xarray.unit_registry
LENGTH_UNITS = "micrometer"
PIXEL_UNITS = "pixel"
SPATIAL_DIMS = ("z", "y", "x")
KERNEL_DIMS = ("kz", "ky", "kx")


def parse_length(value, *, name: str = "pixel_size") -> float:
    """Parse a length given as ``"65nm"``, ``"0.065 um"``, a pint Quantity -> micrometers.

    Parameters
    ----------
    value : str or pint.Quantity
        A length with units. Bare numbers are refused: a pixel size without units is the
        classic factor-1000 bug.
    name : str
        The argument's name, used in the error message.

    Raises
    ------
    InputError
        If the value is not a positive, finite length (the message names ``name`` and the value).
    """
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        raise InputError(
            f"{name}={value!r} has no unit: give a length such as '65nm' or '0.065um'"
        )
    try:
        q = ureg.Quantity(value) if isinstance(value, str) else value
        if not isinstance(q, pint.Quantity):
            raise TypeError
        um = float(q.to(LENGTH_UNITS).magnitude)
    except pint.DimensionalityError:
        raise InputError(f"{name}={value!r} is not a length (e.g. '65nm')") from None
    except (pint.UndefinedUnitError, TypeError, ValueError, AttributeError, AssertionError):
        raise InputError(f"{name}={value!r} is not a length (e.g. '65nm')") from None
    except Exception:  # pint's tokenizer raises assorted errors on garbage  # noqa: BLE001
        raise InputError(f"{name}={value!r} is not a length (e.g. '65nm')") from None
    if not np.isfinite(um) or um <= 0:
        raise InputError(f"{name}={value!r} must be a positive, finite length")
    return um


def format_length(um: float | None) -> str:
    """``0.065`` -> ``"65 nm"`` (``"unknown (pixel units)"`` for None)."""
    if um is None:
        return "unknown (pixel units)"
    # pint's to_compact() warns on the registry pint-xarray configures (array-like magnitudes)
    if um < 1:
        return f"{um * 1000:.4g} nm"
    return f"{um:.4g} µm"


def _axis_coord(n: int, step: float | None, dim: str, *, centred: bool) -> xr.DataArray:
    idx = np.arange(n, dtype=np.float64)
    if centred:
        idx -= n // 2
    if step is None:
        return xr.DataArray(idx, dims=dim, attrs={"units": PIXEL_UNITS})
    return xr.DataArray(idx * step, dims=dim, attrs={"units": LENGTH_UNITS})


def _steps(pixel_size_um, ndim: int) -> list[float | None]:
    if pixel_size_um is None or isinstance(pixel_size_um, numbers.Number):
        return [pixel_size_um] * ndim
    steps = list(pixel_size_um)
    if len(steps) != ndim:
        raise InputError(f"pixel_size has {len(steps)} values for {ndim} dimensions")
    return steps


def spatial_coords(
    shape: Sequence[int], pixel_size_um=None, dims: Sequence[str] | None = None
) -> dict[str, xr.DataArray]:
    """Coordinates ``index * pixel_size`` in micrometers for an image grid.

    ``pixel_size_um`` is one number (isotropic), one per axis (e.g. ``(0.3, 0.108, 0.108)``
    for a z-stack), or None (pixel units).
    """
    dims = tuple(dims) if dims is not None else SPATIAL_DIMS[-len(shape):]
    steps = _steps(pixel_size_um, len(shape))
    return {d: _axis_coord(n, s, d, centred=False) for d, n, s in zip(dims, shape, steps, strict=True)}


def kernel_coords(
    shape: Sequence[int], pixel_size_um=None, dims: Sequence[str] | None = None
) -> dict[str, xr.DataArray]:
    """Kernel offset coordinates, 0 at the centre index ``size // 2`` of each axis."""
    dims = tuple(dims) if dims is not None else KERNEL_DIMS[-len(shape):]
    steps = _steps(pixel_size_um, len(shape))
    return {d: _axis_coord(n, s, d, centred=True) for d, n, s in zip(dims, shape, steps, strict=True)}


def pixel_size(obj: xr.Dataset | xr.DataArray, dim: str) -> float | None:
    """Pixel size along ``dim`` in micrometers from the coordinate spacing (None if unknown).

    Coordinates in pixel units (or absent) give None; other length units are converted.
    """
    if dim not in obj.coords or obj.sizes.get(dim, 0) < 2:
        if dim in obj.coords and obj.sizes.get(dim, 0) == 1:
            step = obj.coords[dim].attrs.get("pixel_size")
            return None if step is None else float(step)
        return None
    c = obj.coords[dim]
    units = c.attrs.get("units", PIXEL_UNITS)
    if units in (PIXEL_UNITS, "px", "pixels", "1", ""):
        return None
    step = float(c.values[1] - c.values[0])
    try:
        factor = float(ureg.Quantity(1.0, units).to(LENGTH_UNITS).magnitude)
    except Exception:  # noqa: BLE001
        raise InputError(f"coordinate {dim!r} has units {units!r}, which is not a length") from None
    return step * factor
