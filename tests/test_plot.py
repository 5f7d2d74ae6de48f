"""pcmx.plot: each figure function returns its Figure/Axes with the expected images (Agg)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402
from conftest import make_family, make_operator, make_operator3d  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pcmx.model import psf_at  # noqa: E402
from pcmx.plot import plot_basis, plot_image, psf_grid  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_psf_grid_operator_mosaic():
    ds = make_operator(ksize=7)
    ax = psf_grid(ds, n=3)
    assert isinstance(ax, Axes)
    (im,) = ax.get_images()
    mosaic = np.asarray(im.get_array())
    assert mosaic.shape == (21, 21)
    # tile (row 0, col 0) is the PSF at the first of the n interior grid points, max-normalised
    ny, nx = ds.sizes["y"], ds.sizes["x"]
    y, x = np.linspace(0, ny - 1, 5)[1], np.linspace(0, nx - 1, 5)[1]
    psf = np.clip(psf_at(ds, y=y, x=x, index=True).values.astype(np.float64), 0, None)
    np.testing.assert_allclose(mosaic[:7, :7], (psf / psf.max()) ** 0.5, rtol=1e-6)
    for i in range(3):
        for j in range(3):
            assert mosaic[7 * i:7 * i + 7, 7 * j:7 * j + 7].max() == pytest.approx(1.0)
    assert ax.get_title() == "PSFs on a 3x3 grid over the field"
    assert len(ax.lines) == 4  # 2 horizontal + 2 vertical separators


def test_psf_grid_family_and_3d_and_given_axes():
    fig, ax = plt.subplots()
    assert psf_grid(make_family(), n=2, state="wet", ax=ax) is ax
    assert np.asarray(ax.get_images()[0].get_array()).shape == (10, 10)  # 2 tiles of 5
    op3 = make_operator3d()  # z=4 planes: the PSFs of the middle plane z=2, their middle kz plane
    mosaic = np.asarray(psf_grid(op3, n=2, gamma=1.0).get_images()[0].get_array())
    assert mosaic.shape == (10, 10)
    y, x = np.linspace(0, 9, 4)[1], np.linspace(0, 11, 4)[2]
    psf = psf_at(op3, z=2, y=y, x=x, index=True).values[1].astype(np.float64)
    np.testing.assert_allclose(mosaic[:5, 5:], psf / psf.max(), rtol=1e-6)
    assert len(fig.axes) == 1


def test_plot_basis_operator():
    ds = make_operator(n_components=3)
    fig = plot_basis(ds)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 6
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 6
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["h_1", "h_2", "h_3", "alpha_1", "alpha_2", "alpha_3"]
    np.testing.assert_array_equal(np.asarray(fig.axes[1].get_images()[0].get_array()), ds["psf_basis"].values[1])


def test_plot_basis_family_has_empty_panels_for_fewer_modes():
    fam = make_family(n_components=3, n_modes=2)
    fig = plot_basis(fam)
    assert len(fig.axes) == 6
    assert [len(ax.get_images()) for ax in fig.axes] == [1, 1, 1, 1, 1, 0]
    assert [ax.get_title() for ax in fig.axes][3:5] == ["a_1", "a_2"]


def test_plot_basis_3d_uses_middle_planes_and_given_figure():
    fig = plt.figure()
    ds = make_operator3d(n_components=2)
    assert plot_basis(ds, fig=fig) is fig
    assert len(fig.axes) == 4
    np.testing.assert_array_equal(np.asarray(fig.axes[0].get_images()[0].get_array()),
                                  ds["psf_basis"].values[0, 1])
    np.testing.assert_array_equal(np.asarray(fig.axes[2].get_images()[0].get_array()),
                                  ds["coefficients"].values[0, 2])


def test_plot_image_contrast_and_3d():
    data = np.arange(100 * 120, dtype=np.float32).reshape(100, 120)
    ax = plot_image(xr.DataArray(data, dims=("y", "x")), title="beads")
    assert isinstance(ax, Axes) and ax.get_title() == "beads"
    (im,) = ax.get_images()
    lo, hi = im.get_clim()
    assert lo == pytest.approx(np.percentile(data, 0.5)) and hi == pytest.approx(np.percentile(data, 99.8))
    stack = np.stack([data, 2 * data, 3 * data])
    ax3 = plot_image(stack, percentile=99)
    np.testing.assert_array_equal(np.asarray(ax3.get_images()[0].get_array()), 2 * data)
    assert ax3.get_title() == ""


def test_plot_validation_maps_the_held_out_beads(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import pcmx
    from pcmx.errors import InputError
    from pcmx.plot import plot_validation
    from pcmx.simulate import simulate_beads

    op = pcmx.learn_operator(simulate_beads((192, 192), 40, photons=30000.0, min_separation=20,
                                            seed=1)["image"], validate=True, folds=3)
    fig = plot_validation(op)
    ax_map, ax_hist = fig.axes[:2]
    assert len(ax_map.collections[0].get_offsets()) == op.sizes["cv_bead"]
    assert len(ax_hist.patches) == 48  # two histograms of 24 bins
    with pytest.raises(InputError, match=r"^plot_validation: the dataset has no cross-validation"):
        plot_validation(op.drop_vars(["cv_error"]))
