"""Thick samples (issue 12): beads above and below the focal plane, faint neighbours.

Two cases where simulation alone would flatter pcmx:

* semi-real (``tests/semireal.py``): the real wide-field focal plane with a third of its beads
  replaced by the same region of planes 2-6 planes (0.6-1.8 um) away, and faint copies of
  in-focus beads 7-10 px from six beads; the model learned from it, against the clean focal
  plane's beads held out, must be within 1.3x of the model learned from the clean plane;
* simulated, where the truth is known: a third of the beads of a simulated plane rendered
  0.6-1.8 um out of focus; the model's PSF error against the truth within 1.3x of the
  all-in-focus plane's.
"""

import numpy as np
import pytest
import semireal as S
from test_learn import _grid_error

from pcmx.learn import learn_operator
from pcmx.patches import bead_patches
from pcmx.simulate import simulate_beads

OPTICS = dict(pixel_size="100nm", na=1.2, n_immersion=1.33, photons=30000.0)


@pytest.mark.realdata
def test_semireal_thick_sample_learns_the_focal_plane(realdata):
    clean = S.plane(realdata, S.FOCUS)
    e_clean, _ = S.heldout_against(clean, clean)
    ratios, moved_kept = [], []
    for seed in range(5):
        thick, moved, _, det = S.thick_sample(realdata, seed=seed)
        bp = bead_patches(thick)
        near = np.linalg.norm(bp.positions[:, None] - det[moved][None], axis=2).min(axis=1) < 3
        moved_kept.append(int((near & bp.usable).sum()))
        e, _ = S.heldout_against(thick, clean)
        ratios.append(e / e_clean)
    print(f"\nclean focal plane: held-out error {e_clean:.4f}; thick sample / clean per seed: "
          f"{np.round(ratios, 2).tolist()}, median {np.median(ratios):.2f}; defocused beads kept "
          f"{moved_kept}")
    # measured 2026-12-07: 1.08, 1.14, 1.58, 1.28, 1.10 (median 1.14); without the shape tests
    # 3.82, 3.77, 3.44, 1.97, 3.57 (median 3.57). Seed 2 keeps 14 clean beads of 23: fewer beads,
    # not contamination (the clean plane's beads at the same positions give 1.40x)
    assert np.median(ratios) <= 1.3
    assert max(ratios) <= 1.75
    assert sum(moved_kept) <= 2  # of 29 defocused beads over the five seeds


def test_simulated_thick_plane_learns_the_focal_plane():
    sim = simulate_beads((256, 256), 80, min_separation=20, seed=7, **OPTICS)
    thick, clean, moved = S.simulated_thick_plane(sim, seed=7)
    e_clean, _ = _grid_error(learn_operator(clean, validate=False), sim)
    e_thick, _ = _grid_error(learn_operator(thick, validate=False), sim)
    bp = bead_patches(thick)
    print(f"\nPSF error against the truth: all in focus {e_clean:.4f}, a third out of focus "
          f"{e_thick:.4f} ({e_thick / e_clean:.2f}x); rejected {bp.counts}")
    # measured: 0.0538 vs 0.0568 (1.06x; seeds 8, 9: 1.07x, 0.99x); without shape tests 1.30x
    assert e_thick <= 1.2 * e_clean
    assert bp.counts["rejected_width"] >= 10  # of 27 moved beads, those isolated
