"""``make demo``: simulate a bead field, learn what pcmx can learn, write stores and figures.

Run as ``python -m pcmx.demo --output demo-output [--overwrite]``. Each step that has landed in
pcmx runs: the simulator (ground truth and TIFFs), the operator learned from the first
acquisition (when :mod:`pcmx.learn` is present), the product-convolution engine (the learned
operator applied to a Dirac comb), and the family of all states (when :mod:`pcmx.family` is
present), and last the bead image of state 0 restored with the learned operator
(:func:`pcmx.restore.restore`, Richardson-Lucy, tile by tile) and written chunk by chunk as a
Zarr store (:func:`pcmx.io.chunked.write_chunked`: ``restored_rl.zarr``). It ends with what
``pcmx info`` prints of each store (:func:`pcmx.io.store.describe_store`) and PNG figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time

import numpy as np


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pcmx.demo", description=__doc__.splitlines()[0])
    p.add_argument("--output", default="demo-output")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--beads", type=int, default=150)
    p.add_argument("--states", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import pcmx
    from pcmx import plot
    from pcmx.io.store import describe_store
    from pcmx.io.tiff import write_tiff
    from pcmx.simulate import simulate_beads, true_operator
    from pcmx.units import pixel_size

    out = args.output
    if os.path.exists(out):
        if not args.overwrite:
            print(f"demo: {out} exists; pass --overwrite to replace it", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    os.makedirs(out)
    t0 = time.perf_counter()

    print(f"[1] simulating {args.states} acquisitions of {args.size}x{args.size} px with {args.beads} beads")
    sim = simulate_beads((args.size, args.size), args.beads, states=args.states, seed=args.seed)
    px = pixel_size(sim, "x")
    paths = []
    for k in range(sim.sizes["state"]):
        path = os.path.join(out, f"beads_state{k}.tif")
        write_tiff(path, sim["image"].isel(state=k).values, px)
        paths.append(path)
    pcmx.save_store(sim, os.path.join(out, "simulation.zarr"))
    truth = true_operator(sim, state=0, n_components=5)
    pcmx.save_store(truth, os.path.join(out, "true_operator.zarr"))
    stores = ["simulation.zarr", "true_operator.zarr"]

    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    plot.plot_image(sim["image"].isel(state=0), ax=axes[0], title="simulated beads (state 0)")
    plot.psf_grid(truth, ax=axes[1])
    axes[1].set_title("true PSFs (state 0)")
    fig.savefig(os.path.join(out, "simulation.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)

    if _has("pcmx.learn"):
        from pcmx.learn import learn_operator

        print("[2] learning the space-varying operator of state 0 from its beads")
        learned = learn_operator(paths[0])
        pcmx.save_store(learned, os.path.join(out, "operator.zarr"))
        stores.append("operator.zarr")
        # one window (the smaller kernel's) and one colour scale for both
        window = min(float(abs(op["psf_basis"]["ky"]).max()) for op in (truth, learned))
        fig = plt.figure(figsize=(14, 6), layout="constrained")
        a, b = fig.subplots(1, 2)
        plot.psf_grid(truth, window=window, ax=a, beads=False)
        a.set_title(f"true PSFs (tiles ±{window:.3g} µm)")
        plot.psf_grid(learned, window=window, ax=b)
        b.set_title(f"learned PSFs and the beads (tiles ±{window:.3g} µm)")
        top = max(ax.get_images()[0].norm.vmax for ax in (a, b))
        for ax in (a, b):
            ax.get_images()[0].set_clim(0.0, top)  # the tiles of one axes share their norm
        fig.savefig(os.path.join(out, "operator_psfs.png"), dpi=100, bbox_inches="tight")
        plt.close(fig)
        fig = plot.plot_basis(learned)
        fig.savefig(os.path.join(out, "operator_basis.png"), dpi=100, bbox_inches="tight")
        plt.close(fig)
        fig = plot.field_maps(learned)
        fig.savefig(os.path.join(out, "operator_field_maps.png"), dpi=100, bbox_inches="tight")
        plt.close(fig)
    else:
        learned = truth

    if _has("pcmx.operator"):
        from pcmx.operator import ProductConvolution

        print("[3] applying the operator to a Dirac comb (product-convolution)")
        comb = np.zeros((args.size, args.size), np.float32)
        comb[16::32, 16::32] = 1.0
        blurred = ProductConvolution(learned).apply(comb)
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(np.sqrt(np.clip(np.asarray(blurred), 0, None)), cmap="magma")
        ax.set_axis_off()
        ax.set_title("operator applied to a Dirac comb")
        fig.savefig(os.path.join(out, "dirac_comb.png"), dpi=100, bbox_inches="tight")
        plt.close(fig)

    if _has("pcmx.family"):
        from pcmx.family import learn_family

        print(f"[4] learning the family of {len(paths)} states")
        import warnings

        with warnings.catch_warnings(record=True) as caught:  # printed as notes of the demo
            warnings.simplefilter("always", pcmx.io.readers.PcmxWarning)
            fam = learn_family(paths)
        for w in caught:
            print(f"    note: {' '.join(str(w.message).split())}")
        pcmx.save_store(fam, os.path.join(out, "family.zarr"))
        stores.append("family.zarr")
        fig = plot.family_states(fam)
        fig.savefig(os.path.join(out, "family_states.png"), dpi=100, bbox_inches="tight")
        plt.close(fig)

        from pcmx.deblur import deblur
        from pcmx.deblur.metrics import score_restoration
        from pcmx.simulate import simulate_point_sources

        print("[5] blind Sparse+Smooth deblurring of a new image with the family")
        k = max(1, (args.size // 256) ** 2)
        scene = simulate_point_sources((args.size, args.size), n_sources=60 * k, n_filaments=20 * k,
                                       pairs_closer_than_psf=6 * k, operator=sim, seed=args.seed + 1)
        write_tiff(os.path.join(out, "scene.tif"), scene["image"].values, px)
        res = deblur(scene["image"], fam)
        pcmx.save_store(res, os.path.join(out, "restoration.zarr"))
        stores.append("restoration.zarr")
        sy, sx = scene["source_y"].values, scene["source_x"].values
        score = score_restoration(res["sparse"], sy, sx)
        print(f"    sources found in the sparse part: F1 {score['f1']:.3f}, localisation RMSE "
              f"{score['rmse']:.2f} px ({len(sy)} true sources)")
        fig = plot.deblur_panel(res, scene["image"])
        sparse_ax = next(ax for ax in fig.axes if ax.get_title().startswith("sparse"))
        sparse_ax.plot(sx * (px or 1.0), sy * (px or 1.0), "o", mec="w", mfc="none", ms=5, mew=0.5,
                       alpha=0.7, label="true sources")
        sparse_ax.legend(fontsize=7, loc="lower right")
        fig.savefig(os.path.join(out, "deblurring.png"), dpi=100, bbox_inches="tight")
        plt.close(fig)

    step = 6 if _has("pcmx.family") else 4
    if _has("pcmx.restore") and _has("pcmx.io.chunked"):
        import dask.array as da

        from pcmx.io.chunked import write_chunked
        from pcmx.restore import restore

        print(f"[{step}] restoring the bead image of state 0 with the learned operator "
              "(Richardson-Lucy, tiles), written chunk by chunk as a Zarr store")
        t6 = time.perf_counter()
        image = sim["image"].isel(state=0)
        tile = max(64, args.size // 2)
        lazy = restore(da.from_array(image.values.astype(np.float32), chunks=tile), learned,
                       method="rl", iterations=20, chunks=tile)
        attrs = {"method": "rl", "iterations": 20,
                 "pcmx_parameters": {"method": "rl", "iterations": 20, "chunks": tile},
                 "pcmx_inputs": [{"name": "beads_state0.tif", "sha256": None},
                                 {"name": "operator.zarr" if learned is not truth else "true_operator.zarr",
                                  "sha256": None}]}
        coords = {d: image[d].variable.to_base_variable() for d in ("y", "x")}
        w = write_chunked(lazy, os.path.join(out, "restored_rl.zarr"), dims=("y", "x"),
                          coords=coords, attrs=attrs, progress=False)
        print(f"    {w.chunks} chunks of {tile} px written in {time.perf_counter() - t6:.1f} s")
        stores.append("restored_rl.zarr")
        restored = pcmx.open_store(os.path.join(out, "restored_rl.zarr"))["restored"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 6))
        plot.plot_image(image, ax=axes[0], title="simulated beads (state 0)")
        plot.plot_image(restored.load(), ax=axes[1], title="restored (rl, 20 iterations, learned operator)")
        fig.savefig(os.path.join(out, "restoration_rl.png"), dpi=100, bbox_inches="tight")
        plt.close(fig)

    print(f"done in {time.perf_counter() - t0:.1f} s; stores in {out}/:")
    for s in stores:
        print(f"\n$ pcmx info {os.path.join(out, s)}")
        print(describe_store(pcmx.open_store(os.path.join(out, s))))
    print(f"\nfigures: {', '.join(sorted(f for f in os.listdir(out) if f.endswith('.png')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
