"""Coefficient maps alpha_i by weighted thin-plate-spline smoothing (paper App. C-a, eq. (9)).

Each bead m at position ``z_m`` gives observed coefficients ``beta_m = (<p_m, h_i>)_i`` in the
PSF basis. The maps ``alpha_i`` are the minimisers of

    1/2 sum_m w_m |alpha(z_m) - beta_{i,m}|^2 + eta/2 |alpha|_{H2}^2,    |alpha|_{H2}^2 = int (Delta alpha)^2

with ``w_m`` the area of bead m's Voronoi cell clipped to the field. The solution is a
thin-plate spline ``alpha(z) = sum_m c_m phi(|z - z_m|) + d_0 + d . z`` from an ``(M+d+1)``
square linear system; all I components share one factorisation.

Public API
----------
``fit_tps(points, values, *, domain_shape, weights="voronoi", eta=None, gcv="per_component")
-> ThinPlateSpline``
    Fit (eta chosen by generalized cross-validation when None).
``ThinPlateSpline.__call__(points) -> (N, I) float64``
    Exact evaluation anywhere.
``ThinPlateSpline.evaluate_grid(shape=None, *, step=None, tol=1e-3, dtype=np.float32,
return_info=False) -> (I, *shape)``
    Exact on a coarse lattice, separable not-a-knot cubic spline to every pixel; the step is
    refined until a sampled PSF-relative error is below ``tol``.
``coefficient_maps(points, beta, shape, *, weights="voronoi", eta=None, step=None, tol=None,
generators=None, dtype=np.float32, return_spline=False) -> (I, *shape)``
    The two steps at once; with ``generators`` the coarse lattice is projected onto their cone
    (:mod:`pcmx.cone`, App. C-b) and upsampled bilinearly, so every pixel stays in the cone.
    ``return_spline=True`` also returns the spline (eta, GCV score, weights) and the lattice
    info (step, measured error).
``voronoi_weights(points, domain_shape) -> (M,)``
    Exact areas (volumes in 3D) of the Voronoi cells clipped to the field.

The lattice, its step (:func:`pcmx.lattice.default_step`) and the separable upsampling live in
:mod:`pcmx.lattice`, shared with :mod:`pcmx.cone`.

Conventions: positions are in pixel units in array-axis order, ``(y, x)`` or ``(z, y, x)``;
pixel centres are at integer positions ``0 .. n-1``, the field is the box
``[-0.5, n - 0.5]`` along each axis. ``eta`` is dimensionless: it is the paper's eta for
positions normalised by the field size (``u = (z - centre) / max(domain_shape)``) and weights
normalised to mean one, so one value means the same smoothness on any field and bead count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla
from scipy.optimize import minimize_scalar
from scipy.spatial import ConvexHull, Voronoi

from .cone import project_grid, project_onto_cone
from .errors import InputError
from .execution import blas_limit
from .lattice import adaptive_upsample, check_pixels, default_step, working_dtype

__all__ = [
    "ThinPlateSpline",
    "coefficient_maps",
    "fit_tps",
    "voronoi_weights",
]

# Delta^2 phi = 8 pi delta for phi = r^2 log r (2D) and phi = -r (3D): the H2 semi-norm of
# sum_m c_m phi(|. - z_m|) is 8 pi c^T K c, so eq. (9)'s eta enters the system as 8 pi eta / w_m.
_BIHARMONIC = 8.0 * np.pi
# Evaluation chunks: at most this many (node, bead) kernel values in memory at once.
_CHUNK = 1 << 22
# Lattice blocks: at most this many lattice nodes evaluated and projected onto the cone at once
# (the active-set projection holds ~1.5 kB per node with G ~ 30 generators: ~50 MB per block).
# The adaptive step can go down to 1 pixel on a field with an outlier bead, i.e. every pixel
# of a 2304 x 2304 field (5.3 M nodes, ~7 GB in one piece); in blocks the peak stays bounded.
_NODE_BLOCK = 1 << 15


# --------------------------------------------------------------------------------------------
# input checks


def _as_points(points, domain_shape, name: str = "points") -> tuple[np.ndarray, tuple[int, ...]]:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] not in (2, 3):
        raise InputError(f"{name}: expected an (M, 2) or (M, 3) array of positions, got shape {pts.shape}")
    shape = tuple(int(s) for s in np.atleast_1d(domain_shape))
    if len(shape) != pts.shape[1]:
        raise InputError(
            f"domain_shape: {shape} has {len(shape)} axes but {name} have {pts.shape[1]} coordinates"
        )
    if any(s < 1 for s in shape):
        raise InputError(f"domain_shape: every axis must be at least 1 pixel, got {shape}")
    if not np.all(np.isfinite(pts)):
        raise InputError(f"{name}: {int((~np.isfinite(pts)).any(axis=1).sum())} positions are NaN or infinite")
    lo, hi = -0.5, np.asarray(shape, dtype=np.float64) - 0.5
    outside = np.any((pts <= lo) | (pts >= hi), axis=1)
    if outside.any():
        first = pts[np.argmax(outside)]
        raise InputError(
            f"{name}: {int(outside.sum())} positions lie outside the field {shape} "
            f"(first: {tuple(np.round(first, 3))}; the field is [-0.5, n - 0.5] per axis)"
        )
    return pts, shape


def _check_distinct(pts: np.ndarray, name: str = "points") -> None:
    _, counts = np.unique(pts, axis=0, return_counts=True)
    if (counts > 1).any():
        raise InputError(f"{name}: {int((counts > 1).sum())} positions occur more than once")


# --------------------------------------------------------------------------------------------
# Voronoi weights


def voronoi_weights(points, domain_shape) -> np.ndarray:
    """Areas (2D) or volumes (3D) of the Voronoi cells of the beads, clipped to the field.

    The weights ``w_m`` of eq. (9) (paper App. C-a): a bead standing for a large empty region
    counts more than one among many neighbours.

    Parameters
    ----------
    points : array (M, 2) or (M, 3)
        Bead positions in pixel units, ``(y, x)`` or ``(z, y, x)``, strictly inside the field.
    domain_shape : tuple of int
        Field shape ``(ny, nx)`` or ``(nz, ny, nx)``; the field is ``[-0.5, n - 0.5]`` per axis.

    Returns
    -------
    ndarray (M,) float64
        Cell areas in square pixels (volumes in cubic pixels); they sum to the field's area.

    Raises
    ------
    InputError
        If positions are outside the field, repeated, non-finite, or fewer than ``d + 1``.

    Notes
    -----
    Exact clipping without a polygon library: the points are mirrored across each face of the
    field box. For a point q inside the box, a mirror of p is never closer than p itself, so
    the nearest-bead partition of the box is unchanged; for q beyond a face, the mirror of any
    bead is closer than the bead. Hence every original bead's Voronoi cell in the augmented
    set is bounded and equals its cell clipped to the box. Cell measures then follow from the
    ridges: in 2D, area = sum over ridges of ``length * |p - p'| / 4`` (pyramids with apex at
    the bead), vectorised with ``bincount``; in 3D, the convex hull volume of each cell's
    vertices (one ``ConvexHull`` per bead). This is exact, where a pixel count is only exact
    to the pixel, and costs a few milliseconds for M ~ 600.
    """
    pts, shape = _as_points(points, domain_shape)
    m, d = pts.shape
    if m < d + 1:
        raise InputError(f"points: need at least {d + 1} beads for Voronoi weights in {d}D, got {m}")
    _check_distinct(pts)
    lo = np.full(d, -0.5)
    hi = np.asarray(shape, dtype=np.float64) - 0.5
    mirrors = [pts]
    for a in range(d):
        for edge in (lo[a], hi[a]):
            mirrored = pts.copy()
            mirrored[:, a] = 2.0 * edge - pts[:, a]
            mirrors.append(mirrored)
    allpts = np.concatenate(mirrors)
    # Centre and scale for qhull's numerics; measures scale back by scale**d.
    centre, scale = (lo + hi) / 2, float(np.max(hi - lo))
    vor = Voronoi((allpts - centre) / scale)
    verts = vor.vertices * scale + centre
    if d == 2:
        rp = np.asarray(vor.ridge_points)
        rv = np.asarray(vor.ridge_vertices)
        keep = (rp.min(axis=1) < m) & (rv.min(axis=1) >= 0)
        rp, rv = rp[keep], rv[keep]
        length = np.linalg.norm(verts[rv[:, 0]] - verts[rv[:, 1]], axis=1)
        sep = np.linalg.norm(allpts[rp[:, 0]] - allpts[rp[:, 1]], axis=1)
        tri = length * sep / 4.0  # triangle (bead, ridge) area: base * height / 2, height = sep / 2
        area = np.zeros(len(allpts))
        np.add.at(area, rp[:, 0], tri)
        np.add.at(area, rp[:, 1], tri)
        return area[:m]
    vol = np.empty(m)
    for i in range(m):  # per bead, not per pixel: qhull once per cell
        region = vor.regions[vor.point_region[i]]
        vol[i] = ConvexHull(verts[region]).volume
    return vol


def _weights(weights, pts: np.ndarray, shape: tuple[int, ...], bead_weights=None) -> np.ndarray:
    m = len(pts)
    if bead_weights is not None:
        q = np.asarray(bead_weights, dtype=np.float64)
        if q.shape != (m,) or not np.all(np.isfinite(q)) or np.any(q <= 0):
            raise InputError(f"bead_weights: expected {m} finite positive values, got shape {q.shape}")
        base = _weights(weights, pts, shape)
        if np.all(q == q[0]):  # equal bead weights: exactly the weights alone
            return base
        w = base * q
        return np.maximum(w / w.mean(), 1e-3)
    if weights is None:
        return np.ones(m)
    if isinstance(weights, str):
        if weights != "voronoi":
            raise InputError(f"weights: expected None, 'voronoi' or an array of {m} values, got {weights!r}")
        w = voronoi_weights(pts, shape)
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (m,):
            raise InputError(f"weights: expected shape ({m},), got {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise InputError("weights: all weights must be finite and positive")
    w = w / w.mean()
    # A bead squeezed between close neighbours keeps a small but non-zero weight (1/W enters
    # the system as a smoothing diagonal).
    return np.maximum(w, 1e-3)


# --------------------------------------------------------------------------------------------
# kernel


def _kernel(d2: np.ndarray, ndim: int, out: np.ndarray | None = None) -> np.ndarray:
    """TPS kernel from squared distances, in place when ``out is d2``.

    2D: ``phi = r^2 log r = d2 log(d2) / 2`` (0 at r = 0). 3D: ``phi = -r`` (the biharmonic
    fundamental solution in 3D up to a positive factor; the sign makes the kernel conditionally
    positive definite of order 2).
    """
    if ndim == 2:
        tiny = np.finfo(d2.dtype).tiny
        logd = np.log(np.maximum(d2, tiny))
        res = np.multiply(d2, logd, out=out if out is not None else logd)
        res *= d2.dtype.type(0.5)
        return res
    r = np.sqrt(d2, out=out)
    return np.negative(r, out=r)


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = np.zeros((len(a), len(b)))
    for k in range(a.shape[1]):
        d2 += (a[:, k, None] - b[None, :, k]) ** 2
    return d2


# --------------------------------------------------------------------------------------------
# the spline


@dataclass(frozen=True, eq=False)
class ThinPlateSpline:
    """A fitted weighted thin-plate spline with I outputs (paper App. C-a, eq. (9)).

    Build with :func:`fit_tps`. Attributes are read-only.

    Attributes
    ----------
    points : ndarray (M, d)
        Bead positions in pixel units, array-axis order.
    domain_shape : tuple of int
        Field shape the spline was fitted for.
    weights : ndarray (M,)
        Sample weights ``w_m`` (mean one).
    eta : ndarray (I,)
        Smoothing weight of each component (dimensionless, see the module docstring).
    gcv_score : ndarray (I,) or None
        Generalized cross-validation score at ``eta`` (None when eta was given).
    kernel_coef : ndarray (M, I)
        ``c_m`` in normalised coordinates.
    poly_coef : ndarray (d + 1, I)
        Constant and linear coefficients in normalised coordinates.
    centre, scale : ndarray (d,), float
        Normalisation ``u = (z - centre) / scale``.
    """

    points: np.ndarray
    domain_shape: tuple[int, ...]
    weights: np.ndarray
    eta: np.ndarray
    gcv_score: np.ndarray | None
    kernel_coef: np.ndarray
    poly_coef: np.ndarray
    centre: np.ndarray
    scale: float
    _u: np.ndarray = field(repr=False)
    #: Leave-one-out residuals ``(y_m - yhat_m) / (1 - A_mm)`` of each bead and component
    #: (the value predicted from the other beads minus the observed one, sign flipped), from
    #: the smoother's diagonal; None when eta was given.
    loo_residuals: np.ndarray | None = field(default=None, repr=False)

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return self.points.shape[1]

    @property
    def n_outputs(self) -> int:
        """Number of components I."""
        return self.kernel_coef.shape[1]

    def __call__(self, points) -> np.ndarray:
        """Exact evaluation at arbitrary positions.

        Parameters
        ----------
        points : array (N, d)
            Positions in pixel units (any position, inside the field or not).

        Returns
        -------
        ndarray (N, I) float64
        """
        q = np.asarray(points, dtype=np.float64)
        if q.ndim != 2 or q.shape[1] != self.ndim:
            raise InputError(f"points: expected shape (N, {self.ndim}), got {q.shape}")
        u = (q - self.centre) / self.scale
        out = np.empty((len(u), self.n_outputs))
        rows = max(1, _CHUNK // max(1, len(self._u)))
        for s in range(0, len(u), rows):
            uu = u[s : s + rows]
            k = _kernel(_sqdist(uu, self._u), self.ndim)
            out[s : s + rows] = k @ self.kernel_coef + self.poly_coef[0] + uu @ self.poly_coef[1:]
        return out

    def evaluate_nodes(self, nodes: list[np.ndarray] | tuple[np.ndarray, ...], *,
                       kernel_dtype=np.float32) -> np.ndarray:
        """Exact evaluation on a tensor lattice ``nodes[0] x nodes[1] (x nodes[2])``.

        Parameters
        ----------
        nodes : sequence of d 1D arrays
            Pixel coordinates of the lattice along each axis.
        kernel_dtype : dtype, default float32
            Precision of the kernel values (the contraction with the coefficients is float64).
            float32 is ~10x faster (vectorised log) and its error, measured in
            ``docs/coefficients.md``, is below 1e-6 of the map's range; float64 is exact.

        Returns
        -------
        ndarray (I, *lattice_shape) float64
        """
        if len(nodes) != self.ndim:
            raise InputError(f"nodes: expected {self.ndim} axes, got {len(nodes)}")
        ax = [(np.asarray(n, dtype=np.float64) - c) / self.scale for n, c in zip(nodes, self.centre, strict=True)]
        lat = tuple(len(a) for a in ax)
        # Squared distance is separable: sum over axes of (node_a - u_a)^2, one (n_a, M) table each.
        tables = [((a[:, None] - self._u[None, :, k]) ** 2).astype(kernel_dtype) for k, a in enumerate(ax)]
        m = len(self._u)
        inner = int(np.prod(lat[1:]))
        rows = max(1, _CHUNK // max(1, inner * m))
        coef = self.kernel_coef.astype(kernel_dtype)
        out = np.empty((int(np.prod(lat)), self.n_outputs))
        for s in range(0, lat[0], rows):
            t0 = tables[0][s : s + rows]
            if self.ndim == 2:
                d2 = t0[:, None, :] + tables[1][None, :, :]
            else:
                d2 = t0[:, None, None, :] + tables[1][None, :, None, :] + tables[2][None, None, :, :]
            k = _kernel(d2, self.ndim, out=d2).reshape(-1, m)
            out[s * inner : (s + len(t0)) * inner] = k @ coef
        grids = np.meshgrid(*ax, indexing="ij")
        lin = sum(g.reshape(-1, 1) * self.poly_coef[1 + k] for k, g in enumerate(grids))
        out += self.poly_coef[0] + lin
        return np.moveaxis(out.reshape(*lat, self.n_outputs), -1, 0)

    def evaluate_grid(self, shape=None, *, step: int | None = None, tol: float = 1e-3,
                      dtype=np.float32, return_info: bool = False):
        """Evaluate on every pixel of a grid without M x N kernel evaluations.

        Exact evaluation on a lattice of spacing at most ``step`` pixels (including the first and
        last pixel of each axis), then a separable not-a-knot cubic spline to every pixel, as
        one float32 matrix product per axis.

        Parameters
        ----------
        shape : tuple of int, optional
            Grid shape; ``domain_shape`` by default.
        step : int, optional
            Lattice spacing in pixels. None: start from :func:`pcmx.lattice.default_step`
            (bead spacing / 4)
            and halve it until the sampled error is below ``tol``. 1: exact at every pixel
            (M x N kernel values: small grids only).
        tol : float, default 1e-3
            With ``step=None``: bound on the sampled PSF-relative error
            ``max ||alpha~(p) - alpha(p)|| / rms ||alpha||`` (with an orthonormal PSF basis,
            the relative l2 error of the PSF at the worst pixel), checked against exact values
            at the pixels next to every bead (where the ``r^2 log r`` kernel is least smooth)
            and at 1024 random pixels.
        dtype : dtype, default float32
            float64 also makes the lattice kernel values float64 (exact with ``step=1``).
        return_info : bool
            Also return ``{"step", "max_error" (PSF-relative, as tol), "max_error_per_map"
            (each map's max error relative to its range), "n_checked"}``.

        Returns
        -------
        maps : ndarray (I, *shape) of ``dtype``
        info : dict, only with ``return_info=True``

        Notes
        -----
        Measured on a 2304 x 2304 field with 600 beads and GCV smoothing, the default step
        (23 px) gives a PSF-relative error of 1e-4 (7e-4 of the worst map's range) over 31000
        sampled pixels and takes ~0.1 s for I = 5 (``docs/coefficients.md``).
        """
        shape = self._grid_shape(shape)
        maps, info = _adaptive_lattice(self, shape, step, tol, kind="cubic", generators=None, dtype=dtype)
        return (maps, info) if return_info else maps

    def _grid_shape(self, shape) -> tuple[int, ...]:
        shape = self.domain_shape if shape is None else tuple(int(s) for s in shape)
        if len(shape) != self.ndim or any(s < 1 for s in shape):
            raise InputError(f"shape: expected {self.ndim} positive axis lengths, got {shape}")
        return shape


def _adaptive_lattice(tps: ThinPlateSpline, shape, step, tol, *, kind, generators, dtype, project=None):
    """Exact lattice values (projected onto the cone with ``generators``) + separable upsampling.

    With ``step=None`` the step starts at :func:`pcmx.lattice.default_step` (halved for
    bilinear) and is halved until the PSF-relative error at the sampled pixels is <= tol
    (:func:`pcmx.lattice.adaptive_upsample`).
    """
    if not (np.isfinite(tol) and tol > 0):
        raise InputError(f"tol: must be a positive number, got {tol}")
    auto = step is None
    if auto:
        step = default_step(tps.points, tps.domain_shape)
        if kind == "linear":
            step = max(2, step // 2)
    step = int(step)
    if step < 1:
        raise InputError(f"step: must be a positive number of pixels, got {step}")
    # the realism projection: onto cone(generators) (App. C-b), or any row-wise projector
    # ``project((N, I) rows) -> rows`` (e.g. pcmx.cone.project_nonnegative)
    project_rows = project_lattice = None
    if generators is not None:

        def project_rows(rows):
            return project_onto_cone(rows, generators)

        def project_lattice(vals):
            return project_grid(vals, generators)
    elif project is not None:
        project_rows = project

        def project_lattice(vals):
            rows = np.moveaxis(vals, 0, -1).reshape(-1, vals.shape[0])
            out = np.asarray(project(rows), dtype=vals.dtype)
            return np.moveaxis(out.reshape(*vals.shape[1:], vals.shape[0]), -1, 0)

    kdt = working_dtype(dtype)

    def evaluate(nodes):
        return tps.evaluate_nodes(nodes, kernel_dtype=kdt)

    sample = check_pixels(tps.points, shape)
    exact = tps(sample)
    if project_rows is not None:
        exact = project_rows(exact)
    # the step is refined outside the cells the projection moves (its kinks converge at first
    # order only; see pcmx.lattice.adaptive_upsample)
    return adaptive_upsample(evaluate, shape, step, sample=sample, exact=exact,
                             tol=tol if auto else None, kind=kind, dtype=dtype, block=_NODE_BLOCK,
                             project=project_lattice)


# --------------------------------------------------------------------------------------------
# fitting


def _normalise(pts: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, float]:
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    scale = float(max(shape))
    return (pts - centre) / scale, centre, scale


def _gcv_curve(s: np.ndarray, lam: np.ndarray, z2: np.ndarray, omega: np.ndarray, m: int) -> np.ndarray:
    """GCV(s) for smoothing diagonals s (n,), eigenvalues lam (K,), z^2 (K, I) -> (n, I).

    ``V = M ||W^1/2 (I - A) y||^2 / (M - tr(W A))^2`` with residual components
    ``s/(lam_k+s) z_k`` and ``M - tr(W A) = sum_k omega_k s/(lam_k+s)`` (the d+1 polynomial
    directions are fitted exactly; ``omega_k = 1`` for uniform weights gives the classical
    ``tr(I - A)``).
    """
    r = s[:, None] / (lam[None, :] + s[:, None])
    return m * ((r * r) @ z2) / ((r @ omega) ** 2)[:, None]


def fit_tps(points, values, *, domain_shape, weights="voronoi", eta=None,
            gcv: str = "per_component", bead_weights=None) -> ThinPlateSpline:
    """Fit the weighted smoothing thin-plate spline of eq. (9) (paper App. C-a).

    Parameters
    ----------
    points : array (M, 2) or (M, 3)
        Bead positions ``z_m`` in pixel units, ``(y, x)`` or ``(z, y, x)``.
    values : array (M, I) or (M,)
        Observed coefficients ``beta_{i,m}`` (a 1D array is one component).
    domain_shape : tuple of int
        Field shape ``(ny, nx)`` or ``(nz, ny, nx)``: Voronoi clipping and normalisation.
    weights : "voronoi", None or array (M,), default "voronoi"
        ``w_m``: Voronoi cell areas clipped to the field (paper), uniform, or given. Normalised
        to mean one.
    eta : float, array (I,) or None
        Smoothing weight (dimensionless, positions normalised by ``max(domain_shape)``); 0
        interpolates. None: chosen by generalized cross-validation.
    gcv : {"per_component", "shared"}, default "per_component"
        With ``eta=None``: one eta per component (each map's own noise/smoothness trade-off),
        or one eta minimising the summed GCV score.
    bead_weights : array (M,), optional
        Per-bead factors on ``weights`` (e.g. :func:`pcmx.psf_basis.snr_weights` of the beads'
        signal-to-noise ratios, issue 12): ``w_m = area_m * q_m``, then mean one.

    Returns
    -------
    ThinPlateSpline

    Raises
    ------
    InputError
        Bad shapes, non-finite values, repeated positions, positions outside the field, fewer
        than ``d + 2`` beads, beads all on one line (plane in 3D), negative eta.

    Notes
    -----
    With ``u`` the normalised positions, ``K = phi(|u_m - u_n|)`` (``r^2 log r`` in 2D, ``-r``
    in 3D), ``P = [1, u]`` and ``W = diag(w)``, the minimiser of (9) is
    ``alpha(u) = sum_m c_m phi(|u - u_m|) + P(u) d`` with
    ``(K + 8 pi eta W^-1) c + P d = beta``, ``P^T c = 0`` (Wahba 1990; ``8 pi`` because
    ``Delta^2 phi = 8 pi delta``). This equals ``scipy.interpolate.RBFInterpolator`` with
    ``smoothing = 8 pi eta / w`` (it accepts a per-sample smoothing vector), but that class
    refactors for every eta, offers no GCV and evaluates naively, so the solve is written here:
    with ``W^1/2`` absorbed, ``P~ = W^1/2 P = [Q1 Q2] R`` and the eigen-decomposition
    ``Q2^T W^1/2 K W^1/2 Q2 = U diag(lam) U^T`` (O(M^3), once), every eta costs O(M I):
    ``c = W^1/2 Q2 U (z / (lam + s))`` with ``z = U^T Q2^T W^1/2 beta`` and ``s = 8 pi eta``,
    and the GCV score (Craven & Wahba 1979) is minimised over a log grid of s, then refined
    by bounded Brent. A given scalar eta uses one symmetric LDL^T solve of the (M + d + 1)
    system instead.

    GCV with quadrature weights: the Voronoi weights are areas, not inverse noise variances
    (the bead noise is the same everywhere), so the classical weighted GCV, which treats
    ``w_m`` as precisions, undersmooths (by 12-50x in eta in our test, 1.5-1.9x the best
    error). The criterion used is the GCV approximation of the area-weighted risk
    ``sum_m w_m (alpha(z_m) - alpha_true(z_m))^2`` under homoscedastic noise:
    ``V = M ||W^1/2 (I - A) beta||^2 / (M - tr(W A))^2`` (degrees of freedom counted with
    the weights; identical to the classical one for uniform weights), with
    ``M - tr(W A) = sum_k omega_k s / (lam_k + s)`` and ``omega_k = sum_m w_m V_mk^2``,
    ``V = Q2 U``. The test suite checks that its eta has an error within 1.35x of the best
    eta on a grid.
    """
    # The dense factorisations (QR, eigh of the (M - d - 1)^2 system) of a few hundred beads
    # are fastest on one BLAS thread, and far faster than on two when the cores are busy:
    # eigh of 590 x 590 measured 0.04-0.06 s on one thread, 4.1-5.2 s on two beside one other
    # busy process (OpenBLAS threads spinning). Thousands of beads keep every thread.
    n = np.shape(points)[0] if np.ndim(points) else 0
    with blas_limit(1 if n < _TPS_THREADED_BEADS else None):
        return _fit_tps(points, values, domain_shape=domain_shape, weights=weights, eta=eta, gcv=gcv,
                        bead_weights=bead_weights)


#: From this many beads on, fit_tps lets BLAS use every thread.
_TPS_THREADED_BEADS = 2000


def _fit_tps(points, values, *, domain_shape, weights, eta, gcv, bead_weights=None) -> ThinPlateSpline:
    pts, shape = _as_points(points, domain_shape)
    vals = np.asarray(values, dtype=np.float64)
    if vals.ndim == 1:
        vals = vals[:, None]
    m, d = pts.shape
    if vals.ndim != 2 or vals.shape[0] != m:
        raise InputError(f"values: expected shape ({m}, I) to match {m} points, got {np.shape(values)}")
    if not np.all(np.isfinite(vals)):
        raise InputError(f"values: {int((~np.isfinite(vals)).any(axis=1).sum())} rows are NaN or infinite")
    if m < d + 2:
        raise InputError(f"points: a thin-plate spline in {d}D needs at least {d + 2} beads, got {m}")
    if gcv not in ("per_component", "shared"):
        raise InputError(f"gcv: expected 'per_component' or 'shared', got {gcv!r}")
    _check_distinct(pts)
    n_out = vals.shape[1]
    w = _weights(weights, pts, shape, bead_weights)
    u, centre, scale = _normalise(pts, shape)
    k = _kernel(_sqdist(u, u), d)
    p = np.hstack([np.ones((m, 1)), u])
    sw = np.sqrt(w)
    r = np.linalg.qr(sw[:, None] * p, mode="r")
    rdiag = np.abs(np.diag(r[: d + 1]))
    if rdiag.min() <= 1e-10 * rdiag.max():
        raise InputError(
            f"points: the {m} beads lie on one {'line' if d == 2 else 'plane'}; a thin-plate "
            "spline needs them spread over the field"
        )

    if eta is not None:
        eta_arr = np.asarray(eta, dtype=np.float64)
        if eta_arr.ndim == 0:
            eta_arr = np.full(n_out, float(eta_arr))
        if eta_arr.shape != (n_out,):
            raise InputError(f"eta: expected a scalar or {n_out} values, got shape {np.shape(eta)}")
        if not np.all(np.isfinite(eta_arr)) or np.any(eta_arr < 0):
            raise InputError(f"eta: must be finite and >= 0, got {eta}")
        if np.all(eta_arr == eta_arr[0]):
            # One LDL^T factorisation for all I right-hand sides.
            s = _BIHARMONIC * eta_arr[0]
            a = np.zeros((m + d + 1, m + d + 1))
            a[:m, :m] = k + np.diag(s / w)
            a[:m, m:] = p
            a[m:, :m] = p.T
            rhs = np.vstack([vals, np.zeros((d + 1, n_out))])
            try:
                sol = sla.solve(a, rhs, assume_a="sym")
            except (sla.LinAlgError, sla.LinAlgWarning) as exc:  # pragma: no cover - guarded by checks above
                raise InputError(f"points: the thin-plate system is singular ({exc})") from exc
            return ThinPlateSpline(pts, shape, w, eta_arr, None, sol[:m], sol[m:], centre, scale, u)
        gcv_mode = None
    else:
        gcv_mode = gcv

    # Spectral route: GCV and per-component eta.
    q, r = np.linalg.qr(sw[:, None] * p, mode="complete")
    q1, q2 = q[:, : d + 1], q[:, d + 1 :]
    kt = sw[:, None] * k * sw[None, :]
    lam, vec = sla.eigh(q2.T @ kt @ q2)
    lam = np.maximum(lam, 0.0)  # conditionally positive definite: rounding only
    yt = sw[:, None] * vals
    z = vec.T @ (q2.T @ yt)  # (M - d - 1, I)
    z2 = z * z
    uv = q2 @ vec
    omega = w @ uv ** 2  # weighted degrees of freedom, see Notes
    score = None
    if gcv_mode is None:
        s_arr = _BIHARMONIC * eta_arr
    else:
        top = max(float(lam.max()), 1e-300)
        grid = top * np.logspace(-12, 3, 151)
        z2g = z2.sum(axis=1, keepdims=True) if gcv_mode == "shared" else z2
        curve = _gcv_curve(grid, lam, z2g, omega, m)  # (151, I or 1)
        s_arr = np.empty(z2g.shape[1])
        for i in range(z2g.shape[1]):  # I scalar refinements (I ~ 5)
            j = int(np.argmin(curve[:, i]))
            lo_, hi_ = np.log(grid[max(j - 1, 0)]), np.log(grid[min(j + 1, len(grid) - 1)])
            res = minimize_scalar(lambda ls, i=i: _gcv_curve(np.exp([ls]), lam, z2g[:, i : i + 1], omega, m)[0, 0],
                                  bounds=(lo_, hi_), method="bounded", options={"xatol": 1e-3})
            best = res.x if res.fun <= curve[j, i] else np.log(grid[j])
            s_arr[i] = np.exp(best)
        if gcv_mode == "shared":
            s_arr = np.full(n_out, s_arr[0])
        # Report each component's own score at its eta.
        score = np.array([_gcv_curve(s_arr[i : i + 1], lam, z2[:, i : i + 1], omega, m)[0, 0]
                          for i in range(n_out)])
        eta_arr = s_arr / _BIHARMONIC
    gamma = vec @ (z / (lam[:, None] + s_arr[None, :]))
    # leave-one-out residuals: with W^1/2 (I - A) W^-1/2 = U diag(s / (lam + s)) U^T, U = Q2 V,
    # the residuals are W^-1/2 U (r z) and 1 - A_mm = sum_k U_mk^2 r_k
    rr = s_arr[None, :] / (lam[:, None] + s_arr[None, :])
    loo = (uv @ (rr * z)) / sw[:, None] / np.maximum((uv * uv) @ rr, 1e-300)
    ct = q2 @ gamma  # W^-1/2 c
    c = sw[:, None] * ct
    # P~ d = y~ - K~ c~ - s c~  ->  d = R^-1 Q1^T (...)
    resid = yt - sw[:, None] * (k @ c) - ct * s_arr[None, :]
    dcoef = sla.solve_triangular(r[: d + 1], q1.T @ resid)
    return ThinPlateSpline(pts, shape, w, eta_arr, score, c, dcoef, centre, scale, u, loo)


#: Leave-one-out residual (robust sigmas) beyond which coefficient_maps drops a bead...
OUTLIER_Z = 10.0
#: ... and is predicted by the others with a PSF-relative error above this.
OUTLIER_FLOOR = 0.1


def coefficient_maps(points, beta, shape, *, weights="voronoi", eta=None, step: int | None = None,
                     tol: float | None = None, generators=None, project=None, dtype=np.float32,
                     outlier_z: float | None = OUTLIER_Z, return_spline: bool = False,
                     bead_weights=None, eta_scale: float = 1.0, at=None):
    """Coefficient maps alpha_i on the whole pixel grid (paper App. C-a, optionally C-b).

    Parameters
    ----------
    points : array (M, 2) or (M, 3)
        Bead positions in pixel units, ``(y, x)`` or ``(z, y, x)``.
    beta : array (M, I)
        Observed coefficients of each bead in the PSF basis.
    shape : tuple of int
        The image grid ``(ny, nx)`` or ``(nz, ny, nx)`` (also the field for the Voronoi weights).
    weights, eta :
        As in :func:`fit_tps`.
    step : int, optional
        Lattice spacing. None: from :func:`pcmx.lattice.default_step` (halved, at least 2, with
        ``generators``: bilinear interpolation is less accurate than cubic), then halved until
        the sampled error is below ``tol`` (see :meth:`ThinPlateSpline.evaluate_grid`).
    tol : float, optional
        Bound on the sampled PSF-relative error ``||delta alpha|| / rms ||alpha||`` against the
        exact per-pixel result (the exact spline; with ``generators`` or ``project``, the
        exact spline projected pixel by pixel, plus the projection's largest move at the
        nodes of the pixel's lattice cell: across the kinks of the projected maps bilinear
        interpolation converges at first order only, and refining them drove half-erased
        real planes to 2-4 px lattices, see :func:`pcmx.lattice.adaptive_upsample`).
        Default 1e-3, and 3e-3 with a projection (bilinear interpolation; still ~5x below the
        cone's own angular tolerance, 1 degree ~ 1.7e-2).
    generators : array (G, I), optional
        Cone generators (:func:`pcmx.cone.reduce_cone`). When given, the exact spline values
        on the lattice are projected onto cone(generators) (App. C-b) and upsampled
        bilinearly; the weights of bilinear interpolation are non-negative, so every pixel is
        a conical combination of projected nodes and lies in the cone.
    project : callable, optional
        Another realism projection instead of the cone, ``project(rows (N, I)) -> (N, I)``
        (e.g. ``functools.partial(pcmx.cone.project_nonnegative, psf_basis=h)``), applied
        like ``generators`` to the lattice nodes before bilinear upsampling; exclusive with
        ``generators``.
    dtype : dtype, default float32
    outlier_z : float or None, default OUTLIER_Z (10)
        Beads whose leave-one-out residual (:attr:`ThinPlateSpline.loo_residuals`: observed
        minus predicted from all the other beads), as a fraction of the median coefficient
        norm (the PSF-relative error of that prediction), lies this many robust standard
        deviations (1.4826 MAD over the beads) above the median and above ``OUTLIER_FLOOR``
        (10%) are left out and the spline refitted (twice at most); only with eta chosen by
        GCV. A few gross outliers (merged beads, debris: leave-one-out errors of 10-1600%
        where the typical bead's is 2-3%) drove GCV to eta ~ 0, an interpolating spline, and
        coefficient maps that needed a 1-pixel lattice (100 s instead of 0.5 s on
        2304 x 2304). None: no rejection.
    return_spline : bool
        Also return the fitted :class:`ThinPlateSpline` (eta, GCV score, weights) and the
        lattice info (:func:`pcmx.lattice.adaptive_upsample`: ``"step"``, ``"max_error"``,
        ``"max_excess"``, ``"n_nodes"``, ``"n_projected"``, ...) and ``"rejected"``.
    bead_weights : array (M,), optional
        Per-bead factors on ``weights`` (:func:`fit_tps`); the beads left out as outliers
        leave with theirs.
    eta_scale : float, default 1
        The spline refitted, on the same beads, with ``eta_scale`` times the smoothing chosen
        (by GCV, after the outlier rejection) or given: model selection's smoother candidate.
    at : array (N, ndim), optional
        Evaluate only at these pixel positions: the exact spline there, projected row by row
        under ``generators`` / ``project``, ``(N, I)`` float64 instead of the maps (no
        lattice; cross-validation's held-out beads). ``info`` then also has ``"spline"``, the
        values before the projection.

    Returns
    -------
    maps : ndarray (I, *shape) of ``dtype``
    spline : ThinPlateSpline, only with ``return_spline=True``
    info : dict, only with ``return_spline=True``
    """
    shape = tuple(int(s) for s in shape)
    q = None if bead_weights is None else np.asarray(bead_weights, dtype=np.float64)
    tps = fit_tps(points, beta, domain_shape=shape, weights=weights, eta=eta, bead_weights=q)
    rejected = np.zeros(len(tps.points), dtype=bool)
    if outlier_z is not None and eta is None and isinstance(weights, str | None):
        for _ in range(2):
            bad = _gross_outliers(tps.loo_residuals, outlier_z, np.asarray(beta)[~rejected])
            keep = ~bad
            if not bad.any() or keep.sum() < max(tps.ndim + 2, len(keep) // 2):
                break
            rejected[np.flatnonzero(~rejected)[bad]] = True
            tps = fit_tps(tps.points[keep], np.asarray(beta)[~rejected], domain_shape=shape,
                          weights=weights, eta=eta, bead_weights=None if q is None else q[~rejected])
    if eta_scale != 1.0:
        tps = fit_tps(tps.points, np.asarray(beta)[~rejected], domain_shape=shape, weights=weights,
                      eta=np.asarray(tps.eta) * float(eta_scale),
                      bead_weights=None if q is None else q[~rejected])
    if generators is not None and project is not None:
        raise InputError("give generators (the cone) or project, not both")
    if at is not None:
        raw = tps(np.asarray(at, dtype=np.float64).reshape(-1, tps.ndim))
        vals = (project_onto_cone(raw, generators) if generators is not None
                else np.asarray(project(raw), dtype=np.float64) if project is not None else raw)
        info = {"rejected": np.flatnonzero(rejected), "step": 0, "spline": raw}
        return (vals, tps, info) if return_spline else vals
    shape = tps._grid_shape(shape)
    if generators is None and project is None:
        maps, info = _adaptive_lattice(tps, shape, step, 1e-3 if tol is None else tol,
                                       kind="cubic", generators=None, dtype=dtype)
    else:
        maps, info = _adaptive_lattice(tps, shape, step, 3e-3 if tol is None else tol,
                                       kind="linear", generators=generators, dtype=dtype,
                                       project=project)
    info["rejected"] = np.flatnonzero(rejected)
    return (maps, tps, info) if return_spline else maps


def _gross_outliers(loo: np.ndarray, z: float, values: np.ndarray) -> np.ndarray:
    """Beads the others predict far worse than usual: ``e_m = ||loo_m|| / median_m ||v_m||``
    (with an orthonormal PSF basis, the relative l2 error of the PSF predicted for bead m
    from all the others) beyond ``z`` robust sigmas above the median of e and above
    ``OUTLIER_FLOOR``. Measured: e ~ 0.02-0.03 typically, 0.1-16 for the gross outliers of
    simulated 2304 x 2304 fields; on noise-free beads (the model's floor) e <= 0.06 while
    the robust sigma is tiny (z up to 37), hence the absolute floor."""
    v = np.asarray(values, dtype=np.float64).reshape(len(loo), -1)
    ref = float(np.median(np.linalg.norm(v, axis=1)))
    if not ref > 0:
        return np.zeros(len(loo), dtype=bool)
    e = np.linalg.norm(np.asarray(loo).reshape(len(loo), -1), axis=1) / ref
    med = np.median(e)
    scale = 1.4826 * np.median(np.abs(e - med))
    return (e > med + z * scale) & (e > OUTLIER_FLOOR)
