"""The paper's Fig. 10 experiment made quantitative, blind: Sparse+Smooth deblurring (BSS) with
the operator *identified* in a learned family from the scene's own point sources, against the
three baselines (given the same identified operator, and, as a harder reference, the true
operator) and against itself with PSFs 2x too small or too
large, scored by source detection (F1 within 1.5 px, localisation RMSE) against the
simulator's truth. BSS with the true operator is kept as a reference row."""

import numpy as np
import pytest

import pcmx
from pcmx.deblur import dirac_comb_distance, identify_operator, sparse_smooth
from pcmx.deblur.baselines import fista_haar, richardson_lucy_tv, scale_operator, tikhonov
from pcmx.deblur.metrics import score_restoration
from pcmx.family import learn_family
from pcmx.model import family_operator
from pcmx.simulate import simulate_beads, simulate_point_sources, true_operator

# each baseline's weight from a small grid around its usual value, the best F1 kept (the
# comparison is tuned in the baselines' favour, and they get the TRUE operator; BSS runs with
# its defaults from the noise and the identified operator)
GRIDS = {
    "tikhonov": (tikhonov, {}, [1e-3, 1e-2, 1e-1]),
    "richardson_lucy_tv": (richardson_lucy_tv, {"n_iter": 100}, [5e-4, 2e-3, 1e-2]),
    "fista_haar": (fista_haar, {"n_iter": 100}, [1.0, 4.0, 16.0]),
}
SEED = 10  # the scene's seed: its microscope (field model) is the seed's "field" stream
# the family's training acquisitions of the same microscope: defocus (um) and aberration drift
# around the scene's state (defocus 0, aberration scale 1), which is held out (the design of
# tests/test_deblur.py with the scene's state removed from the training set)
TRAIN = [{"defocus": d, "aberration_scale": s}
         for d, s in [(-0.3, 0.9), (-0.15, 1.1), (0.15, 0.9), (0.3, 1.1)]]
# The operators' boundary, the same for every method. The simulator renders sources inside
# the field only (nothing beyond it), so "zero" is its exact model for the point sources; the
# entry points' default "reflect" (a mirror image beyond the field, right for real images whose
# scene goes on beyond the field) measured one source fewer for blind BSS (F1 0.938, RMSE
# 0.319 px), then tied with RL-TV given the same operator, and 0.966 / 0.240 px with the true one
# (measured with Sparse+Smooth's former settings, before issue 15's block steps and tol 1e-4).
BOUNDARY = "zero"
# the table as measured (F1, RMSE px); test_table holds every row to it within two sources.
# Sparse+Smooth rows re-measured after its block step sizes and tol 1e-4 (issue 15, item 4;
# before: blind 0.947 / 0.340, x0.5 0.852 / 0.504, x2 0.870 / 0.547, true 0.966 / 0.264)
MEASURED = {
    "bss_blind": (0.966, 0.345), "bss_psf_x0.5": (0.822, 0.533), "bss_psf_x2": (0.870, 0.556),
    "bss_true_op": (0.974, 0.262),
    "tikhonov (true op)": (0.919, 0.333), "richardson_lucy_tv (true op)": (0.947, 0.289),
    "fista_haar (true op)": (0.780, 0.564),
    "tikhonov (identified)": (0.930, 0.346), "richardson_lucy_tv (identified)": (0.938, 0.301),
    "fista_haar (identified)": (0.806, 0.558),
}


@pytest.fixture(scope="module")
def scene():
    """256 x 256, 60 sources on 20 filaments, 16 with a neighbour closer than the FWHM
    (3.5 px), smooth background (30 photons, +-50%), Poisson noise, the exact space-varying
    pupil model of the simulator (each source its own PSF at its sub-pixel position). Seed 10:
    its closest sources are 1.56 px apart, so every source can be told apart within the 1.5 px
    tolerance."""
    sc = simulate_point_sources((256, 256), n_sources=60, n_filaments=20, pairs_closer_than_psf=6,
                                seed=SEED)
    ty, tx = sc["source_y"].values, sc["source_x"].values
    d = np.hypot(ty[:, None] - ty[None], tx[:, None] - tx[None]) + np.eye(len(ty)) * 1e9
    assert d.min() > 1.5 and (d.min(axis=1) < sc.attrs["pair_fwhm_px"]).sum() >= 12
    op = true_operator(sc, n_components=4, kernel_size=21, grid=8)
    return {"sc": sc, "op": op, "H": pcmx.ProductConvolution(op, boundary=BOUNDARY), "ty": ty, "tx": tx}


@pytest.fixture(scope="module")
def family(scene):
    """A family learned from bead images of the scene's microscope under four other states."""
    sim = simulate_beads((256, 256), 45, states=TRAIN, photons=40000.0, min_separation=24, seed=SEED)
    sc = scene["sc"]
    # same microscope, and the scene's state is not one of the training states
    assert sim.attrs["field_model"] == sc.attrs["field_model"]
    assert sim.attrs["optics"] == sc.attrs["optics"]
    assert sc.attrs["states"][0] not in sim.attrs["states"]
    return learn_family(sim["image"], n_components=4)


@pytest.fixture(scope="module")
def identified(scene, family):
    """The scene's operator identified in the family from the scene's own isolated sources."""
    ident = identify_operator(scene["sc"]["image"], family)
    k = family.sizes["ky"]
    truth = true_operator(scene["sc"], n_components=8, kernel_size=k)
    dist = dirac_comb_distance(ident, truth, 16)
    nearest = min(dirac_comb_distance(family_operator(family, state=s), truth, 16)
                  for s in range(family.sizes["state"]))
    print(f"\nidentified from {len(ident.positions)} sources (family: {family.sizes['mode']} modes, "
          f"{family.sizes['state']} states), residual {ident.residual:.3f}, weights "
          f"{np.round(ident.weights.values, 3).tolist()}; distance to the truth {dist:.3f} "
          f"(nearest training state {nearest:.3f})")
    assert len(ident.positions) >= family.sizes["mode"]
    return ident


