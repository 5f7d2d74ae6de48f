"""The napari plugin (pcmx.napari) without napari or a display: layer tuples and the manifest."""

from __future__ import annotations

import importlib
import sys
import tomllib
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from conftest import make_family, make_operator

import pcmx
from pcmx.io.tiff import write_tiff
from pcmx.napari import (
    get_reader,
    layer_image,
    learn_operator_widget,
    psf_mosaic,
    read_path,
    sample_beads,
)
from pcmx.simulate import simulate_beads

MANIFEST = Path(pcmx.__file__).parent / "napari" / "napari.yaml"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _by_name(layers):
    return {kw["name"]: (data, kw, kind) for data, kw, kind in layers}


@pytest.fixture(scope="module")
def learned():
    sim = simulate_beads((128, 128), 20, seed=0)
    with warnings.catch_warnings():
        # the layers, not the model selection, are under test: keep the space-varying model
        # (its beads) whatever its margin over the space-invariant reference on 20 beads
        warnings.filterwarnings("ignore", message=".*cross-validation finds", category=pcmx.PcmxWarning)
        return sim, pcmx.learn_operator(sim["image"], select="space-varying")


def test_napari_is_not_imported():
    for mod in ("pcmx.napari", "pcmx.napari._layers", "pcmx.napari._reader", "pcmx.napari._widget"):
        importlib.import_module(mod)
    assert "napari" not in sys.modules  # the top-level napari, not pcmx.napari


def test_reader_operator_store(tmp_path, operator_ds):
    path = pcmx.save_store(operator_ds, tmp_path / "op.zarr")
    reader = get_reader(path)
    assert reader is not None
    layers = _by_name(reader(path))
    data, kw, kind = layers["psf grid"]
    # 5 x 5 tiles of 7 x 7 pixels, one pixel apart; the PSF's own pixel size, in micrometres
    assert kind == "image" and data.shape == (5 * 8 - 1, 5 * 8 - 1)
    assert kw["scale"] == pytest.approx((0.065, 0.065))
    # beside the field: its left edge one tile (7 + 1 pixels) right of the field's right edge
    assert kw["translate"] == pytest.approx((0.0, (40 + 8) * 0.065))
    centre = psf_mosaic(operator_ds, 5).attrs["positions"][12]  # tile (2, 2)
    np.testing.assert_allclose(data[16:23, 16:23], pcmx.model.psf_at(
        operator_ds, index=True, y=centre[0], x=centre[1]).values, rtol=1e-6)
    assert (data[7, :] == 0).all() and (data[:, 7] == 0).all()  # the gaps between tiles
    maps = [layers[f"alpha_{i}"] for i in (1, 2, 3)]
    for i, (m, mkw, mkind) in enumerate(maps):
        assert mkind == "image" and m.shape == (32, 40)
        assert mkw["scale"] == pytest.approx((0.065, 0.065)) and mkw["translate"] == (0.0, 0.0)
        np.testing.assert_array_equal(m, operator_ds["coefficients"].values[i])
        assert mkw["visible"] == (i == 0)
        lo, hi = mkw["contrast_limits"]  # each map on its own scale
        assert lo == pytest.approx(m.min()) and hi == pytest.approx(m.max())
    assert all(kw["metadata"]["source"] == path for _, kw, _ in layers.values())


def test_reader_operator_beads_and_diagnostics(tmp_path, learned):
    _, op = learned
    path = pcmx.save_store(op, tmp_path / "learned.zarr")
    layers = _by_name(read_path(path))
    assert {"psf grid", "alpha_1", "beads", "detections", "held-out beads"} <= set(layers)
    beads, kw, kind = layers["beads"]
    assert kind == "points" and beads.shape == (op.sizes["bead"], 2)
    # stored in micrometres (the image's coordinate units): world coordinates as they are
    assert op["bead_y"].attrs["units"] == "micrometer"
    np.testing.assert_allclose(beads[:, 0], op["bead_y"].values, rtol=1e-9)
    np.testing.assert_allclose(beads[:, 1], op["bead_x"].values, rtol=1e-9)
    n_comp = op.sizes["component"]
    for i in range(n_comp):
        np.testing.assert_array_equal(kw["features"][f"beta_{i + 1}"],
                                      op["observed_coefficients"].values[:, i])
    det, dkw, _ = layers["detections"]
    status = dkw["features"]["detection_status"]
    assert det.shape == (op.sizes["detection"], 2) and len(status) == det.shape[0]
    meanings = op["detection_status"].attrs["flag_meanings"].split()
    assert list(status) == [meanings[c] for c in op["detection_status"].values]
    assert dkw["border_color"] == "detection_status" and "used" in set(status)
    _, ckw, _ = layers["held-out beads"]
    np.testing.assert_array_equal(ckw["features"]["cv_error"], op["cv_error"].values)


