"""``pcmx deblur IMAGE (--family FAM.zarr | --operator OP.zarr) --output OUT.tif``.

Blind Sparse+Smooth deblurring (paper App. D): with ``--family`` the operator is identified
within the family from the image's isolated point sources, then the image is restored; with
``--operator`` a known operator is used. Writes three float32 TIFFs with the image's pixel
size: ``OUT.tif`` (the restored image ``u1 + u2``, the camera offset removed),
``OUT_sparse.tif`` (``u1``, the point sources) and ``OUT_smooth.tif`` (``u2``, the background
above the offset); ``--store OUT.zarr`` also writes the whole result (a ``restoration`` store:
components, identified gamma, weights, offset, provenance). Nothing is replaced without
``--overwrite``. Every output is checked before the work starts, and the outputs are written
all-or-nothing: all of them, or none (an existing one is then left as it was).

Example::

    pcmx deblur cells.tif --family family.zarr --output cells_bss.tif --sources 8
"""

from __future__ import annotations

import argparse
import os

from ..errors import InputError
from ._common import add_channel_arguments, int_at_least, real

NAME = "deblur"
HELP = "blind Sparse+Smooth deblurring with a family, or with a known operator (paper App. D)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="2D image: TIFF, Zarr/OME-Zarr or .npy")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--family", help="family store (Zarr): identify the operator (blind)")
    which.add_argument("--operator", help="operator store (Zarr): known operator (non-blind)")
    parser.add_argument("--output", "-o", required=True,
                        help="restored image TIFF; OUT_sparse.tif and OUT_smooth.tif are written beside it")
    parser.add_argument("--gamma1", type=real(0), default=None,
                        help="weight of the l1 norm of the sparse part (default: 4 x noise x PSF l2 norm)")
    parser.add_argument("--gamma2", type=real(0), default=None,
                        help="weight of the background's Laplacian (default: l^4/2, l = 2 PSF FWHMs)")
    parser.add_argument("--sources", type=int_at_least(1), default=None,
                        help="use the N strongest isolated point sources to identify the operator")
    parser.add_argument("--max-iter", type=int_at_least(1), default=300, help="FISTA iterations at most (default 300)")
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
            "gamma2": "--gamma2", "max_iter": "--max-iter", "offset": "--offset"}
# advice of the bead detector naming an option deblur does not have
_REPLACE = {"; lower the threshold": "; blind identification needs isolated point sources in "
                                     "the image: deblur it with a known operator (--operator)"}


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
    paths = output_paths(args.output)
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
            ds = deblur(image, family, operator=operator, n_sources=args.sources,
                        gamma1=args.gamma1, gamma2=args.gamma2, max_iter=args.max_iter,
                        offset=args.offset)
        ds.attrs["pcmx_inputs"] = [*ds.attrs.get("pcmx_inputs", []),
                                   {"name": os.path.basename(os.path.normpath(args.image)),
                                    "sha256": sha256_file(args.image) if os.path.isfile(args.image) else None}]
        sizes = [pixel_size(ds, d) for d in ("y", "x")]
        for var, path in paths.items():
            outputs.tiff(path, np.asarray(ds[var].values, dtype=np.float32), sizes)
        if store:
            outputs.store(store, ds, overwrite=args.overwrite,
                          root=args.store if args.group else None)
    a = ds.attrs
    ident = (f", identified from {a['pcmx_parameters']['n_sources_used']} sources "
             f"(residual {a['identification_residual']:.3f})" if args.family else "")
    print(f"wrote {', '.join(paths.values())}{' and ' + args.store if args.store else ''}: "
          f"{a['iterations']} iterations{' (converged)' if a['converged'] else ''}, "
          f"gamma1={a['gamma1']:.4g} (noise {a['noise_sigma']:.3g}: {a['noise_source']}), "
          f"gamma2={a['gamma2']:.4g}, offset={a['offset']:.4g}{ident}")
    return 0
