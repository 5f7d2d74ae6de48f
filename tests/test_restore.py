"""pcmx.restore: tiled restoration agrees with the in-memory run, 2D and 3D (issue 15, items 1-2)."""

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from pcmx.errors import InputError
from pcmx.operator import ProductConvolution
from pcmx.restore import (
    TILED_TOLERANCE,
    WORKER_OVERHEAD,
    auto_chunks,
    default_halo,
    restore,
    restore_memory,
)
from pcmx.simulate import simulate_point_sources, true_operator


@pytest.fixture(scope="module")
def case():
    """96 x 128 filament scene, its true operator (3 components, 15 x 15 kernels, r = 7)."""
    sc = simulate_point_sources((96, 128), n_sources=40, seed=3)
    op = ProductConvolution(true_operator(sc, kernel_size=15, n_components=3), boundary="reflect")
    return sc["image"].values.astype(np.float32), op


def make_case3d(shape=(16, 48, 40), seed=0):
    """A 3D operator (2 Gaussian components of 5 x 7 x 7, ``(rz, ry, rx) = (2, 3, 3)``, maps
    varying along z and x) and a bead stack blurred by it with Poisson noise."""
    from pcmx.model import operator_dataset
    from pcmx.units import kernel_coords, spatial_coords

    k = [np.arange(n) - n // 2 for n in (5, 7, 7)]
    kz, ky, kx = np.meshgrid(*k, indexing="ij")
    basis = np.stack([np.exp(-(kz / sz) ** 2 / 2 - (ky / sy) ** 2 / 2 - (kx / sx) ** 2 / 2)
                      for sz, sy, sx in ((1.0, 1.0, 1.0), (1.6, 1.8, 1.2))]).astype(np.float32)
    basis /= basis.sum(axis=(1, 2, 3), keepdims=True)
    zz, _, xx = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    t = 0.6 * xx + 0.4 * zz
    coeffs = np.stack([1 - t, t]).astype(np.float32)
    size = (0.3, 0.1, 0.1)
    ds = operator_dataset(
        xr.DataArray(basis, dims=("component", "kz", "ky", "kx"),
                     coords={"component": [0, 1], **kernel_coords((5, 7, 7), size)}),
        xr.DataArray(coeffs, dims=("component", "z", "y", "x"),
                     coords={"component": [0, 1], **spatial_coords(shape, size)}))
    op = ProductConvolution(ds, boundary="reflect")
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, np.float32)
    idx = tuple(rng.integers(0, n, 60) for n in shape)
    truth[idx] = rng.uniform(300, 1000, 60)
    img = rng.poisson(op.apply(truth) + 10.0).astype(np.float32)
    return img, op


@pytest.fixture(scope="module")
def case3d():
    return make_case3d()


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_default_halo():
    assert default_halo(7, 1) == 21
    assert default_halo(7, 50) == 33
    assert default_halo(7, 100) == 35
    assert default_halo(7, 10**9) == 56  # capped at 8 r
    assert default_halo((2, 3, 3), 20) == (9, 13, 13)  # per axis
    assert default_halo((0, 7, 7), 50) == (0, 33, 33)  # one-plane kernels: no halo along z


def test_rl_in_memory_is_the_baselines_update(case):
    """restore's rl and rl-tv are pcmx.deblur.richardson_lucy_tv (one implementation, 2D and 3D)."""
    from pcmx.deblur import richardson_lucy_tv

    img, op = case
    np.testing.assert_array_equal(restore(img, op, method="rl", iterations=20),
                                  richardson_lucy_tv(img, op, lam=0.0, n_iter=20))
    np.testing.assert_array_equal(restore(img, op, method="rl-tv", iterations=20),
                                  richardson_lucy_tv(img, op, lam=0.002, n_iter=20))


@pytest.mark.parametrize("method", ["rl", "rl-tv"])
@pytest.mark.parametrize("chunks", [37, (50, 45)])
def test_tiled_matches_in_memory(case, method, chunks):
    img, op = case
    ref = restore(img, op, method=method, iterations=50)
    out = restore(img, op, method=method, iterations=50, chunks=chunks)
    assert isinstance(out, np.ndarray)  # NumPy in, NumPy out (computed here)
    assert out.dtype == np.float32 and out.shape == img.shape
    # measured (halo 33 px): rl 2.6e-6 (37 px tiles), 3.6e-6 (50 x 45); rl-tv 1.4e-4, 6.3e-5
    assert _rel(out, ref) < TILED_TOLERANCE


