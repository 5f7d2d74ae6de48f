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
from .options import get_options

__all__ = [
    "ureg",
    "LENGTH_UNITS",
    "PIXEL_SIZE_RANGE_UM",
    "PIXEL_UNITS",
    "parse_length",
    "from_pixels",
    "format_length",
    "spatial_coords",
    "kernel_coords",
    "pixel_size",
    "PIXEL_ALIASES",
    "to_pixels",
]

ureg: pint.UnitRegistry = pint_xarray.unit_registry
LENGTH_UNITS = "micrometer"
PIXEL_UNITS = "pixel"
SPATIAL_DIMS = ("z", "y", "x")
KERNEL_DIMS = ("kz", "ky", "kx")
#: The pixel sizes (micrometers, in the object plane) :func:`parse_length` accepts for
#: ``name="pixel_size"``: 1 nm to 100 um. Optical microscopy resolves >= ~100 nm (~20 nm for
#: single-molecule localisation), so Nyquist-sampled pixels are >= ~10 nm, and expansion
#: microscopy's effective pixels a few nm; the coarsest pixels of low-magnification
#: macroscopes and mesoscale light-sheets are tens of micrometers. A value outside is a wrong
#: unit ("65 mm", "65 parsecs": a factor of 1000 or more) or other optics.
PIXEL_SIZE_RANGE_UM = (1e-3, 100.0)


def parse_length(value, *, name: str = "pixel_size", allow_any: bool = False) -> float:
    """Parse a length given as ``"65nm"``, ``"0.065 um"``, a pint Quantity -> micrometers.

    Parameters
    ----------
    value : str or pint.Quantity
        A length with units. Bare numbers are refused: a pixel size without units is the
        classic factor-1000 bug.
    name : str
        The argument's name, used in the error message. ``"pixel_size"`` (the default) also
        requires the value to lie in :data:`PIXEL_SIZE_RANGE_UM` (1 nm to 100 um).
    allow_any : bool
        Accept a pixel size outside that range (other optics, e.g. the image-plane pixels of
        a telescope; the command line's ``--any-pixel-size``).

    Raises
    ------
    InputError
        If the value is not a positive, finite length, or is a pixel size outside the range
        of optical microscopy without ``allow_any`` (the message names ``name``, the value,
        the range and the override).
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
    lo, hi = PIXEL_SIZE_RANGE_UM
    if name == "pixel_size" and not lo <= um <= hi and not (allow_any or get_options()["any_pixel_size"]):
        raise InputError(
            f"{name}={value!r} is {format_length(um)}, outside {format_length(lo)} to "
            f"{format_length(hi)}, the pixel sizes of optical microscopy; check the unit, or "
            "pass allow_any=True, pcmx.set_options(any_pixel_size=True) or --any-pixel-size "
            "for other optics")
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


# --------------------------------------------------------------------------------------------
# Positions: one convention for psf_at, true_psf(s) and ProductConvolution.psf_at
# --------------------------------------------------------------------------------------------
#: Coordinate ``units`` meaning "no physical calibration": the values are pixel numbers.
PIXEL_ALIASES = (PIXEL_UNITS, "pixels", "px", "1", "")
# pint reads "px" as the CSS pixel (1/96 inch), a length: a position "120 px" is a pixel number.
_PIXEL_QUANTITY_UNITS = ("pixel", "css_pixel")


def _position_parts(value, name: str) -> tuple[np.ndarray, str | None]:
    """``(magnitudes, units)`` of a position: units None for bare numbers, ``"pixel"`` for
    pixel numbers, else a pint length unit string."""
    if isinstance(value, bool):
        raise InputError(f"{name}={value!r} is not a position")
    units = None
    if isinstance(value, xr.DataArray):
        if isinstance(value.data, pint.Quantity):
            value = value.data
        else:
            units = value.attrs.get("units")
            value = np.asarray(value.values)
            if units is not None and str(units) in PIXEL_ALIASES:
                units = PIXEL_UNITS
    if isinstance(value, str):
        try:
            q = ureg.Quantity(value)
        except Exception:  # pint's tokenizer raises assorted errors on garbage  # noqa: BLE001
            raise InputError(f"{name}={value!r} is not a position (e.g. '27um', '27000 nm', "
                             "'120 px')") from None
        if not isinstance(q, pint.Quantity) or q.dimensionless:
            raise InputError(f"{name}={value!r} has no unit: give '27um', '120 px', or a number")
        value = q
    if isinstance(value, pint.Quantity):
        u = str(value.units)
        mag = np.asarray(value.magnitude, dtype=np.float64)
        if u in _PIXEL_QUANTITY_UNITS:
            units = PIXEL_UNITS
        elif value.check("[length]"):
            units = u
        else:
            raise InputError(f"{name}={value!r} is not a length or a pixel number")
    else:
        try:
            mag = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{name}={value!r} is not a position (a number, a length such as "
                             "'27um', or a pint Quantity)") from None
    if not np.all(np.isfinite(mag)):
        raise InputError(f"{name}={value!r} must be finite")
    return mag, units


def _coord_to_pixel(v: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Fractional pixel index of coordinate values ``v`` on a monotonic axis ``c``."""
    n = c.size
    if n == 1:  # one plane: only its own coordinate is inside
        return np.where(v == c[0], 0.0, np.where(v < c[0], -1.0, 1.0))
    flip = c[-1] < c[0]
    if flip:
        c = c[::-1]
    p = np.interp(v, c, np.arange(n, dtype=np.float64))
    p = np.where(v < c[0], (v - c[0]) / (c[1] - c[0]), p)
    p = np.where(v > c[-1], n - 1 + (v - c[-1]) / (c[-1] - c[-2]), p)
    return n - 1 - p if flip else p


