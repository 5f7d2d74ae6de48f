"""Images in: TIFF (2D, 3D, ImageJ/OME metadata), Zarr/OME-Zarr, NumPy, xarray -> DataArray.

The result has dims ``("y", "x")`` or ``("z", "y", "x")`` and physical coordinates in
micrometers when the pixel size is known (from the file, else from ``pixel_size``), else pixel
coordinates and a :class:`PcmxWarning` saying so.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import warnings

import numpy as np
import xarray as xr

from ..errors import InputError
from ..units import parse_length, spatial_coords, ureg

__all__ = ["PcmxWarning", "read_image", "as_image"]


class PcmxWarning(UserWarning):
    """Something pcmx had to guess (a missing pixel size, beads excluded...)."""


_UNIT_ALIASES = {
    "um": "micrometer", "µm": "micrometer", "μm": "micrometer", "micron": "micrometer",
    "microns": "micrometer", "micrometer": "micrometer", "nm": "nanometer", "mm": "millimeter",
}


def _unit_factor(unit: str | None) -> float | None:
    """Micrometers per ``unit`` (ImageJ writes '\\u00B5m' escaped), None if not a length."""
    if not unit:
        return None
    unit = unit.strip()
    if "\\u" in unit:
        unit = unit.encode("ascii", "backslashreplace").decode("unicode_escape")
    unit = _UNIT_ALIASES.get(unit, unit)
    try:
        return float(ureg.Quantity(1.0, unit).to("micrometer").magnitude)
    except Exception:  # noqa: BLE001  (pixel, inch-less ImageJ files...)
        return None


def _tiff_pixel_size(tif) -> tuple[float | None, float | None, float | None]:
    """(z, y, x) pixel size in micrometers from OME or ImageJ metadata; None where absent."""
    if tif.is_ome and tif.ome_metadata:
        def attr(name):
            m = re.search(rf'{name}="([^"]+)"', tif.ome_metadata)
            return m.group(1) if m else None

        out = []
        for ax in ("Z", "Y", "X"):
            value = attr(f"PhysicalSize{ax}")
            factor = _unit_factor(attr(f"PhysicalSize{ax}Unit") or "µm")
            out.append(float(value) * factor if value and factor else None)
        return tuple(out)
    page = tif.pages[0]
    ij = tif.imagej_metadata if tif.is_imagej else None
    if ij is not None:
        factor = _unit_factor(ij.get("unit"))
        if factor is None:
            return (None, None, None)

        def res(tag):
            t = page.tags.get(tag)
            if t is None:
                return None
            num, den = t.value
            return factor * den / num if num else None

        dz = ij.get("spacing")
        return (float(dz) * factor if dz else None, res("YResolution"), res("XResolution"))
    # Plain TIFF: trust resolution only in centimeters (micro-manager and others write it).
    unit = page.tags.get("ResolutionUnit")
    if unit is not None and int(unit.value) == 3:
        num, den = page.tags["XResolution"].value
        numy, deny = page.tags["YResolution"].value
        return (None, 1e4 * deny / numy, 1e4 * den / num)
    return (None, None, None)


class _TiffLog(logging.Handler):
    """Collects what tifffile logs while reading (it logs, rather than raises, a broken IFD chain)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _check_tiff_complete(tif, path: str, log: _TiffLog) -> None:
    """Raise on a TIFF that tifffile read only partly (a truncated stack loses its last pages
    with only a log message; a truncated last strip is read past the end of the file)."""
    broken = [m for m in log.messages if "invalid page offset" in m]
    if broken:
        raise ValueError(broken[0])
    size = os.path.getsize(path)
    for page in tif.pages:
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=True) if c]
        if ends and max(ends) > size:
            raise ValueError(f"image data ends at byte {max(ends)} but the file has {size} bytes")