def test_halo_matters(case):
    """Without a halo the tiles disagree with the whole image (measured 0.36 at 50 iterations)."""
    img, op = case
    ref = restore(img, op, iterations=50)
    assert _rel(restore(img, op, iterations=50, chunks=37, halo=0), ref) > 0.1


@pytest.mark.parametrize("method", ["tikhonov", "fista-haar", "sparse-smooth"])
def test_other_methods_tile(case, method):
    """Delegated, tiled: close to, not equal to, the whole image (measured 4.9e-2, 1.1e-1,
    9.8e-3 with the default 33 px halo: per-tile defaults, Haar transform, stopping rules)."""
    img, op = case
    ref = restore(img, op, method=method, iterations=30)
    assert isinstance(ref, np.ndarray) and ref.dtype == np.float32
    out = restore(img, op, method=method, iterations=30, chunks=50)
    assert np.isfinite(out).all()
    assert _rel(out, ref) < 0.3


def test_dask_input_stays_lazy(case):
    img, op = case
    offset = float(np.percentile(img, 0.1))
    ref = restore(img, op, iterations=20, offset=offset)
    with dask.config.set(scheduler="sync"):
        lazy = restore(da.from_array(img, chunks=(40, 60)), op, iterations=20, chunks=37, offset=offset)
    # tiles of 37 px, the last ones widened to the 31 px halo
    assert isinstance(lazy, da.Array) and lazy.chunks == ((37, 59), (37, 37, 54))
    assert _rel(lazy.compute(), ref) < TILED_TOLERANCE  # measured 2.2e-6
    # chunks=None: the tiles are the Dask array's own chunks (odd ones: 41 x 57)
    own = restore(da.from_array(img, chunks=(41, 57)), op, iterations=20, offset=offset)
    assert isinstance(own, da.Array) and own.chunks == ((41, 55), (57, 40, 31))
    assert _rel(own.compute(), ref) < TILED_TOLERANCE  # measured 2.1e-6


def test_dataarray_in_dataarray_out(case):
    img, op = case
    arr = xr.DataArray(img, dims=("y", "x"), coords={"y": np.arange(96) * 0.065}, attrs={"units": "count"})
    out = restore(arr, op, iterations=10, chunks=50)
    assert isinstance(out, xr.DataArray) and out.dims == ("y", "x")
    assert out.attrs["method"] == "rl" and out.attrs["units"] == "count"
    assert _rel(out.values, restore(img, op, iterations=10)) < TILED_TOLERANCE


def test_spectra_computed_once_per_tile_shape(case):
    """Tiles share the operator's kernels: one forward and one conjugate spectrum per FFT
    shape of a window, not per tile or per iteration (plus the whole image's, for the
    ``H^T 1`` of the start)."""
    from scipy.fft import next_fast_len

    from pcmx.execution import spectrum_cache
    from pcmx.operator import clear_cache

    img, op = case
    clear_cache()
    restore(img, op, iterations=5, chunks=32, halo=10)
    shapes = {(next_fast_len(96 + 14), next_fast_len(128 + 14, real=True))}
    for y0 in range(0, 96, 32):
        for x0 in range(0, 128, 32):
            w = (min(y0 + 42, 96) - max(y0 - 10, 0), min(x0 + 42, 128) - max(x0 - 10, 0))
            shapes.add((next_fast_len(w[0] + 14), next_fast_len(w[1] + 14, real=True)))
    assert len(shapes) == 5 and len(spectrum_cache) == 2 * len(shapes)  # 12 tiles


def test_progress_bar_over_tiles(case, capsys):
    img, op = case
    restore(img, op, iterations=2, chunks=64, halo=8, progress=True)
    err = capsys.readouterr().err
    assert "restore (rl)" in err and "4/4" in err and "tile" in err
    restore(img, op, iterations=2, chunks=64, halo=8)  # the option progress: off by default
    assert capsys.readouterr().err == ""


