"""Source-detection metrics for deblurring (the paper's Fig. 10 made quantitative).

* :func:`find_sources`: local maxima of a restored image above a threshold, refined to
  sub-pixel by the intensity-weighted centroid of their 3 x 3 neighbourhood.
* :func:`match_sources`: optimal one-to-one matching of found and true sources within a
  tolerance, and the F1 score, precision, recall and localisation RMSE.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from .. import _backend
from ..errors import InputError
from ..noise import robust_sigma

__all__ = ["find_sources", "match_sources", "score_restoration"]


def _as_2d(u, name: str):
    """``u`` as a float64 2D array of its own library (NumPy or CuPy), checked."""
    a = _backend.unwrap(u)
    xp = _backend.xp(a)
    a = xp.asarray(a)
    if a.ndim != 2:
        raise InputError(f"{name} must be a 2D image, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or a.dtype.kind == "c":
        raise InputError(f"{name} must hold real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    n_bad = int(xp.count_nonzero(~xp.isfinite(a)))
    if n_bad:
        raise InputError(f"{name} has {n_bad} non-finite pixels (NaN or inf)")
    return a


def find_sources(u, *, threshold: float | None = None, min_distance: int = 1,
                 exclude_border: int = 1, relative: float = 0.1
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Point sources in a restored image: local maxima above a threshold, sub-pixel refined.

    Parameters
    ----------
    u : array or DataArray, shape (ny, nx)
        A restored sparse map (e.g. BSS's ``u1``) or any restored image, NumPy or CuPy (the
        image-sized steps run on its library, :mod:`pcmx._backend`).
    threshold : float, optional
        Minimal value of a maximum. Default (automatic): ``max(relative * m, 5 * s)`` where
        ``m`` is a robust maximum (the 99.9th percentile of the positive pixels, so a few hot
        pixels do not set it) and ``s`` the noise level of ``u`` from the median absolute
        deviation of its pixels about the median (``1.4826 * MAD``; 0 for a sparse map, whose
        median pixel is 0).
    min_distance : int
        A maximum must be the largest value in the ``(2 min_distance + 1)``-square around it;
        ties (plateaus) keep one pixel per connected plateau.
    exclude_border : int
        Maxima closer than this many pixels to the edge are dropped (0 keeps all).
    relative : float
        Fraction of the robust maximum in the automatic threshold.

    Returns
    -------
    y, x : float64 NumPy arrays, shape (n,)
        Sub-pixel positions (pixel indices): the intensity-weighted centroid of the 3 x 3
        neighbourhood of each maximum, weights ``u - min(3 x 3)`` clipped at 0. NumPy for
        any ``u``: a list of points, for :func:`match_sources`'s k-d tree on the host.

    Raises
    ------
    InputError
        If ``u`` is not a finite real 2D image or a parameter is out of range.
    """
    a = _as_2d(u, "u")
    xp, nd = _backend.xp(a), _backend.ndimage_module(a)
    if int(min_distance) < 1:
        raise InputError(f"min_distance must be >= 1, got {min_distance}")
    if int(exclude_border) < 0:
        raise InputError(f"exclude_border must be >= 0, got {exclude_border}")
    if threshold is None:
        if not 0 < relative <= 1:
            raise InputError(f"relative must be in (0, 1], got {relative}")
        pos = a[a > 0]
        if pos.size == 0:
            return np.zeros(0), np.zeros(0)
        robust_max = float(xp.percentile(pos, 99.9))
        sigma = robust_sigma(a, max_samples=None)
        threshold = max(relative * robust_max, 5.0 * sigma)
    elif not np.isfinite(threshold):
        raise InputError(f"threshold must be finite, got {threshold}")
    md = int(min_distance)
    size = 2 * md + 1
    local_max = nd.maximum_filter(a, size=size, mode="nearest")
    peaks = (a == local_max) & (a > threshold)
    # plateaus: one pixel (the first in raster order) per connected group of equal maxima
    labels, n = nd.label(peaks, structure=xp.ones((3, 3), bool))
    n = int(n)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    first = nd.minimum(xp.arange(a.size).reshape(a.shape), labels, xp.arange(1, n + 1))
    iy, ix = np.unravel_index(np.asarray(_backend.asnumpy(first), dtype=np.intp), a.shape)
    b = int(exclude_border)
    if b:
        keep = (iy >= b) & (iy < a.shape[0] - b) & (ix >= b) & (ix < a.shape[1] - b)
        iy, ix = iy[keep], ix[keep]
    # 3 x 3 centroid, vectorised over the peaks (edge-padded so border peaks work too)
    pad = xp.pad(a, 1, mode="edge")
    d = np.arange(-1, 2)
    rows = xp.asarray(iy[:, None, None] + 1 + d[None, :, None])
    cols = xp.asarray(ix[:, None, None] + 1 + d[None, None, :])
    win = _backend.asnumpy(pad[rows, cols])  # (n, 3, 3): small, on the host
    w = np.clip(win - win.min(axis=(1, 2), keepdims=True), 0, None)
    tot = w.sum(axis=(1, 2))
    ok = tot > 0
    tot = np.where(ok, tot, 1.0)
    dy = np.where(ok, (w.sum(axis=2) * d).sum(axis=1) / tot, 0.0)
    dx = np.where(ok, (w.sum(axis=1) * d).sum(axis=1) / tot, 0.0)
    return iy + dy, ix + dx


