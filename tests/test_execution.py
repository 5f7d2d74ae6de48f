"""pcmx.execution: the pool, BLAS limits, the spectrum cache and tasks follow the options."""

from __future__ import annotations

import subprocess
import sys
import threading

import dask
import numpy as np
import pytest
import xarray as xr
from threadpoolctl import threadpool_info

import pcmx
from pcmx import execution
from pcmx.operator import ProductConvolution, clear_cache
from pcmx.units import kernel_coords, spatial_coords


def _blas_threads() -> int:
    return max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")


# ------------------------------------------------------------------------------ BLAS
def test_blas_limit_limits_and_follows_the_option():
    outside = _blas_threads()
    if outside < 2:
        pytest.skip("BLAS runs on one thread here: a limit cannot be seen")
    with execution.blas_limit(1):
        assert _blas_threads() == 1
    assert _blas_threads() == outside
    with execution.blas_limit(None):  # no option: BLAS left alone
        assert _blas_threads() == outside
    with pcmx.set_options(blas_threads=1):
        with execution.blas_limit(None):  # the option caps "as many as it has"
            assert _blas_threads() == 1
        with execution.blas_limit(2):  # and a larger request
            assert _blas_threads() == 1
    assert _blas_threads() == outside


# ------------------------------------------------------------------------------ the pool
def _concurrent(pool, n: int) -> bool:
    """Whether ``n`` tasks of ``pool`` run at the same time (they meet at a barrier)."""
    barrier = threading.Barrier(n, timeout=2)

    def meet(_):
        try:
            barrier.wait()
            return True
        except threading.BrokenBarrierError:
            return False

    return all(pool.map(meet, range(n)))


def test_pool_is_sized_by_threads_and_remade_on_change():
    with pcmx.set_options(threads=3):
        pool = execution.thread_pool()
        assert execution.thread_pool() is pool
        assert _concurrent(pool, 3)
        with pcmx.set_options(threads=3):  # same value: same pool
            assert execution.thread_pool() is pool
        with pcmx.set_options(threads=1):
            small = execution.thread_pool()
            assert small is not pool
            with pytest.raises(RuntimeError, match="shutdown"):
                pool.submit(int)
            assert not _concurrent(small, 2)
        assert execution.thread_pool() is not small


def test_shutdown_and_a_fresh_pool_after_it():
    pool = execution.thread_pool()
    assert pool.submit(lambda: 6 * 7).result() == 42
    execution.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(int)
    assert not any(t.is_alive() for t in pool._threads)
    again = execution.thread_pool()
    assert again is not pool and again.submit(lambda: 5).result() == 5


