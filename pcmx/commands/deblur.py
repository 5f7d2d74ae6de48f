"""``pcmx deblur IMAGE (--family FAM.zarr | --operator OP.zarr) [--method M] --output OUT.tif``.

Blind Sparse+Smooth deblurring (paper App. D): with ``--family`` the operator is identified
within the family from the image's isolated point sources, then the image is restored; with
``--operator`` a known operator is used. Writes three float32 TIFFs with the image's pixel
size: ``OUT.tif`` (the restored image ``u1 + u2``, the camera offset removed),
``OUT_sparse.tif`` (``u1``, the point sources) and ``OUT_smooth.tif`` (``u2``, the background
above the offset); ``--store OUT.zarr`` also writes the whole result (a ``restoration`` store:
components, identified gamma, weights, offset, provenance). Nothing is replaced without
``--overwrite``. Every output is checked before the work starts, and the outputs are written
all-or-nothing: all of them, or none (an existing one is then left as it was).

``--method rl|rl-tv|tikhonov|fista-haar`` restores with :func:`pcmx.restore.restore` instead
(``--iterations``, default 50), with the known operator or the one identified within the
family as above; ``--chunks SIZE`` restores tile by tile (tiles of SIZE pixels grown by the
default halo, :func:`pcmx.restore.default_halo`). These write ``OUT.tif`` alone (the restored
image, float32, the image's pixel size), and so does ``--method sparse-smooth --chunks SIZE``
(Sparse+Smooth tile by tile: the components and the store are not available).

Example::

    pcmx deblur cells.tif --family family.zarr --output cells_bss.tif --sources 8
    pcmx deblur big.tif --operator op.zarr --method rl --iterations 50 --chunks 512 -o big_rl.tif
"""

from __future__ import annotations

import argparse
import os

from ..errors import InputError
from ._common import add_channel_arguments, int_at_least, real

NAME = "deblur"
HELP = ("blind Sparse+Smooth deblurring with a family, or with a known operator (paper App. D); "
        "other methods and tiles with --method, --chunks")
METHODS = ("sparse-smooth", "rl", "rl-tv", "tikhonov", "fista-haar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="2D image: TIFF, Zarr/OME-Zarr or .npy")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--family", help="family store (Zarr): identify the operator (blind)")
    which.add_argument("--operator", help="operator store (Zarr): known operator (non-blind)")
    parser.add_argument("--output", "-o", required=True,
                        help="restored image TIFF; OUT_sparse.tif and OUT_smooth.tif are written beside it "
                             "(sparse-smooth without --chunks)")
    parser.add_argument("--method", choices=METHODS, default="sparse-smooth",
                        help="sparse-smooth (default: Sparse+Smooth, paper App. D), rl (Richardson-Lucy), "
                             "rl-tv (with TV), tikhonov, fista-haar: pcmx.restore.restore")
    parser.add_argument("--iterations", type=int_at_least(1), default=None,
                        help="iterations of rl, rl-tv, fista-haar, at most for tikhonov (default 50); "
                             "sparse-smooth takes --max-iter")
    parser.add_argument("--chunks", type=int_at_least(1), default=None,
                        help="restore tile by tile, tiles of SIZE pixels grown by a halo (default: the "
                             "whole image in memory); writes OUT.tif alone")
    parser.add_argument("--gamma1", type=real(0), default=None,
                        help="weight of the l1 norm of the sparse part (default: 4 x noise x PSF l2 norm)")
    parser.add_argument("--gamma2", type=real(0), default=None,
                        help="weight of the background's Laplacian (default: l^4/2, l = 2 PSF FWHMs)")
    parser.add_argument("--sources", type=int_at_least(1), default=None,
                        help="use the N strongest isolated point sources to identify the operator")
    parser.add_argument("--max-iter", type=int_at_least(1), default=None,
                        help="Sparse+Smooth FISTA iterations at most (default 300)")
    parser.add_argument("--offset", type=real(), default=None,
                        help="camera offset (default: estimated jointly)")
    parser.add_argument("--pixel-size", default=None, help="e.g. 65nm, when the file lacks it")
    parser.add_argument("--any-pixel-size", action="store_true",
                        help="accept a pixel size outside 1 nm - 100 um (other optics, e.g. a "
                             "telescope's image-plane pixels)")
    parser.add_argument("--store", default=None, help="also write the whole result as a Zarr store")
    parser.add_argument("--group", default=None,
                        help="write --store as this group inside that existing Zarr (e.g. "
                             "pcmx/restoration inside an OME-Zarr image)")
    parser.add_argument("--input-group", default=None,
                        help="the --family / --operator store is this group of its Zarr (e.g. "
                             "pcmx/family)")
    add_channel_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars on stderr (shown on a terminal by default)")


def output_paths(out: str) -> dict:
    """The three TIFFs written for ``--output out``: restored, sparse, smooth."""
    root, ext = os.path.splitext(out)
    return {"restored": out, "sparse": f"{root}_sparse{ext}", "smooth": f"{root}_smooth{ext}"}


_OPTIONS = {"channel": "--channel", "time": "--time", "n_sources": "--sources", "gamma1": "--gamma1",
            "gamma2": "--gamma2", "max_iter": "--max-iter", "offset": "--offset",
            "iterations": "--iterations", "chunks": "--chunks"}
# advice of the bead detector naming an option deblur does not have
_REPLACE = {"; lower the threshold": "; blind identification needs isolated point sources in "
                                     "the image: deblur it with a known operator (--operator)"}


