"""What the whole-image tasks share: their splits as samples of cached features (computed where the cache lacks
them) and the images their report's examples show."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from catalog.catalog import Catalog
from stages.downstream.data import CatalogSamples, SampleBuilder, split_images
from stages.downstream.features import Backbone, compute_features
from stages.downstream.spec import TaskData, TaskSpec


def image_task_data(catalog: Catalog, backbone: Backbone, spec: TaskSpec, with_train: bool,
                    on_progress: Callable[[int], None] | None, *, kind: str, build: SampleBuilder,
                    train_ids_always: bool = False) -> TaskData:
    """A whole-image task's splits: features of the images read (the test split, and the train split when
    `with_train`) computed where the cache lacks them, samples built by `build`. `train_ids_always` lists the train
    ids also without training (a baseline that fits on them)."""
    test_ids = split_images(catalog, spec.dataset, spec.test_split)
    train_ids = split_images(catalog, spec.dataset, spec.train_split) if with_train or train_ids_always else []
    compute_features(catalog, backbone, test_ids + (train_ids if with_train else []), on_progress=on_progress)
    test = CatalogSamples(catalog, backbone.set_id, test_ids, spec.variant, kind=kind, build=build)
    train = CatalogSamples(catalog, backbone.set_id, train_ids, spec.variant, kind=kind, build=build) \
        if with_train else None
    return TaskData(spec, train, test, train_ids, test_ids, test.info)


def display_rgb(catalog: Catalog, image_id: str, cube_hwc: np.ndarray, wavelengths: np.ndarray) -> np.ndarray:
    """An image to show: the aligned RGB or a false colour (stages.labelling.falsecolor), in [0, 1]."""
    from stages.labelling.falsecolor import percentile_stretch, to_rgb

    try:
        rgb, _ = to_rgb(cube_hwc.transpose(2, 0, 1), wavelengths, catalog.rgb(image_id))
    except ValueError:  # too few bands for a false colour: the band mean in grey
        grey = percentile_stretch(cube_hwc.astype(np.float64).mean(axis=-1))
        rgb = np.repeat(grey[..., None], 3, axis=-1)
    return rgb.astype(np.float64) / 255.0


def image_wavelengths(catalog: Catalog, image_id: str) -> np.ndarray:
    """The band centres (nm) of a catalogued image."""
    return np.asarray(catalog.open(image_id)["wavelength"].values, dtype=np.float64)
