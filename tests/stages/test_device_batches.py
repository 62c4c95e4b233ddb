"""Pretraining batches on the device: the staged path (chunks staged, verified, moved once, crops cut on the device)
and the pinned CPU fallback give exactly the catalog's CPU batches, and a flipped byte is caught on both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from base.errors import CorruptChunkError
from catalog.catalog import Catalog
from catalog.cubes.layout import CubeLayout
from catalog.cubes.writer import CubeWrite
from stages.pretraining.device_batches import DeviceBatchReader


def _cube(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, size=(12, 40, 50)).astype(np.uint16)


def _write(cat: Catalog, data: np.ndarray, image: str) -> str:
    return cat.write_cube(CubeWrite(
        dataset="ds", image_id=f"ds/{image}", key=image, sha256=image.ljust(64, "0"), data=data,
        wavelength_nm=np.linspace(400, 700, data.shape[0]), attrs={"source_path": f"/src/{image}.npy"}))["location"]


def test_device_batches_match_the_cpu_path(tmp_path: Path) -> None:
    """The staged (GPU) path's chunk staging and on-device cutting, run on the CPU device; CUDA runs the same
    code with pinned staging and one transfer."""
    cat = Catalog(tmp_path / "cat", layout=CubeLayout(chunk_xy=16, band_group=5), read_threads=2).init()
    a, b = _cube(1), _cube(2)
    la, lb = _write(cat, a, "a"), _write(cat, b, "b")
    crops = [(la, 3, 4), (lb, 25, 30), (la, 16, 16)]
    staged = DeviceBatchReader(cat.cubes, "cpu", staged=True)
    for bands in (None, [0, 1, 6, 11]):
        got = staged.read_batch(crops, 20, bands)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        np.testing.assert_array_equal(got.numpy(), cat.read_batch(crops, 20, bands))
    fallback = DeviceBatchReader(cat.cubes, "cpu").read_batch(crops, 20)
    np.testing.assert_array_equal(fallback.numpy(), cat.read_batch(crops, 20))
    np.testing.assert_array_equal(fallback[1, :, :15, :20].numpy(), b[:, 25:, 30:])


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "fallback"])
def test_a_flipped_byte_is_caught_on_the_device_path(tmp_path: Path, staged: bool) -> None:
    cat = Catalog(tmp_path / "cat", layout=CubeLayout(chunk_xy=16, shard_xy=0), chunk_cache_mb=0).init()
    loc = _write(cat, _cube(3), "img")
    chunk_file = tmp_path / "cat" / loc / "cube" / "c" / "0" / "1" / "1"
    raw = bytearray(chunk_file.read_bytes())
    raw[123] ^= 0x10
    chunk_file.write_bytes(bytes(raw))
    with pytest.raises(CorruptChunkError) as err:
        DeviceBatchReader(cat.cubes, "cpu", staged=staged).read_batch([(loc, 10, 10)], 16)
    assert err.value.chunk == (0, 1, 1) and err.value.path == str(chunk_file)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_the_cpu_path(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat", layout=CubeLayout(chunk_xy=16)).init()
    loc = _write(cat, _cube(0), "img")
    got = DeviceBatchReader(cat.cubes, "cuda").read_batch([(loc, 3, 4), (loc, 30, 30)], 24)
    assert got.device.type == "cuda"
    np.testing.assert_array_equal(got.cpu().numpy(), cat.read_batch([(loc, 3, 4), (loc, 30, 30)], 24))
