"""Reading broken image files, and the package's lazy exports."""

import importlib

import numpy as np
import pytest
import tifffile

import pcmx
from pcmx.errors import InputError

BROKEN = "not a valid TIFF (truncated or corrupt): "


def _tiff_bytes(tmp_path, data, **kw) -> bytes:
    f = tmp_path / "full.tif"
    tifffile.imwrite(f, data, **kw)
    return f.read_bytes()


@pytest.mark.parametrize("keep", [8, 100, 0.6, -1])
def test_truncated_tiff_is_an_input_error_naming_the_file(tmp_path, keep):
    data = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    full = _tiff_bytes(tmp_path, data, imagej=True, resolution=(1 / 0.065, 1 / 0.065),
                       metadata={"unit": "um"})
    n = int(len(full) * keep) if isinstance(keep, float) else keep
    f = tmp_path / "beads.tif"
    f.write_bytes(full[:n] if n >= 0 else full[: len(full) - 1000])
    with pytest.raises(InputError) as info:
        pcmx.read_image(f)
    msg = str(info.value)
    assert msg.startswith(f"cannot read {f}: {BROKEN}")
    assert "beads.tif" in msg
    assert info.value.__cause__ is not None  # chained from tifffile's own error


def test_stack_truncated_between_pages_is_not_read_as_fewer_planes(tmp_path):
    # tifffile only logs the broken IFD chain and would return the first plane alone
    full = _tiff_bytes(tmp_path, np.ones((5, 32, 32), np.uint16), imagej=True)
    with tifffile.TiffFile(tmp_path / "full.tif") as tif:
        second = tif.pages[1].offset
    f = tmp_path / "stack.tif"
    f.write_bytes(full[:second])
    with pytest.raises(InputError, match="^cannot read .*stack.tif: not a valid TIFF"):
        pcmx.read_image(f, pixel_size="65nm")


@pytest.mark.parametrize("content", [b"", b"hello, I am not an image" * 10, b"II*\x00 not really a TIFF"])
def test_garbage_with_tif_suffix(tmp_path, content):
    f = tmp_path / "garbage.tif"
    f.write_bytes(content)
    with pytest.raises(InputError) as info:
        pcmx.read_image(f)
    assert str(info.value).startswith(f"cannot read {f}: {BROKEN}")
    assert isinstance(info.value.__cause__, Exception)


def test_intact_tiff_still_reads(tmp_path):
    data = np.arange(5 * 20 * 30, dtype=np.uint16).reshape(5, 20, 30)
    tifffile.imwrite(tmp_path / "ok.tif", data, imagej=True)
    img = pcmx.read_image(tmp_path / "ok.tif", pixel_size="65nm")
    np.testing.assert_array_equal(img.values, data)


@pytest.mark.parametrize("name", ["learn_operator", "cross_validate", "learn_family", "cross_validate_family",
                                  "identify_operator", "ProductConvolution"])
def test_top_level_lazy_exports_resolve(name):
    value = getattr(pcmx, name)
    assert callable(value) and value.__name__ == name
    assert name in pcmx.__all__ and name in dir(pcmx)


def test_pcmx_deblur_is_the_subpackage_with_the_function_inside():
    assert pcmx.deblur is importlib.import_module("pcmx.deblur")
    assert callable(pcmx.deblur.deblur) and pcmx.deblur.deblur.__module__ == "pcmx.deblur.sparse_smooth"


@pytest.mark.parametrize("name", ["identify_operator", "sparse_smooth", "deblur", "tikhonov", "tikhonov_fourier",
                                  "richardson_lucy_tv", "fista_haar", "scale_operator", "estimate_offset",
                                  "find_sources", "match_sources", "score_restoration"])
def test_deblur_exports_resolve(name):
    import pcmx.deblur as d

    assert name in d.__all__ and callable(getattr(d, name)) and getattr(d, name).__name__ == name


def test_deblur_all_is_importable():
    import pcmx.deblur as d

    missing = [n for n in d.__all__ if not hasattr(d, n)]
    assert missing == []


