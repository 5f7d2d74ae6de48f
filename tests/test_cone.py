"""Conical hull of observed coefficients: greedy reduction and projection (paper App. C-b, C-c)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize, nnls

from pcmx.coefficients import coefficient_maps, fit_tps
from pcmx.cone import (
    cone_membership_distance,
    nonnegative_generators,
    project_grid,
    project_maps,
    project_nonnegative,
    project_onto_cone,
    reduce_cone,
)
from pcmx.errors import InputError


def _generators(rng, g, dim=5):
    """Generators around a dominant first axis, like PSF coefficients (beta_0 ~ 1)."""
    gen = 0.4 * rng.standard_normal((g, dim))
    gen[:, 0] = 1.0 + 0.1 * rng.random(g)
    return gen


def _nnls_projection(gen, x):
    unit = gen / np.linalg.norm(gen, axis=1, keepdims=True)
    return np.stack([unit.T @ nnls(unit.T, row)[0] for row in x])


# ---------------------------------------------------------------------------------- projection


@pytest.mark.parametrize("g", [3, 8, 20])
@pytest.mark.parametrize("method", ["auto", "active-set", "fista", "nnls"])
def test_projection_matches_scipy_nnls(g, method):
    rng = np.random.default_rng(g)
    gen = _generators(rng, g)
    x = rng.standard_normal((300, 5))
    x[:, 0] += 0.5
    ref = _nnls_projection(gen, x)
    proj = project_onto_cone(x, gen, method=method, tol=1e-12 if method == "fista" else 1e-10)
    np.testing.assert_allclose(proj, ref, atol=1e-5)
    if method in ("auto", "active-set"):
        np.testing.assert_allclose(proj, ref, atol=1e-10)  # exact, not iterative


def test_projection_optimality_and_coefficients():
    rng = np.random.default_rng(1)
    gen = _generators(rng, 12)
    x = rng.standard_normal((500, 5))
    proj, lam = project_onto_cone(x, gen, return_coefficients=True)
    unit = gen / np.linalg.norm(gen, axis=1, keepdims=True)
    assert lam.shape == (500, 12) and np.all(lam >= 0)
    np.testing.assert_allclose(lam @ unit, proj, atol=1e-12)
    # KKT: the residual makes a non-acute angle with every generator, and is orthogonal to p
    resid = x - proj
    assert (resid @ unit.T).max() < 1e-9
    np.testing.assert_allclose(np.einsum("ni,ni->n", resid, proj), 0, atol=1e-9)


def test_points_inside_the_cone_are_unchanged():
    rng = np.random.default_rng(2)
    gen = _generators(rng, 10)
    inside = rng.random((400, 10)) ** 3 @ gen  # conical combinations, some near the faces
    np.testing.assert_allclose(project_onto_cone(inside, gen), inside, atol=1e-10)
    np.testing.assert_allclose(project_onto_cone(gen * 3.0, gen), gen * 3.0, atol=1e-10)
    assert np.all(cone_membership_distance(inside, gen) < 1e-10)


def test_dtype_shape_and_scaling():
    rng = np.random.default_rng(3)
    gen = _generators(rng, 6)
    x = rng.standard_normal((50, 5)).astype(np.float32)
    p32 = project_onto_cone(x, gen)
    assert p32.dtype == np.float32 and p32.shape == (50, 5)
    p_one = project_onto_cone(x[7].astype(np.float64), gen)
    assert p_one.shape == (5,)
    np.testing.assert_allclose(p_one, p32[7], atol=1e-6)
    # a cone does not depend on the generators' lengths
    np.testing.assert_allclose(project_onto_cone(x, gen * rng.uniform(0.1, 10, (6, 1))), p32, atol=1e-6)


def test_membership_distance():
    rng = np.random.default_rng(4)
    gen = np.abs(_generators(rng, 7))  # the non-negative orthant contains the cone
    assert cone_membership_distance(gen[0] + gen[1], gen) == pytest.approx(0.0, abs=1e-10)
    assert cone_membership_distance(-gen[0], gen) == pytest.approx(1.0)  # polar: projects to 0
    x = gen[0] + 0.3 * np.array([0, 0, 0, 0, -1.0])
    d = cone_membership_distance(x, gen)
    ref = np.linalg.norm(x - _nnls_projection(gen, x[None])[0]) / np.linalg.norm(x)
    assert d == pytest.approx(ref, rel=1e-9) and 0 < d < 1
    assert cone_membership_distance(np.zeros(5), gen) == 0.0
    assert cone_membership_distance(np.stack([x, -gen[0]]), gen).shape == (2,)


def test_project_grid_equals_row_projection():
    rng = np.random.default_rng(5)
    gen = _generators(rng, 15)
    yy, xx = np.mgrid[0:90, 0:120] / 60.0
    vals = np.stack([1 + 0.2 * yy, np.sin(3 * xx), np.cos(2 * yy + xx), xx * yy - 0.5, 0.3 * xx])
    proj = project_grid(vals, gen)
    ref = project_onto_cone(vals.reshape(5, -1).T, gen).T.reshape(vals.shape)
    np.testing.assert_allclose(proj, ref, atol=1e-10)


# ---------------------------------------------------------------------------------- greedy reduction


def _max_angle_deg(b, gen):
    p = _nnls_projection(gen, b)
    cos = np.linalg.norm(p, axis=1) / np.linalg.norm(b, axis=1)
    return np.rad2deg(np.arccos(np.clip(cos, 0, 1))).max()


@pytest.mark.parametrize("threshold", [0.5, 2.0, 5.0])
def test_greedy_reduction_keeps_every_observation_within_the_angle(threshold):
    rng = np.random.default_rng(6)
    b = rng.standard_normal((400, 5)) * [0.05, 0.3, 0.2, 0.1, 0.1]
    b[:, 0] += 1.0
    gen, info = reduce_cone(b, angle_threshold_deg=threshold, max_generators=200, return_info=True)
    assert _max_angle_deg(b, gen) < threshold
    assert len(gen) < len(b) and len(gen) == len(info["indices"]) == len(info["max_angle_deg"])
    np.testing.assert_allclose(gen[0], b.mean(axis=0))  # starts from the mean (App. C-c)
    np.testing.assert_array_equal(gen[1:], b[info["indices"][1:]])
    assert np.all(np.diff(info["max_angle_deg"]) <= 1e-9)  # the cone only grows
    assert info["angle_deg"].max() < threshold
    # cone(generators) is inside cone(B): every generator is a conical combination of B
    assert np.all(cone_membership_distance(gen, b) < 1e-9)
    if threshold == 0.5:
        assert len(gen) > len(reduce_cone(b, angle_threshold_deg=5.0))


def test_greedy_reduction_respects_max_generators():
    rng = np.random.default_rng(7)
    b = np.abs(rng.standard_normal((300, 4)))
    gen, info = reduce_cone(b, angle_threshold_deg=0.01, max_generators=6, return_info=True)
    assert len(gen) == 6
    assert info["max_angle_deg"][-1] == pytest.approx(_max_angle_deg(b, gen), rel=1e-6)


# ---------------------------------------------------------------------------------- realistic PSFs


def _synthetic_psf_family():
    """A non-negative PSF family of rank 3: PSF(z) = sum_k a_k(z) g_k with non-negative g_k.

    Beads only cover x in [8, 60] of a 96 x 112 field; a_1 decreases linearly in x, so a
    spline extrapolates it to negative values on the right of the field.
    """
    k = np.arange(15) - 7
    ky, kx = np.meshgrid(k, k, indexing="ij")
    blobs = np.stack([
        np.exp(-((kx - 2.5) ** 2 + ky**2) / 3.0),
        np.exp(-((kx + 2.5) ** 2 + (ky - 1) ** 2) / 4.0),
        np.exp(-(kx**2 + ky**2) / 12.0),
    ]).reshape(3, -1)
    _, _, vt = np.linalg.svd(blobs, full_matrices=False)
    basis = vt  # orthonormal PSF basis h_i (signed), same span as the blobs

    def amplitudes(p):
        y, x = p[:, 0], p[:, 1]
        return np.stack([1.2 - x / 50.0, 0.2 + x / 100.0, 0.5 + 0.3 * np.sin(y / 20.0)], axis=1)

    return blobs, basis, amplitudes


def _psfs(maps, basis):
    """Every pixel's PSF (n_pixels, 225) from coefficient maps (I, ny, nx)."""
    return maps.reshape(maps.shape[0], -1).T.astype(np.float64) @ basis


