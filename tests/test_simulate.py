"""Physics, statistics and contracts of pcmx.simulate (issue 3; paper III-A-1, eq. (6)-(7))."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import xarray as xr

from pcmx.errors import InputError, PcmxError
from pcmx.simulate import (
    noll_to_nm,
    scalar_psfs,
    simulate_beads,
    simulate_point_sources,
    true_operator,
    true_psf,
    true_psfs,
)

LAMBDA, NA = 0.670, 1.49


def fwhm_1d(profile: np.ndarray, step: float) -> float:
    """Full width at half maximum of a peaked 1D profile, by linear interpolation."""
    profile = np.asarray(profile, dtype=np.float64)
    half = profile.max() / 2.0
    above = np.flatnonzero(profile >= half)
    lo, hi = above[0], above[-1]
    left = lo - 1 + (half - profile[lo - 1]) / (profile[lo] - profile[lo - 1])
    right = hi + (profile[hi] - half) / (profile[hi] - profile[hi + 1])
    return (right - left) * step


def moments(psf: np.ndarray) -> tuple[float, float, float]:
    """Central second moments (var_y, var_x, cov_xy) of an image, in pixels^2."""
    psf = np.asarray(psf, dtype=np.float64)
    y, x = np.indices(psf.shape)
    w = psf / psf.sum()
    cy, cx = (w * y).sum(), (w * x).sum()
    return ((w * (y - cy) ** 2).sum(), (w * (x - cx) ** 2).sum(),
            (w * (y - cy) * (x - cx)).sum())


@pytest.fixture(scope="module")
def ideal():
    """A diffraction-limited, in-focus microscope (no aberration, no defocus)."""
    return simulate_beads((64, 64), 0, aberrations={}, noise=False)


@pytest.fixture(scope="module")
def sim3():
    """Three acquisitions of the default random microscope, noise-free."""
    return simulate_beads((160, 160), 12, states=3, seed=5, noise=False, background_level=0.0)


# --- PSF physics -------------------------------------------------------------------------

def test_noll_indexing():
    expected = {1: (0, 0), 2: (1, 1), 3: (1, -1), 4: (2, 0), 5: (2, -2), 6: (2, 2),
                7: (3, -1), 8: (3, 1), 9: (3, -3), 10: (3, 3), 11: (4, 0), 22: (6, 0)}
    assert {j: noll_to_nm(j) for j in expected} == expected


@pytest.mark.parametrize("pixel_size", ["20nm", "65nm"])
def test_airy_fwhm(pixel_size):
    """An unaberrated in-focus PSF has the Airy FWHM 0.51 lambda / NA within 5%.

    The PSF is band-limited, so its central row is resampled exactly (Fourier interpolation)
    before measuring; the 1-pixel integration broadens it by ~2% at 65 nm.
    """
    from scipy.signal import resample

    p = float(pixel_size[:-2]) / 1000
    psf = scalar_psfs(size=129, pixel_size=pixel_size)[0]
    row = resample(psf[64].astype(np.float64), 129 * 16)
    measured = fwhm_1d(row, p / 16)
    assert measured == pytest.approx(0.51 * LAMBDA / NA, rel=0.05)
    col = resample(psf[:, 64].astype(np.float64), 129 * 16)
    assert fwhm_1d(col, p / 16) == pytest.approx(measured, rel=1e-3)


def test_energy_sums_to_one(ideal):
    """Normalised over the infinite plane: crops approach one from below as they grow."""
    sums = [float(true_psf(ideal, 32, 32, size=s).sum()) for s in (17, 65, 257)]
    assert sums[0] < sums[1] < sums[2] <= 1.0 + 1e-5
    assert sums[2] > 0.985  # Airy tails: ~2/(pi v) outside radius v = 2 pi NA r / lambda
    assert sums[1] > 0.95


def test_pixel_integration_equals_binning():
    """Exact pixel integration = rendering 9x finer pixels and binning 9 x 9."""
    coarse = scalar_psfs(size=33)[0]
    fine = scalar_psfs(size=33 * 9, pixel_size=f"{65 / 9}nm")[0]
    binned = fine.reshape(33, 9, 33, 9).sum(axis=(1, 3))
    assert np.abs(binned - coarse).max() < 0.01 * coarse.max()
    # point sampling would differ much more: pixel integration matters at the peak
    assert abs(fine[33 * 9 // 2, 33 * 9 // 2] * 81 - coarse[16, 16]) > 0.01 * coarse.max()


def test_defocus_broadens_symmetrically():
    """Defocus by +z and -z broadens an unaberrated PSF identically and isotropically."""
    psfs = scalar_psfs(defocus=[-0.4, 0.0, 0.4], size=65)
    (vy_m, vx_m, c_m), (vy_0, vx_0, _), (vy_p, vx_p, c_p) = (moments(p) for p in psfs)
    assert vx_p == pytest.approx(vx_m, rel=1e-3) and vy_p == pytest.approx(vy_m, rel=1e-3)
    assert vy_p == pytest.approx(vx_p, rel=1e-3)  # isotropic
    assert abs(c_p) < 1e-3 * vx_p and abs(c_m) < 1e-3 * vx_m
    assert vx_p > 1.5 * vx_0
    np.testing.assert_allclose(psfs[0], psfs[2], atol=1e-5 * psfs.max())


def test_astigmatism_axis():
    """Vertical astigmatism Z6 (cos 2 theta) with c6 > 0: the wavefront curvature
    ``c6 sqrt(6) (rho_x^2 - rho_y^2) - z NA^2 rho^2 / (2 n lambda)`` vanishes along x first for
    z > 0, so the PSF focuses in x and elongates along y; along x for z < 0. Oblique Z5
    (sin 2 theta = 2 xy) does the same along the diagonals: elongation along y = -x
    (negative covariance) for z > 0."""
    z6 = scalar_psfs([[0.15]], defocus=[0.3, -0.3], noll=(6,), size=65)
    (vy_p, vx_p, _), (vy_m, vx_m, _) = moments(z6[0]), moments(z6[1])
    assert vy_p > 1.3 * vx_p
    assert vx_m > 1.3 * vy_m
    z5 = scalar_psfs([[0.15]], defocus=[0.3, -0.3], noll=(5,), size=65)
    (vy, vx, cov_p), (_, _, cov_m) = moments(z5[0]), moments(z5[1])
    assert cov_p < -0.2 * np.sqrt(vy * vx)
    assert cov_m > 0.2 * np.sqrt(vy * vx)


def test_subpixel_shift_is_exact():
    """A phase ramp moves the PSF by exactly the requested sub-pixel offset (centroid)."""
    psfs = scalar_psfs(shift_y=[0.0, 0.3, -0.45], shift_x=[0.0, -0.2, 0.5], size=129)
    for psf, dy, dx in zip(psfs, [0.0, 0.3, -0.45], [0.0, -0.2, 0.5], strict=True):
        w = psf / psf.sum()
        y, x = np.indices(psf.shape)
        assert (w * y).sum() - 64 == pytest.approx(dy, abs=0.02)
        assert (w * x).sum() - 64 == pytest.approx(dx, abs=0.02)


# --- Scenes ------------------------------------------------------------------------------

def test_dataset_contract(sim3):
    sim = sim3
    assert sim["image"].dims == ("state", "y", "x") and sim["image"].dtype == np.float32
    assert sim["background"].dims == ("state", "y", "x")
    assert sim["background"].dtype == np.float32
    assert sim["bead_y"].dims == ("bead",) and sim.sizes["bead"] == 12
    assert sim["y"].attrs["units"] == "micrometer"
    assert float(sim["x"][1]) == pytest.approx(0.065)
    assert sim.attrs["pcmx_type"] == "simulation" and len(sim.attrs["states"]) == 3
    single = simulate_beads((48, 40), 2, seed=1)
    assert single["image"].dims == ("y", "x") and single["image"].dtype == np.uint16
    assert single["image"].shape == (48, 40)


def test_image_is_sum_of_exact_psfs(sim3):
    """Noise-free, background-free images hold amplitude x exact PSF at every bead (energy
    before the camera is conserved up to the tails beyond the rendered patches)."""
    for k in range(3):
        total = float(sim3["image"].isel(state=k).sum())
        assert 0.93 * float(sim3["amplitude"].sum()) < total <= float(sim3["amplitude"].sum())
    # the bead nearest the centre: its neighbourhood is amplitude * true_psf (sub-pixel
    # offsets below 1e-3 of the peak are shifts: compare at the rounded position via centroid)
    i = int(np.argmin(np.hypot(sim3.bead_y.values - 80, sim3.bead_x.values - 80)))
    y, x, a = float(sim3.bead_y[i]), float(sim3.bead_x[i]), float(sim3.amplitude[i])
    iy, ix = round(y), round(x)
    patch = sim3["image"].isel(state=1).values[iy - 5:iy + 6, ix - 5:ix + 6]
    psf = true_psf(sim3, y, x, state=1, size=11)
    assert patch.sum() == pytest.approx(a * psf.sum(), rel=0.02)


def test_each_bead_rendered_with_its_own_exact_psf(sim3):
    """The renderer puts amplitude x the exact PSF of the bead's own position (sub-pixel
    offset as a pupil phase ramp) into the image: no shared kernel, no product-convolution."""
    from pcmx.simulate import simulation_model
    from pcmx.simulate._render import render_emitters, render_sizes

    optics, fm, states, shape = simulation_model(sim3)
    ys, xs = np.array([40.0, 120.3]), np.array([50.0, 30.8])
    img = render_emitters(optics, fm, states[2], ys, xs, [1000.0, 500.0], shape)
    exact = 1000.0 * true_psf(sim3, 40.0, 50.0, state=2, size=33)
    np.testing.assert_allclose(img[24:57, 34:67], exact, atol=1e-5 * exact.max())
    zern, defocus = fm.at([120.3], [30.8], states[2])
    size = int(render_sizes(optics, defocus, shape)[0])
    shifted = 500.0 * scalar_psfs(zern, defocus, shift_y=0.3, shift_x=-0.2, size=size,
                                  noll=fm.noll)[0]
    c = size // 2
    np.testing.assert_allclose(img[104:137, 15:48], shifted[c - 16:c + 17, c - 16:c + 17],
                               atol=1e-5 * shifted.max())
    # a bead elsewhere in the field has a different PSF
    other = true_psf(sim3, 150.0, 150.0, state=2, size=33)
    assert np.abs(other - exact / 1000.0).max() > 0.05 * other.max()


def test_every_bead_at_an_image_maximum():
    """Ideal optics, noise-free: the brightest pixel near each bead is its nearest pixel; with
    camera noise within one pixel. Default random aberrations (coma shifts the peak) and noise
    keep it within 2 pixels."""
    for aberrations, noise, tol in (({}, False, 0.51), ({}, True, 1.0), (None, True, 2.0)):
        sim = simulate_beads((192, 192), 30, seed=11, aberrations=aberrations, noise=noise,
                             background_level=50.0 if noise else 0.0)
        img = np.pad(sim["image"].values.astype(np.float64), 6)
        for y, x in zip(sim.bead_y.values, sim.bead_x.values, strict=True):
            iy, ix = round(y) + 6, round(x) + 6
            win = img[iy - 6:iy + 7, ix - 6:ix + 7]
            ay, ax = np.unravel_index(np.argmax(win), win.shape)
            assert max(abs(iy - 6 + ay - 6 - y), abs(ix - 6 + ax - 6 - x)) <= tol + 1e-9


def test_determinism_and_independent_streams():
    a = simulate_beads((64, 64), 5, states=2, seed=3)
    b = simulate_beads((64, 64), 5, states=2, seed=3)
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    c = simulate_beads((64, 64), 5, states=2, seed=4)
    assert not np.array_equal(a["bead_y"], c["bead_y"])
    d = simulate_beads((64, 64), 5, states=2, seed=3, read_noise=0.0)  # other noise only
    np.testing.assert_array_equal(a["bead_y"], d["bead_y"])
    np.testing.assert_array_equal(a["background"], d["background"])
    assert not np.array_equal(a["image"], d["image"])


def test_camera_noise_statistics():
    """A flat scene: (ADU - offset) / gain has Poisson mean = variance (+ read noise^2 and
    the 1/12 ADU^2 quantisation)."""
    level, gain, offset = 200.0, 2.0, 100.0
    for read_noise in (0.0, 3.0):
        sim = simulate_beads((256, 256), 0, background_level=level, background_variation=0.0,
                             gain=gain, offset=offset, read_noise=read_noise, seed=2)
        e = (sim["image"].values.astype(np.float64) - offset) / gain
        np.testing.assert_allclose(sim["background"], level, rtol=1e-5)
        assert e.mean() == pytest.approx(level, abs=4 * np.sqrt(level / e.size))
        expected_var = level + read_noise**2 + 1.0 / (12 * gain**2)
        assert e.var() == pytest.approx(expected_var, rel=0.03)


def test_saturation_clips():
    sim = simulate_beads((64, 64), 3, photons=5e6, photon_spread=0.0, seed=1, saturation=4095,
                         min_separation=10)
    assert sim["image"].values.max() == 4095


def test_min_separation_and_grid():
    sim = simulate_beads((128, 128), 40, min_separation=12, seed=0, noise=False)
    pts = np.column_stack([sim.bead_y, sim.bead_x])
    d = np.hypot(*(pts[:, None] - pts[None]).transpose(2, 0, 1))
    assert d[~np.eye(len(pts), dtype=bool)].min() >= 12
    grid = simulate_beads((128, 128), 16, grid=True, seed=0, noise=False)
    assert np.unique(np.round((grid.bead_y.values - 15.5) / 32)).size == 4


def test_background_smooth_and_positive():
    sim = simulate_beads((128, 128), 0, background_variation=0.5, seed=9, noise=False)
    bg = sim["background"].values
    assert bg.min() > 0 and bg.mean() == pytest.approx(50.0, rel=1e-4)
    assert bg.std() > 0.05 * bg.mean()
    # smooth at the PSF's scale: a 2-pixel blur barely changes it (white noise: ~90%)
    from scipy.ndimage import gaussian_filter

    assert (bg - gaussian_filter(bg, 2.0))[8:-8, 8:-8].std() < 0.03 * bg.std()


def test_states_change_the_psf(sim3):
    p = [true_psf(sim3, 80, 80, state=k) for k in range(3)]
    assert np.abs(p[0] - p[1]).max() > 0.02 * p[0].max()
    custom = simulate_beads((64, 64), 0, states=[{"defocus": "300nm"}, {"defocus": -0.3}],
                            aberrations={}, noise=False)
    a, b = true_psf(custom, 32, 32, state=0), true_psf(custom, 32, 32, state=1)
    np.testing.assert_allclose(a, b, atol=1e-5 * a.max())  # unaberrated: +-z symmetric
    assert custom.attrs["states"][0]["defocus_um"] == pytest.approx(0.3)


def test_three_d_volume():
    sim = simulate_beads((9, 64, 64), 3, aberrations={}, noise=False, background_level=0.0,
                         seed=4, z_step="250nm")
    assert sim["image"].dims == ("z", "y", "x") and "bead_z" in sim
    assert float(sim["z"][1]) == pytest.approx(0.25)
    img = sim["image"].values
    for y, x, z in zip(sim.bead_y.values, sim.bead_x.values, sim.bead_z.values, strict=True):
        assert abs(int(np.argmax(img[:, round(y), round(x)])) - z) <= 0.5 + 1e-9
    psf = true_psf(sim, 32, 32, size=21)
    assert psf.shape == (9, 21, 21)
    np.testing.assert_allclose(psf, psf[::-1], atol=1e-5 * psf.max())  # symmetric in z
    assert int(np.argmax(psf[:, 10, 10])) == 4


# --- Ground truth ------------------------------------------------------------------------

def test_true_psfs_vectorised(sim3):
    ys, xs = np.array([10.0, 80.5, 150.2]), np.array([20.0, 79.7, 5.0])
    many = true_psfs(sim3, ys, xs, state=2, size=25)
    assert many.shape == (3, 25, 25) and many.dtype == np.float32
    np.testing.assert_allclose(many[1], true_psf(sim3, 80.5, 79.7, state=2, size=25), atol=1e-7)
    assert np.abs(many[0] - many[2]).max() > 0.05 * many[0].max()  # space-varying


def test_true_operator_reproduces_psfs(sim3):
    from pcmx.schema import validate

    op = true_operator(sim3, state=1, n_components=6, kernel_size=25, grid=8)
    validate(op)
    assert op["psf_basis"].dims == ("component", "ky", "kx") and op.sizes["component"] == 6
    assert op["coefficients"].shape == (6, 160, 160)
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, 160, 10), rng.integers(0, 160, 10)
    exact = true_psfs(sim3, ys, xs, state=1, size=25)
    approx = np.einsum("in,iyx->nyx", op["coefficients"].values[:, ys, xs], op["psf_basis"].values)
    err = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
    assert err < 0.1
    assert op.attrs["relative_error"] < err + 0.05


def test_store_roundtrip(tmp_path, sim3):
    from pcmx.io.store import open_store, save_store

    save_store(sim3, tmp_path / "sim.zarr")
    back = open_store(tmp_path / "sim.zarr").load()
    np.testing.assert_array_equal(back["image"], sim3["image"])
    np.testing.assert_array_equal(true_psf(back, 40.5, 70.2, state=2),
                                  true_psf(sim3, 40.5, 70.2, state=2))


def test_point_sources():
    ps = simulate_point_sources((128, 128), n_sources=60, pairs_closer_than_psf=5, seed=1)
    assert ps["image"].dims == ("y", "x") and ps.sizes["source"] == 60
    assert float(ps["sources"].sum()) == pytest.approx(float(ps["amplitude"].sum()), rel=1e-5)
    pairs = np.flatnonzero(ps["partner"].values >= 0)
    assert pairs.size == 10
    j = ps["partner"].values[pairs]
    sep = np.hypot(ps.source_y.values[pairs] - ps.source_y.values[j],
                   ps.source_x.values[pairs] - ps.source_x.values[j])
    assert np.all(sep < ps.attrs["pair_fwhm_px"] + 1e-9)
    # Poisson: residuals normalised by sqrt(mean) have unit variance
    z = (ps["image"] - ps["clean"]) / np.sqrt(ps["clean"])
    assert float(z.var()) == pytest.approx(1.0, rel=0.05)
    assert float(ps["background"].min()) > 0
    # blurred by a given operator (product-convolution, sources on pixel centres)
    sim = simulate_beads((128, 128), 0, noise=False)
    op = true_operator(sim, n_components=3, kernel_size=21, grid=4)
    via_op = simulate_point_sources((128, 128), n_sources=20, pairs_closer_than_psf=0,
                                    operator=op, noise=False, background=0.0)
    assert float(via_op["clean"].sum()) == pytest.approx(float(via_op["amplitude"].sum()), rel=0.08)


def test_cli_writes_tiffs_and_store(tmp_path, capsys):
    from pcmx.commands import simulate as cmd
    from pcmx.io import open_store, read_image

    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    args = parser.parse_args(["--size", "96x80", "--beads", "6", "--states", "2",
                              "--output", str(tmp_path / "out"), "--pixel-size", "100nm",
                              "--true-operator", "2", "--kernel-size", "15"])
    assert cmd.run(args) == 0
    img = read_image(tmp_path / "out" / "state_001.tif")
    assert img.shape == (96, 80) and float(img["x"][1]) == pytest.approx(0.1)
    truth = open_store(tmp_path / "out" / "ground_truth.zarr")
    np.testing.assert_array_equal(img.values, truth["image"].isel(state=1).values)
    assert open_store(tmp_path / "out" / "operator_state_001.zarr", kind="operator").sizes["component"] == 2
    with pytest.raises(PcmxError, match="already exists"):
        cmd.run(args)


# --- Errors ------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"na": 1.6}, r"na=1\.6 must be smaller than n_immersion=1\.518"),
    ({"shape": (-5, 10)}, r"shape=\(-5, 10\) must have positive sizes"),
    ({"shape": (64,)}, r"shape=\(64,\) must be 2 integers or 3 integers"),
    ({"n_beads": -1}, r"n_beads=-1 must be a non-negative integer"),
    ({"pixel_size": "-65nm"}, r"pixel_size='-65nm'"),
    ({"pixel_size": 65}, r"pixel_size=65 has no unit"),
    ({"wavelength": "3kg"}, r"wavelength='3kg' is not a length"),
    ({"n_beads": 500, "min_separation": 10}, r"n_beads=500 cannot fit in 64 x 64 pixels "
                                             r"with min_separation=10"),
    ({"n_beads": 55, "min_separation": 10}, r"n_beads=55 cannot fit .* stalled"),
    ({"states": 0}, r"states=0 must be at least 1"),
    ({"states": [{"defocus": "1um", "focus": 2}]}, r"states\[0\] has unknown keys \['focus'\]"),
    ({"aberrations": {5: [0.1, 0.2]}}, r"aberrations\[5\] has 2 polynomial coefficients"),
    ({"seed": -3}, r"seed=-3 must be a non-negative integer"),
])
def test_clear_errors(kwargs, message):
    kwargs = {"shape": (64, 64), "n_beads": 2, **kwargs}
    with pytest.raises(InputError, match=message):
        simulate_beads(**kwargs)


def test_truth_errors(sim3):
    with pytest.raises(InputError, match=r"state=3 is out of range: this simulation has 3"):
        true_psf(sim3, 10, 10, state=3)
    with pytest.raises(InputError, match=r"kernel_size=32 must be a positive odd integer"):
        true_operator(sim3, kernel_size=32)
    with pytest.raises(InputError, match="no simulation model"):
        true_psf(xr.Dataset(), 1, 1)
