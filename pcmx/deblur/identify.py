"""Blind identification of an operator in a family from a few point sources (paper App. D-a).

A family (paper II-D) describes every operator of a microscope by a small matrix ``Gamma``
(component x mode): ``H u = sum_{i,j} Gamma[i, j] h_i * (a_j . u)``. The image of an isolated
point source of amplitude ``g_p`` at ``z_p`` is ``g_p sum_i (sum_j Gamma[i, j] a_j(z_p)) h_i``,
so the projections ``c_{p,i} = <p_p, h_i>`` of its centred, background-free patch ``p_p`` on
the PSF basis satisfy ``c_p ~ g_p Gamma a(z_p)``. Problem (10) of the paper::

    min  1/2 sum_p || g_p Gamma a(z_p) - c_p ||^2   over  Gamma in C, <Gamma, Gamma_0> = 1, g >= 0

with ``C`` the conical hull of the family's states (``gamma_normalised``, the generators
``G_k``). The problem is bilinear; it is solved by alternating minimisation, each step an
exact convex minimisation:

* ``g`` with ``Gamma`` fixed: ``g_p = max(0, <m_p, c_p>) / ||m_p||^2`` with
  ``m_p = Gamma a(z_p)`` (closed form);
* ``Gamma`` with ``g`` fixed: ``Gamma = sum_k w_k G_k``, ``w >= 0``, ``sum_k w_k <G_k, Gamma_0>
  = 1``. With ``v_k = w_k <G_k, Gamma_0>`` the feasible set is the unit simplex, and the
  K-variable least-squares problem is solved by accelerated projected gradient (FISTA with
  adaptive restart, exact Euclidean projection onto the simplex) to a relative tolerance.

The bilinear problem is not convex: it is started from the centre of the cone and from the
eight generators that fit the sources best on their own (all of them when K <= 8), and the
best local minimum is kept (each start costs milliseconds). ``Gamma_0`` is the mean of the unit-norm generators, normalised to unit norm
(``gamma0="mean"``): a direction inside the cone that weighs all states equally; the
circumcenter mentioned by the paper is not needed since any interior direction removes the
scale ambiguity. The identified ``Gamma`` is finally rescaled (with ``g`` rescaled inversely,
so the fit is unchanged) so that the PSFs of the operator sum to one on average over the
field, like those of the family's own states: the amplitudes are then photon counts and the
restored images keep the photometry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from .. import _backend
from ..errors import InputError
from ..patches import bead_patches, patches_at

_MAX_VERTEX_STARTS = 8  # the best-fitting generators used as extra starts (all when K <= 8)

__all__ = ["Identification", "identify_operator", "dirac_comb_distance", "rescaled_distance",
           "project_onto_family",
           "check_family_grid", "checked_image"]


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------
@dataclass
class Identification:
    """The operator of a family identified from point sources (paper App. D-a).

    Attributes
    ----------
    gamma : DataArray (component, mode)
        The identified coefficients, scaled so the PSFs sum to one on average over the field.
    weights : DataArray (state,)
        ``w`` with ``gamma = scale * sum_k w_k gamma_normalised[k]``, normalised to sum one.
    amplitudes : ndarray (P,)
        ``g_p``: the amplitude of each point source (photons when the PSFs sum to one).
    positions : ndarray (P, 2)
        The sub-pixel (y, x) centres used, in pixels.
    residual : float
        Relative fit residual ``sqrt(sum_p ||g_p Gamma a(z_p) - c_p||^2 / sum_p ||c_p||^2)``.
    point_residuals : ndarray (P,)
        The same per source.
    iterations : int
        Alternating-minimisation iterations of the best start.
    operator : Dataset
        The operator (``psf_basis``, ``coefficients``) of ``gamma``
        (:func:`pcmx.model.family_operator`), a valid operator store.
    """

    gamma: xr.DataArray
    weights: xr.DataArray
    amplitudes: np.ndarray
    positions: np.ndarray
    residual: float
    point_residuals: np.ndarray
    iterations: int
    operator: xr.Dataset
    info: dict = field(default_factory=dict)

    def product_convolution(self, **kwargs):
        """The identified operator as a :class:`pcmx.ProductConvolution` (``boundary=`` etc.)."""
        from ..operator import ProductConvolution

        return ProductConvolution(self.operator, **kwargs)

    def to_dataset(self) -> xr.Dataset:
        """The identification as variables: ``gamma``, ``state_weights``, ``source_y/x``,
        ``source_amplitude``, ``source_residual`` and the attr ``identification_residual``."""
        return xr.Dataset(
            {"gamma": self.gamma, "state_weights": self.weights,
             "source_y": ("id_source", self.positions[:, 0], {"units": "pixel"}),
             "source_x": ("id_source", self.positions[:, 1], {"units": "pixel"}),
             "source_amplitude": ("id_source", self.amplitudes.astype(np.float64)),
             "source_residual": ("id_source", self.point_residuals.astype(np.float64))},
            attrs={"identification_residual": float(self.residual),
                   "identification_iterations": int(self.iterations)},
        )


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------
def _check_family(family) -> xr.Dataset:
    if isinstance(family, str) or hasattr(family, "__fspath__"):
        from ..io.store import open_store

        family = open_store(family, kind="family")
    if not isinstance(family, xr.Dataset) or family.attrs.get("pcmx_type") != "family":
        got = family.attrs.get("pcmx_type") if isinstance(family, xr.Dataset) else type(family).__name__
        raise InputError(f"family: expected a family Dataset or store (pcmx_type='family'), got {got!r}")
    missing = [v for v in ("psf_basis", "spatial_basis", "gamma") if v not in family]
    if missing:
        raise InputError(f"family: missing variables {missing}")
    if "kz" in family["psf_basis"].dims:
        raise InputError("family: 3D families are not supported by identify_operator (2D images only)")
    return family


def check_family_grid(image: xr.DataArray, family: xr.Dataset, *, what: str = "family") -> None:
    """Raise :class:`InputError` unless ``image`` lies on ``family``'s grid (shape, pixel size).

    Pixel sizes are compared in micrometers when both are known (coordinates in any length
    unit); an image without a physical pixel size is taken to be on the family's grid.
    """
    from ..units import pixel_size

    shape = (family.sizes["y"], family.sizes["x"])
    if tuple(image.shape) != shape:
        raise InputError(f"image: shape {tuple(image.shape)} does not match the {what}'s grid "
                         f"{shape[0]} x {shape[1]} (y, x)")
    for dim in ("y", "x"):
        pi, pf = pixel_size(image, dim), pixel_size(family, dim)
        if pi is not None and pf is not None and abs(pi - pf) > 1e-3 * max(pi, pf):
            raise InputError(f"image: pixel size along {dim} is {pi:.6g} um but the {what}'s is "
                             f"{pf:.6g} um (image units {image[dim].attrs.get('units')!r}, {what} "
                             f"units {family[dim].attrs.get('units')!r})")


def checked_image(image) -> xr.DataArray:
    """The image to deblur as a 2D (y, x) DataArray, checked: the one validator of deblurring.

    Parameters
    ----------
    image : path, array or DataArray (y, x)
        NumPy, CuPy or Dask data (kept as is: the DataArray wraps the same array).

    Returns
    -------
    DataArray (y, x)
        :func:`pcmx.io.readers.as_image` of ``image`` (pixel coordinates when it has none).

    Raises
    ------
    InputError
        An image that is not 2D, has no real-number pixel type, or holds NaN or infinite
        values (the message gives their number).
    """
    from ..io.readers import as_image

    img = as_image(image)
    if img.ndim != 2:
        raise InputError(f"image: expected a 2D (y, x) image, got dims {img.dims}")
    data = img.data
    if data.dtype.kind not in "fiu":
        raise InputError(f"image: dtype {data.dtype} is not a real number type")
    xp = _backend.xp(data)
    if data.dtype.kind == "f":
        n = int(xp.count_nonzero(~xp.isfinite(data)))
        if n:
            raise InputError(f"image: contains {n} NaN or infinite values")
    return img


def _family_radius(family: xr.Dataset, psf_radius) -> int:
    """The bead radius r whose patches have the family's kernel size (2 ceil(1.2 r) + 1)."""
    from ..beads import R_EXT_FACTOR, patch_half_size

    half = family.sizes["ky"] // 2
    if family.sizes["kx"] != family.sizes["ky"]:
        raise InputError(f"family: non-square kernels ({family.sizes['ky']} x {family.sizes['kx']})")
    if psf_radius is None:
        psf_radius = (family.attrs.get("pcmx_parameters") or {}).get("psf_radius")
    if psf_radius is None:  # largest r with ceil(1.2 r) == half
        psf_radius = max(1, int(np.floor(half / R_EXT_FACTOR)))
    r = int(psf_radius)
    got = int(patch_half_size(r, 2)[0])
    if got != half:
        raise InputError(f"psf_radius={psf_radius!r} gives patches of side {2 * got + 1} but the "
                         f"family's kernels are {2 * half + 1} wide")
    return r