@pytest.mark.parametrize("noise", [0.0, 0.003])
def test_projection_makes_every_psf_nonnegative_where_plain_interpolation_does_not(noise):
    rng = np.random.default_rng(8)
    shape = (96, 112)
    blobs, basis, amplitudes = _synthetic_psf_family()
    pts = np.column_stack([rng.uniform(4, 91, 60), rng.uniform(8, 60, 60)])
    psf = amplitudes(pts) @ blobs
    psf /= psf.sum(axis=1, keepdims=True)
    beta = psf @ basis.T + noise * rng.standard_normal((60, 3))

    plain = coefficient_maps(pts, beta, shape)
    plain_psfs = _psfs(plain, basis)
    peak = plain_psfs.max(axis=1)
    assert (plain_psfs.min(axis=1) / peak).min() < -0.1  # negative lobes far from the beads

    gen = reduce_cone(beta, angle_threshold_deg=0.5)
    # tolerance: exact conical combinations of non-negative PSFs (noise-free), within 1% of
    # the peak when the observed coefficients themselves are noisy (issue: 1% of the peak)
    floor = -1e-6 if noise == 0 else -0.01
    for maps in (coefficient_maps(pts, beta, shape, generators=gen),
                 project_maps(plain, gen, step=8)):
        assert maps.dtype == np.float32 and maps.shape == plain.shape
        p = _psfs(maps, basis)
        assert (p.min(axis=1) / p.max(axis=1)).min() >= floor
        assert np.all(cone_membership_distance(maps.reshape(3, -1).T, gen) < 1e-5)
    # inside the beads' region the projection barely changes the good interpolation
    proj = project_maps(plain, gen, step=1)
    inner = (slice(None), slice(10, 86), slice(12, 56))
    assert np.abs(proj[inner] - plain[inner]).max() < 0.05 * np.abs(plain[inner]).max()


