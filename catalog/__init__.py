"""The wavelength-annotated catalog: dataset specs, native-format readers, the Zarr cube store and its index."""
