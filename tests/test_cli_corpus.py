"""A corpus of bad inputs (issue 13): each case asserts the exit status, the one-line message and
that nothing on disk changed (the working directory, its parent's listing and the input data,
an existing store included, are snapshot before and compared after).

Cases run the CLI in this process (``pcmx.cli.main``), a few in a subprocess (the real exit
status, stderr as a user sees it), and the Python API. Images are 96 x 96 synthetic beads and
the stores small synthetic operators and families: no case learns anything.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from conftest import make_family, make_operator

import pcmx
from pcmx.cli import main
from pcmx.commands._common import Outputs, open_input_store
from pcmx.errors import InputError, SchemaError, StoreError
from pcmx.io.tiff import write_tiff
from pcmx.schema import validate

SHAPE = (96, 96)
PX = 0.065  # um


def _beads(seed=0) -> np.ndarray:
    """Gaussian beads on a grid, a background and Poisson noise (uint16)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]].astype(np.float64)
    img = np.full(SHAPE, 100.0)
    for cy in range(16, SHAPE[0] - 8, 20):
        for cx in range(16, SHAPE[1] - 8, 20):
            img += 2000 * np.exp(-((yy - cy - rng.uniform(-1, 1)) ** 2 + (xx - cx) ** 2) / (2 * 1.5**2))
    return rng.poisson(img).astype(np.uint16)


def _corrupt_first_chunk(store, var: str) -> None:
    chunk = next(p for p in sorted((store / var / "c").rglob("*")) if p.is_file())
    chunk.write_bytes(b"these bytes are not zstd")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Inputs, shared by the cases (each case checks they are unchanged)."""
    d = tmp_path_factory.mktemp("corpus-data")
    write_tiff(d / "beads.tif", _beads(), PX)
    write_tiff(d / "const.tif", np.full(SHAPE, 100, np.uint16), PX)
    write_tiff(d / "tiny.tif", np.ones((5, 5), np.uint16), PX)
    tifffile.imwrite(d / "four.tif", np.ones((2, 3, 40, 40), np.uint16), photometric="minisblack")
    tifffile.imwrite(d / "rgb.tif", np.zeros((*SHAPE, 3), np.uint8), photometric="rgb")
    np.save(d / "rgb.npy", np.zeros((*SHAPE, 3), np.uint8))
    np.save(d / "nan.npy", np.where(np.eye(SHAPE[0]) > 0, np.nan, 1.0))
    np.save(d / "obj.npy", np.array([{"a": 1}, None], dtype=object))
    (d / "truncated.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    (d / "corrupt.tif").write_bytes(b"II*\x00" + bytes(60))
    noise = np.random.default_rng(1).poisson(100, SHAPE).astype(np.uint16)
    write_tiff(d / "noise.tif", noise, PX)
    (d / "adir").mkdir()
    pcmx.save_store(make_operator(shape=SHAPE, ksize=7, n_components=2, pixel_size=PX), d / "op.zarr")
    pcmx.save_store(make_family(shape=SHAPE, ksize=7, pixel_size=PX), d / "fam.zarr")
    shutil.copytree(d / "op.zarr", d / "opc.zarr")
    _corrupt_first_chunk(d / "opc.zarr", "coefficients")
    shutil.copytree(d / "fam.zarr", d / "famc.zarr")
    _corrupt_first_chunk(d / "famc.zarr", "spatial_basis")
    return d


@pytest.fixture
def scene(tmp_path, data):
    """The working directory of a case: a file, a directory named like a TIFF, existing outputs
    (a TIFF and a store), a directory that is not a store and a read-only directory."""
    (tmp_path / "afile").write_text("not a directory, not a store\n")
    (tmp_path / "dir.tif").mkdir()
    write_tiff(tmp_path / "exists.tif", np.ones((4, 4), np.float32))
    shutil.copytree(data / "op.zarr", tmp_path / "exists.zarr")
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "notes.txt").write_text("keep me\n")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    yield tmp_path
    (tmp_path / "ro").chmod(0o755)


def snapshot(*dirs) -> dict:
    """Every path under ``dirs`` (hidden ones included) with the SHA-1 of each file's content."""
    out = {}
    for d in dirs:
        for root, dirnames, filenames in os.walk(d):
            for name in dirnames:
                out[os.path.join(root, name)] = "dir"
            for name in filenames:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    out[path] = hashlib.sha1(f.read()).hexdigest()
    return out


