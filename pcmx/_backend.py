"""THE NumPy/CuPy dispatch point of pcmx.

Every array operation that may run on a GPU asks this module which array library to use,
once, at its top: ``xp(x)`` for the array namespace, ``fft_module(x)`` for the FFTs and
``ndimage_module(x)`` for filters. A Dask array is dispatched by the type of its chunks
(``x._meta``), as dask-image does, so NumPy-backed and CuPy-backed Dask arrays take the same
code path as their chunks. CuPy is imported lazily, here only: pcmx never needs it unless a
CuPy array is handed to it.

Examples
--------
>>> import numpy as np
>>> from pcmx import _backend
>>> _backend.xp(np.zeros(3)) is np
True
>>> _backend.fft_module(np.zeros(3)).__name__
'scipy.fft'
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "xp",
    "is_cupy",
    "is_dask",
    "fft_module",
    "fft_kwargs",
    "ndimage_module",
    "asnumpy",
    "asarray_like",
    "unwrap",
    "cupy_available",
]


def _meta(x):
    """The array whose type decides the backend: a Dask array's chunk type, else ``x``."""
    data = getattr(x, "data", None)
    if data is not None and type(x).__module__.startswith("xarray"):
        x = data  # a DataArray: look at what it wraps
    return getattr(x, "_meta", x)


def is_cupy(x) -> bool:
    """True if ``x`` is a CuPy array, or a Dask array / DataArray of CuPy chunks."""
    return type(_meta(x)).__module__.split(".")[0] == "cupy"


def is_dask(x) -> bool:
    """True if ``x`` is a Dask array (or a DataArray wrapping one)."""
    data = getattr(x, "data", None)
    if data is not None and type(x).__module__.startswith("xarray"):
        x = data
    return type(x).__module__.split(".")[0] == "dask" and hasattr(x, "dask")


def xp(x):
    """The array namespace of ``x``: ``cupy`` for CuPy data, else ``numpy``.

    Parameters
    ----------
    x : array-like
        A NumPy or CuPy array, a Dask array (dispatched by its chunk type, ``x._meta``) or a
        DataArray wrapping any of these.

    Returns
    -------
    module
        ``numpy`` or ``cupy``.
    """
    if is_cupy(x):
        import cupy

        return cupy
    return np


def fft_module(x):
    """``scipy.fft`` for NumPy data, ``cupyx.scipy.fft`` for CuPy data (same function names)."""
    if is_cupy(x):
        import cupyx.scipy.fft

        return cupyx.scipy.fft
    import scipy.fft

    return scipy.fft


def fft_kwargs(module, workers: int | None = -1) -> dict:
    """Keyword arguments for the FFT calls of ``module``: ``workers`` for scipy.fft only.

    A negative ``workers`` means the ``threads`` option (:func:`pcmx.set_options`), not every
    core of the machine. cuFFT plans its own parallelism and ``cupyx.scipy.fft`` takes no
    ``workers`` argument.
    """
    if module.__name__.startswith("cupyx") or workers is None:
        return {}
    if workers < 0:
        from .options import get_options

        workers = get_options()["threads"]
    return {"workers": workers}


def ndimage_module(x):
    """``scipy.ndimage`` for NumPy data, ``cupyx.scipy.ndimage`` for CuPy data."""
    if is_cupy(x):
        import cupyx.scipy.ndimage

        return cupyx.scipy.ndimage
    import scipy.ndimage

    return scipy.ndimage


def asnumpy(x) -> np.ndarray:
    """A NumPy array from a NumPy or CuPy array (copies from the device if needed)."""
    if is_cupy(x):
        return x.get()
    return np.asarray(x)


def unwrap(x):
    """The array a DataArray wraps (NumPy, CuPy or Dask, not converted), else ``x`` itself.

    ``DataArray.values`` would copy CuPy data to the host (or fail); an op that keeps the
    caller's array library takes ``unwrap(x)`` and dispatches on it.
    """
    if type(x).__module__.startswith("xarray") and hasattr(x, "data"):
        return x.data
    return x


def asarray_like(a, like, dtype=None):
    """``a`` as an array of the same library (and device) as ``like``."""
    return xp(like).asarray(a, dtype=dtype)


def cupy_available() -> bool:
    """True if CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001  (ImportError, CUDARuntimeError without a driver, ...)
        return False
