"""The pipeline's steps against the simulator's ground truth (studies behind docs/).

:func:`background_bias` compares the background estimators of :mod:`pcmx.background`
(App. B) on the same bead patches of a simulated image, made by the bead pipeline of
:mod:`pcmx.patches`; :func:`bias_table` runs it over brightnesses and seeds and
:func:`bias_markdown` writes the table of ``docs/background.md``
(``python -m pcmx.truth``). This module sits above the pipeline and the simulator: nothing in
the pipeline imports it.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
import xarray as xr
from scipy.spatial import cKDTree

from .background import METHODS, patch_coordinates, subtract_background
from .beads import R_EXT_FACTOR, bump_multiplier, normalised_radius, radius_vector
from .beads import extract_patches as beads_extract
from .errors import InputError
from .patches import raw_bead_patches
from .simulate import simulate_beads, true_psfs

__all__ = ["background_bias", "bias_table", "bias_markdown", "centred_psfs", "grid_positions",
           "truth_on_support", "relative_errors", "grid_psf_error", "thick_sample_bounds",
           "true_comb_image"]


def _frame_truth(sim, pos: np.ndarray, truth_pos: np.ndarray, amp: np.ndarray, size: int,
                 scale: float) -> np.ndarray:
    """Each bead's own noise-free image (ADU), alone, sampled in our patch frame."""
    big = size + 8
    t = true_psfs(sim, truth_pos[:, 0], truth_pos[:, 1], size=big).astype(np.float64)
    err = pos - truth_pos  # our centre minus the true position
    out = np.empty((len(pos), size, size))
    for m in range(len(pos)):  # a few hundred beads, each a small shift
        out[m] = ndi.shift(t[m], -err[m], order=3, mode="constant")[4:-4, 4:-4]
    return out * (scale * amp)[:, None, None]


