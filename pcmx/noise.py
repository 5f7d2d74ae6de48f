"""Noise levels of images: the one place pcmx estimates a noise standard deviation.

Three estimates of one idea, a robust standard deviation that the sparse bright things of a
microscope image (beads, point sources) do not move:

* :func:`robust_sigma`: ``1.4826 x`` the median absolute deviation of any values (a filter
  response, a residual); bead detection thresholds the Laplacian response with it (paper
  App. A-a) and the background estimator masks outliers with it (App. B);
* :func:`estimate_noise`: the noise of an image's typical pixel from Immerkaer's high-pass
  filter (constant, linear and most smooth backgrounds cancel), which sets the default
  weights of Sparse+Smooth deblurring and of the baselines (App. D-b);
* :func:`quantisation_step`: 1 for integer-valued images, whose rounding sets a noise floor
  ``1 / sqrt(12)`` below which no estimate should fall (a noise-free simulation saved as
  integers would otherwise give 0).

Each accepts NumPy or CuPy data (dispatched by :mod:`pcmx._backend`) and returns a Python
float.
"""

from __future__ import annotations

import numpy as np

from . import _backend
from .errors import InputError

__all__ = ["robust_sigma", "estimate_noise", "quantisation_step", "MAD_TO_SIGMA", "ROBUST_SAMPLES"]

MAD_TO_SIGMA = 1.4826
"""``1 / Phi^-1(3/4)``: the median absolute deviation of ``N(0, sigma^2)`` is ``sigma / 1.4826``."""
ROBUST_SAMPLES = 500_000
"""Default number of values above which :func:`robust_sigma` uses a strided subsample."""
_HALF_NORMAL_MEDIAN = 0.6745  # the median of |N(0, 1)|
_IMMERKAER_NORM = 6.0  # the l2 norm of Immerkaer's kernel [[1, -2, 1], [-2, 4, -2], [1, -2, 1]]


def robust_sigma(values, *, max_samples: int | None = ROBUST_SAMPLES) -> float:
    """Robust standard deviation: ``1.4826 x`` the median absolute deviation about the median.

    Parameters
    ----------
    values : array_like (any shape), NumPy or CuPy
        The samples, e.g. a filter response or a residual image.
    max_samples : int or None
        Above this many values a strided subsample (the same stride along every axis, about
        ``max_samples`` values) is used: the median of half a million values is as good as
        that of all, and much cheaper on a camera frame. None uses every value.

    Returns
    -------
    float
        ``sigma`` for Gaussian values; bright sparse outliers (beads) barely move it.

    Notes
    -----
    Used for the detection threshold of bead detection (paper App. A-a), the outlier masks of
    the background estimator (App. B) and the automatic threshold of
    :func:`pcmx.deblur.find_sources`.
    """
    v = _backend.unwrap(values)
    xp = _backend.xp(v)
    v = xp.asarray(v)
    if max_samples is not None:
        step = max(1, int(np.ceil((v.size / max_samples) ** (1 / v.ndim))))
        if step > 1:
            v = v[tuple(slice(None, None, step) for _ in range(v.ndim))]
    v = v.ravel()
    med = xp.median(v)
    return float(MAD_TO_SIGMA * xp.median(xp.abs(v - med)))


def quantisation_step(image) -> float:
    """1 for integer-valued images (their rounding is a noise floor), 0 otherwise.

    Parameters
    ----------
    image : array_like, NumPy or CuPy
        Any image; about 100 000 of its pixels (a strided sample) are tested.

    Returns
    -------
    float
        1.0 when every sampled pixel is an integer, else 0.0. The rounding noise of a step
        ``q`` has standard deviation ``q / sqrt(12)``.
    """
    a = _backend.unwrap(image)
    xp = _backend.xp(a)
    sample = xp.asarray(a).ravel()[:: max(1, a.size // 100_000)]
    return 1.0 if bool(xp.all(sample == xp.round(sample))) else 0.0


def estimate_noise(image) -> float:
    """Robust standard deviation of the noise of a 2D image (paper App. D-b's default weights).

    The image is filtered with the high-pass kernel ``[[1, -2, 1], [-2, 4, -2], [1, -2, 1]]``
    (Immerkaer 1996), which cancels constant, linear and most of a smooth background, and the
    median absolute value of the result is divided by ``0.6745 * 6`` (6 is the kernel's l2
    norm, 0.6745 the median of ``|N(0, 1)|``). With Poisson noise this is the noise of the
    typical (background) pixel: a median ignores the sparse bright sources.

    Parameters
    ----------
    image : array_like or DataArray (y, x), NumPy or CuPy
        At least 3 x 3 pixels; float32 is used.

    Returns
    -------
    float
        ``sigma``, in the image's units.

    Raises
    ------
    InputError
        If the image is not 2D or is smaller than 3 x 3.
    """
    a = _backend.unwrap(image)
    xp = _backend.xp(a)
    y = xp.asarray(a, dtype=np.float32)
    if y.ndim != 2 or min(y.shape) < 3:
        raise InputError(f"image: estimate_noise needs a 2D image of at least 3 x 3, got shape {y.shape}")
    hp = (y[:-2, :-2] - 2 * y[:-2, 1:-1] + y[:-2, 2:]
          - 2 * y[1:-1, :-2] + 4 * y[1:-1, 1:-1] - 2 * y[1:-1, 2:]
          + y[2:, :-2] - 2 * y[2:, 1:-1] + y[2:, 2:])
    return float(xp.median(xp.abs(hp))) / (_HALF_NORMAL_MEDIAN * _IMMERKAER_NORM)
