"""``pcmx deblur IMAGE (--family FAM.zarr | --operator OP.zarr) [--method M] --output OUT``.

Blind Sparse+Smooth deblurring (paper App. D): with ``--family`` the operator is identified
within the family from the image's isolated point sources, then the image is restored; with
``--operator`` a known operator is used. The output is chosen by its extension:

* ``OUT.tif``: three float32 TIFFs with the image's pixel size: ``OUT.tif`` (the restored
  image ``u1 + u2``, the camera offset removed), ``OUT_sparse.tif`` (``u1``, the point sources)
  and ``OUT_smooth.tif`` (``u2``, the background above the offset); ``--store OUT.zarr`` also
  writes the whole result (a ``restoration`` store: components, identified gamma, weights,
  offset, provenance).
* ``OUT.zarr`` (or ``OUT.ome.zarr``, which is also an OME-Zarr 0.5 image): the ``restoration``
  store alone: the whole Sparse+Smooth result, or, with another ``--method`` or ``--chunks``,
  the restored image written chunk by chunk (:func:`pcmx.io.chunked.write_chunked`: resumable
  after a kill, validated, put in place atomically).

Nothing is replaced without ``--overwrite``. Every output is checked before the work starts,
and the outputs are written all-or-nothing: all of them, or none (an existing one is then
left as it was).

``--method rl|rl-tv|tikhonov|fista-haar`` restores with :func:`pcmx.restore.restore` instead
(``--iterations``, default 50), with the known operator or the one identified within the
family as above; ``--chunks SIZE`` restores tile by tile (tiles of SIZE pixels grown by the
default halo, :func:`pcmx.restore.default_halo`). These write the restored image alone
(float32, the image's pixel size), and so does ``--method sparse-smooth --chunks SIZE``
(Sparse+Smooth tile by tile: the components and the store are not available). 3D operators
(``kz``, ``z``) restore z-stacks (``--method rl`` or ``rl-tv``).

Large data (``-o OUT.zarr``): the image is read lazily (TIFF region by region, Zarr and
OME-Zarr by chunks, ``.npy`` memory-mapped) and restored tile by tile: tiles of ``--chunks``
pixels, or, without it, the largest that fit the memory of a worker
(:func:`pcmx.restore.auto_chunks`, ``--memory-limit`` or 1 GiB), so an image larger than
memory is never loaded whole (the camera offset is estimated block by block,
:func:`pcmx.deblur.estimate_offset` of a Dask image; with ``--family`` the image is read whole to identify
the operator). A killed run resumes from its finished chunks when rerun with the same
arguments; ``--no-resume`` starts over. ``--scheduler ADDRESS|local:N`` computes the tiles
on a ``dask.distributed`` cluster (each worker writes its own chunks; the output must be on a
filesystem the workers see).

Example::

    pcmx deblur cells.tif --family family.zarr --output cells_bss.tif --sources 8
    pcmx deblur big.tif --operator op.zarr --method rl --iterations 50 --chunks 512 -o big_rl.zarr
    pcmx deblur stack.ome.zarr --operator op3d.zarr --method rl -o stack_rl.ome.zarr --scheduler local:2 --memory-limit 2GB
"""
from __future__ import annotations

import argparse
import os

from ..errors import InputError
from ..restore import DEFAULT_ITERATIONS
from ._common import add_channel_arguments, add_scheduler_arguments, int_at_least, real

NAME = "deblur"
HELP = ("blind Sparse+Smooth deblurring with a family, or with a known operator (paper App. D); "
        "other methods, tiles, z-stacks, resumable Zarr output and clusters with --method, "
        "--chunks, -o OUT.zarr, --scheduler")
