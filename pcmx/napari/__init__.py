"""napari plugin (npe2): pcmx stores and images as layers, a widget that learns an operator.

Install with ``pip install "pcmx[napari]"``; napari finds the manifest ``napari.yaml`` through
the ``napari.manifest`` entry point. Nothing here imports napari: the reader and the widget
return layer-data tuples ``(data, kwargs, layer_type)``, so they run (and are tested) without
napari or a display.

* :func:`get_reader` / :func:`read_path`: a pcmx store (operator: PSF grid, coefficient
  maps, bead points with their diagnostics; family: PSF grid per state, spatial modes) or an
  image :func:`pcmx.read_image` reads (TIFF, ``.npy``, OME-Zarr), in micrometres;
* :func:`learn_operator_widget`: :func:`pcmx.learn_operator` on an image layer, its PSF grid
  as a new layer;
* :func:`store_layers`, :func:`psf_grid_layer`, :func:`psf_mosaic`, :func:`points_layers`,
  :func:`image_layer`: the same layers from a Dataset in a script or a notebook
  (``viewer.add_layer(napari.layers.Layer.create(*t))`` for each tuple ``t``).
"""

from ._layers import image_layer, points_layers, psf_grid_layer, psf_mosaic, store_layers
from ._reader import get_reader, read_path
from ._widget import layer_image, learn_operator_widget, sample_beads

__all__ = [
    "get_reader",
    "image_layer",
    "layer_image",
    "learn_operator_widget",
    "points_layers",
    "psf_grid_layer",
    "psf_mosaic",
    "read_path",
    "sample_beads",
    "store_layers",
]
