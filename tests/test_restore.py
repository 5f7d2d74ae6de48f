"""pcmx.restore: tiled restoration agrees with the in-memory run (issue 15, items 1-2, 2D)."""

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from pcmx.errors import InputError
from pcmx.operator import ProductConvolution
from pcmx.restore import TILED_TOLERANCE, default_halo, restore
from pcmx.simulate import simulate_point_sources, true_operator


@pytest.fixture(scope="module")
def case():
    """96 x 128 filament scene, its true operator (3 components, 15 x 15 kernels, r = 7)."""
    sc = simulate_point_sources((96, 128), n_sources=40, seed=3)
    op = ProductConvolution(true_operator(sc, kernel_size=15, n_components=3), boundary="reflect")
    return sc["image"].values.astype(np.float32), op


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_default_halo():
    assert default_halo(7, 1) == 21
    assert default_halo(7, 50) == 33
    assert default_halo(7, 100) == 35
    assert default_halo(7, 10**9) == 56  # capped at 8 r


@pytest.mark.parametrize("method", ["rl", "rl-tv"])
@pytest.mark.parametrize("chunks", [37, 50])
def test_tiled_matches_in_memory(case, method, chunks):
    img, op = case
    ref = restore(img, op, method=method, iterations=50)
    tiled = restore(img, op, method=method, iterations=50, chunks=chunks)
    assert isinstance(tiled, da.Array)
    out = tiled.compute()
    assert out.dtype == np.float32 and out.shape == img.shape
    # measured (halo 33 px): rl 2.8e-6 (37 px tiles), 3.7e-6 (50); rl-tv 7.5e-5, 7.6e-5
    assert _rel(out, ref) < TILED_TOLERANCE


def test_halo_matters(case):
    """Without a halo the tiles disagree with the whole image (measured 0.36 at 50 iterations)."""
    img, op = case
    ref = restore(img, op, iterations=50)
    assert _rel(restore(img, op, iterations=50, chunks=37, halo=0).compute(), ref) > 0.1


@pytest.mark.parametrize("method", ["tikhonov", "fista-haar", "sparse-smooth"])
def test_other_methods_tile(case, method):
    """Delegated, tiled: close to, not equal to, the whole image (measured 4.9e-2, 1.1e-1,
    9.8e-3 with the default 33 px halo: per-tile defaults, Haar transform, stopping rules)."""
    img, op = case
    ref = restore(img, op, method=method, iterations=30)
    assert isinstance(ref, np.ndarray) and ref.dtype == np.float32
    out = restore(img, op, method=method, iterations=30, chunks=50).compute()
    assert np.isfinite(out).all()
    assert _rel(out, ref) < 0.3


def test_dask_input_stays_lazy(case):
    img, op = case
    ref = restore(img, op, iterations=20)
    offset = float(np.percentile(img, 0.1))
    with dask.config.set(scheduler="sync"):
        lazy = restore(da.from_array(img, chunks=(40, 60)), op, iterations=20, chunks=37, offset=offset)
    assert isinstance(lazy, da.Array)
    ref_b = restore(img, op, iterations=20, offset=offset)  # measured 2.6e-6 apart
    assert _rel(lazy.compute(), ref_b) < TILED_TOLERANCE
    whole = restore(da.from_array(img, chunks=(40, 60)), op, iterations=20)
    assert isinstance(whole, da.Array)
    np.testing.assert_allclose(whole.compute(), ref, rtol=0, atol=1e-6 * float(np.abs(ref).max()))


def test_dataarray_in_dataarray_out(case):
    img, op = case
    arr = xr.DataArray(img, dims=("y", "x"), coords={"y": np.arange(96) * 0.065}, attrs={"units": "count"})
    out = restore(arr, op, iterations=10, chunks=50)
    assert isinstance(out, xr.DataArray) and out.dims == ("y", "x")
    assert out.attrs["method"] == "rl" and out.attrs["units"] == "count"
    assert _rel(out.values, restore(img, op, iterations=10)) < TILED_TOLERANCE


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "wiener"},
     "method='wiener': expected one of rl, rl-tv, tikhonov, fista-haar, sparse-smooth"),
    ({"iterations": 0}, "iterations=0 must be a positive integer"),
    ({"iterations": 2.5}, "iterations=2.5 must be a positive integer"),
    ({"chunks": 0}, "chunks=0 must be a positive integer (the tile edge in pixels) or None"),
    ({"chunks": "auto"}, "chunks='auto' must be a positive integer (the tile edge in pixels) or None"),
    ({"chunks": 32, "halo": -1}, "halo=-1 must be a non-negative integer or None"),
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
    ref = restore(img, d / "op.zarr", method="rl", iterations=20, chunks=40).compute()
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
    ref = restore(img, d / "op.zarr", method="sparse-smooth", iterations=30, chunks=50, offset=0.0).compute()
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
