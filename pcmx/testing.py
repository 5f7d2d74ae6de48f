"""Test helpers for pcmx operators and stores, public so users can check their own.

* :func:`dottest`: the adjoint test ``<H u, v> = <u, H^T v>`` for any object with
  ``apply``/``adjoint`` (a :class:`pcmx.ProductConvolution`) or ``matvec``/``rmatvec`` (a
  SciPy ``LinearOperator``), in memory or tiled with Dask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["dottest"]


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "compute") and hasattr(x, "dask"):
        x = x.compute()
    if type(x).__module__.split(".")[0] == "cupy":
        x = x.get()
    return np.asarray(x)


def dottest(op, shape: Sequence[int], *, rtol: float = 1e-5, rng=None, chunks=None,
            dtype=np.float32) -> tuple[float, float]:
    """Check that ``op.adjoint`` is the transpose of ``op.apply``: ``<H u, v> = <u, H^T v>``.

    Parameters
    ----------
    op : object
        Has ``apply(u)`` and ``adjoint(v)`` (e.g. :class:`pcmx.ProductConvolution`), or
        ``matvec`` and ``rmatvec`` (a :class:`scipy.sparse.linalg.LinearOperator`, then
        ``shape`` is the flattened length).
    shape : tuple of int
        Shape of the images ``u`` and ``v`` (the operator is square, as a blur is).
    rtol : float
        Largest accepted ``|a - b| / max(|a|, |b|)``. Float32 operators reach about
        ``1e-7 * sqrt(u.size)`` with the standard normal vectors used here.
    rng : int or numpy.random.Generator, optional
        Seed or generator of ``u`` and ``v`` (standard normal).
    chunks : optional
        Dask chunks: ``u`` and ``v`` are given as Dask arrays, to test a tiled path.
    dtype : numpy dtype
        Dtype of ``u`` and ``v``.

    Returns
    -------
    (float, float)
        ``<H u, v>`` and ``<u, H^T v>``, accumulated in float64.

    Raises
    ------
    AssertionError
        If the two inner products differ by more than ``rtol`` (the message gives both).

    Notes
    -----
    The dot test of pylops (Claerbout's): for random ``u`` and ``v`` the two inner products
    of a correct adjoint agree to the working precision; a wrong flip, shift, crop or
    boundary makes them differ at order one.
    """
    rng = np.random.default_rng(rng)
    shape = tuple(int(s) for s in np.atleast_1d(shape))
    u = rng.standard_normal(shape).astype(dtype)
    v = rng.standard_normal(shape).astype(dtype)
    if hasattr(op, "apply") and hasattr(op, "adjoint"):
        forward, backward = op.apply, op.adjoint
    elif hasattr(op, "matvec") and hasattr(op, "rmatvec"):
        forward, backward = op.matvec, op.rmatvec
    else:
        raise TypeError(f"dottest: {type(op).__name__} has neither apply/adjoint nor matvec/rmatvec")
    if chunks is not None:
        import dask.array as da

        hu, htv = forward(da.from_array(u, chunks=chunks)), backward(da.from_array(v, chunks=chunks))
    else:
        hu, htv = forward(u), backward(v)
    hu, htv = _as_numpy(hu), _as_numpy(htv)
    if hu.shape != v.shape or htv.shape != u.shape:
        raise AssertionError(f"dottest: shapes H u {hu.shape}, H^T v {htv.shape}, expected {shape}")
    a = float(np.vdot(hu.astype(np.float64).ravel(), v.astype(np.float64).ravel()))
    b = float(np.vdot(u.astype(np.float64).ravel(), htv.astype(np.float64).ravel()))
    scale = max(abs(a), abs(b), np.finfo(np.float64).tiny)
    if abs(a - b) > rtol * scale:
        raise AssertionError(
            f"dottest failed: <H u, v> = {a!r} but <u, H^T v> = {b!r} "
            f"(relative difference {abs(a - b) / scale:.3g} > rtol={rtol:g})"
        )
    return a, b
