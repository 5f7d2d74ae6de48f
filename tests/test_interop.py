"""pcmx.interop: the operator in deepinv and pylops gives pcmx's own output (issue 14 item 4).

deepinv and pylops are not pcmx dependencies: their tests are skipped where they are absent
(CI, a user's clone) and were run in the benchmarks' peer environment
(``benchmarks/.venv-peers``, deepinv 0.5.0 on torch 2.14.1, pylops 2.8.0).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import xarray as xr
from conftest import make_operator3d

import pcmx
from pcmx.errors import InputError
from pcmx.interop import DEEPINV_PADDING, as_pylops, to_deepinv
from pcmx.testing import dottest
from pcmx.units import kernel_coords, spatial_coords

PEERS = ("not a pcmx dependency (skipped in CI); run in benchmarks/.venv-peers, where it is "
         "installed")


def asymmetric_operator(shape=(24, 30), ksize=(7, 5), n_components=3, seed=0) -> xr.Dataset:
    """Random, non-symmetric kernels (a flipped convolution would show) and smooth maps."""
    rng = np.random.default_rng(seed)
    basis = rng.uniform(0.0, 1.0, (n_components, *ksize))
    yy, xx = np.meshgrid(np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1]), indexing="ij")
    maps = np.stack([0.5 + rng.uniform(-0.4, 0.4) * yy + rng.uniform(-0.4, 0.4) * xx * yy
                     for _ in range(n_components)])
    return xr.Dataset(
        {"psf_basis": (("component", "ky", "kx"), basis),
         "coefficients": (("component", "y", "x"), maps)},
        coords={"component": np.arange(n_components), **kernel_coords(ksize, 0.1),
                **spatial_coords(shape, 0.1)},
        attrs={"pcmx_type": "operator"})


# -- always -------------------------------------------------------------------------------------
def test_missing_libraries_name_what_to_install(monkeypatch):
    H = pcmx.ProductConvolution(asymmetric_operator())
    monkeypatch.setitem(sys.modules, "pylops", None)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="as_pylops needs pylops, which is not installed: "
                                          "pip install pylops"):
        H.as_pylops()
    with pytest.raises(ImportError, match="to_deepinv needs torch, which is not installed: "
                                          "pip install deepinv"):
        H.to_deepinv()


def test_refusals():
    ds = asymmetric_operator()
    with pytest.raises(InputError, match="expected a pcmx.ProductConvolution, got Dataset"):
        to_deepinv(ds)
    with pytest.raises(InputError, match="expected a pcmx.ProductConvolution, got Dataset"):
        as_pylops(ds)
    with pytest.raises(InputError, match="SpaceVaryingBlur is 2D; this operator has dims "
                                         r"\('z', 'y', 'x'\)"):
        to_deepinv(pcmx.ProductConvolution(make_operator3d()))
    with pytest.raises(InputError, match="boundary='reflect' has no exact deepinv padding"):
        to_deepinv(pcmx.ProductConvolution(ds, boundary="reflect"))


def test_scipy_linear_operator_dottest():
    H = pcmx.ProductConvolution(asymmetric_operator(), dtype=np.float64)
    A = H.as_linear_operator()
    dottest(A, (A.shape[0],), rtol=1e-10, rng=1, dtype=np.float64)


# -- deepinv ------------------------------------------------------------------------------------
def _deepinv_outputs(H, u, **kwargs):
    torch = pytest.importorskip("torch", reason=f"torch: {PEERS}")
    physics = to_deepinv(H, **kwargs) if kwargs else H.to_deepinv()
    with torch.no_grad():
        x = torch.from_numpy(u)[None, None]
        forward = physics.A(x)[0, 0].numpy()
        adjoint = physics.A_adjoint(x)[0, 0].numpy()
    return forward, adjoint


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("boundary", sorted(DEEPINV_PADDING))
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_to_deepinv_gives_pcmx_output(boundary, dtype, rtol):
    pytest.importorskip("deepinv", reason=f"deepinv: {PEERS}")
    H = pcmx.ProductConvolution(asymmetric_operator(), boundary=boundary, dtype=dtype)
    u = np.random.default_rng(2).uniform(0, 1, H.shape).astype(dtype)
    physics = H.to_deepinv()
    assert physics.padding == DEEPINV_PADDING[boundary] and physics.filters.shape == (1, 1, 3, 7, 5)
    forward, adjoint = _deepinv_outputs(H, u)
    assert forward.dtype == dtype
    assert _rel(forward, H.apply(u)) < rtol
    assert _rel(adjoint, H.adjoint(u)) < rtol


def test_to_deepinv_reflect_agrees_away_from_the_border():
    pytest.importorskip("deepinv", reason=f"deepinv: {PEERS}")
    H = pcmx.ProductConvolution(asymmetric_operator(), boundary="reflect", dtype=np.float64)
    u = np.random.default_rng(3).uniform(0, 1, H.shape)
    forward, _ = _deepinv_outputs(H, u, padding="reflect")
    ref = H.apply(u)
    inner = (slice(6, -6), slice(4, -4))  # twice the kernel radius (3, 2)
    assert _rel(forward[inner], ref[inner]) < 1e-12
    assert _rel(forward, ref) > 1e-3  # the mirrors differ (pcmx: symmetric, torch: reflect)


def test_to_deepinv_impulse_response_is_psf_at():
    torch = pytest.importorskip("torch", reason=f"torch: {PEERS}")
    pytest.importorskip("deepinv", reason=f"deepinv: {PEERS}")
    H = pcmx.ProductConvolution(asymmetric_operator(), dtype=np.float64)
    u = np.zeros(H.shape)
    u[10, 12] = 1.0
    with torch.no_grad():
        y = H.to_deepinv()(torch.from_numpy(u)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(y[7:14, 10:15], H.psf_at(y=1.0, x=1.2), atol=1e-12)


# -- pylops -------------------------------------------------------------------------------------
def test_as_pylops_keeps_the_image_shape_and_passes_dot_tests():
    pylops = pytest.importorskip("pylops", reason=f"pylops: {PEERS}")
    from pylops.utils import dottest as pylops_dottest

    H = pcmx.ProductConvolution(asymmetric_operator(), dtype=np.float64)
    Hop = H.as_pylops()
    assert isinstance(Hop, pylops.LinearOperator)
    assert Hop.dims == H.shape and Hop.dimsd == H.shape and Hop.shape == (720, 720)
    u = np.random.default_rng(4).uniform(0, 1, H.shape)
    np.testing.assert_allclose(Hop @ u, H.apply(u), rtol=1e-12)
    np.testing.assert_allclose(Hop.H @ u, H.adjoint(u), rtol=1e-12)
    assert pylops_dottest(Hop, *Hop.shape, rtol=1e-10)
    dottest(Hop, (Hop.shape[0],), rtol=1e-10, rng=5, dtype=np.float64)