def to_pixels(obj: xr.Dataset | xr.DataArray, *, index: bool = False, extrapolate: bool = False,
              **position) -> dict[str, float | np.ndarray]:
    """Positions in any accepted form -> fractional pixel indices on ``obj``'s grid.

    The one position convention of pcmx (:func:`pcmx.model.psf_at`,
    :meth:`pcmx.ProductConvolution.psf_at`, :func:`pcmx.simulate.true_psf`): keywords
    ``y=``, ``x=`` (``z=``), each

    * a number (or array): a coordinate value in the units of ``obj``'s coordinate
      (micrometers in a calibrated store; pixels where the coordinate is in pixels or absent);
      with ``index=True``, a pixel index instead (``0`` is the first pixel's centre);
    * a pint Quantity or a string with a unit (``"27um"``, ``"27000 nm"``): converted to the
      coordinate's units (refused where the grid has no pixel size);
    * a pixel number with its unit (``"120 px"``, ``120 * ureg.pixel``, or a DataArray whose
      ``units`` attribute is ``"pixel"``, such as a simulation's ``bead_y``): a pixel index.

    Works on plain and quantified (``ds.pint.quantify()``) objects alike.

    Parameters
    ----------
    obj : Dataset or DataArray
        Gives the sizes and the coordinates of the dims named in ``position``.
    index : bool
        Bare numbers are pixel indices.
    extrapolate : bool
        Positions outside the field are moved to the nearest pixel of its edge instead of
        raising.
    **position
        ``dim=value``.

    Returns
    -------
    dict
        ``dim -> fractional pixel index`` (float, or ndarray for array input), within
        ``[-0.5, n - 0.5]`` (the pixels' footprint), or in ``[0, n - 1]`` after extrapolation.

    Raises
    ------
    InputError
        If a value is not a position, a length is given for a grid in pixels, ``index=True``
        meets a length, or a position lies outside the field without ``extrapolate`` (the
        message gives the value and the field's extent).
    """
    out = {}
    for dim, value in position.items():
        if dim not in obj.dims:
            raise InputError(f"unknown position dim {dim!r}; expected one of {list(obj.dims)}")
        n = int(obj.sizes[dim])
        mag, units = _position_parts(value, dim)
        given = mag
        coord = obj.coords[dim] if dim in obj.coords else None
        if coord is not None and isinstance(coord.data, pint.Quantity):
            cunits = str(coord.data.units)
            c = np.asarray(coord.data.magnitude, dtype=np.float64)
        elif coord is not None:
            cunits = str(coord.attrs.get("units", PIXEL_UNITS))
            c = np.asarray(coord.values, dtype=np.float64)
        else:
            cunits, c = PIXEL_UNITS, np.arange(n, dtype=np.float64)
        calibrated = cunits not in PIXEL_ALIASES
        if units == PIXEL_UNITS or (units is None and index):
            p = mag
        elif index:
            raise InputError(f"{dim}={value!r} has a unit but index=True takes pixel indices")
        else:
            if units is not None:
                if not calibrated:
                    raise InputError(f"{dim}={value!r} is a length, but this grid has no pixel "
                                     f"size ({dim} is in pixels): give pixel numbers")
                mag = ureg.Quantity(mag, units).to(cunits).magnitude
            p = _coord_to_pixel(np.asarray(mag, dtype=np.float64), c)
        outside = (p < -0.5) | (p > n - 0.5)
        if np.any(outside):
            if not extrapolate:
                first = np.flatnonzero(np.ravel(outside))[0]
                shown = np.ravel(given)[first]
                unit_txt = "pixel" if units == PIXEL_UNITS or (units is None and index) else \
                    (units or cunits)
                extent = (f"{c[0]:.6g} to {c[-1]:.6g} {cunits} (pixel centres 0 to {n - 1})"
                          if calibrated or coord is not None else f"pixels 0 to {n - 1}")
                many = f" ({int(np.sum(outside))} of {np.size(p)} positions)" if np.size(p) > 1 else ""
                raise InputError(
                    f"{dim}={float(shown):.6g} {unit_txt} is outside the field{many}: {dim} spans "
                    f"{extent}; pass extrapolate=True for the PSF at the nearest edge")
            p = np.where(outside, np.clip(p, 0, n - 1), p)
        out[dim] = float(p) if np.ndim(p) == 0 else p
    return out