def test_reader_old_store_with_pixel_positions(tmp_path, learned):
    """Stores written before issue 14 keep bead and detection positions in pixels
    (units "pixel", or no units at all): the points land on the same world positions."""
    _, op = learned
    new = _by_name(read_path(pcmx.save_store(op, tmp_path / "new.zarr")))
    old = op.copy()
    for prefix in ("bead", "detection"):
        for d in ("y", "x"):
            name = f"{prefix}_{d}"
            pixels = op[name].values / 0.065  # the image's 65 nm pixels, origin 0
            attrs = {"units": "pixel"} if prefix == "bead" else {}
            old[name] = (op[name].dims, pixels, attrs)
    layers = _by_name(read_path(pcmx.save_store(old, tmp_path / "old.zarr")))
    for name in ("beads", "detections"):
        np.testing.assert_allclose(layers[name][0], new[name][0], rtol=1e-9, atol=1e-12)


def test_reader_family_store(tmp_path, family_ds):
    path = pcmx.save_store(family_ds, tmp_path / "fam.zarr")
    layers = _by_name(get_reader(str(path))(str(path)))
    data, kw, kind = layers["psf grid (3 states)"]
    assert kind == "image" and data.shape == (3, 5 * 6 - 1, 5 * 6 - 1)
    assert kw["scale"] == pytest.approx((1.0, 0.1, 0.1))
    assert kw["metadata"]["states"] == ["dry", "wet", "oil"]
    for k, state in enumerate(("dry", "wet", "oil")):
        np.testing.assert_allclose(data[k], psf_mosaic(family_ds, 5, state=state).values, rtol=1e-6)
    assert not np.allclose(data[0], data[1])
    for j in (1, 2):
        m, mkw, _ = layers[f"a_{j}"]
        assert m.shape == (12, 16) and mkw["scale"] == pytest.approx((0.1, 0.1))
        np.testing.assert_array_equal(m, family_ds["spatial_basis"].values[j - 1])


def test_reader_tiff_and_npy(tmp_path):
    data = np.arange(30 * 20, dtype=np.uint16).reshape(30, 20)
    tif = write_tiff(tmp_path / "beads.tif", data, 0.1)
    (img, kw, kind), = get_reader(tif)(tif)
    assert kind == "image" and kw["name"] == "beads.tif"
    np.testing.assert_array_equal(np.asarray(img), data)
    assert kw["scale"] == pytest.approx((0.1, 0.1)) and kw["translate"] == (0.0, 0.0)
    assert kw["metadata"]["units"] == ("micrometer", "micrometer")
    npy = tmp_path / "plane.npy"
    np.save(npy, data.astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pcmx.PcmxWarning)  # "no pixel size" is expected here
        (_, nkw, _), = read_path(str(npy))
    assert nkw["scale"] == (1.0, 1.0) and nkw["metadata"]["units"] == ("pixel", "pixel")


def test_get_reader_declines_other_paths(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "plain")) is None
    assert get_reader(str(tmp_path / "missing.tif")) is None
    assert get_reader([str(tmp_path / "notes.txt"), str(tmp_path / "plain")]) is None


def test_widget_learns_from_a_duck_typed_layer():
    sim = simulate_beads((128, 128), 20, seed=0)
    layer = SimpleNamespace(data=sim["image"].values, scale=np.array([0.065, 0.065]),
                            translate=np.array([0.0, 1.0]), name="beads")
    with warnings.catch_warnings():
        # on 20 beads the model selection may store the space-invariant model (and say so):
        # the widget's layer is under test, whichever model it shows
        warnings.filterwarnings("ignore", message=".*cross-validation finds", category=pcmx.PcmxWarning)
        data, kw, kind = learn_operator_widget(layer, grid=3)
    ds = kw["metadata"]["pcmx"]
    k = ds.sizes["ky"]
    assert kind == "image" and data.shape == (3 * (k + 1) - 1, 3 * (k + 1) - 1)
    assert kw["scale"] == pytest.approx((0.065, 0.065))
    assert ds["coefficients"].shape[-2:] == (128, 128)
    assert float(ds["x"][1]) == pytest.approx(0.065)
    # beside the image, shifted by the layer's own translate
    assert kw["translate"] == pytest.approx((0.0, 1.0 + (128 + k + 1) * 0.065))
    assert kw["name"] == "beads psf grid"


