"""Ground truth of a simulation: exact PSFs anywhere, and the true operator for evaluation."""

from __future__ import annotations

import numbers

import numpy as np
import xarray as xr
from scipy.interpolate import RectBivariateSpline

from ..errors import InputError
from ..provenance import provenance
from ..units import kernel_coords, spatial_coords, to_pixels
from ._model import FieldModel, State
from ._psf import Optics, engine
from ._render import render_sizes

__all__ = ["simulation_model", "true_psf", "true_psfs", "true_operator"]


def simulation_model(sim: xr.Dataset) -> tuple[Optics, FieldModel, list[State], tuple]:
    """``(optics, field_model, states, image_shape)`` recorded in a simulation's attrs."""
    if not isinstance(sim, xr.Dataset):
        raise InputError(f"sim must be a Dataset from pcmx.simulate, got {type(sim).__name__}")
    a = sim.attrs
    missing = [k for k in ("optics", "field_model", "states") if k not in a]
    if missing:
        raise InputError(f"sim has no simulation model (missing attrs {missing}); "
                         "pass a Dataset made by pcmx.simulate")
    optics = Optics.from_attrs(a["optics"])
    fm = FieldModel.from_attrs(a["field_model"])
    states = [State.from_attrs(s) for s in a["states"]]
    spatial = tuple(d for d in ("z", "y", "x") if d in sim.dims)
    shape = tuple(int(sim.sizes[d]) for d in spatial)
    return optics, fm, states, shape


def _pick_state(states, state) -> State:
    if isinstance(state, bool) or not isinstance(state, numbers.Integral) \
            or not -len(states) <= state < len(states):
        raise InputError(f"state={state!r} is out of range: this simulation has "
                         f"{len(states)} state(s)")
    return states[int(state)]