# --------------------------------------------------------------------------------------------
# point sources -> coefficients c_p
# --------------------------------------------------------------------------------------------
def _point_patches(img: xr.DataArray, r: int, positions, n_sources):
    """Centred, background-free patches (App. A a-c, App. B) and their positions: the bead
    pipeline of :mod:`pcmx.patches`, on detections or at the given positions."""
    if positions is None:
        bp = bead_patches(img, psf_radius=r, max_beads=n_sources)
    else:
        bp = patches_at(img, positions, r)
    return bp.patches, bp.positions


def _modes_at(family: xr.Dataset, pos: np.ndarray) -> np.ndarray:
    """a_j(z_p): the spatial modes at sub-pixel positions, bilinear, (P, J) float64."""
    from scipy.ndimage import map_coordinates

    modes = np.asarray(family["spatial_basis"].values, dtype=np.float64)
    return np.stack([map_coordinates(m, pos.T, order=1, mode="nearest") for m in modes], axis=1)


# --------------------------------------------------------------------------------------------
# the solver
# --------------------------------------------------------------------------------------------
def _project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {x >= 0, sum x = 1} (sort-based, exact)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    idx = np.arange(1, v.size + 1)
    rho = np.nonzero(u - css / idx > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1.0), 0.0)


def _simplex_lsq(q: np.ndarray, b: np.ndarray, v0: np.ndarray, *, tol: float, max_iter: int) -> np.ndarray:
    """min 1/2 v^T Q v - b^T v over the unit simplex, FISTA with adaptive restart."""
    lip = float(np.linalg.eigvalsh(q)[-1])
    if lip <= 0:
        return v0
    step = 1.0 / lip
    x = v0.copy()
    y = x.copy()
    t = 1.0
    for _ in range(max_iter):
        x_new = _project_simplex(y - step * (q @ y - b))
        if np.dot(y - x_new, x_new - x) > 0:  # gradient restart (O'Donoghue & Candes)
            t, y_next = 1.0, x_new
        else:
            t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
            y_next = x_new + ((t - 1.0) / t_new) * (x_new - x)
            t = t_new
        change = np.linalg.norm(x_new - x)
        x, y = x_new, y_next
        if change <= tol * max(np.linalg.norm(x), 1e-300):
            break
    return x


