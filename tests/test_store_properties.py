"""Hypothesis round trips of operator stores: save_store then open_store gives back the Dataset.

Random 2D/3D shapes, odd kernel sizes, float32/float64 values (subnormals and signs included),
in-memory or dask-chunked variables, pixel sizes in micrometers, nanometers or pixels, and
free-text parameters: values (bit for bit), dims, dtypes, coords, units attrs, the caller's
attrs and the dask chunking survive; a second round trip changes nothing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pcmx

SPATIAL = ("z", "y", "x")
KERNEL = ("kz", "ky", "kx")
UNITS = ("micrometer", "nanometer", "pixel")


def _values(draw, shape, dtype):
    width = 32 if dtype == np.float32 else 64
    return draw(hnp.arrays(dtype, shape, elements=st.floats(-1e6, 1e6, width=width, allow_subnormal=True)))


def _axis(n, step, units, centred):
    idx = np.arange(n, dtype=np.float64) - (n // 2 if centred else 0)
    return idx * (1.0 if units == "pixel" else step), {"units": units}


@st.composite
def operators(draw):
    ndim = draw(st.sampled_from([2, 3]))
    sdims, kdims = SPATIAL[-ndim:], KERNEL[-ndim:]
    shape = tuple(draw(st.integers(1, 4) if d == "z" else st.integers(2, 13)) for d in sdims)
    ksize = tuple(draw(st.sampled_from([1, 3, 5])) for _ in sdims)
    n = draw(st.integers(1, 3))
    steps = [draw(st.floats(0.01, 500.0)) for _ in sdims]
    units = [draw(st.sampled_from(UNITS)) for _ in sdims]
    basis_dtype, coeff_dtype = (draw(st.sampled_from([np.float32, np.float64])) for _ in range(2))
    coords = {"component": np.arange(n)}
    for d, kd, s, k, step, u in zip(sdims, kdims, shape, ksize, steps, units, strict=True):
        coords[d] = (d, *_axis(s, step, u, centred=False))
        coords[kd] = (kd, *_axis(k, step, u, centred=True))
    ds = xr.Dataset(
        {"psf_basis": (("component", *kdims), _values(draw, (n, *ksize), basis_dtype)),
         "coefficients": (("component", *sdims), _values(draw, (n, *shape), coeff_dtype))},
        coords=coords,
        attrs={"pcmx_type": "operator",
               "pcmx_parameters": {"note": draw(st.text(max_size=8)), "n": n, "steps": steps}},
    )
    if draw(st.booleans()):  # dask-chunked, irregular last chunks included
        ds = ds.chunk({d: draw(st.integers(1, s)) for d, s in zip(sdims, shape, strict=True)})
    return ds


def _assert_round_trip(ds: xr.Dataset, back: xr.Dataset) -> None:
    assert set(back.data_vars) == set(ds.data_vars)
    assert set(back.coords) == set(ds.coords)
    for name, var in {**ds.data_vars, **ds.coords}.items():
        got = back[name]
        assert got.dims == var.dims, name
        assert got.dtype == var.dtype, name
        assert got.attrs == var.attrs, name
        np.testing.assert_array_equal(got.values, var.values, err_msg=name, strict=True)
    for name, var in ds.data_vars.items():
        assert isinstance(back[name].data, da.Array)  # opened lazily
        if var.chunks is not None:
            assert back[name].chunks == var.chunks, name
    for key, value in ds.attrs.items():
        assert back.attrs[key] == value, key
    for key in ("pcmx_schema_version", "pcmx_version", "pcmx_created", "pcmx_inputs"):
        assert key in back.attrs


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ds=operators())
def test_operator_store_round_trip(ds):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "op.zarr"
        assert pcmx.save_store(ds, path) == str(path)
        back = pcmx.open_store(path, kind="operator")
        _assert_round_trip(ds, back)
        again = pcmx.save_store(back, Path(tmp) / "again.zarr")
        xr.testing.assert_identical(pcmx.open_store(again).compute(), back.compute())
