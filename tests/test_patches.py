"""pcmx.patches: the one bead pipeline (issue 11)."""

import numpy as np
import pytest

from pcmx.background import subtract_background
from pcmx.errors import InputError
from pcmx.io.readers import as_image
from pcmx.patches import (
    bead_patches,
    patches_at,
    pooled_radius,
    radius_profiles,
    radius_sample,
    raw_bead_patches,
)
from pcmx.simulate import simulate_beads


@pytest.fixture(scope="module")
def sim():
    return simulate_beads((192, 192), 30, photons=40000.0, min_separation=25, seed=4)


@pytest.fixture(scope="module")
def bp(sim):
    return bead_patches(as_image(sim["image"]))


def test_beads_are_found_where_the_simulator_put_them(sim, bp):
    truth = np.c_[sim["bead_y"].values, sim["bead_x"].values]
    d = np.min(np.linalg.norm(bp.positions[:, None] - truth[None], axis=2), axis=1)
    assert np.median(d) < 0.15 and d.max() < 1.0
    assert bp.counts["isolated"] == len(bp) >= 20
    assert bp.counts["detected"] >= len(bp)
    assert bp.patches.dims == ("bead", "ky", "kx")
    assert bp.patches.sizes["ky"] % 2 == 1


def test_the_stages_compose(sim, bp):
    raw, pos, det, r, work = raw_bead_patches(as_image(sim["image"]))
    np.testing.assert_array_equal(pos, bp.positions)
    assert r == bp.radius
    clean = subtract_background(raw, r, image=work, positions=pos, mask_positions=det)
    np.testing.assert_array_equal(clean.values, bp.patches.values)
    # the strongest few: the first detections of the same pipeline
    few = bead_patches(as_image(sim["image"]), max_beads=5)
    np.testing.assert_array_equal(few.positions, bp.positions[:5])


def test_patches_at_given_positions_recentre(sim, bp):
    rough = bp.positions[:6] + 0.4
    at = patches_at(as_image(sim["image"]), rough, bp.radius)
    np.testing.assert_allclose(at.positions, bp.positions[:6], atol=0.05)
    with pytest.raises(InputError, match=r"^positions: 1 of 1 point sources lie closer than the patch half side"):
        patches_at(as_image(sim["image"]), [[1.0, 1.0]], bp.radius)
    with pytest.raises(InputError, match=r"^positions: expected a finite \(P, 2\) array"):
        patches_at(as_image(sim["image"]), [[np.nan, 1.0]], bp.radius)


def test_subset_keeps_order_and_metadata(bp):
    sub = bp.subset(np.array([3, 1]))
    np.testing.assert_array_equal(sub.positions, bp.positions[[3, 1]])
    np.testing.assert_array_equal(sub.patches.values, bp.patches.values[[3, 1]])
    mask = np.zeros(len(bp), bool)
    mask[[0, 2]] = True
    assert len(bp.subset(mask)) == 2 and sub.radius == bp.radius


def test_pooled_radius_of_several_images(sim):
    infos = [radius_profiles(sim["image"].values), None]
    r, rec = pooled_radius(infos)
    assert 4 <= r <= 20
    assert rec["pooled_from_images"] == 1
    assert pooled_radius([None]) == (None, None)
    assert radius_sample(20).tolist() == [0, 2, 5, 8, 10, 13, 16, 19]
    assert radius_sample(3).tolist() == [0, 1, 2]


def test_bad_images_are_refused_with_their_cause():
    with pytest.raises(InputError, match=r"^image: image is constant \(3.0\); no beads to learn from$"):
        bead_patches(np.full((64, 64), 3.0))
    with pytest.raises(InputError, match=r"^image: image contains NaN or infinite values$"):
        bead_patches(np.full((64, 64), np.nan))
    with pytest.raises(InputError, match=r"^image: image of shape \(8, 64\) is too small to hold beads$"):
        bead_patches(np.random.default_rng(0).random((8, 64)))