def _check_size(value, name: str, *, odd: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1 \
            or (odd and value % 2 == 0):
        raise InputError(f"{name}={value!r} must be a positive {'odd ' if odd else ''}integer")
    return int(value)


def _positions(shape, pixel_size, positional, y, x, index: bool,
               extrapolate: bool) -> tuple[np.ndarray, np.ndarray]:
    """Fractional pixel positions ``(ys, xs)`` by pcmx's position convention."""
    if positional:
        if y is not None or x is not None:
            raise InputError("give the position either as (ys, xs) pixel positions or as y=, x=, "
                             "not both")
        if len(positional) != 2:
            raise InputError(f"expected two positions (y, x), got {len(positional)}")
        y, x = positional
        index = True  # the positional form: pixel positions, as bead_y / bead_x store them
    if y is None or x is None:
        raise InputError("give the position: y=..., x=... (micrometers, or index=True for pixels)")
    grid = xr.Dataset(coords=spatial_coords(shape[-2:], pixel_size, dims=("y", "x")))
    p = to_pixels(grid, index=index, extrapolate=extrapolate, y=y, x=x)
    ys = np.atleast_1d(np.asarray(p["y"], dtype=np.float64)).ravel()
    xs = np.atleast_1d(np.asarray(p["x"], dtype=np.float64)).ravel()
    return ys, xs


def true_psfs(sim: xr.Dataset, *positions, y=None, x=None, index: bool = False,
              extrapolate: bool = False, state: int = 0, size: int = 33,
              size_z: int | None = None, defocus: float = 0.0) -> np.ndarray:
    """Exact PSFs of unit beads at many positions (vectorised :func:`true_psf`).

    Positions follow pcmx's one convention (:func:`pcmx.units.to_pixels`): ``y=``, ``x=``
    are in the simulation's coordinates (micrometers), pint Quantities or strings
    (``"27um"``, ``"120 px"``), or pixel indices with ``index=True``; DataArrays with
    ``units="pixel"`` (``sim["bead_y"]``) are pixel positions. The positional form
    ``true_psfs(sim, ys, xs)`` takes pixel positions (as ``index=True``).

    Parameters
    ----------
    sim : Dataset
        A result of :func:`simulate_beads` or :func:`simulate_point_sources` (or one reopened
        from a store: only the attrs are used).
    *positions : array_like (n,), optional
        ``ys, xs``: bead positions in pixels (sub-pixel values allowed: the field model is
        evaluated there; the PSF is returned centred, its sub-pixel offset removed).
    y, x : array_like (n,), optional
        Bead positions by keyword, in micrometers (or pixels with ``index=True``).
    index : bool
        Bare numbers given by keyword are pixel positions.
    extrapolate : bool
        Positions outside the field (beyond half a pixel from its edge pixels) are moved to
        the nearest edge pixel instead of raising.
    state : int
        Which acquisition's conditions.
    size : int
        Side of the returned patches; the PSF centre is at index ``size // 2``.
    size_z : int, optional
        3D simulations only: number of planes (centre plane ``size_z // 2`` holds the bead;
        default the smallest odd number >= the stack's depth).
    defocus : float
        Extra defocus in micrometers added to the field's.

    Returns
    -------
    ndarray float32
        ``(n, size, size)``, or ``(n, size_z, size, size)`` for 3D simulations; each PSF is
        normalised to sum one over the infinite plane before cropping.
    """
    optics, fm, states, shape = simulation_model(sim)
    st = _pick_state(states, state)
    size = _check_size(size, "size")
    ys, xs = _positions(shape, optics.pixel_size, positions, y, x, index, extrapolate)
    if ys.shape != xs.shape:
        raise InputError(f"ys and xs have different lengths ({ys.size} and {xs.size})")
    zern, dfield = fm.at(ys, xs, st)
    dfield = dfield + float(defocus)
    if len(shape) == 2:
        return _render_cropped(sim, optics, fm, zern, dfield, shape, size)
    nz = shape[0]
    size_z = _check_size(size_z, "size_z") if size_z is not None else nz + 1 - nz % 2
    kz = np.arange(size_z) - size_z // 2
    dz = (dfield[:, None] - kz[None, :] * optics.z_step).ravel()
    out = _render_cropped(sim, optics, fm, np.repeat(zern, size_z, axis=0), dz, shape, size)
    return out.reshape(ys.size, size_z, size, size)


def _render_cropped(sim, optics, fm, zern, defocus, shape, size) -> np.ndarray:
    """Render each PSF at the patch size the image renderer used for it, crop to ``size``."""
    patch = sim.attrs.get("scene", {}).get("patch_size")
    sizes = np.maximum(render_sizes(optics, defocus, shape, patch), size)
    out = np.empty((defocus.size, size, size), dtype=np.float32)
    for s in np.unique(sizes):
        sel = np.flatnonzero(sizes == s)
        eng = engine(optics, int(s), fm.noll)
        psfs = eng.render(eng.features(zern[sel], defocus[sel], 0.0, 0.0))
        start = int(s) // 2 - size // 2
        out[sel] = psfs[:, start:start + size, start:start + size]
    return out


def true_psf(sim: xr.Dataset, *position, y=None, x=None, index: bool = False,
             extrapolate: bool = False, state: int = 0, size: int = 33,
             size_z: int | None = None, defocus: float = 0.0) -> np.ndarray:
    """Exact PSF of a unit bead at one position, centred at index ``size // 2``.

    ``true_psf(sim, y="27um", x=13.0)`` (micrometers, pint Quantities or strings),
    ``true_psf(sim, y=415.3, x=200, index=True)`` or ``true_psf(sim, 415.3, 200)`` (pixel
    positions): pcmx's position convention (:func:`pcmx.units.to_pixels`).

    The PSF as a function of the offset from the bead (its sub-pixel offset removed),
    float32 ``(size, size)`` (``(size_z, size, size)`` in 3D), normalised to sum one over the
    infinite plane before cropping. See :func:`true_psfs`.
    """
    for name, v in (("y", y), ("x", x), *zip(("y", "x"), position, strict=False)):
        if v is not None and not isinstance(v, str) and np.ndim(getattr(v, "magnitude", v)) > 0:
            raise InputError(f"{name}: true_psf takes one position (use true_psfs for many)")
    return true_psfs(sim, *position, y=y, x=x, index=index, extrapolate=extrapolate,
                     state=state, size=size, size_z=size_z, defocus=defocus)[0]


def true_operator(sim: xr.Dataset, *, state: int = 0, n_components: int = 5,
                  kernel_size: int = 33, grid: int = 16, kernel_size_z: int | None = None
                  ) -> xr.Dataset:
    """The ground-truth operator as a pcmx operator Dataset (for evaluating estimators).

    Exact PSFs are sampled on a ``grid x grid`` lattice over the field, their best rank-I
    approximation (uncentred PCA / truncated SVD, Eckart-Young; paper App. A-e) gives the PSF
    basis ``h_i`` and coefficients at the lattice nodes, and the coefficients are interpolated
    to every pixel by bicubic splines (the true coefficients are smooth: the field model is
    polynomial).

    Parameters
    ----------
    sim : Dataset
        A simulation (only its attrs and sizes are used).
    state : int
        Which acquisition.
    n_components : int
        ``I``, the number of PSF basis elements.
    kernel_size : int
        Odd side of the kernels.
    grid : int
        Lattice nodes per axis (at least 4, at most the image size).
    kernel_size_z : int, optional
        3D simulations: odd number of kernel planes (default the smallest odd >= depth).

    Returns
    -------
    Dataset
        ``psf_basis (component, [kz,] ky, kx)`` and ``coefficients (component, [z,] y, x)``,
        float32, ``attrs["pcmx_type"] = "operator"``, provenance, and ``relative_error``: the
        relative Frobenius error of the rank-I approximation on the lattice.
    """
    optics, fm, states, shape = simulation_model(sim)
    _pick_state(states, state)
    kernel_size = _check_size(kernel_size, "kernel_size", odd=True)
    n_components = _check_size(n_components, "n_components")
    grid = _check_size(grid, "grid")
    ny, nx = shape[-2:]
    gy_n, gx_n = min(grid, ny), min(grid, nx)
    if grid < 4 or min(gy_n, gx_n) < 2:
        raise InputError(f"grid={grid!r} must be at least 4 (and the image at least 2 x 2)")
    gy = np.linspace(0.0, ny - 1, gy_n)
    gx = np.linspace(0.0, nx - 1, gx_n)
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    if len(shape) == 3:
        nz = shape[0]
        kz_size = kernel_size_z if kernel_size_z is not None else nz + 1 - nz % 2
        kz_size = _check_size(kz_size, "kernel_size_z", odd=True)
        psfs = true_psfs(sim, yy.ravel(), xx.ravel(), state=state, size=kernel_size,
                         size_z=kz_size)
    else:
        psfs = true_psfs(sim, yy.ravel(), xx.ravel(), state=state, size=kernel_size)
    kshape = psfs.shape[1:]
    mat = psfs.reshape(psfs.shape[0], -1).astype(np.float64)
    if n_components > min(mat.shape):
        raise InputError(f"n_components={n_components} exceeds the rank available from "
                         f"{mat.shape[0]} sampled PSFs of {mat.shape[1]} pixels")
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    basis = vt[:n_components]
    coef = u[:, :n_components] * s[:n_components]
    signs = np.where(basis.sum(axis=1) < 0, -1.0, 1.0)
    basis *= signs[:, None]
    coef *= signs[None, :]
    resid = np.sqrt(max(float(np.sum(s[n_components:] ** 2)), 0.0)) / max(np.sqrt(np.sum(s**2)), 1e-300)
    k_y = min(3, gy_n - 1)
    k_x = min(3, gx_n - 1)
    ycoord, xcoord = np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64)
    maps = np.empty((n_components, ny, nx), dtype=np.float32)
    for i in range(n_components):  # one tensor-product spline per component (I is small)
        spline = RectBivariateSpline(gy, gx, coef[:, i].reshape(gy_n, gx_n), kx=k_y, ky=k_x)
        maps[i] = spline(ycoord, xcoord)
    p = optics.pixel_size
    if len(shape) == 3:
        kdims, sdims = ("kz", "ky", "kx"), ("z", "y", "x")
        kpix = spix = (optics.z_step, p, p)
        maps = np.ascontiguousarray(np.broadcast_to(maps[:, None], (n_components, *shape)))
    else:
        kdims, sdims = ("ky", "kx"), ("y", "x")
        kpix = spix = p
    coords = {"component": np.arange(n_components),
              **kernel_coords(kshape, kpix, dims=kdims), **spatial_coords(shape, spix, dims=sdims)}
    params = {"state": int(state), "n_components": n_components, "kernel_size": kernel_size,
              "grid": grid, "source": "pcmx.simulate.true_operator"}
    return xr.Dataset(
        {"psf_basis": (("component", *kdims), basis.reshape(n_components, *kshape).astype(np.float32)),
         "coefficients": (("component", *sdims), maps)},
        coords=coords,
        attrs={"pcmx_type": "operator", **provenance(params),
               "relative_error": float(resid), "pcmx_ground_truth": True},
    )
