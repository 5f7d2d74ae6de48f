"""PSF basis: PCA of normalised patches, z-score rejection, rank rule (paper App. A d-f, II-E)."""

import numpy as np
import pytest
import xarray as xr

from pcmx.beads import bump_multiplier
from pcmx.errors import InputError
from pcmx.io.readers import PcmxWarning
from pcmx.psf_basis import (
    fit_psf_basis,
    hard_threshold,
    normalise_patches,
    optimal_rank,
    snr_weights,
)
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


@pytest.fixture(scope="module")
def field_patches():
    """The isolated bead patches of a simulated 512 x 512 field of 150 bright beads."""
    from pcmx.patches import bead_patches

    sim = simulate_beads((512, 512), 150, photons=60000.0, min_separation=30, seed=3)
    return bead_patches(sim["image"]).patches


def _relative_projection_error(ds, targets):
    h = ds["psf_basis"].values.reshape(ds.sizes["component"], -1).astype(np.float64)
    t = targets.reshape(len(targets), -1) * bump_multiplier((SIZE, SIZE), ds.attrs["psf_radius"],
                                                             ds.attrs["r_ext"], dtype=np.float64).ravel()
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
    p = p * bump_multiplier((SIZE, SIZE), ds.attrs["psf_radius"], ds.attrs["r_ext"],
                            dtype=np.float64).ravel()
    p /= p.sum(axis=1, keepdims=True)
    rel = np.linalg.norm(p - recon, axis=1) / np.linalg.norm(p, axis=1)
    assert np.median(rel) < 0.1


def _field_radius(patches, centre):
    """max(|y - c| / c, |x - c| / c) of every bead: 0 at the field's centre, 1 at its edge."""
    y, x = patches["bead_y"].values, patches["bead_x"].values
    return np.maximum(np.abs(y - centre), np.abs(x - centre)) / centre


def test_true_outliers_rejected(noisy_patches):
    """Double beads and hot pixels are rejected (App. A-f), and few others."""
    p = noisy_patches.copy(deep=True)
    peak = p.values[20:23].max(axis=(1, 2))
    p.values[20:23, 12 + 3, 12 - 4] += 2.0 * peak  # hot pixels inside the support
    ds = fit_psf_basis(p, 5)
    kept = ds["kept"].values
    assert not kept[:5].any()  # planted double beads
    assert not kept[20:23].any()  # hot pixels
    assert 8 <= ds.attrs["n_outliers"] == (~kept).sum() <= 8 + 2
    assert ds.sizes["bead"] == kept.sum()
    assert np.isnan(ds["zscore"].values).sum() == 0


def test_edge_beads_kept_under_smooth_field_variation(field_patches):
    """PSFs vary over the field by design: the test against the field's local trend keeps the
    edge beads, the paper's z-score against the mean rejects mostly them."""
    field = fit_psf_basis(field_patches)
    paper = fit_psf_basis(field_patches, outlier_test="paper")
    rad = _field_radius(field_patches, 255.5)
    n_field, n_paper = field.attrs["n_outliers"], paper.attrs["n_outliers"]
    print(f"rejected of {len(rad)} clean beads: field test {n_field}, paper's test {n_paper}, "
          f"mean field radius of the paper's rejections {rad[~paper['kept'].values].mean():.2f}")
    assert n_field <= 2
    assert n_paper >= 8
    assert rad[~paper["kept"].values].mean() > 0.7  # the paper's test flags the field's edge


def test_hard_threshold_and_rank_of_a_known_low_rank_matrix():
    """Gavish-Donoho's omega(beta) * median finds the rank of low-rank + white noise; the
    square-matrix factor 2.858 misses a component of a 200 x 800 matrix."""
    assert hard_threshold(1.0) == pytest.approx(2.858, abs=0.01)
    assert hard_threshold(0.25) == pytest.approx(1.834, abs=0.001)
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((200, 4)))
    v, _ = np.linalg.qr(rng.standard_normal((800, 4)))
    x = (u * [300.0, 200.0, 120.0, 65.0]) @ v.T + rng.standard_normal((200, 800))
    s = np.linalg.svd(x, compute_uv=False)
    assert optimal_rank(s, shape=x.shape) == 4
    assert optimal_rank(s) == 3  # 2.858 * median: the weakest component is lost
    assert optimal_rank([1.0, 1.0, 1.0]) == 1
    assert optimal_rank([100.0, 50.0, 1, 1, 1, 1, 1], max_rank=1) == 1
    assert optimal_rank([100.0, 50.0, 1, 1, 1, 1, 1]) == 2


