"""Benchmark of restoration (issue 15, item 5): space-varying Richardson-Lucy in memory, tiled
and on a local Dask cluster, against the operator it applies and against invariant FFT RL.

Part ``memory`` (2D 2304 x 2304 and 3D 32 x 512 x 512, I = 5, the simulator's true operators,
boundary "reflect" as :func:`pcmx.restore.restore`'s default), in one process, the rows
interleaved round by round so that each ratio compares timings taken under the same load:

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
  the same call in memory, whole runs of ``--tiled-iterations``; and with ``halo=0`` (the
  per-tile overhead without the halo's extra pixels);
* peers, in ``benchmarks/.venv-peers`` (``--setup-peers``): scikit-image's
  ``restoration.richardson_lucy`` (2D) and RedLionfish's CPU ``doRLDeconvolutionFromNpArrays``
  (3D), both invariant, timed alternately with the invariant FFT RL above in their process.

Part ``cluster``: a 64 x 2304 x 2304 float32 stack (1.36 GB) in a Zarr store on disk, restored
by :func:`pcmx.restore.restore` (rl) on a ``dask.distributed`` LocalCluster of 1 and then 2
worker processes of one thread each, ``memory_limit`` per worker below the stack's size,
the result written to a Zarr store; wall time, and the peak resident memory of each worker and
of all processes together (psutil, sampled every 0.1 s). The operator: the simulator's true
3D operator of a 64 x 144 x 144 bead stack (5 components), its maps stretched 16x over the
field by linear interpolation, computed lazily chunk by chunk (the 5 maps of the big grid
would take 6.8 GB).

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
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def per_iteration(run, n1, n2):
    """``(T(n2) - T(n1)) / (n2 - n1)`` of ``run(n)``: the iteration without the set-up."""
    t1 = timed(lambda: run(n1))
    t2 = timed(lambda: run(n2))
    return (t2 - t1) / (n2 - n1)


def med(values):
    return float(np.median(values))


def cpu_seconds():
    t = os.times()
    return t.user + t.system


# --------------------------------------------------------------------------------------------
# part 1: memory and tiles
# --------------------------------------------------------------------------------------------
def measure_case(label, op_ds, y, *, rounds, n1, n2, tiled_iter, chunks, no_peers, peer):
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
                            "tiled", "tiled_halo0", "memory_whole")}
    halo = default_halo(tuple(H.radius), tiled_iter)
    halo = halo if isinstance(halo, tuple) else (halo,) * y.ndim
    cold = {}
    if tiled_iter:  # the first tiled call computes the kernel spectra of every window shape
        cold["tiled"] = timed(lambda: restore(y, H, method="rl", iterations=tiled_iter, chunks=chunks,
                                              offset=OFFSET))
        cold["tiled_halo0"] = timed(lambda: restore(y, H, method="rl", iterations=tiled_iter,
                                                    chunks=chunks, halo=0, offset=OFFSET))
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    for r in range(rounds):
        rows["pair"].append(med([timed(lambda: H.adjoint(H.apply(y))) for _ in range(3)]))
        rows["restore"].append(per_iteration(
            lambda n: restore(y, H, method="rl", iterations=n, offset=OFFSET), n1, n2))
        rows["rl_tv"].append(per_iteration(
            lambda n: richardson_lucy_tv(y, H, lam=0.0, n_iter=n, offset=OFFSET), n1, n2))
        rows["rl_before"].append(per_iteration(lambda n: rl_before(y, H, n, OFFSET), n1, n2))
        rows["invariant"].append(timed(lambda: inv.iterate(n2 - n1)) / (n2 - n1))
        rows["pair"].append(med([timed(lambda: H.adjoint(H.apply(y))) for _ in range(3)]))
        if tiled_iter:
            rows["memory_whole"].append(timed(lambda: restore(y, H, method="rl", iterations=tiled_iter,
                                                              offset=OFFSET)))
            rows["tiled"].append(timed(lambda: restore(y, H, method="rl", iterations=tiled_iter,
                                                       chunks=chunks, offset=OFFSET)))
            rows["tiled_halo0"].append(timed(lambda: restore(y, H, method="rl", iterations=tiled_iter,
                                                             chunks=chunks, halo=0, offset=OFFSET)))
        print(f"  {label} round {r + 1}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in rows.items() if v),
              flush=True)
    cpu_share = (cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
    res = {k: med(v) for k, v in rows.items() if v}
    res.update(n_vox=n_vox, shape=y.shape, kernel=H.kernel_shape, I=H.n_components, halo=halo,
               chunks=chunks, tiled_iter=tiled_iter, cpu_share=cpu_share, rounds=rounds, cold=cold,
               raw={k: v for k, v in rows.items() if v})
    # the tiled windows: pixels restored (tile + halo, clipped) over the image's
    extent = 1.0
    for n, c, h in zip(y.shape, chunks, halo, strict=True):
        starts = range(0, n, c)
        extent *= sum(min(s + c + h, n) - max(s - h, 0) for s in starts) / n if c < n else 1.0
    res["window_ratio"] = extent
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
peer_t, inv_t = [], []
for _ in range(rounds):
    t = time.perf_counter(); peer(); peer_t.append((time.perf_counter() - t) / n)
    t = time.perf_counter(); inv.iterate(n); inv_t.append((time.perf_counter() - t) / n)
print(json.dumps({"peer": float(np.median(peer_t)), "invariant": float(np.median(inv_t)),
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
                                     no_peers=args.no_peers, peer="skimage")
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
             f"Measured by `benchmarks/restore.py` on {os.cpu_count()} cores ({platform.machine()}, "
             f"shared with other users: every ratio compares timings taken alternately in one "
             f"process), {time.strftime('%Y-%m-%d')}; medians of {args.rounds} rounds. "
             "Reproduce: `.venv/bin/python benchmarks/restore.py --parts memory` "
             "(peers: `python benchmarks/restore.py --setup-peers` once).", "",
             "How to read it: *pair* is one `apply` and one `adjoint` of "
             "`pcmx.ProductConvolution` in memory (all cores), what an RL iteration needs; "
             "per-iteration times are `(T(n2) - T(n1)) / (n2 - n1)` of whole calls "
             f"(n1 = 2, n2 = {args.iterations}), so they leave out the set-up (`H^T 1`, the "
             "start). *voxel-it/s* is voxels x iterations per second. Target: an RL iteration "
             f"within {TARGET}x of the pair, tiled within {TARGET}x of in memory.", ""]
    for r in results.values():
        shape = "x".join(map(str, r["shape"]))
        kern = "x".join(map(str, r["kernel"]))
        pair = r["pair"]
        lines += [f"#### {shape}, I = {r['I']}, {kern} kernels, boundary reflect", "",
                  "| method | per iteration | voxel-it/s | / pair | notes |", "|---|---|---|---|---|"]

        def row(name, t, note="", r=r, pair=pair, lines=lines):
            lines.append(f"| {name} | {t * 1e3:.0f} ms | {r['n_vox'] / t / 1e6:.1f} M | "
                         f"{t / pair:.2f} | {note} |")

        row("pair: apply + adjoint", pair, "the operator's cost per RL iteration")
        row("pcmx.restore rl, in memory", r["restore"],
            "target 1.3: " + ("met" if r["restore"] / pair <= TARGET else "NOT met"))
        row("richardson_lucy_tv (lam=0), in place", r["rl_tv"],
            "target 1.3: " + ("met" if r["rl_tv"] / pair <= TARGET else "NOT met"))
        row("the same loop before (a temporary per operation)", r["rl_before"],
            f"A/B: in place saves {(r['rl_before'] - r['rl_tv']) * 1e3:.0f} ms "
            f"({(1 - r['rl_tv'] / r['rl_before']) * 100:.0f}%)")
        row("invariant FFT RL (one kernel, 4 FFTs)", r["invariant"],
            f"space variation costs {r['restore'] / r['invariant']:.1f}x (restore rl / this)")
        peer = r.get("peer")
        if peer and "error" not in peer:
            t = r["invariant"] * peer["peer"] / peer["invariant"]
            row(f"{peer['version']}, invariant", t,
                f"timed in its own process alternately with the invariant FFT RL: "
                f"{peer['peer'] / peer['invariant']:.2f}x it ({peer['peer'] * 1e3:.0f} ms there); "
                "scipy.fft.set_workers(-1)")
        elif peer:
            lines.append(f"| peer | - | - | - | failed: {peer['error']} |")
        if "tiled" in r:
            tiles = "x".join(map(str, r["chunks"]))
            halo = "x".join(map(str, r["halo"]))
            lines += ["", f"Tiled ({r['tiled_iter']} iterations, whole runs, threads, tiles {tiles}, "
                      f"default halo {halo}; the first tiled call, which computes the kernel "
                      f"spectra of each window shape, took {r['cold']['tiled']:.2f} s, "
                      f"{r['cold']['tiled_halo0']:.2f} s with halo 0):", "",
                      "| run | wall | voxel-it/s | / in memory | notes |", "|---|---|---|---|---|"]
            mem = r["memory_whole"]
            for name, key, note in (
                    ("in memory", "memory_whole", ""),
                    ("tiled, default halo", "tiled",
                     f"target 1.3: {'met' if r['tiled'] / mem <= TARGET else 'NOT met'}; the "
                     f"windows (tiles + halo) hold {r['window_ratio']:.2f}x the image's pixels"),
                    ("tiled, halo 0 (not exact: the per-tile overhead alone)", "tiled_halo0", "")):
                t = r[key]
                lines.append(f"| {name} | {t:.2f} s | {r['n_vox'] * r['tiled_iter'] / t / 1e6:.1f} M | "
                             f"{t / mem:.2f} | {note} |")
        lines += ["", f"CPU use during the runs: {r['cpu_share']:.2f} cores of {os.cpu_count()} "
                  "(user + system time of this process over wall time).", ""]
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

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


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
    from pcmx.restore import auto_chunks, default_halo, restore, restore_memory

    shape = tuple(args.big_shape)
    limit = int(args.memory_limit * 2**30)
    stack_bytes = 4 * int(np.prod(shape))
    print(f"cluster: stack {shape} ({stack_bytes / 1e9:.2f} GB), worker memory limit "
          f"{limit / 2**30:.2f} GiB", flush=True)
    h, maps = small_operator_3d(kernel=args.big_kernel, kernel_z=args.big_kernel_z)
    op = operator_3d(shape, h, maps, lazy=True)
    H = pcmx.ProductConvolution(op, boundary="reflect", check_finite=False)
    iters = args.big_iterations
    # a tile's budget: the worker's limit, less the maps' chunks it computes, the process's
    # own size and Dask's margin (it pauses at 80%)
    budget = int(limit * args.tile_share)
    tile = auto_chunks(shape, H, "rl", budget, iterations=iters) if args.big_chunks is None \
        else tuple(args.big_chunks)
    est = restore_memory(tile, H, "rl", iterations=iters)
    print(f"  tiles {tile}, restore_memory {est / 2**20:.0f} MiB (budget {budget / 2**20:.0f} MiB)",
          flush=True)
    scratch = args.scratch or tempfile.mkdtemp(prefix="pcmx-restore-bench-")
    src = os.path.join(scratch, "stack.zarr")
    t = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        write_stack(src, shape, (shape[0], 256, 256))
    write_s = time.perf_counter() - t
    print(f"  stack written in {write_s:.1f} s to {src}", flush=True)
    runs = []
    for n_workers in args.workers:
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
            restarts = sum(level in ("WARNING", "ERROR", "CRITICAL") and "memory" in str(m).lower()
                           for msgs in logs.values() for level, m in msgs)
        check = da.from_zarr(dst)
        sample = np.asarray(check[shape[0] // 2, ::97, ::97])
        run = {"workers": n_workers, "wall": wall, "per_iteration": wall / iters,
               "worker_peak": [sampler.peak[p] for p in pids], "client_peak": sampler.peak[os.getpid()],
               "total_peak": sampler.total, "warnings": restarts,
               "finite": bool(np.isfinite(sample).all()), "min": float(sample.min())}
        print(f"  {n_workers} worker(s): wall {wall:.1f} s, worker peaks "
              f"{[round(p / 2**20) for p in run['worker_peak']]} MiB, total {sampler.total / 2**20:.0f} MiB",
              flush=True)
        runs.append(run)
    return {"shape": shape, "limit": limit, "stack_bytes": stack_bytes, "tile": tile, "estimate": est,
            "iterations": iters, "kernel": H.kernel_shape, "I": H.n_components, "runs": runs,
            "write_s": write_s, "halo": default_halo(tuple(H.radius), iters)}


def cluster_lines(res, args) -> list[str]:
    shape = "x".join(map(str, res["shape"]))
    lines = ["### A stack larger than a worker's memory, on a local cluster", "",
             f"Measured by `benchmarks/restore.py --parts cluster` on {os.cpu_count()} cores "
             f"({platform.machine()}, shared), {time.strftime('%Y-%m-%d')}: a {shape} float32 stack "
             f"({res['stack_bytes'] / 1e9:.2f} GB) in a Zarr store, `pcmx.restore.restore(method='rl', "
             f"iterations={res['iterations']})` on a `dask.distributed` LocalCluster of worker "
             f"processes (one thread each, `memory_limit` {res['limit'] / 2**30:.2f} GiB each), "
             "written to a Zarr store. Operator: I = "
             f"{res['I']}, {'x'.join(map(str, res['kernel']))} kernels (the simulator's true "
             "operator of a 64 x 144 x 144 stack, maps stretched 16x over the field, computed "
             f"lazily), tiles {'x'.join(map(str, res['tile']))} (`pcmx.restore.auto_chunks`), "
             f"halo {res['halo']}; `restore_memory` per tile {res['estimate'] / 2**20:.0f} MiB. "
             "Peak memory: resident set sampled every 0.1 s (psutil).", "",
             "| workers | wall | per iteration | voxel-it/s | speed-up | peak per worker | peak, all processes | notes |",
             "|---|---|---|---|---|---|---|---|"]
    base = res["runs"][0]["wall"] if res["runs"] else None
    n_vox = int(np.prod(res["shape"]))
    for r in res["runs"]:
        peaks = ", ".join(f"{p / 2**20:.0f}" for p in r["worker_peak"])
        lines.append(f"| {r['workers']} | {r['wall']:.0f} s | {r['per_iteration']:.0f} s | "
                     f"{n_vox * res['iterations'] / r['wall'] / 1e6:.1f} M | {base / r['wall']:.2f} | "
                     f"{peaks} MiB | {r['total_peak'] / 2**20:.0f} MiB | "
                     f"result finite: {r['finite']}; worker memory messages: {r['warnings']} |")
    lines += ["", "Per iteration: wall / iterations (the set-up, `H^T 1` per tile and reading and "
              "writing the stores, included).", ""]
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
    p.add_argument("--shape3d", type=int, nargs=3, default=(32, 512, 512))
    p.add_argument("--chunks3d", type=int, nargs=3, default=(32, 256, 256))
    p.add_argument("--iterations", type=int, default=8, help="n2 of the per-iteration difference")
    p.add_argument("--tiled-iterations", type=int, default=10)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--setup-peers", action="store_true")
    p.add_argument("--quick", action="store_true", help="2 rounds, 2D only")
    p.add_argument("--big-shape", type=int, nargs=3, default=(64, 2304, 2304))
    p.add_argument("--big-kernel", type=int, default=25)
    p.add_argument("--big-kernel-z", type=int, default=11)
    p.add_argument("--big-iterations", type=int, default=3)
    p.add_argument("--big-chunks", type=int, nargs=3, default=None)
    p.add_argument("--memory-limit", type=float, default=1.0, help="GiB per worker")
    p.add_argument("--tile-share", type=float, default=0.5,
                   help="share of the worker's limit given to one tile by auto_chunks")
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
        res = part_cluster(args)
        lines = cluster_lines(res, args)
        print("\n".join(lines))
        if not args.no_doc:
            write_doc("cluster", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
