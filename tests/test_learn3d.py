"""Learning one operator from a z-stack of beads in a gel (issue 5: 3D goes through the same steps).

A simulated 32 x 160 x 160 stack (0.3 um planes, 0.1 um pixels, water NA 1.2) against the
simulator's 3D truth. The bump multiplier of App. A-d is an ellipsoid in 3D while a defocused
PSF spreads as a double cone: the model is zero beyond r_ext by design, so PSFs are compared
on the model's support (the truth times the same bump), as cross-validation does.
"""

from functools import partial

import numpy as np
import pytest

import pcmx
from pcmx.errors import InputError
from pcmx.fit import fit_operator, stored_positions
from pcmx.io.readers import as_image
from pcmx.learn import learn_operator
from pcmx.neighbours import refit_without_neighbours
from pcmx.patches import BeadPatches, bead_patches
from pcmx.simulate import simulate_beads, true_psfs
from pcmx.testing import dottest
from pcmx.truth import (
    centred_psfs,
    grid_positions,
    grid_psf_error,
    relative_errors,
    thick_sample_bounds,
    truth_on_support,
)

OPTICS = dict(z_step="300nm", pixel_size="100nm", na=1.2, n_immersion=1.33, patch_size=33)


@pytest.fixture(scope="module")
def sim():
    return simulate_beads((32, 160, 160), 80, photons=30000.0, min_separation=12, seed=5, **OPTICS)


@pytest.fixture(scope="module")
def learned(sim):
    img = as_image(sim["image"])
    bp = bead_patches(img)
    return bp, fit_operator(bp, image=img)


def test_operator_store_in_3d(learned, tmp_path):
    bp, op = learned
    pcmx.validate(op)
    assert op["psf_basis"].dims == ("component", "kz", "ky", "kx")
    assert op["coefficients"].dims == ("component", "z", "y", "x")
    assert op["coefficients"].shape[1:] == (32, 160, 160)
    assert all(n % 2 == 1 for n in op["psf_basis"].shape[1:])
    # anisotropic voxels from the stack's coordinates: 0.3 um planes, 0.1 um pixels
    assert float(op["kz"][1] - op["kz"][0]) == pytest.approx(0.3)
    assert float(op["ky"][1] - op["ky"][0]) == pytest.approx(0.1)
    assert float(op["z"][1] - op["z"][0]) == pytest.approx(0.3)
    p = op.attrs["pcmx_parameters"]
    rz, ry, rx = p["psf_radius"]
    assert ry == rx and rz >= 3 and ry >= 3
    assert op.sizes["kz"] == 2 * int(np.ceil(1.2 * rz)) + 1
    assert p["counts"]["used"] >= 20 and 1 <= op.sizes["component"] <= 8
    assert {"bead_z", "bead_y", "bead_x", "cone_generators"} <= set(op.data_vars)
    back = pcmx.open_store(pcmx.save_store(op, tmp_path / "op3d.zarr"), kind="operator")
    np.testing.assert_array_equal(back["psf_basis"].values, op["psf_basis"].values)


def test_3d_psfs_match_truth_and_beat_the_invariant_model(sim, learned):
    bp, op = learned
    err, err_inv = grid_psf_error(op, sim, bp.radius)
    # the model's own floor: noise-free true PSFs at the same beads through the same steps
    pos = bp.positions
    ks = bp.patches.shape[1:]
    truth = true_psfs(sim, pos[:, 1], pos[:, 2], size=ks[1], size_z=ks[0]) * 1e4
    fb = BeadPatches(patches=bp.patches.copy(data=truth.astype(np.float32)), positions=pos,
                     radius=bp.radius, shape=bp.shape)
    floor = fit_operator(fb, n_components=op.sizes["component"], outlier_sigma=np.inf)
    err_floor, _ = grid_psf_error(floor, sim, bp.radius)
    # the neighbours' light subtracted with the model, one pass (learn_operator's "auto" in 3D)
    op_n, _, _ = refit_without_neighbours(bp, as_image(sim["image"]),
                                          partial(fit_operator, image=as_image(sim["image"])),
                                          passes=1, first=op)
    err_n, _ = grid_psf_error(op_n, sim, bp.radius)
    print(f"3D median PSF error on the support: learned {err:.3f}, neighbours subtracted "
          f"{err_n:.3f}, floor {err_floor:.3f}, space-invariant {err_inv:.3f}; "
          f"I = {op.sizes['component']}, r = {bp.radius}")
    assert err_floor < 0.05
    assert err < 0.15
    assert err < 0.85 * err_inv
    # measured 0.097 -> 0.092 (floor 0.029: 3.2x, not the 1.5x of issue 12; docs/learning.md)
    assert err_n < 0.975 * err and err_n / err_floor < 3.5


