"""``pcmx learn-family IMG... --output FAM.zarr``: a family of operators from K acquisitions."""

from __future__ import annotations

NAME = "learn-family"
HELP = "learn a family of operators from bead images under varying conditions (paper II-D)"


def add_arguments(parser) -> None:
    parser.add_argument("images", nargs="+", help="2D bead images (TIFF/Zarr/.npy) or a glob; one state each")
    parser.add_argument("-o", "--output", required=True, help="family store to write (Zarr)")
    parser.add_argument("--components", type=int, default=None, help="I (default: 2.858 x median rule)")
    parser.add_argument("--modes", type=int, default=None, help="J (default: 2.858 x median rule)")
    parser.add_argument("--psf-radius", type=int, default=None, help="r in pixels, shared (default: estimated)")
    parser.add_argument("--pixel-size", default=None, help="e.g. 65nm, when the files lack it")
    parser.add_argument("--planes-as-states", action="store_true",
                        help="each plane of the given z-stack(s) is one state")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")


def run(args) -> int:
    import glob
    import os

    from ..errors import InputError, StoreExistsError
    from ..family import learn_family
    from ..io.readers import read_image
    from ..io.store import save_store

    if os.path.exists(args.output) and not args.overwrite:
        raise StoreExistsError(f"{args.output}: already exists; use --overwrite to replace it")
    paths = []
    for item in args.images:
        found = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not found:
            raise InputError(f"{item}: no files match")
        paths += found
    images = paths
    if args.planes_as_states:
        images = []
        for p in paths:
            stack = read_image(p, pixel_size=args.pixel_size)
            if stack.ndim != 3:
                raise InputError(f"{p}: --planes-as-states needs a z-stack, got dims {stack.dims}")
            for z in range(stack.sizes["z"]):
                plane = stack.isel(z=z, drop=True)
                plane.attrs["source"] = f"{os.path.basename(p)}[z={z}]"
                images.append(plane)
    ds = learn_family(images, n_components=args.components, n_modes=args.modes,
                      psf_radius=args.psf_radius, pixel_size_=args.pixel_size)
    save_store(ds, args.output, overwrite=args.overwrite)
    p = ds.attrs["pcmx_parameters"]
    sv = ds["map_singular_values"].values[: p["n_modes"] + 2]
    print(f"{args.output}: K={ds.sizes['state']} states, I={p['n_components']}, J={p['n_modes']}, "
          f"r={p['psf_radius']} px; leading map singular values {', '.join(f'{v:.3g}' for v in sv)}")
    return 0
