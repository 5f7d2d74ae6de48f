"""pcmx.noise: the one robust noise estimate (MAD, Immerkaer's high-pass, quantisation floor)."""

import warnings

import numpy as np
import pytest
import xarray as xr

from pcmx import _backend
from pcmx.errors import InputError
from pcmx.io.readers import PcmxWarning
from pcmx.noise import (
    MAD_TO_SIGMA,
    clipping_plateau,
    estimate_noise,
    noise_floor,
    quantisation_step,
    robust_sigma,
)

needs_gpu = pytest.mark.skipif(not _backend.cupy_available(), reason="needs cupy and a CUDA device")


def test_robust_sigma_is_the_gaussian_sigma_and_ignores_sparse_outliers():
    rng = np.random.default_rng(0)
    v = rng.normal(5.0, 2.0, 100_000)
    assert robust_sigma(v) == pytest.approx(2.0, rel=0.02)
    v[::20] = 1e4  # 5% bright outliers (beads) move the MAD by a few percent, the std by 100x
    assert robust_sigma(v) == pytest.approx(2.0, rel=0.1)
    assert np.std(v) > 100
    # by definition, on a small array
    w = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    assert robust_sigma(w) == pytest.approx(MAD_TO_SIGMA * 1.0)


def test_robust_sigma_subsamples_large_arrays_with_one_stride():
    rng = np.random.default_rng(1)
    img = rng.standard_normal((1500, 1400)).astype(np.float32)  # 2.1 M values: stride 3
    sub = img[::3, ::3].ravel()
    expected = float(MAD_TO_SIGMA * np.median(np.abs(sub - np.median(sub))))
    assert robust_sigma(img) == expected
    full = img.ravel()
    assert robust_sigma(img, max_samples=None) == float(
        MAD_TO_SIGMA * np.median(np.abs(full - np.median(full))))
    assert robust_sigma(img) != robust_sigma(img, max_samples=None)
    assert robust_sigma(img) == pytest.approx(1.0, rel=0.02)


def test_quantisation_step():
    rng = np.random.default_rng(2)
    counts = rng.poisson(30.0, (64, 70)).astype(np.float32)
    assert quantisation_step(counts) == 1.0
    assert quantisation_step(counts.astype(np.uint16)) == 1.0
    assert quantisation_step(counts + 0.5) == 0.0


def test_estimate_noise_over_a_smooth_background():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:200, :220]
    img = 50 + 0.3 * xx + 10 * np.sin(yy / 30.0) + rng.normal(0, 4.0, (200, 220))
    assert estimate_noise(img) == pytest.approx(4.0, rel=0.05)
    # a DataArray gives the same number; a plane (constant + linear) has no noise at all
    da = xr.DataArray(img, dims=("y", "x"))
    assert _backend.unwrap(da) is da.data and _backend.unwrap(img) is img  # no copy
    assert estimate_noise(da) == estimate_noise(img)
    plane = 3.0 + 0.5 * xx[:20, :20] - 0.25 * yy[:20, :20]
    with pytest.warns(PcmxWarning, match="no quantisation floor"):  # degenerate: it says so
        assert estimate_noise(plane) == 0.0
    # sparse bright sources barely move it (a median of the high-pass response)
    spiky = img.copy()
    spiky[::25, ::25] += 5000.0
    assert estimate_noise(spiky) == pytest.approx(4.0, rel=0.06)


def test_estimate_noise_errors():
    with pytest.raises(InputError, match=r"2D image of at least 3 x 3, got shape \(2, 10\)"):
        estimate_noise(np.zeros((2, 10)))
    with pytest.raises(InputError, match=r"got shape \(5, 5, 5\)"):
        estimate_noise(np.zeros((5, 5, 5)))


def test_deblur_reexports_the_one_estimate():
    import pcmx.deblur
    import pcmx.noise

    assert pcmx.deblur.estimate_noise is pcmx.noise.estimate_noise


