"""Benchmark: the realism projections on real planes whose beads were half erased (issue 12).

A user learned a family from 6 real confocal planes after erasing the beads of half the cells
of a checkerboard (each erased bead's disk refilled with background drawn from its own
surroundings, to hold them out): the default realism (non-negativity) spent 117 s in the
coefficient maps, against 1.5 s with the cone and 0.6 s with none. The same happens on the
real wide-field z-stack of ``../shared/realdata/widefield-bead-zstack``: with the cells
emptied, each plane's spline extrapolates over them to PSFs far from any microscope's, the
projection acts on most of the field, and its kinks drove the lattice refinement down to 2 px.

This script builds those planes (:func:`erased_planes`), learns the family with each realism
kind (``pcmx.learn_family(planes, pixel_size="108nm", realism=...)``) on the erased and on the
unerased planes, and prints, in one run, the seconds (total and coefficient maps), each
image's lattice step and projected nodes, the largest sampled distance of the maps to the
exact per-pixel projection (PSF-relative, ``info["max_error"]``), the most negative PSF
value relative to its peak
(over every 4th pixel of every image's maps), the ratios nonnegative / none, and one image
learned alone (``learn_operator(plane, realism=...)``). The figures before and after the fix
are in ``docs/performance.md`` (section "Realism projections on half-erased real planes").

    .venv/bin/python benchmarks/realism.py [--planes 14-19] [--cell 128] [--radius 2.5]
        [--parity 1] [--kinds nonnegative,cone,none]

The pcmx imported is the one on ``sys.path`` (run it with ``PYTHONPATH`` pointing at an older
copy to measure the code before a change).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import pcmx
import pcmx.family as family_module
from pcmx.beads import detect_beads, estimate_psf_radius

STACK = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "widefield-bead-zstack"


def erase_checkerboard(image, *, cell: int = 128, radius_factor: float = 2.5, parity: int = 1,
                       seed: int = 0) -> tuple[np.ndarray, int, int]:
    """Erase the beads of half the cells of a checkerboard, as a user holding them out would.

    Beads are detected by :func:`pcmx.beads.detect_beads`; every bead in a cell ``(i, j)``
    (``cell`` pixels a side) with ``(i + j) % 2 == parity`` has its disk of radius
    ``radius_factor * r`` (``r``: :func:`pcmx.beads.estimate_psf_radius`) refilled with the
    median of the annulus ``r_disk < d <= 1.5 r_disk`` around it plus Gaussian noise of that
    annulus' robust spread (1.4826 MAD), rounded and clipped to the image's integer range.

    Returns
    -------
    erased : ndarray, the image's dtype
    n_erased, n_detected : int
    """
    u = np.asarray(image)
    x = u.astype(np.float64)
    pos, _ = detect_beads(x)
    r = float(np.max(estimate_psf_radius(x, pos)))
    rd = radius_factor * r
    rng = np.random.default_rng(seed)
    out = x.copy()
    yy, xx = np.mgrid[: x.shape[0], : x.shape[1]]
    n = 0
    for y0, x0 in pos:
        if (int(y0) // cell + int(x0) // cell) % 2 != parity:
            continue
        d2 = (yy - y0) ** 2 + (xx - x0) ** 2
        disk = d2 <= rd * rd
        ring = x[(d2 > rd * rd) & (d2 <= (1.5 * rd) ** 2)]
        med = float(np.median(ring))
        spread = 1.4826 * float(np.median(np.abs(ring - med)))
        out[disk] = med + spread * rng.standard_normal(int(disk.sum()))
        n += 1
    if np.issubdtype(u.dtype, np.integer):
        info = np.iinfo(u.dtype)
        out = np.clip(np.round(out), info.min, info.max)
    return out.astype(u.dtype), n, len(pos)


def erased_planes(stack: Path = STACK, planes=range(14, 20), **kw) -> tuple[list, list, list]:
    """The planes of the real z-stack, raw and erased (:func:`erase_checkerboard`, one seed
    per plane). Returns ``(raw, erased, counts)`` with counts ``(plane, n_erased, n_detected)``."""
    raw, erased, counts = [], [], []
    for z in planes:
        u = np.asarray(pcmx.read_image(stack / f"sample_zstack{z:02d}.tif").values)
        e, n, m = erase_checkerboard(u, seed=z, **kw)
        raw.append(u)
        erased.append(e)
        counts.append((z, n, m))
    return raw, erased, counts


class MapsProbe:
    """Wraps :func:`pcmx.family.coefficient_maps` to record each image's lattice and PSFs."""

    def __init__(self):
        self.records = []
        self._orig = family_module.coefficient_maps

    def __enter__(self):
        def probe(*args, **kw):
            t0 = time.perf_counter()
            maps, tps, info = self._orig(*args, **kw)
            dt = time.perf_counter() - t0
            self.records.append({"seconds": dt, "step": int(info["step"]),
                                 "max_error": float(info["max_error"]),
                                 "n_nodes": int(info.get("n_nodes", -1)),
                                 "n_projected": int(info.get("n_projected", -1)),
                                 "maps": maps[:, ::4, ::4].copy()})
            return maps, tps, info

        family_module.coefficient_maps = probe
        return self

    def __exit__(self, *exc):
        family_module.coefficient_maps = self._orig