def _state(scene, data):
    return snapshot(scene, data), sorted(os.listdir(scene.parent))


def _read_only(monkeypatch, scene):
    """As root, a mode-555 directory is writable: make the permission check see it as it is
    for everyone else."""
    if os.geteuid() != 0:
        return
    ro = str(scene / "ro")
    real = os.access

    def access(path, mode, *args, **kwargs):
        if os.path.abspath(path).startswith(ro) and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


D = "{d}"
CASES = [
    # -- bad images -----------------------------------------------------------------------
    ("constant image", ["learn", f"{D}/const.tif", "-o", "x.zarr"], r"const\.tif: image is constant"),
    ("NaN image", ["learn", f"{D}/nan.npy", "-o", "x.zarr", "--pixel-size", "65nm"],
     r"nan\.npy: image contains NaN or infinite values"),
    ("tiny image", ["learn", f"{D}/tiny.tif", "-o", "x.zarr"], r"tiny\.tif: image of shape \(5, 5\) is too small"),
    ("4D image", ["learn", f"{D}/four.tif", "-o", "x.zarr"], r"four\.tif: image has 4 dimensions"),
    ("RGB TIFF", ["learn", f"{D}/rgb.tif", "-o", "x.zarr"],
     r"rgb\.tif: an RGB image \(shape \(96, 96, 3\): a channel axis of size 3\); pcmx takes one "
     r"channel: split the channels"),
    ("RGB npy", ["learn", f"{D}/rgb.npy", "-o", "x.zarr", "--pixel-size", "65nm"],
     r"rgb\.npy: an RGB image .*channel axis of size 3"),
    ("object npy", ["learn", f"{D}/obj.npy", "-o", "x.zarr"],
     r"obj\.npy: a NumPy array of Python objects \(dtype object\), not an image"),
    ("object npy to apply", ["apply", f"{D}/op.zarr", f"{D}/obj.npy", "-o", "x.tif"], r"obj\.npy: a NumPy array of Python objects"),
    ("truncated npy", ["learn", f"{D}/truncated.npy", "-o", "x.zarr"], r"cannot read .*truncated\.npy: not a valid \.npy file"),
    ("missing image", ["learn", "missing.tif", "-o", "x.zarr"], r"missing\.tif: no such file"),
    ("directory as image", ["learn", f"{D}/adir", "-o", "x.zarr"], r"adir: not a TIFF or Zarr image"),
    ("directory named .tif as image", ["learn", "dir.tif", "-o", "x.zarr"], r"cannot read dir\.tif: Is a directory"),
    ("corrupt TIFF bytes", ["learn", f"{D}/corrupt.tif", "-o", "x.zarr"], r"corrupt\.tif: not a valid TIFF"),
    ("image off the operator's grid", ["apply", f"{D}/op.zarr", f"{D}/tiny.tif", "-o", "x.tif"],
     r"tiny\.tif: image shape \(5, 5\) does not match the operator's grid \(96, 96\)"),
    ("deblur names the file, not 'image:'", ["deblur", f"{D}/tiny.tif", "--operator", f"{D}/op.zarr", "-o", "x.tif"],
     r"error: \S*tiny\.tif: shape \(5, 5\) does not match the operator's grid"),
    ("deblur of a NaN image names it", ["deblur", f"{D}/nan.npy", "--operator", f"{D}/op.zarr", "-o", "x.tif"],
     r"error: \S*nan\.npy: contains 96 NaN or infinite values"),
    ("deblur of an RGB image", ["deblur", f"{D}/rgb.tif", "--operator", f"{D}/op.zarr", "-o", "x.tif"], r"rgb\.tif: an RGB image"),
    # -- bad options ----------------------------------------------------------------------
    ("negative folds", ["learn", f"{D}/beads.tif", "-o", "x.zarr", "--folds", "-1"], r"argument --folds: -1 must be at least 2"),
    ("zero components", ["learn", f"{D}/beads.tif", "-o", "x.zarr", "--components", "0"], r"argument --components: 0 must be at least 1"),
    ("unknown realism", ["learn", f"{D}/beads.tif", "-o", "x.zarr", "--realism", "bogus"], r"argument --realism: invalid choice: 'bogus'"),
    ("pixel size without a unit", ["learn", f"{D}/beads.tif", "-o", "x.zarr", "--pixel-size", "65"], r"'65' is not a length"),
    ("pixel size in seconds", ["learn", f"{D}/beads.tif", "-o", "x.zarr", "--pixel-size", "5 s"], r"'5 s' is not a length"),
    ("pixel size banana", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", "x.tif", "--pixel-size", "banana"],
     r"'banana' is not a length"),
    ("two psf radii", ["learn", f"{D}/beads.tif", "-o", "x.zarr", "--psf-radius", "3", "4"],
     r"--psf-radius 3 4: give one radius, or three \(r_z r_y r_x\) for a z-stack"),
    ("zero psf radius", ["learn", f"{D}/beads.tif", "-o", "x.zarr", "--psf-radius", "0"], r"argument --psf-radius: 0 must be at least 1"),
    ("negative threshold", ["learn", f"{D}/beads.tif", "-o", "x.zarr", "--threshold", "-1"], r"argument --threshold: -1 must be greater than 0"),
    ("zero sources", ["deblur", f"{D}/beads.tif", "--family", f"{D}/fam.zarr", "-o", "x.tif", "--sources", "0"],
     r"argument --sources: 0 must be at least 1"),
    ("NaN gamma1", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", "x.tif", "--gamma1", "nan"],
     r"argument --gamma1: 'nan' must be a finite number"),
    ("sources without a family", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", "x.tif", "--sources", "3"],
     r"--sources is for blind identification with --family"),
    ("unknown deblur method", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", "x.tif", "--method", "wiener"],
     r"argument --method: invalid choice: 'wiener'"),
    ("zero iterations", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", "x.tif", "--method", "rl",
                         "--iterations", "0"], r"argument --iterations: 0 must be at least 1"),
    ("zero chunks", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", "x.tif", "--chunks", "0"],
     r"argument --chunks: 0 must be at least 1"),
    ("iterations for sparse-smooth", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", "x.tif",
                                      "--iterations", "5"],
     r"--iterations is for --method rl, rl-tv, tikhonov or fista-haar; --method sparse-smooth takes --max-iter"),
    ("max-iter for rl", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", "x.tif", "--method", "rl",
                         "--max-iter", "5"], r"--max-iter is for --method sparse-smooth; give --iterations for --method rl"),
    ("gamma1 for rl-tv", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", "x.tif", "--method", "rl-tv",
                          "--gamma1", "1"], r"--gamma1 is a weight of --method sparse-smooth, not of --method rl-tv"),
    ("store for tikhonov", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", "x.tif", "--method", "tikhonov",
                            "--store", "r.zarr"], r"--store holds the whole Sparse\+Smooth result; --method tikhonov writes"),
    ("store with chunks", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", "x.tif", "--chunks", "48",
                           "--store", "r.zarr"], r"--store holds the whole Sparse\+Smooth result; --chunks writes"),
    ("rl of a NaN image names it", ["deblur", f"{D}/nan.npy", "--operator", f"{D}/op.zarr", "-o", "x.tif", "--method", "rl"],
     r"error: \S*nan\.npy: contains 96 NaN or infinite values"),
    ("rl off the operator's grid", ["deblur", f"{D}/tiny.tif", "--operator", f"{D}/op.zarr", "-o", "x.tif", "--method", "rl",
                                    "--chunks", "40"], r"error: \S*tiny\.tif: shape \(5, 5\) does not match the operator's grid \(96, 96\)"),
    ("zero modes", ["learn-family", f"{D}/beads.tif", f"{D}/noise.tif", "-o", "f.zarr", "--modes", "0"], r"argument --modes: 0 must be at least 1"),
    ("even kernel", ["simulate", "-o", "sim", "--true-operator", "2", "--kernel-size", "6"],
     r"--kernel-size 6: kernel sides must be odd"),
    ("zero states", ["simulate", "-o", "sim", "--states", "0"], r"argument --states: 0 must be at least 1"),
    # -- stores -----------------------------------------------------------------------------
    ("not a store", ["apply", "notastore", f"{D}/beads.tif", "-o", "x.tif"], r"notastore: not a Zarr store"),
    ("a file as a store", ["apply", "afile", f"{D}/beads.tif", "-o", "x.tif"], r"afile: not a Zarr store \(it is a file\)"),
    ("missing store", ["apply", "missing.zarr", f"{D}/beads.tif", "-o", "x.tif"], r"missing\.zarr: no such store"),
    ("family given to apply", ["apply", f"{D}/fam.zarr", f"{D}/beads.tif", "-o", "x.tif"],
     r"fam\.zarr: is a pcmx 'family' store, expected 'operator'"),
    ("operator given as a family", ["deblur", f"{D}/beads.tif", "--family", f"{D}/op.zarr", "-o", "x.tif"],
     r"op\.zarr: is a pcmx 'operator' store, expected 'family'"),
    ("corrupt chunk (operator)", ["apply", f"{D}/opc.zarr", f"{D}/beads.tif", "-o", "x.tif"],
     r"opc\.zarr: variable 'coefficients' cannot be read, the store is damaged \(a corrupt or truncated chunk: .*Zstd"),
    ("corrupt chunk (family)", ["deblur", f"{D}/beads.tif", "--family", f"{D}/famc.zarr", "-o", "x.tif"],
     r"famc\.zarr: variable 'spatial_basis' cannot be read, the store is damaged"),
    ("no point sources for blind deblurring", ["deblur", f"{D}/noise.tif", "--family", f"{D}/fam.zarr", "-o", "x.tif"],
     r"noise\.tif: no beads detected .*: deblur it with a known operator \(--operator\)"),
    # -- outputs --------------------------------------------------------------------------
    ("existing store", ["learn", f"{D}/beads.tif", "-o", "exists.zarr"], r"--output exists\.zarr: already exists; use --overwrite"),
    ("existing TIFF", ["apply", f"{D}/op.zarr", f"{D}/beads.tif", "-o", "exists.tif"], r"--output exists\.tif: already exists; use --overwrite"),
    ("existing deblur TIFF", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", "exists.tif"],
     r"--output exists\.tif: already exists"),
    ("learn into a missing directory", ["learn", f"{D}/beads.tif", "-o", "nonexist/dir/X.zarr"],
     r"--output nonexist/dir/X\.zarr: directory \S+/nonexist/dir does not exist \(pcmx creates no parent directories"),
    ("apply into a missing directory", ["apply", f"{D}/op.zarr", f"{D}/beads.tif", "-o", "nonexist/x.tif"],
     r"--output nonexist/x\.tif: directory \S+/nonexist does not exist"),
    ("deblur into a missing directory", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", "nonexist/x.tif"],
     r"--output nonexist/x\.tif: directory \S+/nonexist does not exist"),
    ("learn-family into a missing directory", ["learn-family", f"{D}/beads.tif", f"{D}/noise.tif", "-o", "nonexist/f.zarr"],
     r"--output nonexist/f\.zarr: directory \S+/nonexist does not exist"),
    ("simulate into a missing directory", ["simulate", "-o", "nonexist/sim"], r"--output nonexist/sim: directory \S+/nonexist does not exist"),
    ("store under a file", ["learn", f"{D}/beads.tif", "-o", "afile/sub.zarr"], r"--output afile/sub\.zarr: \S+/afile is a file, not a directory"),
    ("TIFF under a file", ["apply", f"{D}/op.zarr", f"{D}/beads.tif", "-o", "afile/x.tif"], r"afile is a file, not a directory"),
    ("checkpoint under a file", ["learn-family", f"{D}/beads.tif", f"{D}/noise.tif", "-o", "f.zarr", "--checkpoint", "afile/c"],
     r"--checkpoint afile/c: \S+/afile is a file, not a directory"),
    ("simulate into a file", ["simulate", "-o", "afile"], r"--output afile: exists and is not a directory"),
    ("empty learn output", ["learn", f"{D}/beads.tif", "-o", ""], r"--output '': an empty path; give the store to write"),
    ("empty apply output", ["apply", f"{D}/op.zarr", f"{D}/beads.tif", "-o", ""], r"--output '': an empty path"),
    ("empty deblur output", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", ""], r"--output '': an empty path"),
    ("empty learn-family output", ["learn-family", f"{D}/beads.tif", f"{D}/noise.tif", "-o", ""], r"--output '': an empty path"),
    ("empty simulate output", ["simulate", "-o", ""], r"--output '': an empty path; give the directory to write"),
    ("directory as apply TIFF", ["apply", f"{D}/op.zarr", f"{D}/beads.tif", "-o", "dir.tif", "--overwrite"],
     r"--output dir\.tif: is a directory; give the name of a TIFF file to write"),
    ("directory as deblur TIFF", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", "dir.tif", "--overwrite"],
     r"--output dir\.tif: is a directory"),
    ("deblur --store not a store", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", "x.tif", "--store",
                                    "notastore", "--overwrite"],
     r"--store notastore: exists and is not a pcmx store; refusing to replace it"),
    ("deblur --store a file", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", "x.tif", "--store", "afile",
                               "--overwrite"], r"--store afile: exists and is not a pcmx store"),
    ("learn over a non-store", ["learn", f"{D}/beads.tif", "-o", "notastore", "--overwrite"], r"--output notastore: exists and is not a pcmx store"),
    ("two outputs at one path", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", "x.tif", "--store", "x_sparse.tif"],
     r"--store x_sparse\.tif: the same path as --output x_sparse\.tif"),
    ("read-only directory (learn)", ["learn", f"{D}/beads.tif", "-o", "ro/x.zarr"], r"--output ro/x\.zarr: directory \S+/ro is not writable"),
    ("read-only directory (apply)", ["apply", f"{D}/op.zarr", f"{D}/beads.tif", "-o", "ro/x.tif"], r"--output ro/x\.tif: directory \S+/ro is not writable"),
    ("read-only directory (deblur)", ["deblur", f"{D}/beads.tif", "--operator", f"{D}/op.zarr", "-o", "ro/x.tif"], r"directory \S+/ro is not writable"),
    ("read-only directory (learn-family)", ["learn-family", f"{D}/beads.tif", f"{D}/noise.tif", "-o", "ro/f.zarr"], r"directory \S+/ro is not writable"),
    ("read-only directory (simulate)", ["simulate", "-o", "ro/sim"], r"--output ro/sim: directory \S+/ro is not writable"),
    ("read-only output directory (simulate)", ["simulate", "-o", "ro"], r"--output ro: directory is not writable"),
]


