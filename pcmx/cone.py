"""Realistic PSFs: the conical hull of observed coefficients (paper App. C-b, C-c; II-E-a).

The coefficient maps of :mod:`pcmx.coefficients` are interpolated component by component,
so far from the beads they can describe PSFs no microscope makes (negative lobes). The paper
restricts every pixel's coefficient vector to ``B = cone(beta_m)``, the conical hull of the
observed coefficient vectors, reduced greedily to a few generators (following Esser et al.),
and projects onto it by solving a non-negative least-squares problem per pixel.

Public API
----------
``reduce_cone(B, *, angle_threshold_deg=1.0, max_generators=32, psf_basis=None,
return_info=False)``
    Greedy generators ``(G, I)`` of (approximately) cone(rows of B); with ``psf_basis``, moved
    to the nearest coefficients of non-negative PSFs.
``nonnegative_generators(generators, psf_basis, *, floor=0.01) -> (G, I)``
    That correction alone.
``project_nonnegative(vectors, psf_basis, *, floor=0.01, block=None) -> (N, I)``
    The same correction for many vectors (realism by non-negativity): batched least-distance
    programs, warm-started along the rows.
``project_onto_cone(X, generators, *, method="auto", tol=1e-10, max_iter=None,
return_coefficients=False) -> (N, I)``
    Euclidean projection of every row onto cone(generators), vectorised over rows.
``project_maps(maps, generators, *, step=8, dtype=None) -> (I, *spatial)``
    Projection on a lattice + bilinear upsampling: every pixel stays in the cone.
``project_grid(values, generators) -> (I, *lattice)``
    The same for a lattice of vectors (component axis first), warm-started coarse to fine.
``cone_membership_distance(x, generators) -> float or (N,)``
    ``||x - P(x)|| / ||x||``: 0 inside the cone.

Conventions: coefficient vectors are rows (``(N, I)``); generators are rows (``(G, I)``);
a cone is unchanged by scaling its generators, which are normalised internally.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import nnls

from .errors import InputError
from .lattice import AxisInterp, lattice_nodes, separable_upsample

__all__ = [
    "project_nonnegative",
    "cone_membership_distance",
    "nonnegative_generators",
    "project_grid",
    "project_maps",
    "project_onto_cone",
    "reduce_cone",
]


def _as_rows(x, name: str, *, dim: int | None = None) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError(f"{name}: expected a non-empty 2D array (rows are vectors), got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise InputError(f"{name}: rows have {a.shape[1]} components, expected {dim}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name}: {int((~np.isfinite(a)).any(axis=1).sum())} rows contain NaN or infinity")
    return a


def _unit_generators(generators, dim: int | None = None, what: str = "X") -> np.ndarray:
    g = _as_rows(generators, "generators").astype(np.float64)
    if dim is not None and g.shape[1] != dim:
        raise InputError(f"{what}: vectors have {dim} components but generators have {g.shape[1]}")
    norm = np.linalg.norm(g, axis=1)
    keep = norm > 0
    if not keep.any():
        raise InputError("generators: all generators are zero")
    return g[keep] / norm[keep, None]


# --------------------------------------------------------------------------------------------
# projection solvers


def _batched_spd_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve many small symmetric positive definite systems ``a[n] x[n] = b[n]`` at once.

    Gaussian elimination without pivoting (stable for SPD matrices), vectorised over the batch:
    k elimination steps of whole-array operations, instead of one LAPACK call per matrix
    (whose per-call overhead dominates for k <= 8 and ~10^5 matrices).
    """
    a = a.copy()
    x = b.copy()
    k = a.shape[1]
    for j in range(k):
        piv = a[:, j, j]
        f = a[:, j + 1 :, j] / piv[:, None]  # (n, k-j-1)
        a[:, j + 1 :, j:] -= f[:, :, None] * a[:, None, j, j:]
        x[:, j + 1 :] -= f * x[:, j, None]
    for j in range(k - 1, -1, -1):
        x[:, j] = (x[:, j] - np.einsum("nk,nk->n", a[:, j, j + 1 :], x[:, j + 1 :])) / a[:, j, j]
    return x


# min_{lam >= 0} 1/2 ||G^T lam - x||^2, one row x at a time, all rows at once


def _step_back(lam, pidx, nb, sol, bad, mask, sentinel) -> None:
    """The active-set step back of the rows ``nb`` whose least-squares solution ``sol`` left
    the non-negative orthant (``bad``: its non-positive entries among the active ``mask``):
    move each from ``lam`` towards ``sol`` until its first coefficient hits zero, drop that
    index (and any at zero) from the active set, compact the set to the left, padding with
    ``sentinel``. In place on ``lam`` and ``pidx``; shared by the cone's and the
    non-negativity's batched active-set solvers."""
    l0 = lam[nb]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bad, l0 / (l0 - sol), np.inf)
    first = np.argmin(ratio, axis=1)
    alpha = np.clip(np.take_along_axis(ratio, first[:, None], axis=1), 0.0, 1.0)
    l1 = l0 + alpha * (sol - l0)
    keep = mask & (l1 > 1e-14 * np.maximum(l1.max(axis=1, keepdims=True), 1e-300))
    keep[np.arange(nb.size), first] = False  # the index that hit zero leaves
    order = np.argsort(~keep, axis=1, kind="stable")
    pidx[nb] = np.take_along_axis(np.where(keep, pidx[nb], sentinel), order, axis=1)
    lam[nb] = np.take_along_axis(np.where(keep, l1, 0.0), order, axis=1)


