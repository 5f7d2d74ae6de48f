"""The one fit: bead patches in, an operator out (paper II-C, App. A e-f, App. C).

::

    fit_psf_basis: bump, normalisation, PCA, outlier rejection, rank rule   (pcmx.psf_basis)
    -> realism: the cone of observed coefficients, or non-negative PSFs     (pcmx.cone, App. C-b/c)
    -> coefficient_maps: weighted thin-plate splines, projected             (pcmx.coefficients, App. C-a)

:func:`fit_operator` is the only place these steps are chained for one operator:
:func:`pcmx.learn.learn_operator` calls it on an image's beads, every fold of
:func:`pcmx.cross_validation.cross_validate` calls it on the training beads with the same options
(so a fold differs from the stored model only by the beads it leaves out), and
:func:`pcmx.family.learn_family` uses the same :class:`Realism` policy for each image's maps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import xarray as xr

from .coefficients import coefficient_maps
from .cone import project_nonnegative, reduce_cone
from .errors import InputError
from .patches import BeadPatches
from .psf_basis import fit_psf_basis
from .units import from_pixels, kernel_coords, pixel_size, spatial_coords, to_pixels

__all__ = ["Realism", "realism_policy", "fit_operator", "fit_basis", "detection_diagnostics", "stored_positions",
           "used_bead_mask", "REALISM_KINDS", "CONE_FLOOR", "NONNEGATIVE_FLOOR", "DETECTION_STATUS"]

#: What became of each detection (``detection_status`` in an operator store, CF flags).
DETECTION_STATUS = ("used", "border", "saturated", "hot_pixel", "crowded", "second_peak", "width",
                    "elongated", "off_centre", "outlier", "map_outlier", "skipped")

#: Negative part allowed in the cone's generators, relative to their peak (App. C-b): a conical
#: combination's peak can be lower than the sum of its generators' peaks (they sit at slightly
#: different pixels), and 1% per generator measured -1.0008% for a combination on a bright
#: field; half a percent keeps every predicted PSF within 1% (tests/test_learn_quality.py).
CONE_FLOOR = 0.005
#: Negative part allowed in each PSF by the non-negativity projection, relative to its peak.
NONNEGATIVE_FLOOR = 0.01
REALISM_KINDS = ("cone", "nonnegative", "none")
_ALIASES = {True: "cone", False: "none", None: "none", "cone": "cone", "nonnegative": "nonnegative",
            "none": "none", "false": "none", "true": "cone"}


@dataclass(frozen=True)
class Realism:
    """How predicted PSFs are kept realistic (paper App. C-b, C-c).

    Parameters
    ----------
    kind : {"cone", "nonnegative", "none"}
        ``"cone"``: the coefficient maps are projected onto the conical hull of the observed
        coefficients, reduced greedily to within ``angle_threshold_deg``
        (:func:`pcmx.cone.reduce_cone`), its generators moved to PSFs non-negative within
        ``floor`` of their peak. ``"nonnegative"``: each coefficient vector moved to the
        nearest one whose PSF is >= ``-floor`` times its peak
        (:func:`pcmx.cone.project_nonnegative`). ``"none"``: no projection.
    floor : float, optional
        :data:`CONE_FLOOR` for the cone, :data:`NONNEGATIVE_FLOOR` for non-negativity.
    max_generators : int, optional
        Cap on the cone's generators (None: as many as the angle threshold takes).
    angle_threshold_deg : float
        Greedy cone reduction threshold.
    """

    kind: str = "cone"
    floor: float | None = None
    max_generators: int | None = None
    angle_threshold_deg: float = 1.0

    def __post_init__(self):
        if self.kind not in REALISM_KINDS:
            raise InputError(f"realism={self.kind!r}: expected one of "
                             f"{', '.join(map(repr, REALISM_KINDS))} (or True/False)")
        if self.floor is None:
            object.__setattr__(self, "floor", CONE_FLOOR if self.kind == "cone" else NONNEGATIVE_FLOOR)
        if not (np.isfinite(self.floor) and 0 <= self.floor < 1):
            raise InputError(f"realism floor={self.floor!r}: expected a number in [0, 1)")
        if self.max_generators is not None and int(self.max_generators) < 1:
            raise InputError(f"realism max_generators={self.max_generators!r}: expected at least 1")
        if not 0 < float(self.angle_threshold_deg) < 90:
            raise InputError(f"angle_threshold_deg={self.angle_threshold_deg!r}: must be in (0, 90)")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def setup(self, beta: np.ndarray, psf_basis: np.ndarray) -> dict:
        """What :func:`pcmx.coefficients.coefficient_maps` takes for this policy, from the
        observed coefficients ``beta (M, I)`` and the basis ``h (I, ...)``:
        ``{"generators": (G, I) or None, "project": callable or None}``."""
        if self.kind == "cone":
            cap = len(beta) if self.max_generators is None else int(self.max_generators)
            gens = reduce_cone(beta, angle_threshold_deg=self.angle_threshold_deg, psf_basis=psf_basis,
                               max_generators=max(cap, 1), floor=self.floor)
            return {"generators": gens, "project": None}
        if self.kind == "nonnegative":
            # a partial of a module-level function: pickles to dask.distributed workers
            return {"generators": None,
                    "project": partial(project_nonnegative, psf_basis=np.asarray(psf_basis),
                                       floor=self.floor)}
        return {"generators": None, "project": None}

    def record(self) -> dict:
        """The policy as stored in ``pcmx_parameters``."""
        return {"kind": self.kind, "floor": float(self.floor), "max_generators": self.max_generators,
                "angle_threshold_deg": float(self.angle_threshold_deg)}


def realism_policy(value, *, angle_threshold_deg: float | None = None) -> Realism:
    """A :class:`Realism` from what users pass: a Realism, a kind name, True (cone), False/None."""
    if isinstance(value, Realism):
        return value
    key = value.lower() if isinstance(value, str) else value
    if not isinstance(key, (bool, str)) and key is not None or key not in _ALIASES:
        raise InputError(f"realism={value!r}: expected one of {', '.join(map(repr, REALISM_KINDS))} "
                         "(or True/False)")
    kw = {} if angle_threshold_deg is None else {"angle_threshold_deg": angle_threshold_deg}
    return Realism(_ALIASES[key], **kw)


def _positions_vars(prefix: str, dim: str, positions: np.ndarray, sdims, grid) -> dict:
    """``{prefix}_{d}`` variables along ``dim`` of pixel ``positions (M, ndim)``, in the units
    of ``grid``'s coordinates (:func:`pcmx.units.from_pixels`: micrometres in a calibrated
    store, pixels with ``units="pixel"`` where the grid has none)."""
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, len(sdims))
    if grid is None:
        values = {d: (pos[:, k], "pixel") for k, d in enumerate(sdims)}
    else:
        values = from_pixels(grid, **{d: pos[:, k] for k, d in enumerate(sdims)})
    return {f"{prefix}_{d}": (dim, np.asarray(values[d][0], dtype=np.float64),
                              {"units": values[d][1]}) for d in sdims}


def detection_diagnostics(detections: np.ndarray, status, sdims, grid=None) -> dict:
    """Every detection's position and status as variables of an operator store: ``detection_
    [z,] y, x`` (in the units of ``grid``'s coordinates, micrometres in a calibrated store;
    pixels with ``units="pixel"`` without a grid or calibration) and ``detection_status``
    (int8 codes with CF ``flag_values`` / ``flag_meanings``, :data:`DETECTION_STATUS`;
    "skipped": an isolated bead left out by ``max_beads``).

    Parameters
    ----------
    detections : ndarray (N, ndim)
        Pixel positions (:attr:`pcmx.patches.BeadPatches.detections`).
    status : sequence of str (N,)
    sdims : tuple of str
        The spatial dims, e.g. ``("y", "x")``.
    grid : Dataset or DataArray, optional
        Gives the coordinates of ``sdims`` (the image, or the operator being built).
    """
    codes = {name: k for k, name in enumerate(DETECTION_STATUS)}
    flags = np.array([codes.get(str(v) or "skipped", codes["skipped"]) for v in status], dtype=np.int8)
    out = _positions_vars("detection", "detection", detections, sdims, grid)
    out["detection_status"] = ("detection", flags, {
        "flag_values": list(range(len(DETECTION_STATUS))),
        "flag_meanings": " ".join(DETECTION_STATUS),
        "long_name": "what became of each detection (pcmx.fit.DETECTION_STATUS)"})
    return out


def stored_positions(ds: xr.Dataset, prefix: str = "bead", *, grid=None) -> np.ndarray | None:
    """Positions stored in ``{prefix}_[z,] y, x`` as fractional pixel indices ``(M, ndim)``.

    Reads each variable's ``units`` attribute (:func:`pcmx.units.to_pixels`), so stores that
    keep the positions in micrometres and older ones in pixels (``units="pixel"``, or no
    ``units``) read alike.

    Parameters
    ----------
    ds : Dataset
        An operator store (``prefix="bead"``: the kept beads, ``"detection"``: every
        detection, ``"cv_bead"``: the held-out beads).
    grid : Dataset or DataArray, optional
        Whose coordinates the positions refer to (default ``ds``; a family's
        ``spatial_basis``, an image).

    Returns
    -------
    ndarray (M, ndim) float64 or None
        None where ``ds`` has no ``{prefix}_y``.
    """
    grid = ds if grid is None else grid
    dims = [d for d in ("z", "y", "x") if f"{prefix}_{d}" in ds and d in grid.dims]
    if "y" not in dims or "x" not in dims:
        return None
    pos = {}
    for d in dims:
        v = ds[f"{prefix}_{d}"]
        if "units" not in v.attrs and not hasattr(v.data, "units"):
            v = v.assign_attrs(units="pixel")  # the oldest stores: pixels without units
        pos[d] = np.atleast_1d(to_pixels(grid, extrapolate=True, **{d: v})[d])
    return np.stack([pos[d] for d in dims], axis=1)


def used_bead_mask(bp: BeadPatches, op: xr.Dataset, *, atol: float = 1e-6) -> np.ndarray:
    """Which beads of ``bp`` the operator ``op`` was fitted on (its stored ``bead_*``).

    The stored positions are read in their units (:func:`stored_positions`) and matched to
    ``bp.positions`` (pixels) within ``atol`` pixels (the micrometre round trip moves them by
    ~1e-13 px).

    Returns
    -------
    ndarray (len(bp.positions),) bool
    """
    pos = np.asarray(bp.positions, dtype=np.float64)
    used = stored_positions(op, "bead")
    mask = np.zeros(len(pos), dtype=bool)
    if used is None or not len(used) or not len(pos):
        return mask
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(pos).query(used[:, -pos.shape[1]:], k=1)
    mask[idx[dist <= atol]] = True
    return mask


def fit_basis(bp: BeadPatches, n_components: int | None = None, *, outlier_test: str = "field",
              outlier_sigma: float = 3.0, rank_rule: str = "noise") -> xr.Dataset:
    """The PSF basis step of :func:`fit_operator` on the beads ``bp`` (already
    :meth:`~pcmx.patches.BeadPatches.usable_beads`): :func:`pcmx.psf_basis.fit_psf_basis`."""
    return fit_psf_basis(bp.patches, n_components, r=bp.radius, outlier_test=outlier_test,
                         outlier_sigma=outlier_sigma, rank_rule=rank_rule)


def fit_operator(bp: BeadPatches, *, n_components: int | None = None, eta: float | None = None,
                 realism: Realism | str | bool = "cone", image: xr.DataArray | None = None,
                 outlier_test: str = "field", outlier_sigma: float = 3.0,
                 rank_rule: str = "noise", eta_scale: float = 1.0, at=None,
                 basis: xr.Dataset | None = None, generators=None) -> xr.Dataset:
    """The operator of one image's beads: PSF basis, realism, coefficient maps (paper II-C).

    Parameters
    ----------
    bp : BeadPatches
        From :func:`pcmx.patches.bead_patches` (or a subset of it: a cross-validation fold), or
        built from other patches at the same positions (e.g. noise-free true PSFs: the model's
        own accuracy floor). Only its :attr:`~pcmx.patches.BeadPatches.usable` beads are used.
    n_components : int, optional
        I; by ``rank_rule`` when None (:func:`pcmx.psf_basis.fit_psf_basis`).
    eta : float, optional
        Thin-plate smoothing weight; generalized cross-validation when None (App. C-a).
    realism : Realism, str or bool
        See :class:`Realism` (:func:`realism_policy` reads strings and booleans).
    image : DataArray, optional
        The image, for its coordinates (pixel sizes); pixel units without it.
    outlier_test, outlier_sigma, rank_rule :
        See :func:`pcmx.psf_basis.fit_psf_basis` (``outlier_sigma=inf``: every bead is used).
    eta_scale : float
        The smoothing chosen (or ``eta``) times this (model selection's smoother candidate,
        :func:`pcmx.coefficients.coefficient_maps`).
    at : array (N, ndim), optional
        Pixel positions where the maps are wanted instead of the whole grid (cross-validation's
        held-out beads): the result then has ``heldout_coefficients (heldout, component)``
        (the exact spline there under the realism projection; the maps of the lattice differ
        from it by at most their tolerance, 1e-3 to 3e-3 of the PSF) and
        ``heldout_spline_coefficients`` (before the projection: realism "none" of the same
        fit), ``psf_basis``, ``bead_*`` (pixels), ``cone_generators``, and no maps.
    basis, generators : optional
        This fit's :func:`pcmx.psf_basis.fit_psf_basis` result on ``bp.usable_beads()`` with
        the same ``n_components`` and outlier options, and its cone's generators: computed
        once and shared by the candidates of one cross-validation fold.

    Returns
    -------
    Dataset
        ``psf_basis (component, [kz,] ky, kx)``, ``coefficients (component, [z,] y, x)``,
        ``bead_[z,] y, x`` (the kept beads' centres in the image's coordinate units:
        micrometres where calibrated, else pixels; ``units`` attrs), ``detection_[z,] y, x``
        and ``detection_status`` (every detection), ``observed_coefficients``, ``singular_values``,
        ``cone_generators`` (realism "cone"), attrs ``pcmx_parameters`` (the choices made,
        counts and timings).

    Raises
    ------
    InputError
        Fewer usable beads than the spline needs (ndim + 2).
    """
    policy = realism_policy(realism)
    status = bp.detection_status()
    bp = bp.usable_beads()  # beads whose patch is not a clean PSF inform no model
    nd = len(bp.shape)
    t = {}
    t0 = time.perf_counter()
    if basis is None:
        basis = fit_basis(bp, n_components, outlier_test=outlier_test, outlier_sigma=outlier_sigma,
                          rank_rule=rank_rule)
    t["psf_basis"] = time.perf_counter() - t0
    kept = np.asarray(basis["kept"].values, dtype=bool)
    h = np.asarray(basis["psf_basis"].values, dtype=np.float32)
    beta = np.asarray(basis["beta"].values, dtype=np.float64)
    points = bp.positions[kept]
    n_i = h.shape[0]
    min_beads = nd + 2
    if len(points) < min_beads:
        raise InputError(f"only {len(points)} usable beads after rejection; at least {min_beads} "
                         f"are needed to interpolate the PSF over the field")
    t0 = time.perf_counter()
    proj = ({"generators": np.asarray(generators), "project": None}
            if generators is not None and policy.kind == "cone" else policy.setup(beta, h))
    t["realism"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    maps, tps, info = coefficient_maps(points, beta, bp.shape, eta=eta, return_spline=True,
                                       bead_weights=np.asarray(basis["weight"].values)[kept],
                                       eta_scale=eta_scale, at=at, **proj)
    t["coefficients"] = time.perf_counter() - t0

    sdims = ("z", "y", "x")[-nd:]
    kdims = ("kz", "ky", "kx")[-nd:]
    if at is not None:  # the fit read at the held-out positions only (cross-validation)
        out = xr.Dataset({"psf_basis": (("component", *kdims), h),
                          "heldout_coefficients": (("heldout", "component"), maps),
                          "heldout_spline_coefficients": (("heldout", "component"), info["spline"]),
                          **{f"bead_{d}": ("bead", points[:, k], {"units": "pixel"})
                             for k, d in enumerate(sdims)}})
        if proj["generators"] is not None:
            out["cone_generators"] = (("generator", "component"), np.asarray(proj["generators"]))
        out.attrs["pcmx_parameters"] = {"n_components": int(n_i),
                                        "eta": np.atleast_1d(np.asarray(tps.eta, dtype=float)).tolist()}
        return out
    if image is not None:
        steps = [pixel_size(image, d) for d in sdims]
        grid = {d: image[d] for d in sdims}
    else:
        steps = [None] * nd
        grid = spatial_coords(bp.shape, None, dims=sdims)
    kstep = None if any(v is None for v in steps) else tuple(steps)
    ds = xr.Dataset(
        {
            "psf_basis": (("component", *kdims), h),
            "coefficients": (("component", *sdims), maps.astype(np.float32, copy=False)),
            "observed_coefficients": (("bead", "component"), beta.astype(np.float32)),
            "singular_values": ("rank", np.asarray(basis["singular_values"].values, dtype=np.float64)),
        },
        coords={"component": np.arange(n_i), **grid, **kernel_coords(h.shape[1:], kstep, dims=kdims)},
    )
    # the kept beads and every detection in the image's coordinate units (micrometres where
    # calibrated; pixels with units "pixel" otherwise); in memory BeadPatches stay in pixels
    ds = ds.assign(_positions_vars("bead", "bead", points, sdims, ds))
    if status is not None:
        det = np.asarray(bp.bead_detection if bp.bead_detection is not None else [], dtype=np.int64)
        if len(det) == len(kept):
            status[det[~kept]] = "outlier"
            status[det[np.flatnonzero(kept)[info["rejected"]]]] = "map_outlier"
        ds = ds.assign(detection_diagnostics(bp.detections, status, sdims, grid=ds))
    if proj["generators"] is not None:
        ds["cone_generators"] = (("generator", "component"), np.asarray(proj["generators"], dtype=np.float32))
    eta_used = np.atleast_1d(np.asarray(tps.eta, dtype=float))
    radius = bp.radius if np.ndim(bp.radius) == 0 else [int(v) for v in bp.radius]
    params = {
        "n_components": int(n_i), "n_components_requested": n_components,
        "n_components_rule": basis.attrs["n_components_rule"],
        "psf_radius": radius, "eta": eta_used.tolist(), "eta_requested": eta,
        **({"eta_scale": float(eta_scale)} if eta_scale != 1.0 else {}),
        "realism": policy.record(), "outlier_test": outlier_test,
        "counts": {**bp.counts, "rejected_outlier": int((~kept).sum()),
                   "rejected_map_outlier": int(len(info["rejected"])),
                   "used": int(kept.sum()) - int(len(info["rejected"]))},
        "lattice_step": int(info.get("step", 0)), "lattice_max_error": float(info.get("max_error", 0.0)),
        "timings_s": {k: round(v, 4) for k, v in {**bp.timings, **t}.items()},
    }
    ds.attrs = {"pcmx_type": "operator", "pcmx_parameters": params}
    return ds
