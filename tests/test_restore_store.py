"""pcmx.io.chunked: a lazy restoration written to a Zarr store chunk by chunk, resumable (issue 15).

A killed write (a callback raising after k chunks, and a real SIGKILL of a child process)
resumes from its finished chunks and gives exactly the store of an uninterrupted run; a
partial store of other inputs is refused; the final path never holds a half-written store;
plain ``xr.open_zarr`` opens the result silently and lazily, with units and provenance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from conftest import make_operator, make_operator3d

import pcmx
from pcmx.deblur.baselines import estimate_offset
from pcmx.errors import InputError, StoreExistsError
from pcmx.io.chunked import (
    input_record,
    partial_path,
    write_chunked,
)
from pcmx.io.readers import open_image_lazy
from pcmx.io.tiff import write_tiff
from pcmx.operator import ProductConvolution
from pcmx.restore import restore
from pcmx.units import spatial_coords

SHAPE = (70, 83)  # odd: chunks of 24 leave ragged edges
PX = 0.065


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def scene():
    op = make_operator(shape=SHAPE, ksize=7, n_components=2, pixel_size=PX)
    rng = np.random.default_rng(3)
    u = np.zeros(SHAPE, np.float32)
    u[rng.integers(0, SHAPE[0], 30), rng.integers(0, SHAPE[1], 30)] = 500.0
    y = rng.poisson(np.clip(ProductConvolution(op).apply(u), 0, None) + 100.0).astype(np.float32)
    return op, y


def _lazy(scene, iterations=5):
    op, y = scene
    return restore(da.from_array(y), op, method="rl", iterations=iterations, chunks=24,
                   offset=estimate_offset(y))


def _write(arr, path, **kw):
    return write_chunked(arr, path, dims=("y", "x"), coords=spatial_coords(SHAPE, PX),
                         attrs={"method": "rl"}, progress=False, **kw)


def _kill_after(k, final):
    def callback(index, done, total):
        assert not os.path.exists(final)  # mid-write: nothing at the final path
        if done == k:
            raise Killed(f"killed after {k} chunks")
    return callback


@pytest.fixture(scope="module")
def whole(scene, tmp_path_factory):
    """The lazy restoration and its store written without interruption."""
    arr = _lazy(scene)
    path = tmp_path_factory.mktemp("whole") / "whole.zarr"
    return arr, path, _write(arr, path, fingerprint={"arguments": {"case": 1}})


def test_written_store_equals_the_computed_array_and_opens_silently_and_lazily(tmp_path, whole):
    arr, path, w = whole
    assert (w.chunks, w.resumed) == (3 * 4, 0)  # tiles of 24 px
    assert os.listdir(path.parent) == ["whole.zarr"]  # no partial, no lock left
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(path)
    assert isinstance(ds["restored"].data, da.Array)  # lazy
    assert ds["restored"].dims == ("y", "x") and ds["restored"].dtype == np.float32
    assert ds["x"].attrs["units"] == "micrometer" and float(ds["x"][1]) == pytest.approx(PX)
    assert ds.attrs["pcmx_type"] == "restoration" and "pcmx_created" in ds.attrs
    np.testing.assert_array_equal(ds["restored"].values, arr.compute())
    assert pcmx.open_store(path, kind="restoration")["restored"].shape == SHAPE
    with pytest.raises(StoreExistsError, match=r"whole\.zarr: already exists; use overwrite=True"):
        _write(arr, path)


def test_a_killed_write_resumes_and_equals_an_uninterrupted_one(tmp_path, whole):
    arr, path, _ = whole
    final = tmp_path / "r.zarr"
    with pytest.raises(Killed), dask.config.set(scheduler="synchronous"):  # no task left running
        _write(arr, final, fingerprint={"arguments": {"case": 1}}, callback=_kill_after(5, final))
    assert not final.exists()
    partial = partial_path(final)
    with open(os.path.join(partial, "done.log")) as f:
        listed = {tuple(int(v) for v in line.split(",")) for line in f.read().split("\n")[:-1]}
    assert len(listed) == 5
    # a chunk of a killed run that is not listed is rewritten: damage one
    store = os.path.join(partial, "store", "restored", "c")
    unlisted = next((i, j) for i in range(3) for j in range(4) if (i, j) not in listed)
    os.makedirs(os.path.join(store, str(unlisted[0])), exist_ok=True)
    with open(os.path.join(store, *map(str, unlisted)), "wb") as f:
        f.write(b"half a chunk")
    with open(os.path.join(partial, "done.log"), "a") as f:
        f.write("2,")  # a line cut by the kill
    w = _write(arr, final, fingerprint={"arguments": {"case": 1}})
    assert w.resumed == 5 and w.chunks == 12
    assert not os.path.exists(partial)
    np.testing.assert_array_equal(xr.open_zarr(final)["restored"].values,
                                  xr.open_zarr(path)["restored"].values)
    assert not any(n.endswith(".partial") for _, _, files in os.walk(final) for n in files)


def test_a_partial_store_of_other_inputs_is_refused_or_discarded(tmp_path, scene):
    y = da.from_array(scene[1], chunks=24)
    final = tmp_path / "r.zarr"
    with pytest.raises(Killed), dask.config.set(scheduler="synchronous"):
        _write(y * 5, final, fingerprint={"arguments": {"iterations": 5}}, callback=_kill_after(2, final))
    with pytest.raises(InputError, match=r"r\.zarr: an interrupted write in .*\.r\.zarr\.pcmx-partial "
                                         r"was made with other inputs or parameters \(differs in: "
                                         r"iterations=5 -> 6\); rerun with the same ones"):
        _write(y * 6, final, fingerprint={"arguments": {"iterations": 6}})
    assert os.path.isdir(partial_path(final)) and not final.exists()
    w = _write(y * 6, final, fingerprint={"arguments": {"iterations": 6}}, overwrite=True)
    assert w.resumed == 0
    np.testing.assert_array_equal(xr.open_zarr(final)["restored"].values, scene[1] * 6)
    # resume=False starts over a partial of the same inputs
    with pytest.raises(Killed), dask.config.set(scheduler="synchronous"):
        _write(y * 6, tmp_path / "s.zarr", callback=_kill_after(3, tmp_path / "s.zarr"))
    assert _write(y * 6, tmp_path / "s.zarr", resume=False).resumed == 0


_CHILD = textwrap.dedent("""
    import os, signal, sys
    import dask.array as da, numpy as np
    import pcmx
    from pcmx.io.chunked import write_chunked
    from pcmx.units import spatial_coords
    y = np.load(sys.argv[1])
    arr = da.from_array(y, chunks=16) * 2 + 1
    def die(index, done, total):
        if done == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    with pcmx.set_options(threads=1):
        write_chunked(arr, sys.argv[2], dims=("y", "x"), coords=spatial_coords(y.shape, 0.1),
                      progress=False, fingerprint={"arguments": {"k": 1}}, callback=die)
