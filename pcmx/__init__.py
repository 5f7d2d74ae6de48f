"""pcmx: learn low-dimensional models of fluorescence microscopes from images of micro-beads.

Implements Debarnot, Escande, Mangeat & Weiss, "Learning low-dimensional models of
microscopes": space-varying PSFs as product-convolution operators ``H u = sum_i h_i * (alpha_i . u)``
learned from bead images, families of such operators over many acquisitions, and blind
Sparse+Smooth deblurring. Importing pcmx registers the ``.pcmx`` xarray accessors.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from . import accessor as _accessor  # noqa: E402,F401  (registers ds.pcmx / da.pcmx)
from .errors import InputError, PcmxError, SchemaError, StoreError, StoreExistsError  # noqa: E402
from .io import open_store, read_image, save_store  # noqa: E402
from .io.readers import PcmxWarning  # noqa: E402
from .options import get_options, set_options  # noqa: E402
from .schema import validate  # noqa: E402

# Heavier parts load on first use, so `import pcmx` and `pcmx info` stay fast.
_LAZY = {
    "ProductConvolution": "pcmx.operator",
    "simulate": "pcmx.simulate",
    "learn_operator": "pcmx.learn",
    "cross_validate": "pcmx.cross_validation",
    "learn_family": "pcmx.family",
    "cross_validate_family": "pcmx.cross_validation",
    "identify_operator": "pcmx.deblur",
    "deblur": "pcmx.deblur",  # the subpackage (pcmx.deblur.deblur is the function)
    "restore": "pcmx.restore",  # the module (pcmx.restore.restore is the function)
    "testing": "pcmx.testing",
    "plot": "pcmx.plot",
}

__all__ = [
    "__version__",
    "InputError",
    "PcmxError",
    "PcmxWarning",
    "SchemaError",
    "StoreError",
    "StoreExistsError",
    "open_store",
    "read_image",
    "get_options",
    "save_store",
    "set_options",
    "validate",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__.endswith("." + name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pcmx' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
