import errno
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from conftest import make_operator

import pcmx
from pcmx.errors import SchemaError, StoreError, StoreExistsError, StoreLockedError
from pcmx.io.atomic import writer_lock
from pcmx.io.readers import PcmxWarning


def test_round_trip_keeps_values_dtypes_units_and_provenance(tmp_path, operator_ds):
    path = tmp_path / "op.zarr"
    pcmx.save_store(operator_ds, path)
    ds = pcmx.open_store(path)
    assert ds["coefficients"].chunks is not None  # lazy, dask-backed
    for name in ("psf_basis", "coefficients"):
        assert ds[name].dtype == np.float32
        np.testing.assert_array_equal(ds[name].values, operator_ds[name].values)
    assert ds["x"].attrs["units"] == "micrometer"
    np.testing.assert_allclose(float(ds["x"][1] - ds["x"][0]), 0.065)
    assert ds.attrs["pcmx_type"] == "operator"
    assert ds.attrs["pcmx_schema_version"] == "1.0"
    assert ds.attrs["pcmx_version"] == pcmx.__version__
    q = ds.pint.quantify()
    assert q["x"].pint.units == pcmx.units.ureg.micrometer
    assert q["x"].pint.magnitude[1] == pytest.approx(0.065)
    # plain xarray reads it too (the store layout is a contract)
    plain = xr.open_zarr(path, consolidated=False)
    assert plain["psf_basis"].dims == ("component", "ky", "kx")


def test_quantify_gives_micrometer_coordinates(tmp_path, operator_ds):
    pcmx.save_store(operator_ds, tmp_path / "op.zarr")
    q = pcmx.open_store(tmp_path / "op.zarr").pint.quantify()
    assert q.pint.dequantify()["x"].attrs["units"] in ("micrometer", "µm")


def test_refuses_overwrite_and_overwrites_when_asked(tmp_path, operator_ds):
    path = tmp_path / "op.zarr"
    pcmx.save_store(operator_ds, path)
    with pytest.raises(StoreExistsError, match=r"op.zarr: already exists; use overwrite=True"):
        pcmx.save_store(operator_ds, path)
    other = make_operator(seed=3)
    pcmx.save_store(other, path, overwrite=True)
    np.testing.assert_array_equal(pcmx.open_store(path)["coefficients"].values, other["coefficients"].values)
    assert [p.name for p in tmp_path.iterdir()] == ["op.zarr"]  # no temporary siblings left


def test_never_replaces_a_non_store(tmp_path, operator_ds):
    path = tmp_path / "data"
    path.mkdir()
    (path / "precious.txt").write_text("keep me")
    with pytest.raises(StoreExistsError, match="is not a pcmx store; refusing to replace it"):
        pcmx.save_store(operator_ds, path, overwrite=True)
    assert (path / "precious.txt").read_text() == "keep me"


