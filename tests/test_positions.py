"""Bead and detection positions stored in the image's units (issue 14): micrometres with
``units`` attrs where the image is calibrated, pixels otherwise; older stores in pixels read
alike everywhere (pcmx.fit.stored_positions, plots, used-bead matching)."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402
from conftest import make_operator3d  # noqa: E402

import pcmx  # noqa: E402
from pcmx.fit import detection_diagnostics, fit_operator, stored_positions, used_bead_mask  # noqa: E402
from pcmx.io.readers import as_image  # noqa: E402
from pcmx.patches import bead_patches  # noqa: E402
from pcmx.plot import psf_grid  # noqa: E402
from pcmx.simulate import simulate_beads  # noqa: E402

PIXEL_UM = 0.065  # the simulator's default pixel size


@pytest.fixture(scope="module")
def learned():
    sim = simulate_beads((128, 128), 20, seed=0)
    img = as_image(sim["image"])
    bp = bead_patches(img)
    return sim, bp, fit_operator(bp, image=img)


def _as_old(op: xr.Dataset, *, drop_units: bool = False) -> xr.Dataset:
    """``op`` as stores before issue 14 kept it: positions in pixels, ``units="pixel"`` (or no
    ``units`` at all, the oldest)."""
    old = op.copy()
    for prefix in ("bead", "detection"):
        for d in ("y", "x"):
            name = f"{prefix}_{d}"
            attrs = {} if drop_units else {"units": "pixel"}
            old[name] = (op[name].dims, op[name].values / PIXEL_UM, attrs)
    return old


def test_positions_stored_in_micrometres(learned):
    sim, bp, op = learned
    for name in ("bead_y", "bead_x", "detection_y", "detection_x"):
        assert op[name].attrs["units"] == "micrometer", name
        assert op[name].dtype == np.float64
    used = used_bead_mask(bp, op)
    assert used.sum() == op.sizes["bead"] >= 5
    # the stored micrometres are the pixel centres times the pixel size
    np.testing.assert_allclose(op["bead_y"].values, bp.positions[used, 0] * PIXEL_UM, rtol=1e-12)
    np.testing.assert_allclose(op["bead_x"].values, bp.positions[used, 1] * PIXEL_UM, rtol=1e-12)
    np.testing.assert_allclose(stored_positions(op), bp.positions[used], atol=1e-9)
    np.testing.assert_allclose(stored_positions(op, "detection"), bp.detections, atol=1e-9)
    # against the truth (the simulator's positions stay in pixels, units "pixel"): every kept
    # bead within 0.25 px (16 nm; measured at most 0.16 px) of a true bead, in micrometres
    assert sim["bead_y"].attrs["units"] == "pixel"
    ty, tx = sim["bead_y"].values * PIXEL_UM, sim["bead_x"].values * PIXEL_UM
    dist = np.hypot(op["bead_y"].values[:, None] - ty, op["bead_x"].values[:, None] - tx).min(1)
    assert dist.max() < 0.25 * PIXEL_UM, dist.max() / PIXEL_UM


def test_positions_in_pixels_without_a_pixel_size(learned):
    _, bp, _ = learned
    op = fit_operator(bp)  # no image: pixel coordinates
    assert op["y"].attrs["units"] == "pixel"
    for name in ("bead_y", "bead_x", "detection_y", "detection_x"):
        assert op[name].attrs["units"] == "pixel", name
    np.testing.assert_array_equal(op["bead_y"].values, bp.positions[used_bead_mask(bp, op), 0])
    np.testing.assert_array_equal(op["detection_x"].values, bp.detections[:, 1])


def test_learn_operator_numpy_image_keeps_pixels():
    sim = simulate_beads((128, 128), 20, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pcmx.PcmxWarning)  # "no pixel size" is the point here
        op = pcmx.learn_operator(np.asarray(sim["image"].values), validate=False)
    assert op["bead_y"].attrs["units"] == "pixel" and op["detection_y"].attrs["units"] == "pixel"
    # the same beads as the calibrated image's, in pixels
    um = pcmx.learn_operator(sim["image"], validate=False)
    np.testing.assert_allclose(op["bead_y"].values * PIXEL_UM, um["bead_y"].values, rtol=1e-12)


def test_units_survive_the_store_and_plain_xarray_is_silent(learned, tmp_path):
    _, _, op = learned
    path = pcmx.save_store(op, tmp_path / "op.zarr")
    back = pcmx.open_store(path)
    for name in ("bead_y", "bead_x", "detection_y", "detection_x"):
        assert back[name].attrs["units"] == "micrometer"
        np.testing.assert_array_equal(back[name].values, op[name].values)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consolidated metadata: no warning on a plain open
        plain = xr.open_zarr(path)
    assert plain["bead_x"].attrs["units"] == "micrometer"
    # pint round trip: quantified positions convert like the coordinates
    q = back[["bead_y"]].pint.quantify()
    assert str(q["bead_y"].data.units) == "micrometer"


@pytest.mark.parametrize("drop_units", [False, True], ids=["units-pixel", "no-units"])
def test_old_store_with_pixel_positions_reads_alike(learned, tmp_path, drop_units):
    _, bp, op = learned
    old = pcmx.open_store(pcmx.save_store(_as_old(op, drop_units=drop_units), tmp_path / "old.zarr"))
    np.testing.assert_allclose(stored_positions(old), stored_positions(op), atol=1e-9)
    np.testing.assert_allclose(stored_positions(old, "detection"), stored_positions(op, "detection"),
                               atol=1e-9)
    np.testing.assert_array_equal(used_bead_mask(bp, old), used_bead_mask(bp, op))
    # the bead overlay of the PSF grid lands on the same micrometres
    new_fig, old_fig = psf_grid(op, n=2), psf_grid(old, n=2)
    np.testing.assert_allclose(old_fig.axes[0].collections[0].get_offsets(),
                               new_fig.axes[0].collections[0].get_offsets(), rtol=1e-9)
    np.testing.assert_allclose(new_fig.axes[0].collections[0].get_offsets()[:, 0],
                               op["bead_x"].values, rtol=1e-9)
    plt.close("all")


def test_detection_positions_in_3d_follow_each_axis_step():
    grid = make_operator3d()  # 0.3 um planes, 0.1 um pixels
    out = detection_diagnostics(np.array([[1.0, 2.5, 3.0], [0.5, 0.0, 11.0]]), ["used", "border"],
                                ("z", "y", "x"), grid=grid)
    assert {out[f"detection_{d}"][2]["units"] for d in "zyx"} == {"micrometer"}
    np.testing.assert_allclose(out["detection_z"][1], [0.3, 0.15])
    np.testing.assert_allclose(out["detection_y"][1], [0.25, 0.0])
    np.testing.assert_allclose(out["detection_x"][1], [0.3, 1.1])
    ds = xr.Dataset({k: v for k, v in out.items()}, coords=grid.coords)
    np.testing.assert_allclose(stored_positions(ds, "detection"), [[1.0, 2.5, 3.0], [0.5, 0.0, 11.0]],
                               atol=1e-12)
    assert list(ds["detection_status"].values) == [0, 1]


def test_background_reads_patch_centres_in_pixels_only(learned):
    """In memory the patches' bead_* coords stay in pixels; micrometres there are refused
    rather than read as pixels."""
    from pcmx.background import patch_coordinates
    from pcmx.errors import InputError

    _, bp, _ = learned
    assert bp.patches["bead_y"].attrs["units"] == "pixel"
    coords = patch_coordinates(bp.patches)
    h = bp.patches.sizes["ky"] // 2
    np.testing.assert_allclose(coords[:, h, h], bp.positions)
    um = bp.patches.assign_coords(bead_y=("bead", bp.positions[:, 0] * PIXEL_UM,
                                          {"units": "micrometer"}))
    with pytest.raises(InputError, match=r"^positions: the patches' bead_\* coords are in "
                                         r"\['micrometer', 'pixel'\], not pixels"):
        patch_coordinates(um)
    np.testing.assert_allclose(patch_coordinates(um, bp.positions), coords)