@pytest.mark.gpu
@needs_gpu
def test_cupy_gives_the_numpy_numbers():
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(3)
    img = (100 + rng.normal(0, 3.0, (130, 141))).astype(np.float32)
    g = cupy.asarray(img)
    assert estimate_noise(g) == pytest.approx(estimate_noise(img), rel=1e-6)
    assert robust_sigma(g) == pytest.approx(robust_sigma(img), rel=1e-6)
    assert quantisation_step(cupy.round(g)) == 1.0 and quantisation_step(g) == 0.0


# --------------------------------------------------------------------------------------------
# quantised and clipped data (issue 12 item 6)
# --------------------------------------------------------------------------------------------
def clipped_8bit_beads(sigma: float, clip: float, seed: int):
    """Simulated wide-field beads (the real stack's optics: NA 0.95, 520 nm, 108 nm pixels)
    with Gaussian noise ``sigma`` ADU, every value below ``clip`` set to ``clip``, rounded to
    uint8: the 8-bit conversion of ../shared/realdata/widefield-bead-zstack."""
    from pcmx.simulate import simulate_beads

    sim = simulate_beads((256, 256), 40, pixel_size="108nm", na=0.95, wavelength="520nm", n_immersion=1.0,
                         photons=1500.0, photon_spread=0.5, background_level=2.0, noise=False, seed=seed)
    rng = np.random.default_rng(0)
    noisy = sim["image"].values + rng.normal(0, sigma, sim["image"].shape)
    return sim, np.rint(np.clip(noisy, clip, 255)).astype(np.uint8)


def _immerkaer_median(y) -> float:
    """The plain estimate (no plateau, no floor): what estimate_noise gave before issue 12."""
    y = np.asarray(y, np.float32)
    hp = (y[:-2, :-2] - 2 * y[:-2, 1:-1] + y[:-2, 2:]
          - 2 * y[1:-1, :-2] + 4 * y[1:-1, 1:-1] - 2 * y[1:-1, 2:]
          + y[2:, :-2] - 2 * y[2:, 1:-1] + y[2:, 2:])
    return float(np.median(np.abs(hp))) / (0.6745 * 6)


def test_noise_floor_and_clipping_plateau():
    rng = np.random.default_rng(4)
    g = rng.normal(10.0, 2.0, (200, 200))
    assert noise_floor(np.rint(g)) == pytest.approx(1 / np.sqrt(12)) and noise_floor(g) == 0.0
    assert clipping_plateau(g) == {"low": None, "high": None, "low_fraction": 0.0, "high_fraction": 0.0,
                                   "fraction": 0.0}
    # float data clipped at 9 (31% of the pixels) and saturated at 13 (7%), whatever the dtype
    c = clipping_plateau(np.clip(g, 9.0, 13.0))
    assert c["low"] == 9.0 and c["high"] == 13.0
    assert c["low_fraction"] == pytest.approx(0.309, abs=0.01) and c["high_fraction"] == pytest.approx(0.067, abs=0.01)
    eight_in_16 = np.clip(np.rint(g * 20), 0, 255).astype(np.uint16)  # 8-bit data in a 16-bit file
    assert clipping_plateau(eight_in_16)["high"] == 255.0
    # a few stray pixels below the plateau do not hide it (plane 17 of the real stack has 22 ones)
    stray = np.clip(np.rint(g), 11, None)
    stray[::50, ::50] = 3
    assert clipping_plateau(stray)["low"] == 11.0
    # the zeros of a photon-counting image (1 photon on average) are a slope, not a plateau
    assert clipping_plateau(rng.poisson(1.0, (200, 200)))["low"] is None
    assert clipping_plateau(np.full((20, 20), 7.0))["fraction"] == 1.0  # one plateau, counted once