def test_widget_pixel_size_and_uncalibrated_layers():
    data = np.zeros((16, 24), np.float32)
    assert layer_image(SimpleNamespace(data=data, scale=(1.0, 1.0))).x.attrs["units"] == "pixel"
    img = layer_image(SimpleNamespace(data=data, scale=(1.0, 1.0)), "100nm")
    assert float(img.x[1]) == pytest.approx(0.1) and img.x.attrs["units"] == "micrometer"
    with pytest.raises(pcmx.InputError, match="shape"):
        layer_image(SimpleNamespace(data=np.zeros((2, 3, 4, 5)), scale=(1, 1, 1, 1)))
    with pytest.raises(pcmx.InputError, match="not a length"):
        layer_image(SimpleNamespace(data=data, scale=(1.0, 1.0)), "fast")


def test_sample_beads_layers():
    (img, kw, kind), (pts, pkw, pkind) = sample_beads()
    assert kind == "image" and img.shape == (256, 256) and kw["scale"] == pytest.approx((0.065, 0.065))
    assert pkind == "points" and pts.shape == (60, 2) and "amplitude" in pkw["features"]


def _manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def test_manifest_structure_and_commands_importable():
    m = _manifest()
    assert m["name"] == "pcmx"
    commands = {c["id"]: c["python_name"] for c in m["contributions"]["commands"]}
    for cid, python_name in commands.items():
        assert cid.startswith("pcmx.")
        module, _, attr = python_name.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), python_name
    contributions = m["contributions"]
    referenced = [r["command"] for r in contributions["readers"]] + \
        [w["command"] for w in contributions["widgets"]] + \
        [s["command"] for s in contributions["sample_data"]]
    assert set(referenced) <= set(commands)
    patterns = contributions["readers"][0]["filename_patterns"]
    assert {"*.zarr", "*.tif", "*.tiff", "*.npy"} <= set(patterns)
    # the packaging points napari at this file and ships it in the wheel
    project = tomllib.loads(PYPROJECT.read_text())
    assert project["project"]["entry-points"]["napari.manifest"] == {"pcmx": "pcmx.napari:napari.yaml"}
    assert "napari/napari.yaml" in project["tool"]["setuptools"]["package-data"]["pcmx"]
    assert not any(d.startswith("napari") for d in project["project"]["dependencies"])


def test_manifest_validates_with_npe2():
    with warnings.catch_warnings():  # npe2 itself warns (pydantic deprecations) on import
        warnings.simplefilter("ignore")
        npe2 = pytest.importorskip("npe2", reason="npe2 not installed (pip install npe2)")
        manifest = npe2.PluginManifest.from_file(str(MANIFEST))
        manifest.validate_imports()
    assert manifest.name == "pcmx"
    assert {w.display_name for w in manifest.contributions.widgets} == {"Learn PSF model (pcmx)"}


def test_psf_mosaic_3d_and_bad_n():
    from conftest import make_operator3d

    op3 = make_operator3d()
    grid = psf_mosaic(op3, 2)
    assert grid.dims == ("kz", "ky", "kx") and grid.shape == (3, 2 * 6 - 1, 2 * 6 - 1)
    with pytest.raises(pcmx.InputError, match="at least one tile"):
        psf_mosaic(make_operator(), 0)
    assert psf_mosaic(make_family(), 2, state="wet").shape == (11, 11)


def test_layers_build_in_napari(tmp_path, learned):
    """Where napari is installed (pcmx[napari]), every tuple makes a napari layer (no display)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = pytest.importorskip("napari.layers", reason="napari not installed (pcmx[napari])")
    _, op = learned
    tuples = [*read_path(pcmx.save_store(op, tmp_path / "op.zarr")),
              *read_path(pcmx.save_store(make_family(), tmp_path / "fam.zarr")), *sample_beads()]
    for data, kw, kind in tuples:
        layer = layers.Layer.create(data, kw, kind)
        assert layer.name == kw["name"] and layer.data.shape == np.shape(data)
        if kind == "points":
            assert list(layer.features.columns) == list(kw["features"])
