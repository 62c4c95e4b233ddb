"""The reader contract: every native format family turns one source item into a lazy ``(band, y, x)`` cube.

Readers never load more than they must: formats that allow it (ENVI, TIFF, HDF5/MATLAB v7.3, NPY) return a view
whose slices read only the requested region, so ingest can stream a cube larger than memory chunk by chunk.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict

from base.errors import InputError


class ArrayLike(Protocol):
    """What a lazy cube must offer: a shape, a dtype and basic slicing that returns numpy arrays."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def __getitem__(self, key: Any) -> Any: ...


class LazyArray:
    """Base of lazy source arrays: a fixed shape and dtype; subclasses read only the region a slice asks for."""

    def __init__(self, shape: Sequence[int], dtype: Any) -> None:
        self._shape = tuple(int(s) for s in shape)
        self._dtype = np.dtype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype


class AxisView:
    """A lazy view of a source array in another axis order, e.g. an HWC memmap or h5py dataset seen as CHW.

    ``axes[i]`` is the source axis that becomes output axis ``i`` (as in ``np.transpose``). Slicing maps the
    output-order key onto the source, reads only that region and transposes the (small) result.
    """

    def __init__(self, source: ArrayLike, axes: Sequence[int]) -> None:
        if sorted(axes) != list(range(len(source.shape))):
            raise ValueError(f"axes {tuple(axes)} is not a permutation of the source's {len(source.shape)} axes")
        self.source = source
        self.axes = tuple(axes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape[a] for a in self.axes)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.source.dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (len(self.axes) - len(key))
        if any(not isinstance(k, slice) for k in key):
            raise TypeError("AxisView supports slices only")
        src_key: list[slice] = [slice(None)] * len(self.axes)
        for out_axis, src_axis in enumerate(self.axes):
            src_key[src_axis] = key[out_axis]
        block = np.asarray(self.source[tuple(src_key)])
        return np.transpose(block, self.axes)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[(slice(None),) * len(self.axes)]
        return out.astype(dtype) if dtype is not None else out


class BandSubset:
    """A lazy view keeping a contiguous run of bands ``[start, stop)`` of a ``(band, y, x)`` cube."""

    def __init__(self, source: ArrayLike, start: int, stop: int) -> None:
        self.source, self.start, self.stop = source, start, stop

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self.source.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.source.dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        b = key[0] if key else slice(None)
        if not isinstance(b, slice) or b.step not in (None, 1):
            raise TypeError("BandSubset supports unit-step band slices only")
        lo, hi, _ = b.indices(self.stop - self.start)
        return np.asarray(self.source[(slice(self.start + lo, self.start + hi), *key[1:])])


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, with every symlink followed, lies inside ``folder`` (itself resolved)."""
    try:
        return Path(os.path.realpath(path, strict=True)).is_relative_to(os.path.realpath(folder))
    except OSError:
        return False


def axes_for(order: str, path: str | Path, field_name: str = "options.axes") -> tuple[int, ...]:
    """Permutation that turns a source stored in ``order`` (a permutation of 'b', 'y', 'x') into ``(band, y, x)``."""
    if sorted(order) != ["b", "x", "y"]:
        raise InputError(path, field_name, f"'{order}' is not an axis order", "use a permutation of 'b', 'y', 'x', "
                         "e.g. 'yxb' for height-width-channel or 'bxy' for channel-width-height")
    return tuple(order.index(a) for a in "byx")


@dataclass(frozen=True)
class SourceItem:
    """One image's source: the primary file, every file that makes it up, and its readable key.

    ``key`` is the primary's path relative to the dataset folder without its extension; with the dataset slug it
    forms the stable image id. ``files`` are hashed (in order) to give the source sha256.
    """

    dataset: str
    root: Path
    primary: Path
    files: tuple[Path, ...]
    key: str
    rgb: Path | None = None
    stem_suffix: str | None = None

    def template_vars(self) -> dict[str, str]:
        """Values for ``{dir}``, ``{parent}``, ``{stem}``, ``{base}``, ``{path}``, ``{up}`` (the folder above
        ``{dir}``) and ``{index}`` (the stem's trailing number, e.g. a tile's) in a spec's path templates."""
        rel = self.primary.relative_to(self.root)
        stem = self.primary.stem
        base = stem[: -len(self.stem_suffix)] if self.stem_suffix and stem.endswith(self.stem_suffix) else stem
        digits = re.search(r"(\d+)$", stem)
        return {"dir": rel.parent.as_posix(), "parent": rel.parent.name, "stem": stem, "base": base,
                "path": rel.as_posix(), "up": rel.parent.parent.as_posix(), "index": digits.group(1) if digits else ""}

    def resolve(self, template: str) -> Path | None:
        """The first file (sorted) matching a path template relative to the dataset folder, or None; a match that
        leads out of the folder (through '..' or a symlink) is refused."""
        pattern = template.format(**self.template_vars())
        matches = sorted(p for p in self.root.glob(pattern) if p.is_file())
        if matches and not inside(matches[0], self.root):
            raise InputError(matches[0], "rgb", f"the path template {template!r} leads out of the dataset folder "
                             f"{self.root}", "keep companion files inside the dataset folder (copy them in instead "
                             "of linking to elsewhere)")
        return matches[0] if matches else None


@dataclass
class RawCube:
    """What a reader returns: a lazy ``(band, y, x)`` cube plus what the file itself says about it.

    ``wavelengths`` is None when the file carries none (the dataset spec then supplies them); ``wavelength_units``
    is the unit the file states ("nm", "um") or None if unstated (then detected from the values).
    """

    data: ArrayLike
    wavelengths: np.ndarray | None = None
    wavelength_units: str | None = None
    fwhm: np.ndarray | None = None
    rgb: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)


class ReaderOptions(BaseModel):
    """Base of every reader's options: unknown fields are rejected so that a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Reader(ABC):
    """A native format family. Subclasses set ``name``, ``version``, ``Options`` and implement ``read``."""

    name: ClassVar[str]
    version: ClassVar[str]
    Options: ClassVar[type[ReaderOptions]] = ReaderOptions
    #: The format's files can say their band centres (then a spec need not list them; they are read by default).
    file_wavelengths: ClassVar[bool] = False

    def companions(self, primary: Path, options: ReaderOptions) -> list[Path]:
        """Other files that belong to the image (e.g. the ENVI data file beside its header). Default: none."""
        return []

    @abstractmethod
    def read(self, item: SourceItem, options: ReaderOptions) -> RawCube:
        """The image as a lazy ``(band, y, x)`` cube plus what the file says about it; InputError on bad input."""


READERS: dict[str, Reader] = {}


def register(cls: type[Reader]) -> type[Reader]:
    """Class decorator adding a reader to the registry under its ``name``."""
    READERS[cls.name] = cls()
    return cls


def get_reader(name: str, path: str | Path = "<spec>") -> Reader:
    """The reader for a format family, or an error listing the known ones."""
    try:
        return READERS[name]
    except KeyError:
        raise InputError(path, "format", f"unknown format '{name}'",
                         f"use one of: {', '.join(sorted(READERS))}") from None


def load_rgb(path: Path) -> np.ndarray:
    """Read an aligned RGB image (JPEG/PNG/BMP) as ``(y, x, 3)`` uint8."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise InputError(path, "rgb", f"cannot read the aligned RGB image ({exc})",
                         "replace the file or remove the dataset's 'rgb' pattern") from exc