def test_failure_mid_write_leaves_old_store_intact(tmp_path, operator_ds, monkeypatch):
    path = tmp_path / "op.zarr"
    pcmx.save_store(operator_ds, path)
    before = operator_ds["coefficients"].values.copy()
    real = xr.Dataset.to_zarr

    def crash(self, target, *a, **k):
        real(self, target, *a, **k)  # the data reach the temporary store ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... and then the disk is full

    monkeypatch.setattr(xr.Dataset, "to_zarr", crash)
    with pytest.raises(StoreError, match=r"op.zarr: write failed \(OSError: \[Errno 28\] No space left on "
                                         r"device\); nothing changed"):
        pcmx.save_store(make_operator(seed=5), path, overwrite=True)
    monkeypatch.undo()
    np.testing.assert_array_equal(pcmx.open_store(path)["coefficients"].values, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["op.zarr"]


def test_a_store_left_aside_by_a_killed_replacement_is_restored_on_open(tmp_path, operator_ds, monkeypatch):
    # what pcmx before issue 13 left when killed between its two renames: no store at the path
    path = tmp_path / "op.zarr"
    pcmx.save_store(operator_ds, path)
    os.rename(path, tmp_path / ".op.zarr.pcmx-old-0123abcd")
    shutil.copytree(tmp_path / ".op.zarr.pcmx-old-0123abcd", tmp_path / ".op.zarr.pcmx-tmp-4567cdef")
    real = os.rename

    def refused(*a):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", refused)  # e.g. a read-only directory: said, not hidden
    with pytest.raises(StoreError, match=r"op.zarr: no such store; a replacement was interrupted and the "
                                         r"previous store is at .op.zarr.pcmx-old-0123abcd, which cannot be "
                                         r"renamed back \(PermissionError"):
        pcmx.open_store(path)
    monkeypatch.setattr(os, "rename", real)
    with pytest.warns(PcmxWarning, match=r"op.zarr: restored the previous store from "
                                         r".op.zarr.pcmx-old-0123abcd \(its replacement was interrupted\)"):
        ds = pcmx.open_store(path)
    np.testing.assert_array_equal(ds["coefficients"].values, operator_ds["coefficients"].values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["op.zarr"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pcmx.open_store(path)  # once restored, nothing more to say


def test_save_store_under_another_writer_refuses_and_leaves_everything(tmp_path, operator_ds):
    path = tmp_path / "op.zarr"
    pcmx.save_store(operator_ds, path)
    with writer_lock(path):
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(StoreLockedError, match=rf"op.zarr: being written by pid {os.getpid()} on host "):
            pcmx.save_store(make_operator(seed=3), path, overwrite=True)
        with pytest.raises(StoreLockedError, match="being written by"):
            pcmx.save_store(make_operator(seed=3), tmp_path / "op.zarr")  # checked under the lock
        assert sorted(p.name for p in tmp_path.iterdir()) == before == [".op.zarr.pcmx-lock", "op.zarr"]
    np.testing.assert_array_equal(pcmx.open_store(path)["coefficients"].values, operator_ds["coefficients"].values)
    assert [p.name for p in tmp_path.iterdir()] == ["op.zarr"]


def test_invalid_dataset_writes_nothing(tmp_path, operator_ds):
    bad = operator_ds.drop_vars("coefficients")
    with pytest.raises(SchemaError, match="missing variable 'coefficients'"):
        pcmx.save_store(bad, tmp_path / "bad.zarr")
    assert not (tmp_path / "bad.zarr").exists()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda ds: ds.assign_attrs(pcmx_type="family"), "missing variable 'spatial_basis'"),
        (lambda ds: ds.drop_vars("psf_basis"), "missing variable 'psf_basis'"),
        (lambda ds: ds.rename_dims(kx="kk"), "variable 'psf_basis' dims is"),
        (lambda ds: ds.isel(kx=slice(0, 6)), r"variable 'psf_basis'(: kernel sides must be odd| shape 2)"),
        (lambda ds: ds.assign(psf_basis=ds.psf_basis.where(ds.ky != 0)), r"psf_basis contains (\d+ )?NaN"),
        (lambda ds: ds.assign_attrs(pcmx_schema_version="2.0"), "newer than the 1.0 this pcmx reads"),
        (lambda ds: ds.assign_attrs(pcmx_type=None) if False else ds.drop_attrs(), "not a pcmx result"),
    ],
)
def test_schema_errors(operator_ds, mutate, message):
    with pytest.raises(SchemaError, match=message):
        pcmx.validate(mutate(operator_ds))


