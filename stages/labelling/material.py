"""Material branch of pseudo-labelling: HyperFree automatic masks on the full hyperspectral cube.

Three layers, as segment-anything separates them:

- `HyperFreePredictor`: SAM's `SamPredictor` driven by the channel-adaptive HyperFree model. `set_image` takes the
  cube (H, W, C), its wavelengths (nm) and GSD (m/pixel), prepares it under a preprocessing contract
  (`model.preprocess.prepare`) and encodes it with the wavelength-matched patch embedding; `predict` /
  `predict_torch` are SAM's, on HyperFree's prompt encoder and mask decoder.
- `hyperfree_automatic_masks`: SAM's `SamAutomaticMaskGenerator` with that predictor and the Seg-Any-HSI defaults.
- `MaterialLabeler`: the "material" branch of the labeler contract (stages.labelling.labeler).

Input scaling is the labeler parameter ``preprocessing`` (a `model.preprocess` contract, recorded in the labeler
id). The default, ``released``, is the HyperVision release's: a per-image float min-max to [0, 255] before the
predictor divides by the maximum, so a sensor's dark offset does not compress the signal and one scene stored as
reflectance or as digital numbers is labelled alike. ``crop_max`` is HyperFree's own automatic-segmentation script
(Seg_Any_HSI.py, whose AMG defaults are used here): the raw cube divided by its maximum, the GSD rescaled to the
resized image. (HyperFree's *task* demos min-max to uint8 only when the max is <= 500; neither contract copies
that units-dependent switch or its 8-bit quantisation.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from catalog.masks import MaskSet, table_from_masks
from model import HyperFree, LoadReport, create_model, get_config, load_checkpoint
from model.preprocess import DEFAULT_CONTRACT, check_contract, describe, extract_features, prepare
from model.spectral import match_bands
from stages.labelling.labeler import ImageSample, Labeler

logger = logging.getLogger(__name__)

DEFAULT_GSD_M = 0.456
"""GSD (m/pixel) used when an image's GSD is unknown: the value of HyperFree's automatic-segmentation example
(Seg_Any_HSI.py, WHU-Hi-LongKou). The HyperFree checkpoint was trained on remote-sensing scenes, so a GSD of that
order keeps its scale-aware position embedding in distribution for scenes of unknown scale; override it with the
labeler parameter ``default_gsd_m`` (stages.pretraining.data uses HyperVision's 0.01 for its own student)."""

AMG_DEFAULTS: dict[str, Any] = {
    # Seg_Any_HSI.py
    "points_per_side": 32,
    "pred_iou_thresh": 0.6,
    "stability_score_thresh": 0.6,
    # segment_anything.SamAutomaticMaskGenerator's own defaults
    "points_per_batch": 64,
    "stability_score_offset": 1.0,
    "box_nms_thresh": 0.7,
    "crop_n_layers": 0,
    "crop_nms_thresh": 0.7,
    "crop_overlap_ratio": 512 / 1500,
    "crop_n_points_downscale_factor": 1,
    "min_mask_region_area": 0,
}
"""Automatic-mask-generator parameters of the material branch (every key may be overridden)."""

LABELER_DEFAULTS: dict[str, Any] = {
    **AMG_DEFAULTS,
    "default_gsd_m": DEFAULT_GSD_M,
    "init_seed": 0,
    "preprocessing": DEFAULT_CONTRACT,
}
"""Labeler parameters: the AMG's, the GSD assumed when unknown, the seed of random-init weights (so that one
random-init labeler id always means the same weights) and the preprocessing contract (model.preprocess)."""


class HyperFreePredictor(SamPredictor):
    """SAM's predictor for HyperFree: embeds a hyperspectral cube with its wavelengths and GSD, then answers
    point / box / mask prompts exactly as `SamPredictor.predict` and `predict_torch` do.

    SAM's automatic mask generator calls ``set_image(crop)`` with no spectral arguments; inside
    ``with predictor.sensor(wavelengths_nm, gsd_m):`` those come from the sensor.
    """

    model: HyperFree

    def __init__(self, model: HyperFree, contract: str = DEFAULT_CONTRACT) -> None:
        super().__init__(model)
        self.contract = check_contract(contract)
        self._sensor: tuple[np.ndarray, float] | None = None

    @contextmanager
    def sensor(self, wavelengths_nm: Sequence[float] | np.ndarray, gsd_m: float) -> Iterator[None]:
        """Wavelengths (nm) and GSD (m/pixel of the given image) for `set_image` calls that omit them."""
        previous = self._sensor
        self._sensor = (np.asarray(wavelengths_nm, dtype=np.float64), float(gsd_m))
        try:
            yield
        finally:
            self._sensor = previous

    @torch.no_grad()
    def set_image(  # type: ignore[override]  # a cube with wavelengths and GSD, not an RGB image with a format
        self,
        image: np.ndarray | torch.Tensor,
        wavelengths_nm: Sequence[float] | np.ndarray | None = None,
        gsd_m: float | None = None,
    ) -> None:
        """Compute the image embedding of a cube (H, W, C), any numeric dtype, prepared under the predictor's
        contract.

        `gsd_m` is the GSD of `image` as given; the encoder receives it as the contract says (as given under
        ``released``; rescaled to the resized image under ``crop_max``, where an AMG crop gets its own effective
        GSD, while HyperFree's generator reuses the whole image's: they differ only when crop_n_layers > 0).
        """
        if wavelengths_nm is None or gsd_m is None:
            if self._sensor is None:
                raise ValueError(
                    "HyperFreePredictor.set_image needs the cube's wavelengths (nm) and GSD (m/pixel): pass "
                    "them, or call it inside `with predictor.sensor(wavelengths_nm, gsd_m):`."
                )
            wavelengths_nm = self._sensor[0] if wavelengths_nm is None else wavelengths_nm
            gsd_m = self._sensor[1] if gsd_m is None else gsd_m
        enc = self.model.image_encoder
        prepared = prepare(image, enc.img_size, self.contract, device=self.device)
        gsd = prepared.effective_gsd(gsd_m)
        self.reset_image()
        self.original_size = prepared.original_size
        self.input_size = prepared.input_size
        weights_dtype = enc.point_spectral_weight_bank_w.dtype
        self.features = enc.forward_features(prepared.image.to(weights_dtype), wavelengths_nm, gsd)
        self.is_image_set = True

    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """Not available: SAM's RGB path has no wavelengths; HyperFree embeds through `set_image`."""
        raise NotImplementedError(
            "HyperFreePredictor embeds cubes with their wavelengths: call set_image(cube_hwc, wavelengths_nm, gsd_m)."
        )


class HyperFreeAutomaticMaskGenerator(SamAutomaticMaskGenerator):
    """SAM's automatic mask generator on a `HyperFreePredictor`: `generate` takes the cube, wavelengths and GSD."""

    predictor: HyperFreePredictor

    def __init__(self, model: HyperFree, contract: str = DEFAULT_CONTRACT, **amg_params: Any) -> None:
        params = {**AMG_DEFAULTS, **amg_params}
        if params["min_mask_region_area"] > 0:
            try:
                import cv2  # noqa: F401  # SAM's small-region clean-up needs OpenCV
            except ModuleNotFoundError as exc:
                raise ModuleNotFoundError(
                    f"min_mask_region_area={params['min_mask_region_area']} needs OpenCV (cv2), which is not "
                    "installed: install opencv-python-headless or set min_mask_region_area to 0."
                ) from exc
        super().__init__(model, output_mode="binary_mask", **params)  # type: ignore[arg-type]
        self.predictor = HyperFreePredictor(model, contract)

    @torch.no_grad()
    def generate(  # type: ignore[override]  # the cube needs its wavelengths and GSD
        self, image: np.ndarray, wavelengths_nm: Sequence[float] | np.ndarray, gsd_m: float
    ) -> list[dict[str, Any]]:
        """SAM's mask records (segmentation (H, W) bool, predicted_iou, stability_score, point_coords, ...)."""
        with self.predictor.sensor(wavelengths_nm, gsd_m):
            return super().generate(image)


def hyperfree_automatic_masks(
    model: HyperFree,
    cube_hwc: np.ndarray,
    wavelengths: Sequence[float] | np.ndarray,
    gsd: float,
    contract: str = DEFAULT_CONTRACT,
    **amg_params: Any,
) -> list[dict[str, Any]]:
    """HyperFree automatic masks of one cube (H, W, C), as Seg_Any_HSI: SAM's AMG records at the cube's size.

    Defaults: `AMG_DEFAULTS` (points_per_side 32, pred_iou_thresh 0.6, stability_score_thresh 0.6, SAM's others);
    `gsd` is the cube's GSD in m/pixel; `contract` the preprocessing (model.preprocess).
    """
    return HyperFreeAutomaticMaskGenerator(model, contract, **amg_params).generate(cube_hwc, wavelengths, gsd)


def _checked_cube_hwc(sample: ImageSample) -> np.ndarray:
    """The sample's cube as an (H, W, C) view, after checking it holds no NaN or Inf."""
    cube = np.asarray(sample.cube)
    if cube.ndim != 3:
        raise ValueError(f"image {sample.image_id!r}: expected a (band, y, x) cube, got shape {cube.shape}.")
    if np.issubdtype(cube.dtype, np.floating):
        finite = np.isfinite(cube)
        if not finite.all():
            nan = int(np.isnan(cube).sum())
            bad_bands = np.flatnonzero(~finite.all(axis=(1, 2))).tolist()
            raise ValueError(
                f"image {sample.image_id!r}: the cube holds {nan} NaN and {int((~finite).sum()) - nan} Inf values "
                f"(bands {bad_bands[:10]}{' ...' if len(bad_bands) > 10 else ''}); HyperFree divides by the global "
                "max, so fill or drop them in the reader (or quarantine the file) before labelling."
            )
    return np.moveaxis(cube, 0, -1)


def _sample_gsd(sample: ImageSample, default_gsd_m: float) -> tuple[float, str]:
    """The sample's GSD (m/pixel) and where it came from ("sample" or "default")."""
    if sample.gsd_m is not None and float(sample.gsd_m) > 0:
        return float(sample.gsd_m), "sample"
    return float(default_gsd_m), "default"


def material_features(
    model: HyperFree, sample: ImageSample, default_gsd_m: float = DEFAULT_GSD_M, contract: str = DEFAULT_CONTRACT
) -> list[torch.Tensor]:
    """Multi-stage features of one catalogued image (the released feature-extraction use), any registered layout.

    Returns `model.preprocess.extract_features` under `contract`: the selected block outputs (1, D, h, w), then the
    neck (1, out_chans, h, w). The GSD is the sample's, else `default_gsd_m`.
    """
    gsd, _ = _sample_gsd(sample, default_gsd_m)
    try:
        return extract_features(model, _checked_cube_hwc(sample), sample.wavelengths, gsd, contract)
    except ValueError as exc:
        raise ValueError(f"image {sample.image_id!r}: {exc}") from exc


class MaterialLabeler(Labeler):
    """The material branch: HyperFree automatic masks on the full cube.

    `model_config` = {"model": any registry name ("hyperfree_b" for HyperFree-b weights, a "hypervision_*" layout
    for released HyperVision weights, "tiny" for tests), optionally "strict": false, plus create_model overrides};
    `checkpoint` = a .pth/.pt/.safetensors state_dict of that layout, loaded strictly unless "strict" is false, or
    None (random-init, seeded by ``init_seed``); `params` = `LABELER_DEFAULTS` overrides (``preprocessing`` names
    the contract). The table's ``score`` is the model's predicted IoU (SAM's own quality estimate, which fusion
    ranks by); ``stability`` is SAM's stability score.
    """

    branch = "material"
    stage_version = "1"

    def __init__(
        self,
        model_config: dict[str, Any],
        checkpoint: str | Path | None,
        params: dict[str, Any],
        *,
        device: str | torch.device | None = None,
    ) -> None:
        unknown = sorted(set(params) - set(LABELER_DEFAULTS))
        if unknown:
            raise ValueError(
                f"Unknown material labeler parameter(s) {unknown}; valid: {sorted(LABELER_DEFAULTS)}."
            )
        if "model" not in model_config:
            raise ValueError(
                f"material model_config {model_config} lacks 'model': give a registry name, e.g. "
                "{'model': 'hyperfree_b'} for HyperFree-b (or 'tiny' for tests)."
            )
        super().__init__(model_config, checkpoint, {**LABELER_DEFAULTS, **params})
        check_contract(self.params["preprocessing"])
        overrides = {k: v for k, v in self.model_config.items() if k not in ("model", "strict")}
        self.resolved_config = get_config(self.model_config["model"], **overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.params["init_seed"]))
            model = create_model(self.model_config["model"], **overrides)
        self.load_report: LoadReport | None = None
        if self.checkpoint is not None:
            self.load_report = load_checkpoint(model, self.checkpoint,
                                               strict=bool(self.model_config.get("strict", True)))
            self._log_load(self.load_report)
        else:
            logger.warning(
                "material labeler: no HyperFree checkpoint configured; masks come from random-init weights "
                "and are marked random-init."
            )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.eval().to(device)
        amg_params = {k: v for k, v in self.params.items() if k in AMG_DEFAULTS}
        self.generator = HyperFreeAutomaticMaskGenerator(self.model, self.params["preprocessing"], **amg_params)

    @staticmethod
    def _log_load(report: LoadReport) -> None:
        """One summary line per load: how many keys loaded and which did not load as stored."""
        summary = (
            f"material labeler: loaded {report.loaded} tensors from {report.source}; "
            f"{len(report.missing)} missing, {len(report.unexpected)} unexpected, "
            f"{len(report.mismatched)} mismatched, {len(report.resized)} resized keys"
        )
        if report.is_exact:
            logger.info(summary)
        else:
            logger.warning(
                "%s (missing: %s; unexpected: %s; mismatched: %s)",
                summary, list(report.missing), list(report.unexpected), list(report.mismatched),
            )

    def descriptor(self) -> dict[str, Any]:
        """The base descriptor plus the resolved model config, the preprocessing contract and what the checkpoint
        load did."""
        out = super().descriptor()
        out["resolved_model_config"] = self.resolved_config.to_dict()
        out["preprocessing"] = describe(self.params["preprocessing"])
        if self.load_report is not None:
            r = self.load_report
            out["checkpoint_load"] = {
                "loaded": r.loaded,
                "missing": len(r.missing),
                "unexpected": len(r.unexpected),
                "mismatched": len(r.mismatched),
                "resized": len(r.resized),
                "resized_keys": list(r.resized),
                "missing_keys": list(r.missing),
                "unexpected_keys": list(r.unexpected),
                "mismatched_keys": list(r.mismatched),
            }
        return out

    def label(self, sample: ImageSample) -> MaskSet:
        """HyperFree automatic masks of one image at its own size; empty masks are dropped."""
        cube_hwc = _checked_cube_hwc(sample)
        gsd, gsd_source = _sample_gsd(sample, self.params["default_gsd_m"])
        try:
            band_match = match_bands(sample.wavelengths)
            records = self.generator.generate(cube_hwc, sample.wavelengths, gsd)
        except ValueError as exc:
            raise ValueError(f"image {sample.image_id!r}: {exc}") from exc
        records = [r for r in records if r["area"] > 0]
        height, width = cube_hwc.shape[:2]
        masks = (
            np.stack([r["segmentation"] for r in records]).astype(bool)
            if records
            else np.zeros((0, height, width), dtype=bool)
        )
        iou = np.array([r["predicted_iou"] for r in records], dtype=np.float64)
        table = table_from_masks(
            masks,
            self.branch,
            score=iou,
            predicted_iou=iou,
            stability=np.array([r["stability_score"] for r in records], dtype=np.float64),
            amg_point_x=np.array([r["point_coords"][0][0] for r in records], dtype=np.float64),
            amg_point_y=np.array([r["point_coords"][0][1] for r in records], dtype=np.float64),
        )
        attrs = {
            "weights": self.weights,
            "random_init": self.random_init,
            "gsd_m": gsd,
            "gsd_source": gsd_source,
            "bands": len(band_match.wavelengths_nm),
            "bands_unused": len(band_match.unused),
            "unmatched_wavelengths_nm": list(band_match.unmatched_wavelengths_nm),
            "preprocessing": self.params["preprocessing"],
        }
        return MaskSet(masks=masks, table=table, labeler_id=self.labeler_id, attrs=attrs)
