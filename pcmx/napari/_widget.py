"""The napari widget contribution: learn an operator from an image layer, show its PSF grid.

A plain function with typed arguments; napari builds the widget with magicgui
(``autogenerate`` in ``napari.yaml``). The annotations are strings so that importing this
module never imports napari.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from ..errors import InputError
from ..units import LENGTH_UNITS, PIXEL_ALIASES, parse_length, spatial_coords, ureg
from ._layers import image_layer, points_layers, psf_grid_layer

if TYPE_CHECKING:  # magicgui resolves the string annotations when napari builds the widget
    import napari

__all__ = ["learn_operator_widget", "layer_image", "sample_beads"]


def _layer_steps(layer, ndim: int) -> list[float | None]:
    """Pixel sizes (micrometres) per axis from a layer's ``scale`` (and ``units`` where napari
    has them and they are lengths); a scale of exactly 1 is taken as uncalibrated (pixels),
    any other as micrometres (the world units of the layers pcmx's reader makes)."""
    scale = getattr(layer, "scale", None)
    scale = [1.0] * ndim if scale is None else [float(s) for s in scale][-ndim:]
    units = getattr(layer, "units", None)
    units = [None] * ndim if units is None else [str(u) for u in units][-ndim:]
    steps = []
    for s, u in zip(scale, units, strict=True):
        if u is not None and u not in PIXEL_ALIASES:
            steps.append(float(ureg.Quantity(s, u).to(LENGTH_UNITS).magnitude))
        else:  # napari's default units ("pixel"): a scale of 1 is no calibration, else micrometres
            steps.append(None if s == 1.0 else s)
    return steps


def layer_image(layer, pixel_size: str = "") -> xr.DataArray:
    """The pixels of a napari image layer (anything with ``.data`` and ``.scale``) as pcmx's
    labelled image.

    ``pixel_size`` (e.g. ``"65nm"``) overrides the lateral pixel size; else the layer's scale
    is read as micrometres per pixel (napari's world units for layers pcmx opened), and a
    scale of 1 as no calibration. A multiscale layer gives its finest level.

    Raises
    ------
    InputError
        If the layer is not 2D or 3D (the message gives its shape), or ``pixel_size`` is not
        a length.
    """
    data = layer.data
    if getattr(layer, "multiscale", False) or isinstance(data, (list, tuple)):
        data = data[0]
    ndim = len(data.shape)
    if ndim not in (2, 3):
        raise InputError(f"layer {getattr(layer, 'name', '')!r} has shape {tuple(data.shape)}: "
                         "pcmx learns from a 2D image or a 3D z-stack")
    steps = _layer_steps(layer, ndim)
    if pixel_size:
        lateral = parse_length(pixel_size)
        steps[-2:] = [lateral, lateral]
    dims = ("y", "x") if ndim == 2 else ("z", "y", "x")
    name = str(getattr(layer, "name", "") or "image")
    return xr.DataArray(data, dims=dims, coords=spatial_coords(data.shape, steps, dims),
                        name="image", attrs={"source": name})


def learn_operator_widget(image: napari.layers.Image, pixel_size: str = "",
                          n_components: int = 0, grid: int = 5) -> napari.types.LayerDataTuple:
    """Learn an operator from an image layer of beads; return its PSF grid as a layer.

    Parameters
    ----------
    image : napari.layers.Image
        The bead image (any object with ``.data`` and ``.scale``; 2D, or a 3D z-stack).
    pixel_size : str
        e.g. ``"65nm"``; empty: from the layer's scale (micrometres), or pixels when the
        scale is 1.
    n_components : int
        The number of PSF basis elements; 0 chooses it (:func:`pcmx.learn_operator`).
    grid : int
        PSFs per side of the grid.

    Returns
    -------
    tuple
        ``(data, kwargs, "image")``: the PSF grid (:func:`pcmx.napari.psf_grid_layer`), placed
        beside the image in the layer's world coordinates; ``kwargs["metadata"]["pcmx"]`` holds
        the learned operator Dataset (save it with ``pcmx.save_store``).
    """
    from ..learn import learn_operator

    if image is None:
        raise InputError("choose an image layer of beads")
    img = layer_image(image, pixel_size)
    ds = learn_operator(img, n_components=int(n_components) or None)
    data, kw, kind = psf_grid_layer(ds, grid, name=f"{img.attrs['source']} psf grid")
    # the layer's own offset: pcmx's coordinates start at 0, the layer may not
    translate = getattr(image, "translate", None)
    if translate is not None and len(translate):
        shift = np.zeros(len(kw["translate"]))
        shift[-2:] = [float(t) for t in list(translate)[-2:]]
        kw["translate"] = tuple(float(t) for t in np.asarray(kw["translate"]) + shift)
    kw["metadata"]["pcmx"] = ds
    return data, kw, kind


def sample_beads() -> list[tuple]:
    """napari sample data: a simulated 256 x 256 bead image (65 nm pixels) and its true beads."""
    from ..simulate import simulate_beads

    sim = simulate_beads((256, 256), 60, seed=0)
    return [image_layer(sim["image"], name="simulated beads"),
            *points_layers(sim[["bead_y", "bead_x", "amplitude"]], ref=sim["image"])]
