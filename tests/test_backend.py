"""pcmx._backend: one dispatch point for NumPy and CuPy, by a Dask array's chunk type."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import scipy.fft
import scipy.ndimage
import xarray as xr

import pcmx
from pcmx import _backend


def test_numpy_dask_and_dataarray_dispatch_to_numpy():
    x = np.zeros((4, 5), np.float32)
    for obj in (x, da.from_array(x, chunks=2), xr.DataArray(x, dims=("y", "x")),
                xr.DataArray(da.from_array(x, chunks=2), dims=("y", "x"))):
        assert _backend.xp(obj) is np
        assert not _backend.is_cupy(obj)
        assert _backend.fft_module(obj) is scipy.fft
        assert _backend.ndimage_module(obj) is scipy.ndimage
    assert _backend.is_dask(da.zeros(3)) and _backend.is_dask(xr.DataArray(da.zeros(3)))
    assert not _backend.is_dask(x) and not _backend.is_dask(xr.DataArray(x))


def test_chunk_type_decides_not_the_container():
    class FakeCupyArray:  # stands for cupy.ndarray: only the type's module is inspected
        __module__ = "cupy._core.core"

    class FakeDask:
        __module__ = "dask.array.core"
        dask = {}
        _meta = FakeCupyArray()

    assert _backend.is_cupy(FakeCupyArray()) and _backend.is_cupy(FakeDask())
    assert not _backend.is_cupy(da.zeros(3))


def test_fft_kwargs_and_conversions():
    # -1: the threads option, not every core of the machine
    with pcmx.set_options(threads=3):
        assert _backend.fft_kwargs(scipy.fft) == {"workers": 3}
    assert _backend.fft_kwargs(scipy.fft, 2) == {"workers": 2}
    assert _backend.fft_kwargs(scipy.fft, None) == {}
    x = np.arange(6.0)
    assert _backend.asnumpy(x) is x
    y = _backend.asarray_like([1, 2], x, dtype=np.float32)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32


@pytest.mark.gpu
@pytest.mark.skipif(not _backend.cupy_available(), reason="needs cupy and a CUDA device")
def test_cupy_dispatch():
    import cupy
    import cupyx.scipy.fft
    import cupyx.scipy.ndimage

    x = cupy.zeros((4, 5), cupy.float32)
    lazy = da.from_array(x, chunks=2, asarray=False)
    for obj in (x, lazy):
        assert _backend.xp(obj) is cupy
        assert _backend.fft_module(obj) is cupyx.scipy.fft
        assert _backend.ndimage_module(obj) is cupyx.scipy.ndimage
    assert _backend.fft_kwargs(cupyx.scipy.fft) == {}
    assert isinstance(_backend.asnumpy(x), np.ndarray)