def from_pixels(obj: xr.Dataset | xr.DataArray, **indices) -> dict[str, tuple[np.ndarray, str]]:
    """Fractional pixel indices -> coordinate values on ``obj``'s grid, with their units.

    The inverse of :func:`to_pixels` for stored positions (bead centres, held-out beads):
    ``dim=indices`` gives ``dim -> (values, units)``, the values in the units of ``obj``'s
    ``dim`` coordinate (micrometers in a calibrated store) by linear interpolation of the
    coordinate (extrapolated linearly past its ends), or the indices themselves with units
    ``"pixel"`` where the coordinate is in pixels or absent.
    """
    out = {}
    for dim, idx in indices.items():
        p = np.asarray(idx, dtype=np.float64)
        coord = obj.coords[dim] if dim in obj.coords else None
        if coord is None:
            out[dim] = (p, PIXEL_UNITS)
            continue
        if isinstance(coord.data, pint.Quantity):
            cunits, c = str(coord.data.units), np.asarray(coord.data.magnitude, dtype=np.float64)
        else:
            cunits, c = str(coord.attrs.get("units", PIXEL_UNITS)), np.asarray(coord.values, np.float64)
        if cunits in PIXEL_ALIASES:
            out[dim] = (p, PIXEL_UNITS)
            continue
        if c.size == 1:
            step = coord.attrs.get("pixel_size")
            out[dim] = (c[0] + p * (float(step) if step is not None else 0.0), cunits)
            continue
        n = np.arange(c.size, dtype=np.float64)
        v = np.interp(p, n, c)
        v = np.where(p < 0, c[0] + p * (c[1] - c[0]), v)
        v = np.where(p > c.size - 1, c[-1] + (p - c.size + 1) * (c[-1] - c[-2]), v)
        out[dim] = (v, cunits)
    return out
