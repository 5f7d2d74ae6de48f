"""A family learned from a real wide-field defocus series, validated on held-out beads (issue 6).

The real z-stack of ``../shared/realdata/widefield-bead-zstack`` (34 planes, 200 nm beads, NA
0.95): the planes around best focus are the same microscope in varying states (defocus).
:func:`pcmx.cross_validation.cross_validate_family` holds out a fifth of the beads of every
plane, learns the family (and each plane's own operator, and its average PSF) without them,
and predicts them. Real users have no ground truth; this is the figure they can trust.
"""

import numpy as np
import pytest

import pcmx
from pcmx.cross_validation import cross_validate, cross_validate_family

HALF_WIDTH = 2  # planes focus-2 .. focus+2: farther, r grows past 20 px and few beads stay isolated


def _planes(realdata):
    paths = sorted(realdata.glob("sample_zstack*.tif"))
    assert len(paths) == 34
    # best focus: the plane whose intensity is most concentrated (sum u^2 / (sum u)^2)
    sharp = []
    for p in paths:
        u = np.asarray(pcmx.read_image(p).values, dtype=np.float64)
        sharp.append(float((u * u).sum() / u.sum() ** 2))
    focus = int(np.argmax(sharp))
    return paths, focus


@pytest.mark.realdata
def test_family_cross_validation_on_real_defocus_series(realdata):
    paths, focus = _planes(realdata)
    assert focus == 17  # the README's best focus
    states = paths[focus - HALF_WIDTH:focus + HALF_WIDTH + 1]
    cv = cross_validate_family(states, folds=5, seed=0)  # I, J and r automatic, as a user gets them
    print(f"\nfocus plane {focus}; r = {cv.attrs['psf_radius']} px; I, J per fold: "
          f"{cv.attrs['n_components']}, {cv.attrs['n_modes']}")
    print("plane                beads  family  single  average PSF")
    for s in range(cv.sizes["state"]):
        print(f"{str(cv['state'].values[s]):20s} {int(cv['n_beads'][s]):5d}  "
              f"{float(cv['median_error_family'][s]):.3f}   {float(cv['median_error_single'][s]):.3f}"
              f"   {float(cv['median_error_invariant'][s]):.3f}")
    print(f"all held-out beads: family {cv.attrs['median_error_family']:.3f}, single "
          f"{cv.attrs['median_error_single']:.3f}, average PSF {cv.attrs['median_error_invariant']:.3f}")
    assert cv.sizes["state"] == 2 * HALF_WIDTH + 1
    # r = 19 px from the pooled profiles (one plane's estimate: 15): 16-18 isolated beads per
    # plane stay (25-27 with r = 15)
    assert int(cv["n_beads"].min()) >= 15
    assert np.isfinite(cv["cv_error_family"].values).all()
    # the family must beat the space-invariant average PSF, overall and on the focal planes
    assert cv.attrs["median_error_family"] < 0.9 * cv.attrs["median_error_invariant"]
    assert (cv["median_error_family"] < cv["median_error_invariant"]).sum() >= 4

    # the single-operator figures are those of cross_validate on the same folds
    one = cross_validate(states[HALF_WIDTH], folds=5, psf_radius=cv.attrs["psf_radius"],
                         seed=0, realism="nonnegative")
    sel = cv["cv_bead_state"].values == HALF_WIDTH
    np.testing.assert_allclose(cv["cv_error_single"].values[sel], one["cv_error"].values, rtol=1e-5)
    np.testing.assert_allclose(cv["cv_error_invariant"].values[sel], one["cv_error_invariant"].values,
                               rtol=1e-5)


def test_cross_validate_family_errors():
    from pcmx.errors import InputError

    with pytest.raises(InputError, match="at least 2 images, got 1"):
        cross_validate_family([np.zeros((32, 32))])
    with pytest.raises(InputError, match="sequence of K images"):
        cross_validate_family(np.zeros((64, 64)))
    with pytest.raises(InputError, match="folds=1"):
        cross_validate_family([np.zeros((32, 32))] * 2, folds=1)
    with pytest.raises(InputError, match=r"state1: shape \(32, 40\) differs from \(32, 32\)"):
        cross_validate_family([np.ones((32, 32)), np.ones((32, 40))])