def worst_ratio(maps_list, basis) -> float:
    """Most negative PSF value relative to its peak over the recorded pixels."""
    h = np.asarray(basis, dtype=np.float64).reshape(len(basis), -1)
    worst = np.inf
    for m in maps_list:
        c = m.reshape(m.shape[0], -1).T.astype(np.float64)
        for s in range(0, len(c), 4096):
            p = c[s:s + 4096] @ h
            worst = min(worst, float((p.min(axis=1) / np.maximum(p.max(axis=1), 1e-300)).min()))
    return worst


def run_family(planes, kind: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with MapsProbe() as probe:
            t0 = time.perf_counter()
            fam = pcmx.learn_family(planes, pixel_size="108nm", realism=kind)
            total = time.perf_counter() - t0
    rec = probe.records
    return {"total": total, "maps": float(fam.attrs["pcmx_parameters"]["timings_s"]["coefficients"]),
            # the images finish in any order: steps sorted
            "steps": sorted(r["step"] for r in rec), "projected": [r["n_projected"] for r in rec],
            "nodes": [r["n_nodes"] for r in rec], "I": int(fam.sizes["component"]),
            "max_error": max(r["max_error"] for r in rec),
            "worst": worst_ratio([r["maps"] for r in rec], fam["psf_basis"].values)}


def run_single(plane, kind: str) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        pcmx.learn_operator(plane, pixel_size="108nm", realism=kind)
        return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--planes", default="14-19")
    p.add_argument("--cell", type=int, default=128)
    p.add_argument("--radius", type=float, default=2.5, help="erased disk radius / PSF radius r")
    p.add_argument("--parity", type=int, default=1)
    p.add_argument("--kinds", default="nonnegative,cone,none")
    a = p.parse_args(argv)
    if not STACK.is_dir():
        print(f"real data not available ({STACK})")
        return 1
    z0, z1 = (int(v) for v in a.planes.split("-"))
    raw, erased, counts = erased_planes(planes=range(z0, z1 + 1), cell=a.cell, radius_factor=a.radius,
                                        parity=a.parity)
    kinds = a.kinds.split(",")
    lines = [f"pcmx from {Path(pcmx.__file__).parent}",
             f"planes {z0}-{z1} of {STACK.name}, {a.cell} px checkerboard, disks of {a.radius} r erased: "
             + ", ".join(f"{z}: {n}/{m}" for z, n, m in counts), ""]
    lines.append("| data | realism | I | total s | maps s | lattice steps (sorted) | projected / nodes | max error | min PSF / peak |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    res = {}
    for name, planes in (("erased", erased), ("unerased", raw)):
        for kind in kinds:
            r = run_family(planes, kind)
            res[name, kind] = r
            frac = (f"{sum(r['projected'])} / {sum(r['nodes'])}" if min(r["nodes"]) >= 0 else "n/a")
            lines.append(f"| {name} | {kind} | {r['I']} | {r['total']:.1f} | {r['maps']:.2f} | "
                         f"{' '.join(map(str, r['steps']))} | {frac} | {r['max_error']:.4f} | {r['worst']:+.4f} |")
            print(lines[-1], flush=True)
    lines.append("")
    for name in ("erased", "unerased"):
        if (name, "nonnegative") in res and (name, "none") in res:
            nn, no = res[name, "nonnegative"], res[name, "none"]
            lines.append(f"{name}: nonnegative / none = {nn['total'] / no['total']:.2f}x total, "
                         f"{nn['maps'] / max(no['maps'], 1e-9):.1f}x maps")
    focus = erased[(17 - z0)] if z0 <= 17 <= z1 else erased[len(erased) // 2]
    single = {kind: run_single(focus, kind) for kind in kinds}
    lines.append("one erased plane alone (learn_operator): "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in single.items()))
    text = "\n".join(lines)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
