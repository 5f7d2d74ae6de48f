"""Learn a family of operators from K acquisitions (paper II-D, II-E).

Steps (II-D-b): bead patches of every image (:func:`pcmx.learn.bead_patches`); one PCA over
all patches with z-score rejection and a second PCA (the shared PSF basis h_i,
:func:`pcmx.psf_basis.fit_psf_basis`); per image the coefficient maps alpha_{i,k} by weighted
thin-plate splines projected onto the cone of all observed coefficients
(:func:`pcmx.coefficients.coefficient_maps`); an SVD of the K*I maps to J spatial modes a_j;
``gamma_k[i, j] = <alpha_{i,k}, a_j>``; the unit-sum normalised gammas generate the cone of
admissible operators (II-E-a).

The maps are written chunked to a Zarr scratch array and the SVD streams over it: with K*I in
the hundreds, the exact route through the (K*I)^2 Gram matrix ``A A^T`` accumulated chunk by
chunk (one pass for the Gram matrix, one for the modes) reads every map twice and loses nothing
to the float32 power iterations of a randomized SVD, so it is the one used here; the
randomized ``dask.array.linalg.svd_compressed`` would only pay off for K*I in the thousands.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import dask.array as da
import numpy as np
import xarray as xr

from .errors import InputError
from .io.readers import as_image
from .provenance import provenance
from .units import kernel_coords, pixel_size

__all__ = ["learn_family", "rank_by_threshold"]


def rank_by_threshold(singular_values, factor: float = 2.858) -> int:
    """Number of singular values above ``factor * median`` (II-E-c; Gavish & Donoho)."""
    s = np.asarray(singular_values, dtype=np.float64)
    return max(1, int(np.sum(s > factor * np.median(s))))


def _labels(images) -> list[str]:
    out = []
    for k, im in enumerate(images):
        if isinstance(im, (str, os.PathLike)):
            out.append(os.path.basename(os.fspath(im)))
        elif isinstance(im, xr.DataArray) and "source" in im.attrs:
            out.append(str(im.attrs["source"]))
        else:
            out.append(f"state{k}")
    return out


def learn_family(images, *, n_components: int | None = None, n_modes: int | None = None,
                 psf_radius: int | None = None, pixel_size_: str | None = None,
                 background: str | None = None, realism: bool = True,
                 scratch: str | None = None, chunk: int = 512) -> xr.Dataset:
    """Learn the family of a microscope's operators from K bead images (paper II-D).

    Parameters
    ----------
    images : sequence of paths/arrays/DataArrays, or a DataArray with a ``state`` dim
        K 2D bead images on the same grid, taken under varying conditions.
    n_components : int, optional
        I; the 2.858 * median rule on the patches' singular values when None.
    n_modes : int, optional
        J; the 2.858 * median rule on the maps' singular values when None (at most K*I).
    psf_radius : int, optional
        r, shared by all images (patches must have one size); estimated on the first image.
    scratch : str, optional
        Directory for the Zarr scratch of the maps (a temporary directory by default).

    Returns
    -------
    Dataset
        ``psf_basis (component, ky, kx)``, ``spatial_basis (mode, y, x)``,
        ``gamma (state, component, mode)`` (coefficients of state k =
        ``einsum("ij,jyx->iyx", gamma[k], spatial_basis)``), ``gamma_normalised`` (unit sum,
        the cone's generators, II-E-a), ``map_singular_values``, ``patch_singular_values``,
        per-state bead counts.
    """
    from .coefficients import coefficient_maps
    from .cone import reduce_cone
    from .learn import bead_patches
    from .psf_basis import fit_psf_basis

    if isinstance(images, xr.DataArray) and "state" in images.dims:
        labels = [str(v) for v in images["state"].values] if "state" in images.coords else None
        images = [images.isel(state=k) for k in range(images.sizes["state"])]
    else:
        images = list(images)
        labels = None
    if len(images) < 2:
        raise InputError(f"a family needs at least 2 images, got {len(images)}")
    labels = labels or _labels(images)
    t = {}
    t0 = time.perf_counter()
    imgs = [as_image(im, pixel_size=pixel_size_) for im in images]
    shape = imgs[0].shape
    for lab, im in zip(labels, imgs):
        if im.shape != shape:
            raise InputError(f"{lab}: shape {im.shape} differs from {shape} of {labels[0]}")
    bps = []
    r = psf_radius
    for lab, im in zip(labels, imgs):
        try:
            bp = bead_patches(im, psf_radius=r, background=background)
        except InputError as exc:
            raise InputError(f"{lab}: {exc}") from None
        r = bp.radius
        bps.append(bp)
    t["beads"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    patches = xr.concat([bp.patches for bp in bps], dim="bead")
    owner = np.concatenate([np.full(len(bp.positions), k) for k, bp in enumerate(bps)])
    positions = np.concatenate([bp.positions for bp in bps])
    basis = fit_psf_basis(patches, n_components, r=r)
    kept = np.asarray(basis["kept"].values, dtype=bool)
    h = np.asarray(basis["psf_basis"].values, dtype=np.float32)
    beta = np.asarray(basis["beta"].values, dtype=np.float64)
    owner, positions = owner[kept], positions[kept]
    n_i = h.shape[0]
    t["psf_basis"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    generators = reduce_cone(beta, psf_basis=h) if realism else None
    own_dir = scratch is None
    scratch = scratch or tempfile.mkdtemp(prefix="pcmx-family-")
    path = os.path.join(scratch, "maps.zarr")
    k_count = len(imgs)
    maps_store = None
    try:
        import zarr

        maps_store = zarr.create_array(path, shape=(k_count * n_i, *shape), dtype="float32",
                                       chunks=(n_i, min(chunk, shape[0]), min(chunk, shape[1])),
                                       overwrite=True)
        for k in range(k_count):
            sel = owner == k
            if sel.sum() < 4:
                raise InputError(f"{labels[k]}: only {int(sel.sum())} usable beads; at least 4 are "
                                 "needed for its coefficient maps")
            maps_store[k * n_i:(k + 1) * n_i] = coefficient_maps(positions[sel], beta[sel], shape,
                                                                 generators=generators)
        t["coefficients"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        a = da.from_zarr(maps_store).reshape(k_count * n_i, -1).astype(np.float64)
        gram = (a @ a.T).compute()
        evals, evecs = np.linalg.eigh(gram)
        order = np.argsort(evals)[::-1]
        evals, evecs = np.clip(evals[order], 0, None), evecs[:, order]
        sv = np.sqrt(evals)
        j = n_modes or min(rank_by_threshold(sv), k_count * n_i)
        if j > k_count * n_i:
            raise InputError(f"n_modes={n_modes} exceeds K*I = {k_count * n_i}")
        proj = (evecs[:, :j] / np.where(sv[:j] > 0, sv[:j], 1.0)).astype(np.float64)
        modes = (proj.T @ a).reshape(j, *shape).astype(np.float32).compute()
        t["svd"] = time.perf_counter() - t0
    finally:
        if own_dir:
            shutil.rmtree(scratch, ignore_errors=True)
    # gamma_k[i, j] = <alpha_{i,k}, a_j> = s_j V[k*I + i, j] (no third pass over the maps)
    gamma = (evecs[:, :j] * sv[:j]).reshape(k_count, n_i, j).astype(np.float32)
    sums = gamma.sum(axis=(1, 2), keepdims=True)
    gamma_norm = gamma / np.where(np.abs(sums) > 0, sums, 1.0)

    py, px = pixel_size(imgs[0], "y"), pixel_size(imgs[0], "x")
    ds = xr.Dataset(
        {
            "psf_basis": (("component", "ky", "kx"), h),
            "spatial_basis": (("mode", "y", "x"), modes),
            "gamma": (("state", "component", "mode"), gamma),
            "gamma_normalised": (("state", "component", "mode"), gamma_norm.astype(np.float32)),
            "map_singular_values": ("map_rank", sv),
            "patch_singular_values": ("patch_rank", np.asarray(basis["singular_values"].values)),
            "beads_used": ("state", np.bincount(owner, minlength=k_count)),
        },
        coords={"state": labels, "component": np.arange(n_i), "mode": np.arange(j),
                "y": imgs[0]["y"], "x": imgs[0]["x"],
                **kernel_coords(h.shape[1:], None if px is None else (py, px))},
    )
    params = {"n_components": int(n_i), "n_modes": int(j), "psf_radius": int(r),
              "realism": realism, "background": background or "default",
              "timings_s": {k: round(v, 4) for k, v in t.items()}}
    inputs = [im for im in images if isinstance(im, (str, os.PathLike))]
    ds.attrs = {"pcmx_type": "family", **provenance(params, inputs)}
    return ds
