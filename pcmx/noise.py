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
  integers would otherwise give 0): :func:`noise_floor`;
* :func:`clipping_plateau`: the values at which an image was clipped (a background clipped
  to a constant by an 8-bit conversion, saturation), found from the histogram whatever the
  dtype; :func:`estimate_noise` leaves those pixels out and never goes below the floor, and
  warns (:class:`pcmx.PcmxWarning`) when its estimate is degenerate.

Each accepts NumPy or CuPy data (dispatched by :mod:`pcmx._backend`) and returns a Python
float.
"""

from __future__ import annotations

import warnings

import numpy as np

from . import _backend
from .errors import InputError
from .io.readers import PcmxWarning

__all__ = ["robust_sigma", "estimate_noise", "quantisation_step", "noise_floor", "clipping_plateau",
           "MAD_TO_SIGMA", "ROBUST_SAMPLES", "PLATEAU_FRACTION", "PLATEAU_JUMP", "PLATEAU_TAIL",
           "MIN_UNCLIPPED", "MOST_CLIPPED"]

MAD_TO_SIGMA = 1.4826
"""``1 / Phi^-1(3/4)``: the median absolute deviation of ``N(0, sigma^2)`` is ``sigma / 1.4826``."""
ROBUST_SAMPLES = 500_000
"""Default number of values above which :func:`robust_sigma` uses a strided subsample."""
PLATEAU_FRACTION = 0.05
"""Least share of the pixels at one extreme value for :func:`clipping_plateau` to call it a plateau."""
PLATEAU_JUMP = 2.0
"""A plateau holds at least this many times the pixels of the next value inwards (a spike)."""
PLATEAU_TAIL = 0.01
"""The plateau values are looked for at this quantile and its complement (stray pixels beyond)."""
MIN_UNCLIPPED = 100
"""Fewest high-pass responses off a plateau that :func:`estimate_noise` takes a median of."""
MOST_CLIPPED = 0.5
"""Clipped share of an image above which :func:`estimate_noise` warns."""
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


def noise_floor(image) -> float:
    """The standard deviation of rounding to the image's quantisation step: ``q / sqrt(12)``.

    Parameters
    ----------
    image : array_like, NumPy or CuPy

    Returns
    -------
    float
        ``q / sqrt(12)`` with ``q`` = :func:`quantisation_step` (0.2887 for integer-valued
        images, 0 for others): the variance of an error spread uniformly over one step is
        ``q^2 / 12``. No noise estimate of a quantised image should fall below it.
    """
    return quantisation_step(image) / np.sqrt(12.0)


def clipping_plateau(image) -> dict:
    """The clipping plateaus of an image: a large share of its pixels at one extreme value.

    A camera or a conversion (to 8 bits, to non-negative values) that clips sets every
    value beyond a level to that level: the histogram then holds a spike at its low or
    high end. The low end is the value ``v`` at the 1st percentile (:data:`PLATEAU_TAIL`:
    a few dead or hot pixels beyond the plateau do not hide it) and it is a plateau when at
    least :data:`PLATEAU_FRACTION` of the pixels equal ``v`` exactly and at least
    :data:`PLATEAU_JUMP` times as many as equal the next value inwards (a spike, not the
    slope of a histogram: the zeros of a photon-counting image with a mean of one photon
    are not a plateau). The high end likewise, from the 99th percentile.

    Parameters
    ----------
    image : array_like, NumPy or CuPy
        Any image; a strided sample of about :data:`ROBUST_SAMPLES` pixels is tested.

    Returns
    -------
    dict
        ``low``, ``high``: the plateau values (float) or None; ``low_fraction``,
        ``high_fraction``: the shares of the pixels at them (0 without a plateau);
        ``fraction``: their sum, the clipped share of the image.
    """
    a = _backend.unwrap(image)
    xp = _backend.xp(a)
    v = xp.asarray(a).ravel()
    v = xp.sort(v[:: max(1, v.size // ROBUST_SAMPLES)])
    n = int(v.size)
    out = {"low": None, "high": None, "low_fraction": 0.0, "high_fraction": 0.0, "fraction": 0.0}
    if n == 0:
        return out
    for end, q in (("low", PLATEAU_TAIL), ("high", 1.0 - PLATEAU_TAIL)):
        value = v[min(n - 1, int(q * (n - 1)))]
        first = int(xp.searchsorted(v, value, side="left"))
        last = int(xp.searchsorted(v, value, side="right"))
        count = last - first
        if end == "low":
            inward = v[last:]
        else:
            inward = v[:first][::-1]
        if inward.size:
            nxt = inward[0]
            n_next = int(xp.count_nonzero(inward == nxt))
        else:
            n_next = 0
        if count >= PLATEAU_FRACTION * n and count >= PLATEAU_JUMP * n_next:
            if end == "high" and out["low"] is not None and float(value) == out["low"]:
                continue  # a constant image: one plateau, counted once
            out[end] = float(value)
            out[f"{end}_fraction"] = count / n
    out["fraction"] = out["low_fraction"] + out["high_fraction"]
    return out


def _immerkaer(y):
    """Immerkaer's high-pass response, shape ``(ny - 2, nx - 2)``."""
    return (y[:-2, :-2] - 2 * y[:-2, 1:-1] + y[:-2, 2:]
            - 2 * y[1:-1, :-2] + 4 * y[1:-1, 1:-1] - 2 * y[1:-1, 2:]
            + y[2:, :-2] - 2 * y[2:, 1:-1] + y[2:, 2:])


