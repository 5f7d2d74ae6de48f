"""``pcmx simulate``: write simulated micro-bead acquisitions (TIFFs) and their ground truth.

Example::

    pcmx simulate --size 2304 --beads 600 --states 5 --output sim/

writes ``sim/state_000.tif`` ... ``sim/state_004.tif`` (ImageJ TIFFs with the pixel size in
their metadata), ``sim/ground_truth.zarr`` (the simulation Dataset: images, backgrounds, bead
positions and brightness, and the optical model from which ``pcmx.simulate.true_psf``
recomputes any exact PSF) and, with ``--true-operator I``, ``sim/operator_state_000.zarr``...
(the ground-truth operator of each state at I components, for evaluating estimates).
The output directory is created if missing (its parent must exist); every file in it is
checked before the simulation and written all-or-nothing (all of them, or none).
"""

from __future__ import annotations

import argparse
import os
import time

from ..errors import InputError
from ._common import int_at_least, real

NAME = "simulate"
HELP = "simulate micro-bead images with exact ground truth (TIFFs + Zarr store)"


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("*", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r} must be N or NYxNX") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"--size {text!r} must be N or NYxNX with positive sizes")
    return values[0], values[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", required=True, help="output directory")
    parser.add_argument("--size", type=_size, default=(512, 512),
                        help="image size in pixels, N or NYxNX (default 512)")
    parser.add_argument("--beads", type=int_at_least(0), default=150, help="number of beads (default 150)")
    parser.add_argument("--states", type=int_at_least(1), default=1,
                        help="number of acquisitions under varying conditions (default 1)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (default 0)")
    parser.add_argument("--pixel-size", default="65nm", help="object-plane pixel size (default 65nm)")
    parser.add_argument("--na", type=real(0, strict=True), default=1.49, help="numerical aperture (default 1.49)")
    parser.add_argument("--wavelength", default="670nm", help="emission wavelength (default 670nm)")
    parser.add_argument("--n-immersion", type=real(0, strict=True), default=1.518,
                        help="immersion refractive index (default 1.518)")
    parser.add_argument("--photons", type=real(0, strict=True), default=10_000.0,
                        help="median photons per bead (default 10000)")
    parser.add_argument("--background", type=real(0), default=50.0,
                        help="mean background, photons per pixel (default 50)")
    parser.add_argument("--min-separation", default=None,
                        help="minimum bead distance, pixels or a length (default 4 Airy FWHMs)")
    parser.add_argument("--3d", dest="three_d", action="store_true",
                        help="z-stacks of beads spread through a volume")
    parser.add_argument("--z-slices", type=int_at_least(1), default=21, help="planes per z-stack with --3d (default 21)")
    parser.add_argument("--z-step", default="200nm", help="axial step with --3d (default 200nm)")
    parser.add_argument("--no-noise", action="store_true",
                        help="write expected photon counts (float32) instead of camera counts")
    parser.add_argument("--true-operator", type=int_at_least(0), default=0, metavar="I",
                        help="also write each state's ground-truth operator with I components")
    parser.add_argument("--kernel-size", type=int_at_least(1), default=33,
                        help="kernel size of --true-operator (odd, default 33)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _min_sep(value):
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return value


_OPTIONS = {"wavelength": "--wavelength",
            "min_separation": "--min-separation", "kernel_size": "--kernel-size", "na": "--na",
            "n_immersion": "--n-immersion", "photons": "--photons"}


def run(args) -> int:
    from ..simulate import simulate_beads, true_operator
    from ._common import Outputs, check_distinct, check_output, worded

    if args.true_operator and args.kernel_size % 2 == 0:
        raise InputError(f"--kernel-size {args.kernel_size}: kernel sides must be odd (the PSF "
                         "centre is a pixel)")
    out = check_output(args.output, "--output", kind="directory", overwrite=args.overwrite)
    store = os.path.join(out, "ground_truth.zarr")
    tiffs = [os.path.join(out, f"state_{k:03d}.tif") for k in range(args.states)]
    operators = [os.path.join(out, f"operator_state_{k:03d}.zarr")
                 for k in range(args.states if args.true_operator else 0)]
    targets = [*tiffs, store, *operators]
    if os.path.isdir(out):
        for path in targets:
            check_output(path, "--output", kind="store" if path.endswith(".zarr") else "tiff",
                         overwrite=args.overwrite)
    check_distinct([("--output", p) for p in targets])
    shape = ((args.z_slices, *args.size) if args.three_d else tuple(args.size))
    with Outputs(lock=[out, *(targets if os.path.isdir(out) else [])]) as outputs:
        t0 = time.perf_counter()
        with worded(options=_OPTIONS):
            sim = simulate_beads(
                shape, args.beads, states=args.states, seed=args.seed, pixel_size=args.pixel_size,
                na=args.na, wavelength=args.wavelength, n_immersion=args.n_immersion,
                z_step=args.z_step, photons=args.photons, background_level=args.background,
                min_separation=_min_sep(args.min_separation), noise=not args.no_noise,
            )
            elapsed = time.perf_counter() - t0
            ops = [true_operator(sim, state=k, n_components=args.true_operator,
                                 kernel_size=args.kernel_size) for k in range(len(operators))]
        outputs.directory(out)
        optics = sim.attrs["optics"]
        for k, path in enumerate(tiffs):
            outputs.tiff(path, sim["image"].isel(state=k).values, optics["pixel_size_um"],
                         z_step_um=optics["z_step_um"] if args.three_d else None)
        outputs.store(store, sim, overwrite=args.overwrite)
        for op, path in zip(ops, operators, strict=True):
            outputs.store(path, op, overwrite=args.overwrite)
    written = [*tiffs, store, *operators]
    print(f"simulated {args.states} state(s) of {'x'.join(map(str, shape))} pixels with "
          f"{sim.sizes['bead']} beads in {elapsed:.1f} s")
    for path in written:
        print(f"wrote {path}")
    return 0