""")


def test_a_sigkilled_writer_leaves_a_partial_that_resumes(tmp_path):
    y = np.random.default_rng(0).standard_normal((40, 50)).astype(np.float32)
    np.save(tmp_path / "y.npy", y)
    final = tmp_path / "out.zarr"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "y.npy"), str(final)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not final.exists() and os.path.isdir(partial_path(final))
    w = write_chunked(da.from_array(y, chunks=16) * 2 + 1, final, dims=("y", "x"),
                      coords=spatial_coords(y.shape, 0.1), progress=False,
                      fingerprint={"arguments": {"k": 1}})
    assert w.resumed >= 3 and w.chunks == 12
    np.testing.assert_array_equal(xr.open_zarr(final)["restored"].values, y * 2 + 1)


def test_3d_restoration_written_by_chunks_equals_the_tiled_result(tmp_path):
    op = make_operator3d(shape=(7, 16, 18), ksize=(3, 5, 5))
    y = np.random.default_rng(1).uniform(50, 150, (7, 16, 18)).astype(np.float32)
    arr = restore(da.from_array(y), op, method="rl", iterations=2, chunks=(5, 9, 11),
                  offset=estimate_offset(y))
    write_chunked(arr, tmp_path / "r3.zarr", dims=("z", "y", "x"),
                  coords=spatial_coords(y.shape, (0.3, 0.1, 0.1)), progress=False)
    ds = xr.open_zarr(tmp_path / "r3.zarr")
    assert ds["restored"].dims == ("z", "y", "x") and ds["z"].attrs["units"] == "micrometer"
    np.testing.assert_array_equal(ds["restored"].values, arr.compute())


def test_write_inside_a_zarr_hierarchy_and_as_ome_zarr(tmp_path):
    from pcmx.io.chunked import ome_multiscales

    y = da.from_array(np.arange(30 * 20, dtype=np.float32).reshape(30, 20), chunks=(7, 20))
    root = tmp_path / "image.zarr"
    pcmx.io.store.group_dir(root, "raw", create=True)
    w = write_chunked(y, root, group="pcmx/restoration", dims=("y", "x"),
                      coords=spatial_coords(y.shape, 0.2), progress=False)
    assert w.path == str(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(root, group="pcmx/restoration")
    np.testing.assert_array_equal(ds["restored"].values, y.compute())
    ome = tmp_path / "r.ome.zarr"
    write_chunked(y, ome, dims=("y", "x"), coords=spatial_coords(y.shape, 0.2), progress=False,
                  ome=ome_multiscales(("y", "x"), (0.2, 0.2)))
    with open(ome / "zarr.json") as f:
        meta = json.load(f)["attributes"]["ome"]
    assert meta["version"] == "0.5" and meta["multiscales"][0]["datasets"][0]["path"] == "restored"
    assert meta["multiscales"][0]["axes"][1] == {"name": "x", "type": "space", "unit": "micrometer"}
    again = pcmx.io.readers.read_image(ome)  # an OME-Zarr reader finds the image and its scale
    assert again.shape == (30, 20) and float(again["x"][1]) == pytest.approx(0.2)


def test_lazy_reading_and_the_blockwise_offset(tmp_path, scene):
    _, y = scene
    write_tiff(tmp_path / "y.tif", y.astype(np.uint16), PX)
    np.save(tmp_path / "y.npy", y)
    for name in ("y.tif", "y.npy"):
        img = open_image_lazy(tmp_path / name, chunks=32, pixel_size="65nm")
        assert isinstance(img.data, da.Array) and img.data.chunks[0] == (32, 32, 6)
        np.testing.assert_array_equal(img.values, y.astype(img.dtype))
        assert img["y"].attrs["units"] == "micrometer"
    assert estimate_offset(da.from_array(y, chunks=(17, 30))) == estimate_offset(y)
    rec = input_record(tmp_path / "y.npy")
    assert rec["size"] == os.path.getsize(tmp_path / "y.npy") and "mtime_ns" in rec