# -- issue 14: channels and time points, globs stacked in natural order with a z step ------------
def _ome_zarr(path, data, axes, channels=None):
    import zarr

    root = zarr.open_group(path, mode="w-", zarr_format=3)
    ms = {"axes": [{"name": a, "type": {"c": "channel", "t": "time"}.get(a, "space"),
                    **({"unit": "micrometer"} if a in "zyx" else {})} for a in axes],
          "datasets": [{"path": "0", "coordinateTransformations": [
              {"type": "scale", "scale": [1.0 if a in "ct" else 0.1 for a in axes]}]}]}
    root.attrs["ome"] = {"version": "0.5", "multiscales": [ms],
                         **({"omero": {"channels": [{"label": c} for c in channels]}} if channels else {})}
    root.create_array("0", shape=data.shape, dtype=data.dtype)[...] = data
    return str(path)


@pytest.fixture
def two_channels(tmp_path):
    data = np.stack([np.full((2, 8, 8), 10 * (c + 1), np.uint16) for c in range(2)])  # c, z, y, x
    return _ome_zarr(tmp_path / "img.ome.zarr", data, "czyx", channels=["DAPI", "GFP"])


def test_ome_zarr_channel_dropped_with_a_warning(two_channels):
    with pytest.warns(pcmx.io.readers.PcmxWarning, match=r"channel 0 \('DAPI'\) of 2 kept, the other 1 "
                                                          r"dropped; choose one with channel="):
        img = pcmx.read_image(two_channels)
    assert img.dims == ("z", "y", "x") and int(img.max()) == 10


@pytest.mark.parametrize("channel", [1, "1", "GFP"])
def test_ome_zarr_channel_chosen(two_channels, channel):
    img = pcmx.read_image(two_channels, channel=channel)  # no warning (filterwarnings=error)
    assert int(img.max()) == 20
    np.testing.assert_allclose(float(img["x"][1] - img["x"][0]), 0.1)


@pytest.mark.parametrize("channel, message", [
    (2, r"channel 2 is out of range; the channels are 0 \('DAPI'\), 1 \('GFP'\)"),
    ("RFP", r"no channel 'RFP'; the channels are 0 \('DAPI'\), 1 \('GFP'\)")])
def test_ome_zarr_channel_out_of_range_lists_the_channels(two_channels, channel, message):
    with pytest.raises(InputError, match=message):
        pcmx.read_image(two_channels, channel=channel)


def test_time_series_dropped_with_a_warning_or_chosen(tmp_path):
    data = np.stack([np.full((8, 8), t + 1, np.float32) for t in range(3)])
    path = _ome_zarr(tmp_path / "t.ome.zarr", data, "tyx")
    with pytest.warns(pcmx.io.readers.PcmxWarning, match="time 0 of 3 kept, the other 2 dropped"):
        pcmx.read_image(path)
    assert float(pcmx.read_image(path, time=2).max()) == 3
    with pytest.raises(InputError, match="no channel axis"):
        pcmx.read_image(path, channel=1)


def test_imagej_hyperstack_channel(tmp_path):
    data = np.stack([np.full((3, 16, 16), c + 1, np.uint16) for c in range(2)], axis=1)  # z c y x
    path = tmp_path / "h.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZCYX"})
    with pytest.warns(pcmx.io.readers.PcmxWarning, match="channel 0 of 2 kept"):
        assert pcmx.read_image(path, pixel_size="100nm").shape == (3, 16, 16)
    assert int(pcmx.read_image(path, pixel_size="100nm", channel=1).max()) == 2


def test_glob_is_stacked_in_natural_order_with_the_z_step(tmp_path):
    for z in (1, 2, 10):
        tifffile.imwrite(tmp_path / f"plane_z{z}.tif", np.full((8, 8), z, np.uint16),
                         imagej=True, resolution=(10.0, 10.0), metadata={"unit": "um"})
    img = pcmx.read_image(str(tmp_path / "plane_z*.tif"), z_step="200nm")
    assert img[:, 0, 0].values.tolist() == [1, 2, 10]  # not z1, z10, z2
    np.testing.assert_allclose(np.diff(img["z"].values), 0.2)
    with pytest.warns(pcmx.io.readers.PcmxWarning, match="unknown z step; give it with z_step="):
        pcmx.read_image(str(tmp_path / "plane_z*.tif"))