def test_nonnegative_generators_is_the_nearest_feasible_vector():
    rng = np.random.default_rng(11)
    blobs, basis, amplitudes = _synthetic_psf_family()
    pts = np.column_stack([rng.uniform(4, 91, 40), rng.uniform(8, 60, 40)])
    psf = amplitudes(pts) @ blobs
    beta = psf / psf.sum(axis=1, keepdims=True) @ basis.T + 0.02 * rng.standard_normal((40, 3))
    ratio = (beta @ basis).min(axis=1) / (beta @ basis).max(axis=1)
    assert ratio.min() < -0.01  # noisy observations: PSFs with negative dips
    worst = beta[np.argsort(ratio)[:6]]
    for floor in (0.0, 0.01):
        fixed = nonnegative_generators(worst, basis, floor=floor)
        assert not np.array_equal(fixed, worst)
        for c, c2 in zip(worst, fixed, strict=True):
            bound = -floor * (c @ basis).max()
            assert (c2 @ basis).min() >= bound - 1e-9
            if (c @ basis).min() >= bound:
                np.testing.assert_array_equal(c2, c)
                continue
            ref = minimize(lambda v, c=c: np.sum((v - c) ** 2), c, jac=lambda v, c=c: 2 * (v - c),
                           constraints=[{"type": "ineq", "fun": lambda v, b=bound: v @ basis - b,
                                         "jac": lambda v: basis.T}], method="SLSQP",
                           options={"ftol": 1e-14, "maxiter": 500})
            assert np.linalg.norm(c2 - c) <= np.linalg.norm(ref.x - c) + 1e-6
            np.testing.assert_allclose(c2, ref.x, atol=1e-4)
    # through reduce_cone: every projected pixel's PSF is then non-negative (floor 0)
    gen = reduce_cone(beta, angle_threshold_deg=0.5, psf_basis=basis.reshape(3, 15, 15), floor=0.0)
    maps = coefficient_maps(pts, beta, (96, 112), generators=gen)
    p = _psfs(maps, basis)
    assert (p.min(axis=1) / p.max(axis=1)).min() >= -1e-6
    with pytest.raises(InputError, match=r"psf_basis: expected shape \(3, ...\)"):
        nonnegative_generators(beta, basis[:2])


