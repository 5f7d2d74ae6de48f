"""Reproduce the paper's main figures on the simulator (docs/paper-figures.md).

    .venv/bin/python docs/paper_figures.py [--out docs/img/paper] [--states 10]

Writes the PNGs of docs/paper-figures.md into ``--out`` and prints every number the page
quotes (as markdown tables). Neither the test suite nor ``make docs`` runs it: it takes a
few minutes on 2 cores. Everything is seeded: a rerun gives the same numbers up to the
timings.

1. Fig. 2 (a-c) / Fig. 5 (a): one operator from one 512 x 512 bead image: PSF basis h_i,
   coefficient maps alpha_i, the PSFs over the field against the simulator's exact ones.
2. The error against the truth vs the number of components I and vs the number of beads
   (the rank rule of II-E-c and the paper's claim that more observed PSFs average the noise).
3. Fig. 2 (c-d) / Fig. 4: single operators vs a family learned from K images of one
   microscope under K states: PSF basis, space-variation basis a_j, Dirac-comb images, and
   the paper's rescaled l2 distance (III-B-1).
4. Fig. 8 (and Fig. 6-7): a held-out state identified in the family from a noisy image of
   point sources (App. D-a), SNR of the crops vs SNR of the identified PSFs; then blind
   Sparse+Smooth deblurring of a scene of that state (App. D-b).
"""

from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")  # a script writing PNGs: the library itself never touches the backend

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy.ndimage as ndi  # noqa: E402

import pcmx  # noqa: E402
from pcmx import plot  # noqa: E402
from pcmx.deblur import deblur, identify_operator, rescaled_distance  # noqa: E402
from pcmx.deblur.metrics import score_restoration  # noqa: E402
from pcmx.family import learn_family  # noqa: E402
from pcmx.fit import fit_operator  # noqa: E402
from pcmx.io.readers import as_image  # noqa: E402
from pcmx.learn import learn_operator  # noqa: E402
from pcmx.model import family_operator, psf_at  # noqa: E402
from pcmx.operator import blur  # noqa: E402
from pcmx.patches import bead_patches  # noqa: E402
from pcmx.simulate import simulate_beads, simulate_point_sources, true_operator, true_psfs  # noqa: E402
from pcmx.truth import true_comb_image  # noqa: E402
from pcmx.units import from_pixels  # noqa: E402

SHAPE = (512, 512)  # the paper's simulated field (Fig. 2a)
WINDOW = 33  # PSFs compared on a 33 x 33 window (centred, sum one)
COMB_STEP = 32  # Dirac comb spacing (pixels)
SEED = 5


