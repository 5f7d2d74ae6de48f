"""Quality of a learned operator against the simulator's ground truth (issue 5, Quality).

* the model's own floor: the same pipeline (same beads, r, I, thin-plate splines, cone) fed
  with noise-free true PSFs at the positions of the beads the noisy run used; the noisy
  operator's median PSF error must be within 1.5x of it;
* dim beads degrade gracefully: the error grows as the beads dim, I shrinks, and the
  operator stays at least as good as the space-invariant average PSF;
* the cone projection keeps every predicted PSF non-negative to within 1% of its peak,
  outside the beads' convex hull too, where plain interpolation does not;
* the space-varying operator beats the space-invariant model, by a printed factor.
"""

import numpy as np
import pytest
import xarray as xr

import pcmx
from pcmx.fit import fit_operator, stored_positions
from pcmx.io.readers import as_image
from pcmx.patches import BeadPatches, bead_patches
from pcmx.simulate import simulate_beads, true_psfs
from pcmx.truth import centred_psfs

# median photons per bead -> peak photons about 0.04-0.06 of that (NA 1.49, 65 nm pixels):
# 60000 bright (peak ~3000), 40000 the "dim" (peak ~2000), 10000 and 2000 dimmer
PHOTONS = (60000.0, 40000.0, 10000.0, 2000.0)


def _grid_error(op, sim, n=5):
    """Median relative l2 error of the PSFs predicted at an n x n grid vs the true PSFs."""
    ny, nx = op.sizes["y"], op.sizes["x"]
    ys = np.round(np.linspace(0, ny - 1, n + 2)[1:-1])
    xs = np.round(np.linspace(0, nx - 1, n + 2)[1:-1])
    gy, gx = (a.ravel() for a in np.meshgrid(ys, xs, indexing="ij"))
    coeffs = op["coefficients"].values[:, gy.astype(int), gx.astype(int)]
    pred = centred_psfs(np.einsum("im,ijk->mjk", coeffs, op["psf_basis"].values))
    true = centred_psfs(true_psfs(sim, gy, gx, size=op.sizes["ky"]))
    diff = np.linalg.norm((pred - true).reshape(len(gy), -1), axis=1)
    return float(np.median(diff / np.linalg.norm(true.reshape(len(gy), -1), axis=1)))


def _invariant(op):
    """The space-invariant model: the average observed coefficients everywhere."""
    inv = op.copy()
    mean = op["observed_coefficients"].values.mean(axis=0)
    inv["coefficients"] = xr.zeros_like(op["coefficients"]) + mean[:, None, None]
    return inv


def _floor(bp, op, sim):
    """The same pipeline fed with noise-free true PSFs at the positions of the used beads."""
    used = np.isin(np.arange(len(bp.positions)), _used_indices(bp, op))
    pos = bp.positions[used]
    truth = true_psfs(sim, pos[:, 0], pos[:, 1], size=bp.patches.sizes["ky"]) * 1e4
    patches = bp.patches.isel(bead=np.flatnonzero(used)).copy(data=truth.astype(np.float32))
    fb = BeadPatches(patches=patches, positions=pos, radius=bp.radius, shape=bp.shape)
    return fit_operator(fb, n_components=op.sizes["component"], outlier_sigma=np.inf)


def _used_indices(bp, op):
    # the stored positions are in micrometres: read back in pixels, each the nearest bead
    return [int(np.argmin(np.hypot(*(bp.positions - p).T))) for p in stored_positions(op)]


@pytest.fixture(scope="module")
def runs():
    """Per brightness: the simulation, the bead patches and the learned operator."""
    out = {}
    for photons in PHOTONS:
        sim = simulate_beads((512, 512), 150, photons=photons, min_separation=30, seed=3)
        img = as_image(sim["image"])
        bp = bead_patches(img)
        out[photons] = (sim, bp, fit_operator(bp, image=img))
    return out


@pytest.fixture(scope="module")
def figures(runs):
    rows = {}
    for photons, (sim, bp, op) in runs.items():
        floor = _floor(bp, op, sim)
        rows[photons] = {
            "I": op.sizes["component"], "r": bp.radius,
            "used": op.attrs["pcmx_parameters"]["counts"]["used"],
            "error": _grid_error(op, sim), "floor": _grid_error(floor, sim),
            "invariant": _grid_error(_invariant(op), sim),
            "floor_used": floor.attrs["pcmx_parameters"]["counts"]["used"],
        }
    print("\nphotons     I   r  used  error   floor   ratio  invariant")
    for photons, f in rows.items():
        print(f"{photons:8.0f} {f['I']:3d} {f['r']:3d} {f['used']:5d}  {f['error']:.4f}  "
              f"{f['floor']:.4f}  {f['error'] / f['floor']:.2f}   {f['invariant']:.4f}")
    return rows


def test_within_1_5x_of_the_models_own_floor(figures):
    for photons, f in figures.items():
        assert f["floor_used"] == f["used"]  # the same beads
        assert f["error"] <= 1.5 * f["floor"], (photons, f)
    bright = figures[60000.0]
    assert bright["error"] < 0.06 and bright["floor"] < 0.06


def test_beats_the_space_invariant_model(figures):
    bright = figures[60000.0]
    assert bright["invariant"] / bright["error"] > 4.0  # measured 6x
    assert figures[40000.0]["invariant"] / figures[40000.0]["error"] > 3.0
    assert figures[10000.0]["error"] < 0.5 * figures[10000.0]["invariant"]


def test_dim_beads_degrade_gracefully(figures):
    errors = [figures[p]["error"] for p in PHOTONS]
    ranks = [figures[p]["I"] for p in PHOTONS]
    # dimmer beads: a larger error, never a jump; fewer components (the noise hides them)
    assert all(b >= a - 0.01 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.2
    assert all(b <= a for a, b in zip(ranks, ranks[1:], strict=False)), ranks
    assert ranks[-1] <= 5
    dim = figures[2000.0]
    # peak ~100 photons over a background of 50: the space variation is barely above the
    # noise; measured 0.103 against 0.109 for the average PSF: never worse than it
    assert dim["error"] < dim["invariant"]


def _field_psfs(op, step=8):
    """The PSFs predicted on a lattice covering the whole field, borders and corners included."""
    ny, nx = op.sizes["y"], op.sizes["x"]
    ys = np.unique(np.r_[np.arange(0, ny, step), ny - 1])
    xs = np.unique(np.r_[np.arange(0, nx, step), nx - 1])
    c = op["coefficients"].values[:, ys][:, :, xs].reshape(op.sizes["component"], -1)
    psf = c.T @ op["psf_basis"].values.reshape(op.sizes["component"], -1)
    return psf.min(axis=1) / psf.max(axis=1)


def test_cone_keeps_psfs_non_negative_where_plain_interpolation_does_not(runs):
    sim, bp, cone = runs[60000.0]
    plain = fit_operator(bp, image=as_image(sim["image"]), realism=False)
    pcmx.validate(plain)
    assert "cone_generators" not in plain and "cone_generators" in cone
    neg_plain, neg_cone = _field_psfs(plain), _field_psfs(cone)
    print(f"most negative PSF value / peak over the field: plain {neg_plain.min():.4f} "
          f"({np.mean(neg_plain < -0.01):.1%} of the lattice below -1%), cone {neg_cone.min():.4f}")
    assert neg_plain.min() < -0.015
    assert np.mean(neg_plain < -0.01) > 0.01
    assert neg_cone.min() >= -0.01
