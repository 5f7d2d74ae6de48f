import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import xarray as xr

import pcmx
from pcmx.cli import main
from pcmx.errors import InputError
from pcmx.units import parse_length, pixel_size


def test_info_describes_a_valid_store(tmp_path, operator_ds, capsys):
    pcmx.save_store(operator_ds, tmp_path / "op.zarr")
    assert main(["info", str(tmp_path / "op.zarr")]) == 0
    out = capsys.readouterr().out
    assert "kind: operator" in out and "validation: valid" in out
    assert "pixel size x: 65 nm" in out
    assert "psf_basis ('component', 'ky', 'kx') float32" in out


def test_info_json_and_invalid_store(tmp_path, operator_ds, capsys):
    path = tmp_path / "op.zarr"
    pcmx.save_store(operator_ds, path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["pcmx_schema_version"] = "7.1"
    (path / "zarr.json").write_text(json.dumps(meta))
    assert main(["info", "--json", str(path)]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] is False and "newer than" in out["status"]


def test_cli_error_is_one_line_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pcmx info: error: {tmp_path / 'nope.zarr'}: no such store"]


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "pcmx", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"pcmx {pcmx.__version__}"


@pytest.mark.parametrize("text, um", [("65nm", 0.065), ("0.108 um", 0.108), ("1.5 micrometer", 1.5)])
def test_parse_length(text, um):
    assert parse_length(text) == pytest.approx(um)


@pytest.mark.parametrize(
    "value, message",
    [(65, "has no unit"), ("65 s", "is not a length"), ("banana", "is not a length"), ("-3nm", "must be a positive")],
)
def test_parse_length_errors(value, message):
    with pytest.raises(InputError, match=message):
        parse_length(value)


def test_read_imagej_tiff_pixel_size(tmp_path):
    data = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30)
    f = tmp_path / "beads.tif"
    tifffile.imwrite(f, data, imagej=True, resolution=(1 / 0.065, 1 / 0.065), metadata={"unit": "um"})
    img = pcmx.read_image(f)
    assert img.dims == ("y", "x") and img.dtype == np.uint16
    assert pixel_size(img, "x") == pytest.approx(0.065, rel=1e-6)


def test_read_image_without_pixel_size_warns(tmp_path):
    f = tmp_path / "plain.tif"
    tifffile.imwrite(f, np.ones((8, 9), np.float32))
    with pytest.warns(pcmx.PcmxWarning, match="no pixel size in the file's metadata"):
        img = pcmx.read_image(f)
    assert img["x"].attrs["units"] == "pixel"
    img = pcmx.read_image(f, pixel_size="100nm")
    assert pixel_size(img, "y") == pytest.approx(0.1)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 1)])
def test_read_image_rejects_bad_shapes(tmp_path, shape):
    f = tmp_path / "bad.npy"
    np.save(f, np.zeros(shape))
    with pytest.raises(InputError, match="bad.npy: image"):
        pcmx.read_image(f, pixel_size="65nm")


def test_real_tiff_pixel_size(realdata):
    img = pcmx.read_image(realdata / "sample_zstack17.tif")
    assert pixel_size(img, "x") == pytest.approx(0.108, rel=0.01)
    stack = pcmx.read_image(sorted(realdata.glob("sample_zstack1[5-9].tif")))
    assert stack.dims == ("z", "y", "x") and stack.shape == (5, 512, 512)


def test_accessor_psf_at_and_validate(operator_ds):
    operator_ds.pcmx.validate()
    psf = operator_ds.pcmx.psf_at(y=0.0, x=0.0)
    expected = (operator_ds.coefficients[:, 0, 0] * operator_ds.psf_basis).sum("component")
    np.testing.assert_allclose(psf.values, expected.values, rtol=1e-6)
    psf_i = operator_ds.pcmx.psf_at(y=5, x=7, index=True)
    expected = np.einsum("i,ijk->jk", operator_ds.coefficients.values[:, 5, 7], operator_ds.psf_basis.values)
    np.testing.assert_allclose(psf_i.values, expected, rtol=1e-6)
    assert psf_i.dims == ("ky", "kx")


def test_family_coefficients_and_psf(operator_ds):
    rng = np.random.default_rng(1)
    spatial = xr.DataArray(rng.random((2, 32, 40)).astype(np.float32), dims=("mode", "y", "x"),
                           coords={k: operator_ds[k] for k in ("y", "x")})
    gamma = xr.DataArray(rng.random((4, 3, 2)).astype(np.float32), dims=("state", "component", "mode"),
                         coords={"state": ["a", "b", "c", "d"]})
    fam = xr.Dataset({"psf_basis": operator_ds.psf_basis, "spatial_basis": spatial, "gamma": gamma},
                     attrs={"pcmx_type": "family"})
    fam.pcmx.validate()
    c = fam.pcmx.coefficients(state="c")
    np.testing.assert_allclose(c.values, np.einsum("ij,jyx->iyx", gamma.values[2], spatial.values), rtol=1e-5)
    op = fam.pcmx.operator(state=2)
    op.pcmx.validate()
    np.testing.assert_allclose(fam.pcmx.psf_at(state=2, y=3, x=4, index=True).values,
                               op.pcmx.psf_at(y=3, x=4, index=True).values, rtol=1e-5)