def _active_set(g: np.ndarray, x: np.ndarray, tol: float, max_iter: int,
                init: np.ndarray | None = None) -> np.ndarray:
    """Batched Lawson-Hanson NNLS: ``min_{lam >= 0} 1/2 ||g^T lam - x||^2`` for every row of x.

    Every row runs the classical algorithm (add the generator most correlated with the
    residual, solve least squares on the passive set, step back to feasibility dropping the
    generators that reach zero); rows advance together, one batched small solve per sweep.
    A passive set holds linearly independent generators, so at most ``I`` of them: the state
    of a row is ``I`` slots (generator index, coefficient; empty slots point to a zero
    sentinel generator), and finished rows leave the batch.

    ``init`` (n, kmax) optionally guesses each row's passive set (e.g. a neighbour's optimal
    face, ``len(g)`` in empty slots): rows whose least-squares solution on the guess is
    positive start from it (often already optimal: one solve and one check), the others
    start from zero.
    """
    n, dim = x.shape
    ng = len(g)
    kmax = min(dim, ng)
    gpad = np.vstack([g, np.zeros((1, dim))])  # index ng: the empty-slot sentinel
    gram = gpad @ gpad.T
    out = np.zeros((n, ng + 1))
    rows = np.arange(n)
    pidx = np.full((n, kmax), ng, dtype=np.intp)
    lam = np.zeros((n, kmax))
    adding = np.ones(n, dtype=bool)
    eye = np.eye(kmax)[None]
    if init is not None:
        pi = init.astype(np.intp, copy=True)
        mask = pi != ng
        sub = gram[pi[:, :, None], pi[:, None, :]] + np.where(mask, 1e-13, 1.0)[:, :, None] * eye
        sol = _batched_spd_solve(sub, np.einsum("nd,nkd->nk", x, gpad[pi]))
        good = ~(mask & (sol <= 0)).any(axis=1)
        pidx[good], lam[good] = pi[good], np.where(mask[good], sol[good], 0.0)
    for _ in range(max_iter):
        if rows.size == 0:
            break
        # --- add step, for rows whose coefficients solve least squares on their passive set
        a = np.flatnonzero(adding)
        if a.size:
            xa = x[rows[a]]
            resid = xa - np.einsum("nk,nkd->nd", lam[a], gpad[pidx[a]])
            w = resid @ gpad.T
            np.put_along_axis(w, pidx[a], -np.inf, axis=1)  # passive generators and the sentinel
            j = np.argmax(w, axis=1)
            wmax = np.take_along_axis(w, j[:, None], axis=1)[:, 0]
            full = pidx[a, -1] != ng
            done = (wmax <= tol * np.maximum(np.linalg.norm(xa, axis=1), 1e-300)) | full
            grow, jg = a[~done], j[~done]
            slot = np.argmax(pidx[grow] == ng, axis=1)  # first empty slot
            pidx[grow, slot] = jg
            adding[grow] = False
            fin = a[done]
            if fin.size:
                np.put_along_axis(out[rows[fin]], pidx[fin], 0.0, axis=1)
                res = np.zeros((fin.size, ng + 1))
                np.put_along_axis(res, pidx[fin], lam[fin], axis=1)
                res[:, ng] = 0.0
                out[rows[fin]] = res
                keep = np.ones(rows.size, dtype=bool)
                keep[fin] = False
                rows, pidx, lam, adding = rows[keep], pidx[keep], lam[keep], adding[keep]
        # --- least squares on the passive set
        sv = np.flatnonzero(~adding)
        if sv.size == 0:
            continue
        pi = pidx[sv]
        mask = pi != ng
        # empty slots: identity rows (the sentinel's gram entries are 0), so their solution is 0
        sub = gram[pi[:, :, None], pi[:, None, :]] + np.where(mask, 1e-13, 1.0)[:, :, None] * eye
        rhs = np.einsum("nd,nkd->nk", x[rows[sv]], gpad[pi])
        sol = _batched_spd_solve(sub, rhs)
        bad = mask & (sol <= 0)
        ok = ~bad.any(axis=1)
        lam[sv[ok]] = sol[ok]
        adding[sv[ok]] = True
        nb = sv[~ok]
        if nb.size:
            _step_back(lam, pidx, nb, sol[~ok], bad[~ok], mask[~ok], ng)
    out = out[:, :ng]
    if rows.size:  # sweep cap reached (degenerate cycling): finish those rows with scipy's NNLS
        out[rows] = _nnls_rows(g, x[rows])
    return out


