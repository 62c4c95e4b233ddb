"""Snapshot-mosaic frames (HOT-2024): each ``cell x cell`` block of a 2-D frame holds one pixel per band.

Band ``k = r * cell + c`` sits at pixel ``(i * cell + r, j * cell + c)``, so the cube is
``(cell * cell, H // cell, W // cell)``. Frames are small, so the rearrangement is eager.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field, model_validator

from base.errors import InputError
from catalog.readers.bandfolder import read_gray_image
from catalog.readers.base import RawCube, Reader, ReaderOptions, SourceItem, register


class MosaicOptions(ReaderOptions):
    """``cell``: mosaic block side (4 -> 16 bands, 5 -> 25); ``keep_cells``: keep only the first N bands
    (e.g. 15 when the 16th cell of a 4x4 sensor is unused)."""

    cell: int = Field(ge=2)
    keep_cells: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _keep_within_cells(self) -> MosaicOptions:
        if self.keep_cells is not None and self.keep_cells > self.cell * self.cell:
            raise ValueError(f"keep_cells {self.keep_cells} exceeds the {self.cell * self.cell} cells of a "
                             f"{self.cell}x{self.cell} mosaic")
        return self


def demosaic(frame: np.ndarray, cell: int) -> np.ndarray:
    """Rearrange a 2-D mosaic frame (a whole number of cells in both axes) into ``(cell*cell, y, x)``."""
    h, w = frame.shape[0] // cell, frame.shape[1] // cell
    blocks = frame.reshape(h, cell, w, cell)  # [i, r, j, c] = frame[i*cell + r, j*cell + c]
    return np.ascontiguousarray(blocks.transpose(1, 3, 0, 2).reshape(cell * cell, h, w))


@register
class MosaicReader(Reader):
    """A single-channel 8/16-bit PNG snapshot-mosaic frame, split into its bands."""

    name = "mosaic"
    version = "1"
    Options = MosaicOptions

    def read(self, item: SourceItem, options: ReaderOptions) -> RawCube:
        """Demosaic the frame; crop to whole cells and drop unused cells, recording both in attrs."""
        assert isinstance(options, MosaicOptions)
        path, cell = item.primary, options.cell
        frame = read_gray_image(path, "file", "ingest the raw single-channel mosaic frame (the PNG), not the "
                                "false-colour or an RGB-converted image")
        height, width = frame.shape
        if height < cell or width < cell:
            raise InputError(path, "file", f"frame is {width}x{height} pixels, smaller than one "
                             f"{cell}x{cell} mosaic cell", "check 'options.cell' and that the file is a full "
                             "sensor frame")
        attrs: dict[str, Any] = {"mosaic_cell": cell}
        crop_h, crop_w = height - height % cell, width - width % cell
        if (crop_h, crop_w) != (height, width):
            attrs["mosaic_cropped_from_hw"] = [height, width]
        cube = demosaic(frame[:crop_h, :crop_w], cell)
        if options.keep_cells is not None:
            attrs["kept_cells"] = options.keep_cells
            if cube[options.keep_cells:].any():
                attrs["dropped_cells_nonzero"] = True
            cube = cube[: options.keep_cells]
        return RawCube(data=cube, attrs=attrs)
