"""Queries on the data model: PSFs at positions, family coefficients (no heavy computation).

The two stores of the foundation (``schemas/``): an operator holds ``psf_basis (component,
[kz,] ky, kx)`` and ``coefficients (component, [z,] y, x)``; a family holds ``psf_basis``,
``spatial_basis (mode, [z,] y, x)`` and ``gamma (state, component, mode)`` (paper II-D).
"""

from __future__ import annotations

import numpy as np
import pint
import pint_xarray  # noqa: F401  (the .pint accessor)
import xarray as xr

from .errors import InputError
from .provenance import provenance
from .units import to_pixels

__all__ = ["psf_at", "family_coefficients", "family_operator", "operator_dataset", "state_index"]


def _select(ds: xr.Dataset, var: str, position: dict, index: bool, extrapolate: bool) -> xr.DataArray:
    spatial = [d for d in ds[var].dims if d in ("z", "y", "x")]
    unknown = set(position) - set(spatial)
    if unknown:
        raise InputError(f"unknown position dims {sorted(unknown)}; expected {spatial}")
    missing = [d for d in spatial if d not in position]
    if missing:
        raise InputError(f"position needs {missing} as well")
    pixels = to_pixels(ds[var], index=index, extrapolate=extrapolate, **position)
    for d, p in pixels.items():
        if np.ndim(p):
            raise InputError(f"{d}: psf_at takes one position, got an array of shape {np.shape(p)}")
    return ds[var].isel({d: int(min(max(np.floor(p + 0.5), 0), ds.sizes[d] - 1))
                         for d, p in pixels.items()})


def state_index(ds: xr.Dataset, state) -> int:
    """The position along ``state`` of a family state given by label or by index.

    Integer labels (a family learned from a DataArray with a ``state`` coordinate of ints)
    are looked up as labels; other labels (strings) by label, and an int is then an index.

    Raises
    ------
    InputError
        If the state is unknown (the message lists the known states).
    """
    n = int(ds.sizes.get("state", 0))
    labels = list(ds["state"].values) if "state" in ds.coords else None
    known = ", ".join(repr(v.item() if hasattr(v, "item") else v) for v in labels) \
        if labels is not None else f"indices 0 to {n - 1}"
    int_labels = labels is not None and np.asarray(labels).dtype.kind in "iu"
    is_int = isinstance(state, (int, np.integer)) and not isinstance(state, (bool, np.bool_))
    if is_int and not int_labels:
        if -n <= int(state) < n:
            return int(state) % n
    elif labels is not None and not isinstance(state, (bool, np.bool_)):
        for k, v in enumerate(labels):
            v = v.item() if isinstance(v, np.generic) else v
            if isinstance(v, str) == isinstance(state, str) and v == state:
                return k
    raise InputError(f"state={state!r} is not a state of this family; known states: {known}")


def family_coefficients(family: xr.Dataset, state=None, *, gamma=None) -> xr.DataArray:
    """Coefficient maps of one state (or any ``gamma`` of shape (component, mode)).

    ``einsum("ij,jyx->iyx", gamma[k], spatial_basis)`` (paper II-D-b). ``state`` is a label
    of the ``state`` coordinate, or an index where the labels are not integers
    (:func:`state_index`; an unknown state raises :class:`~pcmx.errors.InputError` listing
    the known ones).
    """
    if (state is None) == (gamma is None):
        raise InputError("give exactly one of state= or gamma=")
    if gamma is None:
        g = family["gamma"].isel(state=state_index(family, state))
    else:
        g = xr.DataArray(np.asarray(gamma, dtype=np.float32), dims=("component", "mode"))
        expected = (family.sizes["component"], family.sizes["mode"])
        if g.shape != expected:
            raise InputError(f"gamma has shape {g.shape}, expected {expected}")
    return xr.dot(g, family["spatial_basis"], dim="mode").astype(np.float32)


def family_operator(family: xr.Dataset, state=None, *, gamma=None) -> xr.Dataset:
    """The operator Dataset of one state of a family (lazy where the family is)."""
    coeffs = family_coefficients(family, state, gamma=gamma)
    coeffs = coeffs.drop_vars([c for c in coeffs.coords if c not in coeffs.dims])
    label = None
    if state is not None:
        k = state_index(family, state)
        label = family["state"].values[k].item() if "state" in family.coords else k
    params = {"family_state": label if label is None else str(label)}
    return operator_dataset(family["psf_basis"], coeffs,
                            attrs={**provenance(params), "pcmx_source_family": True})


def operator_dataset(psf_basis, coefficients, *, attrs: dict | None = None) -> xr.Dataset:
    """Assemble an operator Dataset from its two variables (DataArrays keep their coords)."""
    ds = xr.Dataset({"psf_basis": psf_basis, "coefficients": coefficients})
    ds.attrs = {"pcmx_type": "operator", **(attrs or {})}
    return ds


def psf_at(ds: xr.Dataset, *, state=None, index: bool = False, extrapolate: bool = False,
           **position) -> xr.DataArray:
    """The PSF at a position: ``sum_i coefficients[i, p] * psf_basis[i]`` at the nearest pixel.

    Parameters
    ----------
    ds : Dataset
        An operator, or a family (then ``state`` is required); plain or quantified
        (``ds.pint.quantify()``: the result is quantified too).
    state : int or label, optional
        The family state: a label of the ``state`` coordinate, or an index where the labels
        are not integers (:func:`state_index`).
    index : bool
        Bare numbers are pixel indices instead of coordinate values.
    extrapolate : bool
        A position outside the field gives the PSF of the nearest pixel of its edge instead
        of an error.
    **position
        ``y=..., x=...`` (and ``z=...`` for 3D): numbers in the coordinates' units
        (micrometers in a calibrated store), pint Quantities or strings with a unit
        (``"27um"``, ``"27000 nm"``, ``"120 px"``); see :func:`pcmx.units.to_pixels`.

    Returns
    -------
    DataArray ``psf``, dims ``([kz,] ky, kx)``

    Raises
    ------
    InputError
        If a position is missing, unknown, not a position, or outside the field (the message
        gives the field's extent), or the state is unknown (the message lists the states).

    Examples
    --------
    >>> op.pcmx.psf_at(y=27.0, x=27.0)              # doctest: +SKIP  (micrometers)
    >>> op.pcmx.psf_at(y="27um", x="27000 nm")      # doctest: +SKIP
    >>> op.pcmx.psf_at(y=415, x=415, index=True)    # doctest: +SKIP  (pixel indices)
    """
    quantified = any(isinstance(v.data, pint.Quantity) for v in ds.variables.values())
    if quantified:
        ds = ds.pint.dequantify()
    kind = ds.attrs.get("pcmx_type")
    if kind == "family":
        if state is None:
            raise InputError("a family needs state= to give a PSF")
        g = ds["gamma"].isel(state=state_index(ds, state))
        spatial = _select(ds, "spatial_basis", position, index, extrapolate)
        coeff = xr.dot(g, spatial, dim="mode")
    elif kind == "operator":
        coeff = _select(ds, "coefficients", position, index, extrapolate)
    else:
        raise InputError(f"psf_at needs an operator or a family, got pcmx_type={kind!r}")
    psf = xr.dot(coeff, ds["psf_basis"], dim="component")
    psf = psf.drop_vars([c for c in psf.coords if c not in psf.dims]).rename("psf")
    return psf.pint.quantify() if quantified else psf
