"""Scenes: bead positions and brightness, smooth backgrounds, the camera, patch scattering."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.interpolate import RectBivariateSpline
from scipy.spatial import cKDTree

from ..errors import InputError

__all__ = ["sample_positions", "lognormal_brightness", "smooth_background", "camera",
           "scatter_patches"]

_HEX_DENSITY = math.pi / (2.0 * math.sqrt(3.0))  # densest packing of disks in the plane


def sample_positions(rng: np.random.Generator, shape, n: int, *, min_separation: float = 0.0,
                     margin: float = 0.0, grid: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Random sub-pixel positions ``(y, x)`` (pixel units) in ``[margin, size - 1 - margin]``.

    Parameters
    ----------
    min_separation : float
        Minimum distance between two positions (pixels), by rejection of random candidates.
    grid : bool
        Place the positions on a regular lattice instead (each jittered by up to half a pixel,
        so the sub-pixel offsets stay random).

    Raises
    ------
    InputError
        If ``n`` positions cannot fit at ``min_separation`` (the message gives the numbers).
    """
    ny, nx = shape[-2], shape[-1]
    hy, hx = ny - 1 - 2 * margin, nx - 1 - 2 * margin
    if n == 0:
        return np.zeros(0), np.zeros(0)
    if hy < 0 or hx < 0:
        raise InputError(f"margin={margin!r} pixels leaves no room in an image of {ny} x {nx}")
    if grid:
        return _grid_positions(rng, ny, nx, n, margin, min_separation)
    d = float(min_separation)
    if d <= 0:
        return margin + rng.uniform(0, hy, n), margin + rng.uniform(0, hx, n)
    # disks of diameter d centred in the box: at most the hexagonal density of the grown box
    capacity = _HEX_DENSITY * (hy + d) * (hx + d) / (math.pi * d * d / 4.0)
    if n > capacity:
        raise InputError(
            f"n_beads={n} cannot fit in {ny} x {nx} pixels with min_separation={d:g} pixels "
            f"(at most about {int(capacity)} fit, fewer at random)")
    ys, xs = np.zeros(0), np.zeros(0)
    for _ in range(400):
        need = n - ys.size
        if need <= 0:
            break
        m = max(4 * need, 256)
        cy, cx = margin + rng.uniform(0, hy, m), margin + rng.uniform(0, hx, m)
        cand = np.column_stack([cy, cx])
        keep = np.ones(m, dtype=bool)
        if ys.size:
            dist, _ = cKDTree(np.column_stack([ys, xs])).query(cand, distance_upper_bound=d)
            keep &= ~np.isfinite(dist) | (dist >= d)
        pairs = cKDTree(cand).query_pairs(d, output_type="ndarray")
        if len(pairs):
            # a candidate survives only if no earlier candidate conflicts with it
            keep[pairs.max(axis=1)] = False
        idx = np.flatnonzero(keep)[:need]
        ys, xs = np.concatenate([ys, cy[idx]]), np.concatenate([xs, cx[idx]])
    if ys.size < n:
        raise InputError(
            f"n_beads={n} cannot fit in {ny} x {nx} pixels with min_separation={d:g} pixels: "
            f"random placement stalled at {ys.size} (reduce n_beads or min_separation, or use "
            "grid=True)")
    return ys, xs


def _grid_positions(rng, ny, nx, n, margin, min_separation):
    hy, hx = ny - 1 - 2 * margin, nx - 1 - 2 * margin
    aspect = (hy + 1) / max(hx + 1, 1)
    cols = max(1, round(math.sqrt(n / aspect)))
    rows = math.ceil(n / cols)
    step_y, step_x = (hy + 1) / rows, (hx + 1) / cols
    if min(step_y, step_x) - 1.0 < min_separation:
        raise InputError(
            f"n_beads={n} on a grid in {ny} x {nx} pixels are {min(step_y, step_x):.3g} pixels "
            f"apart, less than min_separation={min_separation:g}")
    gy, gx = np.meshgrid(margin + (np.arange(rows) + 0.5) * step_y - 0.5,
                         margin + (np.arange(cols) + 0.5) * step_x - 0.5, indexing="ij")
    gy, gx = gy.ravel()[:n], gx.ravel()[:n]
    gy = np.clip(np.round(gy) + rng.uniform(-0.5, 0.5, n), margin, margin + hy)
    gx = np.clip(np.round(gx) + rng.uniform(-0.5, 0.5, n), margin, margin + hx)
    return gy, gx