def _alternate(c: np.ndarray, basis: np.ndarray, v: np.ndarray, *, tol: float, max_iter: int):
    """Alternating minimisation from ``v`` (simplex weights); returns (v, g, objective, iters).

    ``basis`` (K, P, I): ``basis[k, p] = Ghat_k a(z_p)``, so ``Gamma(v) a(z_p) = sum_k v_k basis[k, p]``.
    """
    obj_old = np.inf
    cc = float(np.sum(c * c))
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 (the count is returned)
        m = np.einsum("k,kpi->pi", v, basis)  # (P, I)
        mm = np.sum(m * m, axis=1)
        g = np.maximum(np.sum(m * c, axis=1), 0.0) / np.where(mm > 0, mm, 1.0)
        design = (basis * g[None, :, None]).reshape(basis.shape[0], -1)  # (K, P*I)
        q = design @ design.T
        b = design @ c.ravel()
        v = _simplex_lsq(q, b, v, tol=1e-10, max_iter=2000)
        obj = 0.5 * float(v @ q @ v - 2.0 * b @ v + cc)
        if np.isfinite(obj_old) and obj_old - obj <= tol * max(obj_old, 1e-300):
            break
        obj_old = obj
    # final exact g for the final v
    m = np.einsum("k,kpi->pi", v, basis)
    mm = np.sum(m * m, axis=1)
    g = np.maximum(np.sum(m * c, axis=1), 0.0) / np.where(mm > 0, mm, 1.0)
    obj = 0.5 * float(np.sum((g[:, None] * m - c) ** 2))
    return v, g, obj, it


