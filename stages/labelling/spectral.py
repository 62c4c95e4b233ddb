"""Spectral branch: the cube's band triplets as a video, objects tracked along the spectrum by SAM2's memory.

1. ``spectral_sequence(cube, wavelengths, stride)`` gives the frames (band rule in falsecolor.sequence_bands).
2. Seeds: SAM2 automatic masks on the middle frame (index ``n_frames // 2``, the centre of the used spectrum),
   with the same weights as the video model, best ``max_objects`` by predicted IoU; each becomes an object
   through ``add_new_mask``.
3. Propagation from the seed frame forward to the last frame, then backward to frame 0; logits > 0 are the
   per-frame masks. Frames are fed from memory (``InMemoryVideoPredictor``), never through JPEG files.
4. Intra-branch consolidation: an object's sequence mask holds the pixels it covers in more than ``vote`` of the
   frames (0.5: strict majority; 0: union); then greedy mask IoU-NMS across objects (``nms_thresh``, the fusion
   stage's ``mask_nms``) by decreasing score.

Table: ``score`` = ``predicted_iou`` = the seed mask's predicted IoU, ``stability`` = its stability score;
``frames_present`` counts the frames where the tracked object is non-empty.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import sam2.sam2_video_predictor as _sam2_video
import torch
import torch.nn.functional as F
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.sam2_video_predictor import SAM2VideoPredictor

from catalog.masks import MaskSet, table_from_masks
from stages.labelling.falsecolor import spectral_sequence
from stages.labelling.fuse import mask_nms
from stages.labelling.labeler import ImageSample, Labeler
from stages.labelling.sam2_models import (
    amg_params,
    automatic_masks,
    build_sam2_model,
    default_device,
    mask_generator,
    model_spec,
)

# sam2 draws a progress bar per propagation: one per object per image would flood the flow logs.
_sam2_video.tqdm = functools.partial(_sam2_video.tqdm, disable=True)

#: Parameters of this branch beyond the seed generator's (sam2_models.AMG_DEFAULTS), with their defaults.
SPECTRAL_DEFAULTS: dict[str, Any] = {"stride": 2, "vote": 0.5, "nms_thresh": 0.7, "max_objects": 32}
#: Normalisation SAM2 applies to every input image (ImageNet mean and std).
IMG_MEAN = (0.485, 0.456, 0.406)
IMG_STD = (0.229, 0.224, 0.225)


class InMemoryVideoPredictor(SAM2VideoPredictor):
    """SAM2's video predictor fed with in-memory uint8 frames instead of a JPEG folder or an mp4."""

    def load_frames(self, frames: Sequence[np.ndarray]) -> tuple[torch.Tensor, int, int]:
        """(N, 3, S, S) normalised float tensor and the frames' height and width, resized as SAM2Transforms
        resizes a single image (bilinear, antialiased), so the seed frame looks the same to both predictors."""
        if not frames:
            raise ValueError("a video needs at least one frame")
        height, width = frames[0].shape[:2]
        if any(f.dtype != np.uint8 or f.shape != (height, width, 3) for f in frames):
            raise ValueError(f"frames must all be uint8 ({height}, {width}, 3)")
        video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0
        video = F.interpolate(video, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        mean = torch.tensor(IMG_MEAN)[:, None, None]
        std = torch.tensor(IMG_STD)[:, None, None]
        return (video - mean) / std, height, width

    @torch.inference_mode()
    def init_state(self, frames: Sequence[np.ndarray], offload_video_to_cpu: bool = False,
                   offload_state_to_cpu: bool = False) -> dict[str, Any]:
        """sam2's ``init_state`` with ``load_frames`` in place of its file loader (same state, key for key)."""
        compute_device = self.device
        images, video_height, video_width = self.load_frames(frames)
        if not offload_video_to_cpu:
            images = images.to(compute_device)
        storage_device = torch.device("cpu") if offload_state_to_cpu else compute_device
        state: dict[str, Any] = {
            "images": images, "num_frames": len(images), "offload_video_to_cpu": offload_video_to_cpu,
            "offload_state_to_cpu": offload_state_to_cpu, "video_height": video_height, "video_width": video_width,
            "device": compute_device, "storage_device": storage_device, "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {}, "cached_features": {}, "constants": {}, "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(), "obj_ids": [], "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {}, "frames_tracked_per_obj": {},
        }
        self._get_image_feature(state, frame_idx=0, batch_size=1)  # warm up on frame 0, as sam2 does
        return state


class SpectralLabeler(Labeler):
    """SAM2 video tracking along the spectrum, consolidated per object and NMS-ed (see the module docstring).

    ``model_config`` as for the spatial branch; ``params``: the seed generator's (sam2_models.AMG_DEFAULTS) plus
    SPECTRAL_DEFAULTS (stride in bands, vote fraction, NMS IoU threshold, maximum number of seed objects).
    """

    branch = "spectral"
    stage_version = "1"

    def __init__(self, model_config: dict[str, Any], checkpoint: str | Path | None, params: dict[str, Any],
                 device: str | None = None) -> None:
        config, size = model_spec(model_config)
        super().__init__({"config": config, "image_size": size}, checkpoint, amg_params(params, SPECTRAL_DEFAULTS))
        if not 0.0 <= self.params["vote"] < 1.0:
            raise ValueError(f"parameter 'vote' must be in [0, 1), got {self.params['vote']}")
        if not 0.0 < self.params["nms_thresh"] <= 1.0:
            raise ValueError(f"parameter 'nms_thresh' must be in (0, 1], got {self.params['nms_thresh']}")
        if not isinstance(self.params["max_objects"], int) or self.params["max_objects"] < 1:
            raise ValueError(f"parameter 'max_objects' must be a positive integer, got {self.params['max_objects']}")
        self.device = device or default_device()
        self._models: tuple[InMemoryVideoPredictor, SAM2AutomaticMaskGenerator] | None = None

    @property
    def models(self) -> tuple[InMemoryVideoPredictor, SAM2AutomaticMaskGenerator]:
        """The video predictor and the seed generator on the same weights, built on first use."""
        if self._models is None:
            predictor = build_sam2_model(self.model_config["config"], self.checkpoint, self.device,
                                         self.model_config["image_size"], video_class=InMemoryVideoPredictor)
            self._models = cast(InMemoryVideoPredictor, predictor), mask_generator(predictor, self.params)
        return self._models

    def label(self, sample: ImageSample) -> MaskSet:
        """Track seed masks through the spectral sequence and consolidate them into one mask set."""
        frames = spectral_sequence(sample.cube, sample.wavelengths, self.params["stride"])
        predictor, generator = self.models
        seed_frame = len(frames) // 2
        seeds, iou, stability = automatic_masks(generator, frames[seed_frame].rgb,
                                                self.params["min_mask_region_area"])
        seeds, iou, stability = (a[: self.params["max_objects"]] for a in (seeds, iou, stability))
        height, width = sample.cube.shape[1:]
        attrs = {"seed_frame": seed_frame, "frames": [list(f.bands) for f in frames],
                 "random_init": self.random_init}
        if not len(seeds):
            empty = np.zeros((0, height, width), bool)
            return MaskSet(empty, table_from_masks(empty, self.branch, frames_present=np.zeros(0, np.int64)),
                           labeler_id=self.labeler_id, attrs=attrs)
        counts, present = self.track(predictor, [f.rgb for f in frames], seed_frame, seeds)
        masks = counts > self.params["vote"] * len(frames)
        keep = mask_nms(masks, iou, self.params["nms_thresh"])
        table = table_from_masks(masks[keep], self.branch, score=iou[keep], predicted_iou=iou[keep],
                                 stability=stability[keep], frames_present=present[keep])
        return MaskSet(masks[keep], table, labeler_id=self.labeler_id, attrs=attrs)

    @staticmethod
    def track(predictor: InMemoryVideoPredictor, frames: list[np.ndarray], seed_frame: int,
              seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Propagate each seed mask from ``seed_frame`` through all frames; returns per object the number of
        frames covering each pixel (n, y, x) and the number of frames where it is present (n,)."""
        state = predictor.init_state(frames)
        for obj_id, seed in enumerate(seeds):
            predictor.add_new_mask(state, seed_frame, obj_id, seed)
        counts = np.zeros(seeds.shape, np.uint16)
        present = np.zeros(len(seeds), np.int64)
        for reverse in (False, True):
            for frame_idx, _, logits in predictor.propagate_in_video(state, start_frame_idx=seed_frame,
                                                                     reverse=reverse):
                if reverse and frame_idx == seed_frame:
                    continue  # the seed frame was counted going forward
                per_object = (logits[:, 0] > 0).cpu().numpy()
                counts += per_object
                present += per_object.any(axis=(1, 2))
        return counts, present
