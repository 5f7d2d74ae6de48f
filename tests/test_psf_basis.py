"""PSF basis: PCA of normalised patches, z-score rejection, rank rule (paper App. A d-f, II-E)."""

import numpy as np
import pytest
import xarray as xr

from pcmx.errors import InputError
from pcmx.psf_basis import _bump, fit_psf_basis, optimal_rank
from pcmx.simulate import simulate_beads, true_psfs

SIZE = 25


@pytest.fixture(scope="module")
def sim():
    return simulate_beads((256, 256), 10, seed=1, noise=False)


@pytest.fixture(scope="module")
def noisy_patches(sim):
    """200 photon-noisy PSF patches from random field positions, 5 of them double beads."""
    rng = np.random.default_rng(0)
    ys, xs = rng.uniform(0, 255, 200), rng.uniform(0, 255, 200)
    psfs = true_psfs(sim, ys, xs, size=SIZE)
    bg = 20.0
    p = (rng.poisson(psfs * 10000.0 + bg) - bg).astype(np.float32)
    p[:5] += np.roll(p[10:15], (6, -5), axis=(1, 2))
    return xr.DataArray(p, dims=("bead", "ky", "kx"),
                        coords={"bead_y": ("bead", ys), "bead_x": ("bead", xs)})


def _relative_projection_error(ds, targets):
    h = ds["psf_basis"].values.reshape(ds.sizes["component"], -1).astype(np.float64)
    t = targets.reshape(len(targets), -1) * _bump((SIZE, SIZE), ds.attrs["psf_radius"],
                                                   ds.attrs["r_ext"]).ravel()
    proj = (t @ h.T) @ h
    return np.linalg.norm(t - proj, axis=1) / np.linalg.norm(t, axis=1)


def test_basis_spans_true_psfs(sim, noisy_patches):
    ds = fit_psf_basis(noisy_patches, 5)
    assert ds["psf_basis"].dtype == np.float32 and ds["psf_basis"].dims == ("component", "ky", "kx")
    h = ds["psf_basis"].values.reshape(5, -1).astype(np.float64)
    np.testing.assert_allclose(h @ h.T, np.eye(5), atol=1e-5)
    rng = np.random.default_rng(7)
    truth = true_psfs(sim, rng.uniform(0, 255, 50), rng.uniform(0, 255, 50), size=SIZE)
    err = _relative_projection_error(ds, truth)
    assert np.median(err) < 0.04, np.median(err)
    assert err.max() < 0.10, err.max()


def test_beta_describes_sum_one_psfs(noisy_patches):
    ds = fit_psf_basis(noisy_patches, 5)
    beta = ds["beta"].values.astype(np.float64)
    h = ds["psf_basis"].values.reshape(5, -1).astype(np.float64)
    recon = beta @ h
    dev = np.abs(recon.sum(axis=1) - 1.0)  # the noise outside span(h) carries a little energy
    assert np.median(dev) < 0.02 and dev.max() < 0.15, (np.median(dev), dev.max())
    kept = ds["kept"].values
    assert beta.shape == (kept.sum(), 5)
    np.testing.assert_array_equal(ds["bead_y"].values, noisy_patches["bead_y"].values[kept])
    p = noisy_patches.values[kept].reshape(kept.sum(), -1).astype(np.float64)
    p = p * _bump((SIZE, SIZE), ds.attrs["psf_radius"], ds.attrs["r_ext"]).ravel()
    p /= p.sum(axis=1, keepdims=True)
    rel = np.linalg.norm(p - recon, axis=1) / np.linalg.norm(p, axis=1)
    assert np.median(rel) < 0.1


def test_double_beads_rejected(noisy_patches):
    ds = fit_psf_basis(noisy_patches, 5)
    kept = ds["kept"].values
    assert not kept[:5].any()
    assert ds.attrs["n_outliers"] == (~kept).sum() <= 5 + 6  # few false rejections at 3 sigma
    assert ds.sizes["bead"] == kept.sum()


def test_rank_rule(noisy_patches):
    ds = fit_psf_basis(noisy_patches)
    s = ds["singular_values"].values
    assert ds.attrs["n_components_rule"] == "2.858 median"
    assert ds.sizes["component"] == np.count_nonzero(s > 2.858 * np.median(s)) >= 3
    assert optimal_rank([1.0, 1.0, 1.0]) == 1
    assert optimal_rank([100.0, 50.0, 1, 1, 1, 1, 1], max_rank=1) == 1
    assert optimal_rank([100.0, 50.0, 1, 1, 1, 1, 1]) == 2


def test_components_clipped_to_patches(sim):
    p = true_psfs(sim, [30.0, 100.0, 200.0], [40.0, 120.0, 220.0], size=SIZE)
    ds = fit_psf_basis(p, 10, outlier_sigma=np.inf)
    assert ds.sizes["component"] == 3 and ds.attrs["n_outliers"] == 0


def test_bump_profile():
    m = _bump((31, 31), 10.0, 12.0)
    assert m[15, 15] == 1.0 and m[15, 25] == 1.0 and m[15, 27] == 0.0
    assert 0 < m[15, 26] < 1  # t = 11: exp(-1/(1-0.25) + 1)
    np.testing.assert_allclose(m[15, 26], np.exp(-1 / 0.75 + 1))


@pytest.mark.parametrize(("bad", "message"), [
    (np.zeros((3, 5)), r"patches: expected dims \(bead, ky, kx\) or \(bead, kz, ky, kx\), got an array of shape \(3, 5\)"),
    (np.zeros((0, 5, 5)), "patches: no bead patch to learn a PSF basis from"),
    (np.full((2, 5, 5), np.nan), "patches: contain NaN or infinite values"),
    (np.zeros((2, 5, 5)), "patches: every patch has a non-positive sum after background removal"),
])
def test_errors(bad, message):
    with pytest.raises(InputError, match=f"^{message}$"):
        fit_psf_basis(bad)


def test_bad_n_components():
    with pytest.raises(InputError, match="^n_components: must be a positive integer, got 0$"):
        fit_psf_basis(np.ones((2, 5, 5)), 0)
