"""pcmx.accessor: ``ds.pcmx`` and ``da.pcmx`` delegate to the functions and return what they do."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import xarray as xr
from conftest import make_family, make_operator

import pcmx
from pcmx import model
from pcmx.errors import SchemaError
from pcmx.operator import blur

VOLATILE = ("pcmx_created",)  # a timestamp: two calls a second apart differ


def _same_operator(a: xr.Dataset, b: xr.Dataset) -> None:
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    strip = lambda attrs: {k: v for k, v in attrs.items() if k not in VOLATILE}  # noqa: E731
    assert strip(a.attrs) == strip(b.attrs)


def test_kind():
    assert make_operator().pcmx.kind == "operator"
    assert make_family().pcmx.kind == "family"
    assert xr.Dataset().pcmx.kind is None


def test_validate_returns_the_dataset_or_raises():
    ds = make_operator()
    assert ds.pcmx.validate() is ds
    with pytest.raises(SchemaError, match="missing variable 'coefficients'"):
        ds.drop_vars("coefficients").pcmx.validate()


def test_psf_at_delegates():
    op, fam = make_operator(), make_family()
    xr.testing.assert_identical(op.pcmx.psf_at(y=0.5, x=1.0), model.psf_at(op, y=0.5, x=1.0))
    xr.testing.assert_identical(op.pcmx.psf_at(y=3, x=4, index=True), model.psf_at(op, y=3, x=4, index=True))
    xr.testing.assert_identical(fam.pcmx.psf_at(state="wet", y=3, x=4, index=True),
                                model.psf_at(fam, state="wet", y=3, x=4, index=True))


def test_psf_at_checks_positions_and_units():
    # issue 14: outside the field is an error unless extrapolate=True; units are converted
    op = make_operator()  # 32 x 40 pixels of 65 nm
    with pytest.raises(pcmx.InputError, match="outside the field: y spans 0 to 2.015 micrometer"):
        op.pcmx.psf_at(y=270.0, x=1.0)
    xr.testing.assert_identical(op.pcmx.psf_at(y=270.0, x=1.0, extrapolate=True),
                                model.psf_at(op, y=31, x=1.0, extrapolate=True))
    xr.testing.assert_identical(op.pcmx.psf_at(y="650 nm", x=1.0), op.pcmx.psf_at(y=0.65, x=1.0))
    np.testing.assert_array_equal(op.pint.quantify().pcmx.psf_at(y=0.65, x=1.0).values,
                                  op.pcmx.psf_at(y=0.65, x=1.0).values)
    with pytest.raises(pcmx.InputError, match="known states: 'dry', 'wet', 'oil'"):
        make_family().pcmx.psf_at(state="nope", y=0.1, x=0.1)


def test_coefficients_and_operator_delegate():
    op, fam = make_operator(), make_family()
    xr.testing.assert_identical(op.pcmx.coefficients(), op["coefficients"])
    xr.testing.assert_identical(fam.pcmx.coefficients(2), model.family_coefficients(fam, 2))
    gamma = np.ones((3, 2))
    xr.testing.assert_identical(fam.pcmx.coefficients(gamma=gamma), model.family_coefficients(fam, gamma=gamma))
    _same_operator(fam.pcmx.operator("oil"), model.family_operator(fam, "oil"))
    _same_operator(fam.pcmx.operator(gamma=gamma), model.family_operator(fam, gamma=gamma))


def test_save_writes_the_store_open_store_reads(tmp_path):
    ds = make_operator()
    path = tmp_path / "op.zarr"
    assert ds.pcmx.save(path) == str(path)
    back = pcmx.open_store(path).compute()
    xr.testing.assert_identical(back.drop_attrs(), ds.drop_attrs())
    with pytest.raises(pcmx.StoreExistsError):
        ds.pcmx.save(path)
    ds.pcmx.save(path, overwrite=True)


def test_blur_on_both_sides_delegates():
    ds = make_operator(seed=1)
    image = xr.DataArray(np.random.default_rng(0).uniform(size=(32, 40)).astype(np.float32),
                         dims=("y", "x"), coords={"y": ds["y"], "x": ds["x"]})
    expected = blur(image, ds)
    np.testing.assert_array_equal(np.asarray(ds.pcmx.blur(image)), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(image.pcmx.blur(ds)), np.asarray(expected))
    assert not np.allclose(np.asarray(expected), image.values)  # the blur did something
    np.testing.assert_array_equal(np.asarray(ds.pcmx.blur(image, boundary="reflect")),
                                  np.asarray(blur(image, ds, boundary="reflect")))


def test_summary_describes_the_dataset():
    text = make_operator().pcmx.summary()
    lines = text.splitlines()
    assert lines[0] == "kind: operator"
    assert "dims: component=3, ky=7, kx=7, y=32, x=40" in lines
    assert "pixel size x: 65 nm" in lines
    assert "  coefficients ('component', 'y', 'x') float32" in lines


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return "sentinel"


def test_learn_and_deblur_delegate(monkeypatch):
    """The heavy steps are replaced by recorders: the accessor passes everything through."""
    image = xr.DataArray(np.zeros((8, 8), np.float32), dims=("y", "x"))
    learn, deblur = _Recorder(), _Recorder()
    monkeypatch.setattr(importlib.import_module("pcmx.learn"), "learn_operator", learn)
    monkeypatch.setattr(importlib.import_module("pcmx.deblur"), "deblur", deblur)
    assert image.pcmx.learn(pixel_size="65nm", n_components=3) == "sentinel"
    assert learn.calls == [((image,), {"pixel_size": "65nm", "n_components": 3})]
    fam = make_family()
    assert image.pcmx.deblur(fam, gamma1=0.1) == "sentinel"
    (args, kwargs), = deblur.calls
    assert args[0] is image and args[1] is fam and kwargs == {"gamma1": 0.1}