def test_product_convolution_applies_the_learned_3d_operator(sim, learned):
    bp, op = learned
    pc = pcmx.ProductConvolution(op)
    gz, gy, gx = grid_positions(op)
    u = np.zeros(op["coefficients"].shape[1:], dtype=np.float32)
    sel = [0, 4, 8]  # three separated point sources
    u[gz[sel], gy[sel], gx[sel]] = 1.0
    v = pc.apply(u)
    hz, hy, hx = (n // 2 for n in op["psf_basis"].shape[1:])
    truth = truth_on_support(sim, op, bp.radius, gy[sel], gx[sel])
    for k, j in enumerate(sel):
        z, y, x = gz[j], gy[j], gx[j]
        block = v[z - hz:z + hz + 1, y - hy:y + hy + 1, x - hx:x + hx + 1]
        np.testing.assert_allclose(block, pc.psf_at(z, y, x), rtol=1e-4, atol=1e-6 * block.max())
        assert relative_errors(centred_psfs(block[None]), truth[k:k + 1])[0] < 0.2
    lhs, rhs = dottest(pc, u.shape)
    assert lhs == pytest.approx(rhs, rel=1e-4)


def test_z_step_and_radius_arguments(sim):
    stack = np.asarray(sim["image"].values)
    op = learn_operator(stack, pixel_size="100nm", z_step="300nm", psf_radius=(5, 5, 5),
                        n_components=3)
    assert op.attrs["pcmx_parameters"]["psf_radius"] == [5, 5, 5]
    assert op.sizes["kz"] == op.sizes["ky"] == 13 and op.sizes["component"] == 3
    assert float(op["kz"][1] - op["kz"][0]) == pytest.approx(0.3)
    assert float(op["kx"][1] - op["kx"][0]) == pytest.approx(0.1)
    with pytest.raises(InputError, match=r"^z_step='300nm': image is a 2D image, not a z-stack$"):
        learn_operator(stack[16], pixel_size="100nm", z_step="300nm")
    with pytest.raises(InputError, match=r"^psf_radius=\(5, 5\) must be a positive number of "
                                         r"pixels or three \(r_z, r_y, r_x\)$"):
        learn_operator(stack, psf_radius=(5, 5))


def test_cross_validation_on_a_z_stack(sim, learned):
    """Held-out beads of the stack: the 3D operator predicts them better than the average PSF."""
    bp, _ = learned
    cv = pcmx.cross_validate(as_image(sim["image"]), folds=5, psf_radius=bp.radius)
    assert {"cv_bead_z", "cv_bead_y", "cv_bead_x"} <= set(cv.data_vars)
    # stored in the stack's units (0.3 um planes, 0.1 um pixels), read back as pixel indices
    assert cv["cv_bead_z"].attrs["units"] == cv["cv_bead_x"].attrs["units"] != "pixel"
    np.testing.assert_allclose(cv["cv_bead_z"].values, 0.3 * bp.positions[:, 0], rtol=1e-9, atol=1e-9)
    back = stored_positions(cv, "cv_bead", grid=as_image(sim["image"]))
    np.testing.assert_allclose(back, bp.positions, rtol=0, atol=1e-9)
    err, err_inv = cv.attrs["median_error"], cv.attrs["median_error_invariant"]
    print(f"3D cross-validation ({cv.attrs['n_beads']} beads, 5 folds): median held-out error "
          f"{err:.3f} space-varying vs {err_inv:.3f} average PSF")
    assert np.all(np.isfinite(cv["cv_error"].values))
    assert np.isfinite(err) and np.isfinite(err_inv)
    # the simulated PSF varies over the field: measured 0.113 vs 0.185 for the reference
    assert err < 0.13 and err < 0.75 * err_inv


def test_cli_learns_a_z_stack(sim, tmp_path, capsys):
    from pcmx.cli import main

    path = tmp_path / "stack.npy"
    np.save(path, np.asarray(sim["image"].values))
    out = tmp_path / "op.zarr"
    assert main(["learn", str(path), "-o", str(out), "--pixel-size", "100nm", "--z-step", "300nm",
                 "--psf-radius", "5", "5", "5", "--components", "3"]) == 0
    op = pcmx.open_store(out, kind="operator")
    assert op["psf_basis"].dims == ("component", "kz", "ky", "kx") and op.sizes["component"] == 3
    assert float(op["z"][1] - op["z"][0]) == pytest.approx(0.3)
    assert "r=[5, 5, 5] px" in capsys.readouterr().out
    # --validate: cross-validation over held-out beads of the stack, stored beside the operator
    out_cv = tmp_path / "op_cv.zarr"
    assert main(["learn", str(path), "-o", str(out_cv), "--pixel-size", "100nm", "--z-step",
                 "300nm", "--psf-radius", "5", "5", "5", "--components", "3", "--validate"]) == 0
    printed = capsys.readouterr().out
    assert "cross-validation (5 folds): median held-out error" in printed
    op = pcmx.open_store(out_cv, kind="operator")
    assert {"cv_error", "cv_error_invariant", "cv_bead_z"} <= set(op.data_vars)
    cv = op.attrs["pcmx_parameters"]["cross_validation"]
    assert np.isfinite(cv["median_error"]) and cv["median_error"] < cv["median_error_invariant"]


def test_thick_sample_bounds_put_the_noise_free_floor_out_of_reach(sim, learned):
    """Issue 12 item 7 asks for 3D within 1.5x of the noise-free floor. Even beads that never had
    a neighbour (each imaged alone, its own noise only) are 1.67x of it, and so is the oracle that
    subtracts the whole true light of every other bead: the floor is out of reach for any
    neighbour subtraction; what neighbours cost is the gap between the learned model and these."""
    bp, op = learned
    b = thick_sample_bounds(sim, bp, n_components=op.sizes["component"])
    err, _ = grid_psf_error(op, sim, bp.radius)
    print({k: round(v, 4) for k, v in b.items()}, f"learned {err:.4f}")
    # measured 2026-12-07: floor 0.0292, others removed 0.0488 (1.67x), alone 0.0486 (1.67x),
    # learned 0.0967 (3.3x)
    assert b["floor"] < 0.04
    assert b["alone"] / b["floor"] > 1.5 and b["others_removed"] / b["floor"] > 1.5
    assert abs(b["alone"] / b["others_removed"] - 1) < 0.15
    assert err > 1.5 * b["alone"]
