"""``pcmx info STORE``: kind, dims, units, provenance and validation status of a store."""

from __future__ import annotations

import json

import xarray as xr

from ..errors import PcmxError
from ..provenance import jsonable
from ..units import format_length, pixel_size

NAME = "info"
HELP = "describe a pcmx store (kind, dims, units, provenance, validation)"


def add_arguments(parser) -> None:
    parser.add_argument("store", help="path or URL of a pcmx Zarr store")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def describe(ds: xr.Dataset, *, status: str = "valid") -> str:
    """A short human-readable summary of a pcmx Dataset."""
    lines = [f"kind: {ds.attrs.get('pcmx_type', '?')}", f"validation: {status}"]
    lines.append("dims: " + ", ".join(f"{d}={n}" for d, n in ds.sizes.items()))
    for d in ("z", "y", "x"):
        if d in ds.coords:
            lines.append(f"pixel size {d}: {format_length(pixel_size(ds, d))}")
    lines.append("variables:")
    for name, v in ds.data_vars.items():
        lines.append(f"  {name} {tuple(v.dims)} {v.dtype}")
    for key in ("pcmx_version", "pcmx_schema_version", "pcmx_created"):
        if key in ds.attrs:
            lines.append(f"{key[5:]}: {ds.attrs[key]}")
    for rec in ds.attrs.get("pcmx_inputs", []) or []:
        sha = rec.get("sha256") or "-"
        lines.append(f"input: {rec.get('name')} sha256={sha[:16]}")
    params = ds.attrs.get("pcmx_parameters")
    if params:
        lines.append("parameters: " + json.dumps(jsonable(params), sort_keys=True))
    return "\n".join(lines)


def run(args) -> int:
    from ..io.store import open_store

    ds = open_store(args.store, validate_store=False)
    status, code = "valid", 0
    try:
        from ..schema import validate

        validate(ds, source=args.store, require_provenance=True)
    except PcmxError as exc:
        status, code = f"INVALID: {exc}", 2
    if args.json:
        out = {"kind": ds.attrs.get("pcmx_type"), "valid": code == 0, "status": status,
               "dims": dict(ds.sizes), "variables": {k: list(v.dims) for k, v in ds.data_vars.items()},
               "attrs": jsonable(dict(ds.attrs))}
        print(json.dumps(out, indent=2))
    else:
        print(describe(ds, status=status))
    return code
