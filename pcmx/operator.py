"""The product-convolution engine: ``H u = sum_i h_i * (alpha_i . u)`` and its adjoint (Prop. 1).

:class:`ProductConvolution` applies a space-varying blur stored as an operator Dataset
(``psf_basis (component, [kz,] ky, kx)``, ``coefficients (component, [z,] y, x)``) and its
adjoint ``H^T v = sum_i alpha_i . (h_i^flip * v)``, the inner loop of simulation, evaluation
and deblurring. One code path serves NumPy and CuPy arrays (through :mod:`pcmx._backend`),
in memory or tiled with Dask, in 2D and 3D.

How it is fast
--------------
All convolutions are summed in the Fourier domain at one padded size ``P`` per axis, the
smallest fast FFT length (``scipy.fft.next_fast_len``) that makes the circular convolution
equal to the linear one on the output: ``P >= n + r`` for an image of ``n`` pixels and a
kernel radius ``r`` (``n + 2 r`` with reflective boundaries; exactly ``n`` with periodic
ones, where the circular convolution is what is wanted). The kernels' spectra are
computed once per padded shape and cached. One application is

* ``apply``: for each component, ``alpha_i . u`` is written into one reused zero-padded
  buffer and transformed (``I`` real FFTs); the spectra are multiplied and accumulated in
  place in complex64; one inverse transform, cropped axis by axis (the inverse along the last
  axis only runs on the rows that are kept);
* ``adjoint``: one forward FFT of ``v`` and ``I`` inverse transforms of ``V . conj(H_i)``,
  each multiplied by ``alpha_i`` and accumulated.

In memory on a multi-core CPU the image is cut into one tile per core, each grown by a halo
of the kernel radius and computed as above on one thread (independent single-threaded FFTs
use the cores better than multi-threaded FFTs of the whole image); the products are split
over the cores otherwise. Dask tiles are computed the same way on each chunk grown by its
halo (zeros, or a mirror image at the boundary of the field), so tiled and in-memory results
agree to float32 rounding.
"""

from __future__ import annotations

import math
import os
import threading
import uuid
from collections.abc import Sequence

import numpy as np
import xarray as xr

from . import _backend
from .errors import InputError, PcmxError
from .execution import spectrum_cache, thread_pool
from .options import get_options

__all__ = ["NAN_POLICIES", "ProductConvolution", "blur", "clear_cache", "checked_finite"]

_SPATIAL = ("z", "y", "x")
_KERNEL = ("kz", "ky", "kx")
BOUNDARIES = ("zero", "reflect", "periodic")
# how the image and the maps are extended beyond the field, as numpy.pad modes
_PAD_MODE = {"reflect": "symmetric", "periodic": "wrap"}
#: What :meth:`ProductConvolution.apply` does with NaN or infinite pixels (its ``nan``).
NAN_POLICIES = ("raise", "mask")
_NAN_HINT = ("; refused, since the FFTs would spread them over the output: pass nan='mask' "
             "(pcmx apply --nan mask) to treat them as missing data")


# --------------------------------------------------------------------------------------------
# Kernel spectra: one process-wide cache (pcmx.execution.spectrum_cache), shared by all
# operators, tiles and threads. Keys name the kernels (a token of their values), the padded
# FFT shape, the dtype, the array library and the direction.
# --------------------------------------------------------------------------------------------
def clear_cache() -> None:
    """Forget all cached kernel spectra (they are recomputed on the next application).

    The cache is bounded by the option ``spectrum_cache_mb`` (:func:`pcmx.set_options`).
    """
    spectrum_cache.clear()


# --------------------------------------------------------------------------------------------
# Elementwise work on the pool's threads (NumPy ufuncs release the GIL); CuPy runs as it is
# --------------------------------------------------------------------------------------------
_BLOCK_BYTES = 1 << 18  # rows per step of a fused operation: a few hundred KiB stay in L2
_MIN_THREADED_PIXELS = 1 << 16  # smaller images: one block, the threads would cost more


def _threads(workers: int | None) -> int | None:
    """Threads for a ``workers`` argument: None stays None (one), a negative number is the
    option ``threads`` (default: the cores this process may use)."""
    if workers is None:
        return None
    return get_options()["threads"] if workers < 0 else max(int(workers), 1)