METHODS = ("sparse-smooth", "rl", "rl-tv", "tikhonov", "fista-haar")
READ_BLOCK = 1024
"""Edge in pixels of the blocks ``-o OUT.zarr`` reads its image in (y and x; one plane of a
stack), or ``--chunks`` when larger: restore cuts them in tiles."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="2D image, or a z-stack with a 3D operator: TIFF, Zarr/OME-Zarr "
                                      "or .npy (read lazily for -o OUT.zarr)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--family", help="family store (Zarr): identify the operator (blind)")
    which.add_argument("--operator", help="operator store (Zarr): known operator (non-blind)")
    parser.add_argument("--output", "-o", required=True,
                        help="OUT.tif: the restored image (with sparse-smooth without --chunks, "
                             "OUT_sparse.tif and OUT_smooth.tif beside it); OUT.zarr or OUT.ome.zarr: "
                             "a restoration store, written chunk by chunk and resumable (OME-Zarr "
                             "0.5 too with .ome.zarr)")
    parser.add_argument("--method", choices=METHODS, default="sparse-smooth",
                        help="sparse-smooth (default: Sparse+Smooth, paper App. D), rl (Richardson-Lucy), "
                             "rl-tv (with TV), tikhonov, fista-haar: pcmx.restore.restore")
    parser.add_argument("--iterations", type=int_at_least(1), default=None,
                        help="iterations of rl, rl-tv, fista-haar, at most for tikhonov (default 50, 50, 100, 200); "
                             "sparse-smooth takes --max-iter")
    parser.add_argument("--chunks", type=int_at_least(1), default=None,
                        help="restore tile by tile, tiles of SIZE pixels grown by a halo (default: "
                             "the whole image in memory for OUT.tif; for OUT.zarr the largest tiles "
                             "that fit a worker's memory); writes the restored image alone")
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
                        help="write --store (or the OUT.zarr output) as this group inside that "
                             "existing Zarr (e.g. pcmx/restoration inside an OME-Zarr image)")
    parser.add_argument("--input-group", default=None,
                        help="the --family / --operator store is this group of its Zarr (e.g. "
                             "pcmx/family)")
    add_channel_arguments(parser)
    add_scheduler_arguments(parser, memory_limit=True)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing outputs, and discard an interrupted OUT.zarr write "
                             "made with other inputs or arguments")
    parser.add_argument("--no-resume", action="store_true",
                        help="OUT.zarr: start over, discarding an interrupted write (of any "
                             "inputs and arguments) instead of resuming it")
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

    if image.ndim == 2:  # a z-stack goes to restore, which takes 3D operators
        checked_image(image)
    ident = None
    if family is not None:
        ident = identify_operator(image, family, n_sources=args.sources)
        operator = ident.operator
    if args.method == "sparse-smooth":
        iterations = DEFAULT_ITERATIONS["sparse-smooth"] if args.max_iter is None else args.max_iter
        kw = {k: v for k, v in (("gamma1", args.gamma1), ("gamma2", args.gamma2)) if v is not None}
    else:
        iterations = DEFAULT_ITERATIONS[args.method] if args.iterations is None else args.iterations
        kw = {}
    if args.offset is not None:
        kw["offset"] = args.offset
    out = restore(image, operator, method=args.method, iterations=iterations, chunks=args.chunks, **kw)
    return out, operator, ident, iterations


def output_kind(path: str) -> str:
    """``"store"`` for ``OUT.zarr`` / ``OUT.ome.zarr``, ``"tiff"`` for ``OUT.tif[f]``.

    Raises
    ------
    InputError
        Any other extension.
    """
    if not path or not path.strip():
        raise InputError(f"--output {path!r}: an empty path; give the TIFF file or Zarr store to write")
    low = path.lower().rstrip("/\\")
    if low.endswith(".zarr"):
        return "store"
    if low.endswith((".tif", ".tiff")):
        return "tiff"
    raise InputError(f"--output {path}: give OUT.tif (TIFF), OUT.zarr (Zarr store) or OUT.ome.zarr "
                     "(OME-Zarr)")


def _input_hash(path: str, limit: int = 2**31) -> str | None:
    """SHA-256 of an input for the provenance, when it is at most ``limit`` bytes (None: too
    big to read twice; the manifest keys it by path, size and modification time)."""
    from ..io.chunked import input_record
    from ..provenance import sha256_file

    if not os.path.exists(path) or input_record(path)["size"] > limit:
        return None
    return sha256_file(path)


def _tile_budget(args, operator) -> int:
    """Bytes for one tile with automatic chunks: 85 % of ``--memory-limit`` (the rest: the
    worker process itself, about 150 MiB) less the
    operator's maps, else 1 GiB."""
    if args.memory_limit is None:
        return 2**30
    from dask.utils import parse_bytes

    maps = 4 * int(operator["coefficients"].size) if "coefficients" in operator else 0
    budget = int(0.85 * parse_bytes(args.memory_limit)) - maps
    if budget <= 0:
        raise InputError(f"--memory-limit {args.memory_limit}: smaller than the operator's maps "
                         f"({maps / 2**20:.0f} MiB) a worker holds")
    return budget


