"""pcmx.schema: good Datasets pass unchanged, bad ones fail with the exact message; copies agree."""

from __future__ import annotations

import json
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from conftest import make_family, make_operator, make_operator3d

from pcmx.errors import PcmxError, SchemaError
from pcmx.provenance import SCHEMA_VERSION, provenance
from pcmx.schema import KINDS, load_schema, summarize, validate
from pcmx.units import spatial_coords

ROOT = Path(__file__).resolve().parents[1]


def _z(ds: xr.Dataset) -> xr.Dataset:
    """The operator with 3D coefficient maps but its 2D basis."""
    c = ds["coefficients"].expand_dims(z=1).transpose("component", "z", "y", "x")
    return ds.assign(coefficients=c).assign_coords(spatial_coords((1,), 0.3, ("z",)))


def test_schema_copies_are_identical_and_cover_the_kinds():
    repo = sorted(p.name for p in (ROOT / "schemas").glob("*.json"))
    shipped = sorted(p.name for p in (ROOT / "pcmx" / "schemas").glob("*.json"))
    assert repo == shipped == sorted(f"{k}.json" for k in KINDS)
    for name in repo:
        assert (ROOT / "schemas" / name).read_bytes() == (ROOT / "pcmx" / "schemas" / name).read_bytes(), name


def test_load_schema():
    for kind in KINDS:
        schema = load_schema(kind)
        assert schema["properties"]["attrs"]["properties"]["pcmx_type"] == {"const": kind}
        assert schema == json.loads((ROOT / "schemas" / f"{kind}.json").read_text())
    with pytest.raises(SchemaError) as err:
        load_schema("banana")
    assert str(err.value) == "unknown pcmx_type 'banana': expected one of operator, family, simulation, restoration"


@pytest.mark.parametrize("make", [make_operator, make_operator3d, make_family])
def test_good_datasets_pass_unchanged(make):
    ds = make()
    before = ds.copy(deep=True)
    assert validate(ds) is ds
    xr.testing.assert_identical(ds, before)
    with_prov = ds.assign_attrs(provenance({"a": 1}, ["x.tif"]))
    assert validate(with_prov, require_provenance=True) is with_prov
    assert validate(ds.astype(np.float64)) is not None  # float64 is allowed too


def test_kind_argument():
    ds = make_operator()
    assert validate(ds, kind="operator") is ds
    with pytest.raises(SchemaError) as err:
        validate(ds, kind="family", source="op.zarr")
    assert str(err.value) == "op.zarr: is a pcmx 'operator' store, expected 'family'"


OP_ERRORS = [
    (lambda ds: ds["coefficients"], "dataset: expected an xarray Dataset, got DataArray"),
    (lambda ds: ds.drop_attrs(), "dataset: not a pcmx result (no attrs['pcmx_type'])"),
    (lambda ds: ds.assign_attrs(pcmx_type="banana"), "dataset: unknown pcmx_type 'banana'"),
    (lambda ds: ds.assign_attrs(pcmx_schema_version="one"), "dataset: schema version 'one' is not MAJOR.MINOR"),
    (lambda ds: ds.assign_attrs(pcmx_schema_version="1.0.0"), "dataset: schema version '1.0.0' is not MAJOR.MINOR"),
    (lambda ds: ds.drop_vars("coefficients"), "dataset: missing variable 'coefficients'"),
    (lambda ds: ds.drop_vars("psf_basis"), "dataset: missing variable 'psf_basis'"),
    (lambda ds: ds.drop_vars("x"), "dataset: missing coordinate 'x'"),
    (lambda ds: ds.rename_dims(kx="kk"),
     "dataset: variable 'psf_basis' dims is ['component', 'ky', 'kk'], "
     "expected [['component', 'ky', 'kx'], ['component', 'kz', 'ky', 'kx']]"),
    (lambda ds: ds.assign(coefficients=ds["coefficients"].astype(np.int64)),
     "dataset: variable 'coefficients' dtype is 'int64', expected ['float32', 'float64']"),
    (lambda ds: ds.assign_coords(y=("y", ds["y"].values)), "dataset: coordinate 'y' attrs: missing 'units'"),
    (lambda ds: ds.assign_coords(y=ds["y"].assign_attrs(units=3)),
     "dataset: coordinate 'y' attrs units: 3 is not of type 'string'"),
    (lambda ds: ds.assign_attrs(pcmx_inputs=[{"sha256": None}]), "dataset: attrs pcmx_inputs 0: missing 'name'"),
    (lambda ds: ds.assign_attrs(pcmx_type="family"), "dataset: missing variable 'spatial_basis'"),
    (_z, "dataset: psf_basis is 2D but coefficients is 3D"),
    (lambda ds: ds.assign(psf_basis=ds["psf_basis"].where(ds["ky"] != 0)),
     "dataset: psf_basis contains 21 NaN or infinite values (of 147)"),
    (lambda ds: ds.assign(psf_basis=ds["psf_basis"].where(ds["ky"] != 0, np.inf)),
     "dataset: psf_basis contains 21 NaN or infinite values (of 147)"),
    (lambda ds: ds.assign(coefficients=ds["coefficients"].where(ds["x"] > 0)),
     "dataset: coefficients contains 96 NaN or infinite values (of 3840)"),
]


