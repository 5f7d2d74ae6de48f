"""pcmx.fit: the realism policy and the one fit (issue 11)."""

import numpy as np
import pytest

from pcmx.errors import InputError
from pcmx.fit import CONE_FLOOR, NONNEGATIVE_FLOOR, Realism, fit_operator, realism_policy
from pcmx.io.readers import as_image
from pcmx.learn import learn_operator
from pcmx.patches import bead_patches
from pcmx.simulate import simulate_beads


@pytest.fixture(scope="module")
def sim():
    return simulate_beads((192, 192), 40, photons=40000.0, min_separation=25, seed=8)


@pytest.mark.parametrize("value, kind", [(True, "cone"), ("cone", "cone"), ("CONE", "cone"),
                                         ("nonnegative", "nonnegative"), (False, "none"),
                                         (None, "none"), ("none", "none")])
def test_realism_policy_reads_what_users_pass(value, kind):
    assert realism_policy(value).kind == kind


def test_realism_defaults_and_errors():
    assert Realism("cone").floor == CONE_FLOOR == 0.005
    assert Realism("nonnegative").floor == NONNEGATIVE_FLOOR == 0.01
    assert realism_policy(Realism("cone", max_generators=3)).max_generators == 3
    with pytest.raises(InputError, match=r"^realism='bogus': expected one of 'cone', 'nonnegative', 'none' \(or True/False\)$"):
        realism_policy("bogus")
    with pytest.raises(InputError, match=r"^realism=3: expected one of"):
        realism_policy(3)
    with pytest.raises(InputError, match=r"^realism floor=1.5: expected a number in \[0, 1\)$"):
        Realism("cone", floor=1.5)
    with pytest.raises(InputError, match=r"^angle_threshold_deg=95: must be in \(0, 90\)$"):
        Realism("cone", angle_threshold_deg=95)


def test_setup_per_kind(sim):
    bp = bead_patches(as_image(sim["image"]))
    op = fit_operator(bp, realism="none")
    h = op["psf_basis"].values
    beta = op["observed_coefficients"].values.astype(np.float64)
    cone = Realism("cone", max_generators=4).setup(beta, h)
    assert cone["project"] is None and 1 <= len(cone["generators"]) <= 4
    nonneg = Realism("nonnegative").setup(beta, h)
    assert nonneg["generators"] is None
    bent = beta[:3].copy()
    bent[:, 1:] *= -4  # PSFs down to -3% .. -11% of their peak (measured)
    before = np.tensordot(bent, h, axes=1).reshape(3, -1)
    assert np.all(before.min(axis=1) < -0.03 * before.max(axis=1))
    psf = np.tensordot(nonneg["project"](bent), h, axes=1).reshape(3, -1)
    assert np.all(psf.min(axis=1) >= -0.0101 * psf.max(axis=1))
    assert Realism("none").setup(beta, h) == {"generators": None, "project": None}


def test_learn_operator_is_patches_then_fit(sim):
    op = learn_operator(sim["image"], realism="nonnegative")
    img = as_image(sim["image"])
    again = fit_operator(bead_patches(img), image=img, realism="nonnegative")
    np.testing.assert_array_equal(op["coefficients"].values, again["coefficients"].values)
    np.testing.assert_array_equal(op["psf_basis"].values, again["psf_basis"].values)
    assert op.attrs["pcmx_parameters"]["realism"] == {
        "kind": "nonnegative", "floor": 0.01, "max_generators": None, "angle_threshold_deg": 1.0}
    # non-negativity keeps every PSF of the field >= -1% of its peak
    c = op["coefficients"].values[:, ::8, ::8].reshape(op.sizes["component"], -1).T
    psf = (c @ op["psf_basis"].values.reshape(op.sizes["component"], -1))
    assert np.all(psf.min(axis=1) >= -0.0101 * psf.max(axis=1))


def test_too_few_beads_is_refused(sim):
    bp = bead_patches(as_image(sim["image"])).subset(np.arange(3))
    with pytest.raises(InputError, match=r"^only \d usable beads after rejection; at least 4 are needed"):
        fit_operator(bp, n_components=1)


def test_neighbour_passes_show_a_bar_only_when_asked(sim, capsys):
    """refit_without_neighbours: one tqdm tick per pass on stderr with progress on (the
    argument, or the option where it is left None), nothing with it off."""
    import pcmx
    from pcmx.neighbours import refit_without_neighbours

    img = as_image(sim["image"])
    bp = bead_patches(img)
    first = fit_operator(bp, image=img)

    def fit(b):
        return fit_operator(b, image=img)

    capsys.readouterr()
    refit_without_neighbours(bp, img, fit, passes=1, first=first, progress=True)
    err = capsys.readouterr().err
    assert "neighbour passes" in err and "1/1" in err
    with pcmx.set_options(progress=True):
        refit_without_neighbours(bp, img, fit, passes=1, first=first)
    assert "neighbour passes" in capsys.readouterr().err
    with pcmx.set_options(progress=True):
        refit_without_neighbours(bp, img, fit, passes=1, first=first, progress=False)
    with pcmx.set_options(progress=False):
        op, _, record = refit_without_neighbours(bp, img, fit, passes=1, first=first)
    assert capsys.readouterr().err == ""
    assert len(record) == 1 and op["bead_y"].attrs["units"] == "micrometer"


def test_progress_default_is_off_outside_an_interactive_session():
    """Scripts, batch jobs and tests get no bars unless asked; a notebook or an interactive
    interpreter gets them (pcmx.options._interactive)."""
    import pcmx
    from pcmx.options import _interactive

    assert _interactive() is False
    assert pcmx.get_options()["progress"] is False
