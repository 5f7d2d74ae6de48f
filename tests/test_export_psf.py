"""pcmx export-psf, and the --group / --channel / --z-step options of the other commands."""

import numpy as np
import pytest
import tifffile
import zarr
from conftest import make_family, make_operator

import pcmx
from pcmx.cli import main
from pcmx.model import psf_at


@pytest.fixture
def op_store(tmp_path):
    path = tmp_path / "op.zarr"
    pcmx.save_store(make_operator(), path)
    return path


def test_export_psf_at_a_position_with_calibration(tmp_path, op_store, capsys):
    out = tmp_path / "psf.tif"
    assert main(["export-psf", str(op_store), "-o", str(out), "--y", "1.3", "--x", "1000 nm"]) == 0
    expected = psf_at(make_operator(), y=1.3, x="1000 nm").values
    np.testing.assert_allclose(tifffile.imread(out), expected, rtol=1e-6)
    img = pcmx.read_image(out)  # calibrated: no pixel-size warning
    assert pcmx.units.pixel_size(img, "x") == pytest.approx(0.065, rel=1e-4)
    assert "PSF at y=1.3" in capsys.readouterr().out


def test_export_psf_grid_and_centre(tmp_path, op_store):
    assert main(["export-psf", str(op_store), "-o", str(tmp_path / "g.tif"), "--grid", "3"]) == 0
    assert tifffile.imread(tmp_path / "g.tif").shape == (9, 7, 7)
    assert main(["export-psf", str(op_store), "-o", str(tmp_path / "c.tif")]) == 0
    assert tifffile.imread(tmp_path / "c.tif").shape == (7, 7)


def test_export_psf_family_state_and_errors(tmp_path, capsys):
    fam = tmp_path / "fam.zarr"
    pcmx.save_store(make_family(), fam)
    assert main(["export-psf", str(fam), "-o", str(tmp_path / "wet.tif"), "--state", "wet"]) == 0
    assert main(["export-psf", str(fam), "-o", str(tmp_path / "x.tif"), "--state", "nope"]) == 2
    assert "dry" in capsys.readouterr().err  # the known states are named
    assert main(["export-psf", str(fam), "-o", str(tmp_path / "x.tif"), "--state", "wet",
                 "--y", "100"]) == 2
    assert not (tmp_path / "x.tif").exists()
    assert main(["export-psf", str(fam), "-o", str(tmp_path / "wet.tif"), "--state", "wet"]) == 2
    assert "already exists" in capsys.readouterr().err


def _ome(path):
    root = zarr.open_group(path, mode="w-", zarr_format=3)
    root.attrs["ome"] = {"version": "0.5", "multiscales": [
        {"axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
         "datasets": [{"path": "0"}]}]}
    root.create_array("0", shape=(8, 8), dtype="uint16")
    return path


def test_info_lists_the_pcmx_groups_of_an_ome_zarr(tmp_path, capsys):
    image = _ome(tmp_path / "img.ome.zarr")
    assert main(["info", str(image)]) == 2
    assert "no pcmx store is inside it" in capsys.readouterr().err
    make_operator().pcmx.save(image, group="pcmx/operator")
    assert main(["info", str(image)]) == 0
    assert "pcmx/operator: operator" in capsys.readouterr().out
    assert main(["info", str(image), "--group", "pcmx/operator"]) == 0
    assert "kind: operator" in capsys.readouterr().out


def test_group_options_write_and_read_inside_an_ome_zarr(tmp_path, capsys):
    image = _ome(tmp_path / "img.ome.zarr")
    make_operator().pcmx.save(image, group="pcmx/operator")
    assert main(["export-psf", str(image), "--group", "pcmx/operator", "-o", str(tmp_path / "p.tif")]) == 0
    sample = tmp_path / "sample.npy"
    np.save(sample, np.ones((32, 40), np.float32))
    assert main(["apply", str(image), str(sample), "--group", "pcmx/operator",
                 "-o", str(tmp_path / "b.tif")]) == 0
    assert tifffile.imread(tmp_path / "b.tif").shape == (32, 40)
    assert main(["apply", str(image), str(sample), "--group", "pcmx/nope", "-o", str(tmp_path / "c.tif")]) == 2
    assert "no group 'pcmx/nope'" in capsys.readouterr().err
