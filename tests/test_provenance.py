"""pcmx.provenance: file hashes, JSON-safe values, the attributes every result carries."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_operator

import pcmx
from pcmx.provenance import SCHEMA_VERSION, dumps, jsonable, provenance, sha256_file

ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2 example
EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_sha256_file_known_digests(tmp_path):
    (tmp_path / "abc").write_bytes(b"abc")
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "abc") == ABC
    assert sha256_file(str(tmp_path / "abc"), chunk=1) == ABC  # block by block gives the same
    assert sha256_file(tmp_path / "empty") == EMPTY
    big = np.random.default_rng(0).bytes(10_000)
    (tmp_path / "big").write_bytes(big)
    assert sha256_file(tmp_path / "big", chunk=999) == hashlib.sha256(big).hexdigest()


def test_sha256_of_a_directory_is_its_sorted_relative_paths_and_contents(tmp_path):
    store = tmp_path / "s.zarr"
    (store / "b").mkdir(parents=True)
    (store / "zarr.json").write_bytes(b"{}")
    (store / "b" / "c").write_bytes(b"xyz")
    (store / "a").write_bytes(b"abc")
    h = hashlib.sha256()
    for rel, content in (("a", b"abc"), ("zarr.json", b"{}"), ("b/c", b"xyz")):  # files of a dir first
        h.update(rel.encode())
        h.update(content)
    assert sha256_file(store) == h.hexdigest()
    before = sha256_file(store)
    (store / "a").rename(store / "a2")  # same bytes, another name: another store
    assert sha256_file(store) != before
    (store / "a2").rename(store / "a")
    assert sha256_file(store) == before


@pytest.mark.parametrize(
    "value, expected",
    [
        (np.float32(1.5), 1.5),
        (np.float64(0.25), 0.25),
        (np.int64(3), 3),
        (np.uint8(255), 255),
        (np.bool_(True), True),
        (np.str_("a"), "a"),
        (np.array([[1, 2], [3, 4]], dtype=np.int32), [[1, 2], [3, 4]]),
        ((1, (2, 3)), [1, [2, 3]]),
        ({1: np.float32(2.0), "k": [np.int16(4)]}, {"1": 2.0, "k": [4]}),
        (Path("dir") / "f.tif", str(Path("dir") / "f.tif")),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (np.float64("nan"), "nan"),
        (np.float32("-inf"), "-inf"),
        (np.array([1.0, np.nan]), [1.0, "nan"]),
        (None, None),
        ({1, 2}, "{1, 2}"),
    ],
)
def test_jsonable(value, expected):
    got = jsonable(value)
    assert got == expected
    assert type(got) is type(expected)
    json.dumps(got, allow_nan=False)  # strict JSON: no NaN or Infinity tokens


def test_jsonable_never_leaves_a_numpy_type():
    for v in (np.longdouble(1.5), np.float16(2.0), np.complex64(1 + 2j), np.datetime64("2020-01-01")):
        json.dumps(jsonable({"v": v}), allow_nan=False)


def test_provenance_records_parameters_and_inputs(tmp_path):
    (tmp_path / "beads.tif").write_bytes(b"abc")
    store = tmp_path / "op.zarr"
    store.mkdir()
    (store / "zarr.json").write_bytes(b"{}")
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    attrs = provenance({"pixel_size": np.float64(0.065), "shape": (3, 4), "path": tmp_path / "x"},
                       [tmp_path / "beads.tif", str(store) + "/", "not-a-file.tif", ("remote.zarr", "f00")])
    after = dt.datetime.now(dt.UTC)
    assert set(attrs) == {"pcmx_schema_version", "pcmx_version", "pcmx_created", "pcmx_parameters", "pcmx_inputs"}
    assert attrs["pcmx_schema_version"] == SCHEMA_VERSION
    assert attrs["pcmx_version"] == pcmx.__version__
    created = dt.datetime.fromisoformat(attrs["pcmx_created"])
    assert created.utcoffset() == dt.timedelta(0) and before <= created <= after
    assert attrs["pcmx_parameters"] == {"pixel_size": 0.065, "shape": [3, 4], "path": str(tmp_path / "x")}
    assert attrs["pcmx_inputs"] == [
        {"name": "beads.tif", "sha256": ABC},
        {"name": "op.zarr", "sha256": sha256_file(store)},
        {"name": "not-a-file.tif", "sha256": None},
        {"name": "remote.zarr", "sha256": "f00"},
    ]
    json.dumps(attrs, allow_nan=False)


def test_provenance_defaults_and_validates():
    attrs = provenance()
    assert attrs["pcmx_parameters"] == {} and attrs["pcmx_inputs"] == []
    ds = make_operator().assign_attrs(attrs)
    assert pcmx.validate(ds, require_provenance=True) is ds


def test_dumps_is_sorted_indented_json():
    text = dumps({"b": np.int64(1), "a": [np.float32(0.5)]})
    assert text == '{\n  "a": [\n    0.5\n  ],\n  "b": 1\n}'
