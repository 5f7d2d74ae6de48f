"""Images in, results out: reading images, pcmx stores, TIFFs, atomic writes, checkpoints.

:mod:`~pcmx.io.readers` (images in), :mod:`~pcmx.io.store` (Zarr v3 stores of results),
:mod:`~pcmx.io.tiff` (calibrated ImageJ TIFFs out), :mod:`~pcmx.io.atomic` (the one atomic
writer all of them use) and :mod:`~pcmx.io.checkpoint` (resumable runs).
"""

from .readers import read_image
from .store import describe_store, open_store, save_store
from .tiff import write_tiff

__all__ = ["describe_store", "open_store", "read_image", "save_store", "write_tiff"]