# -- 3D -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rl", "rl-tv"])
def test_tiled_3d_matches_in_memory(case3d, method):
    img, op = case3d
    ref = restore(img, op, method=method, iterations=20)
    assert ref.shape == (16, 48, 40) and ref.dtype == np.float32
    out = restore(img, op, method=method, iterations=20, chunks=(7, 17, 13))  # halos (9, 13, 13)
    assert _rel(out, ref) < TILED_TOLERANCE  # measured: rl 2.5e-6, rl-tv 2.3e-6
    # measured 0.16 for both without a halo
    assert _rel(restore(img, op, method=method, iterations=20, chunks=(7, 17, 13), halo=0), ref) > 1e-2


def test_3d_lazy_from_zarr(case3d, tmp_path):
    """A stack read lazily from Zarr, tiled by the store's chunks (odd ones), stays lazy."""
    import zarr

    img, op = case3d
    z = zarr.open_array(str(tmp_path / "stack.zarr"), mode="w", shape=img.shape, chunks=(9, 25, 21),
                        dtype="float32")
    z[:] = img
    lazy = restore(da.from_zarr(str(tmp_path / "stack.zarr")), op, iterations=20, offset=10.0)
    # the store's chunks, widened to the halo (9, 13, 13) where they were narrower
    assert isinstance(lazy, da.Array) and lazy.chunks == ((16,), (25, 23), (21, 19))
    ref = restore(img, op, iterations=20, offset=10.0)
    assert _rel(lazy.compute(), ref) < TILED_TOLERANCE  # measured 1.9e-6
    arr = xr.DataArray(img, dims=("z", "y", "x"))
    out = restore(arr, op, iterations=20, chunks=(9, 25, 21), offset=10.0)
    assert isinstance(out, xr.DataArray) and out.dims == ("z", "y", "x")
    assert _rel(out.values, ref) < TILED_TOLERANCE


def test_3d_other_methods_refused(case3d):
    img, op = case3d
    with pytest.raises(InputError) as err:
        restore(img, op, method="tikhonov")
    assert str(err.value) == "method='tikhonov' restores 2D (y, x) images only; 3D (z, y, x) stacks: rl or rl-tv"


