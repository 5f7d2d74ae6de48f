"""Process-wide options of pcmx: :func:`set_options` and :func:`get_options` (as in xarray).

====================== ====================================================================
option                 meaning
====================== ====================================================================
``threads``            threads of pcmx's own pools: the tiles and elementwise products of
                       :class:`pcmx.ProductConvolution` in memory, and the local per-image
                       tasks of :func:`pcmx.learn_family` without a Client (default: the cores
                       this process may run on)
``blas_threads``       at most this many BLAS threads inside pcmx's dense linear algebra
                       (default None: leave BLAS as it is, apart from the small problems that
                       pcmx runs on one BLAS thread because that is faster)
``spectrum_cache_mb``  bound in MiB of the process-wide cache of kernel spectra (default 2048,
                       or the environment variable ``PCMX_SPECTRUM_CACHE_MB`` read at first
                       use); a smaller bound evicts at once
``progress``           show progress bars where a function's ``progress`` is left None
                       (default: True in an interactive session, a Jupyter kernel (widgets,
                       :mod:`tqdm.auto`) or an interactive interpreter; False in scripts,
                       batch jobs and tests; the command line shows them on a terminal)
====================== ====================================================================

Setting an option to None restores its default.
Defaults that depend on the machine (cores, environment) are read at first use, not at import.
This module imports nothing heavy and no other pcmx module but :mod:`pcmx.errors`; the
resources that follow the options (thread pools, the spectrum cache: :mod:`pcmx.execution`)
subscribe to changes with :func:`on_change`.
"""

from __future__ import annotations

import numbers
import os
import threading
from collections.abc import Callable

from .errors import InputError

__all__ = ["cpu_count", "get_options", "on_change", "set_options"]

_ENV_CACHE_MB = "PCMX_SPECTRUM_CACHE_MB"


