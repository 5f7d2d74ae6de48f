"""``pcmx deblur ... -o OUT.zarr``: the restoration written chunk by chunk (issue 15).

The store equals the in-memory tiled restoration; a run killed after some chunks resumes and
gives the same store as an uninterrupted run; a rerun with other arguments is refused (exit
2, one line) unless --overwrite; bad outputs and schedulers are refused before any work with
the disk unchanged; a local cluster of two processes writes the same store as threads.
"""

from __future__ import annotations

import os
import warnings

import dask
import numpy as np
import pytest
import xarray as xr
from conftest import make_operator, make_operator3d
from test_cli_corpus import snapshot

import pcmx
import pcmx.io.chunked as chunked
import pcmx.io.readers as readers
from pcmx.cli import main
from pcmx.deblur.baselines import estimate_offset
from pcmx.io.tiff import write_tiff
from pcmx.operator import ProductConvolution
from pcmx.restore import TILED_TOLERANCE, restore

SHAPE = (64, 75)
PX = 0.065


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("deblur-store")
    op = make_operator(shape=SHAPE, ksize=7, n_components=2, pixel_size=PX)
    pcmx.save_store(op, d / "op.zarr")
    rng = np.random.default_rng(5)
    u = np.zeros(SHAPE, np.float32)
    u[rng.integers(0, SHAPE[0], 25), rng.integers(0, SHAPE[1], 25)] = 400.0
    y = rng.poisson(np.clip(ProductConvolution(op).apply(u), 0, None) + 100.0).astype(np.uint16)
    write_tiff(d / "img.tif", y, PX)
    return d


def _args(data, out, *extra):
    return ["deblur", str(data / "img.tif"), "--operator", str(data / "op.zarr"), "--method", "rl",
            "--iterations", "4", "--chunks", "24", "-o", str(out), "--no-progress", *extra]


