"""Figures: PSF grids over the field, PSF bases, coefficient maps (matplotlib, imported lazily)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from .model import psf_at

__all__ = ["psf_grid", "plot_basis", "plot_image", "plot_validation"]


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg",) and not matplotlib.is_interactive():
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def psf_grid(ds: xr.Dataset, n: int = 5, *, state=None, gamma: float = 0.5, ax=None):
    """Mosaic of the PSFs at an ``n x n`` grid of positions (contrast ``** gamma``).

    Works on operators, families (give ``state``) and anything with ``psf_at``.
    """
    plt = _plt()
    spatial = ds["coefficients"] if "coefficients" in ds else ds["spatial_basis"]
    ny, nx = spatial.sizes["y"], spatial.sizes["x"]
    ys = np.linspace(0, ny - 1, n + 2)[1:-1]
    xs = np.linspace(0, nx - 1, n + 2)[1:-1]
    tiles = []
    for y in ys:
        row = []
        for x in xs:
            mid = {"z": spatial.sizes["z"] // 2} if "z" in spatial.dims else {}  # 3D: the middle plane
            psf = np.asarray(psf_at(ds, y=y, x=x, state=state, index=True, **mid).values, dtype=np.float64)
            if psf.ndim == 3:
                psf = psf[psf.shape[0] // 2]
            psf = np.clip(psf, 0, None)
            row.append((psf / (psf.max() or 1)) ** gamma)
        tiles.append(np.concatenate(row, axis=1))
    mosaic = np.concatenate(tiles, axis=0)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(mosaic, cmap="magma")
    k = mosaic.shape[0] // n
    for i in range(1, n):
        ax.axhline(i * k - 0.5, color="w", lw=0.5)
        ax.axvline(i * k - 0.5, color="w", lw=0.5)
    ax.set_axis_off()
    ax.set_title(f"PSFs on a {n}x{n} grid over the field")
    return ax


def plot_basis(ds: xr.Dataset, *, fig=None):
    """The PSF basis h_i (top) and coefficient maps / spatial modes (bottom)."""
    plt = _plt()
    basis = ds["psf_basis"].values
    maps = ds["coefficients"] if "coefficients" in ds else ds["spatial_basis"]
    maps = np.asarray(maps.values)
    if basis.ndim == 4:
        basis = basis[:, basis.shape[1] // 2]
        maps = maps[:, maps.shape[1] // 2]
    n = max(basis.shape[0], maps.shape[0])
    fig = fig or plt.figure(figsize=(2.2 * n, 4.4))
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        for row, stack in enumerate((basis, maps)):
            ax = axes[row, i]
            ax.set_axis_off()
            if i < stack.shape[0]:
                lim = np.abs(stack[i]).max() or 1
                ax.imshow(stack[i], cmap="RdBu_r", vmin=-lim, vmax=lim)
                ax.set_title(("h" if row == 0 else ("alpha" if "coefficients" in ds else "a")) + f"_{i + 1}", fontsize=9)
    return fig


def plot_image(image, *, ax=None, title: str | None = None, percentile: float = 99.8):
    """An image with a robust contrast stretch."""
    plt = _plt()
    data = np.asarray(image.values if isinstance(image, xr.DataArray) else image, dtype=np.float32)
    if data.ndim == 3:
        data = data[data.shape[0] // 2]
    lo, hi = np.percentile(data, [0.5, percentile])
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(data, cmap="gray", vmin=lo, vmax=hi)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def plot_validation(ds: xr.Dataset, *, fig=None):
    """The held-out beads of a cross-validated operator (``learn_operator`` with validation):
    a field map of each bead's error ratio (model / space-invariant reference; blue where the
    model predicts the bead better) and the two error distributions.

    Returns
    -------
    matplotlib Figure with two axes.

    Raises
    ------
    InputError
        ``ds`` carries no cross-validation (``cv_error``).
    """
    from .errors import InputError

    if "cv_error" not in ds or "cv_error_invariant" not in ds:
        raise InputError("plot_validation: the dataset has no cross-validation (cv_error); learn "
                         "with validate=True")
    plt = _plt()
    if fig is None:
        fig = plt.figure(figsize=(10, 4.2))
    ax_map, ax_hist = fig.subplots(1, 2)
    err = np.asarray(ds["cv_error"].values, dtype=np.float64)
    ref = np.asarray(ds["cv_error_invariant"].values, dtype=np.float64)
    ratio = np.log2(err / np.where(ref > 0, ref, np.nan))
    lim = float(np.nanmax(np.abs(ratio))) if np.isfinite(ratio).any() else 1.0
    sc = ax_map.scatter(ds["cv_bead_x"].values, ds["cv_bead_y"].values, c=ratio, cmap="coolwarm",
                        vmin=-lim, vmax=lim, s=30, edgecolors="k", linewidths=0.3)
    ny = ds.sizes.get("y")
    nx = ds.sizes.get("x")
    if ny and nx:
        ax_map.set_xlim(-0.5, nx - 0.5)
        ax_map.set_ylim(ny - 0.5, -0.5)
    ax_map.set_aspect("equal")
    ax_map.set_xlabel("x (px)")
    ax_map.set_ylabel("y (px)")
    ax_map.set_title("held-out error, log2(model / reference)")
    fig.colorbar(sc, ax=ax_map, shrink=0.8)
    bins = np.linspace(0, float(np.nanmax([err.max(), ref.max()])), 25)
    ax_hist.hist(ref, bins=bins, alpha=0.6, label=f"space-invariant reference (median {np.median(ref):.3f})")
    ax_hist.hist(err, bins=bins, alpha=0.6, label=f"model (median {np.median(err):.3f})")
    ax_hist.set_xlabel("relative l2 error of the held-out bead")
    ax_hist.set_ylabel("beads")
    ax_hist.legend(fontsize=8)
    return fig