def _check_method_options(args) -> None:
    """Refuse options that the chosen ``--method`` (and ``--chunks``) does not take."""
    if args.method != "sparse-smooth":
        for value, option in ((args.gamma1, "--gamma1"), (args.gamma2, "--gamma2")):
            if value is not None:
                raise InputError(f"{option} is a weight of --method sparse-smooth, not of --method {args.method}")
        if args.max_iter is not None:
            raise InputError(f"--max-iter is for --method sparse-smooth; give --iterations for --method {args.method}")
    elif args.iterations is not None:
        raise InputError("--iterations is for --method rl, rl-tv, tikhonov or fista-haar; "
                         "--method sparse-smooth takes --max-iter")
    if args.store is not None and (args.method != "sparse-smooth" or args.chunks is not None):
        what = f"--method {args.method}" if args.method != "sparse-smooth" else "--chunks"
        raise InputError(f"--store holds the whole Sparse+Smooth result; {what} writes the restored "
                         "TIFF alone: drop --store")


def _restore(args, image, family, operator):
    """``--method`` other than sparse-smooth, or ``--chunks``: identify the operator within the
    family if one is given, then :func:`pcmx.restore.restore`. Returns the restored image, the
    operator Dataset used, the identification (None with ``--operator``) and the iterations."""
    from ..deblur import checked_image, identify_operator
    from ..restore import restore

    checked_image(image)
    ident = None
    if family is not None:
        ident = identify_operator(image, family, n_sources=args.sources)
        operator = ident.operator
    if args.method == "sparse-smooth":
        iterations = 300 if args.max_iter is None else args.max_iter
        kw = {k: v for k, v in (("gamma1", args.gamma1), ("gamma2", args.gamma2)) if v is not None}
    else:
        iterations = 50 if args.iterations is None else args.iterations
        kw = {}
    if args.offset is not None:
        kw["offset"] = args.offset
    out = restore(image, operator, method=args.method, iterations=iterations, chunks=args.chunks, **kw)
    return out, operator, ident, iterations


def run(args) -> int:
    import warnings

    import numpy as np

    from ..deblur import deblur
    from ..io.readers import PcmxWarning, read_image
    from ..provenance import sha256_file
    from ..units import pixel_size
    from ._common import (
        Outputs,
        check_distinct,
        check_output,
        open_input_store,
        store_target,
        worded,
    )

    if args.operator is not None and args.sources is not None:
        raise InputError("--sources is for blind identification with --family, not with --operator")
    _check_method_options(args)
    whole_bss = args.method == "sparse-smooth" and args.chunks is None  # the three components
    paths = output_paths(args.output) if whole_bss else {"restored": args.output}
    targets = [("--output", check_output(p, "--output", kind="tiff", overwrite=args.overwrite))
               for p in paths.values()]
    if args.group is not None and args.store is None:
        raise InputError("--group is the group of --store: give --store too")
    store = None
    if args.store is not None:
        store = store_target(args.store, args.group, "--store")
        targets.append(("--store", check_output(store, "--store", kind="store",
                                                overwrite=args.overwrite)))
    check_distinct(targets)
    with Outputs(lock=[p for _, p in targets]) as outputs:
        family = open_input_store(args.family, "family", args.input_group) if args.family else None
        operator = (open_input_store(args.operator, "operator", args.input_group) if args.operator
                    else None)
        with worded(image=args.image, options=_OPTIONS, replace=_REPLACE):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*no pixel size", PcmxWarning)  # the store gives it
                image = read_image(args.image, pixel_size=args.pixel_size, channel=args.channel,
                                   time=args.time)
            if image.ndim != 2:
                raise InputError(f"{args.image}: deblurring takes a 2D image, got shape {tuple(image.shape)}")
            image = image.load()
            if not whole_bss:
                restored, op_ds, ident, iterations = _restore(args, image, family, operator)
                restored = np.asarray(restored, dtype=np.float32)  # computes the tiles
            else:
                ds = deblur(image, family, operator=operator, n_sources=args.sources,
                            gamma1=args.gamma1, gamma2=args.gamma2,
                            max_iter=300 if args.max_iter is None else args.max_iter,
                            offset=args.offset)
        if not whole_bss:
            sizes = [pixel_size(image, d) or pixel_size(op_ds, d) for d in ("y", "x")]
            outputs.tiff(args.output, restored, sizes)
        else:
            ds.attrs["pcmx_inputs"] = [*ds.attrs.get("pcmx_inputs", []),
                                       {"name": os.path.basename(os.path.normpath(args.image)),
                                        "sha256": sha256_file(args.image) if os.path.isfile(args.image) else None}]
            sizes = [pixel_size(ds, d) for d in ("y", "x")]
            for var, path in paths.items():
                outputs.tiff(path, np.asarray(ds[var].values, dtype=np.float32), sizes)
            if store:
                outputs.store(store, ds, overwrite=args.overwrite,
                              root=args.store if args.group else None)
    if not whole_bss:
        found = (f", operator identified from {len(ident.positions)} sources (residual "
                 f"{ident.residual:.3f})" if ident is not None else "")
        tiles = f", tiles of {args.chunks} px" if args.chunks is not None else ""
        print(f"wrote {args.output}: {args.method}, {iterations} iterations{tiles}{found}")
        return 0
    a = ds.attrs
    ident = (f", identified from {a['pcmx_parameters']['n_sources_used']} sources "
             f"(residual {a['identification_residual']:.3f})" if args.family else "")
    print(f"wrote {', '.join(paths.values())}{' and ' + args.store if args.store else ''}: "
          f"{a['iterations']} iterations{' (converged)' if a['converged'] else ''}, "
          f"gamma1={a['gamma1']:.4g} (noise {a['noise_sigma']:.3g}: {a['noise_source']}), "
          f"gamma2={a['gamma2']:.4g}, offset={a['offset']:.4g}{ident}")
    return 0
