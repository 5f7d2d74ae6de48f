"""Family vs single image against the simulator's ground truth (issue 6, quality; paper II-D, III-B-1).

K = 10 states of one simulated microscope (random defocus offsets, focal-plane tilts and
aberration drifts, :func:`pcmx.simulate.random_states`), a 512 x 512 field holding 30 dim
beads (``photons=36000``: the median bead peaks at ~1500 photons in focus, see the printed
figures). For every state, the PSF predicted by the family learned from the K images is
compared with the PSF learned from that state's image alone (:func:`pcmx.learn_operator`)
against the exact PSFs of the simulator:

(a) the median relative l2 error of the PSFs over a 5 x 5 grid of positions (both centred by
    centroid and normalised to sum one, on a 33 x 33 window holding the model's support);
(b) the paper's rescaled distance (III-B-1) ``inf_{a,b} ||a H_est d + b - H_true d|| /
    ||H_true d||`` for a comb ``d`` of Diracs, ``H_true d`` rendered from exact PSFs.

Both models get the same PSF radius r = 12 px: the automatic estimate on such dim beads is
8-10 px, and the truncation it causes would dominate both errors (it is measured in
``docs/family.md``). The family's I is automatic (the noise rule picks 12 on the pooled
patches: ten states span more PSF shapes than one, and with I = 5 the shared basis alone cannot
represent the true PSFs better than ~12%, see docs/family.md; the basis' floor is printed) and
so is J (the default rule: 8 here, where the paper's 2.858 * median rule alone keeps ~40; the
modes barely matter to this figure, 0.053 with 8 or 44). The family's maps go through its default realism projection
(non-negativity); the test also checks that every PSF it predicts is non-negative within 1.5%
of its peak.
"""

import numpy as np
import pytest
from scipy.interpolate import RectBivariateSpline
from scipy.optimize import nnls

from pcmx.beads import bump_multiplier
from pcmx.deblur import rescaled_distance
from pcmx.family import learn_family
from pcmx.learn import learn_operator
from pcmx.model import family_coefficients
from pcmx.operator import ProductConvolution
from pcmx.simulate import simulate_beads, true_psfs
from pcmx.truth import centred_psfs, true_comb_image

SHAPE = (512, 512)
K = 10
R = 12
WINDOW = 33
COMB_STEP = 32


def _pad(psfs: np.ndarray, size: int = WINDOW) -> np.ndarray:
    k = psfs.shape[-1]
    o = (size - k) // 2
    out = np.zeros(psfs.shape[:-2] + (size, size))
    out[..., o:o + k, o:o + k] = psfs
    return out


def _median_relative_error(pred: np.ndarray, true: np.ndarray) -> float:
    n = len(true)
    return float(np.median(np.linalg.norm((pred - true).reshape(n, -1), axis=1)
                           / np.linalg.norm(true.reshape(n, -1), axis=1)))


@pytest.fixture(scope="module")
def sim():
    return simulate_beads(SHAPE, 30, states=K, photons=36000.0, seed=5)


@pytest.fixture(scope="module")
def family(sim):
    return learn_family(sim["image"], psf_radius=R, validate=False)


@pytest.fixture(scope="module")
def singles(sim):
    return [learn_operator(sim["image"].isel(state=k), psf_radius=R) for k in range(K)]


@pytest.fixture(scope="module")
def grid():
    n = 5
    ys = np.linspace(0, SHAPE[0] - 1, n + 2)[1:-1]
    xs = np.linspace(0, SHAPE[1] - 1, n + 2)[1:-1]
    gy, gx = (np.round(a.ravel()).astype(int) for a in np.meshgrid(ys, xs, indexing="ij"))
    return gy, gx


@pytest.fixture(scope="module")
def comb():
    pts = np.arange(COMB_STEP, SHAPE[0] - COMB_STEP + 1, COMB_STEP)
    cy, cx = (a.ravel() for a in np.meshgrid(pts, pts, indexing="ij"))
    d = np.zeros(SHAPE, np.float32)
    d[cy, cx] = 1.0
    return d, cy, cx


