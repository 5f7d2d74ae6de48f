"""``pcmx export-psf STORE --output PSF.tif``: PSFs of an operator (or family state) as a TIFF.

Example::

    pcmx export-psf operator.zarr -o psf_centre.tif                  # the PSF at the field's centre
    pcmx export-psf operator.zarr -o psf.tif --y 27 --x 12.5          # at (27, 12.5) micrometres
    pcmx export-psf operator.zarr -o psf.tif --y 27um --x "12500 nm"  # positions with units
    pcmx export-psf operator.zarr -o grid.tif --grid 5                # 5 x 5 PSFs over the field
    pcmx export-psf family.zarr -o wet.tif --state wet

writes an ImageJ TIFF (float32, each PSF summing to its learned flux) with the kernel's pixel
size (and z step for a 3D operator) as its calibration, so Fiji, deconvolution tools and
:func:`pcmx.read_image` read it with its scale. ``--grid N`` writes N x N PSFs, at the centres
of an N x N grid of cells over the field, as a stack (row by row, from the top-left); their
positions are printed. The output is checked before any work and written atomically.
"""

from __future__ import annotations

import argparse

from ..errors import InputError
from ._common import int_at_least

NAME = "export-psf"
HELP = "write the PSF at a position, or a grid of PSFs over the field, as an ImageJ TIFF"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="operator or family store (Zarr) written by pcmx")
    parser.add_argument("--output", "-o", required=True, help="TIFF to write (float32, calibrated)")
    parser.add_argument("--y", default=None,
                        help="position: a number in the store's units (micrometres) or with a "
                             "unit (27um, '27000 nm', '120 px')")
    parser.add_argument("--x", default=None, help="position, like --y")
    parser.add_argument("--z", default=None, help="position of a 3D operator, like --y")
    parser.add_argument("--grid", type=int_at_least(1), default=None, metavar="N",
                        help="N x N PSFs at the centres of an N x N grid over the field (2D)")
    parser.add_argument("--state", default=None, help="the family state (a label or index)")
    parser.add_argument("--group", default=None,
                        help="the store is this group of the Zarr STORE (e.g. pcmx/operator)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _position(text: str):
    """A bare number is in the store's units; anything else is parsed by psf_at."""
    try:
        return float(text)
    except ValueError:
        return text


def positions(ds, args) -> list[dict]:
    """The positions to export: the given one, the grid's cell centres, or the field's centre.

    Returns
    -------
    list of dict
        ``{"y": ..., "x": ...}`` (and ``"z"``), values as :func:`pcmx.model.psf_at` takes them.
    """
    import numpy as np

    spatial = [d for d in ("z", "y", "x") if d in ds.dims]
    given = {d: getattr(args, d) for d in ("z", "y", "x") if getattr(args, d) is not None}
    if args.grid is not None:
        if given:
            raise InputError("--grid and a position (--y/--x/--z) exclude each other")
        if "z" in spatial:
            raise InputError(f"--grid is for 2D operators; {args.store} is 3D: give one position "
                             "(--z --y --x)")
        n = args.grid
        cells = {d: (np.arange(n) + 0.5) * ds.sizes[d] / n - 0.5 for d in ("y", "x")}
        return [{"y": float(yi), "x": float(xi), "_index": True}
                for yi in cells["y"] for xi in cells["x"]]
    unknown = sorted(set(given) - set(spatial))
    if unknown:
        raise InputError(f"--{unknown[0]}: {args.store} has no {unknown[0]} axis (its axes: "
                         f"{', '.join(spatial)})")
    if not given:  # the centre of the field
        return [{**{d: float((ds.sizes[d] - 1) / 2) for d in spatial}, "_index": True}]
    missing = [d for d in spatial if d not in given]
    if missing:
        raise InputError(f"give --{' --'.join(missing)} too (a position needs {', '.join(spatial)}), "
                         "or no position for the field's centre")
    return [{d: _position(v) for d, v in given.items()}]


def run(args) -> int:
    import numpy as np

    from ..io.store import open_store
    from ..model import psf_at
    from ..units import format_length, pixel_size
    from ._common import Outputs, check_output, worded

    out = check_output(args.output, "--output", kind="tiff", overwrite=args.overwrite)
    with Outputs(lock=[out]) as outputs:
        ds = open_store(args.store, group=args.group)
        kind = ds.attrs.get("pcmx_type")
        if kind not in ("operator", "family"):
            raise InputError(f"{args.store}: a {kind} store; export-psf takes an operator or a family")
        if kind == "operator" and args.state is not None:
            raise InputError(f"--state is for a family; {args.store} is an operator")
        state = args.state
        if state is not None and "state" in ds.coords and ds["state"].dtype.kind in "iu":
            try:
                state = int(state)
            except ValueError:
                pass
        wanted = positions(ds, args)
        psfs, where = [], []
        with worded(options={"y": "--y", "x": "--x", "z": "--z", "state": "--state"}):
            for pos in wanted:
                index = bool(pos.pop("_index", False))
                psf = psf_at(ds, state=state, index=index, **pos).load()
                psfs.append(np.asarray(psf.values, dtype=np.float32))
                if index:  # a grid cell or the centre: the nearest pixel's coordinates
                    pos = {d: float(np.interp(v, np.arange(ds.sizes[d]), ds[d].values))
                           for d, v in pos.items()}
                where.append(pos)
        kdims = [d for d in ("kz", "ky", "kx") if d in ds.dims]
        sizes = [pixel_size(ds, d) for d in kdims]
        data = psfs[0] if len(psfs) == 1 else np.stack(psfs)
        outputs.tiff(out, data, sizes[-2:], z_step_um=sizes[0] if len(kdims) == 3 else None)
    shape = "x".join(str(n) for n in data.shape)
    unit = "um" if sizes[-1] is not None else "px"
    scale = (f"pixel size {format_length(sizes[-1])}" if sizes[-1] is not None
             else "no calibration (the store is in pixels)")
    print(f"wrote {out} ({shape}, float32, {scale}{', state ' + str(args.state) if args.state else ''})")
    for i, at in enumerate(where):
        text = ", ".join(f"{d}={v:.4g}" if isinstance(v, float) else f"{d}={v}"
                         for d, v in at.items())
        print(f"  {'plane ' + str(i) + ': ' if len(where) > 1 else ''}PSF at {text} ({unit})")
    return 0
