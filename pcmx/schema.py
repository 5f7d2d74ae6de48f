"""Validation of pcmx Datasets and stores against the JSON Schemas in ``schemas/``.

A Dataset is summarised as ``{attrs, data_vars: {name: {dims, shape, dtype, attrs}}, coords}``
and that summary is validated with :mod:`jsonschema`; the checks JSON Schema cannot express
(sizes that must agree between variables, finite PSF basis, schema version) follow in Python.
Values are checked too (:func:`validate`'s ``check_values``): NaN or infinite PSF bases, maps,
spatial bases or gammas are refused, the small ones always, the large ones by reading them.
The schema files are shipped inside the package (``pcmx/schemas``); the top-level
``schemas/`` holds identical copies for readers of the repository (a test checks they match).
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import jsonschema
import numpy as np
import xarray as xr

from .errors import SchemaError
from .provenance import SCHEMA_VERSION, jsonable

__all__ = ["KINDS", "VALUE_CHECKED", "load_schema", "summarize", "validate"]

KINDS = ("operator", "family", "simulation", "restoration")
#: The variables whose values :func:`validate` checks (finite), per kind: the small ones
#: (a few kernels, K x I x J numbers) always, the maps with ``check_values=True``.
VALUE_CHECKED = {
    "operator": {"small": ("psf_basis",), "large": ("coefficients",)},
    "family": {"small": ("psf_basis", "gamma", "gamma_normalised"), "large": ("spatial_basis",)},
}


@functools.cache
def load_schema(kind: str) -> dict:
    """The JSON Schema of a store kind (``"operator"``, ``"family"``, ...)."""
    if kind not in KINDS:
        raise SchemaError(f"unknown pcmx_type {kind!r}: expected one of {', '.join(KINDS)}")
    text = resources.files("pcmx").joinpath("schemas", f"{kind}.json").read_text()
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def summarize(ds: xr.Dataset) -> dict:
    """The JSON document a Dataset is validated as (no array data is read)."""

    def var(v: xr.DataArray) -> dict:
        return {
            "dims": list(v.dims),
            "shape": [int(s) for s in v.shape],
            "dtype": str(v.dtype),
            "attrs": jsonable(dict(v.attrs)),
        }

    return {
        "attrs": jsonable(dict(ds.attrs)),
        "data_vars": {str(k): var(v) for k, v in ds.data_vars.items()},
        "coords": {str(k): var(v) for k, v in ds.coords.items()},
    }


def _where(error: jsonschema.ValidationError) -> str:
    path = [str(p) for p in error.absolute_path]
    # summaries nest as data_vars/<name>/<field>: say "variable 'psf_basis' dims" instead
    if len(path) >= 2 and path[0] in ("data_vars", "coords"):
        what = "variable" if path[0] == "data_vars" else "coordinate"
        rest = " ".join(path[2:])
        return f"{what} {path[1]!r}" + (f" {rest}" if rest else "")
    return " ".join(path) if path else "dataset"


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        where = _where(error)
        if where == "data_vars" or where == "variable":
            return f"missing variable {missing!r}"
        if where == "coords":
            return f"missing coordinate {missing!r}"
        if where == "dataset":
            return f"missing {missing!r}"
        return f"{where}: missing {missing!r}"
    if error.validator in ("enum", "const"):
        expected = error.validator_value
        return f"{_where(error)} is {error.instance!r}, expected {expected!r}"
    path = [str(p) for p in error.absolute_path]
    if error.validator == "not" and error.validator_value == {"multipleOf": 2}:
        if len(path) >= 3 and path[2] == "shape":  # the kernel sides of a PSF basis
            what = "variable" if path[0] == "data_vars" else "coordinate"
            axis = f" (axis {path[3]} of its shape)" if len(path) == 4 else ""
            return f"{what} {path[1]!r}: kernel sides must be odd, got {error.instance}{axis}"
        return f"{_where(error)} must be odd, got {error.instance}"
    if error.validator in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        relation = {"minimum": "at least", "exclusiveMinimum": "greater than",
                    "maximum": "at most", "exclusiveMaximum": "less than"}[error.validator]
        where = _where(error)
        if len(path) == 4 and path[0] in ("data_vars", "coords") and path[2] == "shape":
            what = "variable" if path[0] == "data_vars" else "coordinate"
            where = f"{what} {path[1]!r}: the size of axis {path[3]}"
        return f"{where} must be {relation} {error.validator_value}, got {error.instance!r}"
    if error.validator == "pattern":
        return f"{_where(error)} is {error.instance!r}, not of the form {error.validator_value!r}"
    if error.validator in ("minItems", "maxItems"):
        relation = "at least" if error.validator == "minItems" else "at most"
        return (f"{_where(error)} must have {relation} {error.validator_value} items, got "
                f"{len(error.instance)}")
    return f"{_where(error)}: {error.message}"


def _check_version(version: str | None, source: str) -> None:
    if version is None:
        return
    try:
        major, minor = (int(p) for p in str(version).split("."))
    except ValueError:
        raise SchemaError(f"{source}: schema version {version!r} is not MAJOR.MINOR") from None
    ours = tuple(int(p) for p in SCHEMA_VERSION.split("."))
    if (major, minor) > ours:
        raise SchemaError(
            f"{source}: written with pcmx schema {version}, newer than the {SCHEMA_VERSION} "
            "this pcmx reads; upgrade pcmx"
        )


def validate(ds: xr.Dataset, *, kind: str | None = None, source: str = "dataset",
             require_provenance: bool = False, check_values: bool | str = True) -> xr.Dataset:
    """Validate a pcmx Dataset (in memory or opened from a store); returns it unchanged.

    The structure (kinds, dims, dtypes, units, provenance, sizes that must agree) is checked
    from metadata (:func:`summarize`); the values of the variables of :data:`VALUE_CHECKED`
    are read and must be finite.

    Parameters
    ----------
    ds : Dataset
    kind : str, optional
        The expected ``pcmx_type``; by default the Dataset's own.
    source : str
        Where the Dataset comes from (a path), named in error messages.
    require_provenance : bool
        Also require the provenance attrs (stores on disk always carry them).
    check_values : bool or "in-memory"
        The small variables (``psf_basis``, ``gamma``, ``gamma_normalised``) are always read.
        True (default): the maps too (``coefficients``, ``spatial_basis``): **this reads the
        data** of a lazily opened store, chunk by chunk (memory: one chunk), once.
        ``"in-memory"``: only maps held in memory as NumPy arrays (no I/O, no computation of
        lazy ones). False: the small variables only (what :func:`pcmx.open_store` does, to
        stay lazy; :class:`pcmx.ProductConvolution` checks the maps it reads).

    Raises
    ------
    SchemaError
        Naming ``source`` and the first violation found; for values:
        ``"SOURCE: VAR contains N NaN or infinite values (of M)"``.
    """
    if check_values not in (True, False, "in-memory"):
        raise SchemaError(f"check_values={check_values!r}: expected True, False or 'in-memory'")
    if not isinstance(ds, xr.Dataset):
        raise SchemaError(f"{source}: expected an xarray Dataset, got {type(ds).__name__}")
    actual = ds.attrs.get("pcmx_type")
    if actual is None:
        raise SchemaError(f"{source}: not a pcmx result (no attrs['pcmx_type'])")
    if kind is not None and actual != kind:
        raise SchemaError(f"{source}: is a pcmx {actual!r} store, expected {kind!r}")
    if actual not in KINDS:
        raise SchemaError(f"{source}: unknown pcmx_type {actual!r}")
    _check_version(ds.attrs.get("pcmx_schema_version"), source)
    schema = load_schema(actual)
    validator = jsonschema.Draft202012Validator(schema)
    order = {"attrs": 0, "data_vars": 1, "coords": 2}
    errors = sorted(validator.iter_errors(summarize(ds)),
                    key=lambda e: [order.get(str(p), 3) if i == 0 else str(p) for i, p in enumerate(e.absolute_path)])
    if errors:
        raise SchemaError(f"{source}: {_message(errors[0])}")
    if require_provenance:
        for key in ("pcmx_schema_version", "pcmx_version", "pcmx_created", "pcmx_inputs"):
            if key not in ds.attrs:
                raise SchemaError(f"{source}: missing provenance attribute {key!r}")
    _check_consistency(ds, actual, source)
    _check_values(ds, actual, source, check_values)
    return ds


def _check_consistency(ds: xr.Dataset, kind: str, source: str) -> None:
    if kind not in ("operator", "family"):
        return
    basis = ds["psf_basis"]
    spatial_var = "coefficients" if kind == "operator" else "spatial_basis"
    spatial = ds[spatial_var]
    kdims = basis.dims[1:]
    sdims = spatial.dims[1:]
    if len(kdims) != len(sdims):
        raise SchemaError(
            f"{source}: psf_basis is {len(kdims)}D but {spatial_var} is {len(sdims)}D"
        )
    if kind == "operator" and ds.sizes["component"] != basis.shape[0]:
        raise SchemaError(f"{source}: component sizes disagree")  # pragma: no cover (xarray checks)
    if kind == "family":
        g = ds["gamma"]
        if g.sizes["component"] != basis.sizes["component"] or g.sizes["mode"] != spatial.sizes["mode"]:
            raise SchemaError(f"{source}: gamma dims do not match psf_basis/spatial_basis")


def _count_nonfinite(var: xr.DataArray) -> int:
    """NaN and inf in a variable, read once: chunk by chunk (Dask) or slice by slice."""
    data = var.data
    if np.dtype(var.dtype).kind not in "fc":
        return 0
    if hasattr(data, "dask"):
        import dask.array as da

        return int(da.count_nonzero(~da.isfinite(data)).compute())
    if isinstance(data, np.ndarray) or var.ndim == 0:
        return int(np.count_nonzero(~np.isfinite(np.asarray(var.values))))
    # a lazily indexed backend array: one slice of the first axis at a time
    return sum(int(np.count_nonzero(~np.isfinite(np.asarray(var[i].values))))
               for i in range(var.shape[0]))


def _check_values(ds: xr.Dataset, kind: str, source: str, check_values: bool | str) -> None:
    spec = VALUE_CHECKED.get(kind)
    if spec is None:
        return
    names = list(spec["small"])
    if check_values is True:
        names += spec["large"]
    elif check_values == "in-memory":
        names += [n for n in spec["large"] if n in ds and isinstance(ds[n].data, np.ndarray)]
    for name in names:
        if name not in ds:
            continue
        bad = _count_nonfinite(ds[name])
        if bad:
            plural = "value" if bad == 1 else "values"
            raise SchemaError(f"{source}: {name} contains {bad} NaN or infinite {plural} "
                              f"(of {ds[name].size})")