def match_sources(est_y, est_x, true_y, true_x, tol: float = 1.5) -> dict:
    """Optimal one-to-one matching of found sources to true ones within ``tol`` pixels.

    Pairs farther apart than ``tol`` are forbidden; among the admissible matchings the one
    with the most pairs and, among those, the smallest total distance is taken
    (``scipy.optimize.linear_sum_assignment`` on a sparse ``cKDTree`` distance matrix).

    Parameters
    ----------
    est_y, est_x : array, shape (n_found,)
        Found positions (pixels).
    true_y, true_x : array, shape (n_true,)
        True positions (pixels).
    tol : float
        Largest distance (pixels) of a match.

    Returns
    -------
    dict
        ``f1`` (``2 n_matched / (n_found + n_true)``; 1 when both are empty), ``precision``
        (``n_matched / n_found``), ``recall`` (``n_matched / n_true``), ``rmse`` (root mean
        square distance over the matches, pixels; NaN with no match), ``n_true``,
        ``n_found``, ``n_matched``.

    Raises
    ------
    InputError
        If coordinate arrays differ in length, are not 1D or finite, or ``tol <= 0``.
    """
    def pts(y, x, what):
        y = np.asarray(y, dtype=np.float64).ravel()
        x = np.asarray(x, dtype=np.float64).ravel()
        if y.shape != x.shape:
            raise InputError(f"{what}_y and {what}_x differ in length ({y.size} vs {x.size})")
        if not (np.all(np.isfinite(y)) and np.all(np.isfinite(x))):
            raise InputError(f"{what} positions must be finite")
        return np.column_stack([y, x])

    if not (np.isfinite(tol) and tol > 0):
        raise InputError(f"tol must be a positive number of pixels, got {tol}")
    est = pts(est_y, est_x, "est")
    true = pts(true_y, true_x, "true")
    n_found, n_true = len(est), len(true)
    n_matched, dist = 0, np.zeros(0)
    if n_found and n_true:
        # structured (i, j, v) output: keeps zero distances (a sparse matrix would drop them)
        sdm = cKDTree(est).sparse_distance_matrix(cKDTree(true), tol, output_type="ndarray")
        if len(sdm):
            # only rows/columns with a candidate enter the dense assignment problem
            rows, ri = np.unique(sdm["i"], return_inverse=True)
            cols, ci = np.unique(sdm["j"], return_inverse=True)
            big = 1e6 * (tol + 1.0)  # forbidden: costlier than any set of admissible pairs
            cost = np.full((len(rows), len(cols)), big)
            # a zero-distance pair must still count as admissible: cost = distance - big
            cost[ri, ci] = sdm["v"] - big
            r, c = linear_sum_assignment(cost)
            ok = cost[r, c] < 0
            dist = cost[r, c][ok] + big
            n_matched = int(ok.sum())
    precision = n_matched / n_found if n_found else (1.0 if n_true == 0 else 0.0)
    recall = n_matched / n_true if n_true else (1.0 if n_found == 0 else 0.0)
    f1 = 2 * n_matched / (n_found + n_true) if (n_found + n_true) else 1.0
    rmse = float(np.sqrt(np.mean(dist ** 2))) if n_matched else float("nan")
    return {"f1": float(f1), "precision": float(precision), "recall": float(recall),
            "rmse": rmse, "n_true": n_true, "n_found": n_found, "n_matched": n_matched}


def score_restoration(u, true_y, true_x, *, relative=(0.05, 0.1, 0.2, 0.3), tol: float = 1.5,
                      **find_kwargs) -> dict:
    """The best source-detection score of a restored image over a few detection thresholds.

    :func:`find_sources` is run with each automatic threshold fraction in ``relative`` and
    the matching (:func:`match_sources`) with the highest F1 (ties: the lower RMSE) is kept,
    so that methods whose restorations have different dynamic ranges are compared fairly.

    Parameters
    ----------
    u : array or DataArray, shape (ny, nx)
    true_y, true_x : array
        True source positions (pixels).
    relative : sequence of float
        Candidate fractions of the robust maximum.
    tol : float
        Matching tolerance (pixels).
    **find_kwargs
        Passed to :func:`find_sources` (``min_distance``, ``exclude_border``).

    Returns
    -------
    dict
        :func:`match_sources`'s fields plus ``relative``, the fraction that gave them.
    """
    best = None
    for r in relative:
        ey, ex = find_sources(u, relative=r, **find_kwargs)
        m = match_sources(ey, ex, true_y, true_x, tol=tol)
        m["relative"] = float(r)
        if best is None or (m["f1"], -np.nan_to_num(m["rmse"], nan=np.inf)) > (
                best["f1"], -np.nan_to_num(best["rmse"], nan=np.inf)):
            best = m
    if best is None:
        raise InputError("relative: give at least one threshold fraction")
    return best
