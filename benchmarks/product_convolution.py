"""Benchmark of the product-convolution engine (issue 4) against its FFT lower bound and peers.

Measures, in one run, the median of ``--repeat`` applications of ``H u`` on a 2304 x 2304
image with I = 5 components and 65 x 65 kernels, and on a 21 x 512 x 512 stack with
21 x 65 x 65 kernels:

* ``pcmx``: :class:`pcmx.ProductConvolution` in memory (``apply``; ``adjoint`` too);
* ``pcmx tiled``: the same on Dask tiles (threaded scheduler, automatic chunks);
* ``bound``: the (I + 1) FFTs of one application, I forward real FFTs and one inverse at the
  same padded size with ``scipy.fft`` (all workers), nothing else;
* ``scipy.signal.fftconvolve`` once per component (with ``scipy.fft.set_workers(-1)``);
* deepinv's ``SpaceVaryingBlur`` (``use_fft=True``, CPU, all threads) and pylops'
  ``NonStationaryConvolve2D`` (numba engine; a 3 x 3 grid of PSFs interpolated bilinearly),
  run in their own environment, ``benchmarks/.venv-peers`` (``--setup-peers`` makes it).

Every method runs in a fresh subprocess that also times the bound, interleaved with the
method, so each ratio compares two timings taken under the same machine load. The memory
peak is the growth of the subprocess's resident set (``VmHWM``) from just before the
method's setup (inputs already allocated) to the end of two applications. The table is
printed and written to ``docs/performance.md`` between the ``product_convolution`` markers.

Usage::

    python benchmarks/product_convolution.py --setup-peers   # once: the peers' venv
    .venv/bin/python benchmarks/product_convolution.py [--repeat 7] [--quick] [--no-peers]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, ".venv-peers")
PEERS_PYTHON = os.path.join(PEERS, "bin", "python")
DOC = os.path.join(ROOT, "docs", "performance.md")
BEGIN, END = "<!-- product_convolution:begin -->", "<!-- product_convolution:end -->"

CASES = {
    "2d": {"shape": (2304, 2304), "ksize": (65, 65), "I": 5},
    "3d": {"shape": (21, 512, 512), "ksize": (21, 65, 65), "I": 5},
}
# The peers' environment. deepinv imports torchvision, and PyPI's torchvision does not load
# beside the CPU build of torch 2.13.0 that lies on these machines; torch 2.14.1 and
# torchvision 0.29.1 both lie on disk too, so nothing is downloaded (see docs/performance.md).
PEER_SETUP = [
    [sys.executable, "-m", "venv", PEERS],
    [os.path.join(PEERS, "bin", "pip"), "install", "torch==2.14.1", "torchvision==0.29.1"],
    [os.path.join(PEERS, "bin", "pip"), "install", "deepinv", "pylops", "numba", "numpy", "scipy"],
]


# --------------------------------------------------------------------------------------------
# Inputs: the same arrays in every process (no pcmx needed, so peers' workers can build them)
# --------------------------------------------------------------------------------------------
def make_case(case: str, seed: int = 0):
    """Image ``u``, kernels ``h`` (I, *ksize) and smooth maps ``a`` (I, *shape), float32."""
    spec = CASES[case]
    shape, ksize, n_comp = spec["shape"], spec["ksize"], spec["I"]
    rng = np.random.default_rng(seed)
    axes = [np.arange(k, dtype=np.float32) - k // 2 for k in ksize]
    grid = np.meshgrid(*axes, indexing="ij", sparse=True)
    h = np.empty((n_comp, *ksize), np.float32)
    for i in range(n_comp):
        widths = rng.uniform(1.5, 6.0, len(ksize))
        g = np.exp(-sum((x / w) ** 2 for x, w in zip(grid, widths, strict=True)) / 2)
        h[i] = g / g.sum()
    coords = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape],
                         indexing="ij", sparse=True)
    a = np.empty((n_comp, *shape), np.float32)
    for i in range(n_comp):
        a[i] = 1.0 / n_comp
        for c in coords:
            a[i] += np.float32(rng.uniform(-0.1, 0.1)) * c
    u = rng.random(shape, dtype=np.float32)
    return u, h, a


def fft_bound(u, ksize, n_comp):
    """(I + 1) FFTs at pcmx's padded size: I forward real FFTs and one inverse, all workers."""
    import scipy.fft

    last = u.ndim - 1
    shape = tuple(scipy.fft.next_fast_len(n + k // 2, real=ax == last)
                  for ax, (n, k) in enumerate(zip(u.shape, ksize, strict=True)))
    buf = np.zeros(shape, np.float32)
    buf[tuple(slice(0, n) for n in u.shape)] = u
    spec = scipy.fft.rfftn(buf, workers=-1)

    def run():
        for _ in range(n_comp):
            scipy.fft.rfftn(buf, workers=-1)
        scipy.fft.irfftn(spec, s=shape, workers=-1)

    return run, shape


# --------------------------------------------------------------------------------------------
# Methods (each returns a zero-argument callable and notes)
# --------------------------------------------------------------------------------------------
def _operator(h, a, boundary="zero"):
    import xarray as xr

    from pcmx.operator import ProductConvolution

    d = a.ndim - 1
    kd, sd = ("kz", "ky", "kx")[3 - d:], ("z", "y", "x")[3 - d:]
    ds = xr.Dataset({"psf_basis": (("component", *kd), h), "coefficients": (("component", *sd), a)},
                    attrs={"pcmx_type": "operator"})
    return ProductConvolution(ds, boundary=boundary)


def method_pcmx(u, h, a):
    H = _operator(h, a)
    return (lambda: H.apply(u)), {}


def method_pcmx_adjoint(u, h, a):
    H = _operator(h, a)
    return (lambda: H.adjoint(u)), {}


def method_pcmx_periodic(u, h, a):
    H = _operator(h, a, "periodic")
    return (lambda: H.apply(u)), {}


def method_pcmx_reflect(u, h, a):
    H = _operator(h, a, "reflect")
    return (lambda: H.apply(u)), {}


def method_pcmx_tiled(u, h, a):
    H = _operator(h, a)
    chunks = H.auto_chunks()
    return (lambda: H.apply(u, chunks=chunks)), {"chunks": "x".join(map(str, chunks))}


def method_fftconvolve(u, h, a):
    import scipy.fft
    import scipy.signal

    def run():
        with scipy.fft.set_workers(-1):
            out = scipy.signal.fftconvolve(a[0] * u, h[0], mode="same")
            for i in range(1, len(h)):
                out += scipy.signal.fftconvolve(a[i] * u, h[i], mode="same")
        return out

    return run, {}


def _deepinv(u, h, a, padding):
    import torch
    from deepinv.physics import SpaceVaryingBlur

    torch.set_num_threads(os.cpu_count() or 1)
    x = torch.from_numpy(u)[None, None]
    multipliers = torch.from_numpy(a)[None, None]
    ref = np.load(os.environ["PCMX_BENCH_REFERENCE"]) if "PCMX_BENCH_REFERENCE" in os.environ else None
    best = None
    for flip in (False, True):  # deepinv's convolution convention, checked on the interior
        filt = np.ascontiguousarray(h[:, ::-1, ::-1] if flip else h)
        phys = SpaceVaryingBlur(filters=torch.from_numpy(filt)[None, None], multipliers=multipliers,
                                padding=padding, use_fft=True)
        with torch.no_grad():
            y = phys.A(x)[0, 0].numpy()
        err = _interior_error(y, ref, h.shape[1:]) if ref is not None else float("nan")
        if best is None or err < best[0]:
            best = (err, phys)
        if ref is None:
            break
    phys = best[1]

    def run():
        with torch.no_grad():
            return phys.A(x)

    return run, {"interior_rel_diff": best[0], "torch": torch.__version__, "threads": torch.get_num_threads()}


def method_deepinv_reflect(u, h, a):
    return _deepinv(u, h, a, "reflect")


def method_deepinv_circular(u, h, a):
    return _deepinv(u, h, a, "circular")


def method_pylops(u, h, a):
    import pylops
    from pylops.signalprocessing import NonStationaryConvolve2D

    # pylops' model: a regular grid of PSFs, interpolated bilinearly at each pixel; its cost
    # (a direct convolution per pixel) does not depend on the grid, so 3 x 3 PSFs built from
    # the same kernels stand for the operator
    n = u.shape
    ih = [np.linspace(0, s - 1, 3).astype(int) for s in n]
    ih = [np.arange(3) * int(i[1]) for i in ih]
    grid = np.stack([np.stack([np.tensordot(a[:, y, x], h, axes=1) for x in ih[1]]) for y in ih[0]])
    op = NonStationaryConvolve2D(dims=n, hs=grid.astype(np.float32), ihx=ih[0], ihz=ih[1],
                                 engine="numba", dtype="float32")
    flat = u.ravel()
    return (lambda: op @ flat), {"pylops": pylops.__version__, "engine": "numba"}


METHODS = {
    "pcmx": (method_pcmx, "pcmx apply, in memory"),
    "pcmx-adjoint": (method_pcmx_adjoint, "pcmx adjoint, in memory"),
    "pcmx-tiled": (method_pcmx_tiled, "pcmx apply, Dask tiles (threads)"),
    "pcmx-periodic": (method_pcmx_periodic, "pcmx apply, periodic boundary, in memory"),
    "pcmx-reflect": (method_pcmx_reflect, "pcmx apply, reflect boundary, in memory"),
    "fftconvolve": (method_fftconvolve, "scipy.signal.fftconvolve per component"),
    "deepinv-circular": (method_deepinv_circular, "deepinv SpaceVaryingBlur (FFT, circular)"),
    "deepinv-reflect": (method_deepinv_reflect, "deepinv SpaceVaryingBlur (FFT, reflect)"),
    "pylops": (method_pylops, "pylops NonStationaryConvolve2D (numba)"),
}
PEER_METHODS = {"deepinv-circular", "deepinv-reflect", "pylops"}
# the peer computing the same boundary handling as a pcmx row (deepinv has no zero padding
# with an output the size of the input: its "valid" output is smaller)
SAME_BOUNDARY = {"pcmx-periodic": "deepinv-circular", "pcmx-reflect": "deepinv-reflect"}
SLOW = {"pylops": 3}  # repeats at most

PROSE = [
    "How to read it: *bound* is the cost of the (I + 1) FFTs one application needs, I forward",
    "real FFTs and one inverse at pcmx's padded size with `scipy.fft` on all cores and nothing",
    "else; it is timed in the same process as each method, alternately, so each ratio",
    "compares two timings taken under the same load (the machine is shared). *peer / this*",
    "divides the fastest other method's ratio by this row's. *Memory peak* is the growth of",
    "the process's resident set over the inputs (image, maps, kernels), caches included.",
    "",
    "* pcmx's in-memory apply can beat the bound: on a multi-core CPU it cuts the image into",
    "  one tile per core (each with a halo of the kernel radius) and runs each tile's FFTs on",
    "  one thread, which uses the cores better than the multi-threaded whole-image FFTs the",
    "  bound is made of. Within a tile the work is the bound's plus the products",
    "  `alpha_i . u` and the spectral multiply-accumulate (complex64, in place, fused in",
    "  cache-sized row blocks).",
    "* The Dask path adds the halo copies and the scheduling; its automatic tiles are one per",
    "  core here.",
    "* deepinv (`SpaceVaryingBlur(filters, multipliers, padding, use_fft=True)`) computes the",
    "  same operator: its output matches pcmx's away from the borders to the relative",
    "  difference in *interior_rel_diff*. It ran on torch 2.14.1 with torchvision 0.29.1",
    "  (deepinv imports torchvision, which does not load beside the CPU build of torch",
    "  2.13.0 on these machines; both lie on local disk, see `--setup-peers`).",
    "* pylops' `NonStationaryConvolve2D` models the blur differently (a regular grid of PSFs",
    "  interpolated bilinearly at each pixel, here 3 x 3 PSFs of the same operator) and",
    "  convolves directly, so its cost grows with the kernel area and not with I; its numba",
    "  engine was used (the numpy engine was 4.5x slower at 576 x 576).",
    "* `scipy.signal.fftconvolve` once per component (under `scipy.fft.set_workers(-1)`) pays",
    "  two forward FFTs and one inverse per component at its own padded size.",
    "* Boundaries differ in cost: pcmx's default (zero) pads to a fast size above n + r;",
    "  `periodic` computes circular convolutions at the image's own size (2304 = 2^8 3^2 is",
    "  a fast FFT size, smaller than the padded one, so it can run below the bound);",
    "  `reflect` pads by r on each side. deepinv's `circular` and `reflect` paddings are",
    "  the same operators as pcmx's `periodic` and `reflect`: the *same-boundary* column",
    "  compares like with like.",
]


def _interior_error(y, ref, ksize):
    """Relative max difference away from the borders (where boundary rules do not matter)."""
    m = tuple(slice(2 * k, -2 * k) for k in ksize)
    return float(np.abs(y[m] - ref[m]).max() / np.abs(ref[m]).max())


# --------------------------------------------------------------------------------------------
# Worker: one method in a fresh process
# --------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(method: str, case: str, repeat: int) -> dict:
    spec = CASES[case]
    u, h, a = make_case(case)
    reset = _reset_peak()
    rss0 = _status_kb("VmRSS")
    if not reset or rss0 is None:
        import resource

        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    fn, notes = METHODS[method][0](u, h, a)
    fn()  # warm-up: plans, caches, JIT
    first = time.perf_counter() - t0
    fn()
    peak = _status_kb("VmHWM") if reset else None
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bound, fshape = fft_bound(u, spec["ksize"], spec["I"])
    bound()
    times, bounds = [], []
    for _ in range(min(repeat, SLOW.get(method, repeat))):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
        bound()
        bounds.append(time.perf_counter() - t)
    return {"method": method, "case": case, "times": times, "bound": bounds,
            "first_s": first, "peak_mb": (peak - rss0) / 1024, "fft_shape": list(fshape), **notes}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def run_worker(method: str, case: str, repeat: int, python: str, env: dict) -> dict:
    cmd = [python, os.path.abspath(__file__), "--worker", method, "--case", case, "--repeat", str(repeat)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"method": method, "case": case, "error": tail[0][:200]}
    return json.loads(lines[-1])


def setup_peers() -> None:
    for cmd in PEER_SETUP:
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def _fmt_s(t: float) -> str:
    return f"{t * 1e3:.0f} ms" if t < 10 else f"{t:.1f} s"


def table(results: list[dict], case: str) -> list[str]:
    spec = CASES[case]
    rows = [r for r in results if r["case"] == case]
    ok = [r for r in rows if "error" not in r and "skipped" not in r]
    peers = [r for r in ok if r["method"] in PEER_METHODS | {"fftconvolve"}]
    fastest_peer = min(peers, key=lambda r: np.median(r["times"]) / np.median(r["bound"]), default=None)
    shape = "x".join(map(str, spec["shape"]))
    kern = "x".join(map(str, spec["ksize"]))
    fshape = ok[0]["fft_shape"] if ok else []
    out = [f"#### {shape}, I = {spec['I']}, {kern} kernels (padded FFT size {'x'.join(map(str, fshape))})", "",
           "| method | median | bound (same process) | / bound | peer / this | same-boundary peer / this | memory peak | notes |",
           "|---|---|---|---|---|---|---|---|"]
    by_method = {r["method"]: r for r in ok}
    for r in rows:
        label = METHODS[r["method"]][1]
        if "error" in r or "skipped" in r:
            out.append(f"| {label} | - | - | - | - | - | - | {r.get('error') or r.get('skipped')} |")
            continue
        t, b = float(np.median(r["times"])), float(np.median(r["bound"]))
        ratio = t / b
        vs = ""
        if fastest_peer is not None and r["method"].startswith("pcmx"):
            vs = f"{(np.median(fastest_peer['times']) / np.median(fastest_peer['bound'])) / ratio:.1f}x"
        same = ""
        twin = by_method.get(SAME_BOUNDARY.get(r["method"], ""))
        if twin is not None:
            same = f"{(np.median(twin['times']) / np.median(twin['bound'])) / ratio:.1f}x"
        notes = [f"{len(r['times'])} runs"]
        for key in ("chunks", "engine", "torch", "interior_rel_diff"):
            if key in r:
                value = r[key]
                notes.append(f"{key} {value:.1e}" if isinstance(value, float) else f"{key} {value}")
        if r["method"] in PEER_METHODS | {"fftconvolve"} or r["method"] == "pylops":
            notes.append(f"first call {_fmt_s(r['first_s'])}")
        out.append(f"| {label} | {_fmt_s(t)} | {_fmt_s(b)} | {ratio:.2f} | {vs} | {same} | {r['peak_mb']:.0f} MB | "
                   f"{', '.join(notes)} |")
    if fastest_peer is not None:
        out += ["", f"Fastest peer here: {METHODS[fastest_peer['method']][1]}. "
                "'peer / this' is that peer's ratio to the bound divided by this row's; "
                "'same-boundary peer / this' compares with the peer computing the same boundary "
                "handling (periodic: deepinv circular; reflect: deepinv reflect)."]
    return out


def write_doc(lines: list[str]) -> None:
    section = "\n".join([BEGIN, *lines, END])
    if os.path.exists(DOC):
        text = open(DOC).read()
    else:
        text = "# Performance\n\nMeasured by the scripts in `benchmarks/`; each writes its own section.\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(DOC, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2D only, 3 repeats, no pylops")
    parser.add_argument("--no-peers", action="store_true", help="skip deepinv and pylops")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/performance.md")
    parser.add_argument("--cases", default="2d,3d")
    parser.add_argument("--setup-peers", action="store_true", help=f"create {PEERS} and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.setup_peers:
        setup_peers()
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, args.case, args.repeat)))
        return 0

    repeat = 3 if args.quick else args.repeat
    cases = ["2d"] if args.quick else [c.strip() for c in args.cases.split(",")]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    have_peers = os.path.exists(PEERS_PYTHON) and not args.no_peers
    results = []
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}")
    for case in cases:
        ref_path = os.path.join(HERE, f".reference-{case}.npy")
        for method in METHODS:
            is_peer = method in PEER_METHODS
            if is_peer and (not have_peers or case != "2d" or (args.quick and method == "pylops")):
                why = ("2D operators only" if case != "2d" else
                       "peers not run (--no-peers, --quick or no benchmarks/.venv-peers)")
                if case != "2d":
                    why = ("deepinv's SpaceVaryingBlur is 2D only" if method.startswith("deepinv") else
                           "not run: NonStationaryConvolve3D convolves directly, 21x more taps "
                           "per voxel than 2D here (minutes per application at the 2D rate)")
                results.append({"method": method, "case": case, "skipped": why})
                continue
            if is_peer and not os.path.exists(ref_path):
                from pcmx.operator import ProductConvolution  # noqa: F401  (reference output)

                u, h, a = make_case(case)
                np.save(ref_path, _operator(h, a).apply(u))
            python = PEERS_PYTHON if is_peer else sys.executable
            run_env = {**env, "PCMX_BENCH_REFERENCE": ref_path} if is_peer else env
            print(f"  {case} {method} ...", end="", flush=True)
            r = run_worker(method, case, repeat, python, run_env)
            results.append(r)
            if "error" in r:
                print(f" error: {r['error']}")
            else:
                print(f" {_fmt_s(float(np.median(r['times'])))} (bound {_fmt_s(float(np.median(r['bound'])))}, "
                      f"{np.median(r['times']) / np.median(r['bound']):.2f}x), peak {r['peak_mb']:.0f} MB")
        if os.path.exists(ref_path):
            os.remove(ref_path)
    lines = [f"Measured by `benchmarks/product_convolution.py` on {os.cpu_count()} cores "
             f"({platform.machine()}, {time.strftime('%Y-%m-%d')}); medians of {repeat} runs "
             "(pylops: 3); each method in its own process with the bound timed alternately.", "",
             *PROSE, ""]
    for case in cases:
        lines += table(results, case) + [""]
    print()
    print("\n".join(lines))
    if not args.no_doc:
        write_doc(lines)
        print(f"wrote {os.path.relpath(DOC, ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
