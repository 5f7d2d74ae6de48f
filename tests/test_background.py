"""Background estimators (paper App. B) and their bias against the simulator's truth."""

import numpy as np
import pytest
import xarray as xr

from pcmx import background as BG
from pcmx import beads as B
from pcmx.errors import InputError
from pcmx.simulate import simulate_beads
from pcmx.truth import background_bias


def _patches(data, r):
    half = [s // 2 for s in data.shape[1:]]
    dims = ("ky", "kx") if data.ndim == 3 else ("kz", "ky", "kx")
    coords = {d: np.arange(-h, h + 1) for d, h in zip(dims, half, strict=True)}
    return xr.DataArray(data.astype(np.float32), dims=("bead", *dims), coords=coords,
                        attrs={"psf_radius": [float(r)] * (data.ndim - 1)})


@pytest.mark.parametrize("nd", [2, 3])
def test_local_fit_removes_a_degree_two_polynomial_exactly(nd):
    rng = np.random.default_rng(0)
    r, half = 5.0, 6
    k = np.arange(-half, half + 1, dtype=np.float64)
    grids = np.meshgrid(*([k] * nd), indexing="ij")
    psf = np.exp(-sum(g**2 for g in grids) / (2 * 1.0**2))  # ~0 outside the disk of radius r
    design = BG.polynomial_design((2 * half + 1,) * nd)
    assert design.shape[1] == (6 if nd == 2 else 10)  # App. B: P = 6 monomials in 2D
    lam = rng.normal(0, 20, (4, design.shape[1]))
    poly = (lam @ design.T).reshape((4,) + (2 * half + 1,) * nd)
    p = _patches(100 * psf[None] + poly + 300.0, r)  # the offset is part of the background
    out = BG.subtract_background(p, method="local")
    np.testing.assert_allclose(out.values, np.broadcast_to(100 * psf, out.shape), atol=2e-3)
    assert out.dtype == np.float32 and out.attrs["background"] == "local"


def test_local_fit_needs_pixels_outside_r():
    p = _patches(np.ones((2, 7, 7)), 4.0)
    with pytest.raises(InputError, match=r"^r=\[4.0, 4.0\]: only 4 patch pixels lie outside the disk"):
        BG.local_background(p)


def _smooth_field(shape):
    y, x = (np.arange(n, dtype=np.float64) for n in shape)
    return 100 + 30 * np.sin(y / 60.0)[:, None] * np.cos(x / 45.0)[None, :]


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_global_estimate_of_a_smooth_background(noise):
    truth = _smooth_field((384, 352))
    img = (truth + noise * np.random.default_rng(1).normal(size=truth.shape)).astype(np.float32)
    est = BG.global_background(img, None, 4)
    assert est.attrs["block"] == [16, 16] and est.attrs["masked_fraction"] < 0.01
    full = BG.background_image(est)
    assert full.shape == truth.shape and full.dtype == np.float32
    err = (full - truth)[16:-16, 16:-16]
    # 30 % variations over ~150 px, estimated to a few hundredths of the noise level
    assert abs(err.mean()) < 0.01 and err.std() < 0.1 and np.abs(err).max() < 0.35, (
        err.mean(), err.std(), np.abs(err).max())
    pts = np.array([[100.25, 200.5], [17.0, 333.75]])
    exact = 100 + 30 * np.sin(pts[:, 0] / 60.0) * np.cos(pts[:, 1] / 45.0)  # the field at sub-pixel points
    # measured: 2e-4 without noise, 0.035 with noise 1 (the std bound above)
    np.testing.assert_allclose(BG.background_at(est, pts), exact, atol=0.1)


def test_cell_spline_reproduces_cell_means():
    rng = np.random.default_rng(2)
    means = rng.normal(100, 5, (6, 7))
    coef = BG.fit_cell_spline(means, np.ones(means.shape), smoothing=1e-10)
    assert coef.shape == (10, 11)
    # cell averages of the spline, sampled finely: the histopolation property
    coords = [BG._coefficient_coords(np.arange(n + 1) * 64) for n in means.shape]
    np.testing.assert_allclose(coords[0][2:-2], np.arange(6) * 64 + 31.5)  # cell centres
    fine = BG._evaluate_grid(coef, coords, (384, 448)).astype(np.float64)
    cells = fine.reshape(6, 64, 7, 64).mean(axis=(1, 3))
    np.testing.assert_allclose(cells, means, atol=0.01)
    with pytest.raises(InputError, match="^image: every block of the image is covered by beads"):
        BG.fit_cell_spline(means, np.zeros(means.shape))


@pytest.fixture(scope="module")
def sim():
    return simulate_beads((512, 512), 150, photons=10000.0, min_separation=25, seed=12)


def test_global_is_less_biased_than_local(sim):
    ds = background_bias(sim)
    g, loc = ds.sel(estimator="global"), ds.sel(estimator="local")
    print({k: ds[k].values.round(4).tolist() for k in ("background_error", "flux_bias", "psf_error")})
    assert ds.attrs["n_beads"] > 80
    # the local fit takes the PSF's wings for background: it removes several % of each bead
    assert float(loc.flux_bias) < -0.04
    assert abs(float(g.flux_bias)) < 0.015 and abs(float(g.flux_bias)) < abs(float(loc.flux_bias)) / 4
    assert float(g.background_error) < float(loc.background_error) / 4
    assert float(g.psf_error) < float(loc.psf_error)
    assert BG.DEFAULT_METHOD == "global"


def test_offset_disappears_with_the_background(sim):
    img = sim["image"].values.astype(np.float32)
    pos, _ = B.detect_beads(img)
    r = B.estimate_psf_radius(img, pos)
    keep, _ = B.reject_beads(pos, img.shape, r)
    centres = B.center_beads(img, pos[keep], r)
    p = B.extract_patches(img, centres, r)
    out, bg = BG.subtract_background(p, image=img, mask_positions=pos, return_background=True)
    assert bg.shape == p.shape and out.shape == p.shape
    pts = BG.patch_coordinates(p)
    truth = 2.0 * BG.ndi.map_coordinates(sim["background"].values, [pts[..., 0], pts[..., 1]],
                                         order=1) + 100.0  # gain 2, offset 100 ADU
    err = bg - truth
    # the ~100 ADU offset and ~100 ADU background are gone, to within the glow of the other
    # beads' far wings (~1-5 ADU near bright neighbours, light the patches must not keep
    # either, so not an error of the estimate; without beads the error is 0.5 ADU RMS)
    assert truth.mean() > 150 and abs(err.mean()) < 1.5
    assert np.percentile(np.abs(err), 95) < 0.04 * truth.mean()


def test_noise_free_and_three_dimensional_images():
    # noise-free (expected photons, float32): the noise floor keeps the mask sane
    clean = simulate_beads((256, 256), 40, photons=10000.0, min_separation=25, seed=3, noise=False)
    ds = background_bias(clean)
    assert ds.attrs["n_beads"] > 25
    assert abs(float(ds.flux_bias.sel(estimator="global"))) < 0.01
    assert float(ds.flux_bias.sel(estimator="local")) < -0.05
    assert float(ds.psf_error.sel(estimator="global")) < 0.03
    # 3D: a smooth z-stack background and two beads
    z, y, x = np.meshgrid(np.arange(20.0), np.arange(64.0), np.arange(64.0), indexing="ij")
    truth = 50 + 0.5 * z + 0.2 * y - 0.1 * x + 0.002 * (y - 30) ** 2
    beads3 = 500 * np.exp(-((z - 10) ** 2 + (y - 20) ** 2 + (x - 40) ** 2) / 4.5)
    beads3 += 500 * np.exp(-((z - 9) ** 2 + (y - 45) ** 2 + (x - 20) ** 2) / 4.5)
    vol = (truth + beads3).astype(np.float32)
    est3 = BG.global_background(vol, np.array([[10, 20, 40], [9, 45, 20]]), 3)
    assert est3.dims == ("z", "y", "x")
    np.testing.assert_allclose(BG.background_image(est3), truth, atol=0.3)
    p = B.extract_patches(vol, np.array([[10.0, 20.0, 40.0]]), 3)
    out = BG.subtract_background(p, image=vol)
    np.testing.assert_allclose(out.values[0].sum(), beads3[6:15, 16:25, 36:45].sum(), rtol=0.02)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "median"}, "background='median' must be one of 'global', 'local'"),
    ({"method": "global"}, "image: the 'global' background needs the image the patches come from"),
])
def test_errors(kwargs, message):
    p = _patches(np.ones((2, 9, 9)), 3.0)
    with pytest.raises(InputError, match="^" + message):
        BG.subtract_background(p, **kwargs)
    with pytest.raises(InputError, match=r"^r: the PSF radius is needed"):
        BG.subtract_background(p.assign_attrs(psf_radius=None).drop_attrs(), method="local")
