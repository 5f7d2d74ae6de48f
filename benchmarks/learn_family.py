"""Benchmark: learn a family from K simulated 2304x2304 bead images, I = J = 5 (issue 6).

Target: at most 10 minutes wall on 2 cores with peak memory under 4 GB (the paper: 3 hours
for its 90 wide-field images), and the time per image flat in K. Prints the share of each
step, the Gram vs randomized SVD comparison, and writes a section of docs/performance.md.

The images are one simulated microscope (one random field model) in K random states
(defocus, focal-plane tilt, aberration drift, as :func:`pcmx.simulate.random_states`), each
with its own random bead field (``--beads`` beads, 40 px apart at least), simulated in a
child process and streamed to uint16 TIFF files in a temporary directory: the learning
process starts from paths, as a user's would, and neither the simulation's time nor its memory
is counted. Peak memory is the learning process's: ``ru_maxrss`` and a thread sampling
``VmRSS`` in ``/proc/self/status`` every 50 ms.

    .venv/bin/python benchmarks/learn_family.py [--k 90] [--size 2304] [--beads 600]
        [--quick] [--scaling] [--no-randomized] [--no-write] [--tmp DIR]

``--quick``: K = 12 images of 1024 x 1024 with 120 beads (a minute). ``--scaling`` also learns
from the first K/3 images to compare the time per image. The maps scratch of K = 90 at
2304^2, I = 5 is 9.5 GB: the free space of ``--tmp`` is checked first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

N_COMPONENTS = 5
N_MODES = 5


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRss:
    """Samples the process's resident set every ``interval`` s while active."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0.0
        self.samples: list[tuple[float, float]] = []  # (perf_counter, MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = _rss_mib()
            self.samples.append((time.perf_counter(), rss))
            self.peak = max(self.peak, rss)
            self._stop.wait(self.interval)

    def peak_per_step(self, start: float, timings: dict) -> dict:
        """Largest sample within each step, the steps run in turn from ``start`` (``timings``
        in seconds, in order, ``total`` ignored)."""
        out, t = {}, start
        for step, seconds in timings.items():
            if step == "total":
                continue
            inside = [m for (ts, m) in self.samples if t <= ts <= t + seconds]
            out[step] = max(inside) if inside else float("nan")
            t += seconds
        return out

    def __enter__(self) -> PeakRss:
        self.peak = _rss_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def simulate_into(directory: str, k: int, size: int, beads: int, seed: int) -> None:
    """Write ``k`` TIFF images of one microscope in ``k`` random states (run in a child process)."""
    import numpy as np

    from pcmx.io.tiff import write_tiff
    from pcmx.simulate import simulate_beads
    from pcmx.simulate._model import random_states

    ref = simulate_beads((64, 64), 0, seed=seed, noise=False)  # the field model only
    fm = ref.attrs["field_model"]
    aberrations = {"defocus": fm["defocus_um"], **{int(j): p for j, p in fm["zernike_waves"].items()}}
    states = random_states(k, np.random.default_rng(seed))
    for i, state in enumerate(states):
        sim = simulate_beads((size, size), beads, states=[state], aberrations=aberrations,
                             min_separation=40, seed=seed + 1 + i)
        write_tiff(os.path.join(directory, f"beads{i:03d}.tif"), sim["image"].values[0], 0.065)


def learn(paths, *, svd: str, checkpoint: str | None, scratch: str) -> dict:
    from pcmx.family import learn_family

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with PeakRss() as rss:
        fam = learn_family(paths, n_components=N_COMPONENTS, n_modes=N_MODES, svd=svd,
                           checkpoint=checkpoint, scratch=scratch)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    params = fam.attrs["pcmx_parameters"]
    # learn_family's own clock starts a moment after ours: align its end with ours
    start = t0 + wall - params["timings_s"]["total"]
    return {"wall": wall, "cpu": cpu, "step_rss": rss.peak_per_step(start, params["timings_s"]), "load": os.getloadavg()[0], "rss_peak": rss.peak, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "maxrss_before": before, "timings": params["timings_s"], "params": params,
            "beads": int(fam["beads_used"].sum()), "family": fam}


