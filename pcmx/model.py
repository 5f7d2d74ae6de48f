"""Queries on the data model: PSFs at positions, family coefficients (no heavy computation).

The two stores of the foundation (``schemas/``): an operator holds ``psf_basis (component,
[kz,] ky, kx)`` and ``coefficients (component, [z,] y, x)``; a family holds ``psf_basis``,
``spatial_basis (mode, [z,] y, x)`` and ``gamma (state, component, mode)`` (paper II-D).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .errors import InputError
from .provenance import provenance

__all__ = ["psf_at", "family_coefficients", "family_operator", "operator_dataset"]


def _select(ds: xr.Dataset, var: str, position: dict, index: bool) -> xr.DataArray:
    spatial = [d for d in ds[var].dims if d in ("z", "y", "x")]
    unknown = set(position) - set(spatial)
    if unknown:
        raise InputError(f"unknown position dims {sorted(unknown)}; expected {spatial}")
    missing = [d for d in spatial if d not in position]
    if missing:
        raise InputError(f"position needs {missing} as well")
    if index:
        return ds[var].isel({d: int(round(position[d])) for d in spatial})
    return ds[var].sel(position, method="nearest")


def family_coefficients(family: xr.Dataset, state=None, *, gamma=None) -> xr.DataArray:
    """Coefficient maps of one state (or any ``gamma`` of shape (component, mode)).

    ``einsum("ij,jyx->iyx", gamma[k], spatial_basis)`` (paper II-D-b). ``state`` is an index
    (int) or a label of the ``state`` coordinate.
    """
    if (state is None) == (gamma is None):
        raise InputError("give exactly one of state= or gamma=")
    if gamma is None:
        g = family["gamma"].isel(state=state) if isinstance(state, (int, np.integer)) else family["gamma"].sel(state=state)
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
    label = None if state is None else (state if not isinstance(state, (int, np.integer)) else family["state"].values[state])
    params = {"family_state": label if label is None else str(label)}
    return operator_dataset(family["psf_basis"], coeffs,
                            attrs={**provenance(params), "pcmx_source_family": True})


def operator_dataset(psf_basis, coefficients, *, attrs: dict | None = None) -> xr.Dataset:
    """Assemble an operator Dataset from its two variables (DataArrays keep their coords)."""
    ds = xr.Dataset({"psf_basis": psf_basis, "coefficients": coefficients})
    ds.attrs = {"pcmx_type": "operator", **(attrs or {})}
    return ds


def psf_at(ds: xr.Dataset, *, state=None, index: bool = False, **position) -> xr.DataArray:
    """The PSF at a position: ``sum_i coefficients[i, p] * psf_basis[i]``.

    Parameters
    ----------
    ds : Dataset
        An operator, or a family (then ``state`` is required).
    state : int or label, optional
        The family state.
    index : bool
        Positions are pixel indices instead of coordinate values (nearest pixel).
    **position
        ``y=..., x=...`` (and ``z=...`` for 3D), in the coordinates' units.
    """
    kind = ds.attrs.get("pcmx_type")
    if kind == "family":
        if state is None:
            raise InputError("a family needs state= to give a PSF")
        spatial = _select(ds, "spatial_basis", position, index)
        g = ds["gamma"].isel(state=state) if isinstance(state, (int, np.integer)) else ds["gamma"].sel(state=state)
        coeff = xr.dot(g, spatial, dim="mode")
    elif kind == "operator":
        coeff = _select(ds, "coefficients", position, index)
    else:
        raise InputError(f"psf_at needs an operator or a family, got pcmx_type={kind!r}")
    psf = xr.dot(coeff, ds["psf_basis"], dim="component")
    return psf.drop_vars([c for c in psf.coords if c not in psf.dims]).rename("psf")
