"""pcmx.noise: the one robust noise estimate (MAD, Immerkaer's high-pass, quantisation floor)."""

import numpy as np
import pytest
import xarray as xr

from pcmx import _backend
from pcmx.errors import InputError
from pcmx.noise import MAD_TO_SIGMA, estimate_noise, quantisation_step, robust_sigma

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
    assert estimate_noise(3.0 + 0.5 * xx[:20, :20] - 0.25 * yy[:20, :20]) == 0.0
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
