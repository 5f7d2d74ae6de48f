"""Restoration quality against the truth: true, learned and space-invariant operators
(issue 15, item 4).

Simulated scenes of one microscope whose PSF varies clearly over the field (field curvature,
astigmatism and coma growing towards the edges: :data:`ABERRATIONS`):

* 2D ``filaments``: 256 x 256, point sources along filaments over a faint smooth background
  (:func:`pcmx.simulate.simulate_point_sources`), Poisson noise;
* 2D ``beads``: 256 x 256, beads (:func:`pcmx.simulate.simulate_beads`, camera noise);
* 3D ``beads``: 24 x 128 x 128, beads spread through the volume (z step 200 nm).

Each is restored by every method of :func:`pcmx.restore.restore` (3D: ``rl``, ``rl-tv``, the
methods that take z-stacks, :data:`pcmx.restore.METHODS_3D`) with four operators:

* (a) ``true``: the simulator's exact model as a product-convolution
  (:func:`pcmx.simulate.true_operator`, rank 8, kernels of the learned operator's size);
* (b) ``learned``: :func:`pcmx.learn_operator` (defaults) on a separate bead image (2D) or
  bead stack (3D) of the same microscope (other bead positions, other noise);
* (c) ``invariant``: the space-invariant practice with the best single PSF, the mean of the
  true PSFs over the field (a 16 x 16 lattice; 8 x 8 in 3D) as one kernel
  (:func:`pcmx.learn.invariant_operator`);
* (c') ``invariant-learned``: the mean PSF of the learned operator over the same lattice, the
  average bead PSF of the same calibration: (b) against (c') isolates what the space
  variation adds with the same learning errors, (a) against (c) with none.

Error against the true object, with a resolution floor: the truth is the sources as Gaussian
spots of sigma 1 px (0.7 px along z in 3D) at their exact sub-pixel positions plus the
background (the simulator's, photons); the restoration is blurred by the same Gaussian. The
relative l2 error is ``min_a ||a x - t|| / ||t||`` (``a``: the best flux scale, which takes out
the camera gain and the operators' normalisation), and the PSNR ``20 log10(max t / RMSE)``
of ``a x`` against ``t``. Methods run with their defaults (weights, offset estimate) and the
iterations of :data:`ITERATIONS`; the operators apply with ``boundary="reflect"``.

Usage::

    .venv/bin/python benchmarks/restore_quality.py [--no-doc] [--no-3d]

The table is printed and written to ``docs/deblurring.md`` between the ``restore-quality``
markers.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOC = os.path.join(ROOT, "docs", "deblurring.md")
BEGIN, END = "<!-- restore-quality:begin -->", "<!-- restore-quality:end -->"

#: The field model (``pcmx.simulate`` ``aberrations``: polynomials over 1, u, v, u^2, uv, v^2
#: of the normalised field coordinates): field curvature (defocus 0.25 um at the edge
#: centres, 0.5 um in the corners), astigmatism (up to 0.05 waves RMS) and coma (0.03)
#: growing linearly towards the edges.
ABERRATIONS = {
    "defocus": [0.0, 0.0, 0.0, 0.25, 0.0, 0.25],
    5: [0.0, 0.04, 0.03],
    6: [0.0, -0.03, 0.04],
    7: [0.0, 0.03, 0.0],
    8: [0.0, 0.0, 0.03],
}
ITERATIONS = {"sparse-smooth": 300, "rl": 100, "rl-tv": 100, "tikhonov": 100, "fista-haar": 100}
ITERATIONS_3D = {"rl": 30, "rl-tv": 30}
SIGMA = 1.0  # px, the resolution floor of the error (2D and lateral)
SIGMA_Z = 0.7  # planes, along z
SEED = 5


def gaussian_truth(shape, pos, amp, background, sigma):
    """Sources as normalised Gaussian spots at their exact sub-pixel positions (2D or 3D)."""
    out = np.zeros(shape, np.float64)
    half = [int(np.ceil(4 * s)) for s in sigma]
    offs = np.stack(np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij"))
    for p, a in zip(pos, amp, strict=True):
        c = np.rint(p).astype(int)
        idx = offs + c.reshape(-1, *([1] * len(shape)))
        d2 = sum(((idx[k] - p[k]) / sigma[k]) ** 2 for k in range(len(shape)))
        g = np.exp(-0.5 * d2)
        g *= a / g.sum()
        ok = np.all([(idx[k] >= 0) & (idx[k] < shape[k]) for k in range(len(shape))], axis=0)
        np.add.at(out, tuple(idx[k][ok] for k in range(len(shape))), g[ok])
    return out + background


def errors(x, truth, sigma):
    """(relative l2 after the best flux scale, PSNR dB) of ``x`` blurred by the Gaussian."""
    import scipy.ndimage as ndi

    xs = ndi.gaussian_filter(np.asarray(x, np.float64), sigma, mode="nearest").ravel()
    t = truth.ravel()
    a = float(xs @ t) / max(float(xs @ xs), 1e-300)
    r = a * xs - t
    rel = float(np.linalg.norm(r) / np.linalg.norm(t))
    psnr = float(20 * np.log10(t.max() / np.sqrt(np.mean(r ** 2))))
    return rel, psnr


def lattice(op, n=None):
    """Integer (y, x) pixel positions of an n x n lattice over ``op``'s field."""
    n = n or (16 if "z" not in op.dims else 8)
    ny, nx = op.sizes["y"], op.sizes["x"]
    yy, xx = np.meshgrid(np.linspace(0, ny - 1, n), np.linspace(0, nx - 1, n), indexing="ij")
    return np.rint(yy.ravel()).astype(int), np.rint(xx.ravel()).astype(int)


