"""Pretraining batches on the device: crops of catalogued cubes as one float32 tensor on the GPU, read through the
catalog's checksummed chunk reader (``Catalog.cubes``) behind the same request as ``CubeReader.read_batch``.

On CUDA, for uncompressed layouts, every chunk a batch touches is read into one page-locked staging buffer and
verified there, moved to the GPU in one transfer, and the crops are cut and cast on the GPU; compressed layouts
take the CPU path into a pinned batch. This is the stage's (torch) side of the data path; the catalog stays
torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from catalog.cubes.metadata import ArrayInfo
from catalog.cubes.reader import CubeReader
from catalog.cubes.regions import Piece, extent, normalise_region, plan_chunks

_TORCH_DTYPES = {"u1": "uint8", "i1": "int8", "u2": "uint16", "i2": "int16", "u4": "uint32", "i4": "int32",
                 "i8": "int64", "f4": "float32", "f8": "float64"}


def cuda_available() -> bool:
    """True when torch sees a CUDA device."""
    return bool(torch.cuda.is_available())


def pinned_empty(shape: tuple[int, ...], dtype: Any) -> tuple[torch.Tensor, np.ndarray]:
    """A page-locked host tensor when CUDA is present (else an ordinary one) and its numpy view, so a batch read
    lands where the host-to-device copy reads it."""
    tensor = torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), pin_memory=cuda_available())
    return tensor, tensor.numpy()


class DeviceBatchReader:
    """Batches of crops as float32 tensors on ``device``, behind the same request as ``CubeReader.read_batch``.

    Staged path (CUDA, uncompressed chunks, or ``staged=True``): every chunk the batch touches is read straight
    into one page-locked staging buffer and its checksum verified there, the buffer goes to the device in one
    transfer, and the crops are cut out and cast to float32 on the device; the CPU only reads and checks.
    Otherwise the CPU decodes into a pinned batch that is copied over asynchronously (the fallback).
    """

    SLOT_ALIGN = 64

    def __init__(self, reader: CubeReader, device: torch.device | str, staged: bool | None = None) -> None:
        self.reader = reader
        self.device = torch.device(device)
        self.staged = self.device.type == "cuda" if staged is None else staged
        self._staging: torch.Tensor | None = None
        self._in_flight: torch.cuda.Event | None = None  # CUDA event of the last transfer out of the staging buffer

    def read_batch(self, crops: Sequence[tuple[str, int, int]], size: int,
                   bands: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """``(N, bands, size, size)`` float32 crops on the device, zero-padded past the image edge."""
        infos = [self.reader.info(location) for location, _, _ in crops]
        if self.staged and all(i is not None and i.compressor is None and i.dtype.str[1:] in _TORCH_DTYPES
                               and i.dtype.byteorder in "<|=" for i in infos):
            return self._staged(crops, [i for i in infos if i is not None], size, bands)
        tensor, view = pinned_empty((len(crops), len(bands) if bands is not None else infos[0].shape[0]
                                     if infos[0] else 0, size, size), np.float32)
        self.reader.read_batch(crops, size, bands, np.float32, out=view)
        return tensor.to(self.device, non_blocking=True)

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """The staging buffer, at least ``nbytes`` (page-locked on CUDA), once the last transfer out of it is done."""
        if self._in_flight is not None:
            self._in_flight.synchronize()  # the previous batch has left the staging buffer
            self._in_flight = None
        if self._staging is None or self._staging.numel() < nbytes:
            pin = self.device.type == "cuda"
            self._staging = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, pin_memory=pin)
        return self._staging

    def _staged(self, crops: Sequence[tuple[str, int, int]], infos: list[ArrayInfo], size: int,
                bands: Sequence[int] | np.ndarray | None) -> torch.Tensor:
        """The staged path: chunks read and verified into the staging buffer, one transfer, crops cut on the device."""
        nb = len(bands) if bands is not None else infos[0].shape[0]
        placeholder = np.empty(0)
        slots: dict[tuple[str, tuple[int, ...]], tuple[ArrayInfo, tuple[int, ...], int]] = {}
        plans: list[tuple[ArrayInfo, dict[tuple[int, ...], list[Piece]], int, int]] = []
        offset = 0
        for (_, y, x), info in zip(crops, infos, strict=True):
            region = normalise_region(info, (bands, slice(y, y + size), slice(x, x + size)))
            if extent(region[0]) != nb:
                raise ValueError(f"{info.image_id} has {extent(region[0])} bands, the batch {nb}")
            plan = plan_chunks(info, region, placeholder)
            for idx in plan:
                if (info.path, idx) not in slots:
                    slots[(info.path, idx)] = (info, idx, offset)
                    offset += -(-(info.chunk_nbytes + 4) // self.SLOT_ALIGN) * self.SLOT_ALIGN
            plans.append((info, plan, extent(region[1]), extent(region[2])))
        staging = self._buffer(offset)
        host = staging.numpy()

        def fetch(slot: tuple[ArrayInfo, tuple[int, ...], int]) -> None:
            info, idx, off = slot
            room = host[off: off + info.chunk_nbytes + 4]
            path, raw = self.reader.stored_chunk(info, idx, into=room)
            if raw is None:
                room[: info.chunk_nbytes] = info.fill_chunk().view(np.uint8).ravel()
                return
            chunk = self.reader.decode(info, idx, path, raw)  # verifies the checksum in place
            if not np.shares_memory(chunk, room):
                room[: info.chunk_nbytes] = chunk.view(np.uint8).ravel()

        jobs = list(slots.values())
        if self.reader.threads > 1 and len(jobs) > 1:
            for _ in self.reader.executor().map(fetch, jobs):
                pass
        else:
            for job in jobs:
                fetch(job)
        on_device = staging[:offset].to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self._in_flight = torch.cuda.Event()
            self._in_flight.record()
        out = torch.zeros((len(crops), nb, size, size), dtype=torch.float32, device=self.device)
        for n, (info, plan, h, w) in enumerate(plans):
            tdtype = getattr(torch, _TORCH_DTYPES[info.dtype.str[1:]])
            dest = out[n, :, :h, :w]
            for idx, pieces in plan.items():
                _, _, off = slots[(info.path, idx)]
                chunk = on_device[off: off + info.chunk_nbytes].view(tdtype).view(info.chunks)
                for p in pieces:
                    dest[_torch_index(p.dst, self.device)] = chunk[_torch_index(p.src, self.device)].to(torch.float32)
        return out


def _torch_index(sel: tuple[Any, ...], device: torch.device) -> tuple[Any, ...]:
    """A chunk-plan selector for a device tensor: index arrays become tensors on ``device``."""
    return tuple(torch.as_tensor(s, device=device) if isinstance(s, np.ndarray) else s for s in sel)