def test_open_rejects_wrong_kind_and_non_stores(tmp_path, operator_ds):
    pcmx.save_store(operator_ds, tmp_path / "op.zarr")
    with pytest.raises(SchemaError, match="is a pcmx 'operator' store, expected 'family'"):
        pcmx.open_store(tmp_path / "op.zarr", kind="family")
    with pytest.raises(StoreError, match="no such store"):
        pcmx.open_store(tmp_path / "missing.zarr")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="not a Zarr store"):
        pcmx.open_store(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a Zarr store"):
        pcmx.open_store(tmp_path / "empty")


def test_open_rejects_a_newer_store_on_disk(tmp_path, operator_ds):
    path = tmp_path / "op.zarr"
    pcmx.save_store(operator_ds, path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["pcmx_schema_version"] = "9.0"
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(SchemaError, match="written with pcmx schema 9.0"):
        pcmx.open_store(path)


def test_packaged_schemas_match_repository_copies():
    root = Path(__file__).resolve().parents[1]
    for f in (root / "schemas").glob("*.json"):
        assert json.loads(f.read_text()) == json.loads((root / "pcmx" / "schemas" / f.name).read_text())


def test_fsspec_memory_url(operator_ds):
    url = "memory://pcmx-test/op.zarr"
    pcmx.save_store(operator_ds, url)
    ds = pcmx.open_store(url)
    np.testing.assert_array_equal(ds["psf_basis"].values, operator_ds["psf_basis"].values)
    with pytest.raises(StoreExistsError):
        pcmx.save_store(operator_ds, url)


# -- issue 14: consolidated metadata, groups, OME-Zarr hierarchies --------------------------------
def test_plain_open_zarr_is_silent(tmp_path, operator_ds):
    path = tmp_path / "op.zarr"
    pcmx.save_store(operator_ds, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # xarray's "Failed to open ... consolidated metadata"
        plain = xr.open_zarr(path)
    assert plain["psf_basis"].dims == ("component", "ky", "kx")
    assert json.loads((path / "zarr.json").read_text())["consolidated_metadata"]["metadata"]


def _ome_image(path):
    import zarr

    root = zarr.open_group(path, mode="w-", zarr_format=3)
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": "y"}, {"name": "x"}],
                                                            "datasets": [{"path": "0"}]}]}
    root.create_array("0", shape=(8, 8), dtype="uint16")
    return path


def test_accessor_saves_into_a_group_of_an_ome_zarr(tmp_path, operator_ds):
    image = _ome_image(tmp_path / "img.ome.zarr")
    assert operator_ds.pcmx.save(image, group="pcmx/operator") == str(image)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = xr.open_zarr(image, group="pcmx/operator")
    assert plain.attrs["pcmx_type"] == "operator"
    ds = pcmx.open_store(image, group="pcmx/operator", kind="operator")
    np.testing.assert_array_equal(ds["coefficients"].values, operator_ds["coefficients"].values)
    with pytest.raises(StoreExistsError, match="already exists"):
        operator_ds.pcmx.save(image, group="pcmx/operator")
    operator_ds.pcmx.save(image, group="pcmx/operator", overwrite=True)
    assert sorted(p.name for p in (image / "pcmx").iterdir()) == ["operator", "zarr.json"]
    from pcmx.io.store import find_stores

    assert find_stores(image) == [("pcmx/operator", "operator")]


def test_opening_an_ome_zarr_names_the_pcmx_groups_inside(tmp_path, operator_ds):
    image = _ome_image(tmp_path / "img.ome.zarr")
    with pytest.raises(StoreError, match="not a pcmx store; no pcmx store inside it"):
        pcmx.open_store(image)
    operator_ds.pcmx.save(image, group="pcmx/operator")
    with pytest.raises(StoreError, match=r"pcmx stores inside it: 'pcmx/operator' \(operator\)"):
        pcmx.open_store(image)
    with pytest.raises(StoreError, match=r"no group 'pcmx/nope'; pcmx stores inside it"):
        pcmx.open_store(image, group="pcmx/nope")


@pytest.mark.parametrize("group", ["", "../x", "a/.hidden"])
def test_group_must_be_a_path_of_names(tmp_path, operator_ds, group):
    with pytest.raises(StoreError, match="give a path of group names"):
        pcmx.save_store(operator_ds, tmp_path / "img.zarr", group=group)


def test_group_refused_in_a_zarr_v2_hierarchy(tmp_path, operator_ds):
    import zarr

    zarr.open_group(tmp_path / "v2.zarr", mode="w-", zarr_format=2)
    with pytest.raises(StoreError, match="Zarr v2 hierarchy"):
        pcmx.save_store(operator_ds, tmp_path / "v2.zarr", group="pcmx/operator")