# --------------------------------------------------------------------------------------------
# measures against the simulator's truth
# --------------------------------------------------------------------------------------------
def _grid(n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    ys = np.linspace(0, SHAPE[0] - 1, n + 2)[1:-1]
    gy, gx = np.meshgrid(ys, ys, indexing="ij")
    return np.round(gy.ravel()), np.round(gx.ravel())


def _centred(psfs: np.ndarray) -> np.ndarray:
    """Sum one, centroid moved to the window's centre, on a WINDOW x WINDOW window."""
    out = []
    for p in np.asarray(psfs, dtype=np.float64):
        if p.shape[-1] < WINDOW:
            o = (WINDOW - p.shape[-1]) // 2
            p = np.pad(p, o)
        elif p.shape[-1] > WINDOW:
            o = (p.shape[-1] - WINDOW) // 2
            p = p[o:o + WINDOW, o:o + WINDOW]
        p = p / p.sum()
        c = np.array(ndi.center_of_mass(np.clip(p, 0, None)))
        p = ndi.shift(p, np.array(p.shape) // 2 - c, order=3, mode="constant")
        out.append(p / p.sum())
    return np.stack(out)


def psf_error(op, sim, state: int = 0, *, family_state=None) -> float:
    """Median relative l2 error of the operator's PSFs on a 5 x 5 grid against the exact ones."""
    gy, gx = _grid()
    true = _centred(true_psfs(sim, gy, gx, state=state, size=WINDOW))
    pred = _centred(np.stack([psf_at(op, y=y, x=x, index=True, state=family_state).values
                              for y, x in zip(gy, gx, strict=True)]))
    n = len(true)
    return float(np.median(np.linalg.norm((pred - true).reshape(n, -1), axis=1)
                           / np.linalg.norm(true.reshape(n, -1), axis=1)))


def _true_comb(sim, state: int) -> np.ndarray:
    _, cy, cx = comb()
    return true_comb_image(sim, cy, cx, state=state, window=WINDOW)


def comb() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pts = np.arange(COMB_STEP, SHAPE[0] - COMB_STEP + 1, COMB_STEP)
    cy, cx = (a.ravel() for a in np.meshgrid(pts, pts, indexing="ij"))
    d = np.zeros(SHAPE, np.float32)
    d[cy, cx] = 1.0
    return d, cy, cx


def comb_image(op) -> np.ndarray:
    d, _, _ = comb()
    return np.asarray(blur(d, op, boundary="zero"), dtype=np.float64)


def snr_db(estimate: np.ndarray, truth: np.ndarray) -> float:
    """``10 log10(||t||^2 / ||a e + b - t||^2)``, the gain and offset fitted (rescaled)."""
    a = np.stack([estimate.ravel(), np.ones(estimate.size)], axis=1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(a, truth.ravel().astype(np.float64), rcond=None)
    res = a @ coef - truth.ravel()
    return float(10 * np.log10(np.sum(truth ** 2) / np.sum(res ** 2)))


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# 1. one operator from one image (Fig. 2 a-c, Fig. 5 a)
# --------------------------------------------------------------------------------------------
def single_operator(out: str) -> dict:
    sim = simulate_beads(SHAPE, 150, seed=0)
    t0 = time.perf_counter()
    op = learn_operator(sim["image"])  # defaults: I by the rank rule, 5-fold validation
    seconds = time.perf_counter() - t0
    params = op.attrs["pcmx_parameters"]
    # the ground truth as an operator: a rank-12 fit of exact PSFs on a 16 x 16 lattice
    truth = true_operator(sim, n_components=12, kernel_size=op.sizes["ky"])
    cv = params.get("cross_validation", {})
    res = {"I": op.sizes["component"], "beads": op.sizes["bead"], "seconds": seconds,
           "psf_error": psf_error(op, sim), "truth_floor": psf_error(truth, sim),
           "cv": cv.get("median_error"), "cv_invariant": cv.get("median_error_invariant")}

    fig = plt.figure(figsize=(19, 5.6), layout="constrained")
    axes = fig.subplots(1, 3)
    plot.plot_image(sim["image"], ax=axes[0], title="(a) simulated beads, 512 x 512")
    half = 10 * 0.065
    top = max(float(np.clip(psf_at(d, y=255, x=255, index=True).values, 0, None).max())
              for d in (truth, op))
    plot.psf_grid(truth, n=5, window=half, vmax=top, beads=False, ax=axes[1])
    axes[1].set_title("(b) ground truth (rank-12 fit of the exact PSFs)", fontsize=10)
    plot.psf_grid(op, n=5, window=half, vmax=top, ax=axes[2])
    axes[2].set_title(f"(c) learned from (a): I = {res['I']}, {res['beads']} beads", fontsize=10)
    res["fig_single"] = _save(fig, out, "fig2_single_operator.png")
    res["fig_basis"] = _save(plot.plot_basis(op), out, "fig5a_basis_single.png")
    res["fig_maps"] = _save(plot.field_maps(op), out, "field_maps_single.png")
    return {"sim": sim, "op": op, **res}


# --------------------------------------------------------------------------------------------
# 2. error vs the number of components and of beads
# --------------------------------------------------------------------------------------------
def error_curves(sim, op, out: str) -> dict:
    img = as_image(sim["image"])
    bp = bead_patches(img)
    comps = list(range(1, 9))
    by_i = [psf_error(fit_operator(bp, n_components=i, image=img), sim) for i in comps]
    rng = np.random.default_rng(0)
    usable = np.flatnonzero(bp.usable)
    counts = [c for c in (10, 20, 40, 80) if c < len(usable)] + [len(usable)]
    by_m = []
    for c in counts:
        errs = []
        for _ in range(3 if c < len(usable) else 1):
            keep = np.zeros(len(bp.positions), dtype=bool)
            keep[rng.choice(usable, c, replace=False)] = True
            errs.append(psf_error(fit_operator(bp.subset(keep), image=img), sim))
        by_m.append(float(np.median(errs)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    a.plot(comps, by_i, "o-")
    a.axvline(op.sizes["component"], color="k", ls=":", label=f"rank rule: I = {op.sizes['component']}")
    a.set_xlabel("number of components I")
    a.set_ylabel("median relative PSF error vs truth")
    a.legend()
    b.plot(counts, by_m, "o-")
    b.set_xscale("log")
    b.set_xlabel("number of beads (I by the rank rule)")
    b.set_ylabel("median relative PSF error vs truth")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    return {"components": comps, "by_components": by_i, "beads": counts, "by_beads": by_m,
            "fig": _save(fig, out, "error_vs_components_beads.png")}


# --------------------------------------------------------------------------------------------
# 3. a family vs single operators (Fig. 2 c-d, Fig. 4)
# --------------------------------------------------------------------------------------------
def family_vs_single(out: str, k: int) -> dict:
    # K + 1 states of one microscope: the family is learned from the first K, the last is held
    # out for the identification of part 4
    sim = simulate_beads(SHAPE, 30, states=k + 1, photons=36000.0, seed=SEED)
    train = sim["image"].isel(state=slice(0, k))
    t0 = time.perf_counter()
    fam = learn_family(train, psf_radius=12, progress=False)
    t_family = time.perf_counter() - t0
    singles, t_single = [], []
    for s in range(k):
        t0 = time.perf_counter()
        singles.append(learn_operator(train.isel(state=s), psf_radius=12, validate=False))
        t_single.append(time.perf_counter() - t0)
    d_single, d_family, e_single, e_family = [], [], [], []
    for s in range(k):
        u0 = _true_comb(sim, s)
        d_single.append(rescaled_distance(comb_image(singles[s]), u0))
        d_family.append(rescaled_distance(comb_image(family_operator(fam, state=s)), u0))
        e_single.append(psf_error(singles[s], sim, s))
        e_family.append(psf_error(fam, sim, s, family_state=s))

    fig = plt.figure(figsize=(16, 11))
    top, bottom = fig.subfigures(2, 1)
    plot.plot_basis(singles[0], fig=top)
    top.suptitle(f"one image (state 0): I = {singles[0].sizes['component']} PSF components h_i "
                 "(top), coefficient maps alpha_i (bottom)")
    shown = min(5, fam.sizes["component"]), min(5, fam.sizes["mode"])
    plot.plot_basis(fam.isel(component=slice(0, shown[0]), mode=slice(0, shown[1])), fig=bottom)
    bottom.suptitle(f"family of {k} images: the first {shown[0]} of I = {fam.sizes['component']} "
                    f"PSF components h_i (top), the first {shown[1]} of J = {fam.sizes['mode']} "
                    "space-variation modes a_j (bottom)")
    fig_bases = _save(fig, out, "fig4_single_vs_family_bases.png")

    sl = slice(16, 112)  # the top-left corner of the comb images: 3 x 3 Diracs
    panels = [("(a) exact PSFs, H_true d", _true_comb(sim, 0)),
              (f"(c) one image: distance {d_single[0]:.3f}", comb_image(singles[0])),
              (f"(d) family of {k}: distance {d_family[0]:.3f}", comb_image(family_operator(fam, state=0)))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2), layout="constrained")
    for ax, (title, u) in zip(axes, panels, strict=True):
        crop = u[sl, sl]
        im = ax.imshow(np.sqrt(np.clip(crop / crop.max(), 0, None)), cmap="magma",
                       extent=[sl.start * 0.065, sl.stop * 0.065, sl.stop * 0.065, sl.start * 0.065])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("x (µm)")
        ax.set_ylabel("y (µm)")
    fig.colorbar(im, ax=axes, shrink=0.8, label="sqrt(value / max)")
    fig_comb = _save(fig, out, "fig2cd_dirac_comb.png")
    fig_states = _save(plot.family_states(fam, states=list(range(min(k, 5)))), out,
                       "family_states.png")
    return {"sim": sim, "family": fam, "K": k, "I": fam.sizes["component"], "J": fam.sizes["mode"],
            "single_I": [s.sizes["component"] for s in singles],
            "t_family": t_family, "t_single": float(np.median(t_single)),
            "d_single": float(np.median(d_single)), "d_family": float(np.median(d_family)),
            "e_single": float(np.median(e_single)), "e_family": float(np.median(e_family)),
            "beads_family": int(fam.attrs["pcmx_parameters"].get("counts", {}).get("used", 0) or 0),
            "figs": [fig_bases, fig_comb, fig_states]}


# --------------------------------------------------------------------------------------------
# 4. identification in the family (Fig. 8) and blind Sparse+Smooth (Fig. 6-7)
# --------------------------------------------------------------------------------------------
def identification(fam_res: dict, out: str) -> dict:
    sim, fam, k = fam_res["sim"], fam_res["family"], fam_res["K"]
    held = sim.attrs["states"][k]
    state = {"defocus": held["defocus_um"], "tilt": held["tilt_um"],
             "aberration_scale": held["aberration_scale"],
             "zernike": {int(j): c for j, c in held["zernike_waves"].items()}}
    # 25 point sources on a 5 x 5 grid (the paper's Fig. 8 set-up), dim: noisy crops
    beads = simulate_beads(SHAPE, 25, states=[state], grid=True, photons=700.0,
                           background_level=20.0, seed=SEED)
    assert beads.attrs["field_model"] == sim.attrs["field_model"]  # the same microscope
    image = beads["image"].isel(state=0)
    t0 = time.perf_counter()
    ident = identify_operator(image, fam)
    t_ident = time.perf_counter() - t0
    pos = ident.positions
    size = fam.sizes["ky"]
    h = size // 2
    true = true_psfs(beads, pos[:, 0], pos[:, 1], state=0, size=size).astype(np.float64)
    est = np.stack([psf_at(ident.operator, y=y, x=x, index=True).values for y, x in pos])
    ci = np.rint(pos).astype(int)
    data = np.asarray(image.values, dtype=np.float64)
    crops = np.stack([data[y - h:y + h + 1, x - h:x + h + 1] for y, x in ci])
    # crops against the exact PSFs at their integer-pixel centres (the crops' own sampling)
    true_ci = true_psfs(beads, ci[:, 0].astype(float), ci[:, 1].astype(float), state=0,
                        size=size).astype(np.float64)
    snr_crops = float(np.median([snr_db(c, t) for c, t in zip(crops, true_ci, strict=True)]))
    snr_est = float(np.median([snr_db(e, t) for e, t in zip(est, true, strict=True)]))
    # the paper's rescaled distance to the held-out truth: identified vs the nearest training state
    u0 = _true_comb(beads, 0)
    d_ident = rescaled_distance(comb_image(ident.operator), u0)
    d_states = [rescaled_distance(comb_image(family_operator(fam, state=s)), u0) for s in range(k)]

    fig, axes = plt.subplots(3, 5, figsize=(12, 7.6), layout="constrained")
    for c, i in enumerate(np.linspace(0, len(pos) - 1, 5).astype(int)):
        for r, (name, arr) in enumerate((("noisy crop", crops[i]), ("exact PSF", true[i]),
                                         ("identified", est[i]))):
            ax = axes[r, c]
            ax.imshow(arr, cmap="magma", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
            if r == 0:
                ax.set_title(f"y={pos[i, 0] * 0.065:.1f}, x={pos[i, 1] * 0.065:.1f} µm", fontsize=8)
    fig.suptitle(f"(a) noisy crops, median SNR {snr_crops:.1f} dB; (b) exact PSFs; "
                 f"(c) identified in the family, SNR {snr_est:.1f} dB (medians over {len(pos)} sources)")
    fig_ident = _save(fig, out, "fig8_identification.png")

    # blind Sparse+Smooth on a scene of the held-out state (point sources on filaments)
    scene = simulate_point_sources(SHAPE, n_sources=200, n_filaments=30, pairs_closer_than_psf=20,
                                   operator=beads, seed=SEED)
    t0 = time.perf_counter()
    res = deblur(scene["image"], fam)
    t_bss = time.perf_counter() - t0
    score = score_restoration(res["sparse"], scene["source_y"].values, scene["source_x"].values)
    raw = score_restoration(scene["image"], scene["source_y"].values, scene["source_x"].values)
    # the identification's sources are stored in pixels of the whole field: in micrometres
    # (the image's units) before cropping, so the overlay stays on them
    if "source_y" in res and res["source_y"].attrs.get("units") == "pixel":
        pos_um = from_pixels(res, y=res["source_y"].values, x=res["source_x"].values)
        res = res.assign({f"source_{d}": (res[f"source_{d}"].dims, v, {"units": u})
                          for d, (v, u) in pos_um.items()})
    sub = {d: slice(128, 384) for d in ("y", "x")}
    fig_bss = _save(plot.deblur_panel(res.isel(sub), scene["image"].isel(sub)), out,
                    "fig7_blind_sparse_smooth.png")
    return {"P": len(pos), "snr_crops": snr_crops, "snr_est": snr_est, "residual": ident.residual,
            "d_ident": d_ident, "d_nearest": float(min(d_states)), "t_ident": t_ident, "t_bss": t_bss,
            "f1": score["f1"], "rmse": score["rmse"], "f1_raw": raw["f1"],
            "figs": [fig_ident, fig_bss]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "img", "paper"))
    p.add_argument("--states", type=int, default=10, help="K, images of the family")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t_all = time.perf_counter()
    with pcmx.set_options(progress=False):
        one = single_operator(args.out)
        print(f"[1] single operator: I={one['I']}, {one['beads']} beads, {one['seconds']:.1f} s, "
              f"PSF error {one['psf_error']:.3f} (the rank-12 truth's own {one['truth_floor']:.3f}), "
              f"held-out {one['cv']:.3f} vs invariant {one['cv_invariant']:.3f}", flush=True)
        curves = error_curves(one["sim"], one["op"], args.out)
        print("[2] | I | " + " | ".join(map(str, curves["components"])) + " |")
        print("    | error | " + " | ".join(f"{v:.3f}" for v in curves["by_components"]) + " |")
        print("    | beads | " + " | ".join(map(str, curves["beads"])) + " |")
        print("    | error | " + " | ".join(f"{v:.3f}" for v in curves["by_beads"]) + " |", flush=True)
        fam = family_vs_single(args.out, args.states)
        print(f"[3] family K={fam['K']}: I={fam['I']}, J={fam['J']}, {fam['t_family']:.1f} s "
              f"({fam['t_family'] / fam['K']:.2f} s/image); singles I={fam['single_I']}, "
              f"{fam['t_single']:.2f} s/image; rescaled comb distance single {fam['d_single']:.3f} "
              f"family {fam['d_family']:.3f}; PSF error single {fam['e_single']:.3f} family "
              f"{fam['e_family']:.3f}", flush=True)
        ident = identification(fam, args.out)
        print(f"[4] identification: P={ident['P']}, SNR crops {ident['snr_crops']:.1f} dB -> "
              f"{ident['snr_est']:.1f} dB, residual {ident['residual']:.3f}, comb distance "
              f"{ident['d_ident']:.3f} (nearest training state {ident['d_nearest']:.3f}), "
              f"{ident['t_ident']:.1f} s; blind BSS {ident['t_bss']:.1f} s "
              f"F1 {ident['f1']:.3f} RMSE {ident['rmse']:.3f} px (peaks of the raw image: F1 "
              f"{ident['f1_raw']:.3f})")
    print(f"total {time.perf_counter() - t_all:.0f} s; figures in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
