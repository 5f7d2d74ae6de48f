"""Semi-real test cases built from the real wide-field z-stack (../shared/realdata).

Real data is scarce; simulation alone would flatter pcmx. These builders make harder cases
out of real pixels:

:func:`thick_sample`
    Beads cut from different planes of the real z-stack pasted into one field at their own
    positions, as in a thick sample where beads lie above and below the focal plane: a third
    of the beads come from planes 2-6 planes (0.6-1.8 um) away from focus, the others from the
    focal plane, and faint copies of in-focus beads sit 7-10 px from a few beads (faint
    neighbours no detector sees).
:func:`heldout_against`
    Held-out errors of models fitted on one image's beads, each predicted bead compared with
    its patch in *another* image (the clean focal plane): folds over the clean plane's beads,
    the thick field's beads near a held-out bead left out of its fold's training.
"""

from __future__ import annotations

import numpy as np

import pcmx
from pcmx.cross_validation import fold_labels, heldout_targets, predict_psfs
from pcmx.fit import fit_operator
from pcmx.patches import bead_patches

FOCUS = 17


def plane(root, k: int):
    return pcmx.read_image(root / f"sample_zstack{k:02d}.tif", pixel_size="108nm")


def thick_sample(root, *, seed: int = 0, radius: int = 22, defocus=(2, 6), fraction: float = 1 / 3,
                 faint: int = 6, faint_scale: float = 0.15):
    """The focal plane with a third of its beads replaced by the same region of a defocused plane.

    Returns the composite image (uint8 like the stack, with the focal plane's coordinates), the
    indices of the replaced beads and their plane offsets, and the detections used.
    """
    rng = np.random.default_rng(seed)
    focus = plane(root, FOCUS)
    base = np.asarray(focus.values).astype(np.float32)
    det, _ = pcmx.beads.detect_beads(base)
    n = len(det)
    moved = rng.choice(n, size=int(round(fraction * n)), replace=False)
    offsets = rng.integers(defocus[0], defocus[1] + 1, size=len(moved)) * rng.choice([-1, 1], size=len(moved))
    out = base.copy()
    yy, xx = np.mgrid[: base.shape[0], : base.shape[1]]
    for m, d in zip(moved, offsets, strict=True):
        other = np.asarray(plane(root, FOCUS + int(d)).values).astype(np.float32)
        disk = (yy - det[m, 0]) ** 2 + (xx - det[m, 1]) ** 2 <= radius**2
        out[disk] = other[disk]
    # faint neighbours: background-free copies of in-focus beads at 7-10 px from a few beads
    keep = np.setdiff1d(np.arange(n), moved)
    src = rng.choice(keep, size=faint, replace=False)
    dst = rng.choice(keep, size=faint, replace=False)
    h = 8
    bg = float(np.median(base))
    for s, t in zip(src, dst, strict=True):
        sy, sx = np.rint(det[s]).astype(int)
        if min(sy, sx) < h or sy + h >= base.shape[0] or sx + h >= base.shape[1]:
            continue
        win = np.clip(base[sy - h:sy + h + 1, sx - h:sx + h + 1] - bg, 0, None) * faint_scale
        ang = rng.uniform(0, 2 * np.pi)
        dist = rng.uniform(7, 10)
        ty, tx = np.rint(det[t] + dist * np.array([np.sin(ang), np.cos(ang)])).astype(int)
        if min(ty, tx) < h or ty + h >= base.shape[0] or tx + h >= base.shape[1]:
            continue
        out[ty - h:ty + h + 1, tx - h:tx + h + 1] += win
    img = focus.copy(data=np.clip(np.rint(out), 0, 255).astype(np.uint8))
    img.attrs["source"] = "thick-sample composite"
    return img, moved, offsets, det


def heldout_against(train_image, clean_image, *, folds: int = 5, seed: int = 0, exclude: float = 4.0,
                    **fit_options):
    """Median held-out error, on the clean image's beads, of models fitted on ``train_image``.

    For each fold of the clean image's isolated beads, the model is fitted on the beads of
    ``train_image`` farther than ``exclude`` px from every held-out bead (with ``bead_patches``
    and ``fit_operator``'s defaults, or ``fit_options``), and each held-out bead's PSF is read
    from the fold's maps and compared with its clean patch (sum one, on the model's support).
    """
    clean = bead_patches(clean_image)
    train_all = bead_patches(train_image, psf_radius=clean.radius)
    target = heldout_targets(clean)
    fold_of = fold_labels(len(clean), folds, seed)
    err = np.full(len(clean), np.nan)
    for f in range(folds):
        test = fold_of == f
        d = np.linalg.norm(train_all.positions[:, None] - clean.positions[test][None], axis=2)
        train = train_all.subset(d.min(axis=1) > exclude)
        op = fit_operator(train, **fit_options)
        pred = predict_psfs(op["coefficients"].values, op["psf_basis"].values, clean.positions[test])
        t = target[test]
        err[test] = np.linalg.norm((pred - t).reshape(len(t), -1), axis=1) / np.linalg.norm(
            t.reshape(len(t), -1), axis=1)
    return float(np.median(err)), err


def simulated_thick_plane(sim, *, seed: int = 0, defocus_um=(0.6, 1.8), fraction: float = 1 / 3,
                          size: int = 49):
    """A simulated focal plane of a thick sample, where the truth is known: the beads of the 2D
    simulation ``sim`` rendered with their exact PSFs (:func:`pcmx.simulate.true_psfs`), a
    third of them ``defocus_um`` above or below focus, on the simulation's background, with
    Poisson and read noise through its camera; and the same plane with every bead in focus.

    Returns ``(thick, clean, moved)``: two DataArrays (y, x) and the moved beads' indices.
    """
    from pcmx.simulate import true_psfs

    rng = np.random.default_rng(seed)
    y, x = sim["bead_y"].values, sim["bead_x"].values
    amp = sim["amplitude"].values
    n = len(y)
    moved = rng.choice(n, size=int(round(fraction * n)), replace=False)
    dz = rng.uniform(*defocus_um, size=len(moved)) * rng.choice([-1, 1], size=len(moved))
    cam = sim.attrs["camera"]
    shape = sim["image"].shape
    h = size // 2
    images = []
    for defocus in (True, False):
        photons = np.asarray(sim["background"].values, dtype=np.float64).copy()
        psfs = true_psfs(sim, y, x, size=size).astype(np.float64)
        if defocus:
            for m, d in zip(moved, dz, strict=True):
                psfs[m] = true_psfs(sim, [y[m]], [x[m]], size=size, defocus=float(d))[0]
        big = np.zeros((shape[0] + 2 * h, shape[1] + 2 * h))
        iy, ix = np.rint(y).astype(int), np.rint(x).astype(int)
        oy, ox = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
        # true_psfs centres each PSF on its bead's sub-pixel position: shift by the fraction
        import scipy.ndimage as ndi

        for m in range(n):
            p = ndi.shift(psfs[m], (y[m] - iy[m], x[m] - ix[m]), order=3, mode="constant")
            big[iy[m] + oy, ix[m] + ox] += amp[m] * p
        photons += big[h:h + shape[0], h:h + shape[1]]
        noise = np.random.default_rng(seed + 1000)
        electrons = noise.poisson(np.clip(photons, 0, None)) + noise.normal(0, cam["read_noise_electrons"], shape)
        adu = np.clip(np.rint(electrons * cam["gain_adu_per_electron"] + cam["offset_adu"]), 0, 65535)
        images.append(sim["image"].copy(data=adu.astype(np.uint16)))
    return images[0], images[1], moved
