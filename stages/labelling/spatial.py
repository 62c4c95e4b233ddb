"""Spatial branch: SAM2 automatic masks on the image's RGB (native, CIE 1931 synthesis or band-pick false colour).

SAM2 resizes the RGB to its own input size (tiny fixtures are upsampled) and returns masks at the image's size.
Each mask's ``score`` is SAM2's predicted IoU (the quality estimate fusion ranks by); ``stability`` is SAM2's
stability score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

from catalog.masks import MaskSet, table_from_masks
from stages.labelling.falsecolor import check_cube, to_rgb
from stages.labelling.labeler import ImageSample, Labeler
from stages.labelling.sam2_models import (
    amg_params,
    automatic_masks,
    build_sam2_model,
    default_device,
    mask_generator,
    model_spec,
)


class SpatialLabeler(Labeler):
    """SAM2 automatic masks on one RGB per image.

    ``model_config``: ``{"config": <sam2 config name>, "image_size": <int>}`` (sam2_models.model_spec);
    ``params``: SAM2AutomaticMaskGenerator's parameters (sam2_models.AMG_DEFAULTS, SAM2's defaults); the id
    hashes them with the defaults filled in, so leaving a parameter out or giving its default is the same labeler.
    """

    branch = "spatial"
    stage_version = "1"

    def __init__(self, model_config: dict[str, Any], checkpoint: str | Path | None, params: dict[str, Any],
                 device: str | None = None) -> None:
        config, size = model_spec(model_config)
        super().__init__({"config": config, "image_size": size}, checkpoint, amg_params(params))
        self.device = device or default_device()
        self._generator: SAM2AutomaticMaskGenerator | None = None

    @property
    def generator(self) -> SAM2AutomaticMaskGenerator:
        """The mask generator, built on first use (computing the labeler id needs no model)."""
        if self._generator is None:
            model = build_sam2_model(self.model_config["config"], self.checkpoint, self.device,
                                     self.model_config["image_size"])
            self._generator = mask_generator(model, self.params)
        return self._generator

    def label(self, sample: ImageSample) -> MaskSet:
        """Automatic masks of the sample's RGB; attrs say which RGB was used."""
        if sample.rgb is not None:  # to_rgb validates the cube only when it makes the RGB from it
            check_cube(sample.cube, sample.wavelengths)
        rgb, method = to_rgb(sample.cube, sample.wavelengths, sample.rgb)
        masks, iou, stability = automatic_masks(self.generator, rgb, self.params["min_mask_region_area"])
        table = table_from_masks(masks, self.branch, score=iou, predicted_iou=iou, stability=stability)
        return MaskSet(masks, table, labeler_id=self.labeler_id,
                       attrs={"rgb_method": method, "random_init": self.random_init})