def background_bias(sim, *, methods=METHODS, psf_radius=None, max_beads: int = 400) -> xr.Dataset:
    """Bias of each background estimator against a simulation's ground truth.

    The bead steps of :mod:`pcmx.patches` run once on ``sim["image"]`` (detection, automatic r,
    rejection, centring, patches); then each method's background is compared with the truth
    on the same patches:

    ``background_error``
        mean over beads and the pixels within ``r_ext`` of (estimated - true) background, in
        image units (ADU); the true background is ``gain * background + offset``.
    ``flux_bias``
        mean over beads of ``sum(m (p - b)) / sum(m t) - 1`` with ``m`` the bump multiplier,
        ``p - b`` the background-free patch and ``t`` the bead's own noise-free image: the
        relative error of the light the PSF keeps (other beads' far wings count as background).
    ``flux_bias_sem``
        its standard error over beads (the noise's share).
    ``psf_error``
        median relative l2 error of the bumped, sum-one PSF against the same for ``t``.

    Parameters
    ----------
    sim : Dataset from :func:`pcmx.simulate.simulate_beads` (2D, one state)
    methods : sequence of str
    psf_radius : float, optional
        r; estimated from the image when None.
    max_beads : int
        At most this many (strongest) beads are compared.

    Returns
    -------
    Dataset with dim ``estimator`` (not "method": ``Dataset.sel(method=...)`` is taken by
    xarray); attrs ``psf_radius``, ``n_beads``, ``photons``.
    """
    img = sim["image"]
    if img.ndim != 2:
        raise InputError(f"sim: background_bias needs a 2D one-state simulation, got dims {img.dims}")
    cam = sim.attrs.get("camera", {})
    applied = bool(cam.get("applied", False))
    gain = float(cam.get("gain_adu_per_electron", 1.0)) if applied else 1.0
    offset = float(cam.get("offset_adu", 0.0)) if applied else 0.0
    # the bead pipeline's steps up to the background, as pcmx.patches.bead_patches runs them
    patches, pos, det, r, work = raw_bead_patches(img, psf_radius=psf_radius, max_beads=max_beads)
    truth = np.c_[sim["bead_y"].values, sim["bead_x"].values]
    dist, idx = cKDTree(truth).query(pos)
    ok = dist < 2.0
    pos, idx, patches = pos[ok], idx[ok], patches.isel(bead=np.flatnonzero(ok))
    size = patches.sizes["ky"]
    tpatch = _frame_truth(sim, pos, truth[idx], sim["amplitude"].values[idx], size, gain)
    rv = radius_vector(r, 2)
    m = bump_multiplier(patches.shape[1:], rv).astype(np.float64)
    disk = normalised_radius([size // 2] * 2, rv) <= R_EXT_FACTOR
    pts = patch_coordinates(patches)
    true_bg = gain * ndi.map_coordinates(sim["background"].values.astype(np.float64),
                                         [pts[..., 0].ravel(), pts[..., 1].ravel()], order=3,
                                         mode="nearest").reshape(patches.shape) + offset
    tflux = (m * tpatch).sum(axis=(1, 2))
    tn = m * tpatch / tflux[:, None, None]
    rows = {}
    for meth in methods:
        _, bg = subtract_background(patches, rv, method=meth, image=work, mask_positions=det,
                                    return_background=True)
        bg = bg.astype(np.float64)
        p = patches.values.astype(np.float64) - bg
        flux = (m * p).sum(axis=(1, 2))
        fb = flux / tflux - 1
        pn = m * p / flux[:, None, None]
        err = np.linalg.norm((pn - tn).reshape(len(p), -1), axis=1) / np.linalg.norm(
            tn.reshape(len(p), -1), axis=1)
        rows[meth] = (float(np.mean((bg - true_bg)[:, disk])), float(np.mean(fb)),
                      float(np.std(fb) / np.sqrt(len(fb))), float(np.median(err)))
    names = list(rows)
    vals = np.array([rows[k] for k in names])
    return xr.Dataset(
        {"background_error": ("estimator", vals[:, 0]), "flux_bias": ("estimator", vals[:, 1]),
         "flux_bias_sem": ("estimator", vals[:, 2]), "psf_error": ("estimator", vals[:, 3])},
        coords={"estimator": names},
        attrs={"psf_radius": rv.tolist(), "n_beads": int(len(pos)),
               "photons": float(sim.attrs.get("scene", {}).get("photons_median", np.nan))})


def bias_table(photons=(60000.0, 10000.0, 2000.0), seeds=(11, 12, 13), *, shape=(512, 512),
               n_beads: int = 150, min_separation: float = 25.0, methods=METHODS) -> xr.Dataset:
    """:func:`background_bias` over simulated fields of several brightnesses and seeds.

    Each field is ``simulate_beads(shape, n_beads, photons=..., min_separation=..., seed=...)``
    (random aberrations, smooth background of 50 photons per pixel varying by 30 %, camera
    offset 100 ADU, gain 2, shot and read noise). The r of each field is estimated from it.

    Returns
    -------
    Dataset with dims ``(photons, seed, estimator)`` and the variables of
    :func:`background_bias`, plus ``psf_radius (photons, seed)`` and ``n_beads``.
    """
    rows = []
    for ph in photons:
        per_seed = []
        for sd in seeds:
            sim = simulate_beads(tuple(shape), n_beads, photons=float(ph),
                                 min_separation=min_separation, seed=int(sd))
            ds = background_bias(sim, methods=methods)
            per_seed.append(ds.assign(psf_radius=float(ds.attrs["psf_radius"][0]),
                                      n_beads=int(ds.attrs["n_beads"])))
        rows.append(xr.concat(per_seed, dim="seed", combine_attrs="drop"))
    out = xr.concat(rows, dim="photons", combine_attrs="drop")
    return out.assign_coords(photons=list(photons), seed=list(seeds))


def bias_markdown(table: xr.Dataset) -> str:
    """The rows of docs/background.md: means over seeds (flux bias +- its spread over seeds)."""
    lines = ["| photons per bead | r (px) | beads | method | background error (ADU/px) | "
             "flux bias | PSF error (median rel. l2) |",
             "|---|---|---|---|---|---|---|"]
    for ph in table["photons"].values:
        t = table.sel(photons=ph)
        for meth in t["estimator"].values:
            m = t.sel(estimator=meth)
            fb = m["flux_bias"].values
            lines.append(
                f"| {ph:.0f} | {float(t['psf_radius'].mean()):.1f} | {float(t['n_beads'].mean()):.0f} "
                f"| {meth} | {float(m['background_error'].mean()):+.2f} "
                f"| {100 * fb.mean():+.2f} % (± {100 * fb.std():.2f}) "
                f"| {float(m['psf_error'].mean()):.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m pcmx.truth: the table of docs/background.md
    print(bias_markdown(bias_table()))


# --------------------------------------------------------------------------------------------
# 3D: learned PSFs against the truth on the model's support, and the bounds of a thick sample
# --------------------------------------------------------------------------------------------
def true_comb_image(sim, cy, cx, *, state: int = 0, window: int = 33) -> np.ndarray:
    """``H_true d`` for a comb ``d`` of unit Diracs at pixels ``(cy, cx)``: the exact PSF of
    every Dirac (:func:`pcmx.simulate.true_psfs`, ``window`` pixels wide) placed at its
    position, on the simulation's field (float64). The Diracs must lie at least
    ``window // 2`` pixels inside the field."""
    cy, cx = np.asarray(cy, dtype=np.intp), np.asarray(cx, dtype=np.intp)
    psfs = true_psfs(sim, cy, cx, state=state, size=window).astype(np.float64)
    h = window // 2
    oy, ox = np.meshgrid(np.arange(window) - h, np.arange(window) - h, indexing="ij")
    out = np.zeros(tuple(sim["image"].shape[-2:]))
    np.add.at(out, (cy[:, None, None] + oy, cx[:, None, None] + ox), psfs)
    return out


def centred_psfs(psfs) -> np.ndarray:
    """Each PSF normalised to sum one and moved (cubic spline) so that its centre of mass sits
    at the centre index: compares shapes, not sub-pixel positions. ``(M, ...)`` float64."""
    out = []
    for p in psfs:
        p = np.asarray(p, dtype=np.float64)
        p = p / p.sum()
        c = np.array(ndi.center_of_mass(np.clip(p, 0, None)))
        p = ndi.shift(p, np.array(p.shape) // 2 - c, order=3, mode="constant")
        out.append(p / p.sum())
    return np.stack(out)


def grid_positions(op: xr.Dataset, plane: int | None = None, n: int = 3):
    """``(gz, gy, gx)``: an ``n x n`` grid of pixel positions inside the field of a 3D operator,
    on one plane (default the middle one)."""
    plane = op.sizes["z"] // 2 if plane is None else int(plane)
    ys = np.round(np.linspace(0, op.sizes["y"] - 1, n + 2)[1:-1]).astype(int)
    xs = np.round(np.linspace(0, op.sizes["x"] - 1, n + 2)[1:-1]).astype(int)
    gy, gx = (a.ravel() for a in np.meshgrid(ys, xs, indexing="ij"))
    return np.full(gy.size, plane), gy, gx


def truth_on_support(sim, op: xr.Dataset, radius, gy, gx) -> np.ndarray:
    """The simulator's 3D PSFs at ``(gy, gx)`` times the model's bump (App. A-d): what the
    model can represent (it is zero beyond ``r_ext``), centred."""
    ks = (op.sizes["kz"], op.sizes["ky"], op.sizes["kx"])
    truth = true_psfs(sim, gy, gx, size=ks[1], size_z=ks[0]) * bump_multiplier(ks, radius)
    return centred_psfs(truth)


def relative_errors(pred, truth) -> np.ndarray:
    """``||pred_m - truth_m|| / ||truth_m||`` for each ``m``."""
    diff = np.linalg.norm((pred - truth).reshape(len(pred), -1), axis=1)
    return diff / np.linalg.norm(truth.reshape(len(truth), -1), axis=1)


def grid_psf_error(op: xr.Dataset, sim, radius) -> tuple[float, float]:
    """Median relative error of a 3D operator's PSFs over :func:`grid_positions` against the
    truth on the model's support, and that of the space-invariant model made of the mean
    observed coefficients (the same basis)."""
    gz, gy, gx = grid_positions(op)
    coeffs = op["coefficients"].values[:, gz, gy, gx]
    pred = centred_psfs(np.einsum("im,ijkl->mjkl", coeffs, op["psf_basis"].values))
    mean = op["observed_coefficients"].values.mean(axis=0)
    inv = centred_psfs(np.repeat(np.tensordot(mean, op["psf_basis"].values, axes=1)[None], len(gy), 0))
    truth = truth_on_support(sim, op, radius, gy, gx)
    return float(np.median(relative_errors(pred, truth))), float(np.median(relative_errors(inv, truth)))


def thick_sample_bounds(sim, bp, *, n_components: int, seed: int = 1) -> dict:
    """What a z-stack of beads in a gel allows, against its noise-free floor (issue 12 item 7).

    Three fits of :func:`pcmx.fit.fit_operator` on the same beads (``bp``, the pipeline's
    :func:`pcmx.patches.bead_patches` of ``sim``), the same ``n_components``, measured by
    :func:`grid_psf_error`:

    ``floor``
        The beads' noise-free true PSFs (no noise, no neighbours, no background).
    ``others_removed``
        The pipeline's patches with the *whole* true light of every other bead subtracted
        (an oracle no subtraction can beat), the background estimated on the bead-free image.
    ``alone``
        Each bead imaged alone (its own light plus the background, the camera's noise): no
        neighbour ever existed.

    Returns a dict of the three errors (each bead is rendered once by the simulator).
    """
    from .fit import fit_operator
    from .patches import BeadPatches
    from .simulate._render import render_emitters
    from .simulate._scene import camera
    from .simulate._truth import simulation_model

    optics, fm, states, shape = simulation_model(sim)
    cam = sim.attrs["camera"]
    gain = float(cam["gain_adu_per_electron"])
    pos, r = np.asarray(bp.positions, dtype=np.float64), bp.radius
    by, bx, bz, amp = (np.asarray(sim[k].values, dtype=np.float64) for k in ("bead_y", "bead_x", "bead_z", "amplitude"))
    truth_index = cKDTree(np.c_[bz, by, bx]).query(pos)[1]
    patch = sim.attrs["scene"]["patch_size"]
    own = [render_emitters(optics, fm, states[0], by[[j]], bx[[j]], amp[[j]], shape, z=bz[[j]],
                           patch_size=patch) for j in truth_index]
    everyone = render_emitters(optics, fm, states[0], by, bx, amp, shape, z=bz, patch_size=patch)
    background = np.asarray(sim["background"].values, dtype=np.float64)
    work = np.asarray(sim["image"].values, dtype=np.float32)
    raw = np.asarray(beads_extract(work, pos, r))
    like = bp.patches

    def fit(patches, image_for_background, *, noise_free=False):
        p = subtract_background(like.copy(data=patches.astype(np.float32)), r, image=image_for_background,
                                positions=pos, mask_positions=bp.detections) if not noise_free else \
            like.copy(data=patches.astype(np.float32))
        b = BeadPatches(patches=p, positions=pos, radius=r, shape=bp.shape)
        kw = {"outlier_sigma": np.inf} if noise_free else {"image": sim["image"]}
        return grid_psf_error(fit_operator(b, n_components=n_components, **kw), sim, r)[0]

    others = np.stack([beads_extract((gain * (everyone - o)).astype(np.float32), pos[[m]], r)[0]
                       for m, o in enumerate(own)])
    bead_free = (work - gain * everyone).astype(np.float32)
    rng = np.random.default_rng(seed)
    cam_kw = dict(gain=gain, offset=cam["offset_adu"], read_noise=cam["read_noise_electrons"],
                  saturation=int(cam["saturation_adu"]))
    alone = np.stack([beads_extract(np.asarray(camera(rng, (o + background).astype(np.float32), **cam_kw),
                                               np.float32), pos[[m]], r)[0] for m, o in enumerate(own)])
    bg_alone = np.asarray(camera(rng, background.astype(np.float32), **cam_kw), np.float32)
    ks = like.shape[1:]
    truth = true_psfs(sim, pos[:, 1], pos[:, 2], size=ks[1], size_z=ks[0]) * 1e4
    return {"floor": fit(truth, None, noise_free=True),
            "others_removed": fit(raw - others, bead_free),
            "alone": fit(alone, bg_alone)}
