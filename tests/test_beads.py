"""Bead detection, rejection, sub-pixel centring, patches, bump (paper App. A a-d) vs simulator truth."""

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from pcmx import beads as B
from pcmx.errors import InputError
from pcmx.simulate import simulate_beads


@pytest.fixture(scope="module")
def sim():
    return simulate_beads((256, 256), 40, seed=2)


@pytest.fixture(scope="module")
def bright():
    # no aberrations: coma moves the PSF's peak away from the emitter (0.17 px RMS at default
    # strength even without noise), which no centring can or should undo
    return simulate_beads((256, 256), 40, photons=50000.0, min_separation=25, seed=4,
                          aberration_strength=0.0)


def _truth(sim):
    return np.stack([sim["bead_y"].values, sim["bead_x"].values], axis=1)


def test_detection_recall(sim):
    img = sim["image"].values
    pos, info = B.detect_beads(img)
    assert pos.ndim == 2 and pos.shape[1] == 2
    assert {"threshold", "noise"} <= set(info)
    assert info["threshold"] > 0 and info["noise"] > 0
    truth = _truth(sim)
    d, _ = cKDTree(pos).query(truth)
    recall = np.mean(d < 2.0)
    assert recall >= 0.9, recall
    d2, _ = cKDTree(truth).query(pos)
    precision = np.mean(d2 < 3.0)
    assert precision >= 0.9, precision


def test_given_threshold_is_used(sim):
    img = sim["image"].values
    pos, info = B.detect_beads(img)
    hi_pos, hi_info = B.detect_beads(img, threshold=20 * info["threshold"])
    assert hi_info["threshold"] == pytest.approx(20 * info["threshold"])
    assert 0 < len(hi_pos) < len(pos)


def test_psf_radius(sim):
    img = sim["image"].values
    pos, _ = B.detect_beads(img)
    r = B.estimate_psf_radius(img, pos)
    r = int(r[0]) if isinstance(r, tuple) else int(r)
    # first Airy zero 0.61 lambda / NA = 0.274 um = 4.2 px at 65 nm: r must enclose it
    assert 5 <= r <= 20, r


def test_reject_border_crowded_saturated_hot_pixel():
    shape = (100, 100)
    yy, xx = np.mgrid[:100, :100]
    img = (100 + 1000 * np.exp(-((yy - 50) ** 2 + (xx - 50) ** 2) / 2.0)).astype(np.uint16)
    pos = np.array([[50.0, 50.0], [3.0, 40.0], [20.0, 80.0], [24.0, 84.0], [70.0, 20.0],
                    [85.0, 60.0], [50.0, 57.0]])
    img[70, 20] = np.iinfo(np.uint16).max
    img[85, 60] = 5000  # one bright pixel: a hot pixel, no PSF
    img[50, 57] = 3000  # a hot pixel 7 px from the bead crowds nothing
    keep, reasons = B.reject_beads(pos, shape, 5, image=img)
    np.testing.assert_array_equal(keep, [True, False, False, False, False, False, False])
    assert reasons == {"border": 1, "saturated": 1, "hot_pixel": 2, "crowded": 2}
    keep, reasons = B.reject_beads(pos, shape, 5, image=img, saturation=900)
    assert not keep[0] and reasons["saturated"] == 4


def test_hot_pixels_against_sampled_psfs():
    """A PSF of FWHM 1.1 px centred on a pixel still spreads 20% of its centre pixel's excess to
    the next pixel (pixel integration; 0.157 at FWHM 1.0); one bright pixel spreads nothing."""
    yy, xx = np.mgrid[:32, :32].astype(np.float64)
    from scipy.special import erf

    def integrated(cy, cx, fwhm):
        s = fwhm / 2.355
        fy = 0.5 * (erf((yy + 0.5 - cy) / (np.sqrt(2) * s)) - erf((yy - 0.5 - cy) / (np.sqrt(2) * s)))
        fx = 0.5 * (erf((xx + 0.5 - cx) / (np.sqrt(2) * s)) - erf((xx - 0.5 - cx) / (np.sqrt(2) * s)))
        return fy * fx

    img = 50 + 1e4 * (integrated(10, 10, 1.1) + integrated(20.3, 22.2, 0.9))
    img[10, 25] += 8000
    hot = B.hot_pixels(img, np.array([[10, 10], [20, 22], [10, 25]]))
    np.testing.assert_array_equal(hot, [False, False, True])


