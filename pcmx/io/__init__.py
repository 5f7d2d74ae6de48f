"""Reading images and reading/writing pcmx stores."""

from .readers import read_image
from .store import open_store, save_store

__all__ = ["open_store", "read_image", "save_store"]
