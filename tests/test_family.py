"""learn_family on simulated states (paper II-D): structure, schema, accuracy vs truth."""

import numpy as np
import pytest

import pcmx
from pcmx.errors import InputError
from pcmx.family import learn_family, rank_by_threshold
from pcmx.simulate import simulate_beads, true_psfs


@pytest.fixture(scope="module")
def sim():
    return simulate_beads((256, 256), 45, states=4, photons=40000.0, min_separation=24, seed=11)


@pytest.fixture(scope="module")
def family(sim):
    return learn_family(sim["image"], n_components=4, n_modes=4)


def test_family_store_layout_and_round_trip(family, tmp_path):
    pcmx.validate(family)
    assert family["gamma"].dims == ("state", "component", "mode")
    assert family.sizes["state"] == 4
    pcmx.save_store(family, tmp_path / "fam.zarr")
    back = pcmx.open_store(tmp_path / "fam.zarr", kind="family")
    np.testing.assert_allclose(back["gamma"].values, family["gamma"].values)
    # spatial modes are orthonormal (they are right singular vectors of the maps)
    a = family["spatial_basis"].values.reshape(family.sizes["mode"], -1).astype(np.float64)
    np.testing.assert_allclose(a @ a.T, np.eye(len(a)), atol=1e-4)
    # normalised gammas sum to one (II-E-a)
    np.testing.assert_allclose(family["gamma_normalised"].sum(("component", "mode")).values, 1, rtol=1e-5)


def test_family_psfs_match_truth(sim, family):
    ys, xs = np.meshgrid(np.linspace(40, 215, 4), np.linspace(40, 215, 4), indexing="ij")
    ys, xs = ys.ravel(), xs.ravel()
    k = family.sizes["ky"]
    errors = []
    for s in range(4):
        coeffs = family.pcmx.coefficients(state=s).values[:, ys.astype(int), xs.astype(int)]
        pred = np.einsum("im,ijk->mjk", coeffs, family["psf_basis"].values)
        pred /= pred.sum(axis=(1, 2), keepdims=True)
        true = true_psfs(sim, ys.astype(int), xs.astype(int), state=s, size=k)
        true /= true.sum(axis=(1, 2), keepdims=True)
        errors.append(np.median(np.linalg.norm((pred - true).reshape(len(ys), -1), axis=1)
                                / np.linalg.norm(true.reshape(len(ys), -1), axis=1)))
    print("median PSF error per state:", np.round(errors, 3))
    assert max(errors) < 0.35


def test_rank_rule_and_errors():
    assert rank_by_threshold([100, 50, 1, 1, 1, 1, 1]) == 2
    with pytest.raises(InputError, match="at least 2 images"):
        learn_family([np.zeros((32, 32))])


def test_learn_family_cli(sim, tmp_path, capsys):
    from pcmx.cli import main
    from pcmx.commands.simulate import write_tiff

    for k in range(3):
        write_tiff(str(tmp_path / f"s{k}.tif"), sim["image"].isel(state=k).values, 0.065)
    out = tmp_path / "fam.zarr"
    assert main(["learn-family", str(tmp_path / "s*.tif"), "-o", str(out), "--components", "3", "--modes", "2"]) == 0
    fam = pcmx.open_store(out, kind="family")
    assert list(fam["state"].values) == ["s0.tif", "s1.tif", "s2.tif"]
    assert fam.sizes["mode"] == 2 and "K=3 states" in capsys.readouterr().out
    assert main(["learn-family", str(tmp_path / "nothing*.tif"), "-o", str(tmp_path / "f2.zarr")]) == 2