def test_family_beats_single_image_against_truth(sim, family, singles, grid, comb):
    gy, gx = grid
    d, cy, cx = comb
    amp = sim["amplitude"].values
    peaks = [np.median(true_psfs(sim, sim["bead_y"].values, sim["bead_x"].values, state=k,
                                 size=WINDOW).max(axis=(1, 2)) * amp) for k in range(K)]
    h_fam = family["psf_basis"].values.astype(np.float64)
    err_fam, err_single, dist_fam, dist_single, floor_fam, negative = [], [], [], [], [], []
    bump = bump_multiplier(h_fam.shape[1:], R)
    for k in range(K):
        true = centred_psfs(true_psfs(sim, gy, gx, state=k, size=WINDOW))
        coeffs = family_coefficients(family, state=k).values[:, gy, gx].astype(np.float64)
        pred_fam = np.einsum("im,ijk->mjk", coeffs, h_fam)
        negative.append(float((pred_fam.min(axis=(1, 2)) / pred_fam.max(axis=(1, 2))).min()))
        op = singles[k]
        pred_single = np.einsum("im,ijk->mjk", op["coefficients"].values[:, gy, gx].astype(np.float64),
                                op["psf_basis"].values.astype(np.float64))
        err_fam.append(_median_relative_error(centred_psfs(_pad(pred_fam)), true))
        err_single.append(_median_relative_error(centred_psfs(_pad(pred_single)), true))
        # the shared basis' own floor: the exact PSFs (on the model's support) projected on it
        exact = true_psfs(sim, gy, gx, state=k, size=h_fam.shape[-1]).astype(np.float64) * bump
        exact /= exact.sum(axis=(1, 2), keepdims=True)
        proj = np.einsum("mi,ijk->mjk", np.einsum("mjk,ijk->mi", exact, h_fam), h_fam)
        floor_fam.append(_median_relative_error(centred_psfs(_pad(proj)), true))
        u0 = true_comb_image(sim, cy, cx, state=k, window=WINDOW)
        dist_fam.append(rescaled_distance(ProductConvolution.from_family(family, state=k).apply(d), u0))
        dist_single.append(rescaled_distance(ProductConvolution(op).apply(d), u0))
    med = {name: float(np.median(v)) for name, v in [("family", err_fam), ("single", err_single),
                                                      ("comb_family", dist_fam),
                                                      ("comb_single", dist_single),
                                                      ("floor", floor_fam)]}
    print(f"\nmedian bead peak per state (photons): {np.round(peaks).astype(int).tolist()}, "
          f"median {np.median(peaks):.0f}")
    print(f"beads used per state: family {family['beads_used'].values.tolist()}, single "
          f"{[op.attrs['pcmx_parameters']['counts']['used'] for op in singles]}; "
          f"single I {[op.sizes['component'] for op in singles]}")
    print("PSF error, family:", np.round(err_fam, 3).tolist())
    print("PSF error, single:", np.round(err_single, 3).tolist())
    print("Dirac comb distance, family:", np.round(dist_fam, 3).tolist())
    print("Dirac comb distance, single:", np.round(dist_single, 3).tolist())
    print(f"medians: PSF error family {med['family']:.3f} vs single {med['single']:.3f} "
          f"(ratio {med['single'] / med['family']:.2f}, target 1.5; shared-basis floor "
          f"{med['floor']:.3f}); comb distance family {med['comb_family']:.3f} vs single "
          f"{med['comb_single']:.3f} (ratio {med['comb_single'] / med['comb_family']:.2f})")
    print(f"family I = {family.sizes['component']}, J = {family.sizes['mode']}; most negative "
          f"predicted PSF value / peak: {min(negative):.4f}")
    assert min(negative) > -0.015
    assert med["family"] < 0.15 and med["single"] < 0.25
    # measured 2026-12-07: family 0.050, single 0.073 (1.45x). The target of the family issue
    # was 1.5x against single operators at 0.085 (equal weights: family 0.051, 1.65x); SNR
    # weights in the PCA and the spline (issue 12) made every single operator 14% better and
    # the family 2%: the family's error is held, the single operators caught up
    assert med["family"] < 0.056
    assert med["single"] >= 1.35 * med["family"], (
        f"family PSF error {med['family']:.3f} is not 1.35x below the single-image error "
        f"{med['single']:.3f} (ratio {med['single'] / med['family']:.2f})")