def estimate_noise(image, *, return_info: bool = False, warn: bool = True):
    """Robust standard deviation of the noise of a 2D image (paper App. D-b's default weights).

    The image is filtered with the high-pass kernel ``[[1, -2, 1], [-2, 4, -2], [1, -2, 1]]``
    (Immerkaer 1996), which cancels constant, linear and most of a smooth background, and the
    median absolute value of the result is divided by ``0.6745 * 6`` (6 is the kernel's l2
    norm, 0.6745 the median of ``|N(0, 1)|``). With Poisson noise this is the noise of the
    typical (background) pixel: a median ignores the sparse bright sources.

    Quantised or clipped data (8-bit conversions, a background clipped to a constant) break
    that median: the response is 0 wherever a 3 x 3 neighbourhood is flat. The rule is:

    1. pixels at a clipping plateau (:func:`clipping_plateau`) carry no noise: when there is
       one, the median is taken over the responses whose 3 x 3 neighbourhood has no plateau
       pixel (at least :data:`MIN_UNCLIPPED` of them, else there is no estimate);
    2. the result is ``max(estimate, q / sqrt(12))`` with the quantisation floor of
       :func:`noise_floor` (rounding to a step ``q`` adds a uniform error of that standard
       deviation: no quantised image is less noisy than that).

    Float data with neither plateau nor quantisation gives the plain estimate, unchanged.
    When the estimate is degenerate (0 or none before the floor, below the floor, or most
    pixels at a plateau) a :class:`pcmx.PcmxWarning` names the cause and the value used, on
    one line (the ``warning`` of the info dict).

    Parameters
    ----------
    image : array_like or DataArray (y, x), NumPy or CuPy
        At least 3 x 3 pixels; float32 is used.
    return_info : bool
        Return a dict describing the estimate instead of the float.
    warn : bool
        Emit the warning (False: only put it in the info dict).

    Returns
    -------
    float or dict
        ``sigma``, in the image's units. With ``return_info``: ``sigma``; ``estimate`` (the
        high-pass estimate before the floor, None when too few pixels are off the plateau);
        ``quantisation_step``, ``floor``; ``clipped_fraction``, ``plateau_low``,
        ``plateau_high`` (:func:`clipping_plateau`); ``pixels_used`` (responses in the
        median); ``floor_used``; ``source`` (``"highpass"``, ``"highpass_off_plateau"``,
        ``"quantisation_floor"`` or ``"none"`` when sigma is 0); ``warning`` (str or None).

    Raises
    ------
    InputError
        If the image is not 2D or is smaller than 3 x 3.

    Notes
    -----
    Measured on 8-bit data with the background clipped to a constant (docs/deblurring.md):
    the real wide-field plane 17 (92% of its pixels at 2) gave 0 before this rule and gives
    the floor 0.289 now; simulated 8-bit beads give 1.4x the true noise with 70% clipped and
    up to 4.4x with 90% clipped (the pixels off the plateau are mostly beads, whose curvature
    the high-pass filter sees as noise).
    """
    a = _backend.unwrap(image)
    xp = _backend.xp(a)
    y = xp.asarray(a, dtype=np.float32)
    if y.ndim != 2 or min(y.shape) < 3:
        raise InputError(f"image: estimate_noise needs a 2D image of at least 3 x 3, got shape {y.shape}")
    hp = xp.abs(_immerkaer(y))
    plateau = clipping_plateau(y)
    if plateau["low"] is None and plateau["high"] is None:
        estimate = float(xp.median(hp)) / (_HALF_NORMAL_MEDIAN * _IMMERKAER_NORM)
        used = int(hp.size)
    else:
        flat = xp.zeros(y.shape, dtype=bool)
        for value in (plateau["low"], plateau["high"]):
            if value is not None:
                flat |= y == np.float32(value)
        ny, nx = y.shape
        touched = xp.zeros(hp.shape, dtype=bool)
        for dy in range(3):
            for dx in range(3):
                touched |= flat[dy:ny - 2 + dy, dx:nx - 2 + dx]
        kept = hp[~touched]
        used = int(kept.size)
        estimate = (float(xp.median(kept)) / (_HALF_NORMAL_MEDIAN * _IMMERKAER_NORM)
                    if used >= MIN_UNCLIPPED else None)
    q = quantisation_step(y)
    floor = float(q / np.sqrt(12.0))
    floor_used = estimate is None or estimate < floor
    sigma = float(floor if floor_used else estimate)
    if sigma == 0:
        source = "none"
    elif floor_used:
        source = "quantisation_floor"
    else:
        source = "highpass" if plateau["fraction"] == 0 else "highpass_off_plateau"
    message = _degenerate_message(sigma, estimate, q, floor, plateau, used)
    if message is not None and warn:
        warnings.warn(message, PcmxWarning, stacklevel=2)
    if not return_info:
        return sigma
    return {"sigma": sigma, "estimate": estimate, "quantisation_step": q, "floor": floor,
            "clipped_fraction": plateau["fraction"], "plateau_low": plateau["low"],
            "plateau_high": plateau["high"], "pixels_used": used, "floor_used": bool(floor_used),
            "source": source, "warning": message}


