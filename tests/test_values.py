"""Values, not only shapes (issue 13, defects 2-4): NaN inputs, checkpoints keyed by content,
non-finite stores, absurd pixel sizes, duplicate inputs, counts beyond what the data supports."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import tifffile
import xarray as xr
import zarr
from conftest import make_family, make_operator
from test_operator import dense_matrix, make_op

import pcmx
from pcmx.cli import main
from pcmx.errors import InputError, SchemaError
from pcmx.family import learn_family
from pcmx.io.readers import PcmxWarning
from pcmx.io.tiff import write_tiff
from pcmx.operator import ProductConvolution, blur
from pcmx.provenance import sha256_file
from pcmx.psf_basis import fit_psf_basis
from pcmx.simulate import simulate_beads
from pcmx.units import parse_length

HINT = ("; refused, since the FFTs would spread them over the output: pass nan='mask' "
        "(pcmx apply --nan mask) to treat them as missing data")


# --------------------------------------------------------------------------- NaN policy
def test_one_nan_pixel_in_256x256_is_refused_by_default():
    """The issue's case: one NaN pixel made 32768 output pixels NaN, silently."""
    H = ProductConvolution(make_op((256, 256), (7, 5)))
    u = np.ones((256, 256), np.float32)
    u[100, 37] = np.nan
    for run, name in ((H.apply, "u"), (H.adjoint, "v")):
        with pytest.raises(InputError) as err:
            run(u)
        assert str(err.value) == f"{name}: 1 NaN or infinite value (of 65536), the first at (y=100, x=37)" + HINT
    u[200, 3] = -np.inf
    image = xr.DataArray(u, dims=("y", "x"), attrs={"source": "img.tif"})
    with pytest.raises(InputError) as err:
        blur(image, H)
    assert str(err.value) == ("u (img.tif): 2 NaN or infinite values (of 65536), the first at "
                              "(y=100, x=37)" + HINT)
    with pytest.raises(InputError, match=r"^nan='zero': expected one of 'raise', 'mask'$"):
        H.apply(u, nan="zero")


def test_nan_mask_marks_only_the_kernel_support_of_the_missing_pixel():
    H = ProductConvolution(make_op((256, 256), (7, 5)))
    u = np.random.default_rng(0).random((256, 256)).astype(np.float32)
    u[100, 37] = np.nan
    out = H.apply(u, nan="mask")
    filled = H.apply(np.where(np.isnan(u), 0, u))
    reach = np.zeros((256, 256), bool)
    reach[97:104, 35:40] = True  # the 7 x 5 kernel around the pixel
    assert np.array_equal(np.isnan(out), reach)  # 35 pixels, not 32768
    np.testing.assert_array_equal(out[~reach], filled[~reach])
    back = blur(xr.DataArray(u, dims=("y", "x")), H, nan="mask")
    np.testing.assert_array_equal(back.values, out)


@pytest.mark.parametrize("boundary", ["zero", "reflect", "periodic"])
def test_nan_mask_is_exact_against_the_dense_operator(boundary):
    """Output NaN exactly where a missing pixel has a non-zero weight, elsewhere the result
    of the zero-filled image: apply and adjoint, in memory and tiled with Dask."""
    ds = make_op((19, 23), (7, 5))
    H = ProductConvolution(ds, boundary=boundary)
    mat = dense_matrix(ds, boundary)
    u = np.random.default_rng(1).standard_normal((19, 23)).astype(np.float32)
    u[3, 4], u[18, 0], u[10, 22] = np.nan, np.inf, np.nan
    missing = ~np.isfinite(u)
    filled = np.where(missing, 0, u).astype(np.float64).ravel()
    for adjoint in (False, True):
        a = mat.T if adjoint else mat
        expected = a @ filled
        expected[(a[:, missing.ravel()] != 0).any(axis=1)] = np.nan
        run = H.adjoint if adjoint else H.apply
        got = run(u, nan="mask")
        np.testing.assert_allclose(got.ravel(), expected, rtol=1e-4, atol=1e-4)
        lazy = run(da.from_array(u, chunks=(8, 9)), nan="mask")
        assert isinstance(lazy, da.Array)
        np.testing.assert_allclose(lazy.compute().ravel(), expected, rtol=1e-4, atol=1e-4)


