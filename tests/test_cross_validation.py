"""Cross-validation fits every fold exactly as learn_operator fits the stored model (issue 11)."""

import warnings

import numpy as np
import pytest
import scipy.ndimage as ndi

import pcmx.cross_validation as cvmod
from pcmx.cross_validation import (
    cross_validate,
    fold_labels,
    heldout_targets,
    invariant_reference,
    predict_psfs,
    select_model,
)
from pcmx.errors import InputError
from pcmx.fit import Realism, fit_basis, fit_operator
from pcmx.io.readers import PcmxWarning, as_image
from pcmx.io.store import describe_store
from pcmx.learn import learn_operator
from pcmx.patches import bead_patches
from pcmx.simulate import simulate_beads
from pcmx.units import to_pixels


@pytest.fixture(scope="module")
def sim():
    return simulate_beads((256, 256), 60, photons=60000.0, min_separation=25, seed=5)


@pytest.fixture(scope="module")
def traced(sim):
    """learn_operator(validate=True, select="space-varying") with every fold's fit recorded."""
    calls = []
    real = cvmod.fit_operator

    def spy(bp, **kw):
        calls.append((bp, kw))
        return real(bp, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(cvmod, "fit_operator", spy)
    try:
        op = learn_operator(sim["image"], validate=True, folds=3, seed=1, select="space-varying")
    finally:
        mp.undo()
    return op, calls


@pytest.fixture(scope="module")
def selected(sim):
    """learn_operator with the default model selection, and its warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PcmxWarning)
        op = learn_operator(sim["image"], validate=True, folds=3, seed=1)
    return op, [str(w.message) for w in caught]


def test_folds_use_the_stored_models_fit_and_options(sim, traced):
    op, calls = traced
    assert len(calls) == 3
    bp = bead_patches(as_image(sim["image"]))
    fold_of = fold_labels(len(bp), 3, 1)
    # the folds run on the thread pool: each call is matched to its fold by its held-out beads
    order = [int(np.flatnonzero(np.all(bp.positions == kw["at"][0], axis=1))[0]) for _, kw in calls]
    assert sorted(fold_of[order].tolist()) == [0, 1, 2]
    for f, (train, kw) in zip(fold_of[order], calls, strict=True):
        # the stored model's options, read at the fold's held-out beads, on the fold's own PCA
        at, basis = kw.pop("at"), kw.pop("basis")
        assert kw == {"n_components": None, "eta": None, "realism": Realism("cone"), "eta_scale": 1.0,
                      "generators": None}
        np.testing.assert_array_equal(at, bp.positions[fold_of == f])
        # each fold's training beads: all beads but that fold, in the stored model's order
        np.testing.assert_array_equal(train.positions, bp.positions[fold_of != f])
        np.testing.assert_array_equal(train.patches.values, bp.patches.values[fold_of != f])
        np.testing.assert_array_equal(basis["psf_basis"].values, fit_basis(train)["psf_basis"].values)
    # a fold that leaves no bead out reproduces the stored operator exactly
    img = as_image(sim["image"])
    whole = fit_operator(bp.subset(np.ones(len(bp), bool)), image=img)
    np.testing.assert_array_equal(whole["psf_basis"].values, op["psf_basis"].values)
    np.testing.assert_array_equal(whole["coefficients"].values, op["coefficients"].values)
    np.testing.assert_array_equal(whole["cone_generators"].values, op["cone_generators"].values)
    # and read at points, the fit gives the stored maps' PSFs there within the lattice's
    # tolerance (3e-3 of the PSF with a projection; measured 2.5e-4)
    pts = bp.positions
    at = fit_operator(bp, at=pts)
    h = at["psf_basis"].values.astype(np.float64)
    exact = np.tensordot(at["heldout_coefficients"].values, h, axes=1)
    lattice = np.tensordot(np.stack([ndi.map_coordinates(c.astype(np.float64), pts.T, order=1)
                                     for c in op["coefficients"].values], axis=1), h, axes=1)
    rel = np.linalg.norm((exact - lattice).reshape(len(pts), -1), axis=1) / np.linalg.norm(
        lattice.reshape(len(pts), -1), axis=1)
    print(f"\nat points vs the lattice: relative PSF difference median {np.median(rel):.1e}, "
          f"max {rel.max():.1e}")
    # measured: median 1.6e-4, max 2.8e-3 (the lattice's tolerance, 3e-3, is met at its sampled
    # pixels; a held-out error is 0.04 or more)
    assert np.median(rel) < 1e-3 and rel.max() < 5e-3


def test_validation_is_stored_with_the_model(sim, traced):
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
    # the held-out beads in the image's units (the simulation's 65 nm pixels: micrometres),
    # read back in pixels with to_pixels
    assert op["cv_bead_y"].attrs["units"] == "micrometer" == op["cv_bead_x"].attrs["units"]
    back = to_pixels(op, y=op["cv_bead_y"].values, x=op["cv_bead_x"].values)
    held = bead_patches(as_image(sim["image"])).usable_beads().positions
    np.testing.assert_allclose(np.stack([back["y"], back["x"]], axis=1), held, atol=1e-9)
    sel = op.attrs["pcmx_parameters"]["model_selection"]
    assert sel["select"] == "space-varying" and sel["chosen"] == "automatic"
    assert set(sel["median_error"]) == {"automatic", "space-invariant"}


def test_model_selection_among_candidates(sim, selected):
    op, caught = selected
    sel = op.attrs["pcmx_parameters"]["model_selection"]
    names = ["automatic", "fewer components", "smoother", "non-negative", "no realism", "space-invariant"]
    assert op["candidate"].values.tolist() == names
    # every candidate's held-out errors on the same beads, their medians in the record
    for n in names:
        assert sel["median_error"][n] == pytest.approx(
            float(np.median(op["cv_error_candidates"].sel(candidate=n).values)), rel=1e-6)
    print("\n" + ", ".join(f"{n} {sel['median_error'][n]:.4f} (+{sel['paired_difference'][n]:.4f} "
                           f"+- {sel['standard_error'][n]:.4f})" for n in names) + f": {sel['chosen']}")
    # measured: automatic 0.0402, fewer components (I = 4 of 8) 0.0536, smoother 0.0401,
    # non-negative 0.0396, no realism 0.0396, space-invariant 0.0874; the non-negative one
    # beats the automatic fit (the cone) by 0.0003, within its standard error 0.0005: the
    # automatic fit is kept
    assert sel["chosen"] == "automatic" and sel["best"] == "non-negative"
    assert sel["median_error"]["space-invariant"] > 2 * sel["median_error"]["automatic"]
    assert sel["median_error"]["fewer components"] > 1.2 * sel["median_error"]["automatic"]
    # the rule: the chosen one within one standard error of the best, every simpler one not
    assert sel["paired_difference"]["automatic"] <= sel["standard_error"]["automatic"]
    for n in ("space-invariant", "fewer components"):
        assert sel["paired_difference"][n] > sel["standard_error"][n]
    np.testing.assert_array_equal(op["cv_error"].values,
                                  op["cv_error_candidates"].sel(candidate="automatic").values)
    assert not caught
    assert "stored model: automatic" in describe_store(op)


def test_a_chosen_candidate_is_refitted_on_all_beads(sim, monkeypatch):
    """The stored model is the chosen candidate fitted on all beads exactly as its folds were."""
    import pcmx.learn as learn_mod

    def smoother(errors, **kw):
        return {**cvmod.select_model(errors, **kw), "chosen": "smoother"}

    monkeypatch.setattr(learn_mod, "select_model", smoother)
    op = learn_operator(sim["image"], validate=True, folds=3, seed=1)
    par = op.attrs["pcmx_parameters"]
    assert par["model_selection"]["chosen"] == "smoother" and par["eta_scale"] == 4.0
    img = as_image(sim["image"])
    bp = bead_patches(img)
    auto = fit_operator(bp, image=img)
    ref = fit_operator(bp, image=img, eta_scale=4.0)
    np.testing.assert_array_equal(op["coefficients"].values, ref["coefficients"].values)
    np.testing.assert_allclose(par["eta"], 4 * np.asarray(auto.attrs["pcmx_parameters"]["eta"]), rtol=1e-9)
    np.testing.assert_array_equal(op["cv_error"].values,
                                  op["cv_error_candidates"].sel(candidate="smoother").values)
    assert par["cross_validation"]["model"] == "smoother"


def test_space_invariant_field_stores_the_invariant_model_and_warns():
    # no aberration: one PSF over the field, so no space-varying candidate beats the reference
    sim = simulate_beads((256, 256), 60, photons=20000.0, min_separation=25, seed=5,
                         aberration_strength=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PcmxWarning)
        op = learn_operator(sim["image"], folds=3, seed=1)
    sel = op.attrs["pcmx_parameters"]["model_selection"]
    # measured: automatic (I = 1) 0.04344, space-invariant 0.04338
    assert sel["chosen"] == "space-invariant" and op.sizes["component"] == 1
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "stored the space-invariant model" in msgs[0]
    assert f"{sel['median_error']['automatic']:.3f} vs {sel['median_error']['space-invariant']:.3f}" in msgs[0]
    cv = op.attrs["pcmx_parameters"]["cross_validation"]
    assert cv["model"] == "space-invariant" and cv["improvement"] == 1.0


def test_select_model_one_standard_error_rule():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.05, 0.15, 400)
    noise = rng.normal(0, 0.01, 400)
    # a more complex model better by far less than the noise: the simpler one is kept
    rec = select_model({"space-invariant": base, "automatic": base - 0.0005 + noise})
    assert rec["chosen"] == "space-invariant"
    # better by much more than the noise: chosen
    rec = select_model({"space-invariant": base, "automatic": base - 0.02 + noise})
    assert rec["chosen"] == "automatic" and rec["best"] == "automatic"
    assert rec["paired_difference"]["space-invariant"] > rec["standard_error"]["space-invariant"]
    # a checked-only candidate is measured, never chosen, never the best
    rec = select_model({"space-invariant": base, "automatic": base - 0.02, "no realism": base - 0.05})
    assert rec["chosen"] == rec["best"] == "automatic"
    assert rec["paired_difference"]["no realism"] < 0
    # the same errors and seed: the same figures
    assert select_model({"a": base, "automatic": base + noise}) == select_model(
        {"a": base, "automatic": base + noise})


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
