"""Scalar Fourier-optics PSF engine (paper eq. (6)-(7)), vectorised over many PSFs.

Each PSF is ``|F^-1[P(xi) exp(2 i pi W(xi))]|^2`` with ``P`` the pupil disk of radius NA/lambda,
``W`` in waves the sum of Zernike terms (Noll indexing), the defocus term
``z * sqrt(n^2/lambda^2 - |xi|^2)`` and a phase ramp ``-xi . delta`` that moves the PSF by a
sub-pixel offset ``delta``. The intensity is integrated over each camera pixel exactly: the
intensity is band-limited to ``2 NA / lambda``, so it is computed alias-free on a grid
supersampled by ``s`` (``s = 1`` as soon as the pixel is below ``lambda / (4 NA)``), its
spectrum multiplied by the pixel's transfer function ``sinc(f_y p) sinc(f_x p)`` (a box of one
pixel) and decimated back to the pixel grid. This equals supersampling-then-binning in the limit
of infinite supersampling, at the cost of one extra real FFT pair.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft

from ..errors import InputError

__all__ = ["Optics", "noll_to_nm", "zernike", "PsfEngine", "DEFAULT_NOLL"]

#: The Zernike terms the default field model uses: defocus, astigmatism x2, coma x2,
#: trefoil x2, primary spherical (Noll 4-11).
DEFAULT_NOLL = (4, 5, 6, 7, 8, 9, 10, 11)

_TWO_PI = 2.0 * math.pi
# Complex64 working memory per FFT batch (bytes): bounds memory whatever the patch size.
_BATCH_BYTES = 48 * 2**20


@dataclass(frozen=True)
class Optics:
    """Optical set-up, lengths in micrometers.

    Attributes
    ----------
    pixel_size : float
        Lateral pixel size in the object plane (micrometers).
    na : float
        Numerical aperture.
    wavelength : float
        Emission wavelength (micrometers).
    n_immersion : float
        Refractive index of the immersion medium (``n`` of eq. (7)).
    z_step : float
        Axial spacing of z-stacks (micrometers).
    supersample : int or None
        Supersampling of the intensity grid; None chooses the smallest alias-free factor.
    """

    pixel_size: float = 0.065
    na: float = 1.49
    wavelength: float = 0.670
    n_immersion: float = 1.518
    z_step: float = 0.2
    supersample: int | None = None

    def __post_init__(self):
        for name in ("pixel_size", "na", "wavelength", "n_immersion", "z_step"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float, np.floating)) and np.isfinite(value) and value > 0):
                raise InputError(f"{name}={value!r} must be a positive, finite number")
        if self.na >= self.n_immersion:
            raise InputError(
                f"na={self.na!r} must be smaller than n_immersion={self.n_immersion!r} "
                "(the numerical aperture cannot exceed the immersion index)"
            )
        if self.supersample is not None and (int(self.supersample) != self.supersample
                                             or self.supersample < 1):
            raise InputError(f"supersample={self.supersample!r} must be a positive integer")

    @property
    def factor(self) -> int:
        """Supersampling factor used (alias-free intensity: ``s / p >= 4 NA / lambda``)."""
        if self.supersample is not None:
            return int(self.supersample)
        return max(1, math.ceil(self.pixel_size * 4.0 * self.na / self.wavelength - 1e-9))

    @property
    def airy_fwhm(self) -> float:
        """FWHM of the in-focus, unaberrated PSF, ``0.51 lambda / NA`` (micrometers)."""
        return 0.51 * self.wavelength / self.na

    @property
    def tan_max(self) -> float:
        """Tangent of the marginal ray angle in the immersion medium."""
        return self.na / math.sqrt(self.n_immersion**2 - self.na**2)

    def to_attrs(self) -> dict:
        return {
            "pixel_size_um": float(self.pixel_size),
            "z_step_um": float(self.z_step),
            "na": float(self.na),
            "wavelength_um": float(self.wavelength),
            "n_immersion": float(self.n_immersion),
            "supersample": None if self.supersample is None else int(self.supersample),
        }

    @classmethod
    def from_attrs(cls, a: dict) -> Optics:
        return cls(pixel_size=float(a["pixel_size_um"]), na=float(a["na"]),
                   wavelength=float(a["wavelength_um"]), n_immersion=float(a["n_immersion"]),
                   z_step=float(a.get("z_step_um", 0.2)),
                   supersample=None if a.get("supersample") is None else int(a["supersample"]))


def noll_to_nm(j: int) -> tuple[int, int]:
    """Radial order ``n`` and azimuthal frequency ``m`` of the Noll-indexed Zernike ``Z_j``.

    ``m > 0`` is a cosine term, ``m < 0`` a sine term (Noll 1976: even j cosine, odd j sine).
    ``Z_4`` defocus, ``Z_5`` oblique astigmatism (sin 2 theta), ``Z_6`` vertical astigmatism
    (cos 2 theta), ``Z_7`` / ``Z_8`` coma along y / x, ``Z_9`` / ``Z_10`` trefoil, ``Z_11``
    primary spherical.
    """
    if int(j) != j or j < 1:
        raise InputError(f"Noll index j={j!r} must be a positive integer")
    j = int(j)
    n, rest = 0, j - 1
    while rest > n:
        n += 1
        rest -= n
    m = (-1) ** j * ((n % 2) + 2 * ((rest + ((n + 1) % 2)) // 2))
    return n, m


def zernike(j: int, rho: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Noll-normalised Zernike polynomial (unit RMS over the unit disk), float64.

    ``theta`` is measured from the x axis (columns) towards the y axis (rows).
    """
    n, m = noll_to_nm(j)
    am = abs(m)
    radial = np.zeros_like(rho, dtype=np.float64)
    for k in range((n - am) // 2 + 1):
        c = (-1) ** k * math.factorial(n - k) / (
            math.factorial(k) * math.factorial((n + am) // 2 - k) * math.factorial((n - am) // 2 - k))
        radial += c * rho ** (n - 2 * k)
    if m == 0:
        return math.sqrt(n + 1) * radial
    ang = np.cos(am * theta) if m > 0 else np.sin(am * theta)
    return math.sqrt(2 * (n + 1)) * radial * ang


@functools.cache
def _smooth_sizes(limit: int = 1 << 14) -> np.ndarray:
    sizes = sorted({2**a * 3**b for a in range(1, 15) for b in range(0, 10) if 2**a * 3**b <= limit})
    return np.asarray(sizes)


def _fast_even(n: float) -> int:
    """Smallest even 3-smooth size ``2^a 3^b >= n`` (fast for pocketfft)."""
    sizes = _smooth_sizes()
    i = int(np.searchsorted(sizes, math.ceil(n)))
    return int(sizes[min(i, len(sizes) - 1)])


class PsfEngine:
    """Render stacks of pixel-integrated PSFs of one optical set-up and patch size.

    Parameters
    ----------
    optics : Optics
    size : int
        Side of the returned patches; the PSF centre (zero shift) is at index ``size // 2``.
    noll : sequence of int
        The Zernike terms whose coefficients (waves) the rows of ``zernike`` give.
    pad : float
        The periodic FFT window is at least ``pad * size`` pixels, so the PSF's tails that wrap
        around land well outside the returned patch.

    Notes
    -----
    The returned PSFs are normalised to sum one over the infinite plane (before cropping to
    ``size``): the sum over the periodic FFT window of the pixel-integrated intensity equals the
    integral over the plane, since the pixel-integrated intensity is band-limited below the
    sampling rate.
    """

    def __init__(self, optics: Optics, size: int, noll=DEFAULT_NOLL, *, pad: float = 2.0,
                 min_pupil_samples: float = 12.0, workers: int = -1):
        if isinstance(size, bool) or int(size) != size or size < 1:
            raise InputError(f"size={size!r} must be a positive integer")
        self.optics = optics
        self.size = int(size)
        self.noll = tuple(int(j) for j in noll)
        self.workers = workers
        p, s = optics.pixel_size, optics.factor
        radius = optics.na / optics.wavelength  # pupil radius (cycles / um)
        # window M (pixels): big enough for wrap-around and a well-sampled pupil disk
        m_pupil = min_pupil_samples / (radius * p)
        self.m = _fast_even(max(pad * size, m_pupil, 16))
        self.n = self.m * s
        df = 1.0 / (self.m * p)  # frequency step (cycles / um)
        f = sfft.fftfreq(self.n, d=p / s)
        fy, fx = np.meshgrid(f, f, indexing="ij")
        r = np.hypot(fy, fx)
        # anti-aliased pupil edge: transmission = covered fraction of the frequency sample
        amp = np.clip((radius - r) / df + 0.5, 0.0, 1.0)
        sel = np.flatnonzero(amp.ravel() > 0)
        self._index = sel
        self._amp = amp.ravel()[sel].astype(np.float32)
        rr, fyy, fxx = r.ravel()[sel], fy.ravel()[sel], fx.ravel()[sel]
        rho = np.minimum(rr / radius, 1.0)
        theta = np.arctan2(fyy, fxx)
        k = optics.n_immersion / optics.wavelength
        rows = [zernike(j, rho, theta) for j in self.noll]
        rows.append(np.sqrt(np.maximum(k**2 - rr**2, 0.0)) - k)  # defocus (waves per um)
        rows.append(-fyy * p)  # sub-pixel shift along y (waves per pixel)
        rows.append(-fxx * p)  # along x
        self._basis = np.asarray(rows, dtype=np.float64)
        fr = sfft.rfftfreq(self.n, d=p / s)
        self._pixel_tf = (np.sinc(f * p)[:, None] * np.sinc(fr * p)[None, :]).astype(np.float32)
        half = self.size // 2
        self._crop = (np.arange(self.size) - half) % self.m
        self._batch = max(1, int(_BATCH_BYTES // (8 * self.n * self.n)))

    @property
    def n_features(self) -> int:
        return len(self.noll) + 3

    def features(self, zernike_waves, defocus_um, shift_y=0.0, shift_x=0.0) -> np.ndarray:
        """Stack per-PSF parameters into the (n, J + 3) feature matrix of :meth:`render`."""
        zw = np.atleast_2d(np.asarray(zernike_waves, dtype=np.float64))
        n = zw.shape[0]
        cols = [np.broadcast_to(np.asarray(v, dtype=np.float64), (n,))
                for v in (defocus_um, shift_y, shift_x)]
        if zw.shape[1] != len(self.noll):
            raise InputError(f"zernike has {zw.shape[1]} columns, expected {len(self.noll)} "
                             f"(Noll {list(self.noll)})")
        return np.column_stack([zw, *cols])

    def render(self, feats: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """PSFs (n, size, size) float32 for rows ``[zernike..., defocus_um, dy_px, dx_px]``."""
        feats = np.asarray(feats, dtype=np.float64)
        n_psf = feats.shape[0]
        if out is None:
            out = np.empty((n_psf, self.size, self.size), dtype=np.float32)
        for start in range(0, n_psf, self._batch):
            stop = min(n_psf, start + self._batch)
            out[start:stop] = self._render_batch(feats[start:stop])
        return out

    def _render_batch(self, feats: np.ndarray) -> np.ndarray:
        b, n, s = feats.shape[0], self.n, self.optics.factor
        phase = (feats @ self._basis).astype(np.float32)
        phase *= np.float32(_TWO_PI)
        pupil = np.empty(phase.shape, dtype=np.complex64)
        np.cos(phase, out=pupil.real)
        np.sin(phase, out=pupil.imag)
        pupil *= self._amp
        grid = np.zeros((b, n * n), dtype=np.complex64)
        grid[:, self._index] = pupil
        field = sfft.ifft2(grid.reshape(b, n, n), overwrite_x=True, workers=self.workers)
        inten = field.real * field.real
        inten += field.imag * field.imag
        spec = sfft.rfft2(inten, workers=self.workers)
        spec *= self._pixel_tf
        inten = sfft.irfft2(spec, s=(n, n), workers=self.workers)
        if s > 1:
            inten = inten[:, ::s, ::s]
        inten /= inten.sum(axis=(1, 2), keepdims=True)
        c = self._crop
        return inten[:, c[:, None], c[None, :]]


@functools.lru_cache(maxsize=16)
def engine(optics: Optics, size: int, noll: tuple = DEFAULT_NOLL) -> PsfEngine:
    """A cached :class:`PsfEngine` (its set-up is reused across calls)."""
    return PsfEngine(optics, size, noll)