def test_3d_bad_arguments(case3d, case):
    img, op = case3d
    cases = [
        ({"chunks": (8, 16)}, "chunks=(8, 16): expected 3 values, one per axis ('z', 'y', 'x'), got 2"),
        ({"chunks": (8, 0, 16)}, "chunks=(8, 0, 16) must be a positive integer or a tuple of 3 positive "
         "integers (the tile edge per axis, in pixels), 'auto' or None"),
        ({"chunks": 8, "halo": (1, 2)}, "halo=(1, 2): expected 3 values, one per axis ('z', 'y', 'x'), got 2"),
        ({"chunks": 8, "halo": (1, -2, 2)}, "halo=(1, -2, 2) must be a non-negative integer or a tuple of 3 "
         "non-negative integers (pixels added on each side of a tile, per axis) or None"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError) as err:
            restore(img, op, **kwargs)
        assert str(err.value) == message
    with pytest.raises(InputError) as err:
        restore(img[0], op)
    assert str(err.value) == ("image: expected a 3D image ('z', 'y', 'x') for the operator's grid "
                              "(16, 48, 40), got shape (48, 40)")
    with pytest.raises(InputError) as err:
        restore(img[:, :40], op)
    assert str(err.value) == "image: shape (16, 40, 40) does not match the operator's grid (16, 48, 40)"
    with pytest.raises(InputError) as err:
        restore(case[0], op)
    assert str(err.value).startswith("image: expected a 3D image")


# -- memory ------------------------------------------------------------------------------------
def test_restore_memory_formula(case3d):
    """4 (k V + I V_e + 5 P + 2 I P) bytes: checked by hand for one 3D tile."""
    from scipy.fft import next_fast_len

    img, op = case3d
    # tile (8, 20, 20), default halo at 50 iterations (10, 15, 15): window (16, 48, 40) clipped
    w = (16, 48, 40)
    v, v_e = 16 * 48 * 40, 20 * 54 * 46
    p = next_fast_len(20) * next_fast_len(54) * next_fast_len(46, real=True)
    assert restore_memory((8, 20, 20), op, "rl") == 4 * (7 * v + 2 * v_e + 5 * p + 4 * p)
    assert restore_memory((8, 20, 20), op, "rl-tv") == 4 * (12 * v + 2 * v_e + 5 * p + 4 * p)
    assert restore_memory(4, op, "rl", halo=0) < restore_memory(8, op, "rl", halo=0)
    assert w == img.shape


def test_restore_memory_bounds_a_tiles_peak(case):
    """The formula against tracemalloc's peak for one tile (measured 0.92 for rl, 0.86 for
    rl-tv: FFT scratch is not traced, the formula rounds up)."""
    import tracemalloc

    from pcmx.operator import clear_cache
    from pcmx.restore import _run, local_operator

    img, op = case
    window = (slice(10, 86), slice(20, 110))  # a 26 x 56 tile grown by a 25 px halo
    kw = {"offset": 10.0, "eps": 1.0, "start": 1.0}
    _run("rl", img[window], local_operator(op, window), 2, kw)  # FFT plans, imports
    for method in ("rl", "rl-tv"):
        clear_cache()
        tracemalloc.start()
        _run(method, np.array(img[window]), local_operator(op, window), 2, kw)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        formula = restore_memory((26, 40), op, method, halo=25)
        assert 0.75 * formula < peak <= formula


def test_auto_chunks(case):
    img, op = case
    k = WORKER_OVERHEAD  # a tile fits when k x its counted memory does
    whole = restore_memory(img.shape, op, "rl")
    assert auto_chunks(img.shape, op, "rl", int(k * whole) + 1) == img.shape
    budget = int(k * restore_memory(40, op, "rl", halo=10)) + 1
    t = auto_chunks(img.shape, op, "rl", budget, halo=10)
    assert t == (40, 40)  # the largest edge within the budget
    assert k * restore_memory(t, op, "rl", halo=10) <= budget < k * restore_memory(41, op, "rl", halo=10)
    out = restore(img, op, iterations=10, chunks="auto", halo=10, memory_limit=budget)
    np.testing.assert_array_equal(out, restore(img, op, iterations=10, chunks=40, halo=10))
    with pytest.raises(InputError, match=r"memory_limit=1000: the smallest tile \(20 px, halo \(10, 10\)\) needs"):
        auto_chunks(img.shape, op, "rl", 1000, halo=10)


def test_a_halo_longer_than_an_axis_spans_it(case):
    """An axis shorter than the halo becomes one chunk (its windows span it), no Dask error."""
    img, op = case
    ref = restore(img, op, iterations=5)
    out = restore(img, op, iterations=5, chunks=(img.shape[0], 40), halo=(img.shape[0] + 7, 20))
    assert float(np.abs(out - ref).max() / ref.max()) < TILED_TOLERANCE


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "wiener"},
     "method='wiener': expected one of rl, rl-tv, tikhonov, fista-haar, sparse-smooth"),
    ({"iterations": 0}, "iterations=0 must be a positive integer"),
    ({"iterations": 2.5}, "iterations=2.5 must be a positive integer"),
    ({"chunks": 0}, "chunks=0 must be a positive integer or a tuple of 2 positive integers "
     "(the tile edge per axis, in pixels), 'auto' or None"),
    ({"chunks": "big"}, "chunks='big' must be a positive integer or a tuple of 2 positive integers "
     "(the tile edge per axis, in pixels), 'auto' or None"),
    ({"chunks": 32, "halo": -1}, "halo=-1 must be a non-negative integer or a tuple of 2 non-negative "
     "integers (pixels added on each side of a tile, per axis) or None"),
    ({"lam": 0.1}, "lam: method 'rl' has no TV weight; use method='rl-tv'"),
])
def test_bad_arguments(case, kwargs, message):
    img, op = case
    with pytest.raises(InputError) as err:
        restore(img, op, **kwargs)
    assert str(err.value) == message


def test_bad_image(case):
    img, op = case
    with pytest.raises(InputError, match=r"image: shape \(96, 96\) does not match the operator's grid \(96, 128\)"):
        restore(img[:, :96], op)
    periodic = ProductConvolution(op.dataset, boundary="periodic")
    with pytest.raises(InputError, match="chunks: a tiled restoration needs boundary"):
        restore(img, periodic, chunks=40)


# -- the command line: pcmx deblur --method/--iterations/--chunks (issue 15) ----------------------
@pytest.fixture(scope="module")
def cli_case(case, tmp_path_factory):
    """The scene as a TIFF and its operator as a store."""
    import pcmx
    from pcmx.io.tiff import write_tiff

    img, op = case
    d = tmp_path_factory.mktemp("restore-cli")
    write_tiff(d / "scene.tif", img, 0.065)
    pcmx.save_store(op.dataset, d / "op.zarr")
    return d, img


