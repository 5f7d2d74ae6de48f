"""Benchmark of pcmx.simulate (issue 3): prints seconds, best of ``--repeat`` runs.

* a 2304 x 2304 field with 600 beads, one acquisition (target: < 10 s on 2 cores);
* the same with 5 states (what ``pcmx simulate --size 2304 --beads 600 --states 5`` renders);
* 1000 exact PSFs of 64 x 64 (target: well under a second), from explicit parameters
  (``scalar_psfs``) and at random field positions (``true_psfs``, which renders each PSF at
  the patch size the image used, up to 97 x 97 here, then crops);
* the ground-truth operator of a 2304 x 2304 field (5 components, 33 x 33 kernels, 16 x 16 grid).

Usage: ``python benchmarks/simulate.py [--repeat 3] [--quick]``
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="skip the 5-state and operator runs")
    args = parser.parse_args(argv)

    from pcmx.simulate import scalar_psfs, simulate_beads, true_operator, true_psfs

    simulate_beads((128, 128), 5)  # warm the FFT plans and imports
    print(f"cpus: {os.cpu_count()}")
    t = best_of(lambda: simulate_beads((2304, 2304), 600, seed=0), args.repeat)
    print(f"simulate_beads 2304x2304, 600 beads, 1 state: {t:.2f} s (target < 10 s)")
    sim = simulate_beads((2304, 2304), 600, seed=0, noise=False)
    rng = np.random.default_rng(0)
    ys, xs = rng.uniform(0, 2303, 1000), rng.uniform(0, 2303, 1000)
    zern = rng.normal(0.0, 0.05, (1000, 8))
    defocus = rng.uniform(-0.3, 0.3, 1000)
    scalar_psfs(zern[:10], defocus[:10], size=64)
    t = best_of(lambda: scalar_psfs(zern, defocus, size=64), args.repeat)
    print(f"scalar_psfs: 1000 PSFs of 64x64: {t:.3f} s (target well under 1 s)")
    true_psfs(sim, ys[:10], xs[:10], size=64)
    t = best_of(lambda: true_psfs(sim, ys, xs, size=64), args.repeat)
    print(f"true_psfs: 1000 PSFs of 64x64 (rendered at the image's patch sizes): {t:.3f} s")
    if not args.quick:
        t = best_of(lambda: simulate_beads((2304, 2304), 600, states=5, seed=0), 1)
        print(f"simulate_beads 2304x2304, 600 beads, 5 states: {t:.2f} s")
        t = best_of(lambda: true_operator(sim, n_components=5, kernel_size=33, grid=16), 1)
        print(f"true_operator 2304x2304, 5 components, 33x33, 16x16 grid: {t:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
