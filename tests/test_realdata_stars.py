"""pcmx on six real star-field frames of one camera and lens (issue 12, item 8).

``../shared/realdata/star-field-camera``: six 768 x 1024 uint16 night-sky frames of one 35 mm
f/1.9 lens (6.9 um pixels), stars of FWHM 1-2 px (undersampled), a bright uneven sky, a few
saturated stars and about ten hot pixels fixed on the sensor. Run as a user runs it: no option
beyond the pixel size. The figures and their diagnosis are in docs/realdata.md.

The held-out errors of these frames sit at their noise floor (about 0.4: faint stars on a sky
of 2000-6400 ADU with a pixel noise of 120-200 ADU), and the field varies little (FWHM 1.2 px
in the centre, 1.4 px at the edge): no space-varying model can gain much in the median, so
the tests ask pcmx never to lose much against the space-invariant reference.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import pcmx
from pcmx.cross_validation import cross_validate_family
from pcmx.fit import stored_positions
from pcmx.io.readers import PcmxWarning

STARS = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "star-field-camera"
PIXEL = "6.9um"  # the files carry no pixel size (the README)
#: Sensor pixels (y, x) of the hot pixels: a single bright pixel on the sky, at the same place
#: in 4-6 of the six frames while the stars move between pointings (measured: a pixel-integrated
#: Gaussian fit gives them FWHM <= 0.65 px, the stars 0.9-2.2 px).
HOT_PIXELS = [(256, 540), (188, 25), (392, 636), (461, 449), (110, 452), (582, 753),
              (137, 878), (554, 286), (495, 508), (206, 639)]
#: The frames of the family test: the six take 22-42 s on two shared cores and three 50-60 s
#: (r = 4 and the non-negativity projection), two 21 s (7 s on 2026-12-07).
FAMILY = ("Alt40_Azi135", "Alt60_Azi135")


@pytest.fixture(scope="module")
def frames() -> list[Path]:
    if not STARS.is_dir():
        pytest.skip(f"real data not available ({STARS} is absent, as in a user's clone)")
    paths = sorted(STARS.glob("*.tiff"))
    assert len(paths) == 6
    return paths


def _label(path: Path) -> str:
    return path.name.split("_", 1)[1].rsplit("_", 1)[0]  # e.g. "Alt40_Azi-135"


@pytest.fixture(scope="module")
def learned(frames):
    """Each frame's operator, cross-validated, with the wall time (one run for all tests)."""
    out = {}
    for p in frames:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PcmxWarning)
            ds = pcmx.learn_operator(p, pixel_size=PIXEL, validate=True)
        ds.attrs["warnings"] = [str(w.message) for w in caught]
        out[_label(p)] = (ds, time.perf_counter() - t0)
    return out


@pytest.mark.realdata
def test_each_star_frame_never_much_worse_than_invariant(learned):
    print("\nframe            detected isolated used  r  I  automatic  +-SE    reference  ratio  stored"
          "            s")
    ratios = []
    for name, (ds, wall) in learned.items():
        par = ds.attrs["pcmx_parameters"]
        cv, counts, sel = par["cross_validation"], par["counts"], par["model_selection"]
        auto, inv = sel["median_error"]["automatic"], sel["median_error"]["space-invariant"]
        ratios.append(inv / auto)
        print(f"{name:16s} {counts['detected']:8d} {counts.get('isolated', -1):8d} {counts.get('used', -1):4d} "
              f"{par['psf_radius']:2d} {ds.sizes['component']:2d}  {auto:.3f}  {sel['standard_error']['automatic']:.4f}"
              f"  {inv:.3f}      {inv / auto:.3f}  {sel['chosen']:16s}  {wall:.1f}")
        # stars of FWHM 1.2-1.4 px: r = 3 px (patches 9 x 9)
        assert par["psf_radius"] == 3
        assert 50 <= counts["detected"] <= 400
        # at the noise floor: both errors between 0.35 and 0.55 (measured 0.41-0.49)
        assert 0.35 < auto < 0.55
        assert 0.35 < inv < 0.55
        # the automatic fit: measured 0.996-1.014 of the reference per frame (0.91-1.02 while
        # hot pixels reached the fit)
        assert inv / auto > 0.98, name
        # model selection: the stored model is never worse than the reference on the held-out
        # stars; where the space-varying fit does not beat it by more than one standard error,
        # the space-invariant model is stored, and a warning says so
        assert cv["median_error"] <= inv + 1e-12 and cv["model"] == sel["chosen"], name
        if sel["chosen"] == "space-invariant":
            assert ds.sizes["component"] == 1, name
            assert any("stored the space-invariant model" in w for w in ds.attrs["warnings"]), name
        else:
            assert sel["paired_difference"]["space-invariant"] > sel["standard_error"]["space-invariant"]
    print(f"median ratio of the automatic fits over the frames {np.median(ratios):.3f}")
    # measured 1.000 (median of the six frames' ratios): the field barely varies (FWHM +4-22%
    # centre to edge, docs/realdata.md) and the errors sit at the noise floor
    assert np.median(ratios) > 0.99


