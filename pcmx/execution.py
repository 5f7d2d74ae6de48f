"""Where pcmx's work runs: thread pools, BLAS thread limits, the spectrum cache, tasks, progress.

Everything process-wide lives here and follows :func:`pcmx.set_options`:

* :func:`thread_pool`: the pool of ``threads`` workers that runs the tiles and elementwise
  products of :class:`pcmx.ProductConvolution`; made at first use, remade when ``threads``
  changes, shut down by :func:`shutdown` and at interpreter exit;
* :func:`blas_limit`: the one place that changes BLAS threads (``threadpoolctl``), capped by
  ``blas_threads``;
* :data:`spectrum_cache`: the LRU cache of kernel spectra, bounded by ``spectrum_cache_mb``
  (read at each eviction; a smaller bound evicts at once);
* :func:`run_tasks` and :func:`compute_many`: independent tasks on a ``dask.distributed``
  Client, in a local thread pool or in turn, with a progress bar (:func:`progress_bar`,
  ``progress``).
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

from threadpoolctl import threadpool_limits

from .options import get_options, on_change

__all__ = [
    "ByteCache",
    "active_client",
    "blas_limit",
    "compute_many",
    "progress_bar",
    "run_tasks",
    "show_progress",
    "shutdown",
    "spectrum_cache",
    "task_workers",
    "thread_pool",
]


# --------------------------------------------------------------------------------------------
# BLAS threads
# --------------------------------------------------------------------------------------------
def blas_limit(n: int | None):
    """A context in which BLAS runs on at most ``n`` threads (None: as many as it has).

    Small dense problems (a few hundred beads: QR, ``eigh``, banded Cholesky) are fastest on
    one BLAS thread, and far slower with several on a busy machine (OpenBLAS threads
    spinning: eigh of 590 x 590 took 0.04-0.06 s on one thread, 4.1-5.2 s on two beside one
    busy process). Tasks running in parallel threads of this process also take one BLAS thread
    each: on 2 cores the Gram of a (100, 331776) block took 4.6 s with 2 BLAS threads and
    0.17 s with one. (Workers of a ``dask.distributed`` nanny start with one BLAS thread.)

    Parameters
    ----------
    n : int or None
        Threads the caller wants at most. The option ``blas_threads``, when set, caps it
        (``n=None`` then means ``blas_threads``).

    Returns
    -------
    context manager
        A ``threadpoolctl.threadpool_limits`` on the BLAS libraries, or a context that does
        nothing when there is no limit.
    """
    cap = get_options()["blas_threads"]
    limit = n if cap is None else cap if n is None else min(int(n), cap)
    if limit is None:
        return contextlib.nullcontext()
    return threadpool_limits(int(limit), user_api="blas")


# --------------------------------------------------------------------------------------------
# The thread pool of the operator engine
# --------------------------------------------------------------------------------------------
_POOL: cf.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def thread_pool() -> cf.ThreadPoolExecutor:
    """The process's pool of ``threads`` workers (made at first use, remade on a change).

    Its tasks must not submit to it in turn (they would wait for themselves).
    """
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = cf.ThreadPoolExecutor(max_workers=get_options()["threads"],
                                          thread_name_prefix="pcmx")
        return _POOL


def shutdown(wait: bool = True) -> None:
    """Shut the thread pool down (the next parallel operation makes a new one).

    Parameters
    ----------
    wait : bool
        Wait for the tasks already submitted to finish. Called at interpreter exit.
    """
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.shutdown(wait=wait)


atexit.register(shutdown)
# the work already submitted to the old pool finishes; new work goes to a pool of the new size
on_change("threads", lambda _: shutdown(wait=False))


# --------------------------------------------------------------------------------------------
# The kernel-spectrum cache (per process; shared by all operators and threads)
# --------------------------------------------------------------------------------------------
class ByteCache:
    """An LRU cache bounded in bytes, safe under threads.

    Parameters
    ----------
    max_bytes : callable
        Returns the bound, read at each eviction (so it may follow an option).

    Notes
    -----
    A value larger than the bound is still kept until the next one is stored (the one just
    computed is always kept); :meth:`evict` applies the bound to every entry.
    """

    def __init__(self, max_bytes: Callable[[], int]) -> None:
        self._max_bytes = max_bytes
        self._data: OrderedDict = OrderedDict()
        self._nbytes = 0
        self._lock = threading.RLock()  # a factory may read the cache (conjugate spectra)

    @property
    def max_bytes(self) -> int:
        """The bound in bytes, now."""
        return int(self._max_bytes())

    @property
    def nbytes(self) -> int:
        """Bytes held (the sum of the values' ``nbytes``)."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Hashable, factory: Callable):
        """The value under ``key``, made by ``factory()`` and stored when missing."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
            value = factory()
            self._data[key] = value
            self._nbytes += int(value.nbytes)
            self._evict(keep=1)
            return value

    def evict(self) -> None:
        """Drop the least recently used values until the cache is within its bound."""
        self._evict(keep=0)

    def _evict(self, keep: int) -> None:
        with self._lock:
            bound = self.max_bytes
            while self._nbytes > bound and len(self._data) > keep:
                _, old = self._data.popitem(last=False)
                self._nbytes -= int(old.nbytes)

    def clear(self) -> None:
        """Drop every value."""
        with self._lock:
            self._data.clear()
            self._nbytes = 0


#: The kernel spectra of :class:`pcmx.ProductConvolution`, bounded by ``spectrum_cache_mb``.
spectrum_cache = ByteCache(lambda: get_options()["spectrum_cache_mb"] * 2**20)
on_change("spectrum_cache_mb", lambda _: spectrum_cache.evict())


# --------------------------------------------------------------------------------------------
# Tasks and progress
# --------------------------------------------------------------------------------------------
def active_client(client=None):
    """``client``, else the default ``dask.distributed`` Client if one is running, else None."""
    if client is not None:
        return client
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return default_client()
    except ValueError:
        return None


def task_workers(workers: int | None = None) -> int:
    """Threads for local tasks: ``workers``, else dask's ``num_workers``, else ``threads``."""
    if workers is not None:
        return int(workers)
    import dask

    return int(dask.config.get("num_workers", None) or get_options()["threads"])


def show_progress(progress: bool | None) -> bool:
    """``progress``, or the option ``progress`` when it is None."""
    return bool(get_options()["progress"] if progress is None else progress)


def progress_bar(progress: bool | None, total: int, desc: str, unit: str):
    """A :mod:`tqdm.auto` bar (terminal or notebook), disabled unless ``progress``.

    ``progress=None`` takes the option ``progress``.
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not show_progress(progress),
                leave=True)


def run_tasks(fn, arglists: list, *, desc: str, progress: bool | None = None, client=None,
              workers: int | None = None, unit: str = "image") -> list:
    """``[fn(*args) for args in arglists]`` on a Client, in a local thread pool or in turn.

    Parameters
    ----------
    fn : callable
        Picklable when ``client`` is given.
    arglists : list of tuple
    desc, unit : str
        The progress bar's label and unit.
    progress : bool, optional
        One tick per finished task (None: the option ``progress``).
    client : distributed.Client, optional
        Run the tasks there (``pure=False``); the unfinished ones are cancelled on an error.
    workers : int, optional
        Without a Client: threads of a pool that lives for this call, each task on one BLAS
        thread (:func:`task_workers` when None); 1 runs the tasks in turn.

    Returns
    -------
    list
        The results in the order of ``arglists``.
    """
    out = [None] * len(arglists)
    workers = task_workers(workers)
    with progress_bar(progress, len(arglists), desc, unit) as bar:
        if client is not None:
            from distributed import as_completed

            futs = [client.submit(fn, *args, pure=False) for args in arglists]
            index = {f.key: i for i, f in enumerate(futs)}
            try:
                for f in as_completed(futs):
                    out[index[f.key]] = f.result()
                    bar.update(1)
            finally:
                client.cancel([f for f in futs if not f.done()])
        elif workers <= 1 or len(arglists) <= 1:
            for i, args in enumerate(arglists):
                out[i] = fn(*args)
                bar.update(1)
        else:
            with blas_limit(1), cf.ThreadPoolExecutor(max_workers=workers) as ex:
                futs = {ex.submit(fn, *args): i for i, args in enumerate(arglists)}
                try:
                    for f in cf.as_completed(futs):
                        out[futs[f]] = f.result()
                        bar.update(1)
                except BaseException:
                    for f in futs:
                        f.cancel()
                    raise
    return out


def compute_many(items: list, *, desc: str, progress: bool | None = None, client=None,
                 unit: str = "block") -> list:
    """Compute dask delayed objects, one progress tick per finished item.

    On a Client with ``client.compute``; else with dask's local scheduler, on one BLAS thread
    per task when there are several.

    Returns
    -------
    list
        The results in the order of ``items``.
    """
    import dask

    out = [None] * len(items)
    with progress_bar(progress, len(items), desc, unit) as bar:
        if client is not None:
            from distributed import as_completed

            futs = client.compute(items)
            index = {f.key: i for i, f in enumerate(futs)}
            for f in as_completed(futs):
                out[index[f.key]] = f.result()
                bar.update(1)
            return out
        from dask.callbacks import Callback

        keys = {it.key for it in items}  # dask.delayed objects

        class _Tick(Callback):
            def _posttask(self, key, result, dsk, state, id):  # noqa: A002
                if key in keys:
                    bar.update(1)

        with _Tick(), blas_limit(1 if len(items) > 1 else None):
            res = dask.compute(*items)
        return list(res)