def _fista(gram: np.ndarray, b: np.ndarray, tol: float, max_iter: int) -> np.ndarray:
    """Accelerated projected gradient (Beck & Teboulle) on all rows at once, adaptive restart.

    Step ``1 / ||G G^T||``. Every 10 iterations, rows whose KKT residual
    ``max|min(lam, grad)|`` is below ``tol * max|b|`` are frozen and dropped from the batch;
    the rest stop after ``max_iter`` iterations.
    """
    step = 1.0 / np.linalg.eigvalsh(gram)[-1]
    out = np.zeros_like(b)
    scale = np.maximum(np.abs(b).max(axis=1, keepdims=True), 1e-300)
    live = np.arange(b.shape[0])
    bl, sl = b, scale
    lam = np.zeros_like(b)
    y = lam.copy()
    t = np.ones((b.shape[0], 1))
    for it in range(1, max_iter + 1):
        new = np.maximum(y - step * (y @ gram - bl), 0.0)
        t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        # restart momentum on rows where it points uphill (O'Donoghue & Candes 2015)
        restart = np.sum((y - new) * (new - lam), axis=1, keepdims=True) > 0
        t_new = np.where(restart, 1.0, t_new)
        mom = np.where(restart, 0.0, (t - 1.0) / t_new)
        y = new + mom * (new - lam)
        lam, t = new, t_new
        if it % 10 == 0 or it == max_iter:
            kkt = (np.abs(np.minimum(lam, lam @ gram - bl)) / sl).max(axis=1)
            done = kkt <= tol
            out[live[done]] = lam[done]
            keep = ~done
            if not keep.any():
                return out
            live, bl, sl, lam, y, t = live[keep], bl[keep], sl[keep], lam[keep], y[keep], t[keep]
    out[live] = lam
    return out


def _faces(lam: np.ndarray, kmax: int) -> np.ndarray:
    """Passive sets (n, kmax) of coefficient rows: indices of the positive entries, padded."""
    ng = lam.shape[1]
    pos = lam > 0
    order = np.argsort(~pos, axis=1, kind="stable")[:, :kmax]
    return np.where(np.take_along_axis(pos, order, axis=1), order, ng)


