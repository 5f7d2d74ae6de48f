"""Blind Sparse+Smooth (BSS) deblurring with a learned family, and baselines (paper III-C, App. D).

* :func:`identify_operator` (App. D-a): the operator of an image within a family, from a few
  isolated point sources; :func:`dirac_comb_distance` to evaluate it.
* :func:`sparse_smooth` (App. D-b): ``min_{u1, u2 >= 0} 1/2 ||H (u1 + u2) + b - y||^2 +
  gamma1 ||u1||_1 + gamma2 ||Laplacian u2||^2`` by FISTA with adaptive restart.
* :func:`deblur`: both steps (blind, with a family) or the second alone (with an operator),
  as a ``restoration`` Dataset.
* :func:`estimate_noise` (from :mod:`pcmx.noise`) sets the default weights; :func:`checked_image`
  is the one check of an image to deblur.

Every deblurring entry point applies an operator Dataset or store path with
``boundary="reflect"`` (a mirror image beyond the field: no dark rims) unless told otherwise,
and works on the image's array library through :mod:`pcmx._backend`: a NumPy image gives
NumPy results, a CuPy image CuPy results (identification runs on the host: the bead pipeline
has no CuPy path).
* Baselines (``tikhonov``, ``tikhonov_fourier``, ``richardson_lucy_tv``, ``fista_haar``,
  ``scale_operator``, ``estimate_offset``) live in :mod:`pcmx.deblur.baselines`, metrics
  (``find_sources``, ``match_sources``, ``score_restoration``) in :mod:`pcmx.deblur.metrics`;
  they are loaded on first use.
"""

from __future__ import annotations

import importlib

from ..noise import estimate_noise
from .identify import (
    Identification,
    check_family_grid,
    checked_image,
    dirac_comb_distance,
    identify_operator,
    project_onto_family,
    rescaled_distance,
)
from .sparse_smooth import deblur, laplacian, sparse_smooth

_LAZY = {
    "tikhonov": "pcmx.deblur.baselines",
    "tikhonov_fourier": "pcmx.deblur.baselines",
    "richardson_lucy_tv": "pcmx.deblur.baselines",
    "fista_haar": "pcmx.deblur.baselines",
    "scale_operator": "pcmx.deblur.baselines",
    "estimate_offset": "pcmx.deblur.baselines",
    "find_sources": "pcmx.deblur.metrics",
    "match_sources": "pcmx.deblur.metrics",
    "score_restoration": "pcmx.deblur.metrics",
}

__all__ = [
    "Identification",
    "identify_operator",
    "dirac_comb_distance",
    "rescaled_distance",
    "project_onto_family",
    "check_family_grid",
    "checked_image",
    "sparse_smooth",
    "deblur",
    "estimate_noise",
    "laplacian",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pcmx.deblur' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
