"""Coarse lattices and separable upsampling (pcmx.lattice), shared by coefficients and cone."""

from __future__ import annotations

import numpy as np
import pytest

from pcmx.errors import InputError
from pcmx.lattice import (
    AxisInterp,
    adaptive_upsample,
    check_pixels,
    default_step,
    interpolate_samples,
    lattice_blocks,
    lattice_nodes,
    separable_upsample,
    working_dtype,
)


def test_lattice_nodes_placement():
    nodes = lattice_nodes(101, 10)
    np.testing.assert_allclose(nodes, np.linspace(0, 100, 11))  # ceil(100 / 10) + 1 nodes
    odd = lattice_nodes(100, 7)
    assert len(odd) == int(np.ceil(99 / 7)) + 1 == 16
    assert odd[0] == 0 and odd[-1] == 99 and np.all(np.diff(odd) <= 7)
    np.testing.assert_allclose(np.diff(odd), 99 / 15)  # evenly spaced, fractional
    whole = lattice_nodes(100, 7, integer=True)
    np.testing.assert_array_equal(whole, np.r_[np.arange(0, 100, 7), 99])
    # fewer than 5 nodes on the axis, or step 1: every pixel
    np.testing.assert_array_equal(lattice_nodes(40, 10), np.arange(40))
    np.testing.assert_array_equal(lattice_nodes(41, 10), np.linspace(0, 40, 5))
    np.testing.assert_array_equal(lattice_nodes(17, 1, integer=True), np.arange(17))


def test_axis_interpolation_is_exact_on_polynomials():
    x = np.arange(101.0)
    nodes = lattice_nodes(101, 7)  # fractional nodes
    cub = AxisInterp(nodes, 101, "cubic")
    np.testing.assert_allclose(cub.apply(0.3 * nodes**3 - 2 * nodes + 1, 0), 0.3 * x**3 - 2 * x + 1,
                               rtol=1e-10, atol=1e-8)
    lin = AxisInterp(lattice_nodes(101, 10, integer=True), 101, "linear")
    rows = lin.rows(np.arange(101))
    assert np.all(rows >= 0) and np.allclose(rows.sum(axis=1), 1)  # a convex combination
    assert np.count_nonzero(rows, axis=1).max() == 2
    np.testing.assert_allclose(lin.apply(3.0 - 0.5 * lin.nodes, 0), 3.0 - 0.5 * x, atol=1e-12)
    # quadratics are not reproduced by linear interpolation: the test above could fail
    assert np.abs(lin.apply(lin.nodes**2, 0) - x**2).max() == pytest.approx(25.0)
    # rows() and apply() agree, for both kinds
    vals = np.cos(nodes / 9.0)
    np.testing.assert_allclose(cub.rows(np.arange(101)) @ vals, cub.apply(vals, 0), atol=1e-12)
    ident = AxisInterp(np.arange(12.0), 12, "cubic")
    assert ident.identity
    np.testing.assert_array_equal(ident.rows(np.array([3, 7])), np.eye(12)[[3, 7]])
    with pytest.raises(InputError, match="^kind: expected 'cubic' or 'linear', got 'nearest'$"):
        AxisInterp(nodes, 101, "nearest")


@pytest.mark.parametrize("shape", [(61, 83), (21, 45, 38)])
def test_separable_upsample_is_exact_on_tensor_polynomials(shape):
    nodes = [lattice_nodes(n, 5) for n in shape]
    assert any(len(nd) < n for nd, n in zip(nodes, shape, strict=True))

    def field(coords):  # cubic along every axis, two components
        g = np.meshgrid(*coords, indexing="ij")
        f = 1.0 + sum((0.01 * (k + 1)) * gk**3 - gk for k, gk in enumerate(g)) + 1e-4 * np.prod(g, axis=0)
        return np.stack([f, 2.0 - 0.5 * f])

    pixels = [np.arange(n, dtype=np.float64) for n in shape]
    ops = [AxisInterp(nd, n, "cubic") for nd, n in zip(nodes, shape, strict=True)]
    up = separable_upsample(field(nodes), ops, dtype=np.float64)
    want = field(pixels)
    assert up.shape == want.shape and up.dtype == np.float64
    np.testing.assert_allclose(up, want, rtol=1e-9, atol=1e-7 * np.abs(want).max())
    assert separable_upsample(field(nodes), ops).dtype == np.float32
    # interpolate_samples gives the same values at a few pixels
    rng = np.random.default_rng(1)
    sample = rng.integers(0, shape, size=(50, len(shape)))
    approx = interpolate_samples(field(nodes), ops, sample)
    np.testing.assert_allclose(approx, up[(slice(None), *sample.T)].T, rtol=1e-12, atol=1e-9)
    # multilinear upsampling reproduces a multilinear field and stays within its nodes' range
    lin = [AxisInterp(lattice_nodes(n, 5, integer=True), n, "linear") for n in shape]
    lnodes = [op.nodes for op in lin]

    def multilinear(coords):
        g = np.meshgrid(*coords, indexing="ij")
        return (1.0 + 0.02 * np.prod(g, axis=0) - 0.3 * g[-1])[None]

    np.testing.assert_allclose(separable_upsample(multilinear(lnodes), lin, dtype=np.float64),
                               multilinear(pixels), rtol=1e-12, atol=1e-9)


