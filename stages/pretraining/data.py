"""Pretraining data: random crops of catalogued cubes with their fused sub-masks, one prompt each, and the RGB
of the same crop for the distillation teacher.

Everything is read through the Catalog API (``read_crop`` for pixels, ``fused`` for masks, ``rgb``/``open`` for
the aligned RGB and wavelengths); the catalog is opened lazily in each DataLoader worker. Images without an
aligned RGB get the false-colour stage's RGB of the crop (``stages.labelling.falsecolor.to_rgb``). Randomness is
keyed by (seed, image, draw id), never by worker state, so a batch is the same whatever the worker count, and a
resumed run sees the batches an uninterrupted one would.

A batch shares one wavelength set: the channel-adaptive embedding picks bank kernels from the band wavelengths
once per forward, so ``BandSignatureBatchSampler`` groups images by their band signature. Groups are drawn in
proportion to their size at every step, so 15-band and 420-band datasets mix in one run, across batches.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from catalog.catalog import Catalog
from catalog.masks import MaskStore, PackedMasks
from stages.labelling.falsecolor import to_rgb

DEFAULT_GSD_M = 0.01
"""GSD (m/pixel) assumed where the catalog does not know it: HyperVision's example value for ground scenes."""


def band_signature(wavelengths_nm: np.ndarray) -> str:
    """Identity of a wavelength set (rounded to 1 pm): images with equal signatures can share a batch."""
    wl = np.round(np.asarray(wavelengths_nm, dtype=np.float64), 3)
    return hashlib.sha1(wl.tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class ImageInfo:
    """What the dataset needs to know about one image, gathered once in the main process (picklable)."""

    image_id: str
    dataset: str
    location: str
    height: int
    width: int
    wavelengths: np.ndarray
    gsd_m: float
    has_rgb: bool
    signature: str


def scan_catalog(catalog: Catalog, datasets: Sequence[str] | None = None,
                 fusion_id: str | None = None) -> list[ImageInfo]:
    """Every catalogued image that pretraining may use (not an evaluation image, see catalog/annotations.py) and that
    has a fused mask set (of `fusion_id`, if given; optionally of the given datasets), sorted by id."""
    index = MaskStore(catalog).index()
    if not index.empty and fusion_id is not None:
        index = index[index["labeler_id"] == fusion_id]
    fused = set(index.loc[index["branch"] == "fused", "image_id"]) if not index.empty else set()
    images = catalog.images()
    out: list[ImageInfo] = []
    for row in images.itertuples(index=False):
        if not row.pretraining or row.image_id not in fused or (datasets and row.dataset not in datasets):
            continue
        da = catalog.open(row.image_id)
        wl = np.asarray(da["wavelength"].values, dtype=np.float64)
        gsd = da.attrs.get("gsd_m")
        out.append(ImageInfo(
            image_id=row.image_id, dataset=row.dataset, location=row.location, height=int(row.height),
            width=int(row.width), wavelengths=wl, gsd_m=float(gsd) if gsd else DEFAULT_GSD_M,
            has_rgb=bool(row.has_rgb), signature=band_signature(wl),
        ))
    if not out:
        raise ValueError(
            f"No image of catalog {catalog.uri}" + (f" in datasets {list(datasets)}" if datasets else "")
            + (f" has fused masks of fusion {fusion_id}" if fusion_id else " has fused masks")
            + "; run the label and fuse stages (`hvp label`, `hvp fuse`) before pretraining."
        )
    return out


@dataclass
class PretrainSample:
    """One crop: the cube (C, S, S) float32 with its stored values, zero-padded bottom/right from its valid `size`
    (the trainer scales it under the run's preprocessing contract, model.preprocess.prepare_batch); its
    wavelengths; the RGB (3, S, S) in [0, 1]; sub-masks (n, S, S) bool with one prompt point (n, 2) xy each."""

    image_id: str
    cube: torch.Tensor
    size: tuple[int, int]
    """(h, w) of the crop inside the image, before padding."""
    wavelengths: torch.Tensor
    gsd_m: float
    rgb: torch.Tensor
    masks: torch.Tensor
    points: torch.Tensor
    origin: tuple[int, int]
    """(y0, x0) of the crop in the image."""


@dataclass
class PretrainBatch:
    """B crops sharing one wavelength set; masks and points stay per image (their counts differ)."""

    image_ids: list[str]
    cube: torch.Tensor
    sizes: list[tuple[int, int]]
    wavelengths: torch.Tensor
    gsd_m: torch.Tensor
    rgb: torch.Tensor
    masks: list[torch.Tensor]
    points: list[torch.Tensor]
    origins: list[tuple[int, int]] = field(default_factory=list)

    def to(self, device: torch.device | str) -> PretrainBatch:
        """The batch on `device` (wavelengths stay on the CPU: band matching reads them there)."""
        non_blocking = torch.device(device).type == "cuda"
        return PretrainBatch(
            self.image_ids, self.cube.to(device, non_blocking=non_blocking), self.sizes, self.wavelengths,
            self.gsd_m.to(device), self.rgb.to(device, non_blocking=non_blocking),
            [m.to(device, non_blocking=non_blocking) for m in self.masks],
            [p.to(device, non_blocking=non_blocking) for p in self.points], self.origins,
        )

    def pin_memory(self) -> PretrainBatch:
        """Page-locked copies for fast host-to-GPU transfer (called by DataLoader(pin_memory=True))."""
        return PretrainBatch(
            self.image_ids, self.cube.pin_memory(), self.sizes, self.wavelengths, self.gsd_m, self.rgb.pin_memory(),
            [m.pin_memory() for m in self.masks], [p.pin_memory() for p in self.points], self.origins,
        )

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """How a DataLoader worker sends the batch: small tensors by value in the pickle, large ones (the cube) in
        shared memory. A shared-memory segment per tensor costs the training process ~0.3 ms to receive; a batch
        holds two tensors per image (masks, points), most of them a few kilobytes."""
        return (_rebuild_batch, (self.image_ids, _portable(self.cube), self.sizes,
                                 *(_portable(t) for t in (self.wavelengths, self.gsd_m, self.rgb)),
                                 [_portable(m) for m in self.masks], [_portable(p) for p in self.points],
                                 self.origins))


#: Tensors under this size travel by value between processes (see PretrainBatch.__reduce__).
BY_VALUE_BYTES = 1 << 20


def _portable(t: torch.Tensor) -> torch.Tensor | np.ndarray:
    return t.numpy() if t.device.type == "cpu" and t.nbytes < BY_VALUE_BYTES else t


def _rebuild_batch(image_ids: list[str], cube: Any, sizes: list[tuple[int, int]], wavelengths: Any, gsd_m: Any,
                   rgb: Any, masks: list[Any], points: list[Any], origins: list[tuple[int, int]]) -> PretrainBatch:
    def tensor(x: Any) -> torch.Tensor:
        return torch.from_numpy(x) if isinstance(x, np.ndarray) else x

    return PretrainBatch(image_ids, tensor(cube), sizes, tensor(wavelengths), tensor(gsd_m), tensor(rgb),
                         [tensor(m) for m in masks], [tensor(p) for p in points], origins)


def collate(samples: Sequence[PretrainSample]) -> PretrainBatch:
    """Stack crops that share a wavelength set (to 1 pm, as band_signature); refuses mixed sets."""
    first = samples[0].wavelengths
    for s in samples[1:]:
        if s.wavelengths.shape != first.shape or not torch.allclose(s.wavelengths, first, rtol=0, atol=1e-3):
            raise ValueError(
                f"Batch mixes wavelength sets ({samples[0].image_id}: {first.numel()} bands, {s.image_id}: "
                f"{s.wavelengths.numel()} bands); build the DataLoader with BandSignatureBatchSampler."
            )
    return PretrainBatch(
        image_ids=[s.image_id for s in samples],
        cube=_stack([s.cube for s in samples]),
        sizes=[s.size for s in samples],
        wavelengths=first,
        gsd_m=torch.tensor([s.gsd_m for s in samples], dtype=torch.float32),
        rgb=torch.stack([s.rgb for s in samples]),
        masks=[s.masks for s in samples],
        points=[s.points for s in samples],
        origins=[s.origin for s in samples],
    )


class PretrainDataset(Dataset[PretrainSample]):
    """Random crops over the catalogued images that have fused masks; indexed by (image index, draw id).

    A crop is drawn at most `crop_attempts` times until it holds a sub-mask of at least `min_mask_pixels` pixels
    (a crop may still end up with none: it then trains the distillation term only). At most `max_masks` sub-masks
    are kept per crop, chosen at random.
    """

    def __init__(self, catalog_uri: str, crop_size: int, images: Sequence[ImageInfo] | None = None,
                 max_masks: int = 16, min_mask_pixels: int = 16, crop_attempts: int = 8, seed: int = 0,
                 mask_cache_mb: float = 256.0, read_threads: int | None = None,
                 fusion_id: str | None = None) -> None:
        if crop_size < 8:
            raise ValueError(f"crop_size={crop_size} is too small; use at least one 8 px patch.")
        self.catalog_uri = catalog_uri
        self.crop_size = crop_size
        self.images = list(images) if images is not None else scan_catalog(Catalog(catalog_uri))
        self.max_masks = max_masks
        self.min_mask_pixels = min_mask_pixels
        self.crop_attempts = crop_attempts
        self.seed = seed
        self.mask_cache_bytes = int(mask_cache_mb * 2**20)
        self.read_threads = read_threads
        self.fusion_id = fusion_id
        """The fused pseudo-targets trained on (a fusion id); None: each image's latest."""
        self._catalog: Catalog | None = None
        self._masks: OrderedDict[str, PackedMasks] = OrderedDict()

    def __getstate__(self) -> dict[str, object]:
        """Workers get the configuration, not the open catalog or the cache (each opens its own)."""
        state = dict(self.__dict__)
        state["_catalog"] = None
        state["_masks"] = OrderedDict()
        return state

    @property
    def catalog(self) -> Catalog:
        """The catalog, opened on first use in this process (one decode thread in a DataLoader worker: the
        workers are the parallelism; the catalog's default thread count in the main process)."""
        if self._catalog is None:
            threads = self.read_threads
            if threads is None and torch.utils.data.get_worker_info() is not None:
                threads = 1
            self._catalog = (Catalog(self.catalog_uri) if threads is None else
                             Catalog(self.catalog_uri, read_threads=threads))
        return self._catalog

    @property
    def signatures(self) -> list[str]:
        """Band signature of each image, in dataset order (for BandSignatureBatchSampler)."""
        return [info.signature for info in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def fused(self, image_id: str) -> PackedMasks:
        """The fused set of an image, bit-packed, through a per-process LRU cache bounded in bytes."""
        if image_id in self._masks:
            self._masks.move_to_end(image_id)
            return self._masks[image_id]
        masks = (self.catalog.fused(image_id, packed=True) if self.fusion_id is None else
                 self.catalog.masks(image_id, labeler_id=self.fusion_id, packed=True))
        self._masks[image_id] = masks
        while len(self._masks) > 1 and sum(m.nbytes for m in self._masks.values()) > self.mask_cache_bytes:
            self._masks.popitem(last=False)
        return masks

    def __getitem__(self, key: int | tuple[int, int]) -> PretrainSample:
        """The crop of `key` = (image index, draw id); a bare index means draw 0. Same key, same crop."""
        index = key if isinstance(key, int) else key[0]
        return self._sample(key, _cube_buffer(1, self.images[index].wavelengths.size, self.crop_size)[0])

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list[PretrainSample]:
        """The crops of a batch (what DataLoader asks for), their cubes decoded into one ``(B, C, S, S)`` buffer
        (in shared memory inside a worker), so ``collate`` neither stacks nor the worker copies them again."""
        bands = {self.images[k if isinstance(k, int) else k[0]].wavelengths.size for k in keys}
        if len(bands) != 1:  # mixed band counts: collate refuses them with the fix; build them one by one
            return [self[k] for k in keys]
        cubes = _cube_buffer(len(keys), bands.pop(), self.crop_size)
        return [self._sample(k, cubes[n]) for n, k in enumerate(keys)]

    def _sample(self, key: int | tuple[int, int], cube: torch.Tensor) -> PretrainSample:
        """The crop of ``key``, its cube decoded into ``cube`` (C, S, S) float32."""
        index, draw = (key, 0) if isinstance(key, int) else key
        info = self.images[index]
        rng = np.random.default_rng([self.seed, index, draw])
        fused = self.fused(info.image_id)
        size = self.crop_size
        y0 = x0 = 0
        keep = np.zeros(0, dtype=np.int64)
        for _ in range(self.crop_attempts):
            y0 = int(rng.integers(0, max(info.height - size, 0) + 1))
            x0 = int(rng.integers(0, max(info.width - size, 0) + 1))
            areas = fused.window(y0, y0 + size, x0, x0 + size).sum(axis=(1, 2))
            keep = np.flatnonzero(areas >= self.min_mask_pixels)
            if keep.size:
                break
        if keep.size > self.max_masks:
            keep = np.sort(rng.choice(keep, self.max_masks, replace=False))
        h, w = min(size, info.height - y0), min(size, info.width - x0)
        # decoded straight into the zero-padded float32 sample, stored values kept (the trainer prepares them
        # under the run's preprocessing contract)
        out = cube.numpy()
        if (h, w) != (size, size):
            out[:, h:] = 0
            out[:, :h, w:] = 0
        crop = self.catalog.read_crop(info.location, y0, x0, size, dtype=np.float32, out=out[:, :h, :w])
        rgb = self._rgb(info, crop, y0, x0)  # before normalising: the false colour of the values as stored
        masks = fused.window(y0, y0 + h, x0, x0 + w, keep)
        points = self._prompts(fused, keep, masks, (y0, x0), rng)
        return PretrainSample(
            image_id=info.image_id,
            cube=cube,
            size=(h, w),
            wavelengths=torch.from_numpy(info.wavelengths),
            gsd_m=info.gsd_m,
            rgb=torch.from_numpy(_pad(rgb, size)),
            masks=torch.from_numpy(_pad(masks, size)),
            points=torch.from_numpy(points),
            origin=(y0, x0),
        )

    def _rgb(self, info: ImageInfo, crop: np.ndarray, y0: int, x0: int) -> np.ndarray:
        """The crop's RGB (3, h, w) in [0, 1] for the teacher: the catalog's aligned RGB when there is one, else
        the false-colour stage's RGB of the crop (CIE 1931 synthesis or band pick, as the spatial branch sees)."""
        if info.has_rgb:
            rgb = self.catalog.read_rgb_crop(info.location, y0, x0, self.crop_size)
        else:  # the spatial stage's stored false colour; computed on the crop if it was never derived
            stored = self.catalog.read_falsecolor_crop(info.location, y0, x0, self.crop_size)
            rgb = stored if stored is not None else to_rgb(crop, info.wavelengths)[0]
        return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255.0

    @staticmethod
    def _prompts(fused: PackedMasks, keep: np.ndarray, masks: np.ndarray, origin: tuple[int, int],
                 rng: np.random.Generator) -> np.ndarray:
        """One point (x, y) per kept sub-mask in crop pixels: the stored prompt when it lies inside the cropped
        mask, else a pixel of the cropped mask drawn uniformly."""
        y0, x0 = origin
        points = np.zeros((len(keep), 2), dtype=np.float32)
        xs = fused.table["prompt_x"].to_numpy()
        ys = fused.table["prompt_y"].to_numpy()
        for j, i in enumerate(keep):
            px, py = int(xs[i]) - x0, int(ys[i]) - y0
            if not (0 <= py < masks.shape[1] and 0 <= px < masks.shape[2] and masks[j, py, px]):
                yy, xx = np.nonzero(masks[j])
                pick = int(rng.integers(yy.size))
                px, py = int(xx[pick]), int(yy[pick])
            points[j] = (px, py)
        return points


def _cube_buffer(n: int, bands: int, size: int) -> torch.Tensor:
    """An uninitialised ``(n, bands, size, size)`` float32 tensor, in shared memory inside a DataLoader worker
    (what it sends to the main process then travels without a copy, as default_collate does)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty((n, bands, size, size), dtype=torch.float32)
    return _on_storage(torch.UntypedStorage._new_shared(n * bands * size * size * 4), 0, (n, bands, size, size),
                       torch.float32)


def _on_storage(storage: torch.UntypedStorage, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous tensor of ``shape`` over ``storage`` from element ``offset``."""
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    return torch.empty(0, dtype=dtype).set_(storage, offset, shape, strides)


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` of equal-shape tensors, free when they are consecutive slices of one buffer (a batch
    from ``__getitems__``), else into shared memory inside a DataLoader worker."""
    first = tensors[0]
    step = first.numel()
    if all(t.is_contiguous() and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
           and t.storage_offset() == first.storage_offset() + k * step and t.shape == first.shape
           for k, t in enumerate(tensors)):
        return _on_storage(first.untyped_storage(), int(first.storage_offset()), (len(tensors), *first.shape),
                           first.dtype)
    out = None
    if torch.utils.data.get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(len(tensors) * step * first.element_size())
        out = _on_storage(storage, 0, (len(tensors), *first.shape), first.dtype)
    return torch.stack(list(tensors), out=out)


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad the last two axes bottom/right to size x size (the official padding side)."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return np.ascontiguousarray(x)
    out = np.zeros((*x.shape[:-2], size, size), dtype=x.dtype)
    out[..., :h, :w] = x
    return out


class BandSignatureBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (image index, draw id) whose images share one band signature, for steps [start_step, steps).

    Steps are grouped in epochs. Each epoch, every signature group is permuted and cut into blocks of
    world_size x batch_size images (the last block of a group padded with the group's first images of that epoch,
    as DistributedSampler pads), the blocks of all groups are shuffled together (so groups mix in proportion to
    their size), and at each step rank r takes the r-th slice of one block. So in one epoch the ranks read
    disjoint shards of the catalog and, padding aside, every image exactly once. Draw ids are unique per (step,
    rank, slot), so every crop is a fresh random crop, and the stream depends only on (seed, step, rank): resuming
    at step k yields what an uninterrupted run yields from k on.
    """

    def __init__(self, signatures: Sequence[str], batch_size: int, steps: int, seed: int = 0, start_step: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or not signatures:
            raise ValueError(f"Need batch_size >= 1 and at least one image; got {batch_size}, {len(signatures)}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}.")
        groups: dict[str, list[int]] = {}
        for i, sig in enumerate(signatures):
            groups.setdefault(sig, []).append(i)
        self.groups = [np.asarray(groups[k]) for k in sorted(groups)]
        self.batch_size = batch_size
        self.steps = steps
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        need = world_size * batch_size
        self.steps_per_epoch = sum(-(-g.size // need) for g in self.groups)
        self._plan: tuple[int, list[np.ndarray]] | None = None

    def epoch_blocks(self, epoch: int) -> list[np.ndarray]:
        """The blocks of one epoch, in step order: world_size x batch_size image indices each, one group's."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        rng = np.random.default_rng([self.seed, epoch])
        need = self.world_size * self.batch_size
        blocks = []
        for group in self.groups:
            order = rng.permutation(group)
            order = np.resize(order, -(-order.size // need) * need)  # pad by cycling the epoch's own order
            blocks += [order[k:k + need] for k in range(0, order.size, need)]
        plan = [blocks[i] for i in rng.permutation(len(blocks))]
        self._plan = (epoch, plan)
        return plan

    def batch(self, step: int) -> list[tuple[int, int]]:
        """This rank's batch at `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        block = self.epoch_blocks(epoch)[k]
        start = self.rank * self.batch_size
        base = step * self.world_size * self.batch_size + start
        return [(int(block[start + j]), base + j) for j in range(self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(self.steps - self.start_step, 0)
