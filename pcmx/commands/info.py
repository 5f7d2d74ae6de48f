"""``pcmx info STORE``: kind, dims, units, provenance and validation status of a store."""

from __future__ import annotations

import json

from ..errors import PcmxError
from ..provenance import jsonable

NAME = "info"
HELP = "describe a pcmx store (kind, dims, units, provenance, validation)"


def add_arguments(parser) -> None:
    parser.add_argument("store", help="path or URL of a pcmx Zarr store")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    from ..io.store import describe_store, open_store

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
        print(describe_store(ds, status=status))
    return code
