"""Images in: TIFF (2D, 3D, ImageJ/OME metadata), Zarr/OME-Zarr, NumPy, xarray -> DataArray.

The result has dims ``("y", "x")`` or ``("z", "y", "x")`` and physical coordinates in
micrometers when the pixel size is known (from the file, else from ``pixel_size``), else pixel
coordinates and a :class:`PcmxWarning` saying so.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import warnings

import numpy as np
import xarray as xr

from ..errors import InputError
from ..units import parse_length, spatial_coords, ureg

__all__ = ["PcmxWarning", "read_image", "open_image_lazy", "as_image", "natural_sort"]


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


def _read_tiff(path: str, channel=None, time=None) -> tuple[np.ndarray, tuple]:
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
            axes = str(tif.series[0].axes) if tif.series else ""
            names = _imagej_channel_names(tif)
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
    legacy = len(axes) == 3 and channel is None and time is None  # tifffile writes stacks as CYX
    if len(axes) == data.ndim and ("C" in axes or "T" in axes) and not legacy:
        return _select(data, [_TIFF_AXES.get(a, a.lower()) for a in axes], path, channel, time,
                       names), sizes
    if channel not in (None, 0) or time not in (None, 0):
        _no_axis(path, "channel" if channel not in (None, 0) else "time")
    return data, sizes


_TIFF_AXES = {"C": "c", "T": "t", "Z": "z", "Y": "y", "X": "x"}


def _imagej_channel_names(tif) -> list[str] | None:
    ij = tif.imagej_metadata if tif.is_imagej else None
    labels = (ij or {}).get("Labels")
    return [str(v) for v in labels] if isinstance(labels, (list, tuple)) else None


def _no_axis(source: str, what: str) -> None:
    option = "channel= (--channel)" if what == "channel" else "time= (--time)"
    raise InputError(f"{source}: the image has no {what} axis; {option} is for images with several")


def _pick(source: str, what: str, value, size: int, names: list[str] | None) -> int:
    """The index of ``value`` (an index or a channel name) on an axis of ``size``."""
    listed = ", ".join(f"{i}" + (f" ({names[i]!r})" if names and i < len(names) else "")
                       for i in range(size))
    option = "channel= (--channel)" if what == "channel" else "time= (--time)"
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        if names and value in names[:size]:
            return names.index(value)
        raise InputError(f"{source}: no {what} {value!r}; the {what}s are {listed} (give one "
                         f"to {option})")
    index = int(value)
    if not 0 <= index < size:
        raise InputError(f"{source}: {what} {index} is out of range; the {what}s are {listed} "
                         f"(give one to {option})")
    return index


def _select(data, axes: list[str], source: str, channel, time, names=None):
    """Reduce a multi-axis image to its z/y/x axes: the given (or the first) channel and time
    point, with a :class:`PcmxWarning` naming what was dropped when no choice was given."""
    index, dropped = [], []
    for ax, size in zip(axes, data.shape, strict=True):
        if ax in ("z", "y", "x"):
            index.append(slice(None))
            continue
        what = {"c": "channel", "t": "time"}.get(ax, f"axis {ax!r}")
        given = channel if ax == "c" else time if ax == "t" else None
        if given is not None:
            index.append(_pick(source, what, given, size, names if ax == "c" else None))
            continue
        index.append(0)
        if size > 1:
            label = f" ({names[0]!r})" if ax == "c" and names else ""
            choose = {"c": "; choose one with channel= (--channel)",
                      "t": "; choose one with time= (--time)"}.get(ax, "")
            dropped.append(f"{what} 0{label} of {size} kept, the other {size - 1} dropped{choose}")
    for ax, given in (("c", channel), ("t", time)):
        if given is not None and ax not in axes:
            _no_axis(source, "channel" if ax == "c" else "time")
    if dropped:
        warnings.warn(f"{source}: " + "; ".join(dropped), PcmxWarning, stacklevel=4)
    return data[tuple(index)]


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


def _natural_key(path: str):
    """Sort key comparing the runs of digits as numbers (``z2`` before ``z10``)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path)]


def natural_sort(paths) -> list[str]:
    """``paths`` sorted with their numbers compared as numbers (``z2`` before ``z10``): the
    order in which :func:`read_image` stacks a glob."""
    return sorted((os.fspath(p) for p in paths), key=_natural_key)


