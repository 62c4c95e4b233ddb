"""Pseudo-labelling: false colour, the spatial / sequential-spectral / material branches, fusion, overlays."""
