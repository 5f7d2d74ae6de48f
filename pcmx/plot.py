"""Figures a microscopist wants: PSFs over the field, the basis and its maps, field maps of the
PSF's width, ellipticity and orientation, a family's states, a deblurring panel.

Every function returns its matplotlib ``Figure`` (drawn into ``ax=``/``fig=`` where given),
with micrometre axes where the store is calibrated (pixels otherwise) and a colorbar for each
image. matplotlib is imported lazily and its backend is never touched: in a notebook the
figure shows inline, in a Qt script ``plt.show()`` shows it, in a batch job call
``matplotlib.use("Agg")`` yourself. Each is also reachable as ``ds.pcmx.plot.<name>()``.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .errors import InputError
from .model import family_coefficients, psf_at
from .units import PIXEL_ALIASES, to_pixels

__all__ = ["psf_grid", "plot_basis", "field_maps", "psf_moments", "family_states",
           "deblur_panel", "plot_image", "plot_validation"]

#: FWHM of a Gaussian over its standard deviation, 2 sqrt(2 ln 2).
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def _pyplot():
    import matplotlib.pyplot as plt  # lazily: pcmx imports without matplotlib

    return plt


# ---------------------------------------------------------------------------------------------
# helpers: coordinates, positions, colour scales
# ---------------------------------------------------------------------------------------------
def _axis(obj, dim: str) -> tuple[np.ndarray, str]:
    """Coordinate values of ``dim`` and their unit label (``"µm"`` or ``"px"``)."""
    n = int(obj.sizes[dim])
    if dim in obj.coords:
        c = obj.coords[dim]
        units = str(c.attrs.get("units", "pixel"))
        values = np.asarray(getattr(c.data, "magnitude", c.values), dtype=np.float64)
        if units not in PIXEL_ALIASES:
            return values, "µm" if units in ("micrometer", "micrometre", "um", "µm") else units
        return values, "px"
    return np.arange(n, dtype=np.float64) - (n // 2 if dim.startswith("k") else 0), "px"


def _extent(obj, ydim: str, xdim: str) -> tuple[list[float], str]:
    """``imshow`` extent (left, right, bottom, top) covering the pixels' footprints."""
    ys, unit = _axis(obj, ydim)
    xs, _ = _axis(obj, xdim)
    dy = ys[1] - ys[0] if ys.size > 1 else 1.0
    dx = xs[1] - xs[0] if xs.size > 1 else 1.0
    return [xs[0] - dx / 2, xs[-1] + dx / 2, ys[-1] + dy / 2, ys[0] - dy / 2], unit


def _label_axes(ax, unit: str) -> None:
    ax.set_xlabel(f"x ({unit})")
    ax.set_ylabel(f"y ({unit})")


def _index_to_coord(obj, dim: str, p) -> np.ndarray:
    """Fractional pixel indices -> coordinate values (linear, extrapolated past the ends)."""
    c, _ = _axis(obj, dim)
    p = np.asarray(p, dtype=np.float64)
    if c.size < 2:
        return c[0] + p
    return c[0] + p * (c[1] - c[0])


def _positions(grid, ds: xr.Dataset, yname: str, xname: str):
    """Positions stored in ``ds[yname], ds[xname]`` as coordinate values of ``grid``.

    The variables' ``units`` attrs decide: pixels (or no units, the older stores) or a length.
    """
    if yname not in ds or xname not in ds:
        return None
    pos = {}
    for dim, name in (("y", yname), ("x", xname)):
        v = ds[name]
        if "units" not in v.attrs and not hasattr(v.data, "units"):
            v = v.assign_attrs(units="pixel")
        p = to_pixels(grid, extrapolate=True, **{dim: v})[dim]
        pos[dim] = _index_to_coord(grid, dim, p)
    return pos["y"], pos["x"]