def read_image(path, *, pixel_size=None, name: str = "image", channel: int | str | None = None,
               time: int | None = None, z_step=None) -> xr.DataArray:
    """Read a bead image or z-stack.

    Parameters
    ----------
    path : str, path-like, or sequence of them
        A TIFF (``.tif``/``.tiff``, 2D or a 3D stack), a Zarr/OME-Zarr (the first multiscale
        level) or ``.npy``; a glob or a list of 2D files is stacked along ``z``: a glob in
        natural order (numbers compared as numbers: ``z2`` before ``z10``), a list as given.
    pixel_size : str, optional
        e.g. ``"65nm"``; overrides the file's lateral pixel size (a list gives one per axis).
    channel : int or str, optional
        The channel of a multi-channel OME-Zarr or ImageJ hyperstack: an index or a channel
        name. Without it the first is taken, with a :class:`PcmxWarning` naming what was
        dropped.
    time : int, optional
        The time point of a time series (likewise, the first by default, with a warning).
    z_step : str or float, optional
        The distance between the planes when a glob or list becomes a z-stack (e.g.
        ``"200nm"``; a number is in micrometres); without it the z coordinates are plane
        indices, with a :class:`PcmxWarning` for a glob.

    Raises
    ------
    InputError
        The file is missing or unreadable, the image is not 2D/3D, or ``channel``/``time``
        is out of range (the message lists the channels) or the image has no such axis.
    """
    if isinstance(path, (list, tuple)) or (isinstance(path, str) and any(c in path for c in "*?[")):
        if isinstance(path, str):
            paths = natural_sort(glob.glob(path))
        else:
            paths = [os.fspath(p) for p in path]
        if not paths:
            raise InputError(f"{path}: no files match")
        planes, sizes = [], None
        for p in paths:
            d, s = _read_any(p, channel, time)
            d = np.squeeze(np.asarray(d))
            if d.ndim != 2:
                raise InputError(f"{p}: expected a 2D plane to stack, got shape {d.shape}")
            if planes and d.shape != planes[0].shape:
                raise InputError(f"{p}: shape {d.shape} differs from {planes[0].shape} of {paths[0]}")
            planes.append(d)
            sizes = sizes or s
        sizes = tuple(sizes or (None, None))
        dz = None
        if z_step is not None:
            dz = float(z_step) if isinstance(z_step, (int, float)) else parse_length(z_step, name="z_step")
        elif len(planes) > 1 and isinstance(path, str):  # a list: the order and step are the caller's
            warnings.warn(f"{path}: {len(planes)} files stacked along z in natural order "
                          f"({os.path.basename(paths[0])} ... {os.path.basename(paths[-1])}) with an "
                          "unknown z step; give it with z_step= (--z-step), e.g. '200nm'",
                          PcmxWarning, stacklevel=2)
        return _finish(np.stack(planes), (dz, *sizes[-2:]), paths[0], pixel_size, name=name)
    if z_step is not None:
        raise InputError(f"z_step={z_step!r}: for a glob or list of 2D files stacked along z; a "
                         "single file's z step comes from its metadata or pixel_size")
    data, sizes = _read_any(os.fspath(path), channel, time)
    return _finish(data, sizes, os.fspath(path), pixel_size, name=name)


def _read_any(path: str, channel=None, time=None):
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    low = path.lower().rstrip("/")
    if low.endswith((".tif", ".tiff")):
        return _read_tiff(path, channel, time)
    if os.path.isdir(path):
        return _read_zarr(path, channel, time)
    if channel not in (None, 0) or time not in (None, 0):
        _no_axis(path, "channel" if channel not in (None, 0) else "time")
    if low.endswith(".npy"):
        return _read_npy(path), None
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


def _read_zarr(path: str, channel=None, time=None):
    import dask.array as da
    import zarr

    try:
        root = zarr.open(path, mode="r")
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: not a TIFF or Zarr image ({exc})") from None
    if channel not in (None, 0) or time not in (None, 0):
        if isinstance(root, zarr.Array) or not (dict(root.attrs).get("multiscales")
                                                or dict(root.attrs).get("ome")):
            _no_axis(path, "channel" if channel not in (None, 0) else "time")
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
        kinds = []
        for ax in axes:
            name = ax["name"] if isinstance(ax, dict) else ax
            kind = ax.get("type") if isinstance(ax, dict) else None
            kinds.append("c" if kind == "channel" or name == "c" else
                         "t" if kind == "time" or name == "t" else name)
        omero = attrs.get("omero") or attrs.get("ome", {}).get("omero") or {}
        names = [str(c.get("label", i)) for i, c in enumerate(omero.get("channels", []))] or None
        if len(kinds) != data.ndim:
            kinds = ["?"] * (data.ndim - 3) + ["z", "y", "x"][-min(3, data.ndim):]
        return _select(data, kinds, path, channel, time, names), tuple(sizes)
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


