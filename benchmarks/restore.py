"""Benchmark of restoration (issue 15, item 5): space-varying Richardson-Lucy in memory, tiled
and on a local Dask cluster, against the operator it applies and against invariant FFT RL.

Part ``memory`` (2D 2304 x 2304 and 3D 32 x 512 x 512, I = 5, the simulator's true operators,
boundary "reflect" as :func:`pcmx.restore.restore`'s default), in one process, the rows
interleaved round by round so that each ratio compares timings taken under the same load;
every time is measured as wall and as CPU time of the process (all threads: the machine may
be shared):

* ``pair``: one ``H.apply`` and one ``H.adjoint`` of :class:`pcmx.ProductConvolution` (in
  memory, all cores), what an RL iteration needs;
* ``restore rl``: :func:`pcmx.restore.restore` (``method="rl"``, in memory); per iteration
  ``(T(n2) - T(n1)) / (n2 - n1)``, which leaves out the set-up (``H^T 1``, the start);
* ``richardson_lucy_tv`` (``lam=0``) of :mod:`pcmx.deblur.baselines`, in place, and the same
  loop as it was before (a temporary per operation: the A/B of the in-place loop);
* ``invariant FFT RL``: one kernel (the operator's PSF at the field's centre), the image
  mirrored to a fast FFT size (``scipy.fft.next_fast_len(n + 2 r)``), 4 real FFTs per
  iteration with ``workers=-1``, in place: what the space variation costs;
* ``tiled``: :func:`pcmx.restore.restore` with ``chunks`` (threads, the default halo), against
  the same call in memory, whole runs of ``--tiled-iterations``; with ``halo=0`` (the per-tile
  overhead without the halo's extra pixels); and with larger tiles (``--extra-tiles2d``);
* peers, in ``benchmarks/.venv-peers`` (``--setup-peers``): scikit-image's
  ``restoration.richardson_lucy`` (2D) and RedLionfish's CPU ``doRLDeconvolutionFromNpArrays``
  (3D), both invariant, timed alternately with the invariant FFT RL above in their process.

Part ``cluster``: float32 stacks in Zarr stores on disk restored by
:func:`pcmx.restore.restore` (rl, ``--big-iterations``) on ``dask.distributed`` LocalClusters
of worker processes of one thread each with ``memory_limit`` per worker (1 GiB), the result
written to a Zarr store: a 64 x 768 x 768 stack on 1 and then 2 workers (scaling), then a
64 x 2304 x 2304 stack (1.36 GB, larger than a worker's limit) on 2. Recorded: wall time, the
workers' CPU time, and the peak resident memory of each worker and of all processes together
(psutil, sampled every 0.1 s). The operator: the simulator's true 3D operator of a
64 x 144 x 144 bead stack (5 components of 7 x 15 x 15), its maps stretched over the field by
linear interpolation and evaluated only where a tile asks (:class:`StretchedMaps`: the 5 maps
of the big grid would take 6.8 GB).

The tables are printed and written to ``docs/performance.md`` between the ``restore`` markers
(``restore_cluster`` for the second part).

Usage::

    .venv/bin/python benchmarks/restore.py [--parts memory,cluster] [--quick] [--no-peers]
    python benchmarks/restore.py --setup-peers     # once: scikit-image and RedLionfish
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, ".venv-peers")
PEERS_PYTHON = os.path.join(PEERS, "bin", "python")
DOC = os.path.join(ROOT, "docs", "performance.md")
MARKERS = {"memory": ("<!-- restore:begin -->", "<!-- restore:end -->"),
           "cluster": ("<!-- restore_cluster:begin -->", "<!-- restore_cluster:end -->")}
OFFSET = 100.0
TARGET = 1.3


# --------------------------------------------------------------------------------------------
# operators and images
# --------------------------------------------------------------------------------------------
def operator_2d(shape=(2304, 2304), kernel=33):
    """The simulator's true operator (I = 5) and a 600-bead image of that field."""
    from pcmx.simulate import simulate_beads, true_operator

    sim = simulate_beads(shape, max(10, 600 * shape[0] * shape[1] // 2304 ** 2), min_separation=40, seed=1)
    op = true_operator(sim, n_components=5, kernel_size=kernel, grid=8)
    y = np.ascontiguousarray(sim["image"].values, dtype=np.float32)
    return _bare(op), y


def _bare(op):
    """The operator Dataset without coordinates (pixel grids: no pixel-size checks)."""
    import xarray as xr

    return xr.Dataset({"psf_basis": (op["psf_basis"].dims, op["psf_basis"].values),
                       "coefficients": (op["coefficients"].dims, op["coefficients"].data)},
                      attrs={"pcmx_type": "operator"})


def small_operator_3d(kernel=33, kernel_z=15):
    """The simulator's true 3D operator of a 64 x 144 x 144 bead stack (I = 5)."""
    from pcmx.simulate import simulate_beads, true_operator

    sim = simulate_beads((64, 144, 144), 2, seed=1)
    op = true_operator(sim, n_components=5, kernel_size=kernel, grid=6, kernel_size_z=kernel_z)
    return op["psf_basis"].values.astype(np.float32), op["coefficients"].values.astype(np.float32)


def _stretch(maps, grids, start=(0, 0, 0)):
    """Maps (I, nz, ny, nx) interpolated linearly onto a larger grid (corners on corners):
    ``grids = (full grid shape, block shape)``, the block starting at ``start``."""
    full, block = grids
    out = maps
    for ax in range(3):
        n_src, n_full, n_blk, s = maps.shape[ax + 1], full[ax], block[ax], start[ax]
        pos = (np.arange(s, s + n_blk) * (n_src - 1) / max(n_full - 1, 1))
        lo = np.minimum(np.floor(pos).astype(int), n_src - 2) if n_src > 1 else np.zeros(n_blk, int)
        w = (pos - lo).astype(np.float32)
        a = np.take(out, lo, axis=ax + 1)
        b = np.take(out, np.minimum(lo + 1, n_src - 1), axis=ax + 1)
        shp = [1] * 4
        shp[ax + 1] = n_blk
        out = a + (b - a) * w.reshape(shp)
    return np.ascontiguousarray(out, dtype=np.float32)


class StretchedMaps:
    """The maps ``(I, nz, ny, nx)`` stretched onto a larger grid, evaluated on demand: an
    array-like whose slices are computed when taken (``operator[..., window]`` in a tile),
    so that neither the client nor a worker ever holds the 5 maps of the whole grid.

    It passes for a duck array (shape, dtype, ``__array_function__``) so that xarray keeps
    it as it is and :meth:`xarray.Dataset.isel` slices it lazily.
    """

    def __init__(self, maps, shape):
        self.maps = np.ascontiguousarray(maps, dtype=np.float32)
        self.shape = (maps.shape[0], *shape)
        self.dtype = np.dtype(np.float32)
        self.ndim = 4

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if Ellipsis in key:
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (5 - len(key)) + key[i + 1:]
        key = key + (slice(None),) * (4 - len(key))
        comp, *spatial = key
        ranges = [range(*k.indices(n)) if isinstance(k, slice) else k
                  for k, n in zip(spatial, self.shape[1:], strict=True)]
        if any(not isinstance(r, range) or r.step != 1 for r in ranges):
            return np.asarray(self)[key]
        block = _stretch(self.maps[comp] if isinstance(comp, slice) else self.maps[[comp]],
                         (self.shape[1:], tuple(len(r) for r in ranges)), tuple(r.start for r in ranges))
        return block if isinstance(comp, slice) else block[0]

    def __array__(self, dtype=None, copy=None):
        a = _stretch(self.maps, (self.shape[1:], self.shape[1:]))
        return a if dtype is None else a.astype(dtype)

    def __array_function__(self, func, types, args, kwargs):
        return NotImplemented

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return NotImplemented

    @property
    def size(self):
        return int(np.prod(self.shape))

    @property
    def nbytes(self):
        return self.size * 4


def operator_3d(shape, h, maps, lazy=False):
    import xarray as xr

    coeff = StretchedMaps(maps, shape) if lazy else _stretch(maps, (shape, shape))
    return xr.Dataset({"psf_basis": (("component", "kz", "ky", "kx"), h),
                       "coefficients": (("component", "z", "y", "x"), coeff)},
                      attrs={"pcmx_type": "operator"})


def beads_3d(H, seed=0, n=4000):
    """Point sources blurred by ``H``, plus the offset and Gaussian read noise."""
    rng = np.random.default_rng(seed)
    x = np.zeros(H.shape, np.float32)
    idx = tuple(rng.integers(0, s, n) for s in H.shape)
    x[idx] = rng.uniform(500, 5000, n).astype(np.float32)
    y = H.apply(x)
    y += np.float32(OFFSET)
    y += rng.normal(0, 2.0, y.shape).astype(np.float32)
    return y


# --------------------------------------------------------------------------------------------
# RL variants
# --------------------------------------------------------------------------------------------
def rl_before(y, H, n_iter, offset):
    """Richardson-Lucy as richardson_lucy_tv (lam=0) computed it before the in-place loop
    (a temporary per operation): the A side of the A/B."""
    y = np.ascontiguousarray(y, dtype=np.float32)
    ht1 = np.asarray(H.adjoint(np.ones_like(y)), dtype=np.float32)
    ht1 = np.maximum(ht1, np.float32(1e-3) * float(ht1.max()))
    flux = max(float(np.sum(np.maximum(y - offset, 0), dtype=np.float64)), 1e-12)
    u = np.full_like(y, flux / float(np.sum(ht1, dtype=np.float64)))
    y_pos = np.maximum(y, 0)
    b32, tiny = np.float32(offset), np.float32(1e-12 * max(flux / y.size, 1e-30))
    for _ in range(n_iter):
        model = np.asarray(H.apply(u), dtype=np.float32)
        ratio = y_pos / np.maximum(model + b32, tiny)
        corr = np.asarray(H.adjoint(ratio), dtype=np.float32)
        u = u * corr / ht1
    return u


class InvariantRL:
    """RL with one kernel by FFTs: the image mirrored to a fast size, 4 real FFTs an
    iteration (``scipy.fft``, all workers), every elementwise step in place."""

    def __init__(self, y, psf, offset):
        import scipy.fft as sf

        self.sf = sf
        r = [k // 2 for k in psf.shape]
        n = y.shape
        self.shape = tuple(sf.next_fast_len(a + 2 * b, real=ax == y.ndim - 1)
                           for ax, (a, b) in enumerate(zip(n, r, strict=True)))
        pad = [(b, p - a - b) for a, b, p in zip(n, r, self.shape, strict=True)]
        self.y = np.maximum(np.pad(y, pad, mode="symmetric"), 0).astype(np.float32)
        k = np.zeros(self.shape, np.float32)
        k[tuple(slice(0, s) for s in psf.shape)] = psf / psf.sum()
        k = np.roll(k, [-b for b in r], axis=tuple(range(y.ndim)))
        self.spec = sf.rfftn(k, workers=-1)
        self.conj = np.conj(self.spec)
        self.b = np.float32(offset)
        self.u = np.full(self.shape, max(float(np.mean(self.y)) - offset, 1e-3), np.float32)
        self.crop = tuple(slice(b, b + a) for a, b in zip(n, r, strict=True))

    def iterate(self, n_iter):
        sf = self.sf
        for _ in range(n_iter):
            s = sf.rfftn(self.u, workers=-1)
            s *= self.spec
            m = sf.irfftn(s, s=self.shape, workers=-1)
            m += self.b
            np.maximum(m, np.float32(1e-12), out=m)
            np.divide(self.y, m, out=m)
            s = sf.rfftn(m, workers=-1)
            s *= self.conj
            c = sf.irfftn(s, s=self.shape, workers=-1)
            self.u *= c
        return self.u[self.crop]


# --------------------------------------------------------------------------------------------
# timing helpers
# --------------------------------------------------------------------------------------------
def timed(fn):
    """(wall seconds, CPU seconds of this process: user + system, all threads) of ``fn()``."""
    c, t = time.process_time(), time.perf_counter()
    fn()
    return np.array([time.perf_counter() - t, time.process_time() - c])


def per_iteration(run, n1, n2):
    """``(T(n2) - T(n1)) / (n2 - n1)`` of ``run(n)``: the iteration without the set-up."""
    t1 = timed(lambda: run(n1))
    t2 = timed(lambda: run(n2))
    return (t2 - t1) / (n2 - n1)


def med(values):
    """Medians of (wall, cpu) pairs."""
    return np.median(np.asarray(values), axis=0)


def cpu_seconds():
    t = os.times()
    return t.user + t.system


# --------------------------------------------------------------------------------------------
# part 1: memory and tiles
# --------------------------------------------------------------------------------------------
def _window_ratio(shape, chunks, halo):
    """Pixels of the tiles' windows (each tile grown by the halo, clipped at the edges) over
    the image's."""
    extent = 1.0
    for n, c, h in zip(shape, chunks, halo, strict=True):
        extent *= sum(min(s + c + h, n) - max(s - h, 0) for s in range(0, n, c)) / n if c < n else 1.0
    return extent


def measure_case(label, op_ds, y, *, rounds, n1, n2, tiled_iter, chunks, no_peers, peer, extra=()):
    import pcmx
    from pcmx.deblur.baselines import richardson_lucy_tv
    from pcmx.restore import default_halo, restore

    H = pcmx.ProductConvolution(op_ds, boundary="reflect")
    n_vox = y.size
    centre = tuple(s // 2 for s in H.shape)
    psf = H.psf_at(*centre)
    inv = InvariantRL(y, psf, OFFSET)
    H.adjoint(H.apply(y))  # caches (spectra, maps)
    rows = {k: [] for k in ("pair", "restore", "rl_tv", "rl_before", "invariant",
                            "tiled", "tiled_halo0", "memory_whole", *(f"tiled_{c[-1]}" for c in extra))}
    halo = default_halo(tuple(H.radius), tiled_iter)
    halo = halo if isinstance(halo, tuple) else (halo,) * y.ndim
    cold = {}
    if tiled_iter:  # the first tiled call computes the kernel spectra of every window shape
        cold["tiled"] = timed(lambda: restore(y, H, method="rl", iterations=tiled_iter, chunks=chunks,
                                              offset=OFFSET))
        cold["tiled_halo0"] = timed(lambda: restore(y, H, method="rl", iterations=tiled_iter,
                                                    chunks=chunks, halo=0, offset=OFFSET))
        for c in extra:
            restore(y, H, method="rl", iterations=tiled_iter, chunks=c, offset=OFFSET)
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    for r in range(rounds):
        rows["pair"].append(med([timed(lambda: H.adjoint(H.apply(y))) for _ in range(2)]))
        rows["restore"].append(per_iteration(
            lambda n: restore(y, H, method="rl", iterations=n, offset=OFFSET), n1, n2))
        rows["rl_tv"].append(per_iteration(
            lambda n: richardson_lucy_tv(y, H, lam=0.0, n_iter=n, offset=OFFSET), n1, n2))
        rows["rl_before"].append(per_iteration(lambda n: rl_before(y, H, n, OFFSET), n1, n2))
        rows["invariant"].append(timed(lambda: inv.iterate(n2 - n1)) / (n2 - n1))
        rows["pair"].append(med([timed(lambda: H.adjoint(H.apply(y))) for _ in range(2)]))
        if tiled_iter:
            rows["memory_whole"].append(timed(lambda: restore(y, H, method="rl", iterations=tiled_iter,
                                                              offset=OFFSET)))
            rows["tiled"].append(timed(lambda: restore(y, H, method="rl", iterations=tiled_iter,
                                                       chunks=chunks, offset=OFFSET)))
            rows["tiled_halo0"].append(timed(lambda: restore(y, H, method="rl", iterations=tiled_iter,
                                                             chunks=chunks, halo=0, offset=OFFSET)))
            for c in extra:
                rows[f"tiled_{c[-1]}"].append(timed(lambda c=c: restore(
                    y, H, method="rl", iterations=tiled_iter, chunks=c, offset=OFFSET)))
        print(f"  {label} round {r + 1}: " + ", ".join(
            f"{k} {v[-1][0] * 1e3:.0f}/{v[-1][1] * 1e3:.0f} ms" for k, v in rows.items() if v)
            + f" (wall/cpu); load {os.getloadavg()[0]:.1f}", flush=True)
    cpu_share = (cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
    res = {k: med(v) for k, v in rows.items() if v}
    res.update(n_vox=n_vox, shape=y.shape, kernel=H.kernel_shape, I=H.n_components, halo=halo,
               chunks=chunks, tiled_iter=tiled_iter, cpu_share=cpu_share, rounds=rounds, cold=cold,
               raw={k: np.asarray(v).tolist() for k, v in rows.items() if v},
               load=os.getloadavg())
    res["window_ratio"] = _window_ratio(y.shape, chunks, halo)
    res["extra"] = {f"tiled_{c[-1]}": (c, _window_ratio(y.shape, c, halo)) for c in extra}
    if not no_peers and os.path.exists(PEERS_PYTHON):
        res["peer"] = run_peer(peer, y, psf, n2 - n1, rounds)
    return res


PEER_CODE = r"""
import json, sys, time
import numpy as np, scipy.fft
sys.path.insert(0, sys.argv[1])
from restore import InvariantRL, OFFSET
y = np.load(sys.argv[2]); psf = np.load(sys.argv[3]); n = int(sys.argv[4]); rounds = int(sys.argv[5])
kind = sys.argv[6]
if kind == "skimage":
    import skimage
    from skimage.restoration import richardson_lucy
    version = "scikit-image " + skimage.__version__
    def peer():
        with scipy.fft.set_workers(-1):
            richardson_lucy(np.maximum(y - OFFSET, 0), psf / psf.sum(), num_iter=n, clip=False)
else:
    from importlib.metadata import version as v
    from RedLionfishDeconv import doRLDeconvolutionFromNpArrays
    version = "RedLionfish " + v("redlionfish") + " (CPU: scipy.fft)"
    def peer():
        with scipy.fft.set_workers(-1):
            doRLDeconvolutionFromNpArrays(np.maximum(y - OFFSET, 0), psf, niter=n, method="cpu")
inv = InvariantRL(y, psf, OFFSET)
def timed(fn):
    c, t = time.process_time(), time.perf_counter()
    fn()
    return [(time.perf_counter() - t) / n, (time.process_time() - c) / n]
peer_t, inv_t = [], []
for _ in range(rounds):
    peer_t.append(timed(peer))
    inv_t.append(timed(lambda: inv.iterate(n)))
print(json.dumps({"peer": np.median(peer_t, axis=0).tolist(), "invariant": np.median(inv_t, axis=0).tolist(),
                  "version": version}))
"""


def run_peer(kind, y, psf, n, rounds):
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "y.npy"), y)
        np.save(os.path.join(tmp, "psf.npy"), psf)
        proc = subprocess.run([PEERS_PYTHON, "-c", PEER_CODE, HERE, os.path.join(tmp, "y.npy"),
                               os.path.join(tmp, "psf.npy"), str(n), str(rounds), kind],
                              capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def part_memory(args):
    results = {}
    if "2d" in args.cases:
        print("2D: operator and image", flush=True)
        op, y = operator_2d(tuple(args.shape2d))
        results["2d"] = measure_case("2d", op, y, rounds=args.rounds, n1=2, n2=args.iterations,
                                     tiled_iter=args.tiled_iterations, chunks=tuple(args.chunks2d),
                                     no_peers=args.no_peers, peer="skimage",
                                     extra=[(t, t) for t in args.extra_tiles2d])
    if "3d" in args.cases:
        print("3D: operator and image", flush=True)
        import pcmx

        h, maps = small_operator_3d()
        shape = tuple(args.shape3d)
        op = operator_3d(shape, h, maps)
        y = beads_3d(pcmx.ProductConvolution(op, boundary="reflect"))
        results["3d"] = measure_case("3d", op, y, rounds=args.rounds, n1=2, n2=args.iterations,
                                     tiled_iter=args.tiled_iterations, chunks=tuple(args.chunks3d),
                                     no_peers=args.no_peers, peer="redlionfish")
    return results


def memory_lines(results, args) -> list[str]:
    lines = ["## Restoration", "",
             f"Measured by `benchmarks/restore.py` on {os.cpu_count()} cores ({platform.machine()}), "
             f"{time.strftime('%Y-%m-%d')}; medians of {args.rounds} rounds, the rows of a case "
             "interleaved round by round in one process. Reproduce: `.venv/bin/python "
             "benchmarks/restore.py --parts memory` (peers: `python benchmarks/restore.py "
             "--setup-peers` once).", "",
             "How to read it: *pair* is one `apply` and one `adjoint` of "
             "`pcmx.ProductConvolution` in memory (all cores), what an RL iteration needs. "
             "Per-iteration times are `(T(n2) - T(n1)) / (n2 - n1)` of whole calls "
             f"(n1 = 2, n2 = {args.iterations}), so they leave out the set-up (`H^T 1`, the "
             "start). *CPU* is the process's user + system time (all threads): the machine is "
             "shared (its load average is given per case) and wall times swing with the other "
             "users' work, while CPU times measure the work done; the targets are judged on "
             "both. *voxel-it/s* is voxels x iterations per wall second. Targets: an RL "
             f"iteration within {TARGET}x of the pair; tiled within {TARGET}x of in memory.", ""]
    for r in results.values():
        shape = "x".join(map(str, r["shape"]))
        kern = "x".join(map(str, r["kernel"]))
        pair = np.asarray(r["pair"])
        lines += [f"#### {shape}, I = {r['I']}, {kern} kernels, boundary reflect", "",
                  f"Load average {r['load'][0]:.1f} (1 min) at the end of the case.", "",
                  "| method | per iteration, wall | CPU | voxel-it/s | / pair, wall | / pair, CPU | notes |",
                  "|---|---|---|---|---|---|---|"]

        def row(name, t, note="", r=r, pair=pair, lines=lines):
            t = np.asarray(t)
            lines.append(f"| {name} | {t[0] * 1e3:.0f} ms | {t[1] * 1e3:.0f} ms | "
                         f"{r['n_vox'] / t[0] / 1e6:.1f} M | {t[0] / pair[0]:.2f} | {t[1] / pair[1]:.2f} | {note} |")

        def verdict(t, ref):
            w, c = np.asarray(t) / np.asarray(ref)
            return f"target {TARGET}: " + ("met" if max(w, c) <= TARGET else
                                           "met on CPU" if c <= TARGET else "NOT met")

        row("pair: apply + adjoint", pair, "the operator's cost per RL iteration")
        row("pcmx.restore rl, in memory", r["restore"], verdict(r["restore"], pair))
        row("richardson_lucy_tv (lam=0), in place", r["rl_tv"], verdict(r["rl_tv"], pair))
        saved = np.asarray(r["rl_before"]) - np.asarray(r["rl_tv"])
        row("the same loop before (a temporary per operation)", r["rl_before"],
            f"A/B: in place saves {saved[0] * 1e3:.0f} ms wall, {saved[1] * 1e3:.0f} ms CPU")
        ratio = np.asarray(r["restore"]) / np.asarray(r["invariant"])
        row("invariant FFT RL (one kernel, 4 FFTs)", r["invariant"],
            f"space variation costs {ratio[0]:.1f}x wall, {ratio[1]:.1f}x CPU (restore rl / this)")
        peer = r.get("peer")
        if peer and "error" not in peer:
            rel = np.asarray(peer["peer"]) / np.asarray(peer["invariant"])
            row(f"{peer['version']}, invariant", np.asarray(r["invariant"]) * rel,
                f"timed in its own process alternately with the invariant FFT RL: {rel[0]:.2f}x "
                f"it wall, {rel[1]:.2f}x CPU ({peer['peer'][0] * 1e3:.0f} ms wall there); "
                "under scipy.fft.set_workers(-1)")
        elif peer:
            lines.append(f"| peer | - | - | - | - | - | failed: {peer['error']} |")
        if "tiled" in r:
            tiles = "x".join(map(str, r["chunks"]))
            halo = "x".join(map(str, r["halo"]))
            mem = np.asarray(r["memory_whole"])
            lines += ["", f"Tiled: whole runs of {r['tiled_iter']} iterations (threads), tiles {tiles}, "
                      f"default halo {halo}; the windows (tiles grown by the halo, clipped at the "
                      f"edges) hold {r['window_ratio']:.2f}x the image's pixels. The first tiled call, "
                      "which also computes the kernel spectra of each window shape, took "
                      f"{r['cold']['tiled'][0]:.1f} s wall ({r['cold']['tiled_halo0'][0]:.1f} s with "
                      "halo 0).", "",
                      "| run | wall | CPU | voxel-it/s | / in memory, wall | / in memory, CPU | notes |",
                      "|---|---|---|---|---|---|---|"]
            for name, key, note in (
                    ("in memory", "memory_whole", ""),
                    ("tiled, default halo", "tiled", verdict(r["tiled"], mem)),
                    ("tiled, halo 0 (inexact: the per-tile overhead alone)", "tiled_halo0", ""),
                    *((f"tiled, tiles {'x'.join(map(str, c))}, default halo", key,
                       f"{verdict(r[key], mem)}; windows {ratio:.2f}x the image")
                      for key, (c, ratio) in r["extra"].items())):
                t = np.asarray(r[key])
                lines.append(f"| {name} | {t[0]:.2f} s | {t[1]:.2f} s | "
                             f"{r['n_vox'] * r['tiled_iter'] / t[0] / 1e6:.1f} M | "
                             f"{t[0] / mem[0]:.2f} | {t[1] / mem[1]:.2f} | {note} |")
        lines += ["", f"CPU use during the case: {r['cpu_share']:.2f} cores of {os.cpu_count()} "
                  "(this process's CPU time over wall time).", ""]
    return lines


# --------------------------------------------------------------------------------------------
# part 2: a stack larger than a worker's memory, on a local cluster
# --------------------------------------------------------------------------------------------
class Sampler:
    """Peak resident memory of a set of processes, sampled every ``period`` seconds."""

    def __init__(self, pids, period=0.1):
        import psutil

        self.procs = {p: psutil.Process(p) for p in pids}
        self.peak = dict.fromkeys(pids, 0)
        self.cpu0 = {p: self._cpu(p) for p in pids}
        self.cpu = {}
        self.total = 0
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            total = 0
            for p, proc in self.procs.items():
                try:
                    rss = proc.memory_info().rss
                except Exception:  # a worker restarted or ended
                    rss = 0
                self.peak[p] = max(self.peak[p], rss)
                total += rss
            self.total = max(self.total, total)
            self._stop.wait(self.period)

    def _cpu(self, p):
        try:
            t = self.procs[p].cpu_times()
            return t.user + t.system
        except Exception:
            return 0.0

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.cpu = {p: self._cpu(p) - self.cpu0[p] for p in self.procs}


def write_stack(path, shape, chunks, seed=0):
    """A stack of blurred-looking beads (Gaussian spots on the offset, with noise), written
    chunk by chunk to a Zarr store."""
    import dask.array as da

    def block(block_info=None):
        loc = block_info[None]["array-location"]
        bshape = tuple(b - a for a, b in loc)
        rng = np.random.default_rng([seed, *(a for a, _ in loc)])
        out = rng.normal(OFFSET, 2.0, bshape).astype(np.float32)
        n = max(1, out.size // 20000)
        idx = tuple(rng.integers(0, s, n) for s in bshape)
        spots = np.zeros(bshape, np.float32)
        spots[idx] = rng.uniform(200, 2000, n).astype(np.float32)
        import scipy.ndimage as ndi

        out += ndi.gaussian_filter(spots, (2.0, 1.5, 1.5), truncate=3.0) * 30
        return out

    arr = da.map_blocks(block, dtype=np.float32, chunks=tuple(
        tuple(min(c, n - i) for i in range(0, n, c)) for n, c in zip(shape, chunks, strict=True)),
        meta=np.empty((0, 0, 0), np.float32))
    arr.to_zarr(path, overwrite=True)


def part_cluster(args):
    import dask
    import dask.array as da
    from distributed import Client, LocalCluster

    import pcmx
    from pcmx.restore import default_halo, restore, restore_memory

    big = tuple(args.big_shape)
    limit = int(args.memory_limit * 2**30)
    iters = args.big_iterations
    h, maps = small_operator_3d(kernel=args.big_kernel, kernel_z=args.big_kernel_z)
    tile = tuple(args.big_chunks)
    scratch = args.scratch or tempfile.mkdtemp(prefix="pcmx-restore-bench-")
    plan = [(big, n) for n in args.workers]
    small = tuple(args.scaling_shape) if args.scaling_shape else None
    if small:
        plan = [(small, n) for n in args.workers] + [(big, max(args.workers))]
    runs, written = [], {}
    # the workers' environment: the kernel spectra cache bounded to about one window shape's
    # spectra (the default, 2 GiB, exceeds the worker's limit), and NumPy's large arrays
    # always mapped (returned to the OS when freed, not kept in glibc's heap)
    os.environ["PCMX_SPECTRUM_CACHE_MB"] = str(args.worker_cache_mb)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "1048576"
    for shape, n_workers in plan:
        op = operator_3d(shape, h, maps, lazy=True)
        H = pcmx.ProductConvolution(op, boundary="reflect", check_finite=False)
        est = restore_memory(tile, H, "rl", iterations=iters)
        src = os.path.join(scratch, "stack-{}x{}x{}.zarr".format(*shape))
        if shape not in written:
            t = time.perf_counter()
            with dask.config.set(scheduler="threads"):
                write_stack(src, shape, (shape[0], 256, 256))
            written[shape] = time.perf_counter() - t
        stack_bytes = 4 * int(np.prod(shape))
        print(f"cluster: stack {shape} ({stack_bytes / 1e9:.2f} GB, written in {written[shape]:.0f} s), "
              f"{n_workers} worker(s) of {limit / 2**30:.2f} GiB, tiles {tile}, restore_memory "
              f"{est / 2**20:.0f} MiB", flush=True)
        dst = os.path.join(scratch, f"restored-{n_workers}.zarr")
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                          memory_limit=limit, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            pids = list(client.run(os.getpid).values())
            image = da.from_zarr(src)
            t = time.perf_counter()
            with Sampler([os.getpid(), *pids]) as sampler:
                out = restore(image, H, method="rl", iterations=iters, chunks=tile, offset=OFFSET)
                da.to_zarr(out, dst, overwrite=True)
            wall = time.perf_counter() - t
            logs = client.get_worker_logs()
            warnings = sum(level in ("WARNING", "ERROR", "CRITICAL") and "memory" in str(m).lower()
                           for msgs in logs.values() for level, m in msgs)
        check = da.from_zarr(dst)
        sample = np.asarray(check[shape[0] // 2, ::97, ::97])
        run = {"shape": shape, "stack_bytes": stack_bytes, "workers": n_workers, "wall": wall,
               "worker_peak": [sampler.peak[p] for p in pids], "client_peak": sampler.peak[os.getpid()],
               "total_peak": sampler.total, "worker_cpu": sum(sampler.cpu[p] for p in pids),
               "warnings": warnings, "finite": bool(np.isfinite(sample).all()),
               "nonnegative": bool(sample.min() >= 0), "estimate": est,
               "load": os.getloadavg()[0]}
        print(f"  wall {wall:.1f} s, worker CPU {run['worker_cpu']:.0f} s, worker peaks "
              f"{[round(p / 2**20) for p in run['worker_peak']]} MiB, all processes "
              f"{sampler.total / 2**20:.0f} MiB, memory warnings {warnings}, load {run['load']:.1f}",
              flush=True)
        runs.append(run)
    return {"limit": limit, "tile": tile, "iterations": iters, "kernel": H.kernel_shape,
            "I": H.n_components, "runs": runs, "halo": default_halo(tuple(H.radius), iters),
            "cache_mb": args.worker_cache_mb}


def cluster_lines(res, args) -> list[str]:
    lines = ["### A stack larger than a worker's memory, on a local cluster", "",
             f"Measured by `benchmarks/restore.py --parts cluster` on {os.cpu_count()} cores "
             f"({platform.machine()}, shared), {time.strftime('%Y-%m-%d')}: float32 stacks in Zarr "
             f"stores, `pcmx.restore.restore(method='rl', iterations={res['iterations']})` on a "
             "`dask.distributed` LocalCluster of worker processes (one thread each, "
             f"`memory_limit` {res['limit'] / 2**30:.2f} GiB each: Dask pauses a worker at 80% "
             "and restarts it at 95%), the result written to a Zarr store. Operator: I = "
             f"{res['I']}, {'x'.join(map(str, res['kernel']))} kernels (the simulator's true "
             "operator of a 64 x 144 x 144 stack, its maps stretched over the field by linear "
             "interpolation and evaluated only where a tile asks, so that no process holds the "
             f"maps of the whole grid), tiles {'x'.join(map(str, res['tile']))}, default halo "
             f"{'x'.join(map(str, res['halo']))} (z is not split); the workers run with "
             f"`PCMX_SPECTRUM_CACHE_MB={res['cache_mb']}` (the kernel spectra of about one window "
             "shape; the default, 2 GiB, exceeds the worker's limit) and "
             "`MALLOC_MMAP_THRESHOLD_=1048576` (freed arrays go back to the OS). Peak memory: resident sets "
             "sampled every 0.1 s (psutil); *all processes* adds the client. *Worker CPU*: user + "
             "system seconds of the workers.", "",
             "| stack | GB | workers | wall | per iteration | voxel-it/s | worker CPU | "
             "peak per worker | peak, all processes | `restore_memory` per tile | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    walls = {}
    for r in res["runs"]:
        shape = "x".join(map(str, r["shape"]))
        n_vox = int(np.prod(r["shape"]))
        walls[(r["shape"], r["workers"])] = r["wall"]
        peaks = ", ".join(f"{p / 2**20:.0f}" for p in r["worker_peak"])
        one = walls.get((r["shape"], 1))
        speed = f"; speed-up over 1 worker {one / r['wall']:.2f}" if one and r["workers"] > 1 else ""
        lines.append(f"| {shape} | {r['stack_bytes'] / 1e9:.2f} | {r['workers']} | {r['wall']:.0f} s | "
                     f"{r['wall'] / res['iterations']:.0f} s | {n_vox * res['iterations'] / r['wall'] / 1e6:.2f} M | "
                     f"{r['worker_cpu']:.0f} s | {peaks} MiB | {r['total_peak'] / 2**20:.0f} MiB | "
                     f"{r['estimate'] / 2**20:.0f} MiB | finite {r['finite']}, >= 0 {r['nonnegative']}; "
                     f"memory warnings {r['warnings']}; load {r['load']:.1f}{speed} |")
    lines += ["", "Per iteration: wall / iterations (the set-up, `H^T 1` per tile, and reading and "
              "writing the stores included).", ""]
    return lines


# --------------------------------------------------------------------------------------------
def write_doc(part: str, lines: list[str]) -> None:
    begin, end = MARKERS[part]
    section = "\n".join([begin, *lines, end])
    text = open(DOC).read() if os.path.exists(DOC) else "# Performance\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    elif part == "cluster" and MARKERS["memory"][1] in text:
        text = text.replace(MARKERS["memory"][1], MARKERS["memory"][1] + "\n\n" + section, 1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(DOC, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="memory,cluster")
    p.add_argument("--cases", default="2d,3d")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shape2d", type=int, nargs=2, default=(2304, 2304))
    p.add_argument("--chunks2d", type=int, nargs=2, default=(512, 512))
    p.add_argument("--extra-tiles2d", type=int, nargs="*", default=(768, 1152),
                   help="more 2D tile edges timed tiled (default halo)")
    p.add_argument("--shape3d", type=int, nargs=3, default=(32, 512, 512))
    p.add_argument("--chunks3d", type=int, nargs=3, default=(32, 256, 256))
    p.add_argument("--iterations", type=int, default=8, help="n2 of the per-iteration difference")
    p.add_argument("--tiled-iterations", type=int, default=10)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--setup-peers", action="store_true")
    p.add_argument("--quick", action="store_true", help="2 rounds, 2D only")
    p.add_argument("--big-shape", type=int, nargs=3, default=(64, 2304, 2304))
    p.add_argument("--big-kernel", type=int, default=15)
    p.add_argument("--big-kernel-z", type=int, default=7)
    p.add_argument("--big-iterations", type=int, default=3)
    p.add_argument("--big-chunks", type=int, nargs=3, default=(64, 192, 192))
    p.add_argument("--scaling-shape", type=int, nargs=3, default=(64, 768, 768),
                   help="the stack of the 1- and 2-worker runs (0 0 0: the big one)")
    p.add_argument("--memory-limit", type=float, default=1.0, help="GiB per worker")
    p.add_argument("--worker-cache-mb", type=int, default=256,
                   help="PCMX_SPECTRUM_CACHE_MB of the workers")
    p.add_argument("--workers", type=int, nargs="+", default=(1, 2))
    p.add_argument("--scratch", default=None, help="folder for the Zarr stores (default: a temp dir)")
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    if args.setup_peers:
        return subprocess.call([os.path.join(PEERS, "bin", "pip"), "install", "scikit-image", "redlionfish"])
    if args.quick:
        args.rounds, args.cases = 2, "2d"
    parts = args.parts.split(",")
    if "memory" in parts:
        res = part_memory(args)
        lines = memory_lines(res, args)
        print("\n".join(lines))
        with open(os.path.join(tempfile.gettempdir(), "pcmx-restore-bench-memory.json"), "w") as f:
            json.dump(res, f, default=str)
        if not args.no_doc:
            write_doc("memory", lines)
    if "cluster" in parts:
        if args.scaling_shape and not all(args.scaling_shape):
            args.scaling_shape = None
        res = part_cluster(args)
        lines = cluster_lines(res, args)
        print("\n".join(lines))
        if not args.no_doc:
            write_doc("cluster", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
