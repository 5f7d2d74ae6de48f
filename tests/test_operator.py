"""ProductConvolution: exactness against a per-pixel reference, adjoints, tiling, kinds, errors."""

from __future__ import annotations

import math

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.signal
import tifffile
import xarray as xr

import pcmx
from pcmx import _backend
from pcmx.cli import main
from pcmx.errors import PcmxError
from pcmx.operator import ProductConvolution, blur
from pcmx.testing import dottest
from pcmx.units import kernel_coords, spatial_coords

SPATIAL = {2: ("y", "x"), 3: ("z", "y", "x")}
KERNEL = {2: ("ky", "kx"), 3: ("kz", "ky", "kx")}


def make_op(shape=(19, 23), ksize=(7, 5), n=3, seed=0, pixel_size=0.1, positive=False):
    """A random operator: arbitrary (signed) kernels, smooth positive maps."""
    rng = np.random.default_rng(seed)
    d = len(shape)
    h = rng.standard_normal((n, *ksize)).astype(np.float32)
    if positive:
        h = np.abs(h)
        h /= h.sum(axis=tuple(range(1, d + 1)), keepdims=True)
    grids = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    a = np.stack([1 + sum(rng.uniform(-0.5, 0.5) * g for g in grids) for _ in range(n)])
    a = (a / n).astype(np.float32)
    coords = {"component": np.arange(n), **kernel_coords(ksize, pixel_size, KERNEL[d]),
              **spatial_coords(shape, pixel_size, SPATIAL[d])}
    return xr.Dataset({"psf_basis": (("component", *KERNEL[d]), h),
                       "coefficients": (("component", *SPATIAL[d]), a)},
                      coords=coords, attrs={"pcmx_type": "operator"})