def test_true_gammas_lie_in_the_learned_cone(sim, family):
    """gamma_true[i, j] = <alpha_true_i, a_j> of each state, in the cone of the learned gammas.

    The truth's PSFs (on the model's support, sum one) are expanded on the learned h_i at a
    16 x 16 lattice, interpolated to every pixel (the true maps are smooth), then on the
    learned modes a_j; normalised to unit sum (II-E-a) and projected onto cone(gamma_normalised)
    by NNLS. Outside references: the same gammas with their components reversed, and the true
    gamma of a state the family never saw (defocus 0.8 um, beyond the +-0.25 um learned).
    """
    h = family["psf_basis"].values.astype(np.float64)
    modes = family["spatial_basis"].values.reshape(family.sizes["mode"], -1).astype(np.float64)
    gens = family["gamma_normalised"].values.reshape(K, -1).astype(np.float64)
    n = 16
    ly = np.linspace(0, SHAPE[0] - 1, n)
    lx = np.linspace(0, SHAPE[1] - 1, n)
    yy, xx = np.meshgrid(ly, lx, indexing="ij")
    bump = bump_multiplier(h.shape[1:], R)
    rows = np.arange(SHAPE[0], dtype=np.float64)
    cols = np.arange(SHAPE[1], dtype=np.float64)

    def true_gamma(s, state):
        exact = true_psfs(s, yy.ravel(), xx.ravel(), state=state, size=h.shape[-1]).astype(np.float64)
        exact *= bump
        exact /= exact.sum(axis=(1, 2), keepdims=True)
        beta = np.einsum("mjk,ijk->mi", exact, h)  # the truth's coefficients on the learned h_i
        alpha = np.stack([RectBivariateSpline(ly, lx, beta[:, i].reshape(n, n))(rows, cols).ravel()
                          for i in range(h.shape[0])])
        g = alpha @ modes.T
        return g / g.sum()

    def distance(g):
        g = g.ravel() / g.sum()
        _, res = nnls(gens.T, g)
        return res / np.linalg.norm(g)

    inside, reversed_, own = [], [], []
    for k in range(K):
        g_true = true_gamma(sim, k)
        inside.append(distance(g_true))
        reversed_.append(distance(g_true[::-1]))
        g_est = family["gamma_normalised"].values[k].astype(np.float64)
        own.append(np.linalg.norm(g_est - g_true) / np.linalg.norm(g_true))
    unseen = simulate_beads(SHAPE, 30, states=[{"defocus": 0.8}], photons=36000.0, seed=5, noise=False)
    assert unseen.attrs["field_model"] == sim.attrs["field_model"]  # the same microscope
    far = distance(true_gamma(unseen, 0))
    print("\nrelative distance to the learned cone, true gammas:", np.round(inside, 3).tolist())
    print("  |gamma_k - gamma_true| / |gamma_true| (estimation noise):", np.round(own, 3).tolist())
    print("  components reversed:", np.round(reversed_, 3).tolist())
    print(f"  unseen state (defocus 0.8 um): {far:.3f}")
    # within the cone up to the estimation noise (a distance to the cone is at most the distance
    # to the state's own generator, so this also checks that gamma_normalised is gamma / sum)
    assert all(d <= o + 1e-6 for d, o in zip(inside, own, strict=True))
    assert np.median(inside) < 0.08
    assert min(reversed_) > 5 * max(inside)
    assert far > 2 * np.median(inside)


def test_cross_validate_family_on_simulated_states(sim):
    """Held-out beads of 4 dim states: the family and the single operators beat the average PSF."""
    from pcmx.cross_validation import cross_validate_family

    cv = cross_validate_family(sim["image"].isel(state=slice(0, 4)), folds=3, psf_radius=R,
                               n_components=6, n_modes=6, seed=1)
    print("\nsimulated CV (4 states):", {k: (round(v, 4) if isinstance(v, float) else v)
                                          for k, v in cv.attrs.items()})
    assert cv.sizes["state"] == 4 and cv.attrs["n_components"] == [6, 6, 6]
    assert cv.attrs["n_modes"] == [6, 6, 6] and cv.attrs["psf_radius"] == R
    assert int(cv["n_beads"].sum()) == cv.sizes["bead"]
    assert np.isfinite(cv["cv_error_family"].values).all()
    assert cv.attrs["median_error_family"] < 0.8 * cv.attrs["median_error_invariant"]
    assert cv.attrs["median_error_single"] < 0.8 * cv.attrs["median_error_invariant"]


def test_automatic_radius_pools_the_beads_of_all_images(sim, grid):
    """With r left automatic, a family estimates it from the pooled profiles of its images'
    beads (:func:`pcmx.beads.pooled_psf_radius`): each dim bead's profile sinks into the noise
    at 8-11 px, the mean of ~130 at ~14. Compared on a 49 x 49 window (the wings included)
    with each image's own automatic operator."""
    window = 49
    fam = learn_family(sim["image"], progress=False, validate=False)
    params = fam.attrs["pcmx_parameters"]
    est = params["psf_radius_estimate"]
    print(f"\nautomatic r: family {params['psf_radius']} px (pooled over {est['pooled_beads']} beads "
          f"of {est['pooled_from_images']} images; each image alone {est['per_image']})")
    assert max(est["per_image"]) <= 11 and 13 <= params["psf_radius"] <= 17
    gy, gx = grid
    h = fam["psf_basis"].values.astype(np.float64)
    err_fam, err_single = [], []
    for k in range(K):
        true = centred_psfs(true_psfs(sim, gy, gx, state=k, size=window))
        c = family_coefficients(fam, state=k).values[:, gy, gx].astype(np.float64)
        err_fam.append(_median_relative_error(centred_psfs(_pad(np.einsum("im,ijk->mjk", c, h), window)), true))
        op = learn_operator(sim["image"].isel(state=k))
        pred = np.einsum("im,ijk->mjk", op["coefficients"].values[:, gy, gx].astype(np.float64),
                         op["psf_basis"].values.astype(np.float64))
        err_single.append(_median_relative_error(centred_psfs(_pad(pred, window)), true))
    fam_med, single_med = float(np.median(err_fam)), float(np.median(err_single))
    print(f"PSF error (49 x 49), everything automatic: family {fam_med:.3f}, single image "
          f"{single_med:.3f} (ratio {single_med / fam_med:.2f})")
    assert single_med >= 1.5 * fam_med