class _Elementwise:
    """``multiply``, ``multiply_add`` and ``contiguous`` over row blocks on ``workers`` threads.

    The spectra of a 2304 x 2304 image hold 2.8 M complex numbers: a single-threaded multiply
    costs as much as a multi-threaded FFT, so the products and sums are split by rows over
    the cores, and a product and its accumulation are fused block by block (in cache).
    """

    def __init__(self, xp, workers) -> None:
        self.xp = xp
        self.threads = 1 if xp is not np or workers is None else _threads(workers)

    def _run(self, shape, fn, itemsize) -> None:
        axis = 0 if shape[0] >= 2 * self.threads or len(shape) == 1 else 1
        n = shape[axis]
        row_bytes = max(math.prod(shape) // max(shape[0], 1) * itemsize, 1)
        if axis == 1:
            row_bytes //= max(shape[1], 1)
        sub = max(_BLOCK_BYTES // row_bytes, 1)

        def work(start, stop):
            for a in range(start, stop, sub):
                index = (slice(None),) * axis + (slice(a, min(a + sub, stop)),)
                fn(index)

        if self.threads <= 1 or n < 2 * self.threads or math.prod(shape) < 1 << 16:
            work(0, n)
            return
        step = -(-n // (4 * self.threads))
        list(thread_pool().map(lambda a: work(a, min(a + step, n)), range(0, n, step)))

    def multiply(self, a, b, out) -> None:
        """``out = a * b``."""
        if self.threads <= 1:
            self.xp.multiply(a, b, out=out)
            return
        self._run(out.shape, lambda i: np.multiply(a[i], b[i], out=out[i]), out.itemsize)

    def multiply_add(self, a, b, acc) -> None:
        """``acc += a * b``, overwriting ``a``."""
        if self.threads <= 1:
            self.xp.multiply(a, b, out=a)
            self.xp.add(acc, a, out=acc)
            return

        def fused(i):
            np.multiply(a[i], b[i], out=a[i])
            np.add(acc[i], a[i], out=acc[i])

        self._run(acc.shape, fused, acc.itemsize)

    def contiguous(self, a):
        """A C-contiguous copy of a (cropped) view, or ``a`` itself if it is one."""
        if a.flags.c_contiguous:
            return a
        if self.threads <= 1:
            return self.xp.ascontiguousarray(a)
        out = np.empty(a.shape, a.dtype)
        self._run(a.shape, lambda i: np.copyto(out[i], a[i]), a.itemsize)
        return out


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _open(operator) -> xr.Dataset:
    if isinstance(operator, (str, os.PathLike)):
        from .io.store import open_store

        return open_store(operator, kind="operator")
    if isinstance(operator, xr.Dataset):
        return operator
    raise InputError(
        f"operator: expected an operator Dataset or a store path, got {type(operator).__name__}"
    )


def _count_nonfinite(a) -> int:
    if _backend.is_dask(a):
        import dask.array as da

        return int(da.count_nonzero(~da.isfinite(a)).compute())
    return int(_backend.xp(a).count_nonzero(~_backend.xp(a).isfinite(a)))


def _validate(ds: xr.Dataset, check_finite: bool):
    """Check an operator Dataset; return (psf_basis ndarray, coefficients array, spatial dims)."""
    kind = ds.attrs.get("pcmx_type", "operator")
    if kind == "family":
        raise InputError("operator: got a family; use ProductConvolution.from_family(family, state=k)")
    if kind != "operator":
        raise InputError(f"operator: pcmx_type={kind!r}, expected 'operator'")
    for name in ("psf_basis", "coefficients"):
        if name not in ds.data_vars:
            raise InputError(f"operator: missing variable {name!r} (has {sorted(ds.data_vars)})")
    h, a = ds["psf_basis"], ds["coefficients"]
    if h.ndim not in (3, 4) or h.dims[0] != "component" or h.dims[1:] != _KERNEL[4 - h.ndim:]:
        raise InputError(
            f"psf_basis: dims {h.dims}, expected ('component', 'ky', 'kx') or "
            "('component', 'kz', 'ky', 'kx')"
        )
    spatial = _SPATIAL[4 - h.ndim:]
    if a.dims != ("component", *spatial):
        raise InputError(
            f"coefficients: dims {a.dims} do not match psf_basis {h.dims}; expected "
            f"{('component', *spatial)}"
        )
    if h.sizes["component"] < 1:
        raise InputError("psf_basis: the operator has no component")
    for dim in h.dims[1:]:
        if h.sizes[dim] % 2 == 0:
            raise InputError(
                f"psf_basis: kernel size {dim}={h.sizes[dim]} is even; kernels must have odd "
                "sizes (centre at index size // 2)"
            )
    for name, var in (("psf_basis", h), ("coefficients", a)):
        if var.dtype.kind not in "fiu":
            raise InputError(f"{name}: dtype {var.dtype} is not a real number type")
    h_np = np.asarray(_backend.asnumpy(h.data))
    if check_finite:
        for name, values in (("psf_basis", h_np), ("coefficients", a.data)):
            bad = _count_nonfinite(values)
            if bad:
                raise InputError(f"{name}: {bad} non-finite values (NaN or inf)")
    return h_np, a.data, spatial


def _check_boundary(boundary: str) -> str:
    if boundary not in BOUNDARIES:
        raise InputError(f"boundary={boundary!r}: expected one of {BOUNDARIES}")
    return boundary


def _nonfinite_message(bad, label: str, dims, offset=None, where: str = "") -> str:
    """``label: N NaN or infinite values (of M), the first at (y=.., x=..)`` for a bool mask."""
    xp = _backend.xp(bad)
    n = int(xp.count_nonzero(bad))
    first = np.unravel_index(int(xp.argmax(bad.ravel())), bad.shape)
    offset = offset or (0,) * bad.ndim
    at = ", ".join(f"{d}={int(i) + o}" for d, i, o in zip(dims, first, offset, strict=True))
    plural = "value" if n == 1 else "values"
    return f"{label}: {n} NaN or infinite {plural} (of {bad.size}{where}), the first at ({at})"


def _check_block(block, *, label, dims, hint, block_info=None):
    """One Dask chunk, returned as it is if finite (the lazy check of :func:`checked_finite`)."""
    xp = _backend.xp(block)
    bad = ~xp.isfinite(block)
    if bool(bad.any()):
        loc = block_info[0]["array-location"] if block_info else [(0, n) for n in block.shape]
        span = ", ".join(f"{d}={a}:{b}" for d, (a, b) in zip(dims, loc, strict=True))
        raise InputError(_nonfinite_message(bad, label, dims, [a for a, _ in loc],
                                            f" in the chunk {span}") + hint)
    return block


def checked_finite(data, label: str, dims: Sequence[str], *, hint: str = ""):
    """``data`` itself if it holds no NaN or infinite value, else an :class:`InputError`.

    Parameters
    ----------
    data : ndarray, cupy.ndarray or dask.array.Array
        An image (integer and boolean types are returned at once).
    label : str
        What the message names (an argument or a file).
    dims : sequence of str
        The names of ``data``'s axes, for the position in the message.
    hint : str
        Appended to the message (what to do instead).

    Returns
    -------
    Same kind as ``data``
        In memory: ``data``, read once. Dask: a lazy array whose chunks are checked as they
        are computed, in the same pass as the work that reads them (the whole array is not
        computed twice); the error is then raised by ``compute()``, naming the chunk.

    Raises
    ------
    InputError
        ``label: N NaN or infinite values (of M), the first at (y=.., x=..)`` and ``hint``.
    """
    if np.dtype(data.dtype).kind != "f":
        return data
    if _backend.is_dask(data):
        return data.map_blocks(_check_block, dtype=data.dtype, meta=data._meta,
                               label=label, dims=tuple(dims), hint=hint)
    xp = _backend.xp(data)
    bad = ~xp.isfinite(data)
    if bool(bad.any()):
        raise InputError(_nonfinite_message(bad, label, dims) + hint)
    return data


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------
class ProductConvolution:
    r"""A space-varying blur ``H u = sum_i h_i * (alpha_i . u)`` and its adjoint (paper Prop. 1).

    Parameters
    ----------
    operator : Dataset or str or path-like
        An operator Dataset (``psf_basis (component, [kz,] ky, kx)`` with odd kernel sizes,
        centre at ``size // 2``, and ``coefficients (component, [z,] y, x)`` on the image
        grid; provenance optional in memory) or the path of an operator store.
    boundary : {"zero", "reflect", "periodic"}
        ``"zero"``: linear convolution of the image extended by zeros (light from outside
        the field is absent). ``"reflect"``: the image and the coefficient maps are extended
        by their mirror images (``d c b a | a b c d | d c b a``, numpy's ``"symmetric"``),
        which avoids dark rims when blurring; needs kernels no wider than ``2 n + 1``.
        ``"periodic"``: circular convolution (the field wraps around, numpy's ``"wrap"``),
        the convention of FFT-based deconvolution codes; computed in memory with FFTs of
        exactly the image's size (fastest for sizes with small prime factors, such as
        2304 = 2^8 3^2); needs kernels no wider than the image.
    dtype : numpy dtype
        Lowest working precision: float32 (complex64 spectra) by default. Float64 inputs are
        computed in float64.
    workers : int, optional
        Threads of the FFTs (``scipy.fft`` ``workers``) and of the elementwise products of an
        in-memory application; -1: the option ``threads`` (:func:`pcmx.set_options`; default
        all cores), None: one. Dask tiles run on one thread each, the scheduler providing the
        parallelism.
    check_finite : bool
        Reject NaN/inf in the kernels and maps (reads lazily stored maps once).

    Attributes
    ----------
    shape : tuple of int
        The image grid ``([z,] y, x)`` of the coefficient maps; inputs must have this shape.
    n_components : int
        I, the number of kernels.
    kernel_shape : tuple of int
        ``([kz,] ky, kx)``.
    dims : tuple of str
        ``("y", "x")`` or ``("z", "y", "x")``.

    Raises
    ------
    PcmxError
        If the operator is malformed: a missing variable, mismatched dims, an even kernel
        size, non-finite values, an unknown boundary (the message names the variable and
        the value).

    Notes
    -----
    With ``S(x, y) = sum_i alpha_i(x) h_i(y)``, Prop. 1 of the paper gives
    ``H u = sum_i h_i * (alpha_i . u)``; the image of a unit point source at pixel ``p`` is
    ``sum_i alpha_i[p] h_i`` centred at ``p``. The adjoint is
    ``H^T v = sum_i alpha_i . (\tilde h_i * v)`` with ``\tilde h_i(x) = h_i(-x)``. Both are
    computed as circular convolutions at a fast FFT size large enough to be linear on the
    output, so ``adjoint`` is the exact transpose of ``apply`` (checked by
    :func:`pcmx.testing.dottest`). One application costs ``I`` forward real FFTs and one
    inverse (the adjoint: one forward and ``I`` inverse), independent of the kernel size.

    Examples
    --------
    >>> import pcmx
    >>> H = pcmx.ProductConvolution("operator.zarr")          # doctest: +SKIP
    >>> blurred = H.apply(image)                               # doctest: +SKIP
    >>> back = H.adjoint(blurred)                              # doctest: +SKIP
    """

    def __init__(self, operator, *, boundary: str = "zero", dtype=np.float32,
                 workers: int | None = -1, check_finite: bool = True) -> None:
        ds = _open(operator)
        self.boundary = _check_boundary(boundary)
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise InputError(f"dtype={self.dtype}: expected a floating-point type")
        self.workers = workers
        h, alpha, dims = _validate(ds, check_finite)
        self.dataset = ds
        self.dims = dims
        self._h = h
        self._alpha_src = alpha
        self.shape = tuple(int(s) for s in alpha.shape[1:])
        self.n_components = int(h.shape[0])
        self.kernel_shape = tuple(int(s) for s in h.shape[1:])
        self.radius = tuple(k // 2 for k in self.kernel_shape)
        self.ndim = len(self.shape)
        if self.boundary == "periodic":
            for dim, k, n in zip(dims, self.kernel_shape, self.shape, strict=True):
                if k > n:
                    raise InputError(
                        f"boundary='periodic': kernel size {k} along {dim} exceeds the image "
                        f"size {n}; use kernels no wider than the image or boundary='zero'"
                    )
        if self.boundary == "reflect":
            for dim, r, n in zip(dims, self.radius, self.shape, strict=True):
                if r > n:
                    raise InputError(
                        f"boundary='reflect': kernel radius {r} along {dim} exceeds the image "
                        f"size {n}; use kernels no wider than {2 * n + 1} or boundary='zero'"
                    )
        import dask.base

        self._token = dask.base.tokenize(h, str(h.dtype))
        self._alpha_key = alpha.name if _backend.is_dask(alpha) else f"pcmx-alpha-{uuid.uuid4().hex}"
        self._lock = threading.RLock()
        self._arrays: dict = {}
        self._norm: float | None = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_family(cls, family, state=None, *, gamma=None, **kwargs) -> ProductConvolution:
        """The operator of one state of a family, or of any ``gamma`` in its cone (paper II-D).

        Parameters
        ----------
        family : Dataset or str or path-like
            A family Dataset (``psf_basis``, ``spatial_basis (mode, [z,] y, x)``,
            ``gamma (state, component, mode)``) or the path of a family store.
        state : int or label, optional
            The state (index or coordinate label).
        gamma : array-like of shape (component, mode), optional
            Any coefficients in the family's cone instead of a stored state.
        **kwargs
            Passed to :class:`ProductConvolution` (``boundary``, ``dtype``...).

        Raises
        ------
        PcmxError
            If ``family`` is not a family, or not exactly one of ``state``/``gamma`` is given.
        """
        from .model import family_coefficients

        if isinstance(family, (str, os.PathLike)):
            from .io.store import open_store

            family = open_store(family, kind="family")
        if not isinstance(family, xr.Dataset) or family.attrs.get("pcmx_type") != "family":
            got = family.attrs.get("pcmx_type") if isinstance(family, xr.Dataset) else type(family).__name__
            raise InputError(f"family: expected a family Dataset or store, got {got!r}")
        coefficients = family_coefficients(family, state, gamma=gamma)
        coefficients = coefficients.drop_vars([c for c in coefficients.coords if c not in coefficients.dims])
        ds = xr.Dataset({"psf_basis": family["psf_basis"], "coefficients": coefficients},
                        attrs={"pcmx_type": "operator"})
        return cls(ds, **kwargs)

    # -- public API ---------------------------------------------------------------------------
    def apply(self, u, *, chunks=None, nan: str = "raise"):
        """``H u``: blur an image with the space-varying operator.

        Parameters
        ----------
        u : ndarray, cupy.ndarray, dask.array.Array or DataArray, shape ``self.shape``
            The image (dims ``self.dims`` for a DataArray). Integer images are computed in
            ``self.dtype``.
        chunks : None, "auto", int, tuple or dict, optional
            Tiling. None: NumPy/CuPy inputs are computed in memory and Dask inputs tile by
            their chunks. ``"auto"`` picks tiles (:meth:`auto_chunks`); other values are
            Dask chunk specifications. A NumPy input given ``chunks`` is computed tile by
            tile with the current Dask scheduler and returned as NumPy.
        nan : {"raise", "mask"}
            What to do with NaN or infinite pixels, which the FFTs would spread over the
            output (one NaN pixel of a 256 x 256 image made half the output NaN).
            ``"raise"`` (default): refuse them with an :class:`~pcmx.errors.InputError`
            naming the image, their number and the first one's position. ``"mask"``: treat
            them as missing data: they are replaced by zeros, so they add no light, and the
            output is NaN exactly where a missing pixel would have contributed, within the
            union of the kernels' supports around it (for the adjoint: the flipped
            supports); everywhere else the result is that of the zero-filled image. The mask
            costs one more single-kernel application (:meth:`missing_mask`).
            Dask inputs are checked chunk by chunk as the result is computed (the input is
            read once): with ``"raise"`` the error comes from ``compute()``, naming the chunk.

        Returns
        -------
        Same kind as ``u``
            Float32 for float32 (or integer) input, float64 for float64; a DataArray keeps
            the input's dims, coords, name and attrs; a Dask input gives a lazy result.

        Raises
        ------
        PcmxError
            If ``u`` does not have the operator's shape, dims or pixel size, holds NaN or
            infinite values (``nan="raise"``: the message names ``u``, and the DataArray's
            ``source`` file), or ``nan`` is not one of :data:`NAN_POLICIES`.
        """
        return self._run(u, chunks, adjoint=False, nan=nan)

    def adjoint(self, v, *, chunks=None, nan: str = "raise"):
        """``H^T v = sum_i alpha_i . (h_i^flip * v)``, the exact transpose of :meth:`apply`.

        Takes the same arguments and returns the same kinds as :meth:`apply`.
        """
        return self._run(v, chunks, adjoint=True, nan=nan)

    def missing_mask(self, missing, *, adjoint: bool = False):
        """Where missing input pixels reach the output: the pixels ``nan="mask"`` sets to NaN.

        Parameters
        ----------
        missing : bool array (NumPy, CuPy or Dask), shape ``self.shape``
            True at the missing pixels.
        adjoint : bool
            For :meth:`adjoint` (the supports flipped) instead of :meth:`apply`.

        Returns
        -------
        bool array, same kind as ``missing``
            True where an output pixel of ``apply`` (``adjoint``) sees a missing pixel through
            the union of the kernels' supports, under the operator's boundary (mirrored or
            wrapped around the edges as the image is).
        """
        engine = self._footprint()
        rdtype = np.dtype(np.float32)
        m = missing.astype(rdtype)
        if _backend.is_dask(m):
            hits = engine._tiled(m, rdtype, adjoint)
        else:
            hits = engine._in_memory(m, rdtype, adjoint)
        return hits > 0.5  # counts of missing pixels in reach; FFT rounding is ~1e-6

    def _footprint(self) -> ProductConvolution:
        """One kernel: 1 on the union of the kernels' supports, maps of ones (cached)."""
        def build():
            support = np.any(self._h != 0, axis=0).astype(np.float32)[None]
            ones = np.ones((1, *self.shape), np.float32)
            ds = xr.Dataset({"psf_basis": (("component", *_KERNEL[3 - self.ndim:]), support),
                             "coefficients": (("component", *self.dims), ones)},
                            attrs={"pcmx_type": "operator"})
            return ProductConvolution(ds, boundary=self.boundary, workers=self.workers,
                                      check_finite=False)

        return self._cached(("footprint",), build)

    __call__ = apply

    def psf_at(self, *position: int, index: bool = False, extrapolate: bool = False,
               **coords) -> np.ndarray:
        """The PSF at a position: ``sum_i coefficients[i, p] * psf_basis[i]`` (nearest pixel).

        Positions follow pcmx's one convention (:func:`pcmx.units.to_pixels`, as
        :func:`pcmx.model.psf_at` and :func:`pcmx.simulate.true_psf`): ``y=``, ``x=``
        (``z=``) in the operator's coordinates (micrometers in a calibrated store; pixels
        where it has none), pint Quantities or strings (``"27um"``, ``"120 px"``), or pixel
        indices with ``index=True``. The positional form ``psf_at(iy, ix)`` takes integer
        pixel indices.

        Parameters
        ----------
        *position : int
            Pixel indices ``(y, x)`` (``(z, y, x)`` in 3D).
        index : bool
            Bare numbers given by keyword are pixel indices (rounded to the nearest).
        extrapolate : bool
            A position outside the field gives the PSF of the nearest edge pixel instead of
            an error.
        **coords
            ``y=..., x=...`` (and ``z=...``).

        Returns
        -------
        ndarray, shape ``kernel_shape``
            The image of a unit point source at ``position``, centred at index
            ``kernel_shape // 2``, in ``self.dtype``.

        Raises
        ------
        PcmxError
            If positions are missing, given both ways, or outside the grid (the message gives
            the field's extent).
        """
        if position and coords:
            raise InputError("psf_at: give pixel indices (iy, ix) or y=, x=, not both")
        if coords:
            unknown = sorted(set(coords) - set(self.dims))
            missing = [d for d in self.dims if d not in coords]
            if unknown or missing:
                raise InputError(f"psf_at: needs {list(self.dims)}, got {sorted(coords)}")
            from .units import to_pixels

            grid = self.dataset["coefficients"]
            pixels = to_pixels(grid, index=index, extrapolate=extrapolate, **coords)
            for d, p in pixels.items():
                if np.ndim(p):
                    raise InputError(f"psf_at: {d} takes one position, got shape {np.shape(p)}")
            position = tuple(int(min(max(np.floor(float(pixels[d]) + 0.5), 0), n - 1))
                             for d, n in zip(self.dims, self.shape, strict=True))
        if len(position) != self.ndim:
            raise InputError(f"psf_at: needs {self.ndim} indices {self.dims}, got {len(position)}")
        pixel = []
        for dim, p, n in zip(self.dims, position, self.shape, strict=True):
            if not float(p).is_integer() or not 0 <= int(p) < n:
                raise InputError(f"psf_at: {dim}={p!r} is not a pixel index in [0, {n})")
            pixel.append(int(p))
        coeff = _backend.asnumpy(self._alpha_src[(slice(None), *pixel)])
        coeff = np.asarray(coeff, dtype=np.float64)
        return np.tensordot(coeff, self._h.astype(np.float64), axes=1).astype(self.dtype)

    def as_linear_operator(self):
        """This operator as a :class:`scipy.sparse.linalg.LinearOperator` on flattened images.

        ``matvec`` is :meth:`apply` and ``rmatvec`` is :meth:`adjoint` (NumPy, in memory).
        """
        from scipy.sparse.linalg import LinearOperator

        size = math.prod(self.shape)

        def matvec(x):
            return self.apply(np.asarray(x).reshape(self.shape)).ravel()

        def rmatvec(y):
            return self.adjoint(np.asarray(y).reshape(self.shape)).ravel()

        return LinearOperator((size, size), matvec=matvec, rmatvec=rmatvec, dtype=self.dtype)

    def as_pylops(self):
        """This operator as a ``pylops.LinearOperator`` keeping the image's shape.

        ``dims = dimsd = self.shape`` (no flattening by hand); see :func:`pcmx.interop.as_pylops`.
        Needs pylops (``pip install pylops``).
        """
        from .interop import as_pylops

        return as_pylops(self)

    def to_deepinv(self, **kwargs):
        """This operator as a ``deepinv.physics.SpaceVaryingBlur`` with the same output.

        ``boundary="zero"`` maps to deepinv's ``padding="constant"``, ``"periodic"`` to
        ``"circular"``; keyword arguments (``padding``, ``use_fft``, ``device``, ``dtype``) as
        :func:`pcmx.interop.to_deepinv`. Needs deepinv (``pip install deepinv``).
        """
        from .interop import to_deepinv

        return to_deepinv(self, **kwargs)

    def norm_estimate(self, *, n_iter: int = 100, rtol: float = 1e-4, seed: int = 0) -> float:
        """``||H||_2`` by power iteration on ``H^T H`` (for step sizes in deblurring).

        Parameters
        ----------
        n_iter : int
            Maximum number of iterations (each one ``apply`` and one ``adjoint``).
        rtol : float
            Stop when the estimate changes by less than ``rtol`` (relative).
        seed : int
            Seed of the random starting image.

        Returns
        -------
        float
            The largest singular value. Power iteration approaches it from below: multiply
            by a small safety factor (e.g. 1.01) for a step size ``1 / ||H||^2``. The value
            is cached on the object.
        """
        if self._norm is not None:
            return self._norm
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(self.shape).astype(self.dtype)
        x /= np.linalg.norm(x)
        lam = 0.0
        for _ in range(int(n_iter)):
            y = self.adjoint(self.apply(x))
            new = float(np.linalg.norm(y.astype(np.float64)))
            if new == 0.0:
                lam = 0.0
                break
            x = (y / new).astype(self.dtype)
            done = abs(new - lam) <= rtol * new
            lam = new
            if done:
                break
        self._norm = math.sqrt(lam)
        return self._norm

    def auto_chunks(self, *, target_elements: int = 2**22, min_tiles: int | None = None
                    ) -> tuple[int, ...]:
        """Tile sizes for the Dask path: few, efficient tiles within a memory budget.

        Tiles are halved (along the axis where that wastes the least work on halos) until a
        tile with its halo has at most ``target_elements`` pixels (about 100 MB of working
        memory per thread at I = 5) and there are at least ``min_tiles`` tiles (default: the
        number of cores, since each tile runs on one thread); each tile plus its halo is then
        grown to a fast FFT length when that adds no tile.
        """
        min_tiles = get_options()["threads"] if min_tiles is None else int(min_tiles)
        return self._plan_tiles(self.shape, min_tiles, target_elements)

    def _plan_tiles(self, shape, min_tiles: int, target_elements: float) -> tuple[int, ...]:
        from scipy.fft import next_fast_len

        r = self.radius
        zero = self.boundary == "zero"

        def extent(t):  # a tile with its halo (an unsplit axis in zero mode needs one side)
            return [ti + (ri if zero and ti == n else 2 * ri)
                    for ti, ri, n in zip(t, r, shape, strict=True)]

        def n_tiles(t):
            return math.prod(-(-n // ti) for n, ti in zip(shape, t, strict=True))

        tile = list(shape)
        while math.prod(extent(tile)) > target_elements or n_tiles(tile) < min_tiles:
            best, best_eff = None, -1.0
            for ax in range(len(shape)):
                if tile[ax] < 2 * max(2 * r[ax], 16):
                    continue
                trial = list(tile)
                trial[ax] = -(-tile[ax] // 2)
                eff = math.prod(trial) / math.prod(extent(trial))
                if eff > best_eff:
                    best, best_eff = trial, eff
            if best is None:
                break
            tile = best
        out = []
        for ax, (t, rr, n) in enumerate(zip(tile, r, shape, strict=True)):
            if t < n:
                grown = next_fast_len(t + 2 * rr, real=ax == len(shape) - 1) - 2 * rr
                t = grown if -(-n // grown) <= -(-n // t) else t  # only if no tile is added
            out.append(int(min(max(t, 1), n)))
        return tuple(out)

    def __repr__(self) -> str:
        grid = ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.shape, strict=True))
        kern = "x".join(str(k) for k in self.kernel_shape)
        return (f"ProductConvolution({grid}; {self.n_components} components of {kern}; "
                f"boundary={self.boundary!r}, dtype={self.dtype})")

    # -- pickling (Dask workers): caches stay behind ---------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_arrays"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __dask_tokenize__(self):
        return ("pcmx.ProductConvolution", self._token, self._alpha_key, self.boundary,
                str(self.dtype), self.shape)

    # -- dispatch -----------------------------------------------------------------------------
    def _run(self, u, chunks, adjoint: bool, nan: str = "raise", label: str | None = None):
        name = "v" if adjoint else "u"
        if nan not in NAN_POLICIES:
            raise InputError(f"nan={nan!r}: expected one of {', '.join(map(repr, NAN_POLICIES))}")
        if isinstance(u, xr.DataArray):
            self._check_dataarray(u, name)
            source = u.attrs.get("source")
            out = self._run(u.data, chunks, adjoint, nan, f"{name} ({source})" if source else name)
            return xr.DataArray(out, dims=u.dims, coords=u.coords, attrs=u.attrs, name=u.name)
        if not hasattr(u, "shape") or not hasattr(u, "dtype"):
            u = np.asarray(u)
        if tuple(u.shape) != self.shape:
            grid = ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.shape, strict=True))
            raise InputError(f"{name}: shape {tuple(u.shape)} does not match the operator's grid ({grid})")
        if u.dtype.kind not in "fiub":
            raise InputError(f"{name}: dtype {u.dtype} is not real")
        if u.dtype.kind == "f":
            if nan == "mask":
                return self._run_masked(u, chunks, adjoint)
            u = checked_finite(u, label or name, self.dims, hint=_NAN_HINT)
        return self._compute(u, chunks, adjoint)

    def _run_masked(self, u, chunks, adjoint: bool):
        """``nan="mask"``: the zero-filled input, NaN where its missing pixels reach."""
        if _backend.is_dask(u):
            import dask.array as da

            missing = ~da.isfinite(u)
            out = self._compute(da.where(missing, 0, u), chunks, adjoint)
            reach = self.missing_mask(missing.rechunk(out.chunks), adjoint=adjoint)
            return da.where(reach, np.nan, out)
        xp = _backend.xp(u)
        missing = ~xp.isfinite(u)
        if not bool(missing.any()):
            return self._compute(u, chunks, adjoint)
        out = self._compute(xp.where(missing, 0, u), chunks, adjoint)
        out[self.missing_mask(missing, adjoint=adjoint)] = np.nan
        return out

    def _compute(self, u, chunks, adjoint: bool):
        rdtype = self._working_dtype(u.dtype)
        if _backend.is_dask(u):
            if chunks is not None:
                u = u.rechunk(self.auto_chunks() if chunks == "auto" else chunks)
            return self._tiled(u, rdtype, adjoint)
        if chunks is not None:
            import dask.array as da

            spec = self.auto_chunks() if chunks == "auto" else chunks
            meta = _backend.xp(u).empty((0,) * self.ndim, dtype=u.dtype)
            tiles = da.from_array(u, chunks=spec, meta=meta, name=False)
            return self._tiled(tiles, rdtype, adjoint).compute()
        return self._in_memory(u, rdtype, adjoint)

    def _working_dtype(self, dtype) -> np.dtype:
        if np.dtype(dtype).kind == "f":
            return np.result_type(self.dtype, dtype)
        return self.dtype

    def _check_dataarray(self, u: xr.DataArray, name: str) -> None:
        if tuple(u.dims) != self.dims:
            raise InputError(f"{name}: dims {tuple(u.dims)}, expected {self.dims}")
        from .units import pixel_size

        for dim in self.dims:
            try:
                mine, theirs = pixel_size(self.dataset, dim), pixel_size(u, dim)
            except PcmxError:
                continue
            if mine is not None and theirs is not None and abs(mine - theirs) > 1e-3 * mine:
                raise InputError(
                    f"{name}: pixel size along {dim} is {theirs:.6g} um but the operator's is "
                    f"{mine:.6g} um"
                )

    # -- cached arrays ------------------------------------------------------------------------
    def _cached(self, key, factory):
        with self._lock:
            if key not in self._arrays:
                self._arrays[key] = factory()
            return self._arrays[key]

    def _alpha(self, xp, rdtype):
        """The coefficient maps in memory on the backend of ``xp``, in ``rdtype``."""
        def load():
            a = self._alpha_src
            if _backend.is_dask(a):
                a = a.compute()
            return xp.asarray(a, dtype=rdtype)

        return self._cached(("alpha", xp.__name__, np.dtype(rdtype).str), load)

    def _alpha_extended(self, xp, rdtype):
        """The maps extended by the kernel radius as the boundary mode says (cached)."""
        def pad():
            width = [(0, 0)] + [(r, r) for r in self.radius]
            return xp.pad(self._alpha(xp, rdtype), width, mode=_PAD_MODE[self.boundary])

        return self._cached(("alpha_ext", self.boundary, xp.__name__, np.dtype(rdtype).str), pad)

    def _fft_shape(self, extent: Sequence[int], offset: Sequence[int],
                   out_shape: Sequence[int]) -> tuple[int, ...]:
        """The padded FFT shape for an input of ``extent`` read out at ``offset``.

        With the input at the origin of the buffer and zeros beyond it, the circular
        convolution equals the linear one on the output window ``[offset, offset + out)``
        when ``P >= extent + radius - offset`` (no wrap from the left) and
        ``P >= offset + out + radius`` (none from the right), and ``P >= kernel size``.
        """
        from scipy.fft import next_fast_len

        shape = []
        for ax, (n, o, t, r, k) in enumerate(zip(extent, offset, out_shape, self.radius,
                                                 self.kernel_shape, strict=True)):
            need = max(n + r - o, o + t + r, k, 1)
            shape.append(next_fast_len(need, real=ax == self.ndim - 1))
        return tuple(shape)

    def _spectra(self, fshape, rdtype, xp, fft, conj: bool):
        """Kernel spectra at the padded shape, kernels centred at index 0 (cached)."""
        key = (self._token, fshape, np.dtype(rdtype).str, xp.__name__, conj)

        def compute():
            if conj:
                return xp.conj(self._spectra(fshape, rdtype, xp, fft, False))
            kw = _backend.fft_kwargs(fft, _threads(self.workers))
            index = xp.ix_(*[xp.asarray((np.arange(k) - r) % p)
                             for k, r, p in zip(self.kernel_shape, self.radius, fshape, strict=True)])
            buf = xp.zeros(fshape, dtype=rdtype)
            h = xp.asarray(self._h, dtype=rdtype)
            out = None
            for i in range(self.n_components):
                buf[index] = h[i]
                spec = fft.rfftn(buf, axes=tuple(range(self.ndim)), **kw)
                if out is None:
                    out = xp.empty((self.n_components, *spec.shape), dtype=spec.dtype)
                out[i] = spec
            return out

        return spectrum_cache.get(key, compute)

    # -- the numerical core (NumPy or CuPy) -----------------------------------------------------
    def _inverse_crop(self, z, fshape, offset, out_shape, fft, kw):
        """Inverse real FFT of ``z`` (overwritten), keeping ``out_shape`` from ``offset``."""
        d = self.ndim
        for ax in range(d - 1):
            z = fft.ifft(z, axis=ax, overwrite_x=True, **kw)
            z = z[(slice(None),) * ax + (slice(offset[ax], offset[ax] + out_shape[ax]),)]
        out = fft.irfft(z, n=fshape[-1], axis=d - 1, **kw)
        return out[..., offset[-1]:offset[-1] + out_shape[-1]]

    def _forward_block(self, u, alpha, offset, out_shape, workers=-1, window=None, fshape=None):
        """``crop(sum_i h_i (*) (alpha_i . u))`` for ``u`` placed at the origin of the buffer.

        ``window``: the part of ``u`` that ``alpha`` covers (elsewhere ``u`` is zero padding).
        ``fshape``: the FFT shape (default: padded so that the convolution is linear on the
        output; ``u.shape`` gives the circular convolution).
        """
        xp, fft = _backend.xp(u), _backend.fft_module(u)
        kw = _backend.fft_kwargs(fft, _threads(workers))
        ew = _Elementwise(xp, workers)
        rdtype = alpha.dtype
        fshape = fshape or self._fft_shape(u.shape, offset, out_shape)
        spectra = self._spectra(fshape, rdtype, xp, fft, conj=False)
        buf = xp.zeros(fshape, dtype=rdtype)
        region = buf[tuple(slice(0, n) for n in u.shape)]
        if window is not None:
            region, u = region[window], u[window]
        axes = tuple(range(self.ndim))
        acc = None
        for i in range(self.n_components):
            ew.multiply(alpha[i], u, out=region)
            spec = fft.rfftn(buf, axes=axes, **kw)
            if acc is None:
                ew.multiply(spec, spectra[i], out=spec)
                acc = spec
            else:
                ew.multiply_add(spec, spectra[i], acc)
        return self._inverse_crop(acc, fshape, offset, out_shape, fft, kw), ew

    def _adjoint_block(self, v, v_offset, fshape, out_offset, out_shape, alpha_out, workers=-1):
        """``sum_i alpha_out_i . crop(h_i^flip (*) v)`` for ``v`` placed at ``v_offset``."""
        xp, fft = _backend.xp(v), _backend.fft_module(v)
        kw = _backend.fft_kwargs(fft, _threads(workers))
        ew = _Elementwise(xp, workers)
        rdtype = alpha_out.dtype
        spectra = self._spectra(fshape, rdtype, xp, fft, conj=True)
        buf = xp.zeros(fshape, dtype=rdtype)
        buf[tuple(slice(o, o + n) for o, n in zip(v_offset, v.shape, strict=True))] = v
        vspec = fft.rfftn(buf, axes=tuple(range(self.ndim)), **kw)
        del buf
        tmp = xp.empty_like(vspec)
        out = xp.empty(out_shape, dtype=rdtype)
        for i in range(self.n_components):
            ew.multiply(vspec, spectra[i], out=tmp)
            z = self._inverse_crop(tmp, fshape, out_offset, out_shape, fft, kw)
            if i == 0:
                ew.multiply(z, alpha_out[i], out=out)
            else:
                ew.multiply_add(z, alpha_out[i], out)
        return out, ew

    def _in_memory(self, u, rdtype, adjoint: bool):
        xp = _backend.xp(u)
        u = xp.asarray(u, dtype=rdtype)
        zeros = (0,) * self.ndim
        if self.boundary == "periodic":
            # circular convolution at the image's own size: no padding, no tiles (tiles
            # would need halos on every side and do more work than the whole image)
            alpha = self._alpha(xp, rdtype)
            if not adjoint:
                out, ew = self._forward_block(u, alpha, zeros, self.shape, self.workers,
                                              fshape=self.shape)
                return ew.contiguous(out)
            return self._adjoint_block(u, zeros, self.shape, zeros, self.shape, alpha, self.workers)[0]
        threads = _Elementwise(xp, self.workers).threads
        if threads > 1 and math.prod(self.shape) >= _MIN_THREADED_PIXELS:
            out = self._threaded(u, rdtype, adjoint, threads)
            if out is not None:
                return out
        if self.boundary == "zero":
            alpha = self._alpha(xp, rdtype)
            if not adjoint:
                out, ew = self._forward_block(u, alpha, zeros, self.shape, self.workers)
                return ew.contiguous(out)
            fshape = self._fft_shape(self.shape, zeros, self.shape)
            return self._adjoint_block(u, zeros, fshape, zeros, self.shape, alpha, self.workers)[0]
        alpha = self._alpha_extended(xp, rdtype)
        ext = tuple(n + 2 * r for n, r in zip(self.shape, self.radius, strict=True))
        if not adjoint:
            u_ext = xp.pad(u, [(r, r) for r in self.radius], mode="symmetric")
            out, ew = self._forward_block(u_ext, alpha, self.radius, self.shape, self.workers)
            return ew.contiguous(out)
        fshape = self._fft_shape(ext, self.radius, self.shape)
        w, ew = self._adjoint_block(u, self.radius, fshape, zeros, ext, alpha, self.workers)
        return ew.contiguous(_fold_symmetric(w, self.radius))

    def _threaded(self, u, rdtype, adjoint: bool, threads: int):
        """In memory on several cores: one tile (with its halo) per thread, no Dask.

        Returns None when the image cannot be split usefully.

        Independent single-threaded tiles use the cores better than multi-threaded FFTs of
        the whole image (measured ~20% faster on 2 cores: ``docs/performance.md``).
        """
        r, zeros = self.radius, (0,) * self.ndim
        reflect = self.boundary == "reflect"
        pad = [(rr, rr) for rr in r]
        if reflect:  # the domain: the image extended by its mirror (apply) or by zeros (adjoint)
            domain = np.pad(u, pad, mode="constant" if adjoint else "symmetric")
            alpha = self._alpha_extended(np, rdtype)
        else:
            domain, alpha = u, self._alpha(np, rdtype)
        shift = r if reflect and not adjoint else zeros  # image origin in domain coordinates
        grid = domain.shape if adjoint else self.shape  # where the output is computed
        sizes = self._plan_tiles(grid, threads, math.inf)
        tiles = list(np.ndindex(*[-(-n // t) for n, t in zip(grid, sizes, strict=True)]))
        if len(tiles) < 2:
            return None  # too small to split: one block with multi-threaded FFTs
        out = np.empty(grid, rdtype)

        def one(index):
            span = [(i * t, min((i + 1) * t, n)) for i, t, n in zip(index, sizes, grid, strict=True)]
            src, offset = [], []
            for (a, b), s, rr, size in zip(span, shift, r, domain.shape, strict=True):
                lo, hi = max(a + s - rr, 0), min(b + s + rr, size)
                src.append(slice(lo, hi))
                offset.append(a + s - lo)
            block = domain[tuple(src)]
            out_shape = tuple(b - a for a, b in span)
            if adjoint:
                maps = alpha[(slice(None), *[slice(a + s, b + s) for (a, b), s in zip(span, shift, strict=True)])]
                fshape = self._fft_shape(block.shape, offset, out_shape)
                res = self._adjoint_block(block, zeros, fshape, offset, out_shape, maps, workers=1)[0]
            else:
                res = self._forward_block(block, alpha[(slice(None), *src)], offset, out_shape, workers=1)[0]
            out[tuple(slice(a, b) for a, b in span)] = res

        list(thread_pool().map(one, tiles))
        if adjoint and reflect:
            return np.ascontiguousarray(_fold_symmetric(out, r))
        return out

    # -- tiled (Dask) -------------------------------------------------------------------------
    def _alpha_dask(self, chunks, rdtype):
        import dask.array as da
        from dask.base import tokenize

        a = self._alpha_src
        spec = ((self.n_components,), *chunks)
        if not _backend.is_dask(a):
            a = da.from_array(a, chunks=spec, name=f"{self._alpha_key}-{tokenize(spec)}")
        return a.astype(rdtype).rechunk(spec)

    def _tiled(self, u, rdtype, adjoint: bool):
        from dask.array.overlap import ensure_minimum_chunksize

        r = self.radius
        u = u.astype(rdtype) if u.dtype != rdtype else u
        # every chunk must be at least as wide as the halo it lends its neighbours
        u = u.rechunk(tuple(ensure_minimum_chunksize(max(rr, 1), c)
                            for rr, c in zip(r, u.chunks, strict=True)))
        xp = _backend.xp(u)
        # maps held in memory are read as views by each tile, unless tasks may leave this
        # process (a distributed or multiprocessing scheduler): then they travel as chunks
        in_memory = not _backend.is_dask(self._alpha_src) and _local_scheduler()
        if adjoint and self.boundary == "reflect":
            return self._tiled_reflect_adjoint(u, rdtype, xp, in_memory)
        # the halo of a tile: mirrored (reflect), wrapped (periodic: apply and adjoint are
        # both circular, so each tile is the zero-mode block of its wrapped halo) or none
        mode = None if self.boundary == "zero" else self.boundary
        extended = mode is not None and not adjoint  # the maps must cover the halo
        if in_memory:
            alpha = (self._alpha_extended if extended else self._alpha)(xp, rdtype)
            return self._tiles(u, rdtype, adjoint, mode, alpha_mem=alpha,
                               shift=self.radius if extended else (0,) * self.ndim)
        return self._tiles(u, rdtype, adjoint, mode, alpha_lazy=self._alpha_dask(u.chunks, rdtype))

    def _tiles(self, u, rdtype, adjoint, mode, *, alpha_mem=None, shift=None, alpha_lazy=None):
        """Map the block functions over ``u``'s chunks grown by halos of the kernel radius.

        In zero mode (``mode=None``) an axis held in one chunk needs no halo (the FFT buffer
        pads it with zeros, as in memory); with ``mode`` "reflect" or "periodic" every axis
        gets its mirrored or wrapped halo.
        """
        import dask.array as da
        from dask.array.overlap import overlap
        from dask.base import tokenize

        depth = tuple(rr if (mode or len(c) > 1) else 0
                      for rr, c in zip(self.radius, u.chunks, strict=True))
        boundary = mode or 0
        u_ov = u
        if any(depth):
            u_ov = overlap(u, depth=dict(enumerate(depth)), boundary=dict.fromkeys(range(self.ndim), boundary))
        meta = _backend.xp(u).empty((0,) * self.ndim, dtype=rdtype)
        source = "mem" if alpha_mem is not None else alpha_lazy.name
        name = (f"pcmx-{'adjoint' if adjoint else 'apply'}-"
                f"{tokenize(self, u.name, u.chunks, adjoint, mode, source, shift)}")
        kwargs = {"engine": self, "depth": depth, "adjoint": adjoint}
        if alpha_mem is not None:
            return da.map_blocks(_tile_from_memory, u_ov, chunks=u.chunks, dtype=rdtype, meta=meta,
                                 name=name, alpha=alpha_mem, shift=shift, **kwargs)
        a_ov = alpha_lazy
        if any(depth):
            a_ov = overlap(alpha_lazy, depth={0: 0, **{ax + 1: d for ax, d in enumerate(depth)}},
                           boundary=dict.fromkeys(range(self.ndim + 1), boundary))
        ind = "zyx"[3 - self.ndim:]
        return da.blockwise(
            _tile_from_chunks, ind, a_ov, "i" + ind, u_ov, ind, concatenate=True, dtype=rdtype,
            meta=meta, name=name,
            adjust_chunks={i: (lambda n, d=d: n - 2 * d) for i, d in zip(ind, depth, strict=True)},
            **kwargs,
        )

    def _tiled_reflect_adjoint(self, v, rdtype, xp, in_memory):
        """``E^T H_ext^T crop^T v``: ``v`` padded by zeros, mirrored maps, then folded."""
        import dask.array as da

        r = self.radius
        pad = [(rr, rr) for rr in r]
        merged = []
        for rr, c in zip(r, v.chunks, strict=True):
            c = list(c)
            c[0] += rr
            c[-1] += rr
            merged.append(tuple(c))
        v_ext = da.pad(v, pad, mode="constant").rechunk(tuple(merged))
        if in_memory:
            w = self._tiles(v_ext, rdtype, True, None, alpha_mem=self._alpha_extended(xp, rdtype),
                            shift=(0,) * self.ndim)
        else:
            a_ext = da.pad(self._alpha_dask(v.chunks, rdtype), [(0, 0), *pad], mode="symmetric")
            w = self._tiles(v_ext, rdtype, True, None,
                            alpha_lazy=a_ext.rechunk(((self.n_components,), *merged)))
        return _fold_symmetric_dask(w, r).rechunk(v.chunks)


def _local_scheduler() -> bool:
    """True if Dask tasks run in this process (threads or synchronously)."""
    import dask.local
    import dask.threaded
    from dask.base import get_scheduler

    return get_scheduler() in (None, dask.threaded.get, dask.local.get_sync)


def _tile_from_memory(u, *, engine: ProductConvolution, depth, adjoint, alpha, shift, block_info=None):
    """One Dask tile, the maps read as views of an in-memory array (``shift``: its origin).

    ``u`` is the tile grown by ``depth`` on each side; the output is the tile itself.
    """
    location = block_info[None]["array-location"]
    xp = _backend.xp(u)
    out_shape = tuple(b - a for a, b in location)
    if adjoint:
        inner = (slice(None),) + tuple(slice(a + s, b + s) for (a, b), s in zip(location, shift, strict=True))
        fshape = engine._fft_shape(u.shape, depth, out_shape)
        return engine._adjoint_block(u, (0,) * engine.ndim, fshape, depth, out_shape,
                                     xp.asarray(alpha[inner], dtype=u.dtype), workers=1)[0]
    window, index = [], [slice(None)]
    for (a, b), d, s, n in zip(location, depth, shift, alpha.shape[1:], strict=True):
        lo, hi = max(a - d + s, 0), min(b + d + s, n)  # the part of the tile the maps cover
        index.append(slice(lo, hi))
        window.append(slice(lo - (a - d + s), hi - (a - d + s)))
    alpha = xp.asarray(alpha[tuple(index)], dtype=u.dtype)
    return engine._forward_block(u, alpha, depth, out_shape, workers=1, window=tuple(window))[0]


def _tile_from_chunks(alpha, u, *, engine: ProductConvolution, depth, adjoint):
    """One Dask tile, the maps given as a chunk with the same halo as ``u``."""
    xp = _backend.xp(u)
    out_shape = tuple(n - 2 * d for n, d in zip(u.shape, depth, strict=True))
    if adjoint:
        inner = (slice(None),) + tuple(slice(d, d + n) for d, n in zip(depth, out_shape, strict=True))
        fshape = engine._fft_shape(u.shape, depth, out_shape)
        return engine._adjoint_block(u, (0,) * engine.ndim, fshape, depth, out_shape,
                                     xp.asarray(alpha[inner], dtype=u.dtype), workers=1)[0]
    alpha = xp.asarray(alpha, dtype=u.dtype)
    return engine._forward_block(u, alpha, depth, out_shape, workers=1)[0]


def _fold_symmetric(w, radius):
    """Adjoint of symmetric padding by ``radius``: add the mirrored margins back (in place)."""
    xp = _backend.xp(w)
    for ax, r in enumerate(radius):
        if r == 0:
            continue
        n = w.shape[ax] - 2 * r

        def sl(a, b, ax=ax):
            return (slice(None),) * ax + (slice(a, b),)

        inner = w[sl(r, r + n)]
        inner[sl(0, r)] += xp.flip(w[sl(0, r)], axis=ax)
        inner[sl(n - r, n)] += xp.flip(w[sl(n + r, n + 2 * r)], axis=ax)
        w = inner
    return w


def _fold_symmetric_dask(w, radius):
    """:func:`_fold_symmetric` for Dask arrays (lazy)."""
    import dask.array as da

    for ax, r in enumerate(radius):
        if r == 0:
            continue
        n = w.shape[ax] - 2 * r

        def sl(a, b, ax=ax):
            return (slice(None),) * ax + (slice(a, b),)

        lo = da.flip(w[sl(0, r)], axis=ax)
        hi = da.flip(w[sl(n + r, n + 2 * r)], axis=ax)
        width_lo = [(0, 0)] * w.ndim
        width_hi = [(0, 0)] * w.ndim
        width_lo[ax] = (0, n - r)
        width_hi[ax] = (n - r, 0)
        w = w[sl(r, r + n)] + da.pad(lo, width_lo) + da.pad(hi, width_hi)
    return w


# --------------------------------------------------------------------------------------------
def blur(image, operator, **kwargs):
    """Blur ``image`` with a space-varying operator: ``H image`` (paper Prop. 1).

    What ``image.pcmx.blur(operator)`` and ``operator.pcmx.blur(image)`` call.

    Parameters
    ----------
    image : DataArray, ndarray, dask or cupy array
        The image on the operator's grid.
    operator : ProductConvolution, Dataset or str
        An engine (reused with its caches), an operator Dataset or a store path.
    **kwargs
        ``boundary``, ``dtype``, ``workers`` (for a new engine), ``chunks`` and ``nan``
        (for :meth:`ProductConvolution.apply`: NaN or infinite pixels are refused unless
        ``nan="mask"``).

    Returns
    -------
    Same kind as ``image``
        The blurred image.
    """
    chunks = kwargs.pop("chunks", None)
    nan = kwargs.pop("nan", "raise")
    if not isinstance(operator, ProductConvolution):
        operator = ProductConvolution(operator, **kwargs)
    elif kwargs:
        raise InputError(f"blur: {sorted(kwargs)} cannot change an existing ProductConvolution")
    return operator.apply(image, chunks=chunks, nan=nan)
