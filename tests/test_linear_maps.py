"""Dot tests (``<A x, y> = <x, A^T y>``) for the linear maps of pcmx.deblur: the Laplacian of
Sparse+Smooth, the DCT and the DCT-diagonal prox of the smooth part, the gradient and
divergence of TV and Tikhonov, the Haar analysis and synthesis of FISTA-Haar; on odd, non-square
shapes, in NumPy and (marked ``gpu``) in CuPy. The ProductConvolution's own dot tests are in
tests/test_operator.py."""

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.fft

from pcmx import _backend
from pcmx.deblur import laplacian
from pcmx.deblur.baselines import HaarTransform, divergence, gradient
from pcmx.deblur.sparse_smooth import _SmoothProx
from pcmx.testing import dottest

ODD = [(23, 37), (31, 18), (9, 9)]
needs_gpu = pytest.mark.skipif(not _backend.cupy_available(), reason="needs cupy and a CUDA device")


def _dot(forward, backward, in_shape, out_shape, *, rtol=1e-5, seed=0, sign=1.0):
    """``<forward(u), v> == sign <u, backward(v)>`` for a map between two shapes (float64 sums)."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(in_shape).astype(np.float32)
    v = rng.standard_normal(out_shape).astype(np.float32)
    fu = np.asarray(_backend.asnumpy(forward(u)), dtype=np.float64)
    bv = np.asarray(_backend.asnumpy(backward(v)), dtype=np.float64)
    assert fu.shape == tuple(out_shape) and bv.shape == tuple(in_shape)
    a, b = float(np.vdot(fu, v.astype(np.float64))), sign * float(np.vdot(u.astype(np.float64), bv))
    assert abs(a - b) <= rtol * max(abs(a), abs(b)), (a, b)
    return a, b


def _grad_map(periodic, xp=np):
    def forward(u):
        return xp.stack(gradient(xp.asarray(u), periodic))

    def backward(p):
        p = xp.asarray(p)
        return divergence(p[0], p[1], periodic)

    return forward, backward


@pytest.mark.parametrize("shape", ODD)
def test_laplacian_is_symmetric(shape):
    a, b = dottest(SimpleNamespace(apply=laplacian, adjoint=laplacian), shape, rng=1)
    assert a != 0


@pytest.mark.parametrize("shape", ODD)
@pytest.mark.parametrize("periodic", [False, True])
def test_divergence_is_minus_the_adjoint_of_the_gradient(shape, periodic):
    forward, backward = _grad_map(periodic)
    _dot(forward, backward, shape, (2, *shape), sign=-1.0)
    # a wrong sign or a missing boundary term breaks the identity at order one
    with pytest.raises(AssertionError):
        _dot(forward, backward, shape, (2, *shape), sign=1.0)


@pytest.mark.parametrize("shape", ODD)
def test_laplacian_is_the_divergence_of_the_neumann_gradient(shape):
    u = np.random.default_rng(2).standard_normal(shape)
    np.testing.assert_allclose(divergence(*gradient(u, False), False), laplacian(u), atol=1e-12)


@pytest.mark.parametrize("shape", ODD)
def test_orthonormal_dct_and_its_inverse_are_adjoint(shape):
    op = SimpleNamespace(apply=lambda u: scipy.fft.dctn(u, type=2, norm="ortho"),
                         adjoint=lambda v: scipy.fft.idctn(v, type=2, norm="ortho"))
    dottest(op, shape, rng=3)


@pytest.mark.parametrize("shape", ODD)
def test_smooth_prox_without_constraint_is_a_symmetric_linear_map(shape):
    """``M^-1 = (I + 2 tau gamma2 Lap^2)^-1`` in the DCT basis: linear and symmetric (the prox
    with ``u >= 0`` is not linear and has no dot test)."""
    prox = _SmoothProx(shape, 3.7, workers=None)
    dottest(SimpleNamespace(apply=prox.quadratic, adjoint=prox.quadratic), shape, rng=4)
    rng = np.random.default_rng(5)
    u, v = rng.standard_normal((2, *shape)).astype(np.float32)
    np.testing.assert_allclose(prox.quadratic(2 * u - 3 * v), 2 * prox.quadratic(u) - 3 * prox.quadratic(v),
                               atol=1e-5)


@pytest.mark.parametrize(("shape", "levels"), [((48, 80), 4), ((24, 40), 3), ((16, 16), 4)])
def test_haar_analysis_and_synthesis_are_adjoint(shape, levels):
    W = HaarTransform(shape, levels)
    dottest(SimpleNamespace(apply=W.forward, adjoint=W.inverse), shape, rng=6)
    u = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    assert np.linalg.norm(W.forward(u)) == pytest.approx(np.linalg.norm(u), rel=1e-6)  # orthonormal


def test_haar_on_sizes_not_divisible_by_two_to_the_levels_is_not_orthonormal():
    """The periodization pads odd sizes: more coefficients than pixels, ``inverse`` is a left
    inverse but not the adjoint (documented in HaarTransform)."""
    W = HaarTransform((37, 53), 2)
    u = np.random.default_rng(8).standard_normal((37, 53)).astype(np.float32)
    c = W.forward(u)
    assert c.shape == (39, 55)
    np.testing.assert_allclose(W.inverse(c), u, atol=1e-5)
    with pytest.raises(AssertionError):
        _dot(W.forward, W.inverse, (37, 53), c.shape, rtol=1e-2)


# --------------------------------------------------------------------------------------------
# CuPy
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", ODD)
def test_dot_tests_on_cupy(shape):
    cupy = pytest.importorskip("cupy")
    lap = SimpleNamespace(apply=lambda u: laplacian(cupy.asarray(u)),
                          adjoint=lambda v: laplacian(cupy.asarray(v)))
    assert isinstance(lap.apply(np.ones(shape, np.float32)), cupy.ndarray)
    dottest(lap, shape, rng=1)
    for periodic in (False, True):
        forward, backward = _grad_map(periodic, cupy)
        _dot(forward, backward, shape, (2, *shape), sign=-1.0)
    prox = _SmoothProx(shape, 3.7, workers=None, like=cupy.zeros(1))
    q = SimpleNamespace(apply=lambda u: prox.quadratic(cupy.asarray(u)),
                        adjoint=lambda v: prox.quadratic(cupy.asarray(v)))
    dottest(q, shape, rng=4)
    ref = _SmoothProx(shape, 3.7, workers=None)
    u = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(cupy.asnumpy(prox.quadratic(cupy.asarray(u))), ref.quadratic(u), atol=1e-5)


@pytest.mark.gpu
@needs_gpu
def test_haar_on_cupy_converts_at_one_point():
    cupy = pytest.importorskip("cupy")
    W = HaarTransform((48, 80), 4, like=cupy.zeros(1))
    u = np.random.default_rng(6).standard_normal((48, 80)).astype(np.float32)
    c = W.forward(cupy.asarray(u))
    assert isinstance(c, np.ndarray)  # the coefficients live on the host (no CuPy pywt)
    back = W.inverse(c)
    assert isinstance(back, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(back), u, atol=1e-5)
    dottest(SimpleNamespace(apply=lambda x: W.forward(cupy.asarray(x)), adjoint=W.inverse), (48, 80), rng=6)
