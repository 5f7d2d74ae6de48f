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


def make_operator3d(shape=(4, 10, 12), ksize=(3, 5, 5), n_components=2, pixel_size=(0.3, 0.1, 0.1),
                    seed=0) -> xr.Dataset:
    """A small valid 3D operator: random positive kernels, random positive maps."""
    rng = np.random.default_rng(seed)
    basis = rng.uniform(0.1, 1.0, (n_components, *ksize)).astype(np.float32)
    coeffs = rng.uniform(0.1, 1.0, (n_components, *shape)).astype(np.float32)
    psf_basis = xr.DataArray(basis, dims=("component", "kz", "ky", "kx"),
                             coords={"component": np.arange(n_components), **kernel_coords(ksize, pixel_size)})
    coefficients = xr.DataArray(coeffs, dims=("component", "z", "y", "x"),
                                coords={"component": np.arange(n_components), **spatial_coords(shape, pixel_size)})
    return operator_dataset(psf_basis, coefficients)


def make_family(shape=(12, 16), ksize=5, n_components=3, n_modes=2, states=("dry", "wet", "oil"),
                pixel_size=0.1, seed=0) -> xr.Dataset:
    """A small valid family: random basis h_i, modes a_j and one gamma_k per (labelled) state."""
    rng = np.random.default_rng(seed)
    basis = rng.uniform(0.0, 1.0, (n_components, ksize, ksize)).astype(np.float32)
    modes = rng.standard_normal((n_modes, *shape)).astype(np.float32)
    gamma = rng.standard_normal((len(states), n_components, n_modes)).astype(np.float32)
    coords = {"component": np.arange(n_components), "mode": np.arange(n_modes), "state": list(states),
              **kernel_coords((ksize, ksize), pixel_size), **spatial_coords(shape, pixel_size)}
    return xr.Dataset({"psf_basis": (("component", "ky", "kx"), basis),
                       "spatial_basis": (("mode", "y", "x"), modes),
                       "gamma": (("state", "component", "mode"), gamma)},
                      coords=coords, attrs={"pcmx_type": "family"})


@pytest.fixture
def family_ds() -> xr.Dataset:
    return make_family()


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
