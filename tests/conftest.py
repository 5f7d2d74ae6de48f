"""Shared fixtures: small seeded operators and the real data location."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from pcmx.model import operator_dataset
from pcmx.units import kernel_coords, spatial_coords

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "widefield-bead-zstack"


def make_operator(shape=(32, 40), ksize=7, n_components=3, pixel_size=0.065, seed=0) -> xr.Dataset:
    """A small valid operator: Gaussian-ish basis and smooth random coefficient maps."""
    rng = np.random.default_rng(seed)
    k = np.arange(ksize) - ksize // 2
    r2 = k[:, None] ** 2 + k[None, :] ** 2
    basis = np.stack([np.exp(-r2 / (2 * (1 + i) ** 2)) for i in range(n_components)]).astype(np.float32)
    basis /= basis.sum(axis=(1, 2), keepdims=True)
    yy, xx = np.meshgrid(np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1]), indexing="ij")
    coeffs = np.stack([1 + 0.3 * rng.standard_normal() * yy + 0.2 * xx for _ in range(n_components)])
    coeffs = (coeffs / n_components).astype(np.float32)
    psf_basis = xr.DataArray(basis, dims=("component", "ky", "kx"),
                             coords={"component": np.arange(n_components), **kernel_coords((ksize, ksize), pixel_size)})
    coefficients = xr.DataArray(coeffs, dims=("component", "y", "x"),
                                coords={"component": np.arange(n_components), **spatial_coords(shape, pixel_size)})
    return operator_dataset(psf_basis, coefficients)


@pytest.fixture
def operator_ds() -> xr.Dataset:
    return make_operator()


@pytest.fixture
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"real data not available ({REALDATA} is absent, as in a user's clone)")
    return REALDATA


@pytest.fixture(autouse=True)
def _no_cwd_litter(tmp_path, monkeypatch):
    """Tests run in their own temporary directory."""
    monkeypatch.chdir(tmp_path)
    os.environ.setdefault("MPLBACKEND", "Agg")
