"""pcmx results as napari layer-data tuples ``(data, kwargs, layer_type)``; napari not imported.

World coordinates are the stores' coordinates: micrometres in a calibrated store (pixels
where the store has no pixel size), so an image read by pcmx, the coefficient maps and the
bead points of the operator learned from it overlay in one napari viewer.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import InputError
from ..model import psf_at
from ..units import LENGTH_UNITS, PIXEL_ALIASES, PIXEL_UNITS, to_pixels, ureg

__all__ = ["image_layer", "psf_mosaic", "psf_grid_layer", "points_layers", "store_layers"]

SPATIAL = ("z", "y", "x")
KERNEL = ("kz", "ky", "kx")
#: Pixels of zeros between the tiles of a PSF grid.
GAP = 1


def _axis(obj: xr.DataArray | xr.Dataset, dim: str) -> tuple[float, float, str]:
    """``(scale, translate, units)`` of one axis: its coordinate's step and first value,
    in micrometres (``units="micrometer"``) or in pixels (``"pixel"``)."""
    if dim not in obj.coords:
        return 1.0, 0.0, PIXEL_UNITS
    c = obj.coords[dim]
    values = np.asarray(c.values, dtype=np.float64)
    units = str(c.attrs.get("units", PIXEL_UNITS))
    factor, units = (1.0, PIXEL_UNITS) if units in PIXEL_ALIASES else \
        (float(ureg.Quantity(1.0, units).to(LENGTH_UNITS).magnitude), LENGTH_UNITS)
    step = float(values[1] - values[0]) if values.size > 1 else \
        float(c.attrs.get("pixel_size", 1.0 if units == PIXEL_UNITS else factor))
    return step * factor, float(values[0]) * factor if values.size else 0.0, units


def _transform(obj, dims) -> dict:
    axes = [_axis(obj, d) for d in dims]
    return {"scale": tuple(a[0] for a in axes), "translate": tuple(a[1] for a in axes),
            "units": tuple(a[2] for a in axes)}


def _contrast(data) -> tuple[float, float]:
    a = np.asarray(data, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return 0.0, 1.0
    lo, hi = float(a.min()), float(a.max())
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)


def image_layer(da: xr.DataArray, *, name: str | None = None, metadata: dict | None = None,
                **kwargs) -> tuple:
    """An image layer of a DataArray with spatial dims last; leading dims get scale 1.

    ``scale``/``translate`` come from the coordinates (micrometres, or pixels where the
    image has no pixel size); dask-backed data stays lazy.
    """
    t = _transform(da, da.dims)
    meta = {"units": t["units"], "dims": tuple(da.dims), **(metadata or {})}
    if da.attrs.get("source"):
        meta["source"] = da.attrs["source"]
    kw = {"name": name or da.name or "image", "scale": t["scale"], "translate": t["translate"],
          "metadata": meta, **kwargs}
    return da.data, kw, "image"


def _grid_centres(n_pixels: int, n: int) -> np.ndarray:
    """Pixel indices of the centres of ``n`` equal cells over ``n_pixels`` pixels."""
    return (np.arange(n) + 0.5) * n_pixels / n - 0.5


def psf_mosaic(ds: xr.Dataset, n: int = 5, *, state=None) -> xr.DataArray:
    """The PSFs on an ``n x n`` grid over the field, tiled into one array (``psf_grid``).

    Tile ``(i, j)`` holds :func:`pcmx.model.psf_at` at the centre of cell ``(i, j)`` of an
    ``n x n`` partition of the field (at the middle plane of a 3D field), on the PSF's own
    pixel grid; tiles are separated by :data:`GAP` pixels of zeros. ``n`` is reduced where
    the field has fewer pixels.

    Parameters
    ----------
    ds : Dataset
        An operator, or a family with ``state`` (a label or index, see
        :func:`pcmx.model.state_index`).
    n : int
        Tiles per side (>= 1).

    Returns
    -------
    DataArray ``psf_grid``, dims ``([kz,] ky, kx)`` of sizes ``n * (k + GAP) - GAP`` along y and
    x, with attrs ``positions`` (the ``n x n`` tile centres as ``[y, x]`` pixel indices) and
    ``n``.

    Raises
    ------
    InputError
        If ``n < 1``, ``ds`` is neither an operator nor a family, or the state is unknown.
    """
    if int(n) < 1:
        raise InputError(f"n={n!r}: a PSF grid needs at least one tile per side")
    var = "spatial_basis" if ds.attrs.get("pcmx_type") == "family" else "coefficients"
    if var not in ds:
        raise InputError(f"psf_mosaic needs an operator or a family, got pcmx_type="
                         f"{ds.attrs.get('pcmx_type')!r}")
    field = [d for d in ds[var].dims if d in SPATIAL]
    ny, nx = (min(int(n), ds.sizes[d]) for d in ("y", "x"))
    ys, xs = _grid_centres(ds.sizes["y"], ny), _grid_centres(ds.sizes["x"], nx)
    extra = {"z": (ds.sizes["z"] - 1) / 2} if "z" in field else {}
    rows, positions = [], []
    for y in ys:
        row = []
        for x in xs:
            psf = psf_at(ds, state=state, index=True, y=float(y), x=float(x), **extra)
            row.append(np.asarray(psf.values, dtype=np.float32))
            positions.append([float(y), float(x)])
        rows.append(row)
    kdims = psf.dims
    ky, kx = psf.sizes["ky"], psf.sizes["kx"]
    lead = psf.shape[:-2]
    out = np.zeros((*lead, ny * (ky + GAP) - GAP, nx * (kx + GAP) - GAP), dtype=np.float32)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            out[..., i * (ky + GAP): i * (ky + GAP) + ky, j * (kx + GAP): j * (kx + GAP) + kx] = tile
    coords = {d: psf.coords[d] for d in kdims[:-2] if d in psf.coords}
    return xr.DataArray(out, dims=kdims, coords=coords, name="psf_grid",
                        attrs={"positions": positions, "n": [ny, nx]})


def psf_grid_layer(ds: xr.Dataset, n: int = 5, *, name: str = "psf grid") -> tuple:
    """An image layer of the PSF grid of an operator, or of every state of a family (a
    leading ``state`` axis).

    The tiles keep the PSF's pixel size (``scale`` from ``ky``/``kx``: micrometres in a
    calibrated store) so distances measured on them are true; the grid is placed beside the
    field (its left edge one tile right of the field's right edge, its top at the field's top;
    in 3D its middle plane at the field's middle plane). ``metadata`` gives the tile centres
    in pixels (``positions``) and in world coordinates (``positions_world``), and for a family
    the state labels.
    """
    kind = ds.attrs.get("pcmx_type")
    ref = ds["spatial_basis" if kind == "family" else "coefficients"]
    field = [d for d in ref.dims if d in SPATIAL]
    kdims = [k for k in KERNEL if k in ds["psf_basis"].dims]
    meta = {"pcmx_type": kind}
    if kind == "family":
        labels = [v.item() if hasattr(v, "item") else v for v in ds["state"].values] \
            if "state" in ds.coords else list(range(ds.sizes["state"]))
        grids = [psf_mosaic(ds, n, state=label) for label in labels]
        grid = xr.concat(grids, dim="state")
        meta["states"] = labels
        name = f"{name} ({len(labels)} states)"
    else:
        grid = psf_mosaic(ds, n)
    kt = _transform(ds["psf_basis"], kdims)
    ft = _transform(ref, field)
    ky, kx = ds.sizes["ky"], ds.sizes["kx"]
    top = ft["translate"][-2]
    left = ft["translate"][-1] + ds.sizes["x"] * ft["scale"][-1] + (kx + GAP) * kt["scale"][-1]
    scale, translate = list(kt["scale"]), [*([0.0] * (len(kdims) - 2)), top, left]
    if "kz" in kdims:  # middle kernel plane on the middle field plane
        zc = ft["translate"][0] + (ds.sizes["z"] - 1) / 2 * ft["scale"][0]
        translate[0] = zc - (ds.sizes["kz"] // 2) * kt["scale"][0]
    positions = np.asarray(grid.attrs["positions"], dtype=np.float64)
    meta.update(positions=positions.tolist(), units=kt["units"], n=grid.attrs["n"],
                positions_world=(positions * np.asarray(ft["scale"][-2:]) +
                                 np.asarray(ft["translate"][-2:])).tolist(),
                tile_shape=[ky, kx], gap=GAP)
    if kind == "family":
        scale, translate = [1.0, *scale], [0.0, *translate]
    kw = {"name": name, "scale": tuple(scale), "translate": tuple(translate), "metadata": meta,
          "colormap": "magma", "contrast_limits": _contrast(grid.values)}
    return grid.values, kw, "image"


def _position_vars(ds: xr.Dataset, prefix: str, field: list[str]) -> list[str] | None:
    names = [f"{prefix}_{d}" for d in field]
    return names if all(v in ds.data_vars for v in names) else None


def _features(ds: xr.Dataset, dim: str, skip: set[str]) -> dict[str, np.ndarray]:
    """Every variable along ``dim`` alone (or ``(dim, component)``, one column a component,
    1-based like the paper's beta_i) as point features; CF flags become their meanings."""
    out = {}
    for name, v in ds.data_vars.items():
        if name in skip or not v.dims or v.dims[0] != dim:
            continue
        values = np.asarray(v.values)
        if v.dims == (dim,):
            meanings = v.attrs.get("flag_meanings")
            flags = v.attrs.get("flag_values")
            if meanings is not None and flags is not None:
                table = dict(zip(np.asarray(flags).tolist(), str(meanings).split(), strict=False))
                values = np.array([table.get(int(c), str(int(c))) for c in values], dtype=object)
            out[name] = values
        elif v.ndim == 2 and v.dims[1] == "component":
            short = "beta" if name == "observed_coefficients" else name
            for i in range(v.shape[1]):
                out[f"{short}_{i + 1}"] = values[:, i]
    return out


def points_layers(ds: xr.Dataset, ref: xr.DataArray | None = None) -> list[tuple]:
    """Points layers of the positions a store holds: kept beads (``bead_y``/``bead_x``),
    every detection (``detection_*``, with ``detection_status`` as a feature) and held-out
    beads (``cv_bead_*``, with their errors), in world coordinates.

    Positions in pixels (``units="pixel"``) or in a length unit are both converted to the
    grid of ``ref`` (default: the store's coefficient maps or image), then to its world
    coordinates; variables along the same dim become ``features``.
    """
    if ref is None:
        ref = next((ds[v] for v in ("coefficients", "spatial_basis", "image") if v in ds), None)
    if ref is None:
        return []
    field = [d for d in ref.dims if d in SPATIAL]
    t = _transform(ref, field)
    scale, translate = np.asarray(t["scale"]), np.asarray(t["translate"])
    size = float(np.mean(scale[-2:])) * (ds.sizes["ky"] if "ky" in ds.sizes else 9) / 2
    out = []
    specs = (("bead", "beads", "yellow"), ("detection", "detections", "detection_status"),
             ("cv_bead", "held-out beads", "cyan"))
    for prefix, name, colour in specs:
        names = _position_vars(ds, prefix, field)
        if names is None:
            continue
        dim = ds[names[0]].dims[0] if ds[names[0]].dims else None
        # each variable read in its units: micrometres (stores since issue 14) or pixels (older
        # stores, units "pixel"; the oldest had no units attr: pixels too)
        pos = {d: ds[v] if "units" in ds[v].attrs or hasattr(ds[v].data, "units")
               else ds[v].assign_attrs(units="pixel") for d, v in zip(field, names, strict=True)}
        pixels = to_pixels(ref, extrapolate=True, **pos)
        world = np.stack([np.atleast_1d(pixels[d]) for d in field], axis=-1) * scale + translate
        features = _features(ds, dim, set(names)) if dim else {}
        if colour in features:
            border = colour
        else:
            border = colour if colour != "detection_status" else "white"
        kw = {"name": name, "features": features, "size": size, "face_color": "transparent",
              "border_color": border, "metadata": {"units": t["units"], "dims": tuple(field),
                                                   "source_variables": names}}
        out.append((world, kw, "points"))
    return out


def _map_layers(da: xr.DataArray, along: str, short: str, *, visible_first: bool = True) -> list[tuple]:
    out = []
    for i in range(da.sizes[along]):
        m = da.isel({along: i})
        label = da[along].values[i].item() if along in da.coords else i
        _, kw, kind = image_layer(m, name=f"{short}_{i + 1}", colormap="viridis",
                                  contrast_limits=_contrast(m.values),
                                  visible=bool(visible_first and i == 0),
                                  metadata={along: label})
        out.append((m.values, kw, kind))
    return out


def store_layers(ds: xr.Dataset, *, n: int = 5, source: str | None = None) -> list[tuple]:
    """Every layer of a pcmx result, as napari layer-data tuples.

    * operator: the PSF grid (:func:`psf_grid_layer`), one image layer a coefficient map
      (``alpha_1``, ``alpha_2``, ... each on its own contrast limits, the first visible) and
      the points of :func:`points_layers`;
    * family: the PSF grid of every state (a leading ``state`` axis) and the spatial modes
      (``a_1``, ``a_2``, ...);
    * other kinds (simulation, restoration): their images (variables over ``[z,] y, x``) and
      points.

    Each layer's ``metadata`` carries ``pcmx_type`` and ``source`` (the store's path).
    """
    kind = ds.attrs.get("pcmx_type")
    if kind == "operator":
        layers = [psf_grid_layer(ds, n), *_map_layers(ds["coefficients"], "component", "alpha")]
    elif kind == "family":
        layers = [psf_grid_layer(ds, n), *_map_layers(ds["spatial_basis"], "mode", "a")]
    else:
        layers = [image_layer(v, name=str(name), contrast_limits=_contrast(v.values))
                  for name, v in ds.data_vars.items()
                  if v.dims and v.dims[-2:] == ("y", "x") and set(v.dims) <= set(SPATIAL)]
    layers += points_layers(ds)
    for _, kw, _ in layers:
        kw["metadata"] = {**kw.get("metadata", {}), "pcmx_type": kind,
                          **({"source": source} if source else {})}
    return layers