def test_project_maps_lattice_vs_every_pixel():
    rng = np.random.default_rng(9)
    shape = (80, 100)
    pts = rng.uniform(2, 77, (40, 2))
    beta = np.column_stack([1 + 0.1 * np.sin(pts[:, 0] / 20), 0.3 * np.cos(pts[:, 1] / 25),
                            0.2 * (pts[:, 0] - 40) / 40]) + 0.01 * rng.standard_normal((40, 3))
    maps = fit_tps(pts, beta, domain_shape=shape).evaluate_grid()
    gen = reduce_cone(beta, angle_threshold_deg=1.0)
    exact = project_maps(maps, gen, step=1)
    np.testing.assert_allclose(exact, project_onto_cone(maps.reshape(3, -1).T, gen).T.reshape(maps.shape), atol=1e-6)
    rms = np.sqrt(np.mean(np.sum(exact.astype(float) ** 2, axis=0)))
    moved = np.linalg.norm(maps - exact, axis=0).max() / rms  # what the projection changes
    errs = {}
    for step in (4, 8):
        fast = project_maps(maps, gen, step=step)
        errs[step] = np.linalg.norm(fast - exact, axis=0).max() / rms
        assert np.all(cone_membership_distance(fast.reshape(3, -1).T, gen) < 1e-5)
    # bilinear error of the projected maps (first order across the projection's kinks),
    # small beside the projection itself
    assert errs[4] < 1e-2 and errs[8] < 2e-2 and errs[4] < errs[8] < 0.1 * moved
    assert project_maps(maps.astype(np.float64), gen).dtype == np.float64


def test_project_maps_3d():
    rng = np.random.default_rng(10)
    gen = np.abs(_generators(rng, 6, dim=3))
    z, y, x = np.mgrid[0:10, 0:40, 0:36] / 20.0
    maps = np.stack([1 + 0 * z, np.sin(3 * x) - 0.5, z - y]).astype(np.float32)
    out = project_maps(maps, gen, step=4)
    assert out.shape == maps.shape and out.dtype == np.float32
    assert np.all(cone_membership_distance(out.reshape(3, -1).T, gen) < 1e-5)


# ---------------------------------------------------------------------------------- bad input


def test_bad_input_is_named():
    gen = np.eye(3)
    with pytest.raises(InputError, match="X: vectors have 4 components but generators have 3"):
        project_onto_cone(np.ones((2, 4)), gen)
    with pytest.raises(InputError, match="X: 1 rows contain NaN"):
        project_onto_cone(np.array([[1.0, np.nan, 0]]), gen)
    with pytest.raises(InputError, match="generators: all generators are zero"):
        project_onto_cone(np.ones((2, 3)), np.zeros((2, 3)))
    with pytest.raises(InputError, match="method: expected"):
        project_onto_cone(np.ones((2, 3)), gen, method="cvx")
    with pytest.raises(InputError, match="angle_threshold_deg: must be in"):
        reduce_cone(np.ones((4, 3)), angle_threshold_deg=0)
    with pytest.raises(InputError, match="max_generators: must be at least 1"):
        reduce_cone(np.ones((4, 3)), max_generators=0)
    with pytest.raises(InputError, match="B: all observed vectors are zero"):
        reduce_cone(np.zeros((4, 3)))
    with pytest.raises(InputError, match=r"maps: expected shape \(I, ny, nx\)"):
        project_maps(np.ones((3, 4)), gen)
    with pytest.raises(InputError, match="step: must be a positive"):
        project_maps(np.ones((3, 4, 4)), gen, step=0)


