"""The space-varying microscope: field polynomials of defocus and Zernike coefficients, states.

Field coordinates are normalised so the image spans ``[-1, 1]`` on each axis::

    u = (x - cx) / cx,  v = (y - cy) / cy,  cx = (nx - 1) / 2, cy = (ny - 1) / 2

(pixel units; the corners are at ``|(u, v)| = sqrt(2)``). Each quantity is a polynomial in
``(u, v)`` over the monomials ``1, u, v, u^2, u v, v^2, u^3, u^2 v, u v^2, v^3`` (the first 1, 3,
6 or 10 of them): ``defocus`` in micrometers (the emitter's distance from the focal plane,
``z`` of eq. (7); a tilted or curved focal surface) and one polynomial per Noll-indexed Zernike
term, in waves RMS. A *state* (one acquisition) adds a defocus offset, a tilt of the focal
plane, scales the aberration polynomials (temperature-like drift) and adds constant Zernike
offsets. Everything is plain JSON so it travels in a store's attrs.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..units import ureg
from ._psf import DEFAULT_NOLL, noll_to_nm

__all__ = ["MONOMIALS", "FieldModel", "State", "monomials", "random_field", "random_states",
           "parse_states"]

MONOMIALS = ("1", "u", "v", "u^2", "u*v", "v^2", "u^3", "u^2*v", "u*v^2", "v^3")
_EXPONENTS = ((0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2), (3, 0), (2, 1), (1, 2), (0, 3))
_VALID_LENGTHS = (1, 3, 6, 10)


def _length_um(value, name: str) -> float:
    """A signed length in micrometers: a bare number is micrometers, else ``"-300nm"``, a Quantity."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        um = float(value)
    else:
        try:
            q = ureg.Quantity(value) if isinstance(value, str) else value
            um = float(q.to("micrometer").magnitude)
        except Exception:  # noqa: BLE001  (pint raises assorted errors on garbage)
            raise InputError(f"{name}={value!r} is not a length (e.g. '300nm')") from None
    if not np.isfinite(um):
        raise InputError(f"{name}={value!r} must be finite")
    return um


def field_uv(y, x, shape) -> tuple[np.ndarray, np.ndarray]:
    """Normalised field coordinates ``(u, v)`` of pixel positions ``(y, x)``."""
    ny, nx = shape[-2], shape[-1]
    cy, cx = max((ny - 1) / 2.0, 0.5), max((nx - 1) / 2.0, 0.5)
    return (np.asarray(x, dtype=np.float64) - (nx - 1) / 2.0) / cx, \
        (np.asarray(y, dtype=np.float64) - (ny - 1) / 2.0) / cy


def monomials(u: np.ndarray, v: np.ndarray, n_terms: int = 10) -> np.ndarray:
    """Monomials ``u^a v^b`` of :data:`MONOMIALS`, shape ``(n_terms, *u.shape)``."""
    return np.stack([u**a * v**b for a, b in _EXPONENTS[:n_terms]])


def _poly(value, name: str) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if arr.ndim != 1 or arr.size not in _VALID_LENGTHS:
        raise InputError(f"{name} has {arr.size} polynomial coefficients; give 1, 3, 6 or 10 "
                         f"(monomials {', '.join(MONOMIALS)})")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} has non-finite coefficients")
    out = np.zeros(len(MONOMIALS))
    out[: arr.size] = arr
    return out


