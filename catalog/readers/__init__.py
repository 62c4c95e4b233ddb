"""Readers for every native format family; importing this package registers them all."""

from catalog.readers import bandfolder, envi, hdf5, hsd, matlab, mosaic, npy, tiff  # noqa: F401  (registration)
from catalog.readers.base import READERS, AxisView, RawCube, Reader, ReaderOptions, SourceItem, get_reader

__all__ = ["READERS", "AxisView", "RawCube", "Reader", "ReaderOptions", "SourceItem", "get_reader"]