def test_project_nonnegative_moves_only_violators_to_the_bound():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[-7:8, -7:8]
    gauss = np.exp(-(yy**2 + xx**2) / 8.0)
    ring = np.cos(np.hypot(yy, xx)) * gauss  # a basis PSF with a negative ring
    h = np.stack([gauss / np.linalg.norm(gauss), ring / np.linalg.norm(ring)])
    v = np.column_stack([np.ones(500), rng.uniform(-2.0, 2.0, 500)])
    psf = v @ h.reshape(2, -1)
    ok = psf.min(axis=1) >= -0.01 * psf.max(axis=1)
    assert 0 < ok.sum() < len(v)
    out = project_nonnegative(v, h, floor=0.01, block=64)
    np.testing.assert_array_equal(out[ok], v[ok])  # feasible rows untouched, bit for bit
    np.testing.assert_allclose(out[~ok], nonnegative_generators(v[~ok], h, floor=0.01))
    moved = out[~ok] @ h.reshape(2, -1)
    bound = -0.01 * psf[~ok].max(axis=1)
    assert np.all(moved.min(axis=1) >= bound - 1e-9)
    # the least-distance move: no feasible point on the segment towards v is closer
    assert np.all(np.linalg.norm(out[~ok] - v[~ok], axis=1) > 0)
    with pytest.raises(InputError, match=r"psf_basis: expected shape \(2, \.\.\.\) to match the vectors"):
        project_nonnegative(v, h[:1])


def _ldp_per_row(v, h, floor):
    """Reference: Lawson & Hanson's least-distance program, one scipy NNLS per row."""
    out = v.copy()
    target = np.r_[np.zeros(v.shape[1]), 1.0]
    for k, c in enumerate(v):
        psf = c @ h
        bound = -floor * max(psf.max(), 0.0)
        if psf.min() >= bound:
            continue
        e = np.vstack([h, bound - psf])
        r = e @ nnls(e, target, maxiter=50 * h.shape[1])[0] - target
        out[k] = c - r[:-1] / r[-1]
    return out


def test_project_nonnegative_batched_equals_one_nnls_per_row():
    """Every violating row of a lattice at once (batched active set, warm-started from the
    neighbouring rows, in several blocks) gives the per-row NNLS result to rounding; the
    per-row solver took 0.6 ms a row on a real 45 x 45 basis (53 s of a family's maps)."""
    rng = np.random.default_rng(13)
    yy, xx = np.mgrid[-10:11, -10:11]
    shapes = [np.exp(-((yy - dy) ** 2 + (xx - dx) ** 2) / (2 * s**2))
              for dy, dx, s in [(0, 0, 1.5), (1, -2, 2.0), (-2, 1, 2.5), (0, 3, 1.2), (3, 0, 3.5), (0, 0, 5.0)]]
    h = np.linalg.svd(np.stack([s.ravel() for s in shapes]), full_matrices=False)[2]  # (6, 441), signed
    ly, lx = np.mgrid[0:100, 0:80] / 40.0
    centre = np.stack([s.ravel() for s in shapes]).mean(axis=0) @ h.T
    waves = np.stack([np.sin(2 * ly + i) * np.cos(3 * lx - i) for i in range(6)], axis=-1).reshape(-1, 6)
    v = centre + 2.0 * waves + 0.01 * rng.standard_normal((8000, 6))  # lattice order
    for floor in (0.01, 0.0):
        out = project_nonnegative(v, h.reshape(6, 21, 21), floor=floor)
        psf = v @ h
        bound = -floor * np.maximum(psf.max(axis=1), 0.0)
        bad = psf.min(axis=1) < bound
        assert bad.sum() > 5000  # > one block of rows (4744 for 441 pixels): several blocks
        np.testing.assert_array_equal(out[~bad], v[~bad])
        slack = ((out @ h).min(axis=1) - bound) / np.linalg.norm(v, axis=1)
        assert slack.min() >= -1e-11  # the floor, every row, to rounding (-5e-13 measured)
        sub = np.flatnonzero(bad)[::20]
        ref = _ldp_per_row(v[sub], h, floor)
        # normal equations of nearly parallel pixel constraints: 2.6e-10 of the largest entry
        np.testing.assert_allclose(out[sub], ref, rtol=0, atol=1e-8 * np.abs(ref).max())
        np.testing.assert_allclose(nonnegative_generators(v[sub], h, floor=floor), out[sub], rtol=0, atol=1e-12)