def _agreement(a, b) -> tuple[float, float]:
    """Largest relative difference of the rank-J map reconstructions' gammas and of the modes'
    subspaces (1 - smallest cosine of the principal angles)."""
    import numpy as np

    ma = a["spatial_basis"].values.reshape(a.sizes["mode"], -1).astype(np.float64)
    mb = b["spatial_basis"].values.reshape(b.sizes["mode"], -1).astype(np.float64)
    cos = np.linalg.svd(ma @ mb.T, compute_uv=False)
    # the maps sum_j gamma_k[i, j] a_j at every 997th pixel (all pixels: K*I*P floats)
    ga = np.einsum("kij,jp->kip", a["gamma"].values, ma[:, ::997])
    gb = np.einsum("kij,jp->kip", b["gamma"].values, mb[:, ::997])
    return float(np.abs(ga - gb).max() / np.abs(ga).max()), float(1 - cos.min())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=90)
    p.add_argument("--size", type=int, default=2304)
    p.add_argument("--beads", type=int, default=600)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="K=12, 1024x1024, 120 beads")
    p.add_argument("--scaling", action="store_true", help="also learn from the first K/3 images")
    p.add_argument("--no-randomized", action="store_true", help="skip the randomized SVD run")
    p.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    p.add_argument("--tmp", default=None, help="directory of the images and the maps scratch")
    p.add_argument("--simulate-into", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.k, args.size, args.beads = 12, 1024, 120
    if args.simulate_into:
        simulate_into(args.simulate_into, args.k, args.size, args.beads, args.seed)
        return 0

    parent = args.tmp or tempfile.gettempdir()
    need = args.k * args.size ** 2 * (2 + 4 * N_COMPONENTS) * 1.1
    free = shutil.disk_usage(parent).free
    if free < need:
        print(f"not enough free space in {parent}: {free / 2**30:.1f} GiB, need {need / 2**30:.1f} GiB "
              "(images and maps scratch); use --tmp or a smaller --k/--size", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="pcmx-bench-family-", dir=parent)
    try:
        images = os.path.join(work, "images")
        os.makedirs(images)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--simulate-into", images, "--k", str(args.k),
                        "--size", str(args.size), "--beads", str(args.beads), "--seed", str(args.seed)],
                       check=True)
        t_sim = time.perf_counter() - t0
        paths = sorted(str(q) for q in Path(images).glob("*.tif"))
        print(f"simulated {len(paths)} images of {args.size}x{args.size} in {t_sim:.0f} s "
              f"(not counted)", flush=True)

        ckpt = os.path.join(work, "checkpoint")
        main_run = learn(paths, svd="gram", checkpoint=ckpt, scratch=work)
        print(f"gram: {main_run['wall']:.1f} s, peak RSS {main_run['rss_peak']:.0f} MiB, "
              f"{main_run['timings']}", flush=True)
        rand = None
        if not args.no_randomized:
            # same checkpoint: beads, basis and maps are resumed, only the SVD runs again
            rand = learn(paths, svd="randomized", checkpoint=ckpt, scratch=work)
            print(f"randomized (resumed): {rand['wall']:.1f} s, svd {rand['timings']['svd']:.1f} s",
                  flush=True)
        shutil.rmtree(ckpt, ignore_errors=True)
        small = None
        if args.scaling:
            k_small = max(2, args.k // 3)
            small = learn(paths[:k_small], svd="gram", checkpoint=None, scratch=work)
            small["k"] = k_small
            print(f"K={k_small}: {small['wall']:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    t = main_run["timings"]
    wall = main_run["wall"]
    per_image = (t["beads"] + t["coefficients"]) / args.k
    gib = 2 ** 30
    maps_gb = args.k * N_COMPONENTS * args.size ** 2 * 4 / gib
    lines = [
        f"learn_family, K={args.k} simulated images of {args.size}x{args.size} with {args.beads} beads "
        f"each (one microscope, K random states), I={N_COMPONENTS}, J={N_MODES}, from TIFF paths, "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}:",
        "",
        f"* wall {wall:.0f} s ({wall / 60:.1f} min; target 10 min, ratio {wall / 600:.2f}); "
        f"{wall / args.k:.2f} s per image; {main_run['beads']} beads used",
        f"* CPU time of the learning process {main_run['cpu']:.0f} s (user + sys): at best "
        f"{main_run['cpu'] / 2:.0f} s ({main_run['cpu'] / 120:.1f} min) of wall on 2 idle cores; "
        f"the machine's 1-min load average was {main_run['load']:.1f} at the end (shared machine: "
        f"the wall above includes waiting for the CPUs)",
        f"* peak resident memory of the learning process {main_run['rss_peak']:.0f} MiB sampled, "
        f"ru_maxrss {main_run['maxrss']:.0f} MiB (target 4096 MiB, ratio "
        f"{max(main_run['rss_peak'], main_run['maxrss']) / 4096:.2f}); maps scratch on disk "
        f"{maps_gb:.1f} GiB",
        "",
        "| step | seconds | share | peak RSS in the step (MiB) |",
        "|---|---|---|---|",
    ]
    for step, v in t.items():
        if step != "total":
            lines.append(f"| {step} | {v:.1f} | {100 * v / t['total']:.0f}% | "
                         f"{main_run['step_rss'].get(step, float('nan')):.0f} |")
    lines.append(f"| total | {t['total']:.1f} | 100% | {main_run['rss_peak']:.0f} |")
    if small is not None:
        ts = small["timings"]
        per_small = (ts["beads"] + ts["coefficients"]) / small["k"]
        lines += ["", f"Time per image vs K (beads + maps, the per-image steps): K={small['k']}: "
                      f"{per_small:.2f} s, K={args.k}: {per_image:.2f} s (ratio {per_image / per_small:.2f}); "
                      f"whole run per image {small['wall'] / small['k']:.2f} s vs "
                      f"{wall / args.k:.2f} s (ratio {(wall / args.k) / (small['wall'] / small['k']):.2f})."]
    if rand is not None:
        diff, angle = _agreement(main_run["family"], rand["family"])
        lines += ["", f"SVD route (same maps, resumed from the checkpoint): Gram {t['svd']:.1f} s, "
                      f"randomized (power iterations {rand['params'].get('power_iterations', 2)}) "
                      f"{rand['timings']['svd']:.1f} s, ratio {rand['timings']['svd'] / t['svd']:.2f}; "
                      f"modes' subspaces 1 - min cos = {angle:.1e}, coefficient maps differ by "
                      f"{diff:.1e} of their peak."]
    text = "\n".join(lines)
    print(text)
    print(json.dumps({"wall_s": wall, "rss_peak_mib": main_run["rss_peak"], "timings_s": t}))
    if not args.no_write:
        doc = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
        old = doc.read_text() if doc.exists() else "# Performance\n"
        block = f"<!-- learn_family:begin -->\n## Learning a family\n\n{text}\n<!-- learn_family:end -->"
        if "<!-- learn_family:begin -->" in old:
            new = re.sub(r"<!-- learn_family:begin -->.*<!-- learn_family:end -->", lambda m: block, old,
                         flags=re.S)
        else:
            new = old.rstrip() + "\n\n" + block + "\n"
        doc.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