@pytest.mark.parametrize("mutate, message", OP_ERRORS)
def test_bad_operator_messages(mutate, message):
    with pytest.raises(SchemaError) as err:
        validate(mutate(make_operator()))
    assert str(err.value) == message
    assert isinstance(err.value, PcmxError)


def test_even_kernel_is_refused_naming_the_axis_and_size():
    with pytest.raises(SchemaError) as err:
        validate(make_operator().isel(kx=slice(0, 6)), source="op.zarr")
    assert str(err.value) == "op.zarr: variable 'psf_basis': kernel sides must be odd, got 6 (axis 2 of its shape)"


def test_newer_schema_version_is_refused_older_accepted():
    major, minor = (int(p) for p in SCHEMA_VERSION.split("."))
    ds = make_operator()
    with pytest.raises(SchemaError) as err:
        validate(ds.assign_attrs(pcmx_schema_version=f"{major}.{minor + 1}"), source="s.zarr")
    assert str(err.value) == (f"s.zarr: written with pcmx schema {major}.{minor + 1}, newer than the "
                              f"{SCHEMA_VERSION} this pcmx reads; upgrade pcmx")
    assert validate(ds.assign_attrs(pcmx_schema_version=SCHEMA_VERSION)) is not None
    assert validate(ds.assign_attrs(pcmx_schema_version="0.9")) is not None


def test_require_provenance_names_the_first_missing_attribute():
    ds = make_operator()
    with pytest.raises(SchemaError) as err:
        validate(ds, require_provenance=True)
    assert str(err.value) == "dataset: missing provenance attribute 'pcmx_schema_version'"
    prov = provenance()
    del prov["pcmx_inputs"]
    with pytest.raises(SchemaError) as err:
        validate(ds.assign_attrs(prov), require_provenance=True)
    assert str(err.value) == "dataset: missing provenance attribute 'pcmx_inputs'"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f.drop_vars("gamma"), "dataset: missing variable 'gamma'"),
        (lambda f: f.drop_vars("state"), "dataset: missing coordinate 'state'"),
        (lambda f: f.transpose("component", "state", "mode", ...),
         "dataset: variable 'gamma' dims is ['component', 'state', 'mode'], expected ['state', 'component', 'mode']"),
        (lambda f: f.assign_attrs(pcmx_type="operator"), "dataset: missing variable 'coefficients'"),
    ],
)
def test_bad_family_messages(mutate, message):
    with pytest.raises(SchemaError) as err:
        validate(mutate(make_family()))
    assert str(err.value) == message


def test_summarize_reads_no_array_data():
    """A store's maps are validated from metadata alone: computing them here would raise."""

    def explode():
        raise AssertionError("array data was read")

    ds = make_operator()
    lazy = da.from_delayed(dask.delayed(explode)(), shape=ds["coefficients"].shape, dtype=np.float32)
    ds = ds.assign(coefficients=(ds["coefficients"].dims, lazy))
    doc = summarize(ds)
    assert doc["data_vars"]["coefficients"] == {
        "dims": ["component", "y", "x"], "shape": [3, 32, 40], "dtype": "float32", "attrs": {}}
    assert doc["coords"]["x"]["attrs"] == {"units": "micrometer"}
    assert doc["attrs"] == {"pcmx_type": "operator"}
    assert validate(ds, check_values=False) is ds  # only the small basis is read
    assert validate(ds, check_values="in-memory") is ds
    with pytest.raises(AssertionError, match="array data was read"):
        validate(ds)  # the default reads the maps' values (to refuse NaN or inf)


def test_check_values_argument_is_checked():
    with pytest.raises(SchemaError, match=r"^check_values='yes': expected True, False or 'in-memory'$"):
        validate(make_operator(), check_values="yes")