def _restore_lazy(args, family, operator):
    """``-o OUT.zarr`` with a ``--method`` other than whole-image sparse-smooth: the image read
    lazily, the operator identified if a family is given, the restoration built lazily.
    Returns ``(restored DataArray (dask), image, operator Dataset, identification, iterations,
    parameters)``."""
    import warnings

    from .. import restore as restore_module
    from ..io.readers import PcmxWarning, open_image_lazy

    read_chunks = max(args.chunks or 0, READ_BLOCK)  # blocks read: restore cuts them in tiles
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*no pixel size", PcmxWarning)  # the store gives it
        image = open_image_lazy(args.image, pixel_size=args.pixel_size, channel=args.channel,
                                time=args.time, chunks=read_chunks)
    ident = None
    if family is not None:
        from ..deblur import checked_image, identify_operator

        loaded = checked_image(image.load())
        ident = identify_operator(loaded, family, n_sources=args.sources)
        operator = ident.operator
        image = loaded.chunk(dict.fromkeys(loaded.dims, read_chunks))
    if args.method == "sparse-smooth":
        iterations = DEFAULT_ITERATIONS["sparse-smooth"] if args.max_iter is None else args.max_iter
        kw = {k: v for k, v in (("gamma1", args.gamma1), ("gamma2", args.gamma2)) if v is not None}
        if args.offset is not None:
            kw["offset"] = args.offset
    else:
        iterations = DEFAULT_ITERATIONS[args.method] if args.iterations is None else args.iterations
        kw = {} if args.offset is None else {"offset": float(args.offset)}
    extra = {}
    if args.chunks is not None:
        tile = args.chunks
    else:
        tile = "auto"
        extra["memory_limit"] = _tile_budget(args, operator)
    restored = restore_module.restore(image, operator, method=args.method, iterations=iterations,
                                      chunks=tile, **extra, **kw)
    params = {"method": args.method, "iterations": iterations,
              "chunks": [int(c[0]) for c in restored.data.chunks], **kw}
    return restored, image, operator, ident, iterations, params


def _store_coords(image, op_ds) -> dict:
    """The output's coordinates: the image's, or the operator's where the image has no pixel size."""
    from ..units import pixel_size

    coords = {}
    for d in image.dims:
        if pixel_size(image, d) is None and d in op_ds.coords and op_ds.sizes[d] == image.sizes[d]:
            coords[d] = op_ds[d].variable.to_base_variable().copy()
        else:
            coords[d] = image[d].variable.to_base_variable().copy()
    return coords


