"""Subtracting each bead's neighbours with the current model (pcmx.neighbours, issue 12 item 7)."""

import numpy as np
import pytest
import xarray as xr

from pcmx.beads import bump_multiplier
from pcmx.errors import InputError
from pcmx.neighbours import model_kernels, neighbour_passes, subtract_neighbours
from pcmx.patches import patches_at

R, HALF = 6, 8
KS = (2 * HALF + 1,) * 2
SHAPE = (96, 96)
FAINT, BRIGHT = np.array([48.3, 47.6]), np.array([48.9, 57.2])


def _gauss(shape, centre, sigma=2.0):
    y, x = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    g = np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / (2 * sigma * sigma))
    return g / g.sum()


def _kernel():
    k = _gauss(KS, (HALF, HALF)) * bump_multiplier(KS, R)
    return k / k.sum()


def _operator():
    """A one-component, space-invariant operator holding the true (bumped) PSF."""
    return xr.Dataset({"psf_basis": (("component", "ky", "kx"), _kernel()[None].astype(np.float32)),
                       "coefficients": (("component", "y", "x"), np.ones((1, *SHAPE), np.float32))})


def _error(patch):
    p = patch * bump_multiplier(KS, R)
    p = p / p.sum()
    t = _kernel()
    return float(np.linalg.norm(p - t) / np.linalg.norm(t))


def test_a_bright_neighbour_is_subtracted_from_a_faint_beads_patch():
    # a faint bead (20000 photons) 9.6 px from one ten times brighter: the bright one's wing
    # fills the faint bead's patch; Poisson noise over a background of 100
    rng = np.random.default_rng(0)
    alone = 100.0 + 20000.0 * _gauss(SHAPE, FAINT)
    img = rng.poisson(alone + 200000.0 * _gauss(SHAPE, BRIGHT)).astype(np.float32)
    bp = patches_at(img, [FAINT], R)
    before = _error(bp.patches.values[0])
    clean, info = subtract_neighbours(bp, _operator(), img, detections=np.stack([FAINT, BRIGHT]),
                                      halo=False, return_info=True)
    after = _error(clean.patches.values[0])
    # the same bead with no neighbour, through the same steps: the noise's own error
    ref = _error(patches_at(rng.poisson(alone).astype(np.float32), [FAINT], R).patches.values[0])
    print(f"faint bead's PSF error: {before:.3f} with its neighbour, {after:.3f} after "
          f"subtraction, {ref:.3f} alone")
    # measured 0.784 -> 0.059, alone 0.054
    assert before > 0.6
    assert after < 0.08 and after < 1.3 * ref
    assert info["detections"] == 2 and info["pairs"] == 1
    np.testing.assert_array_equal(clean.positions, bp.positions)
    assert clean.patches.dims == bp.patches.dims


def test_model_kernels_read_the_maps_at_the_positions():
    op = _operator()
    op["coefficients"][:] = np.linspace(1, 2, SHAPE[1], dtype=np.float32)[None, None, :]
    k = model_kernels(op, np.array([[10.0, 0.0], [10.0, 95.0], [3.0, 47.5]]))
    np.testing.assert_allclose(k.sum(axis=(1, 2)), [1.0, 2.0, 1.5], rtol=1e-5)


def test_neighbour_passes():
    assert neighbour_passes("auto", 3) == 1 and neighbour_passes("auto", 2) == 0
    assert neighbour_passes(2, 2) == 2 and neighbour_passes(0, 3) == 0
    for bad in (-1, True, "two", 1.5):
        with pytest.raises(InputError, match=r"^neighbours="):
            neighbour_passes(bad, 3)