def lognormal_brightness(rng: np.random.Generator, n: int, median: float, spread: float) -> np.ndarray:
    """Photons per bead: log-normal with the given median and log standard deviation."""
    return median * np.exp(spread * rng.standard_normal(n))


def smooth_background(rng: np.random.Generator, shape, *, level: float, variation: float,
                      scale: float) -> np.ndarray:
    """Smooth positive background (photons / pixel), float32, mean ``level``.

    An illumination gradient (a random linear ramp minus a vignetting term) times
    ``exp(variation * G)`` with ``G`` a unit-variance Gaussian random field of correlation
    length ``scale`` pixels, drawn on a coarse grid and interpolated by bicubic splines (so a
    2304 x 2304 field costs tens of milliseconds).
    """
    ny, nx = shape[-2], shape[-1]
    if level == 0:
        return np.zeros((ny, nx), dtype=np.float32)
    y = np.arange(ny, dtype=np.float64)
    x = np.arange(nx, dtype=np.float64)
    v = (y - (ny - 1) / 2) / max((ny - 1) / 2, 0.5)
    u = (x - (nx - 1) / 2) / max((nx - 1) / 2, 0.5)
    gy, gx = rng.normal(0.0, 0.5 * variation, 2)
    vignette = 0.25 * variation * rng.uniform(0.0, 1.0)
    ramp = 1.0 + gy * v[:, None] + gx * u[None, :] - vignette * (v[:, None] ** 2 + u[None, :] ** 2)
    ramp = np.maximum(ramp, 0.1)
    # Gaussian random field: white noise on a grid of step ~ scale / 4, Gaussian-filtered
    step = max(1.0, scale / 4.0)
    cy, cx = int(math.ceil((ny - 1) / step)) + 8, int(math.ceil((nx - 1) / step)) + 8
    noise = ndimage.gaussian_filter(rng.standard_normal((cy, cx)), scale / step / 2.0,
                                    mode="wrap")
    noise /= max(noise.std(), 1e-12)
    ky = np.arange(cy) * step - 4 * step
    kx = np.arange(cx) * step - 4 * step
    field = RectBivariateSpline(ky, kx, noise, kx=3, ky=3)(y, x)
    bg = ramp * np.exp(variation * field)
    bg *= level / bg.mean()
    return bg.astype(np.float32)


def camera(rng: np.random.Generator, expected: np.ndarray, *, gain: float, offset: float,
           read_noise: float, saturation: int) -> np.ndarray:
    """Camera counts (uint16 ADU) from expected photo-electrons.

    ``ADU = clip(round(gain * (Poisson(expected) + N(0, read_noise^2)) + offset), 0, saturation)``
    """
    electrons = rng.poisson(np.maximum(expected, 0.0)).astype(np.float32)
    if read_noise > 0:
        electrons += np.float32(read_noise) * rng.standard_normal(expected.shape, dtype=np.float32)
    adu = np.rint(electrons * np.float32(gain) + np.float32(offset))
    return np.clip(adu, 0, saturation).astype(np.uint16)


def scatter_patches(out: np.ndarray, patches: np.ndarray, iy: np.ndarray, ix: np.ndarray,
                    iz: np.ndarray | None = None, weights: np.ndarray | None = None) -> None:
    """Add ``weights[n] * patches[n]`` centred at ``(iz[n], iy[n], ix[n])`` into ``out`` in place.

    Patch centres are at index ``size // 2``; parts falling outside ``out`` are dropped. One
    ``np.bincount`` over the flattened indices (vectorised, no loop over beads or pixels).
    """
    n, sy, sx = patches.shape
    if n == 0:
        return
    ny, nx = out.shape[-2], out.shape[-1]
    oy = np.arange(sy) - sy // 2
    ox = np.arange(sx) - sx // 2
    yy = iy[:, None, None] + oy[None, :, None]
    xx = ix[:, None, None] + ox[None, None, :]
    inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    flat = yy * nx + xx
    if iz is not None:
        flat = flat + (iz[:, None, None] * (ny * nx))
    vals = patches if weights is None else patches * weights[:, None, None]
    flat, vals = np.broadcast_to(flat, vals.shape)[inside], vals[inside]
    out.reshape(-1)[:] += np.bincount(flat, weights=vals, minlength=out.size)
