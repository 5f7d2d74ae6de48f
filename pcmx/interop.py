"""pcmx operators in the libraries around it: deepinv (PyTorch) and pylops.

The product-convolution operator ``H u = sum_i h_i * (alpha_i . u)`` of a
:class:`pcmx.ProductConvolution` is, term for term, deepinv's ``SpaceVaryingBlur`` (its
``mask_first=True`` model ``y = sum_k h_k * (w_k . x)``), and it is a linear operator pylops
and SciPy can solve with. Both libraries are optional and imported on first use only:

* :func:`to_deepinv` -> ``deepinv.physics.SpaceVaryingBlur`` (``pip install deepinv``, which
  brings PyTorch);
* :func:`as_pylops` -> a ``pylops.LinearOperator`` that keeps the image's shape
  (``pip install pylops``);
* :meth:`pcmx.ProductConvolution.as_linear_operator` (SciPy, flattened images) needs nothing.
"""

from __future__ import annotations

import importlib

import numpy as np

from .errors import InputError

__all__ = ["DEEPINV_PADDING", "to_deepinv", "as_pylops"]

#: pcmx boundary -> deepinv padding computing the same operator.
DEEPINV_PADDING = {"zero": "constant", "periodic": "circular"}


def _require(module: str, install: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{what} needs {module.split('.')[0]}, which is not installed: "
                          f"pip install {install}") from exc


def _engine(op, caller: str):
    """The ProductConvolution behind ``op`` (duck-typed: pcmx.interop does not import it)."""
    if all(hasattr(op, a) for a in ("dataset", "boundary", "shape", "apply", "adjoint")):
        return op
    name = type(op).__name__
    raise InputError(f"{caller}: expected a pcmx.ProductConvolution, got {name}; build one with "
                     "pcmx.ProductConvolution(operator, boundary=...) first")


def to_deepinv(op, *, padding: str | None = None, use_fft: bool = True, device="cpu",
               dtype=None):
    """The operator as a ``deepinv.physics.SpaceVaryingBlur`` with the same output.

    Parameters
    ----------
    op : pcmx.ProductConvolution
        A 2D operator; its ``boundary`` chooses deepinv's padding: ``"zero"`` ->
        ``"constant"``, ``"periodic"`` -> ``"circular"`` (:data:`DEEPINV_PADDING`).
    padding : str, optional
        deepinv's padding, to override the mapping. pcmx's ``"reflect"`` mirrors about the
        edge pixel's outer side (``d c b a | a b c d``, numpy's ``"symmetric"``) and deepinv's
        ``"reflect"`` about the edge pixel (``d c b | a b c d``, PyTorch's), so a ``reflect``
        operator needs ``padding="reflect"`` given explicitly: the two then agree except
        within the kernel radius of the border.
    use_fft : bool
        deepinv's FFT convolutions (faster for the kernels of microscopes).
    device : str or torch.device
        Where the physics' buffers live (``"cuda"`` for a GPU).
    dtype : torch.dtype, optional
        The buffers' dtype (default: ``op.dtype``'s, float32 normally).

    Returns
    -------
    deepinv.physics.SpaceVaryingBlur
        ``filters (1, 1, I, ky, kx)`` (the ``h_i``, centres at ``size // 2`` as deepinv
        expects for odd sizes) and ``multipliers (1, 1, I, ny, nx)`` (the ``alpha_i``),
        ``mask_first=True``; apply it to tensors ``(B, C, ny, nx)``: ``physics(x)`` or
        ``physics.A(x)``, adjoint ``physics.A_adjoint(y)``.

    Raises
    ------
    ImportError
        If deepinv (or PyTorch) is not installed (the message says what to install).
    InputError
        If the operator is 3D, or its boundary has no exact deepinv padding and no
        ``padding`` is given.

    Notes
    -----
    deepinv computes ``y = sum_k h_k * (w_k . x)`` with ``*`` a convolution and the filter
    centre at index ``h // 2``: with ``h_k = h_i`` and ``w_k = alpha_i`` this is pcmx's
    ``H u = sum_i h_i * (alpha_i . u)`` (paper Prop. 1). Its ``"constant"`` padding extends
    the product ``alpha_i . u`` by zeros, pcmx's ``"zero"`` boundary; ``"circular"`` wraps it,
    pcmx's ``"periodic"``.

    Examples
    --------
    >>> H = pcmx.ProductConvolution("operator.zarr")       # doctest: +SKIP
    >>> physics = H.to_deepinv()                            # doctest: +SKIP
    >>> y = physics(torch.from_numpy(image)[None, None])    # doctest: +SKIP
    """
    op = _engine(op, "to_deepinv")
    if len(op.shape) != 2:
        raise InputError(f"to_deepinv: deepinv's SpaceVaryingBlur is 2D; this operator has dims "
                         f"{tuple(op.dims)}")
    if padding is None:
        if op.boundary not in DEEPINV_PADDING:
            raise InputError(
                f"to_deepinv: boundary={op.boundary!r} has no exact deepinv padding (pcmx mirrors "
                "about the edge's outer side, deepinv's 'reflect' about the edge pixel); pass "
                "padding='reflect' to accept a difference within the kernel radius of the "
                "border, or use boundary='zero' or 'periodic'")
        padding = DEEPINV_PADDING[op.boundary]
    torch = _require("torch", "deepinv  (it brings torch)", "to_deepinv")
    physics = _require("deepinv.physics", "deepinv", "to_deepinv")
    if dtype is None:
        dtype = torch.float64 if np.dtype(op.dtype) == np.float64 else torch.float32
    h = np.asarray(op.dataset["psf_basis"].values, dtype=np.float64)
    alpha = np.asarray(op.dataset["coefficients"].values, dtype=np.float64)
    filters = torch.as_tensor(h, dtype=dtype)[None, None]
    multipliers = torch.as_tensor(alpha, dtype=dtype)[None, None]
    return physics.SpaceVaryingBlur(filters=filters, multipliers=multipliers, padding=padding,
                                    use_fft=use_fft, mask_first=True, device=device)