def mean_true_psf_operator(sim, op_true, size, size_z=None):
    """The space-invariant operator of the mean true PSF over a lattice (:func:`lattice`)."""
    from pcmx.learn import invariant_operator
    from pcmx.simulate import true_psfs

    ys, xs = lattice(op_true)
    kw = {} if size_z is None else {"size_z": size_z}
    psf = true_psfs(sim, ys, xs, size=size, **kw).astype(np.float64).mean(axis=0)
    return invariant_operator(op_true, psf / psf.sum())


def mean_learned_psf_operator(learned):
    """The space-invariant operator of the learned operator's mean PSF over a lattice (and its
    middle plane in 3D): the average bead PSF of the same bead image."""
    from pcmx.learn import invariant_operator
    from pcmx.operator import ProductConvolution

    H = ProductConvolution(learned)
    ys, xs = lattice(learned)
    z = () if "z" not in learned.dims else (learned.sizes["z"] // 2,)
    psf = np.mean([np.asarray(H.psf_at(*z, y, x), np.float64) for y, x in zip(ys, xs, strict=True)],
                  axis=0)
    return invariant_operator(learned, psf / psf.sum())


def operators(sim, learned):
    """true, learned, invariant operator Datasets on ``sim``'s grid (kernels of the learned)."""
    from pcmx.simulate import true_operator

    k = learned.sizes["ky"]
    kz = learned.sizes.get("kz")
    kw = {} if kz is None else {"kernel_size_z": kz}
    op_true = true_operator(sim, n_components=8, kernel_size=k, grid=16 if kz is None else 8, **kw)
    return {"true": op_true, "learned": learned,
            "invariant": mean_true_psf_operator(sim, op_true, k, kz),
            "invariant-learned": mean_learned_psf_operator(learned)}


def field_variation(sim, ops):
    """The Dirac-comb distance of the learned and invariant operators to the truth (2D)."""
    from pcmx.deblur import dirac_comb_distance

    return {name: dirac_comb_distance(ops[name], ops["true"], 16)
            for name in ("learned", "invariant", "invariant-learned")}


def run_scene(label, image, truth, ops, methods, sigma, iterations):
    from pcmx.operator import ProductConvolution
    from pcmx.restore import restore

    rows = []
    engines = {name: ProductConvolution(op, boundary="reflect") for name, op in ops.items()}
    for method in methods:
        row = {"scene": label, "method": method}
        for name, H in engines.items():
            t0 = time.perf_counter()
            x = restore(image, H, method=method, iterations=iterations[method])
            dt = time.perf_counter() - t0
            rel, psnr = errors(x, truth, sigma)
            row[name] = (rel, psnr, dt)
        print(f"{label:14s} {method:14s} " + "  ".join(
            f"{n} {row[n][0]:.3f} / {row[n][1]:.1f} dB ({row[n][2]:.1f} s)" for n in engines)
            + f"  invariant/true {row['invariant'][0] / row['true'][0]:.2f}"
            + f"  invariant-learned/learned {row['invariant-learned'][0] / row['learned'][0]:.2f}",
            flush=True)
        rows.append(row)
    return rows


def scenes_2d():
    from pcmx import learn_operator
    from pcmx.simulate import simulate_beads, simulate_point_sources

    shape = (256, 256)
    calib = simulate_beads(shape, 60, aberrations=ABERRATIONS, photons=40000.0, seed=SEED)
    learned = learn_operator(calib["image"])
    fil = simulate_point_sources(shape, n_sources=90, n_filaments=12, pairs_closer_than_psf=10,
                                 background=10.0, operator=calib, seed=SEED + 1)
    beads = simulate_beads(shape, 50, aberrations=ABERRATIONS, min_separation=6,
                           background_level=10.0, seed=SEED + 2)
    for sim in (fil, beads):
        assert sim.attrs["field_model"] == calib.attrs["field_model"]
    out = []
    pos = np.c_[fil["source_y"].values, fil["source_x"].values]
    out.append(("2D filaments", fil, fil["image"].values,
                gaussian_truth(shape, pos, fil["amplitude"].values, fil["background"].values,
                               (SIGMA, SIGMA))))
    pos = np.c_[beads["bead_y"].values, beads["bead_x"].values]
    out.append(("2D beads", beads, beads["image"].values.astype(np.float32),
                gaussian_truth(shape, pos, beads["amplitude"].values, beads["background"].values,
                               (SIGMA, SIGMA))))
    return calib, learned, out


def scene_3d():
    from pcmx import learn_operator
    from pcmx.simulate import simulate_beads

    shape = (24, 128, 128)
    calib = simulate_beads(shape, 40, aberrations=ABERRATIONS, photons=40000.0, seed=SEED)
    learned = learn_operator(calib["image"])
    beads = simulate_beads(shape, 40, aberrations=ABERRATIONS, min_separation=6,
                           background_level=10.0, seed=SEED + 2)
    assert beads.attrs["field_model"] == calib.attrs["field_model"]
    pos = np.c_[beads["bead_z"].values, beads["bead_y"].values, beads["bead_x"].values]
    truth = gaussian_truth(shape, pos, beads["amplitude"].values, beads["background"].values,
                           (SIGMA_Z, SIGMA, SIGMA))
    return learned, ("3D beads", beads, beads["image"].values.astype(np.float32), truth)


def table(rows) -> list[str]:
    lines = ["| scene | method | (a) true | (b) learned | (c) invariant: mean true PSF | "
             "(c') invariant: mean learned PSF | error ratio (c) / (a) | (c') / (b) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[n][0]:.3f} / {r[n][1]:.1f} dB"
                 for n in ("true", "learned", "invariant", "invariant-learned")]
        lines.append(f"| {r['scene']} | {r['method']} | " + " | ".join(cells)
                     + f" | {r['invariant'][0] / r['true'][0]:.2f}"
                     + f" | {r['invariant-learned'][0] / r['learned'][0]:.2f} |")
    return lines


def write_doc(lines: list[str]) -> None:
    block = "\n".join([BEGIN, *lines, END])
    text = open(DOC).read()
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(DOC, "w") as f:
        f.write(text)


def main() -> None:
    from pcmx.restore import METHODS, METHODS_3D

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/deblurring.md")
    parser.add_argument("--no-3d", action="store_true", help="2D scenes only")
    args = parser.parse_args()
    t_all = time.perf_counter()
    calib, learned, scenes = scenes_2d()
    ops = operators(calib, learned)
    dist = field_variation(calib, ops)
    print(f"learned operator: {learned.sizes['component']} components, kernels "
          f"{learned.sizes['ky']} px; Dirac-comb distance to the truth: learned "
          f"{dist['learned']:.3f}, invariant {dist['invariant']:.3f}, invariant-learned "
          f"{dist['invariant-learned']:.3f}", flush=True)
    methods = ["sparse-smooth", "rl", "rl-tv", "tikhonov", "fista-haar"]
    assert set(methods) == set(METHODS)
    rows = []
    for label, _sim, image, truth in scenes:
        rows += run_scene(label, image, truth, ops, methods, SIGMA, ITERATIONS)
    info3 = ""
    if not args.no_3d:
        learned3, (label, sim3, image3, truth3) = scene_3d()
        ops3 = operators(sim3, learned3)
        info3 = (f"3D: learned operator {learned3.sizes['component']} components, kernels "
                 f"{learned3.sizes['kz']} x {learned3.sizes['ky']} x {learned3.sizes['kx']}")
        print(info3, flush=True)
        rows += run_scene(label, image3, truth3, ops3, [m for m in methods if m in METHODS_3D],
                          (SIGMA_Z, SIGMA, SIGMA), ITERATIONS_3D)
    total = time.perf_counter() - t_all
    print(f"total {total:.0f} s")
    lines = table(rows)
    print("\n".join(lines))
    if args.no_doc:
        return
    head = [
        f"Measured by `benchmarks/restore_quality.py` on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} cores, shared), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{total:.0f} s in all.",
        "",
        "Each cell: relative l2 error after the best flux scale / PSNR, of the restoration "
        f"blurred by a Gaussian of sigma {SIGMA:g} px ({SIGMA_Z:g} plane along z) against the "
        "sources as Gaussian spots of the same sigma at their exact positions plus the "
        "background (lower error, higher PSNR: better). Operators: (a) the simulator's "
        "model (rank 8), (b) `pcmx.learn_operator` on a separate bead image of the "
        f"same microscope ({learned.sizes['component']} components, {learned.sizes['ky']} px "
        "kernels), (c) the mean true PSF over the field as one kernel, (c') the mean PSF of the "
        "learned operator as one kernel. Dirac-comb "
        f"distance to the truth (2D, spacing 16 px): learned {dist['learned']:.3f}, mean true "
        f"PSF {dist['invariant']:.3f}, mean learned PSF {dist['invariant-learned']:.3f}. "
        + (info3 + "." if info3 else "3D not run."),
        "",
    ]
    write_doc(head + lines)
    print("wrote", DOC)


if __name__ == "__main__":
    main()