def _write_store(args, out: str, family, operator, *, progress) -> str:
    """``-o OUT.zarr`` through :func:`pcmx.io.chunked.write_chunked`; the summary line."""
    import xarray as xr

    from ..io.chunked import input_record, ome_multiscales, write_chunked
    from ..provenance import provenance, sha256_file
    from ..units import pixel_size

    restored, image, op_ds, ident, iterations, params = _restore_lazy(args, family, operator)
    store_path = args.family if args.family else args.operator
    store_hash = sha256_file(store_path) if os.path.exists(store_path) else None
    which = "family" if args.family else "operator"
    arguments = {**params, which: store_hash, "input_group": args.input_group,
                 "sources": args.sources, "channel": args.channel, "time": args.time,
                 "pixel_size": args.pixel_size}
    image_hash = _input_hash(args.image)  # once: the manifest's key and the provenance
    image_record = input_record(args.image) if image_hash is None else \
        {**input_record(args.image), "sha256": image_hash}  # content, not only size and mtime
    fingerprint = {"arguments": arguments,
                   "inputs": [image_record, {"name": os.path.abspath(store_path), "sha256": store_hash}]}
    inputs = [(os.path.basename(os.path.normpath(args.image)), image_hash),
              (os.path.basename(os.path.normpath(store_path)), store_hash)]
    if ident is not None:
        params = {**params, "n_sources_used": len(ident.positions),
                  "identification_residual": float(ident.residual)}
    attrs = {**provenance(params, inputs), "method": args.method, "iterations": iterations}
    coords = _store_coords(image, op_ds)
    ome = None
    if args.group is None and args.output.lower().rstrip("/\\").endswith(".ome.zarr"):
        grid = xr.Dataset(coords=coords)
        ome = ome_multiscales(image.dims, [pixel_size(grid, d) for d in image.dims])
    written = write_chunked(restored.data, out, dims=image.dims, coords=coords, attrs=attrs,
                            name="restored", overwrite=args.overwrite, resume=not args.no_resume,
                            progress=progress, fingerprint=fingerprint, lock=False, ome=ome)
    found = (f", operator identified from {len(ident.positions)} sources (residual "
             f"{ident.residual:.3f})" if ident is not None else "")
    chunks = " x ".join(str(c) for c in params["chunks"])
    resumed = f" ({written.resumed} written by an interrupted run)" if written.resumed else ""
    return (f"wrote {args.output}: {args.method}, {iterations} iterations, {written.chunks} chunks "
            f"of {chunks} px{resumed}{found}")


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
        check_scheduler,
        open_input_store,
        scheduler_client,
        store_target,
        worded,
    )

    if args.operator is not None and args.sources is not None:
        raise InputError("--sources is for blind identification with --family, not with --operator")
    _check_method_options(args)
    check_scheduler(args.scheduler, args.memory_limit)
    kind = output_kind(args.output)
    whole_bss = args.method == "sparse-smooth" and args.chunks is None  # the three components
    out = args.output
    if kind == "store":
        if args.store is not None:
            raise InputError(f"--store: -o {args.output} writes the restoration store itself; drop --store")
        out = store_target(args.output, args.group, "--output")
        targets = [("--output", check_output(out, "--output", kind="store", overwrite=args.overwrite))]
        paths = {}
    else:
        if args.no_resume:
            raise InputError("--no-resume is for -o OUT.zarr (a TIFF is written at once)")
        paths = output_paths(args.output) if whole_bss else {"restored": args.output}
        targets = [("--output", check_output(p, "--output", kind="tiff", overwrite=args.overwrite))
                   for p in paths.values()]
        if args.group is not None and args.store is None:
            raise InputError("--group is the group of --store or of -o OUT.zarr: give one of them")
    store = None
    if args.store is not None:
        store = store_target(args.store, args.group, "--store")
        targets.append(("--store", check_output(store, "--store", kind="store",
                                                overwrite=args.overwrite)))
    check_distinct(targets)
    progress = False if args.no_progress else None
    client = cluster = None
    with Outputs(lock=[p for _, p in targets]) as outputs:
        family = open_input_store(args.family, "family", args.input_group) if args.family else None
        operator = (open_input_store(args.operator, "operator", args.input_group) if args.operator
                    else None)
        if args.scheduler:
            client, cluster = scheduler_client(args.scheduler, args.memory_limit)
        try:
            with worded(image=args.image, options=_OPTIONS, replace=_REPLACE):
                if kind == "store" and not whole_bss:
                    # written chunk by chunk and put in place, under the lock Outputs holds
                    summary = _write_store(args, out, family, operator, progress=progress)
                else:
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", ".*no pixel size", PcmxWarning)  # the store gives it
                        image = read_image(args.image, pixel_size=args.pixel_size, channel=args.channel,
                                           time=args.time)
                    if whole_bss and image.ndim != 2:
                        raise InputError(f"{args.image}: Sparse+Smooth deblurring takes a 2D image, got "
                                         f"shape {tuple(image.shape)} (z-stacks: --method rl or rl-tv "
                                         "with a 3D operator)")
                    image = image.load()
                    if not whole_bss:
                        restored, op_ds, ident, iterations = _restore(args, image, family, operator)
                        restored = np.asarray(restored, dtype=np.float32)  # computes the tiles
                    else:
                        ds = deblur(image, family, operator=operator, n_sources=args.sources,
                                    gamma1=args.gamma1, gamma2=args.gamma2,
                                    max_iter=300 if args.max_iter is None else args.max_iter,
                                    offset=args.offset)
        finally:
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()
        if kind == "tiff" and not whole_bss:
            sizes = [pixel_size(image, d) or pixel_size(op_ds, d) for d in image.dims]
            outputs.tiff(args.output, restored, sizes[-2:],
                         z_step_um=sizes[0] if image.ndim == 3 else None)
        elif whole_bss:
            ds.attrs["pcmx_inputs"] = [*ds.attrs.get("pcmx_inputs", []),
                                       {"name": os.path.basename(os.path.normpath(args.image)),
                                        "sha256": sha256_file(args.image) if os.path.isfile(args.image) else None}]
            sizes = [pixel_size(ds, d) for d in ("y", "x")]
            for var, path in paths.items():
                outputs.tiff(path, np.asarray(ds[var].values, dtype=np.float32), sizes)
            if kind == "store":
                outputs.store(out, ds, overwrite=args.overwrite,
                              root=args.output if args.group else None)
            if store:
                outputs.store(store, ds, overwrite=args.overwrite,
                              root=args.store if args.group else None)
    if kind == "store" and not whole_bss:
        if args.group is not None:  # the lock released: plain xr.open_zarr(OUT, group=...) reads it
            from ..io.store import consolidate

            consolidate(args.output)
        print(summary)
        return 0
    if not whole_bss:
        found = (f", operator identified from {len(ident.positions)} sources (residual "
                 f"{ident.residual:.3f})" if ident is not None else "")
        tiles = f", tiles of {args.chunks} px" if args.chunks is not None else ""
        print(f"wrote {args.output}: {args.method}, {iterations} iterations{tiles}{found}")
        return 0
    a = ds.attrs
    ident = (f", identified from {a['pcmx_parameters']['n_sources_used']} sources "
             f"(residual {a['identification_residual']:.3f})" if args.family else "")
    written = [*paths.values(), *([args.output] if kind == "store" else [])]
    print(f"wrote {', '.join(written)}{' and ' + args.store if args.store else ''}: "
          f"{a['iterations']} iterations{' (converged)' if a['converged'] else ''}, "
          f"gamma1={a['gamma1']:.4g} (noise {a['noise_sigma']:.3g}: {a['noise_source']}), "
          f"gamma2={a['gamma2']:.4g}, offset={a['offset']:.4g}{ident}")
    return 0