def test_pcmx_restore_is_the_module():
    import importlib

    import pcmx

    assert pcmx.restore is importlib.import_module("pcmx.restore")
    assert pcmx.restore.restore is restore and "restore" in pcmx.__all__


def test_cli_rl_tiled_matches_python(cli_case, case, tmp_path, capsys):
    import tifffile

    from pcmx.cli import main

    d, img = cli_case
    out = tmp_path / "rl.tif"
    argv = ["deblur", str(d / "scene.tif"), "--operator", str(d / "op.zarr"), "--method", "rl",
            "--iterations", "20", "--chunks", "40", "-o", str(out)]
    assert main(argv) == 0
    assert "rl, 20 iterations, tiles of 40 px" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rl.tif"]  # no _sparse/_smooth
    got = tifffile.imread(out)
    assert got.dtype == np.float32 and got.shape == img.shape
    ref = restore(img, d / "op.zarr", method="rl", iterations=20, chunks=40)
    assert _rel(got, ref) < 2e-4
    # and, tiled, within the stated tolerance of the whole image in memory
    assert _rel(got, restore(img, case[1], iterations=20)) < TILED_TOLERANCE
    # all-or-nothing, nothing replaced without --overwrite
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    np.testing.assert_array_equal(tifffile.imread(out), got)


def test_cli_sparse_smooth_chunks_writes_the_restored_image(cli_case, tmp_path, capsys):
    import tifffile

    from pcmx.cli import main

    d, img = cli_case
    out = tmp_path / "ss.tif"
    assert main(["deblur", str(d / "scene.tif"), "--operator", str(d / "op.zarr"), "--chunks", "50",
                 "--max-iter", "30", "--offset", "0", "-o", str(out)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ss.tif"]
    ref = restore(img, d / "op.zarr", method="sparse-smooth", iterations=30, chunks=50, offset=0.0)
    assert _rel(tifffile.imread(out), ref) < 2e-4


def test_cli_family_identifies_then_restores(tmp_path, capsys):
    """--family with another method: the operator identified as plain deblur does, then
    Tikhonov (the random test family has negative PSF values: no Richardson-Lucy)."""
    import tifffile
    from conftest import make_family

    import pcmx
    from pcmx.cli import main
    from pcmx.deblur import identify_operator
    from pcmx.io.tiff import write_tiff

    yy, xx = np.mgrid[:96, :96].astype(np.float64)
    img = np.full((96, 96), 100.0)
    for cy in range(16, 88, 20):
        for cx in range(16, 88, 20):
            img += 2000 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.5**2))
    img = np.random.default_rng(0).poisson(img).astype(np.uint16)
    write_tiff(tmp_path / "beads.tif", img, 0.065)
    pcmx.save_store(make_family(shape=(96, 96), ksize=7, pixel_size=0.065), tmp_path / "fam.zarr")
    out = tmp_path / "tk.tif"
    assert main(["deblur", str(tmp_path / "beads.tif"), "--family", str(tmp_path / "fam.zarr"), "--method", "tikhonov",
                 "--iterations", "10", "-o", str(out)]) == 0
    assert "operator identified from" in capsys.readouterr().out
    image = pcmx.read_image(tmp_path / "beads.tif").load()
    ident = identify_operator(image, pcmx.open_store(tmp_path / "fam.zarr", kind="family"))
    ref = restore(image.values, ident.operator, method="tikhonov", iterations=10)
    assert _rel(tifffile.imread(out), ref) < 2e-4


def test_cupy_stays_on_the_device(case3d):
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (no GPU here)")
    from pcmx import _backend

    if not _backend.cupy_available():
        pytest.skip("CuPy sees no CUDA device")
    img, op = case3d
    ref = restore(img, op, iterations=10)
    whole = restore(cupy.asarray(img), op, iterations=10)
    assert isinstance(whole, cupy.ndarray)
    tiled = restore(cupy.asarray(img), op, iterations=10, chunks=(7, 17, 13))
    assert isinstance(tiled, cupy.ndarray)
    lazy = restore(da.from_array(cupy.asarray(img), chunks=(8, 24, 20)), op, iterations=10)
    assert _backend.is_cupy(lazy)
    out = lazy.compute()
    assert isinstance(out, cupy.ndarray)
    for got in (whole, tiled, out):
        assert _rel(cupy.asnumpy(got), ref) < 1e-3
