"""``pcmx info STORE``: kind, dims, units, provenance and validation status of a store.

On a Zarr hierarchy that is not a pcmx store (an OME-Zarr image), it lists the pcmx stores
inside it (``--group`` describes one) or says that there is none.
"""

from __future__ import annotations

import json

from ..errors import PcmxError
from ..provenance import jsonable

NAME = "info"
HELP = "describe a pcmx store (kind, dims, units, provenance, validation)"


def add_arguments(parser) -> None:
    parser.add_argument("store", help="path or URL of a pcmx Zarr store")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--group", default=None,
                        help="describe this group of the Zarr (e.g. pcmx/operator inside an "
                             "OME-Zarr image)")


def run(args) -> int:
    import os

    from ..errors import StoreError
    from ..io.store import describe_store, find_stores, is_store, open_store

    path = args.store
    if (args.group is None and "://" not in path and os.path.isdir(path) and not is_store(path)
            and any(os.path.isfile(os.path.join(path, f)) for f in ("zarr.json", ".zgroup"))):
        try:
            found = find_stores(path)
        except Exception:  # noqa: BLE001  (unreadable hierarchy: open_store names the fault)
            found = None
        if found == []:
            raise StoreError(f"{path}: a Zarr hierarchy (an OME-Zarr image or another), not a pcmx "
                             "store, and no pcmx store is inside it")
        if found:
            if args.json:
                print(json.dumps({"kind": None, "stores": [{"group": g, "kind": k}
                                                           for g, k in found]}, indent=2))
            else:
                print(f"{path}: a Zarr hierarchy, not a pcmx store; pcmx stores inside it:")
                for g, k in found:
                    print(f"  {g or '(root)'}: {k} (pcmx info {path} --group {g})")
            return 0
    ds = open_store(path, validate_store=False, group=args.group)
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
