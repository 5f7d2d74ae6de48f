import numpy as np
import pytest
import tifffile

from pcmx.io.readers import PcmxWarning, read_image
from pcmx.io.tiff import write_tiff


def test_2d_round_trip_with_calibration(tmp_path):
    data = np.random.default_rng(0).random((40, 52), dtype=np.float32)
    path = tmp_path / "a.tif"
    assert write_tiff(path, data, 0.065) == str(path)
    assert [p.name for p in tmp_path.iterdir()] == ["a.tif"]  # no temporary sibling left
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert tif.imagej_metadata["unit"] == "um" and "spacing" not in tif.imagej_metadata
        np.testing.assert_array_equal(page.asarray(), data)
        x_num, x_den = page.tags["XResolution"].value
        assert x_num / x_den == pytest.approx(1 / 0.065, rel=1e-6)
    img = read_image(path)
    assert img.dims == ("y", "x") and img.dtype == np.float32
    assert float(img["x"][1] - img["x"][0]) == pytest.approx(0.065, rel=1e-6)
    assert float(img["y"][1] - img["y"][0]) == pytest.approx(0.065, rel=1e-6)


def test_z_stack_keeps_rectangular_pixels_and_z_step(tmp_path):
    data = np.arange(3 * 8 * 10, dtype=np.uint16).reshape(3, 8, 10)
    path = tmp_path / "z.tif"
    write_tiff(path, data, (0.1, 0.065), z_step_um=0.2)
    with tifffile.TiffFile(path) as tif:
        assert tif.imagej_metadata["spacing"] == pytest.approx(0.2)
        assert tif.imagej_metadata["slices"] == 3
        np.testing.assert_array_equal(tif.asarray(), data)  # the dtype is kept
        assert tif.pages[0].dtype == np.uint16
    img = read_image(path)
    steps = [float(img[d][1] - img[d][0]) for d in ("z", "y", "x")]
    np.testing.assert_allclose(steps, [0.2, 0.1, 0.065], rtol=1e-6)


@pytest.mark.parametrize("size", [None, (None, 0.065)])
def test_unknown_pixel_size_writes_no_calibration(tmp_path, size):
    path = tmp_path / "u.tif"
    write_tiff(path, np.ones((6, 7), np.float32), size, z_step_um=0.3)  # z step: 2D ignores it
    with tifffile.TiffFile(path) as tif:
        assert "unit" not in tif.imagej_metadata and "spacing" not in tif.imagej_metadata
        assert tif.pages[0].tags["XResolution"].value == (1, 1)
    with pytest.warns(PcmxWarning, match="pixel"):
        read_image(path)


def test_replaces_atomically_and_rejects_other_ranks(tmp_path):
    path = tmp_path / "a.tif"
    write_tiff(path, np.zeros((4, 4), np.float32), 0.1)
    write_tiff(path, np.full((5, 6), 2, np.float32), 0.2)
    assert tifffile.imread(path).shape == (5, 6)
    with pytest.raises(ValueError, match=r"2D \(y, x\) or 3D \(z, y, x\), got shape \(4,\)"):
        write_tiff(tmp_path / "b.tif", np.zeros(4, np.float32), 0.1)
    assert [p.name for p in tmp_path.iterdir()] == ["a.tif"]
    assert float(read_image(path)["x"][1]) == pytest.approx(0.2, rel=1e-6)