def _read_tiff(path: str) -> tuple[np.ndarray, tuple]:
    """Every failure is an :class:`InputError` naming the file, chained from the parser's error
    (tifffile raises IndexError, struct.error, zlib.error... on corrupt or truncated files)."""
    import tifffile

    log = _TiffLog()
    tiff_logger = logging.getLogger("tifffile")
    tiff_logger.addHandler(log)
    try:
        with tifffile.TiffFile(path) as tif:
            data = tif.asarray()
            _check_tiff_complete(tif, path, log)
            sizes = _tiff_pixel_size(tif)
            samples = int(getattr(tif.pages[0], "samplesperpixel", 1) or 1)
    except MemoryError as exc:
        raise InputError(
            f"cannot read {path}: not enough memory for the image its header describes "
            f"(corrupt, or too large to load at once): {exc}"
        ) from exc
    except OSError as exc:  # permissions, a directory named *.tif, I/O errors
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # noqa: BLE001  (any parser error means a broken file)
        cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise InputError(f"cannot read {path}: not a valid TIFF (truncated or corrupt): {cause}") from exc
    finally:
        tiff_logger.removeHandler(log)
    if samples > 1:  # RGB(A) or other interleaved channels: the last axis
        raise InputError(_channels_message(path, data.shape, samples))
    return data, sizes


def _channels_message(source: str, shape: tuple, channels: int) -> str:
    kind = {3: "an RGB image", 4: "an RGBA image"}.get(channels, f"an image with {channels} channels")
    return (f"{source}: {kind} (shape {tuple(shape)}: a channel axis of size {channels}); pcmx "
            "takes one channel: split the channels and give one (Fiji: Image > Color > Split "
            "Channels), or in Python pass one channel, e.g. image[..., 0]")


def _finish(data, sizes, source: str, pixel_size, *, name="image") -> xr.DataArray:
    data = np.squeeze(data) if isinstance(data, np.ndarray) else data
    if data.ndim not in (2, 3):
        raise InputError(
            f"{source}: image has {data.ndim} dimensions {tuple(data.shape)}; pcmx takes 2D (y, x) "
            "or 3D (z, y, x) images (split channels/time points first)"
        )
    if data.ndim == 3 and data.shape[-1] in (3, 4) and min(data.shape[:2]) >= 16:
        raise InputError(_channels_message(source, data.shape, data.shape[-1]))
    if min(data.shape) < 2:
        raise InputError(f"{source}: image of shape {tuple(data.shape)} is too small")
    if data.dtype.kind not in "uif" or data.dtype.kind == "c":
        raise InputError(f"{source}: unsupported pixel type {data.dtype} (pcmx takes integer or "
                         "floating-point pixels)")
    sizes = tuple(sizes)[-data.ndim:] if sizes else (None,) * data.ndim
    if pixel_size is not None:
        if isinstance(pixel_size, (list, tuple)):
            given = [parse_length(p) for p in pixel_size]
            if len(given) != data.ndim:
                raise InputError(f"pixel_size has {len(given)} values for a {data.ndim}D image")
        else:
            p = parse_length(pixel_size)
            given = [p] * data.ndim
            if data.ndim == 3 and sizes[0] is not None:
                given[0] = sizes[0]  # a single lateral size does not replace the file's z step
        sizes = tuple(given)
    if any(s is None for s in sizes[-2:]):
        warnings.warn(
            f"{source}: no pixel size in the file's metadata and none given (pixel_size / "
            "--pixel-size); coordinates are in pixels",
            PcmxWarning,
            stacklevel=3,
        )
        sizes = (None,) * data.ndim
    dims = ("y", "x") if data.ndim == 2 else ("z", "y", "x")
    coords = spatial_coords(data.shape, sizes, dims)
    return xr.DataArray(data, dims=dims, coords=coords, name=name,
                        attrs={"source": os.path.basename(str(source))})


def read_image(path, *, pixel_size=None, name: str = "image") -> xr.DataArray:
    """Read a bead image or z-stack.

    Parameters
    ----------
    path : str, path-like, or sequence of them
        A TIFF (``.tif``/``.tiff``, 2D or a 3D stack), a Zarr/OME-Zarr (the first multiscale
        level) or ``.npy``; a glob or a list of 2D files is stacked along ``z`` in order.
    pixel_size : str, optional
        e.g. ``"65nm"``; overrides the file's lateral pixel size (a list gives one per axis).

    Raises
    ------
    InputError
        The file is missing or unreadable, or the image is not 2D/3D.
    """
    if isinstance(path, (list, tuple)) or (isinstance(path, str) and any(c in path for c in "*?[")):
        paths = sorted(glob.glob(path)) if isinstance(path, str) else [os.fspath(p) for p in path]
        if not paths:
            raise InputError(f"{path}: no files match")
        planes, sizes = [], None
        for p in paths:
            d, s = _read_any(p)
            if d.ndim != 2:
                raise InputError(f"{p}: expected a 2D plane to stack, got shape {d.shape}")
            if planes and d.shape != planes[0].shape:
                raise InputError(f"{p}: shape {d.shape} differs from {planes[0].shape} of {paths[0]}")
            planes.append(d)
            sizes = sizes or s
        return _finish(np.stack(planes), (None, *sizes[-2:]), paths[0], pixel_size, name=name)
    data, sizes = _read_any(os.fspath(path))
    return _finish(data, sizes, os.fspath(path), pixel_size, name=name)