def _degenerate_message(sigma: float, estimate, q: float, floor: float, plateau: dict,
                        used: int) -> str | None:
    """The one-line warning of :func:`estimate_noise`, or None when the estimate is sound."""
    causes = []
    if plateau["fraction"] >= MOST_CLIPPED:
        values = " and ".join(f"{v:g}" for v in (plateau["low"], plateau["high"]) if v is not None)
        causes.append(f"{plateau['fraction']:.1%} of the pixels sit at a clipping plateau ({values})")
    where = "off the plateau" if plateau["fraction"] > 0 else "of the image"
    if estimate is None:
        causes.append(f"only {used} pixels {where} (fewer than {MIN_UNCLIPPED}): no estimate")
    elif estimate == 0:
        causes.append(f"the high-pass response is 0 on most pixels {where} (estimate 0)")
    elif estimate < floor:
        causes.append(f"the estimate {estimate:.3g} {where} is below the quantisation floor")
    if not causes:
        return None
    if sigma == 0:
        used_text = ("sigma = 0, the image is not integer-valued so there is no quantisation floor: "
                     "give the noise level (sigma= or gamma1=) explicitly")
    elif estimate is None or estimate < floor:
        used_text = f"using the quantisation floor q/sqrt(12) = {floor:.3g} (q = {q:g})"
    else:
        used_text = f"using {sigma:.3g}, estimated on the {used} pixels off the plateau"
    return f"noise estimate: {'; '.join(causes)}; {used_text}"