@dataclass
class FieldModel:
    """Polynomials over the field of the defocus (micrometers) and Zernike terms (waves).

    Attributes
    ----------
    shape : tuple of int
        (ny, nx) of the image the normalised coordinates refer to.
    defocus : ndarray (10,)
        Coefficients of the defocus polynomial over :data:`MONOMIALS`.
    zernike : dict of int -> ndarray (10,)
        Noll index -> coefficients of its polynomial (waves RMS).
    """

    shape: tuple
    defocus: np.ndarray
    zernike: dict = field(default_factory=dict)

    @property
    def noll(self) -> tuple:
        return tuple(sorted(set(DEFAULT_NOLL) | set(self.zernike)))

    def at(self, y, x, state: State | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Zernike coefficients ``(n, J)`` (order :attr:`noll`) and defocus ``(n,)`` at pixels."""
        u, v = field_uv(np.ravel(y), np.ravel(x), self.shape)
        mono = monomials(u, v)  # (10, n)
        state = state or State()
        defocus = self.defocus.copy()
        defocus[0] += state.defocus
        defocus[1] += state.tilt[1]
        defocus[2] += state.tilt[0]
        noll = self.noll
        coeffs = np.zeros((len(noll), len(MONOMIALS)))
        for i, j in enumerate(noll):
            if j in self.zernike:
                coeffs[i] = self.zernike[j] * state.aberration_scale
            coeffs[i, 0] += state.zernike.get(j, 0.0)
        return (coeffs @ mono).T, defocus @ mono

    def to_attrs(self) -> dict:
        return {
            "shape": [int(s) for s in self.shape],
            "coordinates": "u = (x - (nx-1)/2) / ((nx-1)/2), v = (y - (ny-1)/2) / ((ny-1)/2), "
                           "x and y in pixels",
            "monomials": list(MONOMIALS),
            "defocus_um": [float(c) for c in self.defocus],
            "zernike_waves": {str(j): [float(c) for c in p] for j, p in sorted(self.zernike.items())},
        }

    @classmethod
    def from_attrs(cls, a: dict) -> FieldModel:
        return cls(shape=tuple(int(s) for s in a["shape"]),
                   defocus=_poly(a["defocus_um"], "defocus_um"),
                   zernike={int(j): _poly(p, f"zernike {j}") for j, p in a["zernike_waves"].items()})

    @classmethod
    def from_user(cls, shape, aberrations: dict) -> FieldModel:
        """Build from ``{"defocus": poly or length, noll_j: poly, ...}`` (polys over MONOMIALS)."""
        if not isinstance(aberrations, dict):
            raise InputError(f"aberrations={aberrations!r} must be a dict "
                             "{'defocus': [...], 5: [...], ...} or None")
        defocus = np.zeros(len(MONOMIALS))
        zern = {}
        for key, value in aberrations.items():
            if key in ("defocus", "z"):
                if isinstance(value, str):
                    value = _length_um(value, "aberrations['defocus']")
                defocus = _poly(value, "aberrations['defocus']")
                continue
            try:
                j = int(str(key).lstrip("Zz"))
            except ValueError:
                raise InputError(f"aberrations key {key!r} is neither 'defocus' nor a Noll "
                                 "index (4, 5, 'Z6', ...)") from None
            noll_to_nm(j)
            if j == 1:
                continue  # piston does nothing to an intensity
            zern[j] = _poly(value, f"aberrations[{key!r}]")
        return cls(shape=tuple(shape), defocus=defocus, zernike=zern)


@dataclass
class State:
    """Changes of one acquisition: defocus offset and tilt (um), aberration scale, Zernike offsets."""

    defocus: float = 0.0
    tilt: tuple = (0.0, 0.0)  # (along y at v = 1, along x at u = 1), micrometers
    aberration_scale: float = 1.0
    zernike: dict = field(default_factory=dict)

    def to_attrs(self) -> dict:
        return {"defocus_um": float(self.defocus), "tilt_um": [float(t) for t in self.tilt],
                "aberration_scale": float(self.aberration_scale),
                "zernike_waves": {str(j): float(c) for j, c in sorted(self.zernike.items())}}

    @classmethod
    def from_attrs(cls, a: dict) -> State:
        return cls(defocus=float(a["defocus_um"]), tilt=tuple(float(t) for t in a["tilt_um"]),
                   aberration_scale=float(a["aberration_scale"]),
                   zernike={int(j): float(c) for j, c in a["zernike_waves"].items()})


_STATE_KEYS = ("defocus", "tilt", "aberration_scale", "zernike")


def _state_from_user(d, k: int) -> State:
    if isinstance(d, State):
        return d
    if not isinstance(d, dict):
        raise InputError(f"states[{k}]={d!r} must be a dict with keys among {_STATE_KEYS}")
    unknown = set(d) - set(_STATE_KEYS)
    if unknown:
        raise InputError(f"states[{k}] has unknown keys {sorted(unknown)}; expected {_STATE_KEYS}")
    tilt = d.get("tilt", (0.0, 0.0))
    if np.ndim(tilt) == 0 or len(tilt) != 2:
        raise InputError(f"states[{k}]['tilt']={tilt!r} must be a pair (along y, along x)")
    scale = float(d.get("aberration_scale", 1.0))
    if not np.isfinite(scale):
        raise InputError(f"states[{k}]['aberration_scale']={scale!r} must be finite")
    zern = {}
    for key, value in dict(d.get("zernike", {})).items():
        try:
            j = int(str(key).lstrip("Zz"))
        except ValueError:
            raise InputError(f"states[{k}]['zernike'] key {key!r} is not a Noll index") from None
        noll_to_nm(j)
        zern[j] = float(value)
    return State(defocus=_length_um(d.get("defocus", 0.0), f"states[{k}]['defocus']"),
                 tilt=tuple(_length_um(t, f"states[{k}]['tilt']") for t in tilt),
                 aberration_scale=scale, zernike=zern)


def random_field(shape, rng: np.random.Generator, strength: float = 1.0) -> FieldModel:
    """A plausible wide-field objective: curved/tilted focal surface, field-dependent
    astigmatism (``Z6 ~ u^2 - v^2``, ``Z5 ~ 2uv``) and coma (``Z8 ~ u``, ``Z7 ~ v``), small
    constant trefoil and spherical aberration, each with random low-degree perturbations."""
    n = len(MONOMIALS)

    def jitter(scale):
        out = np.zeros(n)
        out[:6] = rng.normal(0.0, scale, 6)
        return out

    defocus = jitter(0.02)
    curvature = rng.uniform(0.04, 0.1)
    defocus[1:3] += rng.normal(0.0, 0.05, 2)
    defocus[3] += curvature
    defocus[5] += curvature
    astig = rng.uniform(0.03, 0.07)
    z5 = jitter(0.01)
    z5[0] += rng.normal(0.0, 0.02)
    z5[4] += 2.0 * astig
    z6 = jitter(0.01)
    z6[0] += rng.normal(0.0, 0.02)
    z6[3] += astig
    z6[5] -= astig
    coma = rng.uniform(0.02, 0.05)
    z7 = jitter(0.005)
    z7[2] += coma
    z8 = jitter(0.005)
    z8[1] += coma
    zern = {5: z5, 6: z6, 7: z7, 8: z8}
    for j in (9, 10):
        zern[j] = np.zeros(n)
        zern[j][0] = rng.normal(0.0, 0.015)
    zern[11] = np.zeros(n)
    zern[11][0] = rng.normal(0.0, 0.02)
    zern[11][[3, 5]] = rng.normal(0.0, 0.005)
    zern = {j: p * strength for j, p in zern.items()}
    return FieldModel(shape=tuple(shape), defocus=defocus * strength, zernike=zern)


def random_states(k: int, rng: np.random.Generator) -> list[State]:
    """``k`` acquisitions under varying conditions (defocus, tilt, drift of aberrations)."""
    states = []
    for _ in range(k):
        states.append(State(
            defocus=float(rng.uniform(-0.25, 0.25)),
            tilt=tuple(float(t) for t in rng.normal(0.0, 0.04, 2)),
            aberration_scale=float(rng.uniform(0.8, 1.2)),
            zernike={j: float(rng.normal(0.0, 0.015)) for j in (5, 6, 7, 8, 11)},
        ))
    return states


def parse_states(states, rng: np.random.Generator) -> tuple[list[State], bool]:
    """``(list of State, has_state_dim)`` from None, an int or a list of dicts."""
    if states is None:
        return [State()], False
    if isinstance(states, numbers.Integral) and not isinstance(states, bool):
        if states < 1:
            raise InputError(f"states={states!r} must be at least 1")
        return random_states(int(states), rng), True
    if isinstance(states, (list, tuple)):
        if len(states) == 0:
            raise InputError("states=[] is empty; give None, a count or a list of dicts")
        return [_state_from_user(d, k) for k, d in enumerate(states)], True
    raise InputError(f"states={states!r} must be None, a number of states or a list of dicts")
