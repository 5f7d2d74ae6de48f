"""pcmx.restore on threads, on a local cluster of processes and with the operator sent once
(issue 15, item 2)."""

import pickle

import dask
import dask.array as da
import numpy as np
import pytest
from test_restore import make_case3d

from pcmx.operator import ProductConvolution
from pcmx.restore import TILED_TOLERANCE, restore
from pcmx.simulate import simulate_point_sources, true_operator

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def case2d():
    sc = simulate_point_sources((64, 80), n_sources=20, seed=4)
    op = ProductConvolution(true_operator(sc, kernel_size=11, n_components=2), boundary="reflect")
    return sc["image"].values.astype(np.float32), op


@pytest.fixture(scope="module")
def case3d():
    return make_case3d()


@pytest.fixture(scope="module")
def client():
    """Two worker processes of one thread each (the operator crosses process boundaries)."""
    with dask.config.set({"distributed.worker.daemon": False}), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                     dashboard_address=None, memory_limit="1GiB") as cluster, \
            distributed.Client(cluster) as c:
        yield c


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_operator_is_one_key_of_the_graph(case3d):
    """The operator (its maps) is pickled once, into one key; tile tasks only refer to it."""
    img, op = case3d
    lazy = restore(da.from_array(img, chunks=(8, 24, 20)), op, iterations=5, offset=10.0, start=1.0)
    op_bytes = len(pickle.dumps(op))
    sizes = {k: len(pickle.dumps(v)) for k, v in dict(lazy.__dask_graph__()).items()}
    big = [k for k, n in sizes.items() if n > op_bytes // 2]
    assert len(big) == 1 and "ProductConvolution" in str(big[0])
    tiles = [n for k, n in sizes.items() if isinstance(k, tuple) and k[0] == lazy.name]
    assert len(tiles) == lazy.npartitions == 8
    assert max(tiles) < op_bytes / 20  # measured: ~1.5 kB per tile task, the operator 2x150 kB


def test_progress_over_the_clusters_tiles(case2d, client, capsys):
    img, op = case2d
    restore(img, op, iterations=2, chunks=(32, 40), halo=6, progress=True)
    err = capsys.readouterr().err
    assert "restore (rl)" in err and "4/4" in err


def test_threads_and_processes_agree(case2d, case3d, client):
    """The same call on a local cluster of 2 processes: identical tiles, and each worker
    received the operator once (counted by unpickling) and cached its spectra."""
    def count_unpickling():
        import pcmx.operator as m

        m._unpickled = 0
        original = getattr(m, "_original_setstate", m.ProductConvolution.__setstate__)
        m._original_setstate = original

        def counting(self, state):
            m._unpickled += 1
            original(self, state)

        m.ProductConvolution.__setstate__ = counting

    for img, op, chunks in (case2d + ((23, 29),), case3d + ((7, 17, 13),)):
        with dask.config.set(scheduler="threads"):
            ref = restore(img, op, iterations=10, chunks=chunks, client=False)
        client.run(count_unpickling)
        out = restore(img, op, iterations=10, chunks=chunks)  # the active Client
        assert isinstance(out, np.ndarray)
        np.testing.assert_array_equal(out, ref)  # measured: identical
        # measured 1.0e-5 (2D, 23 x 29 tiles), 1.0e-6 (3D, 7 x 17 x 13)
        assert _rel(out, restore(img, op, iterations=10)) < TILED_TOLERANCE
        counts = client.run(lambda: __import__("pcmx.operator").operator._unpickled)
        assert sorted(counts.values()) == [1, 1]  # tiles on both workers, the operator once each
        cached = client.run(lambda: len(__import__("pcmx.execution").execution.spectrum_cache))
        assert all(n >= 2 for n in cached.values())


@pytest.mark.parametrize("lazy_maps", [False, True])
def test_lazy_dask_input_on_the_cluster(case3d, client, lazy_maps):
    """A Dask stack, and an operator whose maps are lazy too (as opened from a store: each
    tile then reads its window of the maps on the worker)."""
    img, op = case3d
    engine = ProductConvolution(op.dataset.chunk({"z": 8, "y": 24, "x": 20}), boundary="reflect") \
        if lazy_maps else op
    lazy = restore(da.from_array(img, chunks=(9, 25, 21)), engine, iterations=10, offset=10.0)
    assert isinstance(lazy, da.Array)
    got = client.compute(lazy).result()
    assert _rel(got, restore(img, op, iterations=10, offset=10.0)) < TILED_TOLERANCE  # measured 1.0e-6