def test_dask_input_is_checked_lazily_chunk_by_chunk_and_read_once():
    H = ProductConvolution(make_op((40, 36), (5, 5)))
    u = np.ones((40, 36), np.float32)
    u[25, 30] = np.nan
    reads = []

    def load(block, block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        reads.append((y0, x0))
        return u[y0:y1, x0:x1]

    lazy = da.zeros((40, 36), np.float32, chunks=(20, 18)).map_blocks(load, dtype=np.float32)
    out = H.apply(lazy)  # building the graph reads nothing
    assert reads == []
    with dask.config.set(scheduler="sync"), pytest.raises(InputError) as err:
        out.compute()
    assert str(err.value) == ("u: 1 NaN or infinite value (of 360 in the chunk y=20:40, x=18:36), "
                              "the first at (y=25, x=30)" + HINT)
    reads.clear()
    u[25, 30] = 1.0
    with dask.config.set(scheduler="sync"):
        np.testing.assert_allclose(H.apply(lazy).compute(), H.apply(u), rtol=1e-5, atol=1e-5)
    assert sorted(reads) == [(0, 0), (0, 18), (20, 0), (20, 18)]  # each chunk read once


def test_cli_apply_refuses_a_nan_pixel_and_writes_nothing(tmp_path, capsys):
    pcmx.save_store(make_op((256, 256), (7, 5)), tmp_path / "op.zarr")
    img = np.ones((256, 256), np.float32)
    img[5, 6] = np.nan
    write_tiff(tmp_path / "img.tif", img, 0.1)
    out = tmp_path / "blurred.tif"
    assert main(["apply", str(tmp_path / "op.zarr"), str(tmp_path / "img.tif"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "u (img.tif): 1 NaN or infinite value (of 65536), the first at (y=5, x=6)" in err
    assert not out.exists()


# --------------------------------------------------------------------------- values in stores
@pytest.mark.parametrize(
    "make, var, index, value, message",
    [
        (make_family, "gamma", (1, 2, 0), np.nan, "gamma contains 1 NaN or infinite value (of 18)"),
        (make_family, "spatial_basis", (0, 3, 4), np.inf, "spatial_basis contains 1 NaN or infinite value (of 384)"),
        (make_family, "psf_basis", (2, 1, 1), np.nan, "psf_basis contains 1 NaN or infinite value (of 75)"),
        (make_operator, "coefficients", (1, 2, 3), np.nan, "coefficients contains 1 NaN or infinite value (of 3840)"),
        (make_operator, "psf_basis", (0, 0, 0), -np.inf, "psf_basis contains 1 NaN or infinite value (of 147)"),
    ],
)
def test_validate_refuses_non_finite_values_in_memory(make, var, index, value, message):
    ds = make()
    ds[var].values[index] = value
    with pytest.raises(SchemaError) as err:
        pcmx.validate(ds, source="s.zarr")
    assert str(err.value) == f"s.zarr: {message}"


def test_nan_gamma_passed_validation_and_pcmx_info(tmp_path, capsys):
    """The issue's case: a store with NaN gamma was 'valid'. Stores are written valid, then
    damaged on disk (a bit flip, another tool)."""
    path = tmp_path / "fam.zarr"
    pcmx.save_store(make_family(), path)
    zarr.open_array(str(path / "gamma"), mode="r+")[0, 0, 0] = np.nan
    assert main(["info", str(path)]) == 2
    assert "validation: INVALID: " f"{path}: gamma contains 1 NaN or infinite value (of 18)" in capsys.readouterr().out
    with pytest.raises(SchemaError, match=r"gamma contains 1 NaN or infinite value \(of 18\)$"):
        pcmx.open_store(path)  # gamma is small: checked on every open


def test_lazily_opened_maps_are_read_by_validate_not_by_open_store(tmp_path, capsys):
    path = tmp_path / "op.zarr"
    pcmx.save_store(make_operator(), path)
    arr = zarr.open_array(str(path / "coefficients"), mode="r+")
    arr[2, 31, 39] = np.nan
    arr[0, 5, 5] = np.inf
    ds = pcmx.open_store(path)  # stays lazy: the maps are not read
    assert isinstance(ds["coefficients"].data, da.Array)
    with pytest.raises(SchemaError) as err:
        pcmx.validate(ds, source="op.zarr")
    assert str(err.value) == "op.zarr: coefficients contains 2 NaN or infinite values (of 3840)"
    assert pcmx.validate(ds, check_values=False) is ds
    assert pcmx.validate(ds, check_values="in-memory") is ds  # lazy maps left alone
    assert main(["info", str(path)]) == 2
    assert "coefficients contains 2 NaN or infinite values" in capsys.readouterr().out
    with pytest.raises(InputError, match="coefficients: 2 non-finite values"):
        ProductConvolution(ds)


def test_save_store_refuses_non_finite_maps_in_memory(tmp_path):
    ds = make_operator()
    ds["coefficients"].values[0, 0, 0] = np.nan
    with pytest.raises(SchemaError, match=r"coefficients contains 1 NaN or infinite value"):
        pcmx.save_store(ds, tmp_path / "op.zarr")
    assert not (tmp_path / "op.zarr").exists()


# --------------------------------------------------------------------------- pixel sizes
@pytest.mark.parametrize("value, shown", [("65 parsecs", "2.006e+24 µm"), ("0.5 nm", "0.5 nm"),
                                          ("1 mm", "1000 µm"), ("101 um", "101 µm")])
def test_pixel_size_outside_optical_microscopy_is_refused(value, shown):
    with pytest.raises(InputError) as err:
        parse_length(value)
    assert str(err.value) == (
        f"pixel_size={value!r} is {shown}, outside 1 nm to 100 µm, the pixel sizes of optical "
        "microscopy; check the unit, or pass allow_any=True, pcmx.set_options(any_pixel_size=True) "
        "or --any-pixel-size for other optics")
    assert parse_length(value, allow_any=True) > 0
    with pcmx.set_options(any_pixel_size=True):
        assert parse_length(value) > 0
    assert parse_length(value, name="wavelength") > 0  # the range is for pixel sizes only


def test_pixel_size_range_bounds_are_accepted():
    assert parse_length("1 nm") == pytest.approx(1e-3)
    assert parse_length("100 um") == pytest.approx(100.0)


def test_cli_pixel_size_65_parsecs_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", "-o", str(out), "--size", "64", "--beads", "3",
                 "--pixel-size", "65 parsecs"]) == 2
    err = capsys.readouterr().err
    assert "pixel_size='65 parsecs' is 2.006e+24 µm, outside 1 nm to 100 µm" in err
    assert not out.exists()
    # other optics: the override goes through to every parse of the pixel size
    sim = tmp_path / "sim2"
    assert main(["simulate", "-o", str(sim), "--size", "128", "--beads", "12"]) == 0
    image = sorted(sim.glob("*.tif"))[0]
    tifffile.imwrite(tmp_path / "plain.tif", tifffile.imread(image))  # no pixel size in the file
    image = tmp_path / "plain.tif"
    assert main(["learn", str(image), "-o", str(tmp_path / "op.zarr"), "--pixel-size", "65 parsecs",
                 "--any-pixel-size", "--no-validate"]) == 0
    assert pcmx.open_store(tmp_path / "op.zarr")["x"].attrs["units"] == "micrometer"


# --------------------------------------------------------------------------- counts
def _gaussian_patches(m, size=9, seed=0):
    rng = np.random.default_rng(seed)
    k = np.arange(size) - size // 2
    r2 = k[:, None] ** 2 + k[None, :] ** 2
    widths = rng.uniform(1.2, 1.8, m)
    p = np.exp(-r2[None] / (2 * widths[:, None, None] ** 2)) * 1000
    return (p + rng.normal(0, 1, p.shape)).astype(np.float32)


def test_n_components_beyond_the_patches_is_reduced_with_a_warning():
    with pytest.warns(PcmxWarning) as record:
        basis = fit_psf_basis(_gaussian_patches(12), 1000, r=3, outlier_sigma=np.inf)
    assert basis.sizes["component"] == 12
    assert [str(w.message) for w in record] == [
        "n_components=1000 reduced to 12: the PCA of 12 kept patches has at most 12 components"]


def test_n_components_beyond_the_support_is_reduced_with_a_warning():
    with pytest.warns(PcmxWarning) as record:
        basis = fit_psf_basis(_gaussian_patches(80, size=5), 1000, r=1.5, outlier_sigma=np.inf)
    n = basis.sizes["component"]
    assert n < 80
    assert [str(w.message) for w in record] == [
        f"n_components=1000 reduced to {n}: patches of {n} pixels within the PSF support (r_ext) "
        f"have at most {n} components"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_psf_basis(_gaussian_patches(80, size=5), n, r=1.5, outlier_sigma=np.inf)  # no warning


# --------------------------------------------------------------------------- family inputs
@pytest.fixture(scope="module")
def states(tmp_path_factory):
    """Three 256 x 256 acquisitions as TIFFs of one size, and the PSF radius to use."""
    d = tmp_path_factory.mktemp("states")
    sim = simulate_beads((256, 256), 45, states=3, photons=40000.0, min_separation=24, seed=11)
    paths = []
    for k in range(3):
        paths.append(d / f"s{k}.tif")
        write_tiff(paths[-1], sim["image"].isel(state=k).values, 0.065)
    return d, paths, sim


FAST = {"n_components": 3, "n_modes": 2, "psf_radius": 4, "workers": 1}


def test_duplicate_inputs_are_refused_naming_both(states, tmp_path):
    d, paths, sim = states
    with pytest.raises(InputError) as err:
        learn_family([paths[0], paths[1], paths[0]], **FAST)
    assert str(err.value) == (
        f"images[0] {str(paths[0])!r} and images[2] {str(paths[0])!r} are the same file: each "
        "acquisition may be given once (two states of one condition would skew the family)")
    copy = tmp_path / "copy.tif"
    shutil.copyfile(paths[1], copy)
    with pytest.raises(InputError) as err:
        learn_family([paths[0], paths[1], str(copy)], **FAST)
    assert str(err.value).startswith(
        f"images[1] {str(paths[1])!r} and images[2] {str(copy)!r} have the same content (SHA-256 "
        f"{sha256_file(copy)[:12]}...): each acquisition may be given once")
    a = sim["image"].isel(state=0).values
    with pytest.raises(InputError, match=r"^images\[0\] and images\[1\] have the same content"):
        learn_family([a, a.copy()], **FAST)
    lazy = da.from_array(a, chunks=64)
    with pytest.raises(InputError, match=r"^images\[0\] and images\[1\] are the same Dask array"):
        learn_family([lazy, lazy], **FAST)
    labelled = sim["image"].assign_coords(state=["dry", "wet", "dry"])
    with pytest.raises(InputError, match=r"^images: state labels must be distinct; 'dry' labels 2 states$"):
        learn_family(labelled, **FAST)


def test_files_of_one_name_in_two_folders_get_distinct_state_labels(states, tmp_path):
    d, paths, _ = states
    for sub, k in (("a", 0), ("b", 1)):
        (tmp_path / sub).mkdir()
        shutil.copyfile(paths[k], tmp_path / sub / "beads.tif")
    fam = learn_family([tmp_path / "a" / "beads.tif", tmp_path / "b" / "beads.tif"], **FAST)
    assert list(fam["state"].values) == ["a/beads.tif", "b/beads.tif"]
    assert [i["name"] for i in fam.attrs["pcmx_inputs"]] == ["a/beads.tif", "b/beads.tif"]
    assert fam["psf_basis"].shape[0] == 3
    assert ProductConvolution.from_family(fam, state="b/beads.tif").psf_at(128, 128).shape == (11, 11)


def test_checkpoint_is_keyed_by_content_not_size_and_mtime(states, tmp_path, monkeypatch):
    """The issue's case: another acquisition of the same size, its mtime kept, was resumed
    from the old file's maps while the provenance recorded the new file's SHA-256."""
    d, paths, _ = states
    work = [tmp_path / "s0.tif", tmp_path / "s1.tif"]
    for src, dst in zip(paths, work, strict=False):
        shutil.copyfile(src, dst)
    ckpt = tmp_path / "ck"
    hashed = []
    monkeypatch.setattr("pcmx.family.sha256_file", lambda p: hashed.append(p) or sha256_file(p))
    monkeypatch.setattr("pcmx.provenance.sha256_file", lambda p: pytest.fail("hashed twice"))
    first = learn_family(work, checkpoint=ckpt, **FAST)
    assert len(hashed) == 2  # each input once per run, the provenance reusing the digests
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert [i["sha256"] for i in manifest["inputs"]] == [i["sha256"] for i in first.attrs["pcmx_inputs"]]

    st = os.stat(work[1])
    shutil.copyfile(paths[2], work[1])  # another acquisition, same size
    os.utime(work[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(work[1]).st_size == st.st_size and os.stat(work[1]).st_mtime_ns == st.st_mtime_ns
    with pytest.raises(InputError) as err:
        learn_family(work, checkpoint=ckpt, **FAST)
    assert str(err.value) == (
        f"checkpoint {ckpt}: made by a run with different arguments or inputs (differs in: image "
        "s1.tif); remove it, or pass overwrite_checkpoint=True (--overwrite) to start afresh")
    fresh = learn_family(work, checkpoint=ckpt, overwrite_checkpoint=True, **FAST)
    assert fresh.attrs["pcmx_parameters"]["resumed"]["beads"] == 0
    assert fresh.attrs["pcmx_inputs"][1]["sha256"] == sha256_file(paths[2])
    assert not np.allclose(fresh["gamma"].values[1], first["gamma"].values[1])
