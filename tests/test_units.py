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
        ("0.1 mm", 100.0),
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


# -- positions: one convention (issue 14) ------------------------------------------------------
def _grid(n=50, step=0.1):
    return xr.Dataset(coords=spatial_coords((n, n), step))


def test_to_pixels_forms():
    from pcmx.units import to_pixels

    g = _grid()
    assert to_pixels(g, y=1.25, x=0.0) == {"y": pytest.approx(12.5), "x": 0.0}
    assert to_pixels(g, y="1250 nm", x=ureg.Quantity(0.1, "um"))["y"] == pytest.approx(12.5)
    assert to_pixels(g, y=12.5, x=3, index=True) == {"y": 12.5, "x": 3.0}
    assert to_pixels(g, y="12.5 px", x=3 * ureg.pixel) == {"y": 12.5, "x": 3.0}
    pixels = xr.DataArray([1.5, 40.0], dims="bead", attrs={"units": "pixel"})  # as bead_y
    np.testing.assert_array_equal(to_pixels(g, y=pixels)["y"], [1.5, 40.0])
    np.testing.assert_allclose(to_pixels(g, y=np.array([0.0, 4.9]))["y"], [0.0, 49.0])
    # quantified coordinates (ds.pint.quantify()) are read with their units
    q = xr.DataArray(np.zeros((50, 50)), dims=("y", "x"), coords=g.coords).pint.quantify()
    assert to_pixels(q, y="1.25um")["y"] == pytest.approx(12.5)
    # descending coordinates
    d = g.isel(y=slice(None, None, -1))
    assert to_pixels(d, y=4.9)["y"] == pytest.approx(0.0)


def test_to_pixels_field_extent():
    from pcmx.units import to_pixels

    g = _grid()
    assert to_pixels(g, y=4.949)["y"] == pytest.approx(49.49)  # within the last pixel
    with pytest.raises(InputError) as err:
        to_pixels(g, y=[1.0, 27.0, 30.0])
    assert str(err.value) == ("y=27 micrometer is outside the field (2 of 3 positions): y spans 0 "
                              "to 4.9 micrometer (pixel centres 0 to 49); pass extrapolate=True "
                              "for the PSF at the nearest edge")
    np.testing.assert_allclose(to_pixels(g, y=[-3.0, 1.0, 27.0], extrapolate=True)["y"],
                               [0.0, 10.0, 49.0])
    with pytest.raises(InputError, match="unknown position dim 'q'"):
        to_pixels(g, q=1.0)


def test_one_position_convention_for_psf_at_true_psf_and_the_engine():
    # measured: true_psf took pixels, psf_at micrometers, ProductConvolution.psf_at indices
    import pcmx
    from pcmx.model import psf_at
    from pcmx.simulate import simulate_beads, true_operator, true_psf, true_psfs

    sim = simulate_beads((64, 64), 3, seed=0, noise=False)
    op = true_operator(sim, n_components=2, kernel_size=9, grid=4)
    engine = pcmx.ProductConvolution(op)
    y_um, x_um = 20 * 0.065, 41 * 0.065
    for kw in ({"y": y_um, "x": x_um}, {"y": "1300 nm", "x": x_um * ureg.um},
               {"y": 20, "x": 41, "index": True}, {"y": "20 px", "x": "41 px"}):
        np.testing.assert_array_equal(true_psf(sim, **kw, size=9), true_psf(sim, 20, 41, size=9))
        np.testing.assert_array_equal(engine.psf_at(**kw), engine.psf_at(20, 41))
        np.testing.assert_allclose(psf_at(op, **kw).values, engine.psf_at(20, 41), rtol=1e-5,
                                   atol=1e-9)
    for call in (lambda: true_psf(sim, y=27.0, x=1.0), lambda: engine.psf_at(y=27.0, x=1.0),
                 lambda: psf_at(op, y=27.0, x=1.0)):
        with pytest.raises(InputError, match=r"y=27 micrometer is outside the field: y spans 0 "
                                             r"to 4.095 micrometer"):
            call()
    np.testing.assert_array_equal(true_psf(sim, y=27.0, x=1.0, extrapolate=True, size=9),
                                  true_psf(sim, 63, 1.0 / 0.065, size=9))
    # bead positions stored in pixels (units="pixel") are read as such
    np.testing.assert_array_equal(true_psfs(sim, y=sim["bead_y"], x=sim["bead_x"], size=9),
                                  true_psfs(sim, sim["bead_y"].values, sim["bead_x"].values, size=9))
    with pytest.raises(InputError, match="not both"):
        true_psf(sim, 1, 2, y=1.0)
    with pytest.raises(InputError, match="not both"):
        engine.psf_at(1, 2, y=1.0)