def dense_matrix(ds, boundary="zero"):
    """H as a dense matrix, column by column: the PSF of each source pixel (paper eq. S)."""
    h = ds["psf_basis"].values.astype(np.float64)
    a = ds["coefficients"].values.astype(np.float64)
    shape, ksize = a.shape[1:], h.shape[1:]
    r = [k // 2 for k in ksize]
    if boundary == "reflect":
        # a source at an extended pixel q is the mirror of pixel m(q) of the image
        ext = [n + 2 * rr for n, rr in zip(shape, r, strict=True)]
        mirror = [np.pad(np.arange(n), rr, mode="symmetric") for n, rr in zip(shape, r, strict=True)]
        a = np.pad(a, [(0, 0)] + [(rr, rr) for rr in r], mode="symmetric")
        offset = r
    elif boundary == "periodic":
        # a source at pixel q lights (q + d) mod n for every kernel offset d
        size = int(np.prod(shape))
        mat = np.zeros((size, size))
        for q in np.ndindex(*shape):
            psf = np.tensordot(a[(slice(None), *q)], h, axes=1)
            for d in np.ndindex(*ksize):
                dst = tuple((qi + di - rr) % n for qi, di, rr, n in zip(q, d, r, shape, strict=True))
                mat[np.ravel_multi_index(dst, shape), np.ravel_multi_index(q, shape)] += psf[d]
        return mat
    else:
        ext, mirror, offset = list(shape), [np.arange(n) for n in shape], [0] * len(shape)
    size = int(np.prod(shape))
    mat = np.zeros((size, size))
    for q in np.ndindex(*ext):
        psf = np.tensordot(a[(slice(None), *q)], h, axes=1)  # image of a unit source at q
        canvas = np.zeros([e + 2 * rr for e, rr in zip(ext, r, strict=True)])
        canvas[tuple(slice(qi, qi + k) for qi, k in zip(q, ksize, strict=True))] = psf
        window = canvas[tuple(slice(rr + o, rr + o + n) for rr, o, n in zip(r, offset, shape, strict=True))]
        src = np.ravel_multi_index(tuple(m[qi] for m, qi in zip(mirror, q, strict=True)), shape)
        mat[:, src] += window.ravel()
    return mat


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- exactness --------------------------------------------------------------------------------
@pytest.mark.parametrize("boundary", ["zero", "reflect", "periodic"])
@pytest.mark.parametrize("shape,ksize", [((13, 17), (7, 5)), ((5, 9, 8), (3, 5, 3))])
def test_apply_and_adjoint_equal_the_per_pixel_sum(shape, ksize, boundary):
    ds = make_op(shape, ksize)
    mat = dense_matrix(ds, boundary)
    H = ProductConvolution(ds, boundary=boundary)
    rng = np.random.default_rng(1)
    u = rng.standard_normal(shape).astype(np.float32)
    got = H.apply(u)
    assert got.dtype == np.float32 and got.shape == shape
    assert rel(got, (mat @ u.ravel().astype(np.float64)).reshape(shape)) < 2e-6
    assert rel(H.adjoint(u), (mat.T @ u.ravel().astype(np.float64)).reshape(shape)) < 2e-6


@pytest.mark.parametrize("boundary", ["zero", "reflect"])
@pytest.mark.parametrize("shape,ksize", [((40, 36), (9, 7)), ((5, 34, 20), (3, 5, 3))])
def test_threaded_tiles_equal_the_per_pixel_sum(shape, ksize, boundary, monkeypatch):
    """The multi-core in-memory path (one tile per thread) on images small enough to check."""
    monkeypatch.setattr("pcmx.operator._MIN_THREADED_PIXELS", 0)
    ds = make_op(shape, ksize)
    mat = dense_matrix(ds, boundary)
    H = ProductConvolution(ds, boundary=boundary, workers=3)
    assert math.prod(-(-n // t) for n, t in zip(shape, H._plan_tiles(shape, 3, math.inf), strict=True)) >= 2
    u = np.random.default_rng(11).standard_normal(shape).astype(np.float32)
    assert rel(H.apply(u), (mat @ u.ravel().astype(np.float64)).reshape(shape)) < 2e-6
    assert rel(H.adjoint(u), (mat.T @ u.ravel().astype(np.float64)).reshape(shape)) < 2e-6
    dottest(H, shape, rng=4)


def test_kernel_wider_than_the_image():
    ds = make_op((6, 9), (15, 21), n=2)
    u = np.random.default_rng(2).standard_normal((6, 9)).astype(np.float32)
    mat = dense_matrix(ds)
    H = ProductConvolution(ds)
    assert rel(H.apply(u), (mat @ u.ravel()).reshape(6, 9)) < 2e-6
    assert rel(H.adjoint(u), (mat.T @ u.ravel()).reshape(6, 9)) < 2e-6


def test_space_invariant_operator_is_an_ordinary_convolution():
    rng = np.random.default_rng(3)
    ds = make_op((40, 52), (9, 13), n=2)
    weights = np.array([0.7, -0.4], np.float32)
    ds["coefficients"][:] = weights[:, None, None]
    u = rng.random((40, 52)).astype(np.float32)
    kernel = np.tensordot(weights, ds["psf_basis"].values, axes=1)
    expected = scipy.signal.fftconvolve(u.astype(np.float64), kernel, mode="same")
    assert rel(ProductConvolution(ds).apply(u), expected) < 1e-6
    # the adjoint is the correlation with the same kernel
    expected_t = scipy.signal.correlate(u.astype(np.float64), kernel, mode="same", method="fft")
    assert rel(ProductConvolution(ds).adjoint(u), expected_t) < 1e-6


def test_linearity_and_dtypes():
    ds = make_op((24, 20), (5, 5))
    H = ProductConvolution(ds)
    rng = np.random.default_rng(4)
    u, w = rng.standard_normal((2, 24, 20)).astype(np.float32)
    combo = H.apply(2.5 * u - 1.5 * w)
    assert rel(combo, 2.5 * H.apply(u) - 1.5 * H.apply(w)) < 1e-5
    assert H.apply(u.astype(np.float64)).dtype == np.float64
    assert rel(H.apply(u.astype(np.float64)), H.apply(u)) < 1e-5
    counts = rng.integers(0, 4000, (24, 20)).astype(np.uint16)
    out = H.apply(counts)
    assert out.dtype == np.float32
    assert rel(out, H.apply(counts.astype(np.float32))) < 1e-6
    assert H.adjoint(u).dtype == np.float32


def test_psf_at_is_the_response_to_a_point_source():
    ds = make_op((21, 25), (7, 9))
    H = ProductConvolution(ds)
    delta = np.zeros((21, 25), np.float32)
    delta[10, 12] = 1
    window = H.apply(delta)[10 - 3:10 + 4, 12 - 4:12 + 5]
    psf = H.psf_at(10, 12)
    assert psf.shape == (7, 9) and psf.dtype == np.float32
    assert rel(window, psf) < 1e-5
    np.testing.assert_allclose(psf, ds.pcmx.psf_at(y=1.0, x=1.2).values, rtol=1e-5, atol=1e-7)
    with pytest.raises(PcmxError, match=r"psf_at: x=25 is not a pixel index in \[0, 25\)"):
        H.psf_at(0, 25)


# --- adjoint (dot tests) -----------------------------------------------------------------------
@pytest.mark.parametrize("boundary", ["zero", "reflect", "periodic"])
@pytest.mark.parametrize("shape,ksize,chunks", [
    ((45, 38), (9, 7), None),
    ((45, 38), (9, 7), (11, 17)),
    ((45, 38), (9, 7), ((7, 20, 18), (13, 25))),
    ((11, 30, 26), (5, 7, 7), None),
    ((11, 30, 26), (5, 7, 7), (4, 11, 9)),
])
def test_dot_test(shape, ksize, chunks, boundary):
    H = ProductConvolution(make_op(shape, ksize), boundary=boundary)
    a, b = dottest(H, shape, rtol=1e-5, rng=0, chunks=chunks)
    assert abs(a) > 1.0  # a meaningful inner product


def test_dottest_catches_a_wrong_adjoint():
    H = ProductConvolution(make_op((20, 24), (5, 7)))

    class Wrong:
        apply = H.apply
        adjoint = H.apply  # the kernels are not symmetric: this is not H^T

    with pytest.raises(AssertionError, match=r"<H u, v> = .* but <u, H\^T v> = "):
        dottest(Wrong(), (20, 24), rng=1)


def test_linear_operator_and_norm():
    ds = make_op((12, 14), (5, 5))
    H = ProductConvolution(ds)
    L = H.as_linear_operator()
    assert L.shape == (168, 168)
    dottest(L, 168, rng=2)
    exact = np.linalg.norm(dense_matrix(ds), 2)
    assert abs(H.norm_estimate(rtol=1e-7, n_iter=500) - exact) < 1e-3 * exact


# --- tiled (Dask) == in memory -------------------------------------------------------------------
@pytest.mark.parametrize("maps", ["memory", "lazy"])
@pytest.mark.parametrize("boundary", ["zero", "reflect", "periodic"])
@pytest.mark.parametrize("shape,ksize,chunks", [
    ((53, 47), (11, 9), (13, 19)),
    ((53, 47), (11, 9), ((5, 30, 18), (40, 7))),  # chunks narrower than the halo get merged
    ((53, 47), (11, 9), "auto"),
    ((9, 33, 29), (5, 9, 7), (4, 10, 13)),
])
def test_tiled_equals_in_memory(shape, ksize, chunks, boundary, maps):
    ds = make_op(shape, ksize)
    H = ProductConvolution(ds, boundary=boundary)
    if maps == "lazy":  # maps read chunk by chunk (as from a store), not as views
        H = ProductConvolution(ds.chunk({d: 8 for d in SPATIAL[len(shape)]}), boundary=boundary)
    rng = np.random.default_rng(5)
    u = rng.standard_normal(shape).astype(np.float32)
    lazy = da.from_array(u, chunks=chunks if chunks != "auto" else -1)
    out = H.apply(lazy, chunks="auto" if chunks == "auto" else None)
    assert isinstance(out, da.Array) and out.dtype == np.float32
    assert rel(out.compute(), H.apply(u)) < 1e-5
    back = H.adjoint(lazy)
    assert rel(back.compute(), H.adjoint(u)) < 1e-5
    assert rel(H.apply(u, chunks=chunks), H.apply(u)) < 1e-5  # NumPy in, tiled, NumPy out


def test_operator_from_a_store_is_lazy_and_tiles(tmp_path):
    ds = make_op((40, 36), (7, 7))
    path = tmp_path / "op.zarr"
    pcmx.save_store(ds, path)
    H = ProductConvolution(path)
    assert _backend.is_dask(H.dataset["coefficients"])
    u = np.random.default_rng(6).random((40, 36)).astype(np.float32)
    expected = ProductConvolution(ds).apply(u)
    assert rel(H.apply(u), expected) < 1e-6
    with dask.config.set(scheduler="threads"):
        assert rel(H.apply(da.from_array(u, chunks=(15, 11))).compute(), expected) < 1e-5


def test_auto_chunks_fit_the_budget():
    H = ProductConvolution(make_op((300, 260), (21, 31), n=2), check_finite=False)
    chunks = H.auto_chunks(target_elements=120 * 120)
    assert all(1 <= c <= n for c, n in zip(chunks, H.shape, strict=True))
    assert (chunks[0] + 20) * (chunks[1] + 30) <= 2 * 120 * 120  # halving, then a fast length


# --- kinds: DataArray, accessor, family ---------------------------------------------------------
def test_dataarray_in_dataarray_out_keeps_coords():
    ds = make_op((16, 18), (5, 5), pixel_size=0.065)
    u = xr.DataArray(np.random.default_rng(7).random((16, 18)).astype(np.float32), dims=("y", "x"),
                     coords=spatial_coords((16, 18), 0.065), name="beads", attrs={"source": "a.tif"})
    H = ProductConvolution(ds)
    out = H.apply(u)
    assert isinstance(out, xr.DataArray) and out.dtype == np.float32
    assert out.name == "beads" and out.attrs == {"source": "a.tif"}
    xr.testing.assert_identical(out.coords.to_dataset(), u.coords.to_dataset())
    np.testing.assert_array_equal(out.values, H.apply(u.values))
    assert rel(u.pcmx.blur(ds).values, out.values) < 1e-7
    assert rel(ds.pcmx.blur(u).values, out.values) < 1e-7
    assert rel(blur(u, H).values, out.values) < 1e-7
    lazy = H.adjoint(u.chunk({"y": 7, "x": 9}))
    assert isinstance(lazy.data, da.Array)
    assert rel(lazy.values, H.adjoint(u.values)) < 1e-5
    with pytest.raises(PcmxError, match=r"u: pixel size along y is 0\.1 um but the operator's is 0\.065 um"):
        H.apply(u.assign_coords(spatial_coords((16, 18), 0.1)))
    with pytest.raises(PcmxError, match=r"u: dims \('x', 'y'\), expected \('y', 'x'\)"):
        H.apply(u.transpose())


def test_from_family_state_and_gamma():
    rng = np.random.default_rng(8)
    shape, n_modes = (20, 22), 2
    op = make_op(shape, (5, 7), n=3)
    spatial = rng.random((n_modes, *shape)).astype(np.float32)
    gamma = rng.random((4, 3, n_modes)).astype(np.float32)
    family = xr.Dataset({"psf_basis": op["psf_basis"],
                         "spatial_basis": (("mode", "y", "x"), spatial),
                         "gamma": (("state", "component", "mode"), gamma)},
                        attrs={"pcmx_type": "family"})
    u = rng.random(shape).astype(np.float32)
    for k in (0, 3):
        direct = op.copy()
        direct["coefficients"] = (("component", "y", "x"), np.einsum("ij,jyx->iyx", gamma[k], spatial))
        expected = ProductConvolution(direct).apply(u)
        assert rel(ProductConvolution.from_family(family, state=k).apply(u), expected) < 1e-6
    mix = 0.5 * gamma[1] + 0.5 * gamma[2]
    direct["coefficients"] = (("component", "y", "x"), np.einsum("ij,jyx->iyx", mix, spatial))
    assert rel(ProductConvolution.from_family(family, gamma=mix).apply(u),
               ProductConvolution(direct).apply(u)) < 1e-6
    with pytest.raises(PcmxError, match="operator: got a family; use ProductConvolution.from_family"):
        ProductConvolution(family)


# --- boundaries ----------------------------------------------------------------------------------
def test_reflect_keeps_a_flat_field_flat():
    ds = make_op((30, 34), (9, 9), n=2, positive=True)
    ds["coefficients"][:] = 0.5  # maps summing to one: the PSF has unit mass everywhere
    flat = np.ones((30, 34), np.float32)
    np.testing.assert_allclose(ProductConvolution(ds, boundary="reflect").apply(flat), 1.0, rtol=1e-5)
    zero = ProductConvolution(ds, boundary="zero").apply(flat)
    assert zero[15, 17] == pytest.approx(1.0, rel=1e-5) and zero[0, 0] < 0.5  # dark corners


def test_periodic_space_invariant_is_a_circular_convolution():
    ds = make_op((24, 30), (9, 7), n=2)
    weights = np.array([0.6, 0.3], np.float32)
    ds["coefficients"][:] = weights[:, None, None]
    u = np.random.default_rng(12).random((24, 30)).astype(np.float32)
    kernel = np.tensordot(weights, ds["psf_basis"].values, axes=1).astype(np.float64)
    import scipy.ndimage

    expected = scipy.ndimage.convolve(u.astype(np.float64), kernel, mode="wrap")
    assert rel(ProductConvolution(ds, boundary="periodic").apply(u), expected) < 2e-6
    # light leaving one side comes back on the other: the total flux is kept exactly
    flux = ProductConvolution(ds, boundary="periodic").apply(u).sum()
    assert flux == pytest.approx(u.sum() * kernel.sum(), rel=1e-5)


# --- errors --------------------------------------------------------------------------------------
def test_bad_operators_are_rejected_with_their_cause():
    ds = make_op()
    with pytest.raises(PcmxError, match=r"psf_basis: kernel size ky=6 is even"):
        ProductConvolution(ds.isel(ky=slice(0, 6)))
    with pytest.raises(PcmxError, match=r"coefficients: dims \('component', 'x', 'y'\) do not match"):
        ProductConvolution(ds.assign(coefficients=ds["coefficients"].transpose("component", "x", "y")))
    bad = ds.copy(deep=True)
    bad["coefficients"][1, 2, 3] = np.nan
    bad["coefficients"][0, 0, 0] = np.inf
    with pytest.raises(PcmxError, match=r"coefficients: 2 non-finite values \(NaN or inf\)"):
        ProductConvolution(bad)
    with pytest.raises(PcmxError, match=r"operator: missing variable 'psf_basis'"):
        ProductConvolution(ds.drop_vars("psf_basis"))
    with pytest.raises(PcmxError, match=r"boundary='wrap': expected one of \('zero', 'reflect', 'periodic'\)"):
        ProductConvolution(ds, boundary="wrap")
    with pytest.raises(PcmxError, match=r"operator: expected an operator Dataset or a store path, got ndarray"):
        ProductConvolution(np.zeros((3, 5, 5)))
    with pytest.raises(PcmxError, match=r"boundary='reflect': kernel radius 10 along y exceeds the image size 6"):
        ProductConvolution(make_op((6, 9), (21, 3)), boundary="reflect")
    with pytest.raises(PcmxError, match=r"boundary='periodic': kernel size 7 along y exceeds the image size 6"):
        ProductConvolution(make_op((6, 9), (7, 3)), boundary="periodic")
    H = ProductConvolution(ds)
    with pytest.raises(PcmxError, match=r"u: shape \(19, 24\) does not match the operator's grid \(y=19, x=23\)"):
        H.apply(np.zeros((19, 24), np.float32))
    with pytest.raises(PcmxError, match="no such store"):
        ProductConvolution("missing.zarr")


# --- command line --------------------------------------------------------------------------------
def test_cli_apply_writes_float32_tiff_with_pixel_size(tmp_path, capsys):
    ds = make_op((30, 28), (7, 7), pixel_size=0.065)
    pcmx.save_store(ds, tmp_path / "op.zarr")
    image = np.random.default_rng(9).integers(0, 1000, (30, 28)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", image, imagej=True, resolution=(1 / 0.065, 1 / 0.065),
                     metadata={"unit": "um"})
    args = ["apply", str(tmp_path / "op.zarr"), str(tmp_path / "in.tif"), "--output", str(tmp_path / "out.tif")]
    assert main(args) == 0
    out = pcmx.read_image(tmp_path / "out.tif")
    assert out.dtype == np.float32
    assert pcmx.units.pixel_size(out, "x") == pytest.approx(0.065, rel=1e-6)
    assert rel(out.values, ProductConvolution(ds).apply(image)) < 1e-6
    capsys.readouterr()
    assert main(args) == 2
    assert f"pcmx apply: error: --output {tmp_path / 'out.tif'}: already exists; use --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--boundary", "reflect"]) == 0
    assert rel(tifffile.imread(tmp_path / "out.tif"), ProductConvolution(ds, boundary="reflect").apply(image)) < 1e-6
    tifffile.imwrite(tmp_path / "small.tif", image[:20])
    assert main(["apply", str(tmp_path / "op.zarr"), str(tmp_path / "small.tif"), "-o", str(tmp_path / "o2.tif")]) == 2
    assert "image shape (20, 28) does not match the operator's grid (30, 28)" in capsys.readouterr().err


# --- GPU -----------------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not _backend.cupy_available(), reason="needs cupy and a CUDA device")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("boundary", ["zero", "reflect"])
def test_cupy_matches_numpy(boundary):
    import cupy

    ds = make_op((40, 44), (9, 7))
    H = ProductConvolution(ds, boundary=boundary)
    u = np.random.default_rng(10).standard_normal((40, 44)).astype(np.float32)
    out = H.apply(cupy.asarray(u))
    assert isinstance(out, cupy.ndarray) and out.dtype == np.float32
    assert rel(out.get(), H.apply(u)) < 1e-5
    assert rel(H.adjoint(cupy.asarray(u)).get(), H.adjoint(u)) < 1e-5
    lazy = da.from_array(cupy.asarray(u), chunks=(13, 17), asarray=False)
    tiled = H.apply(lazy)
    assert _backend.is_cupy(tiled)
    assert rel(tiled.compute().get(), H.apply(u)) < 1e-5
    dottest(H, (40, 44), rng=3, chunks=(13, 17))
