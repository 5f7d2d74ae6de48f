"""The family's SVD of its K*I coefficient maps to J spatial modes (paper II-D-b, II-E-c).

Shared by :func:`pcmx.family.learn_family` and the family's cross-validation
(:func:`pcmx.cross_validation.cross_validate_family`): the Gram matrix of the maps, its
eigendecomposition, the rules choosing J, and the family's realism policy.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .fit import Realism, realism_policy

__all__ = ["rank_by_threshold", "rank_by_energy", "choose_modes", "gram_matrix", "modes_of_gram",
           "realism_of_family", "MODE_RULES", "MODE_TOLERANCE", "PANEL"]

#: Relative RMS truncation error of the maps that :func:`rank_by_energy` allows (J).
MODE_TOLERANCE = 0.01


def realism_of_family(realism) -> Realism:
    """The family's :class:`pcmx.fit.Realism` policy from what users pass (see
    :func:`pcmx.family.learn_family`); the cone of K states is not capped: the pooled vectors of K states
    need more generators than one image's (10 states of 22 dim beads: ~100 to reach 1 degree;
    a cap of 32 left a cone 2-3.5 degrees too small, +30-50% of PSF error)."""
    return realism_policy(realism)


def rank_by_threshold(singular_values, factor: float = 2.858) -> int:
    """Number of singular values above ``factor * median`` (II-E-c; Gavish & Donoho)."""
    s = np.asarray(singular_values, dtype=np.float64)
    return max(1, int(np.sum(s > factor * np.median(s))))


def rank_by_energy(singular_values, tolerance: float = MODE_TOLERANCE) -> int:
    """Fewest modes J whose truncation error is at most ``tolerance`` of the maps' RMS norm,
    ``sqrt(sum_{j >= J} s_j^2 / sum_j s_j^2) <= tolerance``.

    With an orthonormal PSF basis, the l2 norm of a coefficient vector is that of its PSF, so
    this is the RMS relative change of the PSFs over the field and the states that the
    truncation makes: 1% by default, below the error of any learned PSF (>= 4% in the
    simulations of ``docs/family.md``).
    """
    s = np.asarray(singular_values, dtype=np.float64)
    tail = np.sqrt(np.clip(np.cumsum((s * s)[::-1])[::-1], 0, None) / max(float(np.sum(s * s)), 1e-300))
    # tail[j]: the relative error with j modes kept; the first j where it is small enough
    ok = np.flatnonzero(np.append(tail[1:], 0.0) <= tolerance)
    return max(1, int(ok[0]) + 1) if ok.size else len(s)


MODE_RULES = ("capped", "threshold", "energy")


def choose_modes(singular_values, rule: str = "capped") -> int:
    """J from the maps' singular values: ``"threshold"`` (the paper's 2.858 * median rule,
    :func:`rank_by_threshold`), ``"energy"`` (:func:`rank_by_energy`, 1% RMS) or
    ``"capped"`` (the default: the smaller of the two)."""
    if rule == "capped":
        return min(rank_by_threshold(singular_values), rank_by_energy(singular_values))
    if rule == "energy":
        return rank_by_energy(singular_values)
    if rule == "threshold":
        return rank_by_threshold(singular_values)
    raise InputError(f"mode_rule={rule!r}: expected one of {', '.join(map(repr, MODE_RULES))}")



PANEL = 1 << 14  # pixels per float64 panel inside a block


def gram_matrix(blk) -> np.ndarray:
    """``B B^T`` in float64 of the rows of ``blk`` (K*I maps, any spatial shape), panel by panel
    (no float64 copy of B): the family's Gram matrix, or one spatial block's share of it."""
    b = np.asarray(blk).reshape(blk.shape[0], -1)
    g = np.zeros((b.shape[0], b.shape[0]))
    for start in range(0, b.shape[1], PANEL):
        p = b[:, start:start + PANEL].astype(np.float64)
        g += p @ p.T
    return g


def modes_of_gram(gram: np.ndarray, n_modes: int | None = None, mode_rule: str = "capped"):
    """The family's SVD from the Gram matrix ``A A^T`` of its K*I maps (II-D-b).

    Returns
    -------
    u : ndarray (K*I, J)
        The first J left singular vectors of A (eigenvectors of the Gram matrix, decreasing).
    singular_values : ndarray (K*I,)
        All singular values of A, decreasing.
    j : int
        J: ``n_modes``, or chosen by ``mode_rule`` (:func:`choose_modes`).

    Raises
    ------
    InputError
        ``n_modes`` larger than K*I.
    """
    evals, evecs = np.linalg.eigh(gram)
    order = np.argsort(evals)[::-1]
    evals, evecs = np.clip(evals[order], 0, None), evecs[:, order]
    sv = np.sqrt(evals)
    if n_modes is not None and n_modes > len(sv):
        raise InputError(f"n_modes={n_modes} exceeds K*I = {len(sv)}")
    j = int(n_modes or min(choose_modes(sv, mode_rule), len(sv)))
    return evecs[:, :j], sv, j