class _TiffRegions:
    """A TIFF series as an array-like read region by region (opened for each read, so it
    pickles to workers as its path)."""

    def __init__(self, path: str, series: int, shape, dtype) -> None:
        self.path, self.series = path, series
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)

    def __getitem__(self, key):
        import tifffile
        import zarr

        with tifffile.TiffFile(self.path) as tif, tif.series[self.series].aszarr() as zs:
            return np.asarray(zarr.open_array(zs, mode="r")[key])


def _tiff_lazy(path: str, channel, time, chunks):
    import dask.array as da
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, dtype, axes = tuple(series.shape), series.dtype, str(series.axes)
            sizes = _tiff_pixel_size(tif)
            samples = int(getattr(tif.pages[0], "samplesperpixel", 1) or 1)
            names = _imagej_channel_names(tif)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # noqa: BLE001  (any parser error means a broken file)
        raise InputError(f"cannot read {path}: not a valid TIFF (truncated or corrupt): "
                         f"{type(exc).__name__}: {exc}") from exc
    if samples > 1:
        raise InputError(_channels_message(path, shape, samples))
    st = os.stat(path)
    token = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    spec = [1 if a not in "ZYX" else (c if c else n) for a, n, c in
            zip(axes, shape, _axis_chunks(axes, shape, chunks), strict=True)]
    data = da.from_array(_TiffRegions(path, 0, shape, dtype), chunks=tuple(spec), lock=False,
                         name=f"tiff-{token}", asarray=True, meta=np.empty((0,) * len(shape), dtype))
    legacy = len(axes) == 3 and channel is None and time is None
    if len(axes) == data.ndim and ("C" in axes or "T" in axes) and not legacy:
        axmap = {"C": "c", "T": "t", "Z": "z", "Y": "y", "X": "x"}
        return _select(data, [axmap.get(a, a.lower()) for a in axes], path, channel, time, names), sizes
    if channel not in (None, 0) or time not in (None, 0):
        _no_axis(path, "channel" if channel not in (None, 0) else "time")
    return data, sizes


def _axis_chunks(axes: str, shape, chunks) -> list:
    """Read chunks per axis: ``chunks`` pixels in y and x (the whole axis if None), one plane in z."""
    out = []
    for a, n in zip(axes, shape, strict=True):
        if a in "YX":
            out.append(min(n, int(chunks)) if chunks else n)
        elif a == "Z":
            out.append(1)
        else:
            out.append(1)
    return out


def open_image_lazy(path, *, pixel_size=None, channel=None, time=None, chunks: int | None = None):
    """Read an image lazily, as :func:`pcmx.io.readers.read_image` reads it whole.

    Parameters
    ----------
    path : str or path-like
        A TIFF (read region by region through tifffile's Zarr interface), a Zarr / OME-Zarr
        (its Dask array; the first multiscale level) or a ``.npy`` (memory-mapped).
    pixel_size, channel, time
        As for :func:`pcmx.io.readers.read_image`.
    chunks : int, optional
        Edge in pixels of the blocks read in y and x (z: one plane per block); the whole
        plane when None. A Zarr keeps its own chunks.

    Returns
    -------
    DataArray (y, x) or (z, y, x)
        Dask-backed, with physical coordinates (units) like :func:`read_image`'s.

    Raises
    ------
    InputError
        As :func:`read_image`.
    """
    import dask.array as da

    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    low = path.lower().rstrip("/")
    if os.path.isdir(path):
        return read_image(path, pixel_size=pixel_size, channel=channel, time=time)
    if low.endswith((".tif", ".tiff")):
        data, sizes = _tiff_lazy(path, channel, time, chunks)
        return _finish(data, sizes, path, pixel_size)
    if low.endswith(".npy"):
        if channel not in (None, 0) or time not in (None, 0):
            _no_axis(path, "channel" if channel not in (None, 0) else "time")
        try:
            mm = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {path}: not a valid .npy file ({exc})") from exc
        spec = tuple(1 if (mm.ndim == 3 and i == 0) else (min(n, int(chunks)) if chunks else n)
                     for i, n in enumerate(mm.shape))
        st = os.stat(path)
        token = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
        data = da.from_array(mm, chunks=spec, name=f"npy-{token}", lock=False)
        return _finish(data, None, path, pixel_size)
    return read_image(path, pixel_size=pixel_size, channel=channel, time=time)
