"""Subtract each bead's neighbours with the current model, then refit (thick samples, issue 12).

In a z-stack of beads in a gel every bead's patch is crossed by the out-of-focus light of the
other beads (their double cones); in a crowded 2D field by their wings. The patches of
:func:`pcmx.patches.bead_patches` keep that light, and the operator learned from them inherits
it. :func:`subtract_neighbours` predicts it with the operator fitted so far and removes it::

    every detection, centred                    (pcmx.beads.detect_beads, center_beads)
    -> its PSF from the model at its position   (coefficient maps read there, times the basis)
       plus the field's mean light beyond the model's support (the halo, below)
    -> its amplitude                            (least squares of that PSF on its own patch)
    -> the light of every *other* detection inside each kept bead's patch, at its sub-pixel
       offset, subtracted; the background re-estimated on the image without the predicted
       light of all detections

:func:`refit_without_neighbours` alternates this with :func:`pcmx.fit.fit_operator` until the
coefficients at the beads move less than a tolerance.

The halo
    The model is zero beyond ``r_ext`` (the bump of App. A-d), while a defocused PSF spreads
    as a double cone far beyond it: most of a neighbour's light inside a bead's patch comes
    from beyond the neighbour's own support. The light the model leaves out is estimated
    once per pass as one space-invariant kernel ``g`` over a larger window, by least squares
    against the residual image ``image - background - sum_k a_k K_k(x - p_k)``: with the
    detections as weighted spikes ``s = sum_k a_k delta(x - p_k)``,
    ``g = F^-1[conj(S) R / (|S|^2 + lambda)]`` (a Wiener deconvolution by the spike train),
    cropped to the window. The predicted light of neighbour k is ``a_k (K_k + g)``.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import scipy.ndimage as ndi
import xarray as xr
from scipy.spatial import cKDTree

from . import background as bg
from . import beads
from .errors import InputError
from .execution import progress_bar
from .patches import BeadPatches

__all__ = ["subtract_neighbours", "refit_without_neighbours", "model_kernels", "neighbour_passes",
           "HALO_FACTOR", "AUTO_PASSES"]

#: Subtraction passes of ``neighbours="auto"`` by image dimension: one for z-stacks (measured
#: 0.0967 -> 0.0916 against the truth on tests/test_learn3d.py's stack; the pass moves the
#: PSFs at the beads by 0.7%, under the 1% tolerance), none for 2D images (not measured there).
AUTO_PASSES = {2: 0, 3: 1}
#: Half side of the halo window over the patch's half side (per axis, clipped to the image).
HALO_FACTOR = 2.0


def model_kernels(op: xr.Dataset, positions: np.ndarray) -> np.ndarray:
    """The operator's PSF at each position: its coefficient maps read there (multilinear,
    clipped to the grid) times the basis. ``(P, [kz,] ky, kx)`` float64, each summing to
    about one on the bump's support (the basis spans the bumped, sum-one patches)."""
    maps = np.asarray(op["coefficients"].values, dtype=np.float64)
    h = np.asarray(op["psf_basis"].values, dtype=np.float64)
    nd = maps.ndim - 1
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, nd)
    pts = np.clip(pos, 0, np.array(maps.shape[1:]) - 1).T
    alpha = np.stack([ndi.map_coordinates(m, pts, order=1, mode="nearest") for m in maps], axis=1)
    return np.tensordot(alpha, h, axes=1)


