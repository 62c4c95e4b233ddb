"""Cube group metadata: the direct reader's description of a Zarr v3 array (parsed from its ``zarr.json``), the
band coordinates a cube carries (``wavelength``, ``fwhm``, named by the cube's CF ``coordinates`` attribute so
that plain xarray decodes them as coordinates of ``band``) and JSON-able group attributes."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BAND_COORDINATES = ("wavelength", "fwhm")
"""The 1-D arrays (nanometres) along ``band`` that a cube group may hold beside its ``cube``, in this order."""


def coordinates_attr(present: Sequence[str]) -> dict[str, str]:
    """The cube array's CF ``coordinates`` attribute naming the band coordinates ``present`` in its group: with it,
    ``xarray.open_zarr`` shows them as coordinates of ``band`` rather than as data variables beside the cube."""
    return {"coordinates": " ".join(present)}


def band_coordinates(cube_attrs: Mapping[str, Any]) -> tuple[str, ...]:
    """The band coordinates of a cube: those its ``coordinates`` attribute names, or, for groups written before the
    attribute, the standard names (the caller skips one that its group lacks)."""
    listed = cube_attrs.get("coordinates")
    return tuple(str(listed).split()) if listed else BAND_COORDINATES


@dataclass(frozen=True)
class ArrayInfo:
    """What the direct reader needs to know about one Zarr v3 array, parsed from its ``zarr.json``."""

    path: str
    image_id: str
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    shard: tuple[int, ...] | None
    compressor: str | None  # "blosc", "zstd", "gzip" or None (raw bytes)
    checksum: bool
    index_checksum: bool
    index_at_end: bool
    fill_value: Any
    key_prefix: str
    separator: str

    @property
    def chunk_nbytes(self) -> int:
        return int(np.prod(self.chunks)) * self.dtype.itemsize

    @property
    def inner_per_shard(self) -> tuple[int, ...]:
        assert self.shard is not None
        return tuple(s // c for s, c in zip(self.shard, self.chunks, strict=True))

    def file_key(self, grid_index: Sequence[int]) -> str:
        """The path of the chunk (or shard) file at ``grid_index`` of the file grid."""
        return self.path + "/" + self.key_prefix + self.separator.join(str(int(i)) for i in grid_index)

    def grid(self) -> tuple[int, ...]:
        """Chunks per dimension."""
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunks, strict=True))

    def fill_chunk(self) -> np.ndarray:
        """A chunk that was never written: the fill value everywhere (read-only)."""
        out = np.full(self.chunks, self.fill_value, dtype=self.dtype)
        out.flags.writeable = False
        return out


_NAMED_FILLS = {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}


def parse_array_meta(meta: dict[str, Any], path: str, image_id: str, name: str) -> ArrayInfo | None:
    """The direct-read description of an array, or None when its codecs are not ones the direct reader decodes
    (then zarr-python reads it)."""
    if meta.get("zarr_format") != 3 or meta.get("storage_transformers"):
        return None
    grid = meta.get("chunk_grid", {})
    if grid.get("name") != "regular" or not isinstance(meta.get("data_type"), str):
        return None
    try:
        dtype = np.dtype(meta["data_type"])
    except TypeError:
        return None
    if dtype.kind not in "biuf":
        return None
    chunks = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
    codecs = meta.get("codecs", [])
    shard: tuple[int, ...] | None = None
    index_checksum, index_at_end = False, True
    if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
        conf = codecs[0]["configuration"]
        shard, chunks = chunks, tuple(int(c) for c in conf["chunk_shape"])
        index_codecs = [c.get("name") for c in conf.get("index_codecs", [])]
        if index_codecs not in (["bytes"], ["bytes", "crc32c"]):
            return None
        if any(c.get("configuration", {}).get("endian", "little") != "little" for c in conf["index_codecs"]):
            return None
        index_checksum = index_codecs[-1] == "crc32c"
        index_at_end = conf.get("index_location", "end") == "end"
        codecs = conf["codecs"]
    names = [c.get("name") for c in codecs]
    if not names or names[0] != "bytes":
        return None
    endian = codecs[0].get("configuration", {}).get("endian", "little")
    dtype = dtype.newbyteorder("<" if endian == "little" else ">") if dtype.itemsize > 1 else dtype
    rest = names[1:]
    checksum = bool(rest) and rest[-1] == "crc32c"
    if checksum:
        rest = rest[:-1]
    if len(rest) > 1 or (rest and rest[0] not in ("blosc", "zstd", "gzip")):
        return None
    enc = meta.get("chunk_key_encoding", {"name": "default"})
    separator = enc.get("configuration", {}).get("separator", "/" if enc.get("name") == "default" else ".")
    prefix = "c" + separator if enc.get("name") == "default" else ""
    fill = meta.get("fill_value", 0)
    fill = _NAMED_FILLS.get(fill, fill) if isinstance(fill, str) else fill
    return ArrayInfo(path=path, image_id=image_id, name=name, shape=tuple(int(s) for s in meta["shape"]),
                     dtype=dtype, chunks=chunks, shard=shard, compressor=rest[0] if rest else None,
                     checksum=checksum, index_checksum=index_checksum, index_at_end=index_at_end,
                     fill_value=fill, key_prefix=prefix, separator=separator)


def jsonable(attrs: dict[str, Any]) -> dict[str, Any]:
    """Zarr attrs must be JSON: numpy scalars and arrays become Python values."""
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, os.PathLike):
            v = os.fspath(v)
        out[k] = v
    return out
