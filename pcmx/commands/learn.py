"""``pcmx learn IMAGE --output OP.zarr``: learn one space-varying operator from a bead image.

The output is checked before any work (its directory must exist; an existing store is
replaced only with ``--overwrite``) and written atomically.
"""

from __future__ import annotations

from ._common import int_at_least, real

NAME = "learn"
HELP = "learn the space-varying operator of a microscope from one bead image or z-stack (paper II-C)"


def add_arguments(parser) -> None:
    parser.add_argument("image", help="2D bead image or 3D z-stack of beads in a gel: TIFF, "
                                      "Zarr/OME-Zarr or .npy")
    parser.add_argument("-o", "--output", required=True, help="operator store to write (Zarr)")
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
                             "file lacks it")
    parser.add_argument("--threshold", type=real(0, strict=True), default=None, help="detection threshold (default: automatic)")
    parser.add_argument("--background", choices=["global", "local"], default=None,
                        help="background estimator (default: the least biased, see docs/background.md)")
    parser.add_argument("--eta", type=real(0), default=None, help="TPS smoothing (default: GCV)")
    parser.add_argument("--realism", choices=("cone", "nonnegative", "none"), default="cone",
                        help="realism projection of the maps (App. C-b): the cone of observed "
                             "coefficients (default), non-negative PSFs, or none")
    parser.add_argument("--no-realism", dest="realism", action="store_const", const="none",
                        help="same as --realism none")
    parser.add_argument("--validate", dest="validate", action="store_const", const=True, default="auto",
                        help="cross-validate over held-out beads, and fail if there are too few "
                             "(default: cross-validate when there are enough beads)")
    parser.add_argument("--no-validate", dest="validate", action="store_const", const=False,
                        help="do not cross-validate (and so keep the space-varying model unchecked)")
    parser.add_argument("--select", choices=("auto", "space-varying"), default="auto",
                        help="where cross-validation finds the space-invariant reference better: "
                             "store it (auto, default) or keep the space-varying model; a warning "
                             "says so either way")
    parser.add_argument("--folds", type=int_at_least(2), default=5,
                        help="cross-validation folds, at least 2 (default 5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")


_OPTIONS = {"n_components": "--components",
            "psf_radius": "--psf-radius", "threshold": "--threshold", "eta": "--eta",
            "folds": "--folds"}


def run(args) -> int:
    from ..errors import InputError
    from ..learn import learn_operator
    from ._common import Outputs, check_output, worded

    out = check_output(args.output, "--output", kind="store", overwrite=args.overwrite)
    radius = args.psf_radius
    if radius is not None:
        if len(radius) not in (1, 3):
            raise InputError(f"--psf-radius {' '.join(map(str, radius))}: give one radius, or "
                             "three (r_z r_y r_x) for a z-stack")
        radius = radius[0] if len(radius) == 1 else tuple(radius)
    with Outputs(lock=[out]) as outputs:
        with worded(image=args.image, options=_OPTIONS):
            ds = learn_operator(args.image, n_components=args.components, psf_radius=radius,
                                pixel_size=args.pixel_size, z_step=args.z_step,
                                threshold=args.threshold, background=args.background, eta=args.eta,
                                realism=args.realism, validate=args.validate, folds=args.folds,
                                select=args.select)
        outputs.store(out, ds, overwrite=args.overwrite)
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
        print(f"stored model: {sel.get('chosen', 'space-varying')}")
    return 0
