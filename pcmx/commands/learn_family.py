"""``pcmx learn-family IMG... --output FAM.zarr``: a family of operators from K acquisitions.

Nothing is lost: every image's bead patches and coefficient maps are checkpointed, as they are
computed, in ``FAM.zarr.partial/`` beside the output (``--checkpoint DIR`` to put it
elsewhere). A run that is killed resumes where it stopped when rerun with the same arguments
and inputs; the checkpoint is removed once the store is saved. A checkpoint made with other
arguments or inputs is refused unless ``--overwrite`` (then it is discarded and the run starts
afresh). A bad image (unreadable, wrong shape, non-finite, no or too few beads) stops the run
before the store is written, naming the file and the cause, unless ``--skip-bad``: then it is
left out, listed in the summary and in the store's ``pcmx_skipped`` attribute. The output and
the checkpoint's directory are checked before any work (they must exist; pcmx creates no
parent directories) and the store is written atomically.
"""

from __future__ import annotations

from ._common import add_channel_arguments, int_at_least
from ._common import scheduler_client as _client

NAME = "learn-family"
HELP = "learn a family of operators from bead images under varying conditions (paper II-D)"


def add_arguments(parser) -> None:
    parser.add_argument("images", nargs="+", help="2D bead images (TIFF/Zarr/.npy) or globs; one state each")
    parser.add_argument("-o", "--output", required=True, help="family store to write (Zarr)")
    parser.add_argument("--group", default=None,
                        help="write the store as this group inside the existing Zarr --output "
                             "(e.g. pcmx/family inside an OME-Zarr image)")
    parser.add_argument("--components", type=int_at_least(1), default=None, help="I, size of the shared PSF basis (default: Gavish-Donoho optimal hard threshold for the patches' estimated noise)")
    parser.add_argument("--modes", type=int_at_least(1), default=None,
                        help="J (default: by --mode-rule)")
    parser.add_argument("--mode-rule", choices=("capped", "threshold", "energy"), default="capped",
                        help="automatic J: the paper's 2.858 x median rule (threshold), the fewest modes "
                             "reproducing the maps to 1%% RMS (energy), or the smaller (capped, default)")
    parser.add_argument("--psf-radius", type=int_at_least(1), default=None, help="r in pixels, shared (default: estimated)")
    parser.add_argument("--pixel-size", default=None, help="e.g. 65nm, when the files lack it")
    parser.add_argument("--any-pixel-size", action="store_true",
                        help="accept a pixel size outside 1 nm - 100 um (other optics, e.g. a "
                             "telescope's image-plane pixels)")
    parser.add_argument("--planes-as-states", action="store_true",
                        help="each plane of the given z-stack(s) is one state")
    add_channel_arguments(parser)
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out images that cannot be used (unreadable, wrong shape, "
                             "non-finite, no or too few beads) instead of stopping; they are listed "
                             "in the summary and the store's pcmx_skipped attribute")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="checkpoint directory of the per-image results (default: OUTPUT.partial "
                             "beside the output); a rerun with the same arguments resumes from it; "
                             "removed once the store is saved")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="run on a dask.distributed cluster: a scheduler address "
                             "(tcp://host:8786), or local:N to start a local cluster of N worker "
                             "processes; the checkpoint must be on a filesystem the workers see "
                             "(default: threads of this process)")
    parser.add_argument("--svd", choices=("auto", "gram", "randomized"), default="auto",
                        help="SVD of the K*I maps: exact through the Gram matrix, randomized "
                             "(dask svd_compressed, needs --modes), or auto by size (default)")
    parser.add_argument("--realism", choices=("nonnegative", "cone", "none"), default="nonnegative",
                        help="realism projection of the maps: PSFs >= -1%% of their peak "
                             "(default), the paper's cone of observed coefficients, or none")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    parser.add_argument("--validate", dest="validate", action="store_const", const=True, default="auto",
                        help="cross-validate the family on held-out beads of every image against "
                             "each image's own operator and the space-invariant reference, whatever "
                             "it costs (default: when affordable, on a spread subset of the images "
                             "for large K; pcmx.family.learn_family's validate); the figures go "
                             "into the store, and a warning says when the reference predicts "
                             "better")
    parser.add_argument("--no-validate", dest="validate", action="store_const", const=False,
                        help="do not cross-validate the family")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing store, and discard a checkpoint made with other "
                             "arguments or inputs")


_OPTIONS = {"n_components": "--components", "n_modes": "--modes",
            "psf_radius": "--psf-radius"}
_REPLACE = {"; lower the threshold": ""}  # the detection threshold is not an option here