def identify_operator(image, family, *, positions=None, n_sources: int | None = None,
                      psf_radius: int | None = None, gamma0="mean", max_iter: int = 200,
                      tol: float = 1e-9) -> Identification:
    """Identify the operator of a blurred image within a family, from its point sources
    (paper App. D-a, problem (10)).

    Parameters
    ----------
    image : path, array or DataArray (y, x)
        A blurred image containing isolated point sources (beads, bright single molecules),
        on the family's grid.
    family : Dataset or path
        A family (:func:`pcmx.learn_family`): ``psf_basis`` h_i, ``spatial_basis`` a_j and
        ``gamma_normalised`` (the cone's generators; ``gamma`` normalised to unit sum when
        absent).
    positions : array_like (P, 2), optional
        Approximate (y, x) pixel positions of isolated point sources; they are re-centred to
        sub-pixel accuracy (App. A-c). When None, sources are found by the bead pipeline
        (:func:`pcmx.learn.bead_patches`: detection, isolation, centring, background).
    n_sources : int, optional
        Use only the ``n_sources`` strongest detections (with ``positions=None``).
    psf_radius : int, optional
        The bead radius r; the family's (from its provenance, or its kernel size) when None.
    gamma0 : "mean" or array_like (component, mode)
        The reference direction of the constraint ``<Gamma, Gamma_0> = 1``: "mean" is the
        normalised mean of the unit-norm generators.
    max_iter : int
        Maximum alternating-minimisation iterations per start.
    tol : float
        Stop a start when the objective decreases by less than ``tol`` (relative).

    Returns
    -------
    Identification
        ``gamma``, ``weights``, ``amplitudes``, ``positions``, ``residual``, ``operator``.

    Raises
    ------
    InputError
        A non-finite image; image and family on different grids (shape or pixel size);
        fewer point sources than the family's modes (P < J); a ``gamma0`` outside the cone's
        dual (some generator with ``<G_k, Gamma_0> <= 0``).

    Notes
    -----
    With P sources the data are P x I numbers for I x J unknowns (up to scale): ``P >= J``
    is needed (App. D-a), more sources average the noise. The relative ``residual`` measures
    how well the family explains the sources; a large value (say above 0.3) flags sources
    that are not isolated points or an image outside the family.
    """
    from ..beads import bump_multiplier
    from ..model import family_operator

    family = _check_family(family)
    img = checked_image(image)
    check_family_grid(img, family)
    if _backend.is_cupy(img):
        # the bead pipeline has no CuPy path: identification works on a few small patches, on
        # the host (this is the one conversion; the restoration stays on the device)
        img = img.copy(data=_backend.asnumpy(img.data))
    r = _family_radius(family, psf_radius)
    if n_sources is not None and (int(n_sources) != n_sources or n_sources < 1):
        raise InputError(f"n_sources={n_sources!r} must be a positive integer")

    h = np.asarray(family["psf_basis"].values, dtype=np.float64)  # (I, ky, kx)
    n_i, n_j = h.shape[0], family.sizes["mode"]
    if "gamma_normalised" in family:
        gens = np.asarray(family["gamma_normalised"].values, dtype=np.float64)
    else:
        gam = np.asarray(family["gamma"].values, dtype=np.float64)
        gens = gam / gam.sum(axis=(1, 2), keepdims=True)
    n_k = gens.shape[0]
    gflat = gens.reshape(n_k, -1)
    unit = gflat / np.linalg.norm(gflat, axis=1, keepdims=True)
    if isinstance(gamma0, str):
        if gamma0 != "mean":
            raise InputError(f"gamma0={gamma0!r}: expected 'mean' or a (component, mode) array")
        g0 = unit.mean(axis=0)
    else:
        g0 = np.asarray(gamma0, dtype=np.float64)
        if g0.shape != (n_i, n_j):
            raise InputError(f"gamma0: shape {g0.shape}, expected (component, mode) = {(n_i, n_j)}")
        g0 = g0.ravel()
    g0 = g0 / np.linalg.norm(g0)
    d = gflat @ g0
    if np.any(d <= 0):
        raise InputError(f"gamma0: {int(np.sum(d <= 0))} generator(s) of the cone have a non-positive "
                         "inner product with gamma0; it must point inside the cone's dual")
    ghat = gflat / d[:, None]  # generators scaled so that <Ghat_k, Gamma_0> = 1

    patches, pos = _point_patches(img, r, positions, n_sources)
    n_p = len(pos)
    if n_p < n_j:
        raise InputError(f"image: found {n_p} point sources but the family has {n_j} modes: "
                         f"identification needs at least {n_j} isolated point sources (P >= J); "
                         "give positions= or a larger image with more sources")
    if tuple(patches.shape[1:]) != tuple(h.shape[1:]):  # pragma: no cover - guarded by _family_radius
        raise InputError(f"patches of shape {patches.shape[1:]} do not match the family's kernels {h.shape[1:]}")
    bump = bump_multiplier(h.shape[1:], r).astype(np.float64)
    pdata = np.asarray(patches.values, dtype=np.float64) * bump
    c = np.einsum("pyx,iyx->pi", pdata, h)  # c_{p,i} = <p_p, h_i>
    amodes = _modes_at(family, pos)  # (P, J)
    basis = np.einsum("kij,pj->kpi", ghat.reshape(n_k, n_i, n_j), amodes)  # (K, P, I)

    # starts: the centre of the cone and the generators that fit best on their own
    m_k = basis  # (K, P, I): the sources' coefficients predicted by each generator alone
    proj = np.maximum(np.einsum("kpi,pi->kp", m_k, c), 0.0)
    fit_k = np.sum(c * c) - np.sum(proj**2 / np.maximum(np.einsum("kpi,kpi->kp", m_k, m_k), 1e-300), axis=1)
    vertices = np.argsort(fit_k)[:_MAX_VERTEX_STARTS]
    starts = [np.full(n_k, 1.0 / n_k)] + [np.eye(n_k)[k] for k in vertices]
    best = None
    for v0 in starts:
        v, g, obj, it = _alternate(c, basis, v0, tol=tol, max_iter=max_iter)
        if best is None or obj < best[2] - 1e-12 * abs(best[2]):
            best = (v, g, obj, it)
    v, g, obj, it = best
    gamma_c = (v @ ghat).reshape(n_i, n_j)  # <gamma_c, Gamma_0> = 1

    # photometric scale: PSFs sum to one on average over the field
    modes_mean = np.asarray(family["spatial_basis"].mean(("y", "x")).values, dtype=np.float64)
    flux = float(h.sum(axis=(1, 2)) @ gamma_c @ modes_mean)
    scale = flux if flux > 0 else 1.0
    gamma = gamma_c / scale
    amps = g * scale
    m = amps[:, None] * (amodes @ gamma.T)
    per = np.linalg.norm(m - c, axis=1) / np.maximum(np.linalg.norm(c, axis=1), 1e-300)
    residual = float(np.sqrt(np.sum((m - c) ** 2) / max(np.sum(c * c), 1e-300)))
    w = v / d
    w = w / w.sum()

    comp = family["component"].values if "component" in family.coords else np.arange(n_i)
    mode = family["mode"].values if "mode" in family.coords else np.arange(n_j)
    gamma_da = xr.DataArray(gamma.astype(np.float32), dims=("component", "mode"),
                            coords={"component": comp, "mode": mode}, name="gamma")
    states = family["state"].values if "state" in family.coords else np.arange(n_k)
    weights = xr.DataArray(w, dims=("state",), coords={"state": states}, name="state_weights")
    op = family_operator(family, gamma=gamma)
    op.attrs["pcmx_parameters"] = {**op.attrs.get("pcmx_parameters", {}),
                                   "identification_residual": residual, "n_sources": int(n_p)}
    return Identification(gamma=gamma_da, weights=weights, amplitudes=amps, positions=pos,
                          residual=residual, point_residuals=per, iterations=int(it), operator=op,
                          info={"psf_radius": r, "objective": obj,
                                "n_starts": len(starts)})