def as_pylops(op):
    """The operator as a ``pylops.LinearOperator`` on images of its shape (no flattening).

    ``dims = dimsd = op.shape``: ``Hop @ image`` and ``Hop.H @ image`` take and return
    arrays of the image's shape (pylops flattens internally), and pylops' solvers
    (``pylops.optimization``) run on it. The forward is :meth:`ProductConvolution.apply`,
    the adjoint :meth:`ProductConvolution.adjoint` (NumPy, in memory).

    Parameters
    ----------
    op : pcmx.ProductConvolution

    Returns
    -------
    pylops.LinearOperator
        Square, of ``op.dtype``, named ``"pcmx.ProductConvolution"``.

    Raises
    ------
    ImportError
        If pylops is not installed (the message says what to install).

    Examples
    --------
    >>> Hop = H.as_pylops()                                  # doctest: +SKIP
    >>> blurred = Hop @ image                                # (ny, nx) in, (ny, nx) out
    >>> pylops.utils.dottest(Hop, Hop.shape[0], Hop.shape[1], rtol=1e-4)  # doctest: +SKIP
    """
    op = _engine(op, "as_pylops")
    pylops = _require("pylops", "pylops", "as_pylops")
    shape = tuple(int(n) for n in op.shape)

    class ProductConvolutionOperator(pylops.LinearOperator):
        def __init__(self, engine):
            self.engine = engine
            super().__init__(dtype=np.dtype(engine.dtype), dims=shape, dimsd=shape,
                             name="pcmx.ProductConvolution")

        def _matvec(self, x):
            return np.asarray(self.engine.apply(np.asarray(x).reshape(shape))).ravel()

        def _rmatvec(self, y):
            return np.asarray(self.engine.adjoint(np.asarray(y).reshape(shape))).ravel()

    return ProductConvolutionOperator(op)