def _fitted_and_heldout(ds) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixels of the beads the stored model used, and of the held-out beads (stored in
    micrometres: read in their units)."""
    return stored_positions(ds, "bead"), stored_positions(ds, "cv_bead")


@pytest.mark.realdata
def test_no_saturated_star_is_used(frames, learned):
    for p in frames:
        data = np.asarray(pcmx.read_image(p, pixel_size=PIXEL).values)
        ds, _ = learned[_label(p)]
        r = int(ds.attrs["pcmx_parameters"]["psf_radius"])
        for pos in _fitted_and_heldout(ds):
            for y, x in np.rint(pos).astype(int):
                window = data[max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1]
                assert window.max() < 65535, (p.name, (y, x))


@pytest.mark.realdata
def test_hot_pixels_are_neither_fitted_nor_held_out(learned):
    """A hot pixel (one bright pixel, no PSF) is not a star: neither fitted nor held out."""
    fitted = held = 0
    for ds, _ in learned.values():
        fit, heldout = _fitted_and_heldout(ds)
        for hp in np.asarray(HOT_PIXELS, float):
            fitted += int(np.any(np.hypot(*(fit - hp).T) < 1.0))
            held += int(np.any(np.hypot(*(heldout - hp).T) < 1.0))
    print(f"\nhot pixels over the six frames: {fitted} fitted, {held} held out")
    assert fitted == 0 and held == 0


@pytest.mark.realdata
def test_star_family_not_worse_than_invariant(frames):
    sel = [p for p in frames if _label(p) in FAMILY]
    t0 = time.perf_counter()
    cv = cross_validate_family(sel, pixel_size=PIXEL)
    wall = time.perf_counter() - t0
    print(f"\nfamily of {len(sel)} frames: r = {cv.attrs['psf_radius']} px, I per fold "
          f"{cv.attrs['n_components']}, J per fold {cv.attrs['n_modes']}, {wall:.1f} s")
    print("frame            beads  family  single  invariant")
    for s in range(cv.sizes["state"]):
        print(f"{_label(Path(str(cv['state'].values[s]))):16s} {int(cv['n_beads'][s]):5d}  "
              f"{float(cv['median_error_family'][s]):.3f}   {float(cv['median_error_single'][s]):.3f}   "
              f"{float(cv['median_error_invariant'][s]):.3f}")
    fam, inv = cv.attrs["median_error_family"], cv.attrs["median_error_invariant"]
    print(f"all held-out stars: family {fam:.3f}, single {cv.attrs['median_error_single']:.3f}, "
          f"invariant {inv:.3f}, ratio invariant/family {inv / fam:.3f}")
    assert np.isfinite(cv["cv_error_family"].values).all()
    # measured 0.999 (family 0.515, reference 0.514; r = 4 here, 3 per frame: a higher floor,
    # docs/realdata.md; 1.000 with 0.546 and 0.546 while the beads the shape tests reject were
    # fitted too)
    assert inv / fam > 0.97


@pytest.mark.realdata
def test_pooled_radius_of_the_frames_sees_the_wings_of_the_mean_profile(frames):
    """The family's pooled r is 4 px where each frame gives 3 (issue 12): not a bug. Each frame's
    r is where its stars' profiles fall below the pixel noise (median over 16 stars: 2 px, raised
    to the detection blur's floor, 3); the pooled r is where the mean profile of all 96 stars
    falls below 3 times the noise of that mean, which it does only at ring 4."""
    from pcmx.patches import pooled_radius, radius_profiles

    infos = [radius_profiles(pcmx.read_image(p, pixel_size=PIXEL)) for p in frames]
    r, rec = pooled_radius(infos)
    n = np.array([i["n_beads"] for i in infos], dtype=float)
    mean = np.sum(np.stack([np.asarray(i["profile"][:8]) for i in infos]) * n[:, None], axis=0) / n.sum()
    noise = float(np.sqrt(np.sum(n * np.array([i["noise"] for i in infos]) ** 2)) / n.sum())
    print(f"\npooled r = {r} px, per frame {rec['per_image']}; mean profile {np.round(mean[:6], 1)} "
          f"(ADU), noise of the mean {noise:.1f}")
    # measured: r = 4, per frame [2, 2, 3, 3, 2, 3]; rings 3 and 4 of the mean profile 129 and 49
    # ADU against 3 x 17.4 = 52: ring 3 still carries 0.9% of the centre's light
    assert r == 4 and rec["pooled_beads"] == 96 and max(rec["per_image"]) == 3
    assert mean[3] > 2 * 3 * noise and mean[4] < 3 * noise