def _norm(data: np.ndarray, *, diverging: bool | None = None):
    """Colour scale of one map: its own range, sequential; diverging about 0 only when the map
    changes sign. Returns ``(cmap, vmin, vmax)``."""
    finite = np.asarray(data, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if diverging is None:
        diverging = lo < 0 < hi
    if diverging:
        lim = max(abs(lo), abs(hi)) or 1.0
        return "RdBu_r", -lim, lim
    if lo == hi:
        pad = abs(lo) * 1e-3 or 1e-12
        lo, hi = lo - pad, hi + pad
    return ("viridis" if hi > 0 else "viridis_r"), lo, hi


def _spatial(ds: xr.Dataset, state=None) -> xr.DataArray:
    """The coefficient maps (component, [z,] y, x) of an operator or of a family state."""
    if ds.attrs.get("pcmx_type") == "family" or ("spatial_basis" in ds and "coefficients" not in ds):
        if state is None:
            raise InputError("a family needs state= for this figure (e.g. state=0)")
        return family_coefficients(ds, state)
    if "coefficients" not in ds:
        raise InputError(f"this figure needs an operator or a family, got pcmx_type="
                         f"{ds.attrs.get('pcmx_type')!r}")
    return ds["coefficients"]


def _middle(da: xr.DataArray, dims=("z", "kz")) -> xr.DataArray:
    """The middle plane of 3D data (2D figures of 3D operators)."""
    return da.isel({d: da.sizes[d] // 2 for d in dims if d in da.dims})


def _window(psf: xr.DataArray, window) -> xr.DataArray:
    """``psf (ky, kx)`` on a common square window ``|k| <= window`` (in the kernel's units):
    cropped or zero-padded on the same pixel grid, interpolated where the pixel sizes differ."""
    if window is None:
        return psf
    ky, _ = _axis(psf, "ky")
    step = abs(ky[1] - ky[0]) if ky.size > 1 else 1.0
    half = int(np.floor(float(window) / step + 1e-6))
    grid = np.arange(-half, half + 1) * step
    c = {d: xr.DataArray(grid, dims=d) for d in ("ky", "kx")}
    if "ky" not in psf.coords:
        psf = psf.assign_coords(ky=_axis(psf, "ky")[0], kx=_axis(psf, "kx")[0])
    try:
        out = psf.reindex(c, method="nearest", tolerance=step / 4, fill_value=0.0)
    except (KeyError, ValueError):
        out = psf.interp(c, kwargs={"fill_value": 0.0})
    return out.fillna(0.0).assign_coords({d: (d, grid, psf.coords[d].attrs) for d in ("ky", "kx")})


def _kernel_half_width(ds: xr.Dataset) -> float:
    ky, _ = _axis(ds["psf_basis"], "ky")
    kx, _ = _axis(ds["psf_basis"], "kx")
    return float(min(np.abs(ky).max(), np.abs(kx).max()))


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------
def psf_grid(ds: xr.Dataset, n: int = 5, *, state=None, window=None, normalize: str = "shared",
             gamma: float = 0.5, vmax: float | None = None, beads: bool = True, ax=None):
    """The PSFs over the field: the field cut into ``n x n`` cells, each drawn with the PSF at
    its centre (magnified), on the field's micrometre axes, with the bead positions.

    Parameters
    ----------
    ds : Dataset
        An operator, or a family (give ``state``).
    n : int
        Cells per side.
    state : label or int, optional
        The family state (:func:`pcmx.model.state_index`).
    window : float, optional
        Half-width of the PSF window shown, in the kernel's units (micrometres): the PSFs are
        cropped or zero-padded to ``[-window, window]``, so two operators learned with
        different kernel sizes compare on one window. Default: the kernel's own.
    normalize : {"shared", "tile"}
        ``"shared"``: one colour scale for all tiles (the PSF values, a PSF summing to one),
        so a dimmer, wider PSF in a corner shows as such; ``"tile"``: each tile divided by its
        own maximum (shapes only).
    gamma : float
        Power-law contrast (``matplotlib.colors.PowerNorm``); 1 for linear.
    vmax : float, optional
        Top of the colour scale (``"shared"``); e.g. the larger of two figures' to compare
        them on one scale. Default: the largest PSF value of the grid.
    beads : bool
        Overlay the beads the operator was learned from (``bead_y``, ``bead_x``) where stored.
    ax : Axes, optional

    Returns
    -------
    Figure; its first axes holds the ``n * n`` tiles (images), the cell boundaries (lines),
    the beads (a collection), and a colorbar.
    """
    from matplotlib.colors import PowerNorm

    plt = _pyplot()
    if normalize not in ("shared", "tile"):
        raise InputError(f"normalize={normalize!r}: expected 'shared' or 'tile'")
    full = _spatial(ds, state)
    spatial = _middle(full, ("z",))
    ny, nx = spatial.sizes["y"], spatial.sizes["x"]
    mid = {"z": full.sizes["z"] // 2} if "z" in full.dims else {}  # 3D: the middle plane
    (x0, x1, y1, y0), unit = _extent(spatial, "y", "x")
    cell_y, cell_x = (y1 - y0) / n, (x1 - x0) / n
    half = min(cell_y, cell_x) / 2 * 0.92
    tiles, centres = [], []
    for i in range(n):
        for j in range(n):
            py, px = (i + 0.5) * ny / n - 0.5, (j + 0.5) * nx / n - 0.5
            psf = _middle(psf_at(ds, y=py, x=px, state=state, index=True, **mid), ("kz",))
            psf = _window(psf, window)
            data = np.clip(np.asarray(psf.values, dtype=np.float64), 0, None)
            if normalize == "tile":
                data = data / (data.max() or 1.0)
            tiles.append(data)
            centres.append((y0 + (i + 0.5) * cell_y, x0 + (j + 0.5) * cell_x))
    top = 1.0 if normalize == "tile" else (vmax or max(t.max() for t in tiles) or 1.0)
    norm = PowerNorm(gamma, vmin=0.0, vmax=top)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.4, 5.6))
    ax.set_facecolor(plt.get_cmap("magma")(0.0))
    for data, (cy, cx) in zip(tiles, centres, strict=True):
        im = ax.imshow(data, cmap="magma", norm=norm, interpolation="nearest",
                       extent=[cx - half, cx + half, cy + half, cy - half])
    for k in range(1, n):
        ax.axhline(y0 + k * cell_y, color="w", lw=0.5, alpha=0.6)
        ax.axvline(x0 + k * cell_x, color="w", lw=0.5, alpha=0.6)
    bead_pos = _positions(spatial, ds, "bead_y", "bead_x") if beads else None
    if bead_pos is not None:
        ax.scatter(bead_pos[1], bead_pos[0], s=6, c="c", marker="o", linewidths=0,
                   alpha=0.8, label="beads")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_aspect("equal")
    _label_axes(ax, unit)
    k_half = _kernel_half_width(ds) if window is None else float(window)
    ku = _axis(ds["psf_basis"], "ky")[1]
    what = f" (state {state})" if state is not None else ""
    ax.set_title(f"PSFs over the field{what}; tiles show ±{k_half:.3g} {ku}", fontsize=10)
    cb = fig.colorbar(im, ax=ax, shrink=0.85)
    cb.set_label("PSF / tile max" if normalize == "tile" else "PSF value (sum 1)")
    return fig


def plot_basis(ds: xr.Dataset, *, fig=None):
    """The PSF basis h_i (top row) and the coefficient maps alpha_i, or a family's spatial
    modes a_j (bottom row), each on its own colour scale with its colorbar: sequential over
    its own range for a map of one sign, diverging about 0 only when it changes sign.

    Returns
    -------
    Figure: one image axes per panel (empty panels switched off) plus one colorbar axes per
    image.
    """
    plt = _pyplot()
    basis = _middle(ds["psf_basis"])
    family = "coefficients" not in ds
    maps = _middle(ds["spatial_basis"] if family else ds["coefficients"])
    nb, nm = basis.sizes["component"], maps.sizes[maps.dims[0]]
    n = max(nb, nm)
    fig = fig or plt.figure(figsize=(2.9 * n, 5.4), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    kext, kunit = _extent(basis, "ky", "kx")
    fext, funit = _extent(maps, "y", "x")
    for row, (stack, count, ext, unit, name) in enumerate(
            ((basis, nb, kext, kunit, "h"), (maps, nm, fext, funit, "a" if family else "alpha"))):
        for i in range(n):
            ax = axes[row, i]
            if i >= count:
                ax.set_axis_off()
                continue
            data = np.asarray(stack[i].values)
            cmap, lo, hi = _norm(data)
            im = ax.imshow(data, cmap=cmap, vmin=lo, vmax=hi, extent=ext, interpolation="nearest")
            ax.set_title(f"{name}_{i + 1}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.set_xlabel(f"x ({unit})", fontsize=7)
            if i == 0:
                ax.set_ylabel(f"y ({unit})", fontsize=7)
            cb = fig.colorbar(im, ax=ax, shrink=0.8)
            cb.ax.tick_params(labelsize=7)
    return fig


def psf_moments(ds: xr.Dataset, n: int = 16, *, state=None) -> xr.Dataset:
    """Width, ellipticity and orientation of the operator's PSFs at an ``n x n`` grid.

    The coefficients at the grid's pixels and one tensordot with the basis give every PSF at
    once; their second moments (negative values clipped to 0) give the covariance with
    eigenvalues ``l1 >= l2``.

    Returns
    -------
    Dataset over (y, x) (the cell centres, in the store's units): ``fwhm`` the
    Gaussian-equivalent FWHM ``2.355 (l1 l2)**(1/4)`` (kernel units: micrometres),
    ``fwhm_major``, ``fwhm_minor``, ``ellipticity`` ``1 - sqrt(l2 / l1)`` and ``orientation``
    of the major axis in degrees from +x towards +y (-90 to 90).
    """
    spatial = _middle(_spatial(ds, state), ("z",))
    basis = np.asarray(_middle(ds["psf_basis"]).values, dtype=np.float64)
    ny, nx = spatial.sizes["y"], spatial.sizes["x"]
    iy = np.clip(np.floor((np.arange(n) + 0.5) * ny / n).astype(int), 0, ny - 1)
    ix = np.clip(np.floor((np.arange(n) + 0.5) * nx / n).astype(int), 0, nx - 1)
    coeff = np.asarray(spatial.isel(y=xr.DataArray(iy, dims="y"), x=xr.DataArray(ix, dims="x"))
                       .transpose(spatial.dims[0], "y", "x").values, dtype=np.float64)
    psfs = np.clip(np.tensordot(coeff, basis, axes=([0], [0])), 0, None)  # (n, n, ky, kx)
    ky, _ = _axis(ds["psf_basis"], "ky")
    kx, _ = _axis(ds["psf_basis"], "kx")
    m0 = psfs.sum(axis=(2, 3))
    m0 = np.where(m0 > 0, m0, np.nan)
    my = np.einsum("abij,i->ab", psfs, ky) / m0
    mx = np.einsum("abij,j->ab", psfs, kx) / m0
    syy = np.einsum("abij,i->ab", psfs, ky ** 2) / m0 - my ** 2
    sxx = np.einsum("abij,j->ab", psfs, kx ** 2) / m0 - mx ** 2
    sxy = np.einsum("abij,i,j->ab", psfs, ky, kx) / m0 - my * mx
    tr, det = sxx + syy, sxx * syy - sxy ** 2
    disc = np.sqrt(np.clip((sxx - syy) ** 2 / 4 + sxy ** 2, 0, None))
    l1, l2 = np.clip(tr / 2 + disc, 0, None), np.clip(tr / 2 - disc, 0, None)
    fwhm = FWHM_PER_SIGMA * np.clip(det, 0, None) ** 0.25
    ell = 1 - np.sqrt(np.divide(l2, l1, out=np.ones_like(l1), where=l1 > 0))
    theta = np.degrees(0.5 * np.arctan2(2 * sxy, sxx - syy))
    coords = {"y": ("y", _index_to_coord(spatial, "y", iy), spatial["y"].attrs if "y" in spatial.coords else {}),
              "x": ("x", _index_to_coord(spatial, "x", ix), spatial["x"].attrs if "x" in spatial.coords else {})}
    kunits = ds["psf_basis"]["ky"].attrs.get("units", "pixel") if "ky" in ds["psf_basis"].coords else "pixel"
    dims = ("y", "x")
    return xr.Dataset({"fwhm": (dims, fwhm, {"units": kunits}),
                       "fwhm_major": (dims, FWHM_PER_SIGMA * np.sqrt(l1), {"units": kunits}),
                       "fwhm_minor": (dims, FWHM_PER_SIGMA * np.sqrt(l2), {"units": kunits}),
                       "ellipticity": (dims, ell), "orientation": (dims, theta, {"units": "degree"})},
                      coords=coords)


def _validation_map(ax, ds: xr.Dataset, grid):
    """Held-out beads coloured by log2(model error / space-invariant error)."""
    err = np.asarray(ds["cv_error"].values, dtype=np.float64)
    ref = np.asarray(ds["cv_error_invariant"].values, dtype=np.float64)
    ratio = np.log2(err / np.where(ref > 0, ref, np.nan))
    lim = float(np.nanmax(np.abs(ratio))) if np.isfinite(ratio).any() else 1.0
    by, bx = _positions(grid, ds, "cv_bead_y", "cv_bead_x")
    sc = ax.scatter(bx, by, c=ratio, cmap="coolwarm", vmin=-lim, vmax=lim, s=30,
                    edgecolors="k", linewidths=0.3)
    (x0, x1, y1, y0), unit = _extent(grid, "y", "x")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_aspect("equal")
    _label_axes(ax, unit)
    ax.set_title("held-out error, log2(model / reference)", fontsize=10)
    return sc


def field_maps(ds: xr.Dataset, n: int = 16, *, state=None, fig=None):
    """Field maps of the PSF's FWHM, ellipticity and orientation (:func:`psf_moments` on an
    ``n x n`` grid), and of the cross-validated error where the store has ``cv_error``: the
    homogeneity of the field of view that bead-QC tools report.

    Returns
    -------
    Figure with 3 map axes (4 with cross-validation), each with its colorbar.
    """
    plt = _pyplot()
    m = psf_moments(ds, n, state=state)
    spatial = _middle(_spatial(ds, state), ("z",))
    cv = "cv_error" in ds and "cv_error_invariant" in ds
    npanel = 4 if cv else 3
    fig = fig or plt.figure(figsize=(4.4 * npanel, 4.0), layout="constrained")
    axes = fig.subplots(1, npanel, squeeze=False)[0]
    ext, unit = _extent(spatial, "y", "x")
    ku = "µm" if m["fwhm"].attrs.get("units") == "micrometer" else "px"
    panels = (("fwhm", f"PSF FWHM ({ku})", "viridis", None),
              ("ellipticity", "ellipticity 1 - minor/major", "magma", (0.0, None)),
              ("orientation", "major axis (deg from +x)", "twilight", (-90.0, 90.0)))
    for ax, (name, title, cmap, lims) in zip(axes, panels, strict=False):
        data = m[name].values
        _, lo, hi = _norm(data)
        if lims is not None:
            lo = lims[0] if lims[0] is not None else lo
            hi = lims[1] if lims[1] is not None else max(hi, lo + 1e-6)
        im = ax.imshow(data, cmap=cmap, vmin=lo, vmax=hi, extent=ext, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        _label_axes(ax, unit)
        fig.colorbar(im, ax=ax, shrink=0.8)
    if cv:
        sc = _validation_map(axes[3], ds, spatial)
        fig.colorbar(sc, ax=axes[3], shrink=0.8)
    return fig


def family_states(ds: xr.Dataset, *, states=None, fig=None):
    """A family's states side by side: the PSF at the field centre (top row) and near the
    top-left corner (one tenth of the field in, bottom row) of each state, on one colour
    scale, micrometre kernel axes.

    Returns
    -------
    Figure: ``2 x len(states)`` image axes and one colorbar.
    """
    from matplotlib.colors import PowerNorm

    plt = _pyplot()
    if "gamma" not in ds or "state" not in ds.dims:
        raise InputError("family_states needs a family (pcmx_type 'family' with a state dim)")
    labels = list(ds["state"].values) if "state" in ds.coords else list(range(ds.sizes["state"]))
    labels = [v.item() if hasattr(v, "item") else v for v in labels]
    states = labels if states is None else list(states)
    sp = ds["spatial_basis"]
    ny, nx = sp.sizes["y"], sp.sizes["x"]
    where = {"centre": ((ny - 1) / 2, (nx - 1) / 2), "corner": (0.1 * (ny - 1), 0.1 * (nx - 1))}
    mid = {"z": ds.sizes["z"] // 2} if "z" in sp.dims else {}
    psfs = {(r, s): _middle(psf_at(ds, state=s, y=p[0], x=p[1], index=True, **mid), ("kz",))
            for r, p in where.items() for s in states}
    top = max(float(np.clip(v.values, 0, None).max()) for v in psfs.values()) or 1.0
    norm = PowerNorm(0.5, vmin=0.0, vmax=top)
    fig = fig or plt.figure(figsize=(2.6 * len(states) + 1.2, 5.4), layout="constrained")
    axes = fig.subplots(2, len(states), squeeze=False)
    for r, (name, (py, px)) in enumerate(where.items()):
        yc = float(_index_to_coord(sp, "y", py))
        xc = float(_index_to_coord(sp, "x", px))
        _, funit = _axis(sp, "y")
        for c, s in enumerate(states):
            psf = psfs[(name, s)]
            ext, unit = _extent(psf, "ky", "kx")
            ax = axes[r, c]
            im = ax.imshow(np.clip(psf.values, 0, None), cmap="magma", norm=norm, extent=ext,
                           interpolation="nearest")
            ax.tick_params(labelsize=7)
            if r == 0:
                ax.set_title(f"state {s}", fontsize=9)
            if r == 1:
                ax.set_xlabel(f"kx ({unit})", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"{name} (y={yc:.3g}, x={xc:.3g} {funit})\nky ({unit})", fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.8, label="PSF value (sqrt scale)")
    return fig


def deblur_panel(restoration: xr.Dataset, image=None, *, fig=None):
    """A deblurring result: the image (when given), the sparse part (point sources, with the
    sources used to identify the operator), the smooth part, and the restoration
    ``sparse + smooth``, each with its colorbar, micrometre axes.

    Parameters
    ----------
    restoration : Dataset
        What :func:`pcmx.deblur.deblur` returns (``restored``, and ``sparse``/``smooth``
        where present).
    image : DataArray or array, optional
        The blurred input.

    Returns
    -------
    Figure with one image axes (and colorbar) per panel.
    """
    from scipy.ndimage import maximum_filter

    plt = _pyplot()
    panels = []
    if image is not None:
        panels.append(("image", image, "gray"))
    if "sparse" in restoration:
        # widened by a 3 px max filter so single-pixel spikes survive the figure's resampling
        sparse = np.sqrt(maximum_filter(np.clip(np.asarray(restoration["sparse"].values), 0, None), size=3))
        panels.append(("sparse part (sqrt, 3 px max)", sparse, "magma"))
    if "smooth" in restoration:
        panels.append(("smooth part", restoration["smooth"], "magma"))
    if "restored" in restoration:
        panels.append(("restoration (sparse + smooth)" if "sparse" in restoration else "restoration",
                       restoration["restored"], "magma"))
    if not panels:
        raise InputError("deblur_panel needs a restoration (restored / sparse / smooth)")
    grid = restoration["restored"] if "restored" in restoration else restoration[
        "sparse" if "sparse" in restoration else "smooth"]
    ext, unit = _extent(grid, "y", "x")
    fig = fig or plt.figure(figsize=(4.6 * len(panels), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, data, cmap) in zip(axes, panels, strict=True):
        arr = np.asarray(data.values if isinstance(data, xr.DataArray) else data, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr[arr.shape[0] // 2]
        lo, hi = np.percentile(arr, [0.5, 99.8])
        if title == "image" or hi <= lo:
            lo, hi = (lo, hi) if hi > lo else (float(arr.min()), float(arr.max()) or 1.0)
        im = ax.imshow(arr, cmap=cmap, vmin=lo, vmax=hi, extent=ext, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        _label_axes(ax, unit)
        fig.colorbar(im, ax=ax, shrink=0.8)
        if title.startswith("sparse"):
            pos = _positions(grid, restoration, "source_y", "source_x")
            if pos is not None:
                ax.scatter(pos[1], pos[0], s=40, facecolors="none", edgecolors="c", linewidths=0.8,
                           label="sources used for identification")
    return fig


def plot_image(image, *, ax=None, title: str | None = None, percentile: float = 99.8):
    """An image with a robust contrast stretch (micrometre axes for a calibrated DataArray)
    and a colorbar. Returns the Figure."""
    plt = _pyplot()
    da = image if isinstance(image, xr.DataArray) else None
    data = np.asarray(image.values if da is not None else image, dtype=np.float32)
    if data.ndim == 3:
        data = data[data.shape[0] // 2]
        da = _middle(da, ("z",)) if da is not None and "z" in da.dims else None
    lo, hi = np.percentile(data, [0.5, percentile])
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.4, 5.6))
    if da is not None and {"y", "x"} <= set(da.dims):
        ext, unit = _extent(da, "y", "x")
        im = ax.imshow(data, cmap="gray", vmin=lo, vmax=hi, extent=ext)
        _label_axes(ax, unit)
    else:
        im = ax.imshow(data, cmap="gray", vmin=lo, vmax=hi)
        _label_axes(ax, "px")
    fig.colorbar(im, ax=ax, shrink=0.85)
    if title:
        ax.set_title(title)
    return fig


def plot_validation(ds: xr.Dataset, *, fig=None):
    """The held-out beads of a cross-validated operator (``learn_operator`` with validation):
    a field map of each bead's error ratio (model / space-invariant reference; blue where the
    model predicts the bead better) and the two error distributions.

    Returns
    -------
    matplotlib Figure with two axes (and the map's colorbar).

    Raises
    ------
    InputError
        ``ds`` carries no cross-validation (``cv_error``).
    """
    if "cv_error" not in ds or "cv_error_invariant" not in ds:
        raise InputError("plot_validation: the dataset has no cross-validation (cv_error); learn "
                         "with validate=True")
    plt = _pyplot()
    if fig is None:
        fig = plt.figure(figsize=(10, 4.2))
    ax_map, ax_hist = fig.subplots(1, 2)
    grid = ds["coefficients"] if "coefficients" in ds else ds
    sc = _validation_map(ax_map, ds, grid)
    fig.colorbar(sc, ax=ax_map, shrink=0.8)
    err = np.asarray(ds["cv_error"].values, dtype=np.float64)
    ref = np.asarray(ds["cv_error_invariant"].values, dtype=np.float64)
    bins = np.linspace(0, float(np.nanmax([err.max(), ref.max()])), 25)
    ax_hist.hist(ref, bins=bins, alpha=0.6, label=f"space-invariant reference (median {np.median(ref):.3f})")
    ax_hist.hist(err, bins=bins, alpha=0.6, label=f"model (median {np.median(err):.3f})")
    ax_hist.set_xlabel("relative l2 error of the held-out bead")
    ax_hist.set_ylabel("beads")
    ax_hist.legend(fontsize=8)
    return fig
