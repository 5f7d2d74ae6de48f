"""pcmx.model: PSFs at positions and family coefficients against sums written out by hand."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from conftest import make_family, make_operator, make_operator3d

import pcmx
from pcmx.errors import InputError
from pcmx.model import (
    family_coefficients,
    family_operator,
    operator_dataset,
    psf_at,
    state_index,
)
from pcmx.units import ureg


def hand_psf(basis: np.ndarray, coeffs_at_p: np.ndarray) -> np.ndarray:
    """sum_i alpha_i(p) h_i, one term at a time."""
    out = np.zeros(basis.shape[1:])
    for i in range(basis.shape[0]):
        out += float(coeffs_at_p[i]) * basis[i].astype(np.float64)
    return out


def hand_family_coeffs(family: xr.Dataset, k: int) -> np.ndarray:
    """alpha_i = sum_j gamma[k, i, j] a_j (paper II-D-b), one term at a time."""
    g = family["gamma"].values[k].astype(np.float64)
    a = family["spatial_basis"].values.astype(np.float64)
    out = np.zeros((g.shape[0], *a.shape[1:]))
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            out[i] += g[i, j] * a[j]
    return out


def test_psf_at_operator_by_coordinate_is_the_sum_at_the_nearest_pixel():
    ds = make_operator(shape=(32, 40), ksize=7, n_components=3, pixel_size=0.065)
    basis, coeffs = ds["psf_basis"].values, ds["coefficients"].values
    # 0.02 um off pixel (11, 27): nearest is that pixel (pixel size 0.065 um)
    psf = psf_at(ds, y=11 * 0.065 + 0.02, x=27 * 0.065 - 0.02)
    assert psf.dims == ("ky", "kx") and psf.name == "psf"
    assert set(psf.coords) == {"ky", "kx"}  # the position's scalar coords are dropped
    np.testing.assert_allclose(psf.values, hand_psf(basis, coeffs[:, 11, 27]), rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(psf["ky"].values, ds["ky"].values)


def test_psf_at_operator_by_index_rounds_to_the_nearest_pixel():
    ds = make_operator(seed=3)
    basis, coeffs = ds["psf_basis"].values, ds["coefficients"].values
    psf = psf_at(ds, y=4.6, x=30.2, index=True)
    np.testing.assert_allclose(psf.values, hand_psf(basis, coeffs[:, 5, 30]), rtol=1e-5, atol=1e-8)
    corner = psf_at(ds, y=0, x=0, index=True)
    np.testing.assert_allclose(corner.values, hand_psf(basis, coeffs[:, 0, 0]), rtol=1e-5, atol=1e-8)
    assert not np.allclose(psf.values, corner.values)  # the maps vary: different pixels differ


def test_psf_at_3d_operator():
    ds = make_operator3d()
    basis, coeffs = ds["psf_basis"].values, ds["coefficients"].values
    psf = psf_at(ds, z=2, y=7, x=3, index=True)
    assert psf.dims == ("kz", "ky", "kx") and psf.shape == (3, 5, 5)
    np.testing.assert_allclose(psf.values, hand_psf(basis, coeffs[:, 2, 7, 3]), rtol=1e-5)
    by_coord = psf_at(ds, z=0.6, y=0.7, x=0.3)  # pixel sizes (0.3, 0.1, 0.1) um
    np.testing.assert_allclose(by_coord.values, psf.values, rtol=1e-6)


def test_psf_at_family_state_by_index_and_by_label():
    fam = make_family()
    basis = fam["psf_basis"].values
    k, (y, x) = 1, (7, 9)
    expected = hand_psf(basis, hand_family_coeffs(fam, k)[:, y, x])
    by_index = psf_at(fam, state=k, y=y, x=x, index=True)
    by_label = psf_at(fam, state="wet", y=y * 0.1, x=x * 0.1)
    np.testing.assert_allclose(by_index.values, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(by_label.values, expected, rtol=1e-5, atol=1e-6)
    other = psf_at(fam, state=2, y=y, x=x, index=True)
    np.testing.assert_allclose(other.values, hand_psf(basis, hand_family_coeffs(fam, 2)[:, y, x]),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"y": 1, "q": 2}, "unknown position dims ['q']; expected ['y', 'x']"),
        ({"y": 1}, "position needs ['x'] as well"),
        ({"z": 1, "y": 1, "x": 1}, "unknown position dims ['z']; expected ['y', 'x']"),
    ],
)
def test_psf_at_position_errors(kwargs, message):
    with pytest.raises(InputError) as err:
        psf_at(make_operator(), index=True, **kwargs)
    assert str(err.value) == message


def test_psf_at_kind_errors():
    with pytest.raises(InputError) as err:
        psf_at(make_family(), y=1, x=1, index=True)
    assert str(err.value) == "a family needs state= to give a PSF"
    with pytest.raises(InputError) as err:
        psf_at(make_operator().assign_attrs(pcmx_type="simulation"), y=1, x=1)
    assert str(err.value) == "psf_at needs an operator or a family, got pcmx_type='simulation'"


def test_family_coefficients_by_index_label_and_gamma():
    fam = make_family()
    for k, label in enumerate(fam["state"].values):
        by_index = family_coefficients(fam, k)
        by_label = family_coefficients(fam, str(label))
        assert by_index.dims == ("component", "y", "x") and by_index.dtype == np.float32
        np.testing.assert_allclose(by_index.values, hand_family_coeffs(fam, k), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(by_label.values, by_index.values)
    gamma = np.arange(6, dtype=np.float64).reshape(3, 2) / 5
    got = family_coefficients(fam, gamma=gamma)
    a = fam["spatial_basis"].values.astype(np.float64)
    np.testing.assert_allclose(got.values, np.einsum("ij,jyx->iyx", gamma, a), rtol=1e-5, atol=1e-5)
    assert got.dtype == np.float32


def test_family_coefficients_errors():
    fam = make_family()
    for kwargs in ({}, {"state": 0, "gamma": np.zeros((3, 2))}):
        with pytest.raises(InputError) as err:
            family_coefficients(fam, **kwargs)
        assert str(err.value) == "give exactly one of state= or gamma="
    with pytest.raises(InputError) as err:
        family_coefficients(fam, gamma=np.zeros((2, 3)))
    assert str(err.value) == "gamma has shape (2, 3), expected (3, 2)"


def test_family_operator_is_a_valid_operator_of_the_state():
    fam = make_family()
    op = family_operator(fam, "oil")
    assert op.attrs["pcmx_type"] == "operator"
    assert op.attrs["pcmx_source_family"] is True
    assert op.attrs["pcmx_parameters"] == {"family_state": "oil"}
    assert op.attrs["pcmx_version"] == pcmx.__version__
    assert set(op.data_vars) == {"psf_basis", "coefficients"}
    assert "state" not in op.coords  # the scalar state coordinate is dropped
    np.testing.assert_allclose(op["coefficients"].values, hand_family_coeffs(fam, 2), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(op["psf_basis"].values, fam["psf_basis"].values)
    assert pcmx.validate(op) is op
    # an integer state is recorded by its label; a free gamma by None
    assert family_operator(fam, 1).attrs["pcmx_parameters"] == {"family_state": "wet"}
    free = family_operator(fam, gamma=fam["gamma"].values[0])
    assert free.attrs["pcmx_parameters"] == {"family_state": None}
    np.testing.assert_allclose(free["coefficients"].values, hand_family_coeffs(fam, 0), rtol=1e-5, atol=1e-5)


def test_family_operator_stays_lazy_on_a_lazy_family():
    fam = make_family().chunk({"y": 5, "x": 8})
    op = family_operator(fam, 0)
    assert isinstance(op["coefficients"].data, da.Array)
    assert op["coefficients"].chunks[1:] == ((5, 5, 2), (8, 8))
    np.testing.assert_allclose(op["coefficients"].values, hand_family_coeffs(make_family(), 0),
                               rtol=1e-5, atol=1e-5)


def test_operator_dataset_assembles_and_keeps_coords():
    ref = make_operator()
    ds = operator_dataset(ref["psf_basis"], ref["coefficients"], attrs={"pcmx_parameters": {"r": 1}})
    assert ds.attrs == {"pcmx_type": "operator", "pcmx_parameters": {"r": 1}}
    xr.testing.assert_identical(ds["coefficients"], ref["coefficients"])
    assert ds["x"].attrs == {"units": "micrometer"}
    np.testing.assert_allclose(ds["x"].values[:3], [0.0, 0.065, 0.13])
    assert operator_dataset(ref["psf_basis"], ref["coefficients"]).attrs == {"pcmx_type": "operator"}


# -- issue 14: units everywhere, checked ------------------------------------------------------
FIELD_UM = 846 * 0.065  # a 55 um field, as in the issue


def _field_operator():
    return make_operator(shape=(846, 12), ksize=3, n_components=2, pixel_size=0.065, seed=1)


def test_psf_at_outside_the_field_is_an_error_naming_the_extent():
    # measured: y=270.0 on a 55 um field returned the edge PSF without a word
    ds = _field_operator()
    with pytest.raises(InputError) as err:
        psf_at(ds, y=270.0, x=0.3)
    assert str(err.value) == (
        "y=270 micrometer is outside the field: y spans 0 to 54.925 micrometer (pixel centres "
        "0 to 845); pass extrapolate=True for the PSF at the nearest edge")
    edge = psf_at(ds, y=270.0, x=0.3, extrapolate=True)
    xr.testing.assert_identical(edge, psf_at(ds, y=845, x=5, index=True))
    # the last pixel's footprint is inside; beyond it, and negative positions, are not
    psf_at(ds, y=FIELD_UM - 0.033, x=0.3)
    for y in (FIELD_UM, -0.04):
        with pytest.raises(InputError, match="outside the field"):
            psf_at(ds, y=y, x=0.3)
    with pytest.raises(InputError, match=r"y=846 pixel is outside the field"):
        psf_at(ds, y=846, x=0, index=True)


def test_psf_at_converts_pint_quantities_and_strings():
    # measured: y=27000 * ureg.nm was stripped of its unit and read as 27000 micrometers
    ds = _field_operator()
    expected = psf_at(ds, y=27.0, x=0.39)
    for y, x in [(27000 * ureg.nm, 390 * ureg.nm), ("27um", "0.39 um"), ("27000 nm", 0.39),
                 (ureg.Quantity(0.027, "mm"), "390nm")]:
        xr.testing.assert_identical(psf_at(ds, y=y, x=x), expected)
    # "px" and ureg.pixel are pixel numbers (pint alone reads "px" as 1/96 inch)
    xr.testing.assert_identical(psf_at(ds, y="415 px", x=6 * ureg.pixel),
                                psf_at(ds, y=415, x=6, index=True))
    for bad, message in [("27", "has no unit"), ("27 s", "is not a length or a pixel number"),
                         ("lots", "is not a position"), (float("nan"), "must be finite"),
                         (True, "is not a position")]:
        with pytest.raises(InputError, match=message):
            psf_at(ds, y=bad, x=0.39)
    with pytest.raises(InputError, match="has a unit but index=True takes pixel indices"):
        psf_at(ds, y="27um", x=1, index=True)


def test_psf_at_on_a_quantified_dataset():
    # measured: op.pint.quantify().pcmx.psf_at(...) raised PintExceptionGroup
    ds = _field_operator()
    q = ds.pint.quantify()
    psf = psf_at(q, y=27.0, x=0.39)
    np.testing.assert_array_equal(psf.values, psf_at(ds, y=27.0, x=0.39).values)
    assert str(psf["ky"].data.units) == "micrometer"  # quantified in, quantified out
    np.testing.assert_array_equal(psf_at(q, y=27000 * ureg.nm, x="390nm").values, psf.values)
    fam = make_family().pint.quantify()
    np.testing.assert_array_equal(psf_at(fam, state="wet", y=0.7, x=0.9).values,
                                  psf_at(make_family(), state="wet", y=7, x=9, index=True).values)


def test_psf_at_on_a_grid_in_pixels_refuses_lengths():
    ds = make_operator(shape=(10, 12), pixel_size=None)
    xr.testing.assert_identical(psf_at(ds, y=3.2, x=4), psf_at(ds, y=3, x=4, index=True))
    with pytest.raises(InputError, match="is a length, but this grid has no pixel size"):
        psf_at(ds, y="1um", x=4)


def test_state_lookups_raise_pcmx_errors_naming_the_states():
    # measured: psf_at(state="nope") on a family raised a bare KeyError
    fam = make_family()
    for state in ("nope", 3, -4, True):
        with pytest.raises(InputError) as err:
            psf_at(fam, state=state, y=0, x=0, index=True)
        assert str(err.value) == (f"state={state!r} is not a state of this family; known "
                                  "states: 'dry', 'wet', 'oil'")
    with pytest.raises(InputError, match="known states: 'dry', 'wet', 'oil'"):
        family_coefficients(fam, "nope")
    with pytest.raises(InputError, match="known states"):
        family_operator(fam, 7)
    assert state_index(fam, -1) == 2 and state_index(fam, "oil") == 2


def test_integer_state_labels_are_labels():
    fam = make_family(states=(10, 20, 30))
    assert state_index(fam, 20) == 1
    np.testing.assert_allclose(family_coefficients(fam, 30).values, hand_family_coeffs(fam, 2),
                               rtol=1e-5, atol=1e-5)
    assert family_operator(fam, 20).attrs["pcmx_parameters"]["family_state"] == "20"
    with pytest.raises(InputError, match=r"state=1 is not a state of this family; known states: "
                                         r"10, 20, 30"):
        psf_at(fam, state=1, y=0, x=0, index=True)


def test_integer_state_labels_stay_integers_through_learn_family_and_cross_validation():
    # measured: learn_family(sim["image"]) turned the integer state labels into strings
    from pcmx.cross_validation import cross_validate_family
    from pcmx.family import learn_family
    from pcmx.simulate import simulate_beads

    sim = simulate_beads((160, 160), 16, states=2, photons=40000.0, min_separation=24, margin=20,
                         seed=3)
    images = sim["image"].assign_coords(state=[3, 7])
    fam = learn_family(images, n_components=2, n_modes=2, psf_radius=8)
    assert fam["state"].dtype.kind == "i" and list(fam["state"].values) == [3, 7]
    pcmx.validate(fam)
    np.testing.assert_array_equal(psf_at(fam, state=7, y=2.0, x=2.0).values,
                                  psf_at(fam.assign_coords(state=["a", "b"]), state=1, y=2.0, x=2.0).values)
    cv = cross_validate_family(images, folds=2, psf_radius=8)
    assert cv["state"].dtype.kind == "i" and list(cv["state"].values) == [3, 7]
