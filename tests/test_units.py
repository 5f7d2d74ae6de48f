"""pcmx.units: length parsing and its messages, formatting, physical coordinates."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from pcmx.errors import InputError
from pcmx.units import (
    LENGTH_UNITS,
    PIXEL_UNITS,
    format_length,
    kernel_coords,
    parse_length,
    pixel_size,
    spatial_coords,
    ureg,
)


@pytest.mark.parametrize(
    "value, um",
    [
        ("65nm", 0.065),
        ("0.065 um", 0.065),
        ("65 nm", 0.065),
        ("0.065um", 0.065),
        ("0.065 micrometer", 0.065),
        ("108.3 nanometer", 0.1083),
        ("65 µm", 65.0),
        ("1 mm", 1000.0),
        (ureg.Quantity(65, "nm"), 0.065),
        (ureg.Quantity(0.3, "micrometer"), 0.3),
    ],
)
def test_parse_length_to_micrometers(value, um):
    got = parse_length(value)
    assert isinstance(got, float)
    assert got == pytest.approx(um, rel=1e-12)


@pytest.mark.parametrize(
    "value, message",
    [
        (0.065, "pixel_size=0.065 has no unit: give a length such as '65nm' or '0.065um'"),
        (65, "pixel_size=65 has no unit: give a length such as '65nm' or '0.065um'"),
        ("65", "pixel_size='65' is not a length (e.g. '65nm')"),
        ("65 s", "pixel_size='65 s' is not a length (e.g. '65nm')"),
        ("65 pixel", "pixel_size='65 pixel' is not a length (e.g. '65nm')"),
        ("banana", "pixel_size='banana' is not a length (e.g. '65nm')"),
        ("65 nm nm", "pixel_size='65 nm nm' is not a length (e.g. '65nm')"),
        ("", "pixel_size='' is not a length (e.g. '65nm')"),
        (None, "pixel_size=None is not a length (e.g. '65nm')"),
        (True, "pixel_size=True is not a length (e.g. '65nm')"),
        ("-65nm", "pixel_size='-65nm' must be a positive, finite length"),
        ("0 nm", "pixel_size='0 nm' must be a positive, finite length"),
        ("inf nm", "pixel_size='inf nm' must be a positive, finite length"),
        ("nan nm", "pixel_size='nan nm' must be a positive, finite length"),
    ],
)
def test_parse_length_errors(value, message):
    with pytest.raises(InputError) as err:
        parse_length(value)
    assert str(err.value) == message


def test_parse_length_names_the_argument():
    with pytest.raises(InputError) as err:
        parse_length(0.3, name="z_step")
    assert str(err.value) == "z_step=0.3 has no unit: give a length such as '65nm' or '0.065um'"
    with pytest.raises(InputError, match=r"^bead_radius='1 kg' is not a length"):
        parse_length("1 kg", name="bead_radius")


@pytest.mark.parametrize(
    "um, text",
    [(0.065, "65 nm"), (0.1083, "108.3 nm"), (1.5, "1.5 µm"), (1, "1 µm"), (12.25, "12.25 µm"),
     (None, "unknown (pixel units)")],
)
def test_format_length(um, text):
    assert format_length(um) == text


def test_format_then_parse_round_trips():
    for um in (0.065, 0.1083, 0.3, 1.5, 12.25):
        assert parse_length(format_length(um)) == pytest.approx(um, rel=1e-12)


def test_spatial_coords_isotropic_anisotropic_and_pixel():
    c = spatial_coords((3, 4), 0.5)
    assert list(c) == ["y", "x"]
    np.testing.assert_allclose(c["y"].values, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(c["x"].values, [0.0, 0.5, 1.0, 1.5])
    assert c["y"].attrs == {"units": LENGTH_UNITS} == {"units": "micrometer"}
    c3 = spatial_coords((2, 3, 3), (0.3, 0.108, 0.1))
    assert list(c3) == ["z", "y", "x"]
    np.testing.assert_allclose(c3["z"].values, [0.0, 0.3])
    np.testing.assert_allclose(c3["y"].values, [0.0, 0.108, 0.216])
    np.testing.assert_allclose(c3["x"].values, [0.0, 0.1, 0.2])
    px = spatial_coords((2, 3))
    np.testing.assert_array_equal(px["x"].values, [0.0, 1.0, 2.0])
    assert px["x"].attrs == {"units": PIXEL_UNITS} == {"units": "pixel"}
    assert list(spatial_coords((5,), 0.2, dims=("t",))) == ["t"]
    with pytest.raises(InputError) as err:
        spatial_coords((2, 3, 3), (0.3, 0.1))
    assert str(err.value) == "pixel_size has 2 values for 3 dimensions"


def test_kernel_coords_are_centred_at_size_over_two():
    c = kernel_coords((5, 3), 0.1)
    assert list(c) == ["ky", "kx"]
    np.testing.assert_allclose(c["ky"].values, [-0.2, -0.1, 0.0, 0.1, 0.2])
    np.testing.assert_allclose(c["kx"].values, [-0.1, 0.0, 0.1])
    even = kernel_coords((4,), None, dims=("kx",))
    np.testing.assert_array_equal(even["kx"].values, [-2.0, -1.0, 0.0, 1.0])
    assert even["kx"].attrs == {"units": "pixel"}
    assert list(kernel_coords((3, 5, 5), (0.3, 0.1, 0.1))) == ["kz", "ky", "kx"]


def test_pixel_size_reads_coordinates_in_any_length_unit():
    image = xr.DataArray(np.zeros((3, 4)), dims=("y", "x"), coords=spatial_coords((3, 4), (0.2, 0.065)))
    assert pixel_size(image, "y") == pytest.approx(0.2)
    assert pixel_size(image, "x") == pytest.approx(0.065)
    nm = image.assign_coords(x=("x", [0.0, 65.0, 130.0, 195.0], {"units": "nanometer"}))
    assert pixel_size(nm, "x") == pytest.approx(0.065)
    assert pixel_size(xr.DataArray(np.zeros((3, 4)), dims=("y", "x"), coords=spatial_coords((3, 4))), "x") is None
    assert pixel_size(xr.DataArray(np.zeros((3, 4)), dims=("y", "x")), "x") is None
    assert pixel_size(image, "z") is None
    bad = image.assign_coords(x=("x", [0.0, 1.0, 2.0, 3.0], {"units": "second"}))
    with pytest.raises(InputError) as err:
        pixel_size(bad, "x")
    assert str(err.value) == "coordinate 'x' has units 'second', which is not a length"


def test_coords_quantify_with_pint_xarray():
    """The stored units strings are pint's: pint-xarray turns the coordinates into lengths."""
    ds = xr.Dataset(coords=spatial_coords((3, 4), 0.065))
    q = ds.pint.quantify()
    assert q["x"].pint.units == ureg.micrometer
    nm = q.pint.to(x=ureg.nanometer).pint.dequantify()
    np.testing.assert_allclose(nm["x"].values, [0.0, 65.0, 130.0, 195.0])
    assert pixel_size(nm, "x") == pytest.approx(0.065)
