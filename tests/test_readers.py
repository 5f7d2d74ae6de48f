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
