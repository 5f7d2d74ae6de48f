"""Coarse lattices and separable upsampling to every pixel (used by App. C-a and C-b).

Coefficient maps are smooth: :mod:`pcmx.coefficients` evaluates its thin-plate spline exactly
on a coarse lattice only, and :mod:`pcmx.cone` projects only the lattice onto the cone; both
then interpolate the lattice to every pixel, one axis at a time. This module holds that shared
machinery and nothing model-specific (no spline, no cone), so both modules import it and
neither imports the other for it.

Public API
----------
``lattice_nodes(n, step, *, integer=False) -> (G,)``
    Node coordinates along one axis, from pixel 0 to pixel ``n - 1``.
``AxisInterp(nodes, n, kind)``
    Interpolation along one axis from the nodes to every pixel: not-a-knot cubic spline or
    linear (non-negative weights, a convex combination).
``separable_upsample(coarse, ops, *, dtype=np.float32) -> (I, *shape)``
    One :class:`AxisInterp` per spatial axis applied to lattice values ``(I, *lattice)``.
``interpolate_samples(coarse, ops, sample) -> (S, I)``
    The same interpolation at a few pixels only (to measure its error).
``lattice_blocks(lattice_shape, limit)``
    Index tuples tiling a lattice in blocks of at most ``limit`` nodes.
``check_pixels(points, shape) -> (S, d)``
    Pixels where an interpolation is checked: next to each bead, plus 1024 random ones.
``default_step(points, domain_shape) -> int``
    The lattice step chosen from the bead spacing (see ``docs/coefficients.md``).
``adaptive_upsample(evaluate, shape, step, *, sample, exact, block, tol=None, kind="cubic",
dtype=np.float32, project=None) -> (maps, info)``
    Exact values on the lattice (projected by ``project``), upsampled; the step halved until
    the sampled error is below ``tol`` (plus the projection's own moves around each pixel).

Conventions: pixel centres are at integer positions ``0 .. n-1`` along each axis; values on a
lattice are arrays ``(I, *lattice)``, component axis first, like coefficient maps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from scipy.interpolate import CubicSpline

from .errors import InputError

__all__ = [
    "AxisInterp",
    "adaptive_upsample",
    "check_pixels",
    "default_step",
    "interpolate_samples",
    "lattice_blocks",
    "lattice_nodes",
    "separable_upsample",
    "working_dtype",
]

# Lattice step = bead spacing / _SPACING_PER_STEP, clipped to [_MIN_STEP, _MAX_STEP] pixels.
# Measured in docs/coefficients.md: max error < 1e-3 of the map's range at GCV smoothing.
_SPACING_PER_STEP = 4.0
_MIN_STEP, _MAX_STEP = 4, 32
# Sampled interpolation: at most about this many values in one temporary array.
_CHUNK = 1 << 22


def working_dtype(dtype) -> type:
    """Precision of lattice values and upsampling: float64 if ``dtype`` is float64, else float32."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def lattice_nodes(n: int, step: int, *, integer: bool = False) -> np.ndarray:
    """Coordinates of a lattice of spacing <= ``step`` from pixel 0 to pixel ``n - 1``.

    Parameters
    ----------
    n : int
        Number of pixels along the axis.
    step : int
        Largest spacing between nodes, in pixels.
    integer : bool, default False
        False: evenly spaced (possibly fractional) nodes, ``ceil((n-1)/step) + 1`` of them.
        True: ``0, step, 2 step, ...`` and ``n - 1`` (nodes on pixels, spacing ``step``
        except maybe the last).

    Returns
    -------
    ndarray (G,) float64
        Increasing, first 0 and last ``n - 1``. Axes with fewer than 5 lattice nodes
        (``n <= 4 step``), or ``step <= 1``, use every pixel ``0 .. n-1``.
    """
    if step <= 1 or n <= 4 * step:
        return np.arange(n, dtype=np.float64)
    if integer:
        return np.unique(np.r_[np.arange(0, n, step), n - 1]).astype(np.float64)
    return np.linspace(0.0, n - 1.0, int(np.ceil((n - 1) / step)) + 1)


