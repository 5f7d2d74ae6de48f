"""User-facing errors of pcmx.

Every error a user can cause (a bad file, a bad parameter, a store of the wrong kind) is a
:class:`PcmxError`: a one-line message naming the argument or file and the cause. The CLI
prints it as ``pcmx CMD: error: <message>`` and exits with status 2.
"""

from __future__ import annotations

__all__ = ["PcmxError", "InputError", "SchemaError", "StoreError", "StoreExistsError",
           "StoreLockedError"]


class PcmxError(ValueError):
    """Base class of the errors a user can cause and fix."""


class InputError(PcmxError):
    """An input image or parameter cannot be used (names the file or argument)."""


class SchemaError(PcmxError):
    """A Dataset or store violates its pcmx schema (wrong kind, missing variable, dims...)."""


class StoreError(PcmxError):
    """A path is not a readable pcmx store, or a store cannot be written."""


class StoreExistsError(StoreError, FileExistsError):
    """Refusing to overwrite an existing store without ``overwrite=True``."""


class StoreLockedError(StoreError):
    """Another process is writing the same store (the message names it: pid, host, since when)."""