def test_centring_subpixel(bright):
    img = bright["image"].values.astype(np.float32)
    truth = _truth(bright)
    pos, _ = B.detect_beads(img)
    keep, _ = B.reject_beads(pos, img.shape, 8, image=bright["image"].values)
    rough = pos[keep]
    refined = B.center_beads(img, rough, 8)
    assert refined.shape == rough.shape
    d, _ = cKDTree(truth).query(refined)
    rms = np.sqrt(np.mean(d**2))
    d0, _ = cKDTree(truth).query(rough)
    assert rms < 0.05, rms  # measured 0.012 px (0.004 without noise)
    assert rms < np.sqrt(np.mean(d0**2))


def test_extract_patches_bicubic_centre():
    yy, xx = np.mgrid[:64, :64].astype(np.float64)
    centres = np.array([[20.3, 30.7], [40.6, 25.2]])
    img = sum(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 2.0**2)) for cy, cx in centres)
    p = B.extract_patches(img.astype(np.float32), centres, 5)
    half = math.ceil(1.2 * 5)
    assert p.dims == ("bead", "ky", "kx") and p.shape == (2, 2 * half + 1, 2 * half + 1)
    assert p.dtype == np.float32
    np.testing.assert_allclose(p["bead_y"].values, centres[:, 0])
    np.testing.assert_allclose(p["bead_x"].values, centres[:, 1])
    k = np.arange(-half, half + 1)
    expected = np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / 8.0)
    np.testing.assert_allclose(p.values, np.broadcast_to(expected, p.shape), atol=3e-3)


def test_bump_multiplier_formula():
    r, r_ext = 10.0, 12.0
    m = np.asarray(B.bump_multiplier((31, 31), r, r_ext))
    t = np.hypot(*np.meshgrid(np.arange(31) - 15.0, np.arange(31) - 15.0, indexing="ij"))
    s = np.clip((t - r) / (r_ext - r), 0, 1 - 1e-12)
    expected = np.where(t < r, 1.0, np.where(t > r_ext, 0.0, np.exp(-1 / (1 - s**2) + 1)))
    np.testing.assert_allclose(m, expected, atol=1e-6)


