"""``pcmx apply STORE IMAGE --output OUT``: blur an image with a learned operator (``H u``).

Example::

    pcmx apply operator.zarr sample.tif --output blurred.tif --boundary reflect

reads ``sample.tif`` (a TIFF, 2D or a z-stack, or a Zarr/OME-Zarr image), applies the
space-varying operator stored in ``operator.zarr`` (paper Prop. 1) and writes a float32
TIFF with the input's pixel size in its metadata. Zarr images are blurred tile by tile.
"""

from __future__ import annotations

import argparse
import os

from ..errors import InputError

NAME = "apply"
HELP = "blur an image with an operator store (product-convolution H u)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="operator store (Zarr) written by pcmx")
    parser.add_argument("image", help="image: TIFF (2D or z-stack) or Zarr/OME-Zarr")
    parser.add_argument("--output", "-o", required=True, help="output TIFF (float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--boundary", choices=("zero", "reflect", "periodic"), default="zero",
                        help="image extension outside the field: zeros (default), mirror or wrap-around")


def run(args) -> int:
    import warnings

    import numpy as np

    from ..io.readers import PcmxWarning, read_image
    from ..io.tiff import write_tiff
    from ..operator import ProductConvolution
    from ..units import pixel_size

    out = args.output
    if not out.lower().endswith((".tif", ".tiff")):
        raise InputError(f"--output {out}: must be a .tif or .tiff file")
    if os.path.exists(out) and not args.overwrite:
        raise InputError(f"--output {out}: already exists; use --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise InputError(f"--output {out}: directory {parent} does not exist")
    operator = ProductConvolution(args.store, boundary=args.boundary)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PcmxWarning)  # pixel units are fine for blurring
        image = read_image(args.image)
    if image.shape != operator.shape:
        raise InputError(
            f"{args.image}: image shape {tuple(image.shape)} does not match the operator's grid "
            f"{operator.shape} ({args.store})"
        )
    blurred = operator.apply(image, chunks="auto" if image.chunks is not None else None)
    sizes = [pixel_size(image, d) for d in image.dims]
    if all(s is None for s in sizes):  # the operator knows the pixel size if the file does not
        sizes = [pixel_size(operator.dataset, d) for d in image.dims]
    write_tiff(out, np.asarray(blurred.values, dtype=np.float32), sizes[-2:],
               z_step_um=sizes[0] if image.ndim == 3 else None)
    print(f"wrote {out} ({'x'.join(str(n) for n in image.shape)}, float32, boundary={args.boundary})")
    return 0
