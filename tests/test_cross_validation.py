"""Cross-validation fits every fold exactly as learn_operator fits the stored model (issue 11)."""

import numpy as np
import pytest

import pcmx.cross_validation as cvmod
from pcmx.cross_validation import (
    cross_validate,
    fold_labels,
    heldout_targets,
    invariant_reference,
    predict_psfs,
)
from pcmx.errors import InputError
from pcmx.fit import Realism, fit_operator
from pcmx.io.readers import as_image
from pcmx.learn import learn_operator
from pcmx.patches import bead_patches
from pcmx.simulate import simulate_beads


@pytest.fixture(scope="module")
def sim():
    return simulate_beads((256, 256), 60, photons=60000.0, min_separation=25, seed=5)


@pytest.fixture(scope="module")
def traced(sim):
    """learn_operator(validate=True) with every fit_operator call recorded."""
    calls = []
    real = cvmod.fit_operator

    def spy(bp, **kw):
        calls.append((bp, kw))
        return real(bp, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(cvmod, "fit_operator", spy)
    try:
        op = learn_operator(sim["image"], validate=True, folds=3, seed=1)
    finally:
        mp.undo()
    return op, calls


def test_folds_use_the_stored_models_fit_and_options(sim, traced):
    op, calls = traced
    assert len(calls) == 3
    for _, kw in calls:
        assert kw == {"n_components": None, "eta": None, "realism": Realism("cone")}
    # each fold's training beads: all beads but that fold, in the stored model's order
    bp = bead_patches(as_image(sim["image"]))
    fold_of = fold_labels(len(bp), 3, 1)
    for f, (train, _) in enumerate(calls):
        np.testing.assert_array_equal(train.positions, bp.positions[fold_of != f])
        np.testing.assert_array_equal(train.patches.values, bp.patches.values[fold_of != f])
    # a fold that leaves no bead out reproduces the stored operator exactly
    whole = fit_operator(bp.subset(np.ones(len(bp), bool)), image=as_image(sim["image"]), **calls[0][1])
    np.testing.assert_array_equal(whole["psf_basis"].values, op["psf_basis"].values)
    np.testing.assert_array_equal(whole["coefficients"].values, op["coefficients"].values)
    np.testing.assert_array_equal(whole["cone_generators"].values, op["cone_generators"].values)


def test_validation_is_stored_with_the_model(traced):
    op, _ = traced
    cv = op.attrs["pcmx_parameters"]["cross_validation"]
    err, inv = op["cv_error"].values, op["cv_error_invariant"].values
    assert np.all(np.isfinite(err)) and np.all(np.isfinite(inv))
    assert cv["median_error"] == pytest.approx(float(np.median(err)), rel=1e-6)
    assert cv["improvement"] == pytest.approx(cv["median_error_invariant"] / cv["median_error"])
    # this field varies: the space-varying model predicts held-out beads better than the
    # flux-weighted invariant reference (measured 0.041 vs 0.089, ratio 2.21)
    assert cv["improvement"] > 1.8
    assert sorted(set(op["cv_fold"].values.tolist())) == [0, 1, 2]
    assert op["cv_bead_y"].attrs["units"] == "pixel"


def test_invariant_reference_is_flux_weighted():
    bp = bead_patches(as_image(simulate_beads((128, 128), 12, photons=20000.0, min_separation=25,
                                              seed=2)["image"]))
    ref = invariant_reference(bp)
    assert ref.sum() == pytest.approx(1.0)
    # doubling one bead's flux moves the reference towards it
    one = bp.subset(np.arange(len(bp)))
    one.patches = one.patches.copy(data=one.patches.values.copy())
    one.patches.values[0] *= 10.0
    t = heldout_targets(bp)
    d_before = np.linalg.norm(ref - t[0])
    d_after = np.linalg.norm(invariant_reference(one) - t[0])
    assert d_after < 0.8 * d_before


def test_predict_psfs_reads_the_maps_bilinearly():
    h = np.zeros((2, 3, 3))
    h[0, 1, 1] = 1.0
    h[1, 0, 0] = 1.0
    maps = np.zeros((2, 4, 4))
    maps[0] = 1.0
    maps[1] = np.arange(4.0)[None, :]  # grows with x
    p = predict_psfs(maps, h, np.array([[1.0, 1.5]]))
    # alpha = (1, 1.5): centre 1/2.5, corner 1.5/2.5
    assert p[0, 1, 1] == pytest.approx(0.4)
    assert p[0, 0, 0] == pytest.approx(0.6)


def test_cross_validate_errors(sim):
    bp = bead_patches(as_image(sim["image"]))
    with pytest.raises(InputError, match=r"^folds=1: need at least 2 folds and 2 beads per fold \(\d+ beads\)$"):
        cross_validate(bp, folds=1)
    with pytest.raises(InputError, match=r"^folds=True: need an integer of at least 2$"):
        cross_validate(bp, folds=True)
    with pytest.raises(InputError, match=r"^realism='bogus': expected one of 'cone', 'nonnegative', 'none'"):
        cross_validate(bp, realism="bogus")


def test_progress_bar_over_the_folds_only_when_asked(sim, capsys):
    import pcmx

    bp = bead_patches(as_image(sim["image"]))
    cross_validate(bp, folds=2)
    assert "cross-validation" not in capsys.readouterr().err
    with pcmx.set_options(progress=True):
        cross_validate(bp, folds=2)
    err = capsys.readouterr().err
    assert "cross-validation" in err and "2/2" in err