def test_working_dtype():
    assert working_dtype(np.float64) is np.float64
    assert working_dtype(np.float32) is np.float32 and working_dtype(np.float16) is np.float32


def test_lattice_blocks_tile_the_lattice():
    for lat, limit in [((37, 41), 100), ((37, 41), 10), ((5, 7, 9), 20), ((5, 7, 9), 4), ((13,), 5),
                       ((6, 4), 0)]:
        seen = np.zeros(lat, dtype=int)
        sizes = []
        for sl in lattice_blocks(lat, limit):
            sizes.append(seen[sl].size)
            seen[sl] += 1
        np.testing.assert_array_equal(seen, 1)  # every node exactly once
        assert max(sizes) <= max(limit, 1)
    # whole rows are kept together when they fit: 41-node rows, 2 per block of 100
    blocks = list(lattice_blocks((37, 41), 100))
    assert len(blocks) == 19 and blocks[0] == (slice(0, 2), slice(None))


def test_check_pixels():
    pts = np.array([[3.4, 7.9], [0.2, 639.7], [511.0, 311.0]])
    pix = check_pixels(pts, (512, 640))
    assert pix.dtype.kind == "i" and pix.shape[1] == 2
    assert np.all(pix >= 0) and np.all(pix < [512, 640])
    assert len(np.unique(pix, axis=0)) == len(pix)
    have = {tuple(p) for p in pix}
    # floor(p) and floor(p) + 1 of each bead, clipped to the grid
    assert {(3, 7), (4, 8), (0, 639), (1, 639), (511, 311), (511, 312)} <= have
    assert 1010 <= len(pix) <= 1024 + 6  # and ~1024 random pixels (a few may coincide)
    np.testing.assert_array_equal(pix, check_pixels(pts, (512, 640)))  # seeded


@pytest.mark.parametrize(("m", "shape", "step"), [(600, (2304, 2304), 23), (1, (64, 64), 16),
                                                  (10, (64, 64), 5), (1, (4096, 4096), 32),
                                                  (1000, (64, 64), 4), (5, (40, 100, 100), 10)])
def test_default_step(m, shape, step):
    assert default_step(np.zeros((m, len(shape))), shape) == step


def test_adaptive_upsample_refines_until_tol():
    shape = (150, 170)

    def truth(coords):
        g = np.meshgrid(*coords, indexing="ij")
        return np.stack([np.sin(g[0] / 6.0) * np.cos(g[1] / 9.0), 1.0 + 0.1 * np.cos(g[0] / 13.0)])

    calls = []

    def evaluate(nodes):
        calls.append(int(np.prod([len(n) for n in nodes])))
        return truth(nodes)

    rng = np.random.default_rng(3)
    sample = rng.integers(0, shape, size=(400, 2))
    exact = truth([np.arange(n, dtype=np.float64) for n in shape])
    ex = exact[(slice(None), *sample.T)].T
    ref = np.sqrt(np.mean(np.sum(exact**2, axis=0)))
    # a fixed step: the interpolation error is what it is
    coarse, info = adaptive_upsample(evaluate, shape, 32, sample=sample, exact=ex, block=500,
                                     dtype=np.float64)
    assert info["step"] == 32 and info["n_checked"] == 400
    err32 = np.max(np.linalg.norm(coarse - exact, axis=0)) / ref
    assert info["max_error"] > 1e-4 and err32 > 1e-4
    assert info["max_error"] <= err32 + 1e-15  # sampled pixels see at most the worst pixel
    # refined: step halved until the sampled error is below tol, evaluated in blocks
    calls.clear()
    maps, info = adaptive_upsample(evaluate, shape, 32, sample=sample, exact=ex, tol=1e-4, block=500)
    assert maps.dtype == np.float32 and maps.shape == (2, *shape)
    assert info["step"] in (16, 8, 4, 2, 1) and info["max_error"] <= 1e-4
    assert max(calls) <= 500
    assert np.max(np.linalg.norm(maps - exact, axis=0)) / ref <= 2e-4
    assert info["max_error_per_map"].shape == (2,)
    # tol unreachable: the step goes down to 1, every pixel a node, values exact
    full, info = adaptive_upsample(evaluate, (60, 70), 8, sample=np.array([[3, 4]]),
                                   exact=truth([np.array([3.0]), np.array([4.0])]).reshape(1, 2) + 1.0,
                                   tol=1e-12, block=50, dtype=np.float64)
    assert info["step"] == 1 and info["max_error"] > 0.1
    np.testing.assert_array_equal(full, truth([np.arange(60.0), np.arange(70.0)]))