def test_estimate_noise_unchanged_on_float_and_unclipped_counts():
    rng = np.random.default_rng(5)
    for img in (rng.normal(0, 3.0, (150, 160)), rng.poisson(30.0, (150, 160)).astype(np.uint16)):
        info = estimate_noise(img, return_info=True)
        assert info["sigma"] == _immerkaer_median(img) == estimate_noise(img)
        assert info["source"] == "highpass" and info["warning"] is None and not info["floor_used"]


@pytest.mark.parametrize("sigma, clip, seed, ratio, clipped, used", [
    (0.35, 2.0, 4, 1.41, 0.735, 8069),  # like the real plane: noise about the step, 73% clipped
    (0.5, 3.0, 3, 4.45, 0.910, 1459),  # 91% clipped: the pixels left are mostly beads
])
def test_estimate_noise_on_8bit_clipped_beads(sigma, clip, seed, ratio, clipped, used):
    """The user's case: the plain estimate is 0 (most 3 x 3 neighbourhoods are flat); off the
    plateau it is positive, within the factor measured of the true noise (an overestimate:
    the pixels off the plateau are mostly beads, whose curvature the high-pass filter sees)."""
    _, y = clipped_8bit_beads(sigma, clip, seed)
    assert _immerkaer_median(y) == 0.0
    with pytest.warns(PcmxWarning) as record:
        info = estimate_noise(y, return_info=True)
    assert info["sigma"] / sigma == pytest.approx(ratio, abs=0.02)
    assert info["clipped_fraction"] == pytest.approx(clipped, abs=0.002)
    assert info["plateau_low"] == clip and info["plateau_high"] is None
    assert info["source"] == "highpass_off_plateau" and info["pixels_used"] == used
    assert len(record) == 1 and str(record[0].message) == info["warning"] == (
        f"noise estimate: {clipped:.1%} of the pixels sit at a clipping plateau ({clip:g}); "
        f"using {info['sigma']:.3g}, estimated on the {used} pixels off the plateau")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert estimate_noise(y, warn=False) == info["sigma"]


def test_estimate_noise_falls_back_on_the_quantisation_floor():
    rng = np.random.default_rng(6)
    flat = np.rint(5.3 + rng.normal(0, 0.1, (100, 100)))  # noise far below the step: 98% are 5
    with pytest.warns(PcmxWarning) as record:
        info = estimate_noise(flat, return_info=True)
    assert info["sigma"] == info["floor"] == pytest.approx(0.2887, abs=1e-4)
    assert info["estimate"] is None and info["clipped_fraction"] == 0.9757
    assert str(record[0].message) == (
        "noise estimate: 97.6% of the pixels sit at a clipping plateau (5); only 0 pixels off the "
        "plateau (fewer than 100): no estimate; using the quantisation floor q/sqrt(12) = 0.289 (q = 1)")


def test_estimate_noise_on_real_8bit_planes(realdata):
    """The real wide-field stack (uint8, the background clipped to 2): 0 before issue 12, the
    quantisation floor now, with the cause on one line."""
    import tifffile

    expected = {17: (0.919, "the estimate 0.247 off the plateau is below the quantisation floor"),
                10: (0.704, "the high-pass response is 0 on most pixels off the plateau (estimate 0)")}
    for z, (clipped, cause) in expected.items():
        plane = tifffile.imread(realdata / f"sample_zstack{z:02d}.tif")
        assert _immerkaer_median(plane) < 0.25
        with pytest.warns(PcmxWarning) as record:
            info = estimate_noise(plane, return_info=True)
        assert info["sigma"] == pytest.approx(1 / np.sqrt(12)) and info["source"] == "quantisation_floor"
        assert info["clipped_fraction"] == pytest.approx(clipped, abs=0.002) and info["plateau_low"] == 2.0
        assert str(record[0].message) == (
            f"noise estimate: {clipped:.1%} of the pixels sit at a clipping plateau (2); {cause}; "
            "using the quantisation floor q/sqrt(12) = 0.289 (q = 1)")