class AxisInterp:
    """Interpolation along one axis, from lattice values at ``nodes`` to pixels ``0 .. n-1``.

    Parameters
    ----------
    nodes : array (G,)
        Increasing node coordinates in ``[0, n - 1]`` (e.g. from :func:`lattice_nodes`).
    n : int
        Number of pixels.
    kind : {"cubic", "linear"}
        "cubic": not-a-knot cubic spline, as a dense (n, G) matrix (the spline is linear in
        the data: column g is the spline of the g-th unit vector); exact on cubic polynomials.
        "linear": two non-negative weights per pixel summing to one (a convex combination),
        applied by gathers; exact on affine functions. Nodes equal to ``0 .. n-1`` make the
        identity.

    Raises
    ------
    InputError
        An unknown ``kind``.
    """

    def __init__(self, nodes: np.ndarray, n: int, kind: str) -> None:
        self.nodes, self.n, self.kind = np.asarray(nodes, dtype=np.float64), int(n), kind
        self.identity = len(self.nodes) == n and bool(np.array_equal(self.nodes, np.arange(n)))
        x = np.arange(n, dtype=np.float64)
        if self.identity:
            return
        if kind == "cubic":
            self.mat = CubicSpline(self.nodes, np.eye(len(self.nodes)), bc_type="not-a-knot")(x)
        elif kind == "linear":
            self.j = np.clip(np.searchsorted(self.nodes, x, side="right") - 1, 0, len(self.nodes) - 2)
            self.t = (x - self.nodes[self.j]) / (self.nodes[self.j + 1] - self.nodes[self.j])
        else:
            raise InputError(f"kind: expected 'cubic' or 'linear', got {kind!r}")

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Dense interpolation weights ``(len(idx), G)`` of the given pixels."""
        idx = np.asarray(idx, dtype=np.intp)
        out = np.zeros((len(idx), len(self.nodes)))
        k = np.arange(len(idx))
        if self.identity:
            out[k, idx] = 1.0
        elif self.kind == "cubic":
            out[:] = self.mat[idx]
        else:
            out[k, self.j[idx]] = 1.0 - self.t[idx]
            out[k, self.j[idx] + 1] += self.t[idx]
        return out

    def apply(self, arr: np.ndarray, axis: int, out: np.ndarray | None = None) -> np.ndarray:
        """Interpolate ``arr`` along ``axis`` (lattice -> pixels), in ``arr``'s float dtype.

        Parameters
        ----------
        arr : ndarray
            Values with ``G`` entries along ``axis``.
        axis : int
        out : ndarray, optional
            Written in place (``n`` entries along ``axis``).

        Returns
        -------
        ndarray
            ``arr`` with ``n`` entries along ``axis`` (``arr`` itself for the identity).
        """
        if self.identity:
            if out is None:
                return arr
            out[...] = arr
            return out
        if self.kind == "cubic":
            mat = self.mat.astype(arr.dtype, copy=False)
            if axis == 0 and out is not None:
                np.matmul(mat, arr.reshape(arr.shape[0], -1), out=out.reshape(self.n, -1))
                return out
            res = np.moveaxis(np.tensordot(arr, mat, axes=([axis], [1])), -1, axis)
            if out is None:
                return res
            out[...] = res
            return out
        shape = [1] * arr.ndim
        shape[axis] = self.n
        w = self.t.astype(arr.dtype).reshape(shape)
        hi = np.take(arr, self.j + 1, axis=axis)
        lo = np.take(arr, self.j, axis=axis, out=out)
        lo *= 1 - w
        hi *= w
        lo += hi
        return lo


def separable_upsample(coarse: np.ndarray, ops: Sequence[AxisInterp], *, dtype=np.float32) -> np.ndarray:
    """Apply one :class:`AxisInterp` per spatial axis to lattice values.

    Parameters
    ----------
    coarse : ndarray (I, *lattice)
        Values at the lattice nodes, component axis first.
    ops : sequence of AxisInterp
        One per spatial axis, in axis order.
    dtype : dtype, default float32
        Output dtype; the arithmetic is float32 unless it is float64.

    Returns
    -------
    ndarray (I, *shape) of ``dtype``, ``shape = (op.n for op in ops)``

    Notes
    -----
    Trailing axes first (small intermediates), axis 0 last, written straight into the output.
    """
    work = working_dtype(dtype)
    c = coarse.astype(work, copy=False)
    out = np.empty((c.shape[0],) + tuple(op.n for op in ops), dtype=work)
    for i in range(c.shape[0]):
        t = c[i]
        for a in range(len(ops) - 1, 0, -1):
            t = ops[a].apply(t, a)
        ops[0].apply(t, 0, out=out[i])
    return out.astype(dtype, copy=False)


def interpolate_samples(coarse: np.ndarray, ops: Sequence[AxisInterp], sample: np.ndarray) -> np.ndarray:
    """Interpolated values at a few pixels from lattice values, as :func:`separable_upsample`.

    Parameters
    ----------
    coarse : ndarray (I, *lattice)
    ops : sequence of AxisInterp
        One per spatial axis.
    sample : int array (S, d)
        Pixel indices.

    Returns
    -------
    ndarray (S, I) float64

    Notes
    -----
    In chunks of samples: the first contraction leaves an ``(I, chunk, *lattice[1:])`` array,
    kept below ~4 M values, in ``coarse``'s dtype (no float64 copy of a float32 lattice).
    """
    n_out, lat = coarse.shape[0], coarse.shape[1:]
    flat = coarse.reshape(n_out, lat[0], -1)
    rest = int(np.prod(lat[1:]))
    chunk = max(1, _CHUNK // max(1, n_out * rest))
    approx = np.empty((len(sample), n_out))
    for s in range(0, len(sample), chunk):
        smp = sample[s : s + chunk]
        rows = [op.rows(smp[:, a]).astype(coarse.dtype, copy=False) for a, op in enumerate(ops)]
        t = np.matmul(rows[0], flat)  # (I, chunk, rest)
        t = t.reshape(n_out, len(smp), *lat[1:])
        for r in rows[1:]:  # contract the next axis with each sample's own row
            t = np.einsum("ing...,ng->in...", t, r)
        approx[s : s + len(smp)] = t.T
    return approx


def lattice_blocks(lat: tuple[int, ...], limit: int) -> Iterator[tuple[slice, ...]]:
    """Index tuples (one slice per axis) tiling a lattice of shape ``lat`` in C order.

    Parameters
    ----------
    lat : tuple of int
        Lattice shape.
    limit : int
        Largest number of nodes in a block (at least 1 is used).

    Yields
    ------
    tuple of slice
        Runs of whole rows (slabs) along the first axis or, when one row already holds more
        than ``limit`` nodes, single rows split further. Every node is in exactly one block.
    """
    limit = max(1, int(limit))
    inner = int(np.prod(lat[1:]))
    if len(lat) == 1 or inner <= limit:
        rows = max(1, limit // max(1, inner))
        rest = tuple(slice(None) for _ in lat[1:])
        for s in range(0, lat[0], rows):
            yield (slice(s, min(s + rows, lat[0])), *rest)
        return
    for s in range(lat[0]):
        for sub in lattice_blocks(lat[1:], limit):
            yield (slice(s, s + 1), *sub)


def check_pixels(points, shape) -> np.ndarray:
    """Pixels where a lattice interpolation is checked: next to each bead, plus random ones.

    Parameters
    ----------
    points : array (M, d)
        Bead positions in pixel units (where a thin-plate kernel is least smooth).
    shape : tuple of int
        Grid shape.

    Returns
    -------
    int ndarray (S, d)
        The distinct pixels ``floor(p)`` and ``floor(p) + 1`` of every bead and 1024 pixels
        drawn with a fixed seed, clipped to the grid, in lexicographic order.
    """
    hi = np.asarray(shape) - 1
    near = np.floor(np.asarray(points)).astype(np.int64)
    pix = [near, near + 1]
    rng = np.random.default_rng(0)
    pix.append(rng.integers(0, np.asarray(shape), size=(1024, len(shape))))
    return np.unique(np.clip(np.concatenate(pix), 0, hi), axis=0)


def default_step(points, domain_shape) -> int:
    """Lattice step for coefficient maps: bead spacing / 4, clipped to [4, 32] pixels.

    Parameters
    ----------
    points : array (M, d)
        Bead positions (only their number is used).
    domain_shape : tuple of int
        Field shape.

    Returns
    -------
    int

    Notes
    -----
    The bead spacing is ``(field volume / M) ** (1/d)``. With GCV smoothing the cubic
    interpolation error of a thin-plate spline at this step is ~1e-4 of the PSF (measured in
    ``docs/coefficients.md``).
    """
    pts = np.asarray(points)
    spacing = (float(np.prod(domain_shape)) / max(1, len(pts))) ** (1.0 / len(domain_shape))
    return int(np.clip(np.floor(spacing / _SPACING_PER_STEP), _MIN_STEP, _MAX_STEP))


def _cell_max(values: np.ndarray, nodes: Sequence[np.ndarray], sample: np.ndarray) -> np.ndarray:
    """Largest of ``values`` (a lattice of scalars) over the 2^d corners of each sample's cell."""
    cell = values.copy()
    for a in range(values.ndim):  # a cell's value: the max of its node and the next one per axis
        if values.shape[a] > 1:
            cur, nxt = [slice(None)] * values.ndim, [slice(None)] * values.ndim
            cur[a], nxt[a] = slice(0, -1), slice(1, None)
            np.maximum(cell[tuple(cur)], cell[tuple(nxt)], out=cell[tuple(cur)])
    idx = [np.clip(np.searchsorted(nd, sample[:, a], side="right") - 1, 0, max(len(nd) - 2, 0))
           for a, nd in enumerate(nodes)]
    return cell[tuple(idx)]


