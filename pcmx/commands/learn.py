"""``pcmx learn IMAGE --output OP.zarr``: learn one space-varying operator from a bead image.

The output is checked before any work (its directory must exist; an existing store is
replaced only with ``--overwrite``) and written atomically.
"""

from __future__ import annotations

from ._common import add_channel_arguments, int_at_least, real

NAME = "learn"
HELP = "learn the space-varying operator of a microscope from one bead image or z-stack (paper II-C)"


def add_arguments(parser) -> None:
    parser.add_argument("image", help="2D bead image or 3D z-stack of beads in a gel: TIFF, "
                                      "Zarr/OME-Zarr or .npy")
    parser.add_argument("-o", "--output", required=True, help="operator store to write (Zarr)")
    parser.add_argument("--group", default=None,
                        help="write the store as this group inside the existing Zarr --output "
                             "(e.g. pcmx/operator inside an OME-Zarr image)")
    parser.add_argument("--components", type=int_at_least(1), default=None,
                        help="I, size of the PSF basis (default: Gavish-Donoho optimal hard "
                             "threshold for the patches' estimated noise)")
    parser.add_argument("--psf-radius", type=int_at_least(1), nargs="+", default=None, metavar="R",
                        help="r in pixels (default: estimated); for a z-stack one lateral "
                             "radius or three: r_z r_y r_x")
    parser.add_argument("--pixel-size", default=None, help="e.g. 65nm, when the file lacks it")
    parser.add_argument("--any-pixel-size", action="store_true",
                        help="accept a pixel size outside 1 nm - 100 um (other optics, e.g. a "
                             "telescope's image-plane pixels)")
    parser.add_argument("--z-step", default=None,
                        help="distance between the planes of a z-stack, e.g. 200nm, when the "
                             "file lacks it or a glob of 2D files is stacked")
    add_channel_arguments(parser)
    parser.add_argument("--threshold", type=real(0, strict=True), default=None, help="detection threshold (default: automatic)")
    parser.add_argument("--background", choices=["global", "local"], default=None,
                        help="background estimator (default: the least biased, see docs/background.md)")
    parser.add_argument("--eta", type=real(0), default=None, help="TPS smoothing (default: GCV)")
    parser.add_argument("--realism", choices=("auto", "cone", "nonnegative", "none"), default="auto",
                        help="realism projection of the maps (App. C-b): the cone of observed "
                             "coefficients, non-negative PSFs, or none; auto (default): the cone, "
                             "checked against non-negative PSFs by the model selection")
    parser.add_argument("--no-realism", dest="realism", action="store_const", const="none",
                        help="same as --realism none")
    parser.add_argument("--validate", dest="validate", action="store_const", const=True, default="auto",
                        help="cross-validate over held-out beads, and fail if there are too few "
                             "(default: cross-validate when there are enough beads)")
    parser.add_argument("--no-validate", dest="validate", action="store_const", const=False,
                        help="do not cross-validate (and so keep the space-varying model unchecked)")
    parser.add_argument("--select", choices=("auto", "space-varying"), default="auto",
                        help="model selection by held-out error: auto (default) checks each "
                             "automatic choice (I, the smoothing, the realism) against one "
                             "alternative and the space-invariant model on the same folds and "
                             "stores the simplest within one standard error of the best; "
                             "space-varying keeps the automatic fit; a warning says when the "
                             "stored model is the space-invariant one or worse than it")
    parser.add_argument("--folds", type=int_at_least(2), default=5,
                        help="cross-validation folds, at least 2 (default 5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars on stderr (shown on a terminal by default)")


_OPTIONS = {"n_components": "--components",
            "psf_radius": "--psf-radius", "threshold": "--threshold", "eta": "--eta",
            "folds": "--folds"}


def _inputs(pattern: str) -> list:
    """Provenance records of the files read (a glob's, in the order stacked)."""
    import glob
    import os

    from ..io.readers import natural_sort
    from ..provenance import sha256_file

    paths = natural_sort(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    return [{"name": os.path.basename(os.path.normpath(p)),
             "sha256": sha256_file(p) if os.path.isfile(p) else None} for p in paths]


def run(args) -> int:
    from ..errors import InputError
    from ..learn import learn_operator
    from ._common import Outputs, check_output, store_target, worded

    out = check_output(store_target(args.output, args.group), "--output", kind="store",
                       overwrite=args.overwrite)
    radius = args.psf_radius
    if radius is not None:
        if len(radius) not in (1, 3):
            raise InputError(f"--psf-radius {' '.join(map(str, radius))}: give one radius, or "
                             "three (r_z r_y r_x) for a z-stack")
        radius = radius[0] if len(radius) == 1 else tuple(radius)
    with Outputs(lock=[out]) as outputs:
        image, z_step = args.image, args.z_step
        stacked = any(c in args.image for c in "*?[")
        if stacked or args.channel is not None or args.time is not None:
            from ..io.readers import read_image

            with worded(image=args.image, options={"z_step": "--z-step", "channel": "--channel",
                                                   "time": "--time"}):
                image = read_image(args.image, pixel_size=args.pixel_size, channel=args.channel,
                                   time=args.time, z_step=z_step if stacked else None)
            z_step = None if stacked else z_step
        with worded(image=args.image, options=_OPTIONS):
            ds = learn_operator(image, n_components=args.components, psf_radius=radius,
                                pixel_size=args.pixel_size, z_step=z_step,
                                threshold=args.threshold, background=args.background, eta=args.eta,
                                realism=args.realism, validate=args.validate, folds=args.folds,
                                select=args.select)
        if not isinstance(image, str):
            ds.attrs["pcmx_inputs"] = _inputs(args.image)
        outputs.store(out, ds, overwrite=args.overwrite,
                      root=args.output if args.group else None)
    p = ds.attrs["pcmx_parameters"]
    c = p["counts"]
    print(f"{args.output}: I={p['n_components']} components, r={p['psf_radius']} px, "
          f"{c['used']} beads used of {c['detected']} detected "
          f"({', '.join(f'{k[9:]} {v}' for k, v in c.items() if k.startswith('rejected_'))}), "
          f"{p['timings_s']['total']:.2f} s")
    if "cross_validation" in p:
        cv = p["cross_validation"]
        print(f"cross-validation ({cv['folds']} folds): median held-out error {cv['median_error']:.3f} "
              f"vs {cv['median_error_invariant']:.3f} for the space-invariant reference "
              f"(flux-weighted mean PSF of the same training beads): {cv['improvement']:.2f}x; "
              f"brightest third {cv['median_error_bright']:.3f} vs "
              f"{cv['median_error_invariant_bright']:.3f}")
        sel = p.get("model_selection", {})
        med = sel.get("median_error", {})
        print("model selection (median held-out error; one-standard-error rule): "
              + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
        print(f"stored model: {sel.get('chosen', 'automatic')}")
    return 0
