import json
import os

import numpy as np
import pytest
import xarray as xr
import zarr

from pcmx.errors import InputError
from pcmx.io.checkpoint import (
    STEPS,
    entry_path,
    manifest_differences,
    open_entry,
    patches_from_group,
    patches_to_arrays,
    prepare_checkpoint,
    write_entry,
)

MANIFEST = {"pcmx_checkpoint": 1, "fingerprint": "f1", "arguments": {"psf_radius": None, "n_modes": 3},
            "inputs": [{"name": "a.tif", "size": 10}, {"name": "b.tif", "size": 11}]}


def _patches():
    rng = np.random.default_rng(1)
    return xr.DataArray(
        rng.random((4, 5, 5), dtype=np.float32), dims=("bead", "ky", "kx"),
        coords={"bead_y": ("bead", rng.random(4) * 100, {"units": "pixel"}),
                "bead_x": ("bead", rng.random(4) * 100),
                "ky": ("ky", np.arange(-2, 3) * 0.065, {"units": "micrometer"}),
                "kx": ("kx", np.arange(-2, 3) * 0.065, {"units": "micrometer"})},
        attrs={"radius": 2, "background": "plane"})


def test_entry_path_names_step_and_image(tmp_path):
    assert entry_path("ck", "maps", 3) == os.path.join("ck", "maps", "00003.zarr")
    assert entry_path("ck", "beads", 12, ".bad.json") == os.path.join("ck", "beads", "00012.bad.json")


def test_written_entry_opens_only_under_its_fingerprint_and_when_complete(tmp_path):
    path = str(tmp_path / "00000.zarr")
    maps = np.arange(2 * 6 * 8, dtype=np.float32).reshape(2, 6, 8)
    write_entry(path, {"maps": maps, "n": np.array([3])}, {"fingerprint": "f1", "rejected": np.int64(2)},
                chunks={"maps": (2, 4, 4)})
    assert [p.name for p in tmp_path.iterdir()] == ["00000.zarr"]
    g = open_entry(path, "f1")
    np.testing.assert_array_equal(g["maps"][...], maps)
    assert g["maps"].chunks == (2, 4, 4) and g["n"].chunks == (1,)
    assert g.attrs["rejected"] == 2 and g.attrs["complete"] is True
    assert open_entry(path, "f2") is None
    assert open_entry(str(tmp_path / "missing.zarr"), "f1") is None
    # an interrupted entry (no completion mark) and a damaged one are redone
    meta = tmp_path / "00000.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["complete"]
    meta.write_text(json.dumps(doc))
    assert open_entry(path, "f1") is None
    meta.write_text("{not json")
    assert open_entry(path, "f1") is None
    write_entry(path, {"maps": maps[:1]}, {"fingerprint": "f1"})  # replaces the damaged entry
    assert open_entry(path, "f1")["maps"].shape == (1, 6, 8)


def test_patches_round_trip_bit_for_bit(tmp_path):
    patches = _patches()
    arrays, meta = patches_to_arrays(patches)
    assert sorted(arrays) == ["coord0", "coord1", "coord2", "coord3", "patches"]
    path = str(tmp_path / "00001.zarr")
    write_entry(path, {**arrays, "positions": np.zeros((4, 2))},
                {"fingerprint": "f", "patches_meta": meta})
    back = patches_from_group(zarr.open_group(path, mode="r"))
    xr.testing.assert_identical(back, patches)
    assert back["ky"].attrs == {"units": "micrometer"} and back.dtype == np.float32


def _entries(ckpt):
    """What the checkpoint holds besides its step directories (not looking inside entries)."""
    top = [n for n in os.listdir(ckpt) if n not in STEPS]
    return sorted([*top, *(os.path.join(step, n) for step in STEPS
                           for n in os.listdir(os.path.join(ckpt, step)))])


def test_prepare_resumes_same_run_and_refuses_another(tmp_path):
    ckpt = str(tmp_path / "ck")
    prepare_checkpoint(ckpt, MANIFEST, overwrite=False)
    assert sorted(os.listdir(ckpt)) == sorted([*STEPS, "manifest.json"])
    assert json.loads((tmp_path / "ck" / "manifest.json").read_text())["fingerprint"] == "f1"
    write_entry(entry_path(ckpt, "beads", 0), {"x": np.ones(2)}, {"fingerprint": "f1"})
    os.mkdir(os.path.join(ckpt, "maps", ".00001.zarr.pcmx-tmp-deadbeef"))  # a killed write
    # the same run: complete entries kept, leftovers removed
    prepare_checkpoint(ckpt, MANIFEST, overwrite=False)
    assert _entries(ckpt) == [os.path.join("beads", "00000.zarr"), "manifest.json"]
    # another run: refused, naming what differs; nothing touched
    other = {**MANIFEST, "fingerprint": "f2", "arguments": {"psf_radius": 9, "n_modes": 3}}
    with pytest.raises(InputError, match=r"made by a run with different arguments or inputs "
                                         r"\(differs in: psf_radius=None -> 9\); remove it"):
        prepare_checkpoint(ckpt, other, overwrite=False)
    assert _entries(ckpt) == [os.path.join("beads", "00000.zarr"), "manifest.json"]
    # or started afresh on request
    prepare_checkpoint(ckpt, other, overwrite=True)
    assert _entries(ckpt) == ["manifest.json"]
    assert json.loads((tmp_path / "ck" / "manifest.json").read_text())["fingerprint"] == "f2"


def test_prepare_refuses_a_foreign_directory_and_restarts_after_a_broken_manifest(tmp_path):
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="exists without a manifest.json"):
        prepare_checkpoint(str(ckpt), MANIFEST, overwrite=False)
    assert (ckpt / "notes.txt").read_text() == "mine"
    prepare_checkpoint(str(ckpt), MANIFEST, overwrite=True)
    assert not (ckpt / "notes.txt").exists()
    write_entry(entry_path(str(ckpt), "maps", 0), {"x": np.ones(2)}, {"fingerprint": "f1"})
    (ckpt / "manifest.json").write_text('{"finger')  # unreadable: the run died at once
    prepare_checkpoint(str(ckpt), MANIFEST, overwrite=False)
    assert _entries(str(ckpt)) == ["manifest.json"]


def test_manifest_differences_names_arguments_and_images():
    new = {"arguments": {"psf_radius": 9, "chunk": 256},
           "inputs": [{"name": "a.tif", "size": 10}, {"name": "b.tif", "size": 12}]}
    assert manifest_differences(MANIFEST, new) == [
        "chunk=None -> 256", "n_modes=3 -> None", "psf_radius=None -> 9", "image b.tif"]
    assert manifest_differences(MANIFEST, {**MANIFEST, "inputs": MANIFEST["inputs"][:1]}) == [
        "2 -> 1 images"]
    assert manifest_differences(MANIFEST, MANIFEST) == []