# --------------------------------------------------------------------------------------------
# evaluation helpers
# --------------------------------------------------------------------------------------------
def _engine(op, boundary: str):
    from ..operator import ProductConvolution

    if isinstance(op, Identification):
        op = op.operator
    if isinstance(op, ProductConvolution):
        return op
    return ProductConvolution(op, boundary=boundary)


def dirac_comb_distance(op_est, op_true, spacing: int, *, offset: int | None = None,
                        boundary: str = "zero") -> float:
    """The paper's rescaled distance between two operators on a comb of Diracs.

    ``min_{a, b} ||a H_est d + b - H_true d|| / ||H_true d||`` with ``d`` a comb of unit
    Diracs every ``spacing`` pixels (starting at ``offset``, default ``spacing // 2``), ``a``
    a gain and ``b`` an offset fitted by least squares: the distance ignores the overall
    photometric scale, which blind identification cannot recover.

    Parameters
    ----------
    op_est, op_true : operator Dataset, store path, ProductConvolution or Identification
        On the same grid (kernel sizes may differ).
    spacing : int
        Pixels between the Diracs (at least 1).

    Returns
    -------
    float
    """
    if int(spacing) != spacing or spacing < 1:
        raise InputError(f"spacing={spacing!r} must be a positive integer")
    spacing = int(spacing)
    e_op, t_op = _engine(op_est, boundary), _engine(op_true, boundary)
    if e_op.shape != t_op.shape:
        raise InputError(f"op_est covers {e_op.shape} pixels but op_true covers {t_op.shape}")
    if e_op.ndim != 2:
        raise InputError("dirac_comb_distance: 2D operators only")
    off = spacing // 2 if offset is None else int(offset)
    comb = np.zeros(e_op.shape, dtype=np.float32)
    comb[off::spacing, off::spacing] = 1.0
    return rescaled_distance(e_op.apply(comb), t_op.apply(comb))