def _project_lattice(vals: np.ndarray, g: np.ndarray, tol: float, max_iter: int) -> np.ndarray:
    """Coefficients (N, G) projecting every node of a lattice of vectors (I, *lat), coarse to fine.

    Every 4th node along each axis is solved first (recursively); each node then starts from
    the optimal face of its nearest solved node. Smooth maps change face rarely between
    neighbours, so most nodes need one small solve and one optimality check instead of the
    ~2 I sweeps of a cold start. Exact: every row still ends on the KKT conditions.
    """
    dim = vals.shape[0]
    lat = vals.shape[1:]
    flat = np.moveaxis(vals, 0, -1).reshape(-1, dim)
    stride = [4 if n >= 8 else 1 for n in lat]
    if flat.shape[0] <= 4096 or max(stride) == 1:
        return _active_set(g, flat, tol, max_iter)
    sub = vals[(slice(None),) + tuple(slice(None, None, st) for st in stride)]
    faces = _faces(_project_lattice(sub, g, tol, max_iter), min(dim, len(g)))
    near = [np.minimum((np.arange(n) + st // 2) // st, (n - 1) // st) for n, st in zip(lat, stride, strict=True)]
    sub_shape = sub.shape[1:]
    idx = np.ravel_multi_index(np.meshgrid(*near, indexing="ij"), sub_shape).ravel()
    return _active_set(g, flat, tol, max_iter, init=faces[idx])


def project_grid(values, generators, *, tol: float = 1e-10, max_iter: int | None = None) -> np.ndarray:
    """Project every vector of a lattice of coefficients onto cone(generators), exactly.

    Same result as :func:`project_onto_cone` on the flattened lattice, ~3-5x faster on smooth
    maps: nodes are solved coarse to fine, each warm-started from the optimal face of its
    nearest coarser node (see ``docs/coefficients.md``).

    Parameters
    ----------
    values : array (I, n0, n1[, n2])
        Coefficient vectors on a lattice, component axis first (like coefficient maps).
    generators : array (G, I)
    tol, max_iter :
        As in :func:`project_onto_cone` (active-set method).

    Returns
    -------
    ndarray, same shape and float dtype as ``values``
    """
    v = np.asarray(values)
    if v.ndim < 2:
        raise InputError(f"values: expected shape (I, n0, ...), got {v.shape}")
    _as_rows(v.reshape(v.shape[0], -1).T, "values")
    dtype = v.dtype if np.issubdtype(v.dtype, np.floating) else np.float64
    g = _unit_generators(generators, dim=v.shape[0], what="values")
    lam = _project_lattice(v.astype(np.float64), g, tol, max_iter or 3 * len(g) + 20)
    proj = lam @ g
    return np.moveaxis(proj.reshape(*v.shape[1:], v.shape[0]), -1, 0).astype(dtype, copy=False)


def _nnls_rows(g: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.stack([nnls(g.T, row)[0] for row in x]) if len(x) else np.zeros((0, len(g)))


def project_onto_cone(X, generators, *, method: str = "auto", tol: float = 1e-10,
                      max_iter: int | None = None, return_coefficients: bool = False):
    """Project each row of X onto the conical hull of the generators (paper App. C-b, C-c).

    Solves ``min_{lam >= 0} 1/2 ||G^T lam - x||^2`` for every row x and returns ``G^T lam``.

    Parameters
    ----------
    X : array (N, I) or (I,)
        Coefficient vectors (rows). float32 in -> float32 out.
    generators : array (G, I)
        Generators of the cone (rows; scaled to unit norm internally, zero rows ignored).
    method : {"auto", "active-set", "fista", "nnls"}
        "active-set": batched Lawson-Hanson, exact to rounding (the default, "auto": fastest
        measured for G <= 64, see ``docs/coefficients.md``); "fista": accelerated projected
        gradient of the paper (approximate, stops at ``tol``); "nnls": one
        ``scipy.optimize.nnls`` call per row (reference).
    tol : float, default 1e-10
        Optimality tolerance: active set, largest correlation of a generator with the
        residual relative to ``||x||``; FISTA, KKT residual relative to ``max |G x|``.
    max_iter : int, optional
        Sweeps (active set, default ``3 G + 20``; rows still running then, a degenerate
        case, are finished by ``scipy.optimize.nnls``) or iterations (FISTA, default 5000).
    return_coefficients : bool
        Also return ``lam`` (N, G), for the normalised generators.

    Returns
    -------
    P : ndarray, same shape and float dtype as X
    lam : ndarray (N, G), only with ``return_coefficients=True``

    Raises
    ------
    InputError
        Non-finite values, mismatched dimensions, all-zero generators, unknown method.
    """
    x = np.asarray(X)
    single = x.ndim == 1
    x2 = _as_rows(x[None] if single else x, "X")
    dtype = x2.dtype if np.issubdtype(x2.dtype, np.floating) else np.float64
    g = _unit_generators(generators, dim=x2.shape[1])
    xf = x2.astype(np.float64)
    if method == "auto":
        method = "active-set"
    if method == "nnls":
        lam = _nnls_rows(g, xf)
    elif method in ("active-set", "fista"):
        if method == "active-set":
            lam = _active_set(g, xf, tol, max_iter or 3 * len(g) + 20)
        else:
            lam = _fista(g @ g.T, xf @ g.T, tol, max_iter or 5000)
    else:
        raise InputError(f"method: expected 'auto', 'active-set', 'fista' or 'nnls', got {method!r}")
    proj = (lam @ g).astype(dtype, copy=False)
    if single:
        proj, lam = proj[0], lam[0]
    return (proj, lam) if return_coefficients else proj


def cone_membership_distance(x, generators) -> float | np.ndarray:
    """Relative distance to cone(generators): ``||x - P(x)|| / ||x||`` (0 inside).

    Parameters
    ----------
    x : array (I,) or (N, I)
        Vectors, e.g. a true state's flattened ``gamma`` (family issue, II-E-a).
    generators : array (G, I)

    Returns
    -------
    float or ndarray (N,)
        0 for vectors in the cone, up to 1 (a vector in the polar cone projects to 0).
        A zero vector has distance 0.
    """
    a = np.asarray(x, dtype=np.float64)
    single = a.ndim == 1
    rows = a[None] if single else a
    p = project_onto_cone(rows, generators)
    norm = np.linalg.norm(rows, axis=1)
    d = np.linalg.norm(rows - p, axis=1) / np.where(norm > 0, norm, 1.0)
    return float(d[0]) if single else d


def _angles(v: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Angle (radians) between each row of v and cone(g): ``arccos(||P v|| / ||v||)``."""
    p = project_onto_cone(v, g)
    norm = np.linalg.norm(v, axis=1)
    c = np.linalg.norm(p, axis=1) / np.where(norm > 0, norm, 1.0)
    return np.where(norm > 0, np.arccos(np.clip(c, 0.0, 1.0)), 0.0)


# --------------------------------------------------------------------------------------------
# non-negative PSFs: least-distance programs, batched


def _ldp_block(a: np.ndarray, c: np.ndarray, b: np.ndarray, tol: float, max_iter: int,
               init: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batched Lawson-Hanson least-distance programming on one block of rows.

    For every row ``c`` (unit norm) and bound ``b``: ``x = argmin ||x - c||`` subject to
    ``a x >= b`` (``a`` (K, I): one constraint per PSF pixel). With ``y = x - c`` and
    ``e = b - a c`` this is Lawson & Hanson's LDP ``min ||y||, a y >= e`` (1974, ch. 23),
    solved through the NNLS ``min_{u >= 0} ||E u - f||`` with columns ``E_k = (a_k, e_k)`` in
    ``R^{I+1}`` and ``f = e_{I+1}``: then ``y = -r[:I] / r[I]``, ``r = E u - f``. The NNLS
    runs the classical active-set iteration as :func:`_active_set` does, every row at once:
    its passive set holds at most ``I + 1`` pixels (the active constraints), so a row's state
    is ``I + 1`` slots, and its correlations with the residual
    ``w_k = r[I] (b - a_k x)`` are one ``(rows, I) x (I, K)`` product per sweep (no per-row
    ``K``-vector is stored). ``init`` (n, I + 1): a guess of each row's passive set (e.g. a
    neighbour's; ``K`` in empty slots), used where the least-squares solution on it is
    positive.

    Returns ``x`` (n, I), the final passive sets (n, I + 1), and the rows left unfinished
    after ``max_iter`` sweeps (degenerate cycling; the caller finishes them).
    """
    n, dim = c.shape
    k_all = len(a)
    kmax = dim + 1
    apad = np.vstack([a, np.zeros((1, dim))])  # index K: the empty-slot sentinel
    out = np.zeros((n, dim))
    out_p = np.full((n, kmax), k_all, dtype=np.intp)
    rows = np.arange(n)
    pidx = np.full((n, kmax), k_all, dtype=np.intp)
    lam = np.zeros((n, kmax))
    adding = np.ones(n, dtype=bool)
    eye = np.eye(kmax)[None]
    stuck = [rows[:0]]

    def passive(pi, r):
        # the passive columns E_P = (a_p, e_p); empty slots give identity rows (solution 0)
        mask = pi != k_all
        ap = apad[pi]  # (m, kmax, I)
        ep = np.where(mask, b[r, None] - np.einsum("mki,mi->mk", ap, c[r]), 0.0)
        return mask, ap, ep

    def least_squares(pi, r):
        mask, ap, ep = passive(pi, r)
        sub = np.einsum("mki,mli->mkl", ap, ap) + ep[:, :, None] * ep[:, None, :]
        sub += np.where(mask, 1e-13, 1.0)[:, :, None] * eye
        return _batched_spd_solve(sub, ep), mask  # E_P^T f = e_P

    if init is not None:
        sol, mask = least_squares(init, rows)
        good = ~(mask & (sol <= 0)).any(axis=1)
        pidx[good], lam[good] = init[good], np.where(mask[good], sol[good], 0.0)
    for _ in range(max_iter):
        if rows.size == 0:
            break
        # --- add step: the most violated constraint at the current x, for rows at an LS solution
        ad = np.flatnonzero(adding)
        if ad.size:
            r = rows[ad]
            mask, ap, ep = passive(pidx[ad], r)
            shift = np.einsum("mk,mki->mi", lam[ad], ap)  # (E_P u)[:I]
            last = 1.0 - np.einsum("mk,mk->m", lam[ad], ep)  # (f - E_P u)[I] = 1 / (1 + |y|^2) > 0
            w = (-shift - last[:, None] * c[r]) @ apad.T
            w += (b[r] * last)[:, None]
            np.put_along_axis(w, pidx[ad], -np.inf, axis=1)  # passive pixels and the sentinel
            j = np.argmax(w, axis=1)
            wmax = np.take_along_axis(w, j[:, None], axis=1)[:, 0]
            done = wmax <= tol * last
            full = ~done & (pidx[ad, -1] != k_all)  # no free slot: degenerate, left to the caller
            grow, jg = ad[~done & ~full], j[~done & ~full]
            slot = np.argmax(pidx[grow] == k_all, axis=1)  # first empty slot
            pidx[grow, slot] = jg
            adding[grow] = False
            fin = ad[done]
            if fin.size:
                rf = rows[fin]
                out[rf] = c[rf] + shift[done] / last[done, None]
                out_p[rf] = pidx[fin]
            drop = ad[done | full]
            if drop.size:
                stuck.append(rows[ad[full]])
                keep = np.ones(rows.size, dtype=bool)
                keep[drop] = False
                rows, pidx, lam, adding = rows[keep], pidx[keep], lam[keep], adding[keep]
        # --- least squares on the passive set
        sv = np.flatnonzero(~adding)
        if sv.size == 0:
            continue
        sol, mask = least_squares(pidx[sv], rows[sv])
        bad = mask & (sol <= 0)
        ok = ~bad.any(axis=1)
        lam[sv[ok]] = sol[ok]
        adding[sv[ok]] = True
        nb = sv[~ok]
        if nb.size:
            _step_back(lam, pidx, nb, sol[~ok], bad[~ok], mask[~ok], k_all)
    return out, out_p, np.concatenate([rows, *stuck])


def _ldp_nnls(h2: np.ndarray, c: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """The same least-distance programs, one ``scipy.optimize.nnls`` call per row (the
    reference, and the fallback for rows :func:`_ldp_block` leaves unfinished)."""
    dim = c.shape[1]
    target = np.zeros(dim + 1)
    target[-1] = 1.0
    out = c.copy()
    for k, (v, bnd) in enumerate(zip(c, bound, strict=True)):
        e = np.vstack([h2, (bnd - v @ h2)[None, :]])
        u = nnls(e, target, maxiter=50 * h2.shape[1])[0]
        r = e @ u - target
        # r[-1] = 0 only if infeasible, impossible here (x = 0 satisfies every bound <= 0)
        out[k] = v - r[:dim] / r[-1] if abs(r[-1]) > 1e-12 else 0.0
    return out


# _ldp_rows: every _LDP_STRIDE-th row is solved first (recursively, down to _LDP_COLD_ROWS rows
# solved cold) to warm-start its neighbours; a block of rows holds at most about
# _LDP_BLOCK_VALUES float64 temporaries per (rows, pixels) array (16 MB).
_LDP_STRIDE = 8
_LDP_COLD_ROWS = 256
_LDP_BLOCK_VALUES = 1 << 21


def _ldp_rows(h2: np.ndarray, c: np.ndarray, bound: np.ndarray, *, tol: float = 1e-12) -> np.ndarray:
    """``argmin ||x - c||`` subject to ``x @ h2 >= bound`` for every row c, exactly.

    Rows are scaled to unit norm (the program is positively homogeneous in ``(c, bound)``),
    solved in blocks by :func:`_ldp_block`, coarse to fine along the row order: every 8th row
    first, then each row warm-started from the active pixels of the nearest solved row (rows
    in lattice order are spatial neighbours, whose active pixels rarely differ: one solve and
    one optimality check instead of a sweep per active pixel). Rows the batched iteration
    leaves unfinished are solved by ``scipy.optimize.nnls``.
    """
    n, dim = c.shape
    a = np.ascontiguousarray(h2.T)
    norm = np.linalg.norm(c, axis=1)
    scale = np.where(norm > 0, norm, 1.0)
    cu, bu = c / scale[:, None], bound / scale
    atol = tol * float(np.linalg.norm(a, axis=1).max())
    max_iter = 3 * (dim + 1) + 20
    per_block = max(64, _LDP_BLOCK_VALUES // (len(a) + 1))

    def solve(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        init = None
        if len(idx) > _LDP_COLD_ROWS:
            _, coarse = solve(idx[::_LDP_STRIDE])
            near = np.minimum((np.arange(len(idx)) + _LDP_STRIDE // 2) // _LDP_STRIDE, len(coarse) - 1)
            init = coarse[near]
        x = np.empty((len(idx), dim))
        act = np.empty((len(idx), dim + 1), dtype=np.intp)
        for s in range(0, len(idx), per_block):
            sl = slice(s, s + per_block)
            x[sl], act[sl], left = _ldp_block(a, cu[idx[sl]], bu[idx[sl]], atol, max_iter,
                                              None if init is None else init[sl])
            if left.size:
                rows = idx[sl][left]
                x[s + left] = _ldp_nnls(h2, cu[rows], bu[rows])
                act[s + left] = len(a)
        return x, act

    return solve(np.arange(n))[0] * scale[:, None]


def nonnegative_generators(generators, psf_basis, *, floor: float = 0.01) -> np.ndarray:
    """Move each generator to the nearest coefficients whose PSF is >= -floor * its peak.

    The paper's argument (II-D, App. C-b) needs non-negative sampled PSFs: then every conical
    combination is non-negative. Observed coefficients are projections of noisy patches on a
    few basis PSFs, and their PSFs ``sum_i beta_i h_i`` dip below zero (-3% of the peak on a
    simulated 600-bead field with I = 5 and a basis from raw patches). Each generator ``c`` is
    replaced by ``c' = argmin ||c' - c||  s.t.  sum_i c'_i h_i >= -floor * max(sum_i c_i h_i)``
    pixel-wise. Generators already satisfying it are unchanged.

    Parameters
    ----------
    generators : array (G, I)
    psf_basis : array (I, ky, kx) or (I, K)
        The PSF basis ``h_i`` (any shape after the first axis).
    floor : float, default 0.01
        Allowed negative part relative to the generator's peak. 0 asks for exactly
        non-negative PSFs, which a noisy basis may only offer near ``c' = 0`` (its tails are
        noise): keep a small floor unless the basis tails are clean.

    Returns
    -------
    ndarray (G, I) float64

    Notes
    -----
    A least-distance program (Lawson & Hanson 1974, ch. 23): with ``x = c' - c``,
    ``A = H^T`` (K, I) and ``d = -floor * peak - H^T c``, the constraint is ``A x >= d``;
    ``u = nnls([A^T; d^T], e_{I+1})``, ``r = [A^T; d^T] u - e_{I+1}``, ``x = -r[:I] / r[I]``.
    The NNLS is solved for all violating rows at once by a batched active-set iteration
    (one ``(rows, I) x (I, K)`` product per sweep; rows in lattice order warm-started from a
    neighbour's active pixels): 0.5 ms per row with one ``scipy.optimize.nnls`` call each,
    0.03-0.05 ms batched (K = 2025 pixels, I = 10, real planes: ``docs/performance.md``), the
    same result to rounding (~1e-10 relative).
    """
    g = _as_rows(generators, "generators").astype(np.float64)
    h = np.asarray(psf_basis, dtype=np.float64)
    if h.ndim < 2 or h.shape[0] != g.shape[1]:
        raise InputError(f"psf_basis: expected shape ({g.shape[1]}, ...) to match the generators, got {h.shape}")
    h = h.reshape(h.shape[0], -1)
    if not np.all(np.isfinite(h)):
        raise InputError("psf_basis: contains NaN or infinity")
    if not (np.isfinite(floor) and floor >= 0):
        raise InputError(f"floor: must be >= 0, got {floor}")
    psf = g @ h
    bound = -floor * np.maximum(psf.max(axis=1), 0.0)
    bad = np.flatnonzero(psf.min(axis=1) < bound)
    out = g.copy()
    if bad.size:
        out[bad] = _ldp_rows(h, g[bad], bound[bad])
    return out


def project_nonnegative(vectors, psf_basis, *, floor: float = 0.01, block: int | None = None) -> np.ndarray:
    """Realism by non-negativity: each row moved to the nearest PSF >= -floor * its peak.

    The least-distance projection of :func:`nonnegative_generators`, applied to many vectors
    (e.g. every node of a coefficient-map lattice): rows whose PSF ``sum_i v_i h_i`` already
    satisfies the bound (checked in blocks of ``block`` rows, one matrix product each) are
    returned unchanged, the others solved together (batched active set, warm-started along
    the row order: give lattice nodes in lattice order).

    This is the realism projection :func:`pcmx.family.learn_family` uses by default. The
    paper's cone of observed coefficients (App. C-b, :func:`reduce_cone` +
    :func:`project_onto_cone`) also keeps PSFs non-negative, but with the 10-13 components a
    family's pooled basis needs, the hull of a few hundred noisy coefficient vectors is thin
    and the projection pulls every map inward: +11% PSF error against the simulator's truth
    (``docs/family.md``), where this projection costs nothing measurable and gives the same
    bound.

    Parameters
    ----------
    vectors : array (N, I)
    psf_basis : array (I, ky, kx) or (I, K)
    floor : float, default 0.01
    block : int, optional
        Rows checked per matrix product; None: as many as keep the product within ~2 M values
        (16 MB; 8192 rows of a 45 x 45 PSF were 130 MB per product).

    Returns
    -------
    ndarray (N, I) float64
    """
    v = _as_rows(vectors, "vectors").astype(np.float64)
    h = np.asarray(psf_basis, dtype=np.float64)
    if h.ndim < 2 or h.shape[0] != v.shape[1]:
        raise InputError(f"psf_basis: expected shape ({v.shape[1]}, ...) to match the vectors, got {h.shape}")
    h2 = h.reshape(h.shape[0], -1)
    if not np.all(np.isfinite(h2)):
        raise InputError("psf_basis: contains NaN or infinity")
    if not (np.isfinite(floor) and floor >= 0):
        raise InputError(f"floor: must be >= 0, got {floor}")
    bad, bounds = [], []
    step = max(1, int(block) if block is not None else _LDP_BLOCK_VALUES // h2.shape[1])
    for s in range(0, len(v), step):
        psf = v[s:s + step] @ h2
        bound = -floor * np.maximum(psf.max(axis=1), 0.0)
        low = np.flatnonzero(psf.min(axis=1) < bound)
        bad.append(s + low)
        bounds.append(bound[low])
    bad = np.concatenate(bad)
    out = v.copy()
    if bad.size:
        out[bad] = _ldp_rows(h2, v[bad], np.concatenate(bounds))
    return out


def reduce_cone(B, *, angle_threshold_deg: float = 1.0, max_generators: int = 32,
                psf_basis=None, floor: float = 0.01, return_info: bool = False):
    """Greedy reduction of cone(rows of B) to a few generators (paper App. C-c, after Esser et al.).

    Start from the mean of the observed vectors; repeatedly add the observed vector with the
    largest angle to the current cone, until every observed vector is within
    ``angle_threshold_deg`` of it (or ``max_generators`` is reached).

    Parameters
    ----------
    B : array (M, I)
        Observed coefficient vectors beta_m (rows; the paper's B is this array transposed).
    angle_threshold_deg : float, default 1.0
        Stop when the largest angle ``arccos(||P v|| / ||v||)`` of an observed vector to the
        cone is below this.
    max_generators : int, default 32
        Upper bound on G (the paper used 20 for M = 14000, I = 5).
    psf_basis : array (I, ky, kx), optional
        If given, the selected generators are then moved to PSFs non-negative within
        ``floor`` of their peak by :func:`nonnegative_generators`, so that conical
        combinations (every projected map) inherit it. The angles in ``info`` are those before
        this correction (it moves each generator by about the size of its negative part).
    floor : float, default 0.01
        See :func:`nonnegative_generators` (used with ``psf_basis``).
    return_info : bool
        Also return ``{"indices": rows of B used (-1 for the mean), "max_angle_deg": the
        largest angle after each addition, "angle_deg": final angle of every row}``.

    Returns
    -------
    generators : ndarray (G, I) float64
        Rows of B (and their mean first), unnormalised. cone(generators) is inside cone(B).
    info : dict, only with ``return_info=True``

    Raises
    ------
    InputError
        Non-finite values, all-zero B, threshold outside (0, 90), max_generators < 1.
    """
    b = _as_rows(B, "B").astype(np.float64)
    if not 0 < angle_threshold_deg < 90:
        raise InputError(f"angle_threshold_deg: must be in (0, 90), got {angle_threshold_deg}")
    if int(max_generators) < 1:
        raise InputError(f"max_generators: must be at least 1, got {max_generators}")
    norm = np.linalg.norm(b, axis=1)
    if not (norm > 0).any():
        raise InputError("B: all observed vectors are zero")
    thr = np.deg2rad(angle_threshold_deg)
    unit = b / np.where(norm > 0, norm, 1.0)[:, None]
    mean = b.mean(axis=0)
    if np.linalg.norm(mean) <= 1e-12 * norm.max():
        # vectors spread in all directions: the mean says nothing, start with the longest
        j0 = int(np.argmax(norm))
        gens, indices = [b[j0]], [j0]
    else:
        gens, indices = [mean], [-1]
    ang = _angles(unit, np.array(gens))
    history = [float(np.rad2deg(ang.max()))]
    cand = np.flatnonzero(ang > thr)  # angles only shrink as the cone grows
    while cand.size and len(gens) < int(max_generators):
        j = int(cand[np.argmax(ang[cand])])
        gens.append(b[j])
        indices.append(j)
        ang[cand] = _angles(unit[cand], np.array(gens))
        cand = cand[ang[cand] > thr]
        history.append(float(np.rad2deg(ang.max())))
    generators = np.array(gens)
    if psf_basis is not None:
        generators = nonnegative_generators(generators, psf_basis, floor=floor)
    if return_info:
        return generators, {"indices": np.array(indices), "max_angle_deg": np.array(history),
                            "angle_deg": np.rad2deg(ang)}
    return generators


def project_maps(maps, generators, *, step: int = 8, dtype=None) -> np.ndarray:
    """Project coefficient maps onto cone(generators) on a lattice, upsample bilinearly.

    Every ``step``-th pixel along each axis (plus the last one) is projected exactly; the other
    pixels are bilinear (trilinear in 3D) interpolations of their lattice cell's corners. The
    interpolation weights are non-negative, so each pixel is a conical combination of projected
    vectors and lies in the cone: if the generators are coefficients of non-negative PSFs of a
    basis, every pixel's PSF ``sum_i alpha_i h_i`` is a non-negative combination of non-negative
    PSFs (App. C-b). ``step=1`` projects every pixel.

    Parameters
    ----------
    maps : array (I, ny, nx) or (I, nz, ny, nx)
        Coefficient maps (e.g. from :func:`pcmx.coefficients.coefficient_maps`).
    generators : array (G, I)
    step : int, default 8
        Lattice spacing in pixels.
    dtype : dtype, optional
        Output dtype; that of ``maps`` (float32 stays float32) by default.

    Returns
    -------
    ndarray, same shape as ``maps``

    Notes
    -----
    Trade-off (measured in ``docs/coefficients.md``): projecting every pixel of a 2304^2 map
    is 5.3 M small NNLS problems; the lattice needs (2304/step)^2 of them and the upsampling
    is two float32 matrix products per map. The result differs from per-pixel projection by
    the bilinear interpolation error of the projected maps, O(step^2 |d^2 alpha|) and larger
    where the projection is active (the projected map has kinks there).
    """
    a = np.asarray(maps)
    if a.ndim not in (3, 4):
        raise InputError(f"maps: expected shape (I, ny, nx) or (I, nz, ny, nx), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise InputError("maps: contain NaN or infinity")
    if int(step) < 1:
        raise InputError(f"step: must be a positive number of pixels, got {step}")
    out_dtype = np.dtype(dtype) if dtype is not None else (a.dtype if np.issubdtype(a.dtype, np.floating) else np.dtype(np.float64))
    spatial = a.shape[1:]
    nodes = [lattice_nodes(n, int(step), integer=True) for n in spatial]
    coarse = a[np.ix_(np.arange(a.shape[0]), *[nd.astype(np.intp) for nd in nodes])]
    coarse = project_grid(coarse.astype(np.float64), generators)
    ops = [AxisInterp(nd, n, "linear") for nd, n in zip(nodes, spatial, strict=True)]
    return separable_upsample(coarse, ops, dtype=out_dtype)
