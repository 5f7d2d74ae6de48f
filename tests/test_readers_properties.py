"""Property-based round trips of the readers (issue 13): what pcmx writes or a user saves, on
random shapes, dtypes and pixel sizes, reads back bit for bit with its calibration."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import pcmx
from pcmx.io.tiff import write_tiff
from pcmx.units import pixel_size

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# ImageJ TIFFs hold uint8, uint16 and float32
DTYPES = st.sampled_from([np.uint8, np.uint16, np.float32])
SHAPES = st.one_of(
    st.tuples(st.integers(16, 48), st.integers(16, 48)),
    st.tuples(st.integers(3, 5), st.integers(16, 40), st.integers(16, 40)),
)
SIZES = st.floats(0.02, 5.0, allow_nan=False)  # micrometres


@st.composite
def images(draw):
    dtype = np.dtype(draw(DTYPES))
    shape = draw(SHAPES)
    if dtype.kind == "f":
        elements = st.floats(-1e4, 1e4, width=32, allow_nan=False)
    else:
        elements = st.integers(0, int(np.iinfo(dtype).max))
    return draw(arrays(dtype, shape, elements=elements))


@SETTINGS
@given(data=images(), um=SIZES, z_um=SIZES)
def test_tiff_round_trip(tmp_path, data, um, z_um):
    path = tmp_path / f"img{data.ndim}.tif"
    write_tiff(path, data, um, z_step_um=z_um if data.ndim == 3 else None)
    img = pcmx.read_image(path)
    np.testing.assert_array_equal(np.asarray(img.values), data)
    assert img.dtype == data.dtype
    assert img.dims == ("z", "y", "x")[-data.ndim:]
    assert pixel_size(img, "x") == pytest.approx(um, rel=1e-5)
    assert pixel_size(img, "y") == pytest.approx(um, rel=1e-5)
    if data.ndim == 3:
        assert pixel_size(img, "z") == pytest.approx(z_um, rel=1e-5)


@SETTINGS
@given(data=images(), um=SIZES)
def test_npy_round_trip_with_a_given_pixel_size(tmp_path, data, um):
    path = tmp_path / "img.npy"
    np.save(path, data)
    img = pcmx.read_image(path, pixel_size=f"{um}um")
    np.testing.assert_array_equal(np.asarray(img.values), data)
    assert img.dims == ("z", "y", "x")[-data.ndim:]
    assert pixel_size(img, "x") == pytest.approx(um, rel=1e-9)