def rescaled_distance(u, u0) -> float:
    """``min_{a, b} ||a u + b - u0|| / ||u0||`` (paper III-B-1): the distance of two images
    up to a gain ``a`` and an offset ``b``, fitted by least squares (float64)."""
    e = np.asarray(u, dtype=np.float64).ravel()
    t = np.asarray(u0, dtype=np.float64).ravel()
    design = np.stack([e, np.ones_like(e)], axis=1)
    coef, *_ = np.linalg.lstsq(design, t, rcond=None)
    return float(np.linalg.norm(design @ coef - t) / max(np.linalg.norm(t), 1e-300))


def project_onto_family(family, psfs, ys, xs, *, psf_radius: int | None = None) -> xr.DataArray:
    """The family's best ``Gamma`` for known PSFs: least squares over the modes (no cone).

    The coefficients of each PSF in the family's basis, ``alpha_i(z_p) = <m . psf_p, h_i>``
    (``m`` the bump multiplier of App. A-d, as in learning), are fitted by
    ``sum_j Gamma[i, j] a_j(z_p)`` in the least-squares sense. The operator of this ``Gamma``
    is the family's representation of the state that produced the PSFs (e.g. a state held
    out of the family, with PSFs from :func:`pcmx.simulate.true_psfs`): its distance to the
    truth is the family's own representation error, the floor of any identification.

    Parameters
    ----------
    family : Dataset or path
    psfs : array_like (P, ky, kx)
        PSFs centred at index ``size // 2`` with the family's kernel size.
    ys, xs : array_like (P,)
        Their positions in pixels.

    Returns
    -------
    DataArray (component, mode) float64
    """
    from ..beads import bump_multiplier

    family = _check_family(family)
    psfs = np.asarray(psfs, dtype=np.float64)
    h = np.asarray(family["psf_basis"].values, dtype=np.float64)
    if psfs.ndim != 3 or psfs.shape[1:] != h.shape[1:]:
        raise InputError(f"psfs: shape {psfs.shape}, expected (P, {h.shape[1]}, {h.shape[2]})")
    r = _family_radius(family, psf_radius)
    pos = np.stack([np.asarray(ys, dtype=np.float64).ravel(), np.asarray(xs, dtype=np.float64).ravel()], axis=1)
    if len(pos) != len(psfs):
        raise InputError(f"{len(psfs)} PSFs but {len(pos)} positions")
    bump = bump_multiplier(h.shape[1:], r).astype(np.float64)
    alpha = np.einsum("pyx,iyx->pi", psfs * bump, h)  # (P, I)
    amodes = _modes_at(family, pos)  # (P, J)
    gamma_t, *_ = np.linalg.lstsq(amodes, alpha, rcond=None)  # (J, I)
    return xr.DataArray(gamma_t.T, dims=("component", "mode"), name="gamma")