def cpu_count() -> int:
    """The number of cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _default_cache_mb() -> int:
    text = os.environ.get(_ENV_CACHE_MB)
    if text is None:
        return 2048
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise InputError(f"environment variable {_ENV_CACHE_MB}={text!r}: expected a "
                         "non-negative integer (MiB)")
    return value


def _interactive() -> bool:
    """True in a Jupyter kernel or an interactive interpreter (the default of ``progress``)."""
    import sys

    if "IPython" in sys.modules:  # a notebook (tqdm.auto draws widgets) or IPython's shell
        try:
            from IPython import get_ipython

            if get_ipython() is not None:
                return True
        except Exception:  # noqa: BLE001
            pass
    return hasattr(sys, "ps1") or bool(getattr(sys.flags, "interactive", 0))


def _count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive" if minimum > 0 else "a non-negative"
        raise InputError(f"set_options: {name}={value!r}: expected {kind} integer or None")
    return int(value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"set_options: {name}={value!r}: expected True, False or None")
    return value


# name -> (validator of a value that is not None, default factory or None when None is a value)
_SPEC: dict[str, tuple[Callable, Callable[[], object]]] = {
    "threads": (lambda v: _count("threads", v, 1), cpu_count),
    "blas_threads": (lambda v: _count("blas_threads", v, 1), lambda: None),
    "spectrum_cache_mb": (lambda v: _count("spectrum_cache_mb", v, 0), _default_cache_mb),
    "progress": (lambda v: _flag("progress", v), _interactive),
    "any_pixel_size": (lambda v: _flag("any_pixel_size", v), lambda: False),
}

_SET: dict[str, object] = {}  # values set by the user; the others are defaults
_DEFAULTS: dict[str, object] = {}  # defaults, computed at first use
_WATCHERS: dict[str, list[Callable[[object], None]]] = {name: [] for name in _SPEC}
_LOCK = threading.Lock()


def _value(name: str):
    if name in _SET:
        return _SET[name]
    if name not in _DEFAULTS:
        _DEFAULTS[name] = _SPEC[name][1]()
    return _DEFAULTS[name]


def get_options() -> dict:
    """The current value of every option (a copy: changing it changes nothing).

    Returns
    -------
    dict
        ``{"threads": int, "blas_threads": int or None, "spectrum_cache_mb": int,
        "progress": bool, "any_pixel_size": bool}``, defaults resolved.

    Raises
    ------
    InputError
        ``PCMX_SPECTRUM_CACHE_MB`` is set to something other than a non-negative integer.
    """
    return {name: _value(name) for name in _SPEC}


def on_change(name: str, callback: Callable[[object], None]) -> None:
    """Call ``callback(new_value)`` whenever the value of option ``name`` changes.

    For the resources that follow an option (:mod:`pcmx.execution` registers its pools and
    the spectrum cache). Callbacks run in the thread that changed the option, after the change.

    Raises
    ------
    InputError
        ``name`` is not an option.
    """
    _check_names([name], "on_change")
    _WATCHERS[name].append(callback)


def _check_names(names, where: str) -> None:
    unknown = sorted(set(names) - set(_SPEC))
    if unknown:
        raise InputError(f"{where}: unknown option(s) {', '.join(unknown)}; the options are "
                         f"{', '.join(sorted(_SPEC))}")


def _assign(values: dict) -> None:
    """Set raw values (a missing marker restores the default) and notify the watchers."""
    with _LOCK:
        before = {name: _value(name) for name in values}
        for name, value in values.items():
            if value is None:
                _SET.pop(name, None)
            else:
                _SET[name] = value
        after = {name: _value(name) for name in values}
    for name in values:  # outside the lock: a watcher may read the options
        if after[name] != before[name]:
            for callback in _WATCHERS[name]:
                callback(after[name])


class set_options:  # noqa: N801  (a function to its users, as xarray.set_options)
    """Set pcmx options for the process, or for a ``with`` block.

    Parameters
    ----------
    threads : int, optional
        Threads of pcmx's own pools (tiles and elementwise products of in-memory operator
        applications, local per-image tasks). None: the cores this process may use.
    blas_threads : int, optional
        At most this many BLAS threads in pcmx's dense linear algebra. None: BLAS is left as
        it is (except where one thread is measured faster: small factorisations, parallel
        tasks).
    spectrum_cache_mb : int, optional
        Bound of the kernel-spectrum cache in MiB (0 keeps only the latest spectra); a
        smaller bound evicts at once. None: 2048, or ``PCMX_SPECTRUM_CACHE_MB``.
    progress : bool, optional
        Progress bars (:mod:`tqdm.auto`) on the steps that take more than a few seconds,
        where a function's ``progress`` argument is left None. None: on in a Jupyter kernel
        or an interactive interpreter, off in scripts, batch jobs and tests.
    any_pixel_size : bool, optional
        Accept pixel sizes outside the range of optical microscopy (1 nm to 100 um) wherever
        one is parsed (other optics, e.g. a telescope's image-plane pixels; the command
        line's ``--any-pixel-size``). False by default.

    Raises
    ------
    InputError
        An unknown option or a value of the wrong type or range (the message names it);
        nothing is changed then.

    Examples
    --------
    >>> import pcmx
    >>> with pcmx.set_options(threads=1):
    ...     pcmx.get_options()["threads"]
    1
    >>> pcmx.set_options(spectrum_cache_mb=512)  # doctest: +ELLIPSIS
    <pcmx.options.set_options object at ...>
    >>> pcmx.set_options(spectrum_cache_mb=None)  # doctest: +ELLIPSIS
    <pcmx.options.set_options object at ...>
    """

    def __init__(self, **options) -> None:
        _check_names(options, "set_options")
        new = {name: None if value is None else _SPEC[name][0](value)
               for name, value in options.items()}
        self._old = {name: _SET.get(name) for name in new}
        _assign(new)

    def __enter__(self) -> set_options:
        return self

    def __exit__(self, *exc) -> None:
        _assign(self._old)
