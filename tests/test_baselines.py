"""Tests of pcmx.deblur.metrics and pcmx.deblur.baselines."""

from __future__ import annotations

import numpy as np
import pytest

from pcmx.deblur.metrics import find_sources, match_sources
from pcmx.errors import InputError

# ---------------------------------------------------------------- metrics


def _gauss_image(ys, xs, amps, shape=(64, 64), sigma=1.2):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    img = np.zeros(shape)
    for y, x, a in zip(ys, xs, amps):
        img += a * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma ** 2))
    return img.astype(np.float32)


def test_find_sources_subpixel_and_threshold():
    ys = np.array([10.3, 30.0, 50.6, 20.0])
    xs = np.array([12.0, 40.7, 20.2, 55.0])
    amps = np.array([10.0, 8.0, 12.0, 0.5])  # the last below 10% of the max: dropped
    img = _gauss_image(ys, xs, amps)
    y, x = find_sources(img)
    assert len(y) == 3
    order = np.argsort(y)
    np.testing.assert_allclose(y[order], ys[:3][np.argsort(ys[:3])], atol=0.25)
    np.testing.assert_allclose(x[order], xs[:3][np.argsort(ys[:3])], atol=0.25)
    # an explicit threshold keeps the faint one too
    y, x = find_sources(img, threshold=0.1)
    assert len(y) == 4


def test_find_sources_plateau_border_and_min_distance():
    a = np.zeros((20, 20), np.float32)
    a[5, 5:7] = 1.0  # a two-pixel plateau: one source, centroid between the pixels
    a[0, 10] = 1.0   # on the border: excluded by default
    a[12, 12] = 1.0
    a[12, 14] = 0.9  # 2 px from a larger maximum: merged with min_distance=2
    y, x = find_sources(a, threshold=0.5)
    assert len(y) == 3
    i = np.argmin(np.hypot(y - 5, x - 5.5))
    assert (y[i], x[i]) == (5.0, 5.5)
    assert len(find_sources(a, threshold=0.5, exclude_border=0)[0]) == 4
    assert len(find_sources(a, threshold=0.5, min_distance=2)[0]) == 2
    assert len(find_sources(np.zeros((8, 8)))[0]) == 0


def test_find_sources_bad_input():
    a = np.zeros((8, 8))
    a[3, 3] = np.nan
    with pytest.raises(InputError, match="u has 1 non-finite"):
        find_sources(a)
    with pytest.raises(InputError, match="u must be a 2D image"):
        find_sources(np.zeros(5))


def test_match_sources_exact_counts():
    true_y, true_x = np.array([10.0, 20.0, 30.0, 40.0]), np.array([10.0, 20.0, 30.0, 40.0])
    # one exact, one 1 px off, one 2 px off (beyond tol), one false positive, one missed
    est_y, est_x = np.array([10.0, 21.0, 32.0, 5.0]), np.array([10.0, 20.0, 30.0, 50.0])
    m = match_sources(est_y, est_x, true_y, true_x, tol=1.5)
    assert (m["n_true"], m["n_found"], m["n_matched"]) == (4, 4, 2)
    assert m["precision"] == m["recall"] == m["f1"] == 0.5
    assert m["rmse"] == pytest.approx(np.sqrt(0.5))


def test_match_sources_is_optimal_one_to_one():
    # a greedy nearest-first match would pair est 0 with true 1 (distance 0.5) and lose one
    true_y, true_x = np.array([0.0, 0.0]), np.array([0.0, 1.4])
    est_y, est_x = np.array([0.0, 0.0]), np.array([0.9, 2.5])
    m = match_sources(est_y, est_x, true_y, true_x, tol=1.2)
    assert m["n_matched"] == 2
    assert m["rmse"] == pytest.approx(np.sqrt((0.9 ** 2 + 1.1 ** 2) / 2))
    # two estimates on one true source: one match only
    m = match_sources([5.0, 5.2], [5.0, 5.0], [5.0], [5.0])
    assert (m["n_matched"], m["precision"], m["recall"]) == (1, 0.5, 1.0)
    assert m["f1"] == pytest.approx(2 / 3)


def test_match_sources_empty_and_errors():
    m = match_sources([], [], [1.0], [1.0])
    assert (m["f1"], m["recall"], m["n_matched"]) == (0.0, 0.0, 0)
    assert np.isnan(m["rmse"])
    assert match_sources([], [], [], [])["f1"] == 1.0
    with pytest.raises(InputError, match="est_y and est_x differ in length"):
        match_sources([1.0, 2.0], [1.0], [1.0], [1.0])
    with pytest.raises(InputError, match="tol must be a positive"):
        match_sources([1.0], [1.0], [1.0], [1.0], tol=0)