@pytest.fixture(scope="module")
def bss(scene, identified):
    """BSS (default weights) with the identified operator, with it dilated x0.5 and x2
    (``scale_operator`` of the identified operator), and with the true operator (reference)."""
    out = {}
    runs = {"bss_blind": identified.operator, "bss_psf_x0.5": scale_operator(identified.operator, 0.5),
            "bss_psf_x2": scale_operator(identified.operator, 2.0), "bss_true_op": scene["H"]}
    for name, op in runs.items():
        H = op if isinstance(op, pcmx.ProductConvolution) else pcmx.ProductConvolution(op, boundary=BOUNDARY)
        res = sparse_smooth(scene["sc"]["image"], H)
        out[name] = score_restoration(res["sparse"], scene["ty"], scene["tx"])
    return out


def _best_of_grid(scene, H):
    out = {}
    for name, (fn, kw, lams) in GRIDS.items():
        scores = [score_restoration(fn(scene["sc"]["image"], H, lam=lam, **kw),
                                    scene["ty"], scene["tx"]) | {"lam": lam} for lam in lams]
        out[name] = max(scores, key=lambda m: (m["f1"], -m["rmse"]))
    return out


@pytest.fixture(scope="module")
def baselines(scene):
    """The baselines with the TRUE operator (more than blind BSS knows)."""
    return _best_of_grid(scene, scene["H"])


@pytest.fixture(scope="module")
def baselines_blind(scene, identified):
    """The baselines with the same identified operator as blind BSS (same knowledge)."""
    return _best_of_grid(scene, pcmx.ProductConvolution(identified.operator, boundary=BOUNDARY))


def _show(name, m):
    print(f"{name:20s} F1 {m['f1']:.3f}  RMSE {m['rmse']:.3f} px  found {m['n_found']}/{m['n_true']}"
          f"  threshold {m['relative']}" + (f"  lam {m['lam']}" if "lam" in m else ""))


def test_table(bss, baselines, baselines_blind):
    """The whole table against its measured values: F1 within 0.025 (one source of 60 moves it
    by about 0.01), RMSE within 15%, and the ranking it shows."""
    table = {**bss, **{f"{k} (true op)": v for k, v in baselines.items()},
             **{f"{k} (identified)": v for k, v in baselines_blind.items()}}
    print()
    for name, m in table.items():
        _show(name, m)
    assert set(table) == set(MEASURED)
    for name, (f1, rmse) in MEASURED.items():
        assert table[name]["f1"] == pytest.approx(f1, abs=0.025), name
        assert table[name]["rmse"] == pytest.approx(rmse, rel=0.15), name
    f1 = {k: m["f1"] for k, m in table.items()}
    # BSS with the true operator first, FISTA-Haar last (with either operator), the wrong PSFs
    # between FISTA-Haar and the baselines with the right operator
    assert max(f1, key=f1.get) == "bss_true_op"
    assert min(f1, key=f1.get) == "fista_haar (true op)"
    assert f1["fista_haar (identified)"] < min(f1["bss_psf_x0.5"], f1["bss_psf_x2"])
    assert max(f1["bss_psf_x0.5"], f1["bss_psf_x2"]) < min(
        f1[f"{k} ({o})"] for k in ("tikhonov", "richardson_lucy_tv") for o in ("true op", "identified"))


def test_blind_bss_finds_the_sources(bss):
    m = bss["bss_blind"]
    _show("bss_blind", m)
    assert m["f1"] >= 0.9
    assert m["rmse"] < 0.4


def test_bss_with_the_true_operator_finds_the_sources(bss):
    m = bss["bss_true_op"]
    _show("bss_true_op", m)
    assert m["f1"] >= 0.9
    assert m["rmse"] < 0.35


@pytest.mark.parametrize("name", list(GRIDS))
def test_blind_bss_beats_each_baseline_with_the_same_operator(bss, baselines_blind, name):
    """Same knowledge: every method deblurs with the operator identified in the family.
    Measured: BSS 0.966 vs Tikhonov 0.930, RL-TV 0.938 (two sources more), FISTA-Haar 0.806;
    RL-TV localises better (0.301 vs 0.345 px), so only F1 is asserted."""
    m, b = bss["bss_blind"], baselines_blind[name]
    _show("bss_blind", m)
    _show(name, b)
    assert m["f1"] > b["f1"]


@pytest.mark.parametrize("name", list(GRIDS))
def test_blind_bss_is_not_worse_than_any_baseline(bss, baselines, name):
    """Even against the baselines given the TRUE operator, blind BSS is not behind on F1
    (RL-TV, the closest: 54/60 sources against BSS's 56/60)."""
    assert bss["bss_blind"]["f1"] >= baselines[name]["f1"]


@pytest.mark.parametrize("name", list(GRIDS))
def test_bss_with_the_true_operator_beats_each_baseline(bss, baselines, name):
    m, b = bss["bss_true_op"], baselines[name]
    assert m["f1"] > b["f1"]
    assert m["rmse"] < b["rmse"]


@pytest.mark.parametrize("name", ["bss_psf_x0.5", "bss_psf_x2"])
def test_blind_bss_beats_itself_with_a_wrong_psf(bss, name):
    m, w = bss["bss_blind"], bss[name]
    _show(name, w)
    assert m["f1"] > w["f1"] + 0.05
    assert m["rmse"] < 0.7 * w["rmse"]