def test_pool_is_shut_down_at_exit():
    # an exit handler registered before pcmx.execution is imported runs after its own
    code = ("import atexit\n"
            "pools = []\n"
            "atexit.register(lambda: print('shut', pools[0]._shutdown))\n"
            "from pcmx import execution\n"
            "pools.append(execution.thread_pool())\n"
            "print(pools[0].submit(lambda: 3).result())\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["3", "shut", "True"]


# ------------------------------------------------------------------------------ spectrum cache
def _operator(shape=(200, 200), ksize=(31, 31), n=4) -> xr.Dataset:
    rng = np.random.default_rng(1)
    h = rng.random((n, *ksize)).astype(np.float32)
    a = rng.random((n, *shape)).astype(np.float32)
    coords = {"component": np.arange(n), **kernel_coords(ksize, 0.1, ("ky", "kx")),
              **spatial_coords(shape, 0.1, ("y", "x"))}
    return xr.Dataset({"psf_basis": (("component", "ky", "kx"), h),
                       "coefficients": (("component", "y", "x"), a)},
                      coords=coords, attrs={"pcmx_type": "operator"})


def test_spectrum_cache_follows_its_option_at_once():
    clear_cache()
    cache = execution.spectrum_cache
    ds = _operator()
    u = np.random.default_rng(2).random((200, 200)).astype(np.float32)
    with pcmx.set_options(spectrum_cache_mb=64):
        ops = {b: ProductConvolution(ds, boundary=b, workers=None) for b in ("zero", "reflect")}
        first = {b: op.apply(u) for b, op in ops.items()}
        ops["zero"].adjoint(u)  # the conjugate spectra: a third entry
        assert len(cache) == 3
        full = cache.nbytes
        # 4 complex64 spectra of about 230 x 116: ~0.85 MiB per entry
        assert 2 * 2**20 < full <= 64 * 2**20 and cache.max_bytes == 64 * 2**20
        pcmx.set_options(spectrum_cache_mb=1)
        assert 0 < cache.nbytes <= 2**20 < full and len(cache) == 1
        for b, op in ops.items():  # recomputed spectra: the same images
            np.testing.assert_array_equal(op.apply(u), first[b])
        assert len(cache) == 1 and cache.nbytes <= 2**20
        pcmx.set_options(spectrum_cache_mb=0)
        assert cache.nbytes == 0 and len(cache) == 0
        ops["zero"].apply(u)  # the spectra just made are kept while they are used
        assert len(cache) == 1
    assert cache.max_bytes == pcmx.get_options()["spectrum_cache_mb"] * 2**20
    clear_cache()
    assert cache.nbytes == 0 and len(cache) == 0


def test_byte_cache_is_least_recently_used():
    bound = [12]
    cache = execution.ByteCache(lambda: bound[0])
    made = []

    def make(k):
        def factory():
            made.append(k)
            return np.zeros(4, np.uint8)
        return factory

    for k in "abc":
        cache.get(k, make(k))
    cache.get("a", make("a"))  # a hit: "a" becomes the newest
    cache.get("d", make("d"))  # 16 bytes > 12: the least recently used ("b") goes
    assert made == ["a", "b", "c", "d"] and cache.nbytes == 12 and len(cache) == 3
    cache.get("a", make("a"))
    cache.get("c", make("c"))
    cache.get("b", make("b"))  # "d" goes
    assert made == ["a", "b", "c", "d", "b"]
    cache.get("d", make("d"))
    assert made == ["a", "b", "c", "d", "b", "d"]
    bound[0] = 3
    cache.evict()
    assert cache.nbytes == 0


def test_operator_threads_follow_the_option(monkeypatch):
    import pcmx.operator

    ds = _operator(shape=(300, 300), ksize=(9, 9), n=2)
    u = np.random.default_rng(3).random((300, 300)).astype(np.float32)
    ref = ProductConvolution(ds, workers=None).apply(u)
    used = []

    def spy():
        pool = execution.thread_pool()
        used.append(pool._max_workers)
        return pool

    monkeypatch.setattr(pcmx.operator, "thread_pool", spy)
    with pcmx.set_options(threads=1):
        one = ProductConvolution(ds).apply(u)
        assert used == []  # one thread: no pool
        assert ProductConvolution(ds).auto_chunks() == (300, 300)
    with pcmx.set_options(threads=2):
        two = ProductConvolution(ds).apply(u)
        assert used and set(used) == {2}
        assert ProductConvolution(ds).auto_chunks() != (300, 300)
    np.testing.assert_allclose(one, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ tasks
def _task(x):
    return x * x, threading.current_thread().name, _blas_threads()


def test_run_tasks_locally_in_order_one_blas_thread_each():
    out = execution.run_tasks(_task, [(i,) for i in range(6)], desc="t", workers=2)
    assert [o[0] for o in out] == [i * i for i in range(6)]
    assert all(not o[1].startswith("MainThread") for o in out)
    assert {o[2] for o in out} == {1}
    seq = execution.run_tasks(_task, [(3,), (4,)], desc="t", workers=1)
    assert [o[:2] for o in seq] == [(9, "MainThread"), (16, "MainThread")]


def test_run_tasks_raises_the_task_error():
    def bad(x):
        if x == 2:
            raise ValueError("task 2")
        return x

    with pytest.raises(ValueError, match="task 2"):
        execution.run_tasks(bad, [(i,) for i in range(4)], desc="t", workers=2)


def test_task_workers_defaults():
    assert execution.task_workers(3) == 3
    with pcmx.set_options(threads=5), dask.config.set(num_workers=None):
        assert execution.task_workers() == 5
    with dask.config.set(num_workers=4):
        assert execution.task_workers() == 4


def test_compute_many_and_progress_option(capsys):
    items = [dask.delayed(np.add)(i, 10) for i in range(3)]
    assert execution.compute_many(items, desc="blocks") == [10, 11, 12]
    assert "blocks" not in capsys.readouterr().err
    with pcmx.set_options(progress=True):
        assert execution.compute_many(items, desc="blocks") == [10, 11, 12]
        assert execution.run_tasks(int, [("7",)], desc="things", progress=False) == [7]
    err = capsys.readouterr().err
    assert "blocks" in err and "3/3" in err and "things" not in err


def test_on_a_dask_distributed_client():
    from distributed import Client, LocalCluster

    assert execution.active_client() is None
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        assert execution.active_client() is client
        out = execution.run_tasks(np.multiply, [(i, 3) for i in range(4)], desc="t",
                                  client=execution.active_client())
        assert out == [0, 3, 6, 9]
        items = [dask.delayed(np.add)(i, 1) for i in range(3)]
        assert execution.compute_many(items, desc="b", client=client) == [1, 2, 3]
    assert execution.active_client() is None
    sentinel = object()
    assert execution.active_client(sentinel) is sentinel