@pytest.fixture(scope="module")
def rank3_patches():
    """300 Poisson-noisy 11 x 11 patches, positive mixtures of three PSF shapes (rank 3)."""
    rng = np.random.default_rng(0)
    k = np.arange(11) - 5
    yy, xx = np.meshgrid(k, k, indexing="ij")
    shapes = np.stack([np.exp(-(yy**2 + xx**2) / (2 * 1.3**2)),
                       np.exp(-(yy**2 / 1.2**2 + xx**2 / 2.2**2) / 2),
                       np.exp(-(yy**2 / 2.2**2 + xx**2 / 1.2**2) / 2)])
    shapes /= shapes.sum(axis=(1, 2), keepdims=True)
    w = rng.uniform(0.2, 1.0, (300, 3))
    w /= w.sum(axis=1, keepdims=True)
    clean = np.einsum("mk,kij->mij", w, shapes) * 30000.0 * rng.lognormal(0.0, 0.3, (300, 1, 1))
    return (rng.poisson(clean + 20.0) - 20.0).astype(np.float32)


@pytest.mark.parametrize(("rule", "expected"), [("noise", 3), ("support", 16), ("paper", 35)])
def test_rank_rule_on_patches_of_known_rank(rank3_patches, rule, expected):
    """Poisson noise is heteroscedastic: the unknown-noise median rules keep noise components
    (the paper's over whole patches more: 300 patches of 121 pixels, 52 of them zero after the
    bump, so the median falls); the rule on the estimated noise finds the rank (with the
    default SNR weights too). The median rules are shown on the unweighted matrix: weighting
    moves their median (the paper's keeps 34 instead of 35)."""
    weights = "snr" if rule == "noise" else "equal"
    ds = fit_psf_basis(rank3_patches, r=4.0, outlier_sigma=np.inf, rank_rule=rule, weights=weights)
    if rule == "paper":  # whole patches, weighted on the support
        assert fit_psf_basis(rank3_patches, r=4.0, outlier_sigma=np.inf,
                             rank_rule=rule).attrs["n_components"] == 34
    assert ds.sizes["component"] == ds.attrs["n_components"] == expected
    assert ds.attrs["n_components_rule"] == {"noise": "gavish-donoho noise",
                                             "support": "gavish-donoho support",
                                             "paper": "2.858 median"}[rule]


def test_rank_rule_default_on_a_simulated_field(field_patches):
    ds = fit_psf_basis(field_patches)
    assert ds.attrs["n_components_rule"] == "gavish-donoho noise"
    n_i = ds.attrs["n_components"]
    s = ds["singular_values"].values
    by_median = np.count_nonzero(s > ds.attrs["rank_threshold"] * np.median(s))
    print(f"I = {n_i} (the median rule on the same patches: {by_median})")
    assert 6 <= n_i <= 16
    assert by_median > n_i + 5  # the white-noise median rule keeps many more


def test_components_clipped_to_patches(sim):
    p = true_psfs(sim, [30.0, 100.0, 200.0], [40.0, 120.0, 220.0], size=SIZE)
    with pytest.warns(PcmxWarning, match=r"^n_components=10 reduced to 3: the PCA of 3 kept patches "
                                         r"has at most 3 components$"):
        ds = fit_psf_basis(p, 10, outlier_sigma=np.inf)
    assert ds.sizes["component"] == 3 and ds.attrs["n_outliers"] == 0


def test_bump_profile():
    m = bump_multiplier((31, 31), 10.0, 12.0, dtype=np.float64)
    assert m.dtype == np.float64
    assert m[15, 15] == 1.0 and m[15, 25] == 1.0 and m[15, 27] == 0.0
    assert 0 < m[15, 26] < 1  # t = 11: exp(-1/(1-0.25) + 1)
    np.testing.assert_allclose(m[15, 26], np.exp(-1 / 0.75 + 1), rtol=1e-14)
    # the PSF basis weighs patches with this bump (r_ext = r: a hard cut, allowed here)
    patches = np.ones((2, 31, 31))
    _, _, sums = normalise_patches(patches, 10.0, r_ext=12.0)
    np.testing.assert_allclose(sums, m.sum(), rtol=1e-12)
    _, _, sums = normalise_patches(patches, 10.0, r_ext=10.0)
    assert sums[0] == np.count_nonzero(np.hypot(*np.meshgrid(np.arange(31) - 15, np.arange(31) - 15)) <= 10)


@pytest.mark.parametrize(("bad", "message"), [
    (np.zeros((3, 5)), r"patches: expected dims \(bead, ky, kx\) or \(bead, kz, ky, kx\), got an array of shape \(3, 5\)"),
    (np.zeros((0, 5, 5)), "patches: no bead patch to learn a PSF basis from"),
    (np.full((2, 5, 5), np.nan), "patches: contain NaN or infinite values"),
    (np.zeros((2, 5, 5)), "patches: every patch has a non-positive sum after background removal"),
])
def test_errors(bad, message):
    with pytest.raises(InputError, match=f"^{message}$"):
        fit_psf_basis(bad)


