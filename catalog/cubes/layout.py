"""Cube layout: how a cube is cut into chunks and shards and how each chunk is encoded (the layout version
recorded in every group, the chunk and shard geometry, the Blosc codec and the CRC-32C closing each chunk)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import google_crc32c
import numcodecs.blosc
import numpy as np
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

LAYOUT_VERSION = 2
"""Recorded as ``layout_version`` in every cube group written; a group without it is layout 1."""

Codec = Literal["none", "lz4", "zstd"]
Shuffle = Literal["none", "byte", "bit"]
_SHUFFLES: dict[str, BloscShuffle] = {"none": BloscShuffle.noshuffle, "byte": BloscShuffle.shuffle,
                                      "bit": BloscShuffle.bitshuffle}
_BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}
NO_CHUNK = np.uint64(2**64 - 1)
"""A shard index entry (offset and size) for an inner chunk that was never written."""


@dataclass(frozen=True)
class CubeLayout:
    """How a cube is chunked and encoded: ``band_group`` bands (0 = all) x ``chunk_xy`` x ``chunk_xy`` pixels per
    chunk, ``shard_xy`` pixels per shard edge (0 = one file per chunk), a Blosc ``codec`` ("none" = raw bytes)
    with its ``level`` and ``shuffle``, and a CRC-32C per chunk when ``checksum``."""

    chunk_xy: int = 64
    band_group: int = 0
    shard_xy: int = 1024
    codec: Codec = "none"
    level: int = 1
    shuffle: Shuffle = "none"
    checksum: bool = True

    def __post_init__(self) -> None:
        if self.chunk_xy < 1 or self.band_group < 0 or self.shard_xy < 0:
            raise ValueError(f"{self}: chunk_xy must be >= 1, band_group and shard_xy >= 0")
        if self.shard_xy % self.chunk_xy:  # whole chunks per shard: round the shard edge up
            object.__setattr__(self, "shard_xy", -(-self.shard_xy // self.chunk_xy) * self.chunk_xy)
        if self.codec not in ("none", "lz4", "zstd") or self.shuffle not in _SHUFFLES:
            raise ValueError(f"unknown codec '{self.codec}' or shuffle '{self.shuffle}'")

    def chunk_shape(self, bands: int) -> tuple[int, int, int]:
        """The chunk shape of a cube with ``bands`` bands."""
        return (min(self.band_group, bands) if self.band_group else bands, self.chunk_xy, self.chunk_xy)

    def shard_shape(self, bands: int) -> tuple[int, int, int] | None:
        """The shard shape (all bands, in whole band groups, x ``shard_xy``^2), or None when chunks are files of
        their own."""
        g = self.chunk_shape(bands)[0]
        return (-(-bands // g) * g, self.shard_xy, self.shard_xy) if self.shard_xy else None

    def compressors(self) -> list[Any]:
        """The bytes-to-bytes codecs of a chunk, in Zarr v3 terms (what other Zarr readers see)."""
        out: list[Any] = []
        if self.codec != "none":
            out.append(BloscCodec(cname=self.codec, clevel=self.level, shuffle=_SHUFFLES[self.shuffle]))
        if self.checksum:
            out.append(Crc32cCodec())
        return out

    def encode(self, buf: np.ndarray) -> list[Any]:
        """A chunk's stored parts: the (compressed) bytes and the CRC-32C over them (what ``compressors`` says)."""
        parts: list[Any] = [buf]
        if self.codec != "none":
            parts = [numcodecs.blosc.compress(buf, self.codec.encode(), self.level,
                                              _BLOSC_SHUFFLE[_SHUFFLES[self.shuffle].value], 0)]
        if self.checksum:
            body = parts[0] if isinstance(parts[0], np.ndarray) else np.frombuffer(parts[0], dtype=np.uint8)
            parts.append(int(google_crc32c.value(body.reshape(-1).view(np.uint8))).to_bytes(4, "little"))
        return parts

    def describe(self) -> dict[str, Any]:
        """The layout as JSON-able fields (recorded in each group)."""
        return {"chunk_xy": self.chunk_xy, "band_group": self.band_group, "shard_xy": self.shard_xy,
                "codec": self.codec, "level": self.level, "shuffle": self.shuffle, "checksum": self.checksum}

    def label(self) -> str:
        """A short human name, e.g. ``64px allb none+crc``."""
        bands = f"{self.band_group}b" if self.band_group else "allb"
        codec = self.codec if self.codec == "none" else f"{self.codec}{self.level}" + (
            "" if self.shuffle == "none" else f"+{self.shuffle}sh")
        shard = f" shard{self.shard_xy}" if self.shard_xy else ""
        return f"{self.chunk_xy}px {bands}{shard} {codec}{'+crc' if self.checksum else ''}"
