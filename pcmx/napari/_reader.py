"""The napari reader contribution: pcmx stores and the images pcmx reads, as layers."""

from __future__ import annotations

import os
from collections.abc import Callable

from ..io import open_store, read_image
from ..io.store import is_store
from ._layers import image_layer, store_layers

__all__ = ["get_reader", "read_path"]

#: File endings of the images :func:`pcmx.read_image` reads (a ``.zarr`` directory that is not
#: a pcmx store is read as an OME-Zarr image).
IMAGE_SUFFIXES = (".tif", ".tiff", ".npy", ".zarr", ".ome.zarr")


def _kind(path) -> str | None:
    """``"store"``, ``"image"`` or None (not ours) for one path."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    p = os.fspath(path).rstrip("/\\")
    if is_store(p):
        return "store"
    low = p.lower()
    if not low.endswith(IMAGE_SUFFIXES):
        return None
    if low.endswith((".zarr", ".ome.zarr")):
        return "image" if os.path.isdir(p) else None
    return "image" if os.path.isfile(p) else None


def get_reader(path) -> Callable[[str | list], list[tuple]] | None:
    """napari's reader hook: :func:`read_path` for a pcmx store or an image pcmx reads, else None.

    Parameters
    ----------
    path : str or list of str
        What napari was asked to open. A list is accepted when every entry is a TIFF or
        ``.npy`` plane (they are stacked along z, as :func:`pcmx.read_image` does), or when it
        holds one path.

    Returns
    -------
    callable or None
        None tells napari to try another reader (never raises for a path that is not ours).
    """
    if isinstance(path, (list, tuple)):
        if len(path) == 1:
            return get_reader(path[0])
        kinds = {_kind(p) for p in path}
        return read_path if kinds == {"image"} and not any(
            os.fspath(p).lower().rstrip("/\\").endswith(".zarr") for p in path) else None
    return read_path if _kind(path) is not None else None


def read_path(path, *, n: int = 5) -> list[tuple]:
    """Layers of a pcmx store (:func:`pcmx.napari.store_layers`) or of an image.

    An image becomes one image layer whose ``scale``/``translate`` are its pixel size and
    origin in micrometres (pixels where the file has no pixel size); an OME-Zarr or a large
    TIFF stays lazy where :func:`pcmx.read_image` reads it lazily.

    Raises
    ------
    pcmx.PcmxError
        If the store is invalid or the image unreadable (the message names the path).
    """
    if isinstance(path, (list, tuple)):
        if len(path) == 1:
            return read_path(path[0], n=n)
        image = read_image([os.fspath(p) for p in path])
        return [image_layer(image, name=os.path.basename(os.fspath(path[0])))]
    p = os.fspath(path).rstrip("/\\")
    if is_store(p):
        return store_layers(open_store(p), n=n, source=p)
    image = read_image(p)
    return [image_layer(image, name=os.path.basename(p), metadata={"source": p})]