@pytest.mark.parametrize("argv, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_refuses_with_exit_2_one_line_and_changes_nothing(argv, pattern, scene, data, capsys, monkeypatch):
    argv = [a.replace(D, str(data)) for a in argv]
    if any(a.startswith("ro") for a in argv):
        _read_only(monkeypatch, scene)
    before = _state(scene, data)
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines and all(line.startswith(f"pcmx {argv[0]}: ") for line in lines), captured.err
    errors = [line for line in lines if line.startswith(f"pcmx {argv[0]}: error: ")]
    assert len(errors) == 1, captured.err
    assert re.search(pattern, errors[0]), errors[0]
    assert _state(scene, data) == before
    assert captured.out == ""


def test_case_count():
    """The issue asks for at least 40 cases (CLI and Python)."""
    assert len(CASES) >= 40


# -- the real exit status and stderr, in a subprocess ---------------------------------------------
def _pcmx(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pcmx", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "default"})


def test_subprocess_object_npy_exits_2_with_one_line(scene, data):
    before = _state(scene, data)
    r = _pcmx("learn", str(data / "obj.npy"), "-o", "x.zarr", cwd=scene)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("pcmx learn: error: ")
    assert "internal error" not in r.stderr and "obj.npy: a NumPy array of Python objects" in r.stderr
    assert _state(scene, data) == before


def test_subprocess_corrupt_chunk_exits_2_naming_store_and_variable(scene, data):
    before = _state(scene, data)
    r = _pcmx("apply", str(data / "opc.zarr"), str(data / "beads.tif"), "-o", "x.tif", cwd=scene)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1
    assert re.match(r"pcmx apply: error: \S+opc\.zarr: variable 'coefficients' cannot be read", r.stderr)
    assert _state(scene, data) == before


def test_subprocess_warning_is_one_line(scene, data):
    """A warning is one line ``pcmx CMD: warning: ...`` (not two with a pcmx source line)."""
    tifffile.imwrite(scene / "plain.tif", np.full(SHAPE, 7, np.uint16))  # no pixel size: a warning
    r = _pcmx("learn", "plain.tif", "-o", "x.zarr", cwd=scene)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == [
        "pcmx learn: warning: plain.tif: no pixel size in the file's metadata and none given "
        "(pixel_size / --pixel-size); coordinates are in pixels",
        "pcmx learn: error: plain.tif: image is constant (7.0); no beads to learn from"]
    assert not (scene / "x.zarr").exists()


# -- file-system faults met while writing: exit 2 naming the path, nothing left ------------------
@pytest.mark.parametrize("err, pattern", [
    (PermissionError(errno.EACCES, "Permission denied"), r"x\.tif: Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device"), r"x\.tif: No space left on device"),
    (IsADirectoryError(errno.EISDIR, "Is a directory"), r"x\.tif: Is a directory"),
])
def test_write_fault_exits_2_naming_the_path_and_leaves_nothing(err, pattern, scene, data, capsys, monkeypatch):
    def fail(path, *args, **kwargs):
        err.filename = os.path.join(os.path.dirname(path), "x.tif")
        raise err

    monkeypatch.setattr("pcmx.io.tiff.write_tiff", fail)
    before = _state(scene, data)
    assert main(["apply", str(data / "op.zarr"), str(data / "beads.tif"), "-o", "x.tif"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("pcmx apply: error: ") and "\n" not in line and re.search(pattern, line)
    assert _state(scene, data) == before


def test_undecodable_chunk_of_a_zarr_image_exits_2(scene, data, capsys):
    """A damaged Zarr *image* (read lazily by the library, not by the command): exit 2, the
    chunk named, not an internal error."""
    import zarr

    arr = zarr.create_array(str(scene / "img.zarr"), shape=SHAPE, chunks=(48, 48), dtype="uint16")
    arr[:] = _beads()
    _corrupt_first_chunk(scene / "img.zarr", "")
    before = _state(scene, data)
    assert main(["learn", "img.zarr", "-o", "x.zarr", "--pixel-size", "65nm"]) == 2
    line = capsys.readouterr().err.strip()
    assert re.match(r"pcmx learn: error: cannot decode the chunk \S*img\.zarr/c/0/0 of a Zarr store: "
                    r".*the store is damaged", line), line
    assert _state(scene, data) == before


# -- all-or-nothing outputs -----------------------------------------------------------------------
def test_deblur_writes_all_outputs_or_none(scene, data, capsys, monkeypatch):
    """The store fails after the three TIFFs are complete: none of them appears; then a run that
    succeeds writes all four, and a failing --overwrite rerun leaves all four as they were."""
    import pcmx.io.store

    real_save = pcmx.io.store.save_store
    args = ["deblur", str(data / "beads.tif"), "--operator", str(data / "op.zarr"), "-o", "out.tif",
            "--store", "out.zarr", "--max-iter", "3"]

    def disk_full(ds, path, **kwargs):
        raise StoreError(f"{path}: write failed (OSError: No space left on device); nothing changed")

    monkeypatch.setattr(pcmx.io.store, "save_store", disk_full)
    before = _state(scene, data)
    assert main(args) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert _state(scene, data) == before
    monkeypatch.setattr(pcmx.io.store, "save_store", real_save)
    assert main(args) == 0
    capsys.readouterr()
    written = ["out.tif", "out_sparse.tif", "out_smooth.tif", "out.zarr"]
    assert all((scene / n).exists() for n in written)
    before = _state(scene, data)
    monkeypatch.setattr(pcmx.io.store, "save_store", disk_full)
    assert main([*args, "--overwrite"]) == 2
    assert _state(scene, data) == before


def test_outputs_commit_failure_puts_every_previous_output_back(tmp_path, monkeypatch):
    """The second output cannot be put in place: the first gets its previous content back, the
    third is not created, no temporary is left."""
    import pcmx.io.atomic

    for name in ("a.tif", "b.tif"):
        write_tiff(tmp_path / name, np.zeros((4, 4), np.float32))
    before = snapshot(tmp_path)
    real = pcmx.io.atomic.exchange
    calls = []

    def exchange(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error", a)
        return real(a, b)

    monkeypatch.setattr(pcmx.io.atomic, "exchange", exchange)
    with pytest.raises(OSError, match="Input/output error"):
        with Outputs(lock=[str(tmp_path / n) for n in ("a.tif", "b.tif", "c.tif")]) as out:
            for name in ("a.tif", "b.tif", "c.tif"):
                out.tiff(str(tmp_path / name), np.ones((4, 4), np.float32))
    assert snapshot(tmp_path) == before


def test_outputs_error_inside_the_block_leaves_nothing(tmp_path):
    before = snapshot(tmp_path)
    with pytest.raises(InputError, match="late"):
        with Outputs(lock=[str(tmp_path / "sim")]) as out:
            out.directory(str(tmp_path / "sim"))
            out.tiff(str(tmp_path / "sim" / "a.tif"), np.ones((4, 4), np.float32))
            raise InputError("late")
    assert snapshot(tmp_path) == before


def test_second_writer_of_an_output_fails_before_its_work(scene, data, capsys):
    from pcmx.io.atomic import writer_lock

    before = _state(scene, data)
    with writer_lock(str(scene / "x.zarr")):
        assert main(["learn", str(data / "const.tif"), "-o", "x.zarr"]) == 2
        err = capsys.readouterr().err
    assert re.search(r"error: \S*x\.zarr: being written by pid \d+", err), err
    assert "constant" not in err  # refused before reading the image
    assert _state(scene, data) == before


# -- the Python API -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, pattern", [
    ("obj.npy", r"obj\.npy: a NumPy array of Python objects"),
    ("truncated.npy", r"not a valid \.npy file"),
    ("rgb.tif", r"rgb\.tif: an RGB image .*channel axis of size 3.*image\[\.\.\., 0\]"),
    ("corrupt.tif", r"corrupt\.tif: not a valid TIFF"),
    ("four.tif", r"4 dimensions"),
    ("adir", r"not a TIFF or Zarr image"),
    ("missing.tif", r"missing\.tif: no such file"),
])
def test_read_image_refuses_naming_the_file(name, pattern, data):
    before = snapshot(data)
    with pytest.raises(InputError, match=pattern):
        pcmx.read_image(data / name, pixel_size="65nm")
    assert snapshot(data) == before


def test_an_rgb_array_is_refused_as_rgb():
    with pytest.raises(InputError, match=r"an RGB image \(shape \(64, 64, 3\)"):
        pcmx.io.readers.as_image(np.zeros((64, 64, 3), np.float32), pixel_size="65nm")


def test_even_kernel_message_is_plain():
    with pytest.raises(SchemaError) as err:
        validate(make_operator(ksize=7).isel(ky=slice(0, 6)), source="op.zarr")
    assert str(err.value) == "op.zarr: variable 'psf_basis': kernel sides must be odd, got 6 (axis 1 of its shape)"
    assert "multipleOf" not in str(err.value)


def test_open_input_store_names_the_damaged_variable(data):
    with pytest.raises(StoreError, match=r"opc\.zarr: variable 'coefficients' cannot be read"):
        open_input_store(str(data / "opc.zarr"), "operator")
    ds = open_input_store(str(data / "op.zarr"), "operator")
    assert all(isinstance(v.data, np.ndarray) for v in ds.variables.values())


def test_learn_family_names_no_threshold_option_it_lacks(scene, data, capsys):
    """The bead detector's advice 'lower the threshold' names an option of learn, not of
    learn-family: the message keeps the cause and the options that exist (--skip-bad)."""
    assert main(["learn-family", str(data / "beads.tif"), str(data / "noise.tif"), "-o", "f.zarr",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "noise.tif: no beads detected" in err and "--skip-bad" in err
    assert "threshold" not in err.split(")", 1)[1]  # only the detector's own figure remains
    assert not (scene / "f.zarr").exists()