def _read_any(path: str):
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    low = path.lower().rstrip("/")
    if low.endswith((".tif", ".tiff")):
        return _read_tiff(path)
    if low.endswith(".npy"):
        return _read_npy(path), None
    if os.path.isdir(path):
        return _read_zarr(path)
    raise InputError(f"{path}: unknown image format (TIFF, Zarr/OME-Zarr or .npy expected)")


def _read_npy(path: str) -> np.ndarray:
    """A ``.npy`` of numbers; never unpickles (object arrays are refused, naming the file)."""
    try:
        return np.load(path, allow_pickle=False)
    except OSError as exc:  # permissions, a directory named *.npy, I/O errors
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise InputError(f"{path}: a NumPy array of Python objects (dtype object), not an "
                             "image of numbers; pcmx loads no pickled data: save the pixels as "
                             "a numeric array (e.g. np.save(path, image.astype(np.float32)))") from exc
        raise InputError(f"cannot read {path}: not a valid .npy file (truncated or corrupt): {exc}") from exc
    except Exception as exc:  # noqa: BLE001  (EOFError, UnpicklingError... on broken files)
        cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise InputError(f"cannot read {path}: not a valid .npy file (truncated or corrupt): {cause}") from exc


def _read_zarr(path: str):
    import dask.array as da
    import zarr

    try:
        root = zarr.open(path, mode="r")
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: not a TIFF or Zarr image ({exc})") from None
    if isinstance(root, zarr.Array):
        return da.from_zarr(root), None
    attrs = dict(root.attrs)
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if ms:
        level = ms[0]["datasets"][0]
        arr = root[level["path"]]
        axes = ms[0].get("axes", [])
        scale = None
        for t in level.get("coordinateTransformations", []):
            if t.get("type") == "scale":
                scale = t["scale"]
        sizes = []
        for i, ax in enumerate(axes):
            name = ax["name"] if isinstance(ax, dict) else ax
            if name in ("z", "y", "x"):
                f = _unit_factor(ax.get("unit") if isinstance(ax, dict) else None) or 1.0
                sizes.append(scale[i] * f if scale else None)
        data = da.from_zarr(arr)
        keep = [i for i, ax in enumerate(axes) if (ax["name"] if isinstance(ax, dict) else ax) in ("z", "y", "x")]
        index = tuple(slice(None) if i in keep else 0 for i in range(data.ndim))
        return data[index], tuple(sizes)
    if "image" in root:
        return da.from_zarr(root["image"]), None
    raise InputError(f"{path}: Zarr group without an OME 'multiscales' image or an 'image' array")


def as_image(image, *, pixel_size=None, name: str = "image") -> xr.DataArray:
    """Any accepted image (path, ndarray, dask array, DataArray) -> labelled DataArray."""
    if isinstance(image, (str, os.PathLike, list, tuple)):
        return read_image(image, pixel_size=pixel_size, name=name)
    if isinstance(image, xr.DataArray):
        dims = image.dims
        if dims not in (("y", "x"), ("z", "y", "x")):
            if image.ndim in (2, 3):
                image = image.rename(dict(zip(dims, ("y", "x") if image.ndim == 2 else ("z", "y", "x"), strict=True)))
            else:
                raise InputError(f"image has dims {dims}; expected ('y', 'x') or ('z', 'y', 'x')")
        if pixel_size is not None:
            sizes = [parse_length(pixel_size)] * image.ndim
            image = image.assign_coords(spatial_coords(image.shape, sizes, image.dims))
        return image
    if hasattr(image, "ndim") and hasattr(image, "shape"):
        return _finish(image, None, "image", pixel_size, name=name) if pixel_size else _finish_quiet(image, name)
    raise InputError(f"cannot use an image of type {type(image).__name__}")


def _finish_quiet(data, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PcmxWarning)
        return _finish(data, None, "array", None, name=name)
