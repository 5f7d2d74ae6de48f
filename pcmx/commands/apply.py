"""``pcmx apply STORE IMAGE --output OUT``: blur an image with a learned operator (``H u``).

Example::

    pcmx apply operator.zarr sample.tif --output blurred.tif --boundary reflect

reads ``sample.tif`` (a TIFF, 2D or a z-stack, or a Zarr/OME-Zarr image), applies the
space-varying operator stored in ``operator.zarr`` (paper Prop. 1) and writes a float32
TIFF with the input's pixel size in its metadata. Zarr images are blurred tile by tile.
The output is checked before any work (its directory must exist) and written atomically.
"""

from __future__ import annotations

import argparse

from ..errors import InputError
from ._common import add_channel_arguments

NAME = "apply"
HELP = "blur an image with an operator store (product-convolution H u)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="operator store (Zarr) written by pcmx")
    parser.add_argument("image", help="image: TIFF (2D or z-stack) or Zarr/OME-Zarr")
    parser.add_argument("--output", "-o", required=True, help="output TIFF (float32)")
    parser.add_argument("--group", default=None,
                        help="the operator is this group of the Zarr STORE (e.g. pcmx/operator "
                             "inside an OME-Zarr image)")
    add_channel_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--nan", choices=("raise", "mask"), default="raise",
                        help="NaN or infinite pixels in the image: refuse them (raise, default) or "
                             "treat them as missing (mask: NaN only where they reach the output)")
    parser.add_argument("--boundary", choices=("zero", "reflect", "periodic"), default="zero",
                        help="image extension outside the field: zeros (default), mirror or wrap-around")


def run(args) -> int:
    import warnings

    import numpy as np

    from ..io.readers import PcmxWarning, read_image
    from ..operator import ProductConvolution
    from ..units import pixel_size
    from ._common import Outputs, check_output, open_input_store, worded

    out = check_output(args.output, "--output", kind="tiff", overwrite=args.overwrite)
    with Outputs(lock=[out]) as outputs:
        operator = ProductConvolution(open_input_store(args.store, "operator", args.group), boundary=args.boundary)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*no pixel size", PcmxWarning)  # pixel units are fine for blurring
            with worded(image=args.image, options={"channel": "--channel", "time": "--time"}):
                image = read_image(args.image, channel=args.channel, time=args.time)
        if image.shape != operator.shape:
            raise InputError(
                f"{args.image}: image shape {tuple(image.shape)} does not match the operator's grid "
                f"{operator.shape} ({args.store})"
            )
        with worded(image=args.image):
            blurred = operator.apply(image, chunks="auto" if image.chunks is not None else None,
                                     nan=args.nan)
            values = np.asarray(blurred.values, dtype=np.float32)
        sizes = [pixel_size(image, d) for d in image.dims]
        if all(s is None for s in sizes):  # the operator knows the pixel size if the file does not
            sizes = [pixel_size(operator.dataset, d) for d in image.dims]
        outputs.tiff(out, values, sizes[-2:], z_step_um=sizes[0] if image.ndim == 3 else None)
    print(f"wrote {out} ({'x'.join(str(n) for n in image.shape)}, float32, boundary={args.boundary})")
    return 0