def run(args) -> int:
    import glob
    import os
    import shutil
    import sys
    import warnings

    from ..errors import InputError
    from ..family import learn_family
    from ..io.readers import natural_sort, read_image
    from ._common import Outputs, check_output, store_target, worded

    if args.validate is not False and args.folds < 2:  # before any work
        raise InputError(f"--folds {args.folds}: need at least 2")
    out = check_output(store_target(args.output, args.group), "--output", kind="store",
                       overwrite=args.overwrite)
    if args.checkpoint is not None:
        if not args.checkpoint.strip():
            raise InputError("--checkpoint '': an empty path; give the checkpoint directory")
        if not os.path.isdir(args.checkpoint):
            check_output(args.checkpoint, "--checkpoint", kind="directory", overwrite=True)
    paths = []
    for item in args.images:
        found = natural_sort(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not found:
            raise InputError(f"{item}: no files match")
        paths += found
    images = paths
    if args.planes_as_states:
        images = []
        for p in paths:
            stack = read_image(p, pixel_size=args.pixel_size, channel=args.channel, time=args.time)
            if stack.ndim != 3:
                raise InputError(f"{p}: --planes-as-states needs a z-stack, got dims {stack.dims}")
            for z in range(stack.sizes["z"]):
                plane = stack.isel(z=z, drop=True)
                plane.attrs["source"] = f"{os.path.basename(p)}[z={z}]"
                images.append(plane)
    elif args.channel is not None or args.time is not None:  # one channel / time point of each
        images = []
        for p in paths:
            with worded(image=p, options={"channel": "--channel", "time": "--time"}):
                image = read_image(p, pixel_size=args.pixel_size, channel=args.channel, time=args.time)
            image.attrs["source"] = os.path.basename(p)
            images.append(image)
    checkpoint = args.checkpoint or os.path.abspath(out).rstrip(os.sep) + ".partial"
    client = cluster = None
    with Outputs(lock=[out]) as outputs:  # a second writer of the output fails before its work
        if args.scheduler:
            client, cluster = _client(args.scheduler)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with worded(options=_OPTIONS, replace=_REPLACE):
                        ds = learn_family(images, n_components=args.components, n_modes=args.modes,
                                          psf_radius=args.psf_radius, pixel_size=args.pixel_size,
                                          checkpoint=checkpoint, overwrite_checkpoint=args.overwrite,
                                          skip_bad=args.skip_bad, svd=args.svd, realism=args.realism,
                                          mode_rule=args.mode_rule, validate=args.validate,
                                          folds=args.folds,
                                          progress=not args.no_progress, client=client)
                except InputError as exc:
                    done = os.path.join(checkpoint, "beads")
                    if os.path.isdir(done) and os.listdir(done):
                        raise InputError(f"{exc} (the work done so far is kept in {checkpoint} "
                                         "for a rerun)") from None
                    raise
        finally:
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()
        for w in caught:
            print(f"pcmx {NAME}: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
        outputs.store(out, ds, overwrite=args.overwrite, root=args.output if args.group else None)
    shutil.rmtree(checkpoint, ignore_errors=True)
    p = ds.attrs["pcmx_parameters"]
    sv = ds["map_singular_values"].values[: p["n_modes"] + 2]
    print(f"{args.output}: K={ds.sizes['state']} states, I={p['n_components']}, J={p['n_modes']}, "
          f"r={p['psf_radius']} px; leading map singular values {', '.join(f'{v:.3g}' for v in sv)}")
    res = p["resumed"]
    if res.get("beads") or res.get("maps"):
        print(f"resumed from {checkpoint}: {res['beads']} images' beads, {res['maps']} images' maps")
    if p["skipped"]:
        print(f"skipped {len(p['skipped'])} of {p['n_images']} images:")
        for s in p["skipped"]:
            print(f"  {s['name']}: {s['reason']}")
    _print_validation(p)
    t = p["timings_s"]
    print("time " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()) + f" (SVD: {p['svd']}, "
          f"{p['scheduler']})")
    return 0


def _print_validation(p: dict) -> None:
    """The family's cross-validation record (``pcmx_parameters["cross_validation"]``)."""
    cv = p.get("cross_validation") or {}
    if "skipped" in cv:
        print(f"cross-validation: not run ({cv['skipped']})")
        return
    if "median_error_family" not in cv:
        return
    fam, single, inv = cv["median_error_family"], cv["median_error_single"], cv["median_error_invariant"]
    sub = (f" on {cv['validated_images']} of {cv['images']} images spread over the states (the cost "
           "budget)" if cv.get("subsampled") else "")
    print(f"cross-validation ({cv['folds']} folds, {cv['n_beads']} held-out beads{sub}): median "
          f"error family {fam:.3f}, single operators {single:.3f}, space-invariant reference "
          f"{inv:.3f} ({cv['improvement']:.2f}x)")