def _sample(kernels: np.ndarray, offsets: np.ndarray, out_shape, *, prefiltered: bool = False):
    """``kernels[k](q - offsets[k])`` on a grid ``q`` of ``out_shape`` centred at ``size // 2``
    (cubic B-spline, zero outside the kernel): each kernel moved by its offset."""
    nd = kernels.ndim - 1
    kc = np.array([s // 2 for s in kernels.shape[1:]], dtype=np.float64)
    oc = np.array([s // 2 for s in out_shape], dtype=np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in out_shape],
                                indexing="ij"), axis=0).reshape(nd, -1)
    out = np.empty((len(kernels), int(np.prod(out_shape))))
    for k, ker in enumerate(kernels):
        coords = grid - (oc + offsets[k] - kc)[:, None]
        out[k] = ndi.map_coordinates(ker, coords, order=3, mode="constant", cval=0.0,
                                     prefilter=not prefiltered)
    return out.reshape((len(kernels), *out_shape))


def _render(shape, kernels: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The image of each kernel placed at its sub-pixel position, summed (float64)."""
    out = np.zeros(shape)
    half = np.array([s // 2 for s in kernels.shape[1:]])
    ci = np.rint(positions).astype(np.int64)
    win = _sample(kernels, positions - ci, tuple(2 * half + 1))
    for k in range(len(kernels)):
        lo = ci[k] - half
        hi = ci[k] + half + 1
        src = tuple(slice(max(0, -lo[d]), win.shape[1 + d] - max(0, hi[d] - shape[d]))
                    for d in range(len(shape)))
        dst = tuple(slice(max(0, lo[d]), min(shape[d], hi[d])) for d in range(len(shape)))
        out[dst] += win[k][src]
    return out


def _inside(positions: np.ndarray, kshape, shape) -> np.ndarray:
    """Which samples of each patch ``(P, *kshape)`` lie inside the image (not edge-replicated)."""
    nd = len(shape)
    ci = np.rint(positions).astype(np.int64)
    ok = np.ones((len(positions), *kshape), dtype=bool)
    for d in range(nd):
        k = np.arange(kshape[d]) - kshape[d] // 2
        idx = ci[:, d, None] + k[None, :]
        v = (idx >= 0) & (idx < shape[d])
        sh = [len(positions)] + [1] * nd
        sh[1 + d] = kshape[d]
        ok &= v.reshape(sh)
    return ok


def _halo(residual: np.ndarray, positions: np.ndarray, amplitudes: np.ndarray, half,
          *, iterations: int = 40) -> np.ndarray:
    """The space-invariant kernel g (window ``2 half + 1``) best explaining ``residual`` as
    ``sum_k a_k g(x - p_k)`` on the image's own pixels (light falling outside the image is not
    observed): masked least squares by conjugate gradients on the normal equations, the
    spike train applied by FFT."""
    shape = residual.shape
    nd = len(shape)
    half = [int(h) for h in half]
    pad = [int(n + 2 * h) for n, h in zip(shape, half, strict=True)]
    freqs = [np.fft.fftfreq(n) for n in pad[:-1]] + [np.fft.rfftfreq(pad[-1])]
    s_hat = np.zeros([len(f) for f in freqs], dtype=np.complex128)
    for p, a in zip(positions, amplitudes, strict=True):
        phase = 1.0
        for d in range(nd):
            e = np.exp(-2j * np.pi * freqs[d] * p[d])
            phase = np.multiply.outer(phase, e) if d else e
        s_hat += a * phase
    win = tuple(slice(0, 2 * h + 1) for h in half)
    img = tuple(slice(0, n) for n in shape)
    shift = tuple(-h for h in half)
    axes = tuple(range(nd))

    def forward(g):  # window (2h+1) -> image
        full = np.zeros(pad)
        full[win] = g
        full = np.roll(full, shift, axis=tuple(range(nd)))
        return np.fft.irfftn(np.fft.rfftn(full) * s_hat, s=pad, axes=axes)[img]

    def adjoint(y):  # image -> window
        full = np.zeros(pad)
        full[img] = y
        out = np.fft.irfftn(np.fft.rfftn(full) * np.conj(s_hat), s=pad, axes=axes)
        return np.roll(out, tuple(half), axis=tuple(range(nd)))[win]

    g = np.zeros([2 * h + 1 for h in half])
    res = residual.astype(np.float64)
    rr = adjoint(res)
    p = rr.copy()
    gamma = float(np.sum(rr * rr))
    g0 = gamma
    for _ in range(int(iterations)):
        q = forward(p)
        alpha = gamma / max(float(np.sum(q * q)), 1e-300)
        g += alpha * p
        res -= alpha * q
        rr = adjoint(res)
        new = float(np.sum(rr * rr))
        if new < 1e-8 * g0:
            break
        p = rr + (new / gamma) * p
        gamma = new
    return g


def subtract_neighbours(bp: BeadPatches, op: xr.Dataset, image, *, detections=None,
                        threshold: float | None = None, halo: bool = False,
                        halo_factor: float = HALO_FACTOR, halo_passes: int = 3, rebackground: bool = True,
                        return_info: bool = False):
    """The patches of ``bp`` without the predicted light of every other detected bead.

    Parameters
    ----------
    bp : BeadPatches
        From :func:`pcmx.patches.bead_patches` of ``image``.
    op : Dataset
        An operator fitted on them (:func:`pcmx.fit.fit_operator`).
    image : array or DataArray, (y, x) or (z, y, x)
        The image the patches were cut from.
    detections : array (N, ndim), optional
        Every detection (kept or not); detected again (:func:`pcmx.beads.detect_beads` with
        ``threshold``) when None. Each is centred and matched to the kept beads.
    halo : bool
        Add the light beyond the model's support (a space-invariant kernel estimated from the
        residual image, window ``halo_factor`` times the patch's half side). Off by default:
        on tests/test_learn3d.py's stack it took the error against the truth from 0.092 (no
        halo) to 0.089, for 30 s instead of 4 s.
    rebackground : bool
        Estimate the background again on the image without the predicted light.

    Returns
    -------
    BeadPatches
        The same beads and positions, cleaned patches; and a dict of what was done with
        ``return_info``.
    """
    t0 = time.perf_counter()
    work = np.asarray(getattr(image, "values", image), dtype=np.float32)
    shape = work.shape
    nd = work.ndim
    r = bp.radius
    pos = np.asarray(bp.positions, dtype=np.float64)
    if detections is None:
        detections, _ = beads.detect_beads(work, threshold=threshold)
    det = np.asarray(detections, dtype=np.float64).reshape(-1, nd)
    det = beads.center_beads(work, det, r) if len(det) else det
    # every kept bead is one of the detections: use its own centre
    if len(det):
        d, idx = cKDTree(det).query(pos)
        close = d < 1.5
        others = np.ones(len(det), dtype=bool)
        others[idx[close]] = False
        allpos = np.concatenate([pos, det[others]])
    else:
        allpos = pos
    m = len(pos)
    kshape = tuple(bp.patches.shape[1:])
    khalf = np.array([s // 2 for s in kshape])
    kernels = model_kernels(op, allpos)

    # amplitudes: least squares of each PSF on its own background-free patch, inside the image
    raw = beads.extract_patches(work, allpos, r)
    own, bg_own = bg.subtract_background(raw, r, image=work, positions=allpos, mask_positions=allpos,
                                         return_background=True)
    own = np.asarray(own.values, dtype=np.float64)
    own[:m] = np.asarray(bp.patches.values, dtype=np.float64)
    valid = _inside(allpos, kshape, shape)
    kk = kernels * valid
    flat = kk.reshape(len(kk), -1)
    amp = (np.sum((own * valid).reshape(len(kk), -1) * flat, axis=1)
           / np.maximum(np.sum(flat * flat, axis=1), 1e-30))
    amp = np.clip(amp, 0, None)

    # the model's light of every detection in the image
    scale = amp.reshape((-1,) + (1,) * nd)
    model_img = _render(shape, kernels * scale, allpos)
    info = {"detections": int(len(allpos)), "kept": int(m)}
    big = kernels
    pred_img = model_img
    background = bg.global_background(work - pred_img.astype(np.float32), allpos, r)
    if halo:
        # the background and the halo both explain smooth light: alternate, each estimated
        # without the other
        hhalf = np.minimum(np.ceil(khalf * halo_factor).astype(int), np.array(shape) - 1)
        pad = [(int(a - b), int(a - b)) for a, b in zip(hhalf, khalf, strict=True)]
        padded = np.stack([np.pad(k, pad) for k in kernels])
        for _ in range(int(halo_passes)):
            bg_img = bg.background_image(background, shape)
            g = _halo(work - bg_img - model_img, allpos, amp, hhalf)
            big = padded + g[None]
            pred_img = _render(shape, big * scale, allpos)
            background = bg.global_background(work - pred_img.astype(np.float32), allpos, r)
        info["halo_window"] = [int(2 * v + 1) for v in hhalf]
        info["halo_fraction"] = float(g.sum())

    # each kept bead: the light of every other detection whose window overlaps its patch
    bhalf = np.array([s // 2 for s in big.shape[1:]])
    reach = (bhalf + khalf + 1).astype(np.float64)
    tree = cKDTree(allpos / reach)
    pairs = tree.query_pairs(1.0 * np.sqrt(nd), output_type="ndarray")
    pairs = np.concatenate([pairs, pairs[:, ::-1]]) if len(pairs) else pairs.reshape(0, 2)
    pairs = pairs[pairs[:, 0] < m]
    near = np.all(np.abs(allpos[pairs[:, 0]] - allpos[pairs[:, 1]]) < reach, axis=1) if len(pairs) else []
    pairs = pairs[near] if len(pairs) else pairs
    light = np.zeros((m, *kshape))
    if len(pairs):
        coef = np.stack([ndi.spline_filter(k, order=3) for k in big])
        offs = allpos[pairs[:, 1]] - allpos[pairs[:, 0]]
        pred = _sample(coef[pairs[:, 1]], offs, kshape, prefiltered=True)
        np.add.at(light, pairs[:, 0], pred * amp[pairs[:, 1]].reshape((-1,) + (1,) * nd))
    cleaned = np.asarray(bp.patches.values, dtype=np.float64) - light
    if rebackground:
        pts = bg.patch_coordinates(bp.patches, pos)
        old = np.asarray(bg_own[:m], dtype=np.float64)
        cleaned += old - bg.background_at(background, pts)
    info.update({"pairs": int(len(pairs)), "seconds": round(time.perf_counter() - t0, 4),
                 "light_fraction": float(np.median(light.reshape(m, -1).sum(1)
                                                   / np.maximum(amp[:m], 1e-30)))})
    out = dataclasses.replace(bp, patches=bp.patches.copy(data=cleaned.astype(np.float32)),
                              counts=dict(bp.counts), timings=dict(bp.timings))
    return (out, info) if return_info else out


def neighbour_passes(neighbours, ndim: int) -> int:
    """Passes for ``learn_operator(neighbours=...)``: ``"auto"`` (:data:`AUTO_PASSES`), or a
    non-negative int (0: off).

    Raises
    ------
    InputError
        Anything else.
    """
    if isinstance(neighbours, str) and neighbours == "auto":
        return AUTO_PASSES[int(ndim)]
    if isinstance(neighbours, bool) or not isinstance(neighbours, (int, np.integer)) or neighbours < 0:
        raise InputError(f"neighbours={neighbours!r}: expected 'auto' or a number of passes >= 0")
    return int(neighbours)


def refit_without_neighbours(bp: BeadPatches, image, fit, *, passes: int = 3, tol: float = 0.01,
                             detections=None, threshold: float | None = None, first=None,
                             progress: bool | None = None, **kwargs):
    """Fit, subtract the neighbours with the fit, refit; at most ``passes`` subtractions, until
    the coefficients at the beads move less than ``tol`` (relative l2).

    ``fit`` maps BeadPatches to an operator (e.g. ``functools.partial(fit_operator, ...)``).
    ``first``: the operator already fitted on ``bp`` (fitted here when None). ``progress``:
    a bar with one tick per pass (:func:`pcmx.execution.progress_bar`; None: the option
    ``progress``): a pass of a 3D stack takes seconds to tens of seconds. Returns the last
    operator, the cleaned patches and a record of the passes.
    """
    work = np.asarray(getattr(image, "values", image), dtype=np.float32)
    if detections is None:
        detections, _ = beads.detect_beads(work, threshold=threshold)
    op = fit(bp) if first is None else first
    record = []
    cur = bp
    with progress_bar(progress, int(passes), "neighbour passes", "pass") as bar:
        for _ in range(int(passes)):
            before = model_kernels(op, bp.positions)
            cur, info = subtract_neighbours(bp, op, work, detections=detections, return_info=True,
                                            **kwargs)
            op = fit(cur)
            after = model_kernels(op, bp.positions)
            move = float(np.linalg.norm(after - before) / max(np.linalg.norm(before), 1e-30))
            record.append({**info, "change": round(move, 5)})
            bar.update(1)
            if move < tol:
                bar.total = bar.n  # converged early: the bar ends full
                bar.refresh()
                break
    return op, cur, record