def _restored(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plain xr.open_zarr is silent
        return xr.open_zarr(path)["restored"].values


def test_zarr_output_equals_the_tiled_restoration(tmp_path, data, capsys):
    assert main(_args(data, tmp_path / "r.zarr")) == 0
    assert "wrote " in capsys.readouterr().out
    ds = pcmx.open_store(tmp_path / "r.zarr", kind="restoration")
    assert ds["restored"].data.chunksize == (24, 24)  # the tiles
    assert ds["x"].attrs["units"] == "micrometer" and ds.attrs["method"] == "rl"
    assert ds.attrs["pcmx_inputs"][0]["name"] == "img.tif" and ds.attrs["pcmx_inputs"][0]["sha256"]
    y = np.asarray(pcmx.io.readers.read_image(data / "img.tif").values, np.float32)
    ref = restore(y, pcmx.open_store(data / "op.zarr").load(), method="rl", iterations=4, chunks=24,
                  offset=estimate_offset(y))
    np.testing.assert_allclose(_restored(tmp_path / "r.zarr"), ref, rtol=0, atol=1e-6 * float(ref.max()))


def test_a_killed_run_resumes_and_other_arguments_are_refused(tmp_path, data, capsys, monkeypatch):
    assert main(_args(data, tmp_path / "whole.zarr")) == 0
    real = chunked.write_chunked

    def killed_after_3(*args, **kw):
        def die(index, done, total):
            if done == 3:
                raise KeyboardInterrupt
        return real(*args, **kw, callback=die)

    out = tmp_path / "r.zarr"
    monkeypatch.setattr(chunked, "write_chunked", killed_after_3)
    with dask.config.set(scheduler="synchronous"):
        assert main(_args(data, out)) == 130
    monkeypatch.setattr(chunked, "write_chunked", real)
    assert not out.exists() and os.path.isdir(chunked.partial_path(out))
    capsys.readouterr()
    # other arguments: refused, the partial store and the disk unchanged
    before = snapshot(tmp_path)
    assert main(_args(data, out, "--offset", "90")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "an interrupted write in" in err and "offset=" in err
    assert "rerun with the same ones to resume it, or overwrite=True (--overwrite)" in err
    assert snapshot(tmp_path) == before
    # the same arguments: resumed, the same store as the uninterrupted run
    assert main(_args(data, out)) == 0
    assert "(3 written by an interrupted run)" in capsys.readouterr().out
    np.testing.assert_array_equal(_restored(out), _restored(tmp_path / "whole.zarr"))
    assert not os.path.exists(chunked.partial_path(out))


@pytest.mark.parametrize(("extra", "output", "message"), [
    ((), "missing/r.zarr", r"--output .*missing/r\.zarr: directory .*missing does not exist \(pcmx "
                           r"creates no parent directories: create it first\)"),
    ((), "exists.zarr", r"--output .*exists\.zarr: already exists; use --overwrite to replace it"),
    ((), "notastore.zarr", None),
    ((), "r.png", r"--output .*r\.png: give OUT\.tif \(TIFF\), OUT\.zarr \(Zarr store\) or OUT\.ome\.zarr"),
    (("--scheduler", "local:0"), "r.zarr", r"--scheduler local:0: expected local:N with N >= 1 workers"),
    (("--scheduler", "no where"), "r.zarr", r"--scheduler no where: not a scheduler address"),
    (("--memory-limit", "lots"), "r.zarr", r"--memory-limit lots: not a memory size"),
    (("--memory-limit", "1GB"), "r.zarr", r"--memory-limit is the limit of the workers of --scheduler local:N"),
    (("--store", "s.zarr"), "r.zarr", r"--store holds the whole Sparse\+Smooth result"),
])
def test_bad_outputs_and_schedulers_exit_2_before_any_work(tmp_path, data, capsys, extra, output, message):
    pcmx.save_store(make_operator(shape=(8, 8), ksize=3, n_components=1), tmp_path / "exists.zarr")
    (tmp_path / "notastore.zarr").mkdir()
    (tmp_path / "notastore.zarr" / "keep.txt").write_text("keep me\n")
    before = snapshot(tmp_path, data)
    assert main(_args(data, tmp_path / output, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pcmx deblur: error: ") and "\n" not in err
    if message is None:  # an existing directory that is no store
        message = r"notastore\.zarr: already exists; use --overwrite"
    assert __import__("re").search(message, err), err
    assert snapshot(tmp_path, data) == before


def test_a_local_cluster_of_two_processes_writes_the_same_store_as_threads(tmp_path, data):
    assert main(_args(data, tmp_path / "threads.zarr")) == 0
    assert main(_args(data, tmp_path / "procs.ome.zarr", "--scheduler", "local:2",
                      "--memory-limit", "1GB")) == 0
    np.testing.assert_array_equal(_restored(tmp_path / "procs.ome.zarr"), _restored(tmp_path / "threads.zarr"))
    again = pcmx.io.readers.read_image(tmp_path / "procs.ome.zarr")  # an OME-Zarr image too
    assert again.shape == SHAPE and float(again["x"][1]) == pytest.approx(PX)


def test_a_z_stack_restored_with_a_3d_operator_into_zarr(tmp_path):
    op = make_operator3d(shape=(7, 16, 18), ksize=(3, 5, 5))
    pcmx.save_store(op, tmp_path / "op3.zarr")
    y = np.random.default_rng(1).uniform(50, 150, (7, 16, 18)).astype(np.float32)
    write_tiff(tmp_path / "stack.tif", y, 0.1, z_step_um=0.3)
    assert main(["deblur", str(tmp_path / "stack.tif"), "--operator", str(tmp_path / "op3.zarr"),
                 "--method", "rl", "--iterations", "3", "--chunks", "9", "-o",
                 str(tmp_path / "r3.zarr"), "--no-progress"]) == 0
    ds = xr.open_zarr(tmp_path / "r3.zarr")
    assert ds["restored"].dims == ("z", "y", "x") and float(ds["z"][1]) == pytest.approx(0.3)
    ref = restore(y, op, method="rl", iterations=3)  # in memory
    assert float(np.abs(ds["restored"].values - ref).max() / ref.max()) < TILED_TOLERANCE


def test_the_image_is_read_by_regions_and_one_channel_of_a_hyperstack(tmp_path, data, monkeypatch):
    import tifffile

    import pcmx.commands.deblur as deblur_command

    regions = []
    real = readers._TiffRegions.__getitem__

    def read(self, key):
        out = real(self, key)
        regions.append(out.shape)
        return out

    def whole(*args, **kw):
        raise AssertionError("the TIFF was read whole")

    monkeypatch.setattr(readers._TiffRegions, "__getitem__", read)
    monkeypatch.setattr(tifffile.TiffFile, "asarray", whole)
    monkeypatch.setattr(deblur_command, "READ_BLOCK", 32)
    assert main(_args(data, tmp_path / "r.zarr")) == 0
    assert regions and max(a * b for a, b in regions) <= 32 * 32
    monkeypatch.undo()
    # channel 1 of a two-channel ImageJ hyperstack restores as that channel alone
    y = tifffile.imread(data / "img.tif")
    tifffile.imwrite(tmp_path / "two.tif", np.stack([np.zeros_like(y), y]), imagej=True,
                     metadata={"axes": "CYX"}, resolution=(1 / PX, 1 / PX),
                     resolutionunit=tifffile.RESUNIT.MICROMETER)
    args = _args(data, tmp_path / "c1.zarr", "--channel", "1")
    args[1] = str(tmp_path / "two.tif")
    assert main(args) == 0
    np.testing.assert_array_equal(_restored(tmp_path / "c1.zarr"), _restored(tmp_path / "r.zarr"))


def test_learn_family_takes_a_channel(tmp_path, data, capsys):
    import tifffile

    y = tifffile.imread(data / "img.tif")
    tifffile.imwrite(tmp_path / "two.tif", np.stack([y, y]), imagej=True, metadata={"axes": "CYX"})
    assert main(["learn-family", str(tmp_path / "two.tif"), str(tmp_path / "two.tif"), "-o",
                 str(tmp_path / "f.zarr"), "--channel", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "two.tif: channel 2 is out of range; the channels are 0, 1 (give one to" in err
    assert "--channel" in err and not (tmp_path / "f.zarr").exists()