# A lattice node counts as projected (info["n_projected"]) when the projection moves it by more
# than this, PSF-relative (as tol).
_MOVED = 1e-4


def adaptive_upsample(evaluate: Callable[[list[np.ndarray]], np.ndarray], shape: tuple[int, ...],
                      step: int, *, sample: np.ndarray, exact: np.ndarray, block: int,
                      tol: float | None = None, kind: str = "cubic", dtype=np.float32,
                      project: Callable[[np.ndarray], np.ndarray] | None = None):
    """Exact values on a lattice, separable interpolation to every pixel, step refined to ``tol``.

    Parameters
    ----------
    evaluate : callable
        ``evaluate(nodes) -> (I, *lattice)``: the exact values on the tensor lattice
        ``nodes[0] x nodes[1] (x nodes[2])`` (e.g. a spline's values).
        Called block by block, on at most ``block`` nodes at a time.
    shape : tuple of int
        The pixel grid.
    step : int
        Lattice spacing to start from (nodes from :func:`lattice_nodes`).
    sample : int array (S, d)
        Pixels where the interpolation is checked (e.g. :func:`check_pixels`).
    exact : array (S, I)
        The exact values there (projected by ``project``'s row-wise counterpart, if any).
    block : int
        Largest number of nodes passed to ``evaluate`` at once: the peak memory is one block's
        temporaries plus the lattice itself (:func:`lattice_blocks`).
    tol : float, optional
        Halve the step until the PSF-relative error ``max ||approx - exact|| / rms ||exact||``
        at the sampled pixels is at most ``tol``, or every pixel is a node. None: keep ``step``.
        With ``project``: at most ``tol`` plus the largest move of the projection at the
        nodes of the pixel's lattice cell (see Notes).
    kind : {"cubic", "linear"}
        The interpolation (:class:`AxisInterp`).
    dtype : dtype, default float32
        Output dtype; lattice values are held in :func:`working_dtype` of it.
    project : callable, optional
        A realism projection of lattice values, ``project((I, *block)) -> (I, *block)``
        (e.g. onto a cone), applied to each block of ``evaluate``'s values; use with
        ``kind="linear"`` (non-negative interpolation weights keep every pixel a
        combination of projected nodes).

    Returns
    -------
    maps : ndarray (I, *shape) of ``dtype``
    info : dict
        ``"step"``, ``"max_error"`` (PSF-relative, as tol, over every sampled pixel),
        ``"max_error_per_map"`` (each component's max error relative to its range at the
        sampled pixels), ``"n_checked"``, ``"max_excess"`` (the largest sampled error minus the
        projection's largest move at the nodes of its cell: what ``tol`` bounds; the
        ``max_error`` without a projection), ``"n_nodes"`` and ``"n_projected"`` (nodes of the
        final lattice the projection moved by more than 1e-4, PSF-relative).

    Notes
    -----
    A projection is not smooth where it starts to act or changes face (the projected maps
    have kinks there), so the interpolation of projected nodes converges at first order
    only in the cells around them: each halving of the step halves that error and
    quadruples the nodes to project. Refining until it meets ``tol`` drove real planes whose
    beads were half erased (the spline extrapolating over the empty cells, the projection
    active on 75% of the field) to 2-4 px lattices and ~50 s of projections per 512 x 512
    image (``docs/performance.md``). A pixel's error is therefore allowed, beyond ``tol``, the
    largest move of the projection at its cell's nodes. Where no node of a cell moves this is
    ``tol``, as without a projection; across a kink the interpolation of projected nodes
    stays within about half of their move of the exact projection (the error of linear
    interpolation of ``max(0, g)``), so kinks stop driving the refinement, while a pixel the
    projection moves more than its cell's nodes (an unresolved pocket of unrealistic PSFs)
    still does. Every pixel is a convex combination of projected nodes either way.
    """
    step = int(step)
    kdt = working_dtype(dtype)
    n_out = exact.shape[1]
    # PSF-relative: with an orthonormal PSF basis, ||delta alpha|| / ||alpha|| is the
    # relative l2 error of the PSF; normalised by the RMS norm of the sampled vectors.
    ref = max(float(np.sqrt(np.mean(np.sum(exact * exact, axis=1)))), 1e-300)

    def lattice_values(nodes):
        # Exact values block by block, stored in the working precision of the upsampling
        # (separable_upsample casts to it anyway); with a projection, how far it moved each node.
        lat = tuple(len(n) for n in nodes)
        coarse = np.empty((n_out, *lat), dtype=kdt)
        shift = np.zeros(lat, dtype=np.float64)
        for sl in lattice_blocks(lat, block):
            vals = evaluate([n[s] for n, s in zip(nodes, sl, strict=True)])
            if project is not None:
                proj = project(vals)
                shift[sl] = np.sqrt(np.sum((np.asarray(proj, np.float64) - vals) ** 2, axis=0)) / ref
                vals = proj
            coarse[(slice(None), *sl)] = vals
        return coarse, shift

    while True:
        nodes = [lattice_nodes(n, step) for n in shape]
        coarse = None  # the previous (coarser) lattice is not needed any more
        coarse, shift = lattice_values(nodes)
        ops = [AxisInterp(nd, n, kind) for nd, n in zip(nodes, shape, strict=True)]
        approx = interpolate_samples(coarse, ops, sample)
        dist = np.linalg.norm(approx - exact, axis=1) / ref
        err = float(dist.max())
        excess = float((dist - _cell_max(shift, nodes, sample)).max()) if project is not None else err
        span = np.maximum(np.ptp(exact, axis=0), 1e-300)
        per_map = np.abs(approx - exact).max(axis=0) / span
        all_exact = all(op.identity for op in ops)
        if tol is None or excess <= tol or all_exact:
            break
        step = max(1, step // 2)
    if all_exact:
        maps = coarse.astype(dtype, copy=False)  # exact at every pixel: no full-size copy
    else:
        maps = separable_upsample(coarse, ops, dtype=dtype)
    del coarse
    return maps, {"step": step, "max_error": err, "max_error_per_map": per_map,
                  "n_checked": len(sample), "max_excess": excess,
                  "n_nodes": int(shift.size), "n_projected": int((shift > _MOVED).sum())}
