"""The notebook interface: ``ds.pcmx`` on stores and ``da.pcmx`` on images.

Stateless, thin delegation to the modules that own each step (a new accessor object per
derived object, no cached state).
"""

from __future__ import annotations

import importlib

import xarray as xr

__all__ = ["PcmxDatasetAccessor", "PcmxDataArrayAccessor", "PcmxPlotNamespace"]


def _mod(name: str):
    return importlib.import_module(f"pcmx.{name}")


@xr.register_dataset_accessor("pcmx")
class PcmxDatasetAccessor:
    """``ds.pcmx``: validate, query, save and apply pcmx results."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    @property
    def kind(self) -> str | None:
        """The ``pcmx_type`` (``"operator"``, ``"family"``, ...)."""
        return self._ds.attrs.get("pcmx_type")

    def validate(self) -> xr.Dataset:
        """Validate against the schema of its kind (raises SchemaError); returns the Dataset."""
        return _mod("schema").validate(self._ds)

    def psf_at(self, *, state=None, index: bool = False, extrapolate: bool = False,
               **position) -> xr.DataArray:
        """The PSF at ``y=..., x=...`` (:func:`pcmx.model.psf_at`).

        Positions are numbers in the store's units (micrometers), pint Quantities or strings
        (``"27um"``, ``"120 px"``); ``index=True`` for pixel indices. Outside the field:
        an :class:`~pcmx.errors.InputError` unless ``extrapolate=True`` (nearest edge).
        """
        return _mod("model").psf_at(self._ds, state=state, index=index,
                                    extrapolate=extrapolate, **position)

    def coefficients(self, state=None, *, gamma=None) -> xr.DataArray:
        """Coefficient maps: the operator's own, or a family state's (or any gamma)."""
        if self.kind == "family":
            return _mod("model").family_coefficients(self._ds, state, gamma=gamma)
        return self._ds["coefficients"]

    def operator(self, state=None, *, gamma=None) -> xr.Dataset:
        """The operator Dataset of one family state (or of any gamma in its cone)."""
        return _mod("model").family_operator(self._ds, state, gamma=gamma)

    def save(self, path, *, overwrite: bool = False, group: str | None = None) -> str:
        """Validate and write atomically as a Zarr v3 store (:func:`pcmx.io.store.save_store`),
        or as ``group`` inside a Zarr hierarchy (e.g. ``"pcmx/operator"`` of an OME-Zarr)."""
        return _mod("io.store").save_store(self._ds, path, overwrite=overwrite, group=group)

    def blur(self, image, **kwargs):
        """Apply this operator to an image (product-convolution, paper Prop. 1)."""
        return _mod("operator").blur(image, self._ds, **kwargs)

    @property
    def plot(self) -> PcmxPlotNamespace:
        """Figures of this store (:mod:`pcmx.plot`): ``ds.pcmx.plot.psf_grid()``, ..."""
        return PcmxPlotNamespace(self._ds)

    def summary(self) -> str:
        """The text ``pcmx info`` prints (:func:`pcmx.io.store.describe_store`)."""
        return _mod("io.store").describe_store(self._ds)


class PcmxPlotNamespace:
    """``ds.pcmx.plot``: the :mod:`pcmx.plot` figures of one Dataset (stateless; each method
    takes the function's keywords and returns the matplotlib Figure)."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def psf_grid(self, n: int = 5, **kwargs):
        """PSFs over the field with the beads (:func:`pcmx.plot.psf_grid`)."""
        return _mod("plot").psf_grid(self._ds, n, **kwargs)

    def plot_basis(self, **kwargs):
        """The basis h_i and maps, each on its own scale (:func:`pcmx.plot.plot_basis`)."""
        return _mod("plot").plot_basis(self._ds, **kwargs)

    def field_maps(self, n: int = 16, **kwargs):
        """FWHM, ellipticity, orientation (and cross-validated error) over the field
        (:func:`pcmx.plot.field_maps`)."""
        return _mod("plot").field_maps(self._ds, n, **kwargs)

    def family_states(self, **kwargs):
        """A family's states side by side (:func:`pcmx.plot.family_states`)."""
        return _mod("plot").family_states(self._ds, **kwargs)

    def deblur_panel(self, image=None, **kwargs):
        """A restoration next to its image (:func:`pcmx.plot.deblur_panel`)."""
        return _mod("plot").deblur_panel(self._ds, image, **kwargs)

    def plot_validation(self, **kwargs):
        """The held-out beads' errors (:func:`pcmx.plot.plot_validation`)."""
        return _mod("plot").plot_validation(self._ds, **kwargs)


@xr.register_dataarray_accessor("pcmx")
class PcmxDataArrayAccessor:
    """``image.pcmx``: blur, learn from and deblur images."""

    def __init__(self, da: xr.DataArray) -> None:
        self._da = da

    def blur(self, operator, **kwargs):
        """``H u`` for an operator Dataset or store path."""
        return _mod("operator").blur(self._da, operator, **kwargs)

    def learn(self, **kwargs) -> xr.Dataset:
        """Learn the space-varying operator from this bead image (paper II-C)."""
        return _mod("learn").learn_operator(self._da, **kwargs)

    def deblur(self, family=None, **kwargs):
        """Blind Sparse+Smooth deblurring with a family (paper App. D)."""
        return _mod("deblur").deblur(self._da, family, **kwargs)
