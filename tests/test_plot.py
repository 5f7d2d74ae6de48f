"""pcmx.plot: each figure function returns its Figure/Axes with the expected images (Agg)."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402
from conftest import make_family, make_operator, make_operator3d  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pcmx.model import operator_dataset, psf_at  # noqa: E402
from pcmx.plot import (  # noqa: E402
    deblur_panel,
    family_states,
    field_maps,
    plot_basis,
    plot_image,
    psf_grid,
    psf_moments,
)
from pcmx.units import kernel_coords, spatial_coords  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _image_axes(fig):
    return [ax for ax in fig.axes if ax.get_images() and ax.get_label() != "<colorbar>"]


def _colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_psf_grid_tiles_in_micrometres_with_beads_and_colorbar():
    ds = make_operator(ksize=7)  # 32 x 40 px of 0.065 um
    ds = ds.assign(bead_y=("bead", [3.0, 20.0], {"units": "pixel"}),
                   bead_x=("bead", [5.0, 30.0], {"units": "pixel"}))
    fig = psf_grid(ds, n=3)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.get_images()) == 9 and len(_colorbars(fig)) == 1
    # tile (0, 0) is the PSF at the centre of the first cell, on the shared scale (no per-tile max)
    psf = np.clip(psf_at(ds, y=32 / 6 - 0.5, x=40 / 6 - 0.5, index=True).values.astype(np.float64), 0, None)
    np.testing.assert_allclose(np.asarray(ax.get_images()[0].get_array()), psf, rtol=1e-6)
    assert ax.get_images()[0].norm.vmax == pytest.approx(max(np.asarray(im.get_array()).max()
                                                              for im in ax.get_images()))
    # micrometre axes spanning the field's pixel footprints; beads drawn at their micrometres
    assert ax.get_xlim() == pytest.approx((-0.0325, 39.5 * 0.065))
    assert ax.get_ylim() == pytest.approx((31.5 * 0.065, -0.0325))
    assert ax.get_xlabel() == "x (µm)" and ax.get_ylabel() == "y (µm)"
    np.testing.assert_allclose(ax.collections[0].get_offsets(), [[5 * 0.065, 3 * 0.065], [30 * 0.065, 20 * 0.065]])
    assert len(ax.lines) == 4  # the cell boundaries
    # the same beads stored in micrometres land at the same place
    um = ds.assign(bead_y=("bead", [3 * 0.065, 20 * 0.065], {"units": "micrometer"}),
                   bead_x=("bead", [5 * 0.065, 30 * 0.065], {"units": "micrometer"}))
    np.testing.assert_allclose(psf_grid(um, n=3).axes[0].collections[0].get_offsets(),
                               ax.collections[0].get_offsets())


def test_psf_grid_common_window_and_tile_normalisation():
    small, large = make_operator(ksize=7), make_operator(ksize=11)
    fig = plt.figure()
    a, b = fig.subplots(1, 2)
    psf_grid(small, n=2, window=3 * 0.065, ax=a)
    psf_grid(large, n=2, window=3 * 0.065, ax=b)
    assert {np.asarray(im.get_array()).shape for ax in (a, b) for im in ax.get_images()} == {(7, 7)}
    padded = np.asarray(psf_grid(small, n=2, window=5 * 0.065).axes[0].get_images()[0].get_array())
    assert padded.shape == (11, 11) and padded[0].max() == 0 and padded[:, 0].max() == 0
    tiles = psf_grid(small, n=2, normalize="tile", gamma=1.0).axes[0].get_images()
    assert all(np.asarray(im.get_array()).max() == pytest.approx(1.0) for im in tiles)


def test_psf_grid_family_and_3d_and_given_axes():
    fig, ax = plt.subplots()
    assert psf_grid(make_family(), n=2, state="wet", ax=ax) is fig
    assert len(ax.get_images()) == 4 and np.asarray(ax.get_images()[0].get_array()).shape == (5, 5)
    op3 = make_operator3d()  # z=4 planes: the PSFs of the middle plane z=2, their middle kz plane
    tiles = psf_grid(op3, n=2, gamma=1.0).axes[0].get_images()
    psf = psf_at(op3, z=2, y=10 * 0.25 - 0.5, x=12 * 0.75 - 0.5, index=True).values[1]
    np.testing.assert_allclose(np.asarray(tiles[1].get_array()), np.clip(psf, 0, None), rtol=1e-6)


def test_plot_basis_operator_colorbars_and_titles():
    ds = make_operator(n_components=3)
    fig = plot_basis(ds)
    assert isinstance(fig, Figure)
    axes = _image_axes(fig)
    assert [ax.get_title() for ax in axes] == ["h_1", "h_2", "h_3", "alpha_1", "alpha_2", "alpha_3"]
    assert len(_colorbars(fig)) == 6
    np.testing.assert_array_equal(np.asarray(axes[1].get_images()[0].get_array()), ds["psf_basis"].values[1])
    assert axes[0].get_xlabel() == "x (µm)"
    assert axes[3].get_images()[0].get_extent() == pytest.approx([-0.0325, 39.5 * 0.065, 31.5 * 0.065, -0.0325])


def test_plot_basis_scales_each_map_on_its_own_range():
    """The measured case: alpha_1 spanning 0.120-0.152 drew as flat red on a scale symmetric about 0."""
    ds = make_operator(n_components=2)
    c = ds["coefficients"].values.copy()
    c[0] = np.linspace(0.120, 0.152, c[0].size).reshape(c[0].shape)
    c[1] = np.linspace(-0.01, 0.03, c[1].size).reshape(c[1].shape)
    axes = _image_axes(plot_basis(ds.assign(coefficients=(ds["coefficients"].dims, c))))
    alpha1, alpha2 = axes[2].get_images()[0], axes[3].get_images()[0]
    assert alpha1.get_clim() == pytest.approx((0.120, 0.152))
    assert alpha1.get_cmap().name == "viridis"
    assert alpha2.get_clim() == pytest.approx((-0.03, 0.03))  # changes sign: diverging about 0
    assert alpha2.get_cmap().name == "RdBu_r"
    h1 = axes[0].get_images()[0]  # a positive Gaussian: its own range
    assert h1.get_clim() == pytest.approx((ds["psf_basis"].values[0].min(), ds["psf_basis"].values[0].max()))


def test_plot_basis_family_has_empty_panels_for_fewer_modes():
    fam = make_family(n_components=3, n_modes=2)
    fig = plot_basis(fam)
    assert [ax.get_title() for ax in _image_axes(fig)] == ["h_1", "h_2", "h_3", "a_1", "a_2"]
    assert len(_colorbars(fig)) == 5
    assert sum(not ax.axison for ax in fig.axes) == 1


def test_plot_basis_3d_uses_middle_planes_and_given_figure():
    fig = plt.figure()
    ds = make_operator3d(n_components=2)
    assert plot_basis(ds, fig=fig) is fig
    axes = _image_axes(fig)
    np.testing.assert_array_equal(np.asarray(axes[0].get_images()[0].get_array()), ds["psf_basis"].values[0, 1])
    np.testing.assert_array_equal(np.asarray(axes[2].get_images()[0].get_array()), ds["coefficients"].values[0, 2])


def _gaussian_operator(sigma_y, sigma_x, theta=0.0, pixel=0.1, ksize=41, shape=(24, 30)):
    k = np.arange(ksize) - ksize // 2
    yy, xx = np.meshgrid(k, k, indexing="ij")
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * xx + s * yy, -s * xx + c * yy  # u along the axis at theta from +x towards +y
    g = np.exp(-u ** 2 / (2 * sigma_x ** 2) - v ** 2 / (2 * sigma_y ** 2))
    basis = np.stack([g / g.sum(), g / g.sum()]).astype(np.float32)
    rng = np.random.default_rng(0)
    coeffs = rng.uniform(0.2, 0.8, (2, *shape)).astype(np.float32)
    return operator_dataset(
        xr.DataArray(basis, dims=("component", "ky", "kx"), coords=kernel_coords((ksize, ksize), pixel)),
        xr.DataArray(coeffs, dims=("component", "y", "x"), coords=spatial_coords(shape, pixel)))


def test_field_maps_fwhm_matches_the_analytic_gaussian():
    op = _gaussian_operator(3.0, 3.0)
    m = psf_moments(op, 6)
    np.testing.assert_allclose(m["fwhm"].values, 2.355 * 3.0 * 0.1, rtol=0.05)
    assert float(m["ellipticity"].max()) < 0.01
    el = psf_moments(_gaussian_operator(2.0, 4.0, theta=np.radians(30)), 3)
    np.testing.assert_allclose(el["fwhm_major"].values, 2.355 * 0.4, rtol=0.05)
    np.testing.assert_allclose(el["fwhm_minor"].values, 2.355 * 0.2, rtol=0.05)
    np.testing.assert_allclose(el["ellipticity"].values, 0.5, atol=0.02)
    np.testing.assert_allclose(el["orientation"].values, 30.0, atol=1.0)
    fig = field_maps(op, 6)
    axes = _image_axes(fig)
    assert len(axes) == 3 and len(_colorbars(fig)) == 3
    np.testing.assert_allclose(np.asarray(axes[0].get_images()[0].get_array()), m["fwhm"].values)
    assert axes[0].get_title() == "PSF FWHM (µm)" and axes[0].get_xlabel() == "x (µm)"


def test_field_maps_adds_the_cross_validated_error():
    op = _gaussian_operator(3.0, 3.0).assign(
        cv_error=("cv_bead", [0.02, 0.05]), cv_error_invariant=("cv_bead", [0.04, 0.05]),
        cv_bead_y=("cv_bead", [2.0, 20.0], {"units": "pixel"}), cv_bead_x=("cv_bead", [4.0, 25.0], {"units": "pixel"}))
    fig = field_maps(op, 4)
    assert len(fig.axes) == 8  # 4 maps + 4 colorbars
    np.testing.assert_allclose(fig.axes[3].collections[0].get_offsets(), [[0.4, 0.2], [2.5, 2.0]])


def test_family_states_side_by_side():
    fam = make_family()
    fig = family_states(fam)
    axes = _image_axes(fig)
    assert len(axes) == 6 and len(_colorbars(fig)) == 1
    assert [ax.get_title() for ax in axes[:3]] == ["state dry", "state wet", "state oil"]
    centre = psf_at(fam, state="oil", y=5.5, x=7.5, index=True).values
    np.testing.assert_allclose(np.asarray(axes[2].get_images()[0].get_array()), np.clip(centre, 0, None), rtol=1e-6)
    assert len({ax.get_images()[0].norm.vmax for ax in axes}) == 1  # one colour scale


def test_deblur_panel_image_sparse_smooth_restored():
    coords = spatial_coords((20, 24), 0.1)
    rng = np.random.default_rng(0)
    field = {k: xr.DataArray(rng.uniform(0, 1, (20, 24)).astype(np.float32), dims=("y", "x"), coords=coords)
             for k in ("sparse", "smooth")}
    res = xr.Dataset({**field, "restored": field["sparse"] + field["smooth"],
                      "source_y": ("id_source", [3.0]), "source_x": ("id_source", [5.0])})
    fig = deblur_panel(res, res["restored"] * 2)
    axes = _image_axes(fig)
    assert [ax.get_title() for ax in axes] == ["image", "sparse part (sqrt, 3 px max)", "smooth part",
                                               "restoration (sparse + smooth)"]
    assert len(_colorbars(fig)) == 4
    np.testing.assert_allclose(axes[1].collections[0].get_offsets(), [[0.5, 0.3]])
    assert axes[0].get_xlabel() == "x (µm)"
    assert len(_image_axes(deblur_panel(res[["restored"]]))) == 1


def test_plot_image_contrast_and_3d():
    data = np.arange(100 * 120, dtype=np.float32).reshape(100, 120)
    fig = plot_image(xr.DataArray(data, dims=("y", "x")), title="beads")
    ax = fig.axes[0]
    assert isinstance(fig, Figure) and ax.get_title() == "beads" and len(_colorbars(fig)) == 1
    (im,) = ax.get_images()
    lo, hi = im.get_clim()
    assert lo == pytest.approx(np.percentile(data, 0.5)) and hi == pytest.approx(np.percentile(data, 99.8))
    stack = np.stack([data, 2 * data, 3 * data])
    ax3 = plot_image(stack, percentile=99).axes[0]
    np.testing.assert_array_equal(np.asarray(ax3.get_images()[0].get_array()), 2 * data)
    assert ax3.get_title() == ""


def test_plot_never_touches_the_backend():
    """The module forced Agg whenever matplotlib was not interactive: a Qt script's plt.show()
    showed nothing."""
    import ast
    import inspect

    import pcmx.plot

    calls = {node.func.attr for node in ast.walk(ast.parse(inspect.getsource(pcmx.plot)))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert not calls & {"use", "switch_backend"}
    before = matplotlib.get_backend()
    matplotlib.rcParams["interactive"] = False
    psf_grid(make_operator(), n=2)
    assert matplotlib.get_backend() == before


def test_accessor_plot_namespace():
    ds = make_operator()
    assert isinstance(ds.pcmx.plot.psf_grid(n=2), Figure)
    assert isinstance(ds.pcmx.plot.plot_basis(), Figure)
    assert isinstance(ds.pcmx.plot.field_maps(4), Figure)
    assert isinstance(make_family().pcmx.plot.family_states(), Figure)
    assert isinstance(make_family().pcmx.plot.psf_grid(2, state=0), Figure)


def test_plot_validation_maps_the_held_out_beads(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import pcmx
    from pcmx.errors import InputError
    from pcmx.plot import plot_validation
    from pcmx.simulate import simulate_beads

    image = simulate_beads((192, 192), 40, photons=30000.0, min_separation=20, seed=1)["image"]
    with warnings.catch_warnings():
        # the figure, not the model selection, is under test: keep the space-varying model
        # whatever its margin over the space-invariant reference on so few beads
        warnings.filterwarnings("ignore", message=".*cross-validation finds", category=pcmx.PcmxWarning)
        op = pcmx.learn_operator(image, validate=True, folds=3, select="space-varying")
    fig = plot_validation(op)
    ax_map, ax_hist = fig.axes[:2]
    assert len(ax_map.collections[0].get_offsets()) == op.sizes["cv_bead"]
    assert len(ax_hist.patches) == 48  # two histograms of 24 bins
    with pytest.raises(InputError, match=r"^plot_validation: the dataset has no cross-validation"):
        plot_validation(op.drop_vars(["cv_error"]))