def test_bad_arguments():
    with pytest.raises(InputError, match="^n_components: must be a positive integer, got 0$"):
        fit_psf_basis(np.ones((2, 5, 5)), 0)
    with pytest.raises(InputError, match="^outlier_test: must be one of 'field', 'paper', got 'mean'$"):
        fit_psf_basis(np.ones((2, 5, 5)), outlier_test="mean")
    with pytest.raises(InputError, match="^rank_rule: must be one of 'noise', 'support', 'paper', got 'gd'$"):
        fit_psf_basis(np.ones((2, 5, 5)), rank_rule="gd")
    with pytest.raises(InputError, match=r"^beta=1.5: the aspect ratio must be in \(0, 1\]$"):
        hard_threshold(1.5)


def test_noise_threshold_with_a_vanishing_bump_stays_finite():
    """A bump of ~1e-200 at the support's edge (r = 17 px on a 37 x 37 grid, 130 dim patches)
    made the unbumped fit overflow: a NaN threshold and a crash of the rank rule."""
    from pcmx.psf_basis import noise_threshold

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[-8:9, -8:9]
    psf = np.exp(-(yy**2 + xx**2) / 6.0).ravel()
    raw = rng.poisson(400 * psf[None, :] + 5.0, size=(60, psf.size)).astype(np.float64) - 5.0
    bump = np.ones(psf.size)
    bump[:3] = 1e-200  # pixels just inside r_ext
    x = raw * bump
    unit = x / x.sum(axis=1, keepdims=True)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    comps = np.linalg.svd(unit, full_matrices=False)[2][:2]
    with np.errstate(over="raise", invalid="raise"):
        thr = noise_threshold(raw, bump, comps)
    bump_ok = bump.copy()
    bump_ok[:3] = 0.0  # the same pixels excluded outright
    assert np.isfinite(thr) and thr > 0
    np.testing.assert_allclose(thr, noise_threshold(raw, bump_ok, comps), rtol=1e-6)


def test_equal_weights_are_the_unweighted_pca(noisy_patches):
    """The weighted PCA with equal weights is the unweighted one, exactly."""
    plain = fit_psf_basis(noisy_patches, weights="equal")
    ones = fit_psf_basis(noisy_patches, weights=np.ones(noisy_patches.sizes["bead"]))
    for name in ("psf_basis", "beta", "singular_values", "kept"):
        np.testing.assert_array_equal(plain[name].values, ones[name].values)
    same = fit_psf_basis(noisy_patches, weights=np.full(noisy_patches.sizes["bead"], 3.7))
    np.testing.assert_allclose(same["psf_basis"].values, plain["psf_basis"].values, atol=1e-6)
    assert plain.attrs["weights"] == "equal" and ones.attrs["weights"] == "given"
    np.testing.assert_array_equal(plain["weight"].values, plain["kept"].values.astype(float))
    np.testing.assert_array_equal(snr_weights(np.full(7, 4.2), 10.0), np.ones(7))
    with pytest.raises(InputError, match="weights"):
        fit_psf_basis(noisy_patches, weights="flux")
    with pytest.raises(InputError, match="snr_ref"):
        fit_psf_basis(noisy_patches, snr_ref=0.0)


def test_snr_weights_recover_the_basis_that_faint_beads_spoil(sim):
    """40 of 200 beads at 300 photons (their normalised patches mostly noise), 160 at 20000:
    unweighted, the noise rows hide every component but the first (I = 1) and, at a given
    I = 5, pull the basis off the PSFs; weighted by SNR the basis spans the true PSFs."""
    rng = np.random.default_rng(0)
    ys, xs = rng.uniform(0, 255, 200), rng.uniform(0, 255, 200)
    photons = np.full(200, 20000.0)
    photons[:40] = 300.0
    p = (rng.poisson(true_psfs(sim, ys, xs, size=SIZE) * photons[:, None, None] + 20.0) - 20.0)
    patches = xr.DataArray(p.astype(np.float32), dims=("bead", "ky", "kx"),
                           coords={"bead_y": ("bead", ys), "bead_x": ("bead", xs)})
    truth = true_psfs(sim, rng.uniform(0, 255, 50), rng.uniform(0, 255, 50), size=SIZE)
    rows = {}
    for weights in ("equal", "snr"):
        for n in (None, 5):
            ds = fit_psf_basis(patches, n, weights=weights)
            rows[weights, n] = (ds.attrs["n_components"],
                                float(np.median(_relative_projection_error(ds, truth))), ds)
    print({k: v[:2] for k, v in rows.items()})
    snr = rows["snr", None][2]["snr"].values
    assert np.nanmedian(snr[:40]) < 2.5 and np.nanmedian(snr[40:]) > 12  # measured 0.95, 17.3
    # measured: equal I = 1, 0.124; snr I = 7, 0.017; at I = 5: 0.078 vs 0.025
    assert rows["equal", None][0] == 1 and rows["snr", None][0] >= 5
    assert rows["snr", None][1] < 0.03 and rows["equal", None][1] > 0.09
    assert rows["snr", 5][1] < 0.5 * rows["equal", 5][1]