def _bump_reference(shape, r, ext):
    """The bump as pcmx.beads computed it before it was shared with pcmx.psf_basis."""
    half = [s // 2 for s in shape]
    grids = np.meshgrid(*[np.arange(-h, h + 1, dtype=np.float64) for h in half], indexing="ij")
    rho = np.sqrt(sum((g / rd) ** 2 for g, rd in zip(grids, np.broadcast_to(r, len(shape)), strict=True)))
    s = (rho - 1.0) / (ext - 1.0)
    m = np.zeros(rho.shape)
    m[rho < 1.0] = 1.0
    mid = (s >= 0) & (s < 1)
    m[mid] = np.exp(-1.0 / (1.0 - s[mid] ** 2) + 1.0)
    return m


@pytest.mark.parametrize(("shape", "r", "r_ext"), [((31, 31), 10.0, 12.0), ((15, 15), 6.0, None),
                                                   ((11, 13, 13), (4.0, 5.0, 5.0), None),
                                                   ((21, 17), (8.0, 6.5), (9.0, 8.0))])
def test_bump_multiplier_is_the_one_bump(shape, r, r_ext):
    ext = B.R_EXT_FACTOR if r_ext is None else float(np.mean(np.asarray(r_ext) / np.asarray(r)))
    ref = _bump_reference(shape, np.asarray(r, dtype=np.float64), ext)
    m32 = B.bump_multiplier(shape, r, r_ext)
    m64 = B.bump_multiplier(shape, r, r_ext, dtype=np.float64)
    assert m32.dtype == np.float32 and m64.dtype == np.float64 and m64.shape == shape
    np.testing.assert_array_equal(m64, ref)  # the same numbers as before, bit for bit
    np.testing.assert_array_equal(m32, ref.astype(np.float32))
    assert 0 < np.count_nonzero((m64 > 0) & (m64 < 1))  # the smooth part is sampled


def test_bump_multiplier_radii():
    # r_ext = r: the indicator of the ellipse (the PSF basis accepts it); r_ext < r: an error
    m = B.bump_multiplier((9, 9), 3.0, 3.0, dtype=np.float64)
    np.testing.assert_array_equal(m, (B.normalised_radius((4, 4), (3.0, 3.0)) <= 1).astype(float))
    with pytest.raises(InputError, match=r"^r_ext=2.0 must not be smaller than r=3.0$"):
        B.bump_multiplier((9, 9), 3.0, 2.0)
    # an even side: offsets -n/2 .. n/2 - 1, the array keeps the requested shape
    even = B.bump_multiplier((8, 9), 3.0)
    assert even.shape == (8, 9) and even[4, 4] == 1 and even[0, 4] == 0 and even[7, 4] == 1  # -4, +3


def test_kernel_grid_helpers():
    ky, kx = B.offset_grids((2, 3))
    np.testing.assert_array_equal(ky, [-2, -1, 0, 1, 2])
    np.testing.assert_array_equal(kx, np.arange(-3.0, 4.0))
    rho = B.normalised_radius((2, 3), (2.0, 1.5))
    assert rho.shape == (5, 7) and rho[2, 3] == 0
    assert rho[0, 3] == 1 and rho[2, 0] == 2 and rho[4, 6] == pytest.approx(np.sqrt(1 + 4))
    pos = B.as_positions([[1, 2], [3.5, 4]], 2)
    assert pos.dtype == np.float64 and pos.shape == (2, 2)
    assert B.as_positions([], 3).shape == (0, 3)
    with pytest.raises(InputError, match=r"^bead: expected an \(N, 2\) array of pixel positions, got shape \(3,\)$"):
        B.as_positions([1.0, 2.0, 3.0], 2, name="bead")
    with pytest.raises(InputError, match="^positions: contains NaN or infinite positions$"):
        B.as_positions([[np.nan, 1.0]], 2)


@pytest.mark.parametrize(("image", "message"), [
    (np.full((64, 64), np.nan, np.float32), "image: contains"),
    (np.full((64, 64), 7.0, np.float32), "image: is constant"),
    (np.ones((1, 1), np.float32), "image: shape (1, 1) is too small"),
    (np.ones((2, 2, 8, 8), np.float32), "image: expected a 2D (y, x) or 3D (z, y, x) array, got 4 dimensions"),
])
def test_bad_images(image, message):
    with pytest.raises(InputError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        B.detect_beads(image)


def test_no_beads():
    noise = np.random.default_rng(0).normal(100, 3, (128, 128)).astype(np.float32)
    with pytest.raises(InputError, match=r"^image: no beads detected"):
        B.detect_beads(noise)


# ---------------------------------------------------------------------------------------------
# rings, dim beads, saturation, exactness, 3D
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def very_bright():
    # 60000-photon beads: their outer Airy rings are LoG maxima far above the noise
    return simulate_beads((256, 256), 40, photons=60000.0, min_separation=30, seed=5)


def test_airy_rings_merged_into_their_bead(very_bright):
    img = very_bright["image"].values
    truth = _truth(very_bright)
    pos, info = B.detect_beads(img)
    raw, raw_info = B.detect_beads(img, merge_radius=None)
    assert len(raw) > len(truth) + 5  # rings and lobes are maxima of the Laplacian
    assert info["n_merged"] == info["n_maxima"] - len(pos) > 0
    d, _ = cKDTree(truth).query(pos)
    assert np.all(d < 2.0), d.max()  # every detection is a bead ...
    d, _ = cKDTree(pos).query(truth)
    assert np.all(d < 2.0)  # ... and every bead is detected
    r = B.estimate_psf_radius(img, pos)
    keep, reasons = B.reject_beads(pos, img.shape, r, image=img)
    # beads are 30 px apart > 2 r: none may be rejected as crowded by its own rings
    assert 2 * r < 30 and reasons["crowded"] == 0, (r, reasons)


def test_dim_beads_recall_and_radius():
    dim = simulate_beads((256, 256), 40, photons=2000.0, seed=6)
    img = dim["image"].values
    truth = _truth(dim)
    pos, _ = B.detect_beads(img)
    d, _ = cKDTree(pos).query(truth)
    d2, _ = cKDTree(truth).query(pos)
    assert np.mean(d < 2.0) >= 0.95 and np.mean(d2 < 3.0) >= 0.95
    r_dim = B.estimate_psf_radius(img, pos)
    bright = simulate_beads((256, 256), 40, photons=60000.0, min_separation=30, seed=6)
    r_bright = B.estimate_psf_radius(bright["image"].values, B.detect_beads(bright["image"].values)[0])
    # r is where the profile sinks into the noise: further out for brighter beads
    assert 3 <= r_dim < r_bright <= 15, (r_dim, r_bright)
    r, info = B.estimate_psf_radius(img, pos, return_info=True)
    assert r == r_dim and len(info["radii"]) == info["n_beads"] > 5 and info["noise"] > 0


def test_saturated_beads_found_from_the_plateau():
    kw = dict(photons=60000.0, min_separation=30, seed=5)
    sat = simulate_beads((256, 256), 40, saturation=3000, **kw)
    img = sat["image"].values
    assert B.saturation_level(img) == 3000.0  # a plateau at the maximum, below the dtype's
    assert B.saturation_level(img.astype(np.float32)) == 3000.0
    assert B.saturation_level(img, 2500) == 2500.0
    assert B.saturation_level(np.arange(100, dtype=np.float32).reshape(10, 10)) is None
    pos, _ = B.detect_beads(img)
    r = B.estimate_psf_radius(img, pos)
    reason = B.classify_beads(pos, img.shape, r, image=img)
    clean = simulate_beads((256, 256), 40, noise=False, **kw)
    peak = 2.0 * clean["image"].values[tuple(np.rint(pos).astype(int).T)] + 100.0  # ADU
    inner = reason != "border"
    assert np.all(reason[inner & (peak > 3300)] == "saturated")
    assert not np.any(reason[peak < 2700] == "saturated")
    keep, counts = B.reject_beads(pos, img.shape, r, image=img)
    assert counts["saturated"] == np.sum(reason == "saturated") > 5
    assert not np.any(keep & (reason == "saturated"))


def _gaussian_image(shape, centres, sigma):
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    img = np.zeros(shape)
    for c in centres:
        img += np.exp(-sum((g - ci) ** 2 for g, ci in zip(grids, c, strict=True)) / (2 * sigma**2))
    return img


def test_centring_exact_without_noise():
    centres = np.array([[20.3, 30.7], [40.61, 25.25], [33.0, 52.49]])
    img = (1000 * _gaussian_image((64, 72), centres, 1.6) + 100).astype(np.float32)
    start = np.rint(centres) + np.array([[1, 0], [0, -1], [1, 1]])  # detections off by a pixel
    got = B.center_beads(img, start, 5)
    np.testing.assert_allclose(got, centres, atol=0.01)
    assert got.dtype == np.float64


def test_extract_patches_equals_map_coordinates():
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(3)
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(rng.normal(size=(80, 90)), 1.5).astype(np.float32)
    pos = np.array([[30.3, 40.8], [45.5, 50.49], [40.0, 35.0]])
    p = B.extract_patches(img, pos, 6)
    k = np.arange(p.sizes["ky"]) - p.sizes["ky"] // 2
    for m, (cy, cx) in enumerate(pos):
        yy, xx = np.meshgrid(cy + k, cx + k, indexing="ij")
        ref = map_coordinates(img.astype(np.float64), [yy, xx], order=3, mode="mirror")
        np.testing.assert_allclose(p.values[m], ref, atol=1e-4 * np.abs(ref).max())
    assert p.attrs["psf_radius"] == [6.0, 6.0] and p.attrs["r_ext"] == pytest.approx([7.2, 7.2])
    assert p["ky"].attrs["units"] == "pixel" and float(p["ky"][p.sizes["ky"] // 2]) == 0.0


def test_three_dimensional_steps():
    centres = np.array([[12.3, 20.6, 30.2], [15.7, 45.2, 18.9]])
    img = (2000 * _gaussian_image((28, 64, 56), centres, 1.5) + 50).astype(np.float32)
    img += np.random.default_rng(0).normal(0, 1, img.shape).astype(np.float32)
    pos, info = B.detect_beads(img)
    assert pos.shape == (2, 3) and info["sigma"] == [1.5, 1.5, 1.5]
    r = B.estimate_psf_radius(img, pos)
    assert isinstance(r, tuple) and len(r) == 3 and all(2 <= v <= 8 for v in r), r
    keep, counts = B.reject_beads(pos, img.shape, (4, 5, 5))
    assert keep.all(), counts
    got = B.center_beads(img, pos, (4, 5, 5))
    order = np.argsort(got[:, 0])
    np.testing.assert_allclose(got[order], centres, atol=0.05)
    p = B.extract_patches(img, got, (4, 5, 5))
    assert p.dims == ("bead", "kz", "ky", "kx") and p.shape == (2, 11, 13, 13)
    assert set(p.coords) >= {"bead_z", "bead_y", "bead_x", "kz", "ky", "kx"}
    # centred: the patch's own centroid sits at the kernel centre
    w = np.clip(p.values - 50, 0, None)
    for d, n in enumerate(p.shape[1:]):
        k = np.arange(n) - n // 2
        c = (w * k.reshape([-1 if a == d else 1 for a in range(3)])).sum(axis=(1, 2, 3)) / w.sum(axis=(1, 2, 3))
        np.testing.assert_allclose(c, 0, atol=0.05)
    m = B.bump_multiplier(p.shape[1:], (4, 5, 5))
    assert m.shape == (11, 13, 13) and m[5, 6, 6] == 1 and m[0, 0, 0] == 0


def test_classify_reasons_and_priority():
    pos = np.array([[2.0, 30.0], [30.0, 30.0], [33.0, 33.0], [60.0, 60.0]])
    img = np.zeros((64, 64), np.uint16)
    img[2, 30] = 65535  # saturated and near the border: counted once, as border
    reason = B.classify_beads(pos, (64, 64), 4, image=img)
    assert reason.tolist() == ["border", "crowded", "crowded", "border"]
    keep, counts = B.reject_beads(pos, (64, 64), 4, image=img)
    assert counts == {"border": 2, "saturated": 0, "hot_pixel": 0, "crowded": 2} and not keep.any()


@pytest.mark.parametrize(("call", "message"), [
    (lambda: B.reject_beads(np.zeros((2, 2)), (64, 64), -1), "psf_radius=-1 must be a positive number of pixels"),
    (lambda: B.extract_patches(np.ones((64, 64)) + np.eye(64), np.zeros((0, 2)), 4),
     "positions: no beads to extract patches from (0 positions)"),
    (lambda: B.center_beads(np.ones((64, 64)) + np.eye(64), np.zeros((3, 3)), 4),
     "positions: expected an (N, 2) array of pixel positions, got shape (3, 3)"),
    (lambda: B.detect_beads(np.ones((64, 64)) + np.eye(64), threshold=-2.0), "threshold=-2.0 must be a positive number"),
    (lambda: B.detect_beads(np.ones((64, 64)) + np.eye(64), merge_radius="big"),
     "merge_radius='big' must be 'auto', a number of pixels or None"),
])
def test_argument_errors(call, message):
    with pytest.raises(InputError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_pooled_psf_radius_sees_wings_that_each_bead_hides():
    """Profiles ~ exp(-rho/3) of 100 beads with noise 1: each crosses the noise near 3 ln(A);
    their mean, with noise 1/10, at 3 ln(A / 3 * 10) (significance 3)."""
    from pcmx.beads import pooled_psf_radius

    rho = np.arange(41, dtype=np.float64)
    amp = 200.0
    infos = [{"profile": (amp * np.exp(-rho / 3.0)).tolist(), "noise": 1.0, "n_beads": 10,
              "radii": [16.0] * 10, "max_radius": 40} for _ in range(10)]
    r = pooled_psf_radius(infos)
    expected = int(np.ceil(3.0 * np.log(amp / (3.0 / 10.0))))
    assert r == expected and r > 16  # 20 > each bead's 16
    assert pooled_psf_radius(infos[:1]) < r  # fewer beads: noisier mean, smaller r
    with pytest.raises(InputError, match="^no bead profile to estimate the PSF radius from$"):
        pooled_psf_radius([])
