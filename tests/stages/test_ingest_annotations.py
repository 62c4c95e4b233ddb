"""Labelled downstream datasets through ingest: every label, split and sequence comes back as the fixtures wrote
it; evaluation images stay out of pretraining; bad labels are quarantined with file, field and fix and never
damage what is stored; an unchanged image is skipped and a changed split rewrites only its row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from base.errors import CatalogError
from catalog.catalog import Catalog
from catalog.fixtures import write_dataset
from catalog.fixtures.base import FixtureImage
from catalog.specs import spec_for_folder
from stages.ingest import FileResult, IngestConfig, ingest_item, plan, run_ingest
from stages.ingest.discover import item_for
from stages.labelling.label import image_ids

SEGMENTATION = ("hsi-drive-v2-0", "hyperspectral-city-v2", "my-lab-labels")
TRACKING = ("hot-2023-vis", "hot-2023-nir", "hot-2023-rednir")


def _run(source: Path, catalog: Catalog, datasets: list[str] | None = None) -> list[FileResult]:
    return run_ingest(catalog, IngestConfig(source_root=str(source), datasets=datasets)).files


def test_label_maps_splits_and_roles_round_trip(ingested_sources: tuple[Catalog, dict, list],
                                                fixture_sources: tuple[Path, dict]) -> None:
    cat, truth, _ = ingested_sources
    index = cat.images().set_index("image_id")
    for slug in (*SEGMENTATION, "hssod"):
        spec = spec_for_folder(fixture_sources[0] / slug)
        assert spec is not None and spec.labels is not None
        for fx in truth[slug]:
            image_id = f"{slug}/{fx.key}"
            row = index.loc[image_id]
            assert (row["split"] if isinstance(row["split"], str) else None) == fx.split, image_id
            assert bool(row["pretraining"]) == fx.pretraining, image_id
            if fx.label is None:  # Hyperspectral City's unlabelled test image: stored, unlabelled, no split
                assert pd.isna(row["label_kind"])
                with pytest.raises(KeyError, match=image_id):
                    cat.annotation(image_id)
                continue
            got = cat.annotation(image_id)
            assert got.kind == spec.labels.kind and got.image_id == image_id
            assert got.array.shape == fx.cube.shape[1:] and got.array.dtype.kind == "u"
            np.testing.assert_array_equal(got.array, fx.label, err_msg=image_id)
            assert got.class_names == spec.labels.names() and got.ignore_index == spec.labels.ignore_index
            assert Path(got.source_path).is_file()
    assert cat.verify().healthy


def test_sequences_round_trip_with_0_based_boxes(ingested_sources: tuple[Catalog, dict, list]) -> None:
    cat, truth, _ = ingested_sources
    for slug in TRACKING:
        frames: dict[str, list[FixtureImage]] = {}
        for fx in truth[slug]:
            frames.setdefault(str(fx.sequence), []).append(fx)
        assert cat.sequences(slug) == sorted(frames)
        for seq_id, expected in frames.items():
            seq = cat.sequence(seq_id)
            expected.sort(key=lambda fx: int(fx.frame_index or 0))
            assert seq.frames == [f"{slug}/{fx.key}" for fx in expected] and len(seq) == len(expected)
            assert seq.boxes.dtype == np.float32 and seq.boxes.shape == (len(expected), 4)
            np.testing.assert_array_equal(seq.boxes, [fx.box for fx in expected])  # file 1-based, stored 0-based
            assert seq.split == expected[0].split and seq.dataset == slug
            assert seq.source_path.endswith("groundtruth_rect.txt")
            x, y, w, h = seq.boxes[-1]
            assert x >= 0 and y >= 0 and x + w <= 32 and y + h <= 24  # inside the stored 24x32 cube
            assert abs(seq.boxes[-1][0] - seq.boxes[0][0]) >= 5  # the target moves across the frame
        row = cat.images().set_index("image_id").loc[f"{slug}/{expected[2].key}"]
        assert row["sequence_id"] == expected[2].sequence and row["frame_index"] == 2 and row["label_kind"] == "track"
        with pytest.raises(KeyError, match="sequence"):
            cat.annotation(f"{slug}/{expected[2].key}")
    assert cat.sequences("hot-2023-vis", split="test") == ["hot-2023-vis/validation/HSI-VIS/kite"]
    with pytest.raises(KeyError, match="no sequence"):
        cat.sequence("hot-2023-vis/validation/HSI-VIS/nothing")


def test_labelled_images_per_split(ingested_sources: tuple[Catalog, dict, list]) -> None:
    cat, truth, _ = ingested_sources
    counts = {split: len(cat.annotated("hsi-drive-v2-0", split)) for split in ("train", "val", "test")}
    assert counts == {"train": 6, "val": 3, "test": 3}
    assert len(cat.annotated("hyperspectral-city-v2")) == 12 == len(truth["hyperspectral-city-v2"]) - 1
    assert [len(cat.annotated("hssod", s)) for s in ("train", "test")] == [10, 2]  # 0.8 / 0.2 in name order
    assert cat.annotated("hssod", "test") == ["hssod/hyperspectral/0011", "hssod/hyperspectral/0012"]
    assert cat.annotated("cave") == []


def test_hs3bench_variant_folds_water_into_unlabelled(ingested_sources: tuple[Catalog, dict, list]) -> None:
    cat, truth, _ = ingested_sources
    fx = next(f for f in truth["hsi-drive-v2-0"] if f.label is not None and (f.label == 8).any())
    image_id = f"hsi-drive-v2-0/{fx.key}"
    full, hs3 = cat.annotation(image_id), cat.annotation(image_id, variant="hs3bench")
    assert len(full.class_names) == 11 and len(hs3.class_names) == 10 and "water" not in hs3.class_names
    assert hs3.ignore_index == 0 and hs3.variant == "hs3bench"
    np.testing.assert_array_equal(hs3.array[full.array == 8], 0)
    np.testing.assert_array_equal(hs3.array[full.array == 10], 9)  # glass moves down one place
    assert hs3.class_names[9] == "glass"
    with pytest.raises(KeyError, match="hs3bench"):
        cat.annotation(image_id, variant="no-such-variant")


def test_evaluation_images_stay_out_of_pretraining(ingested_sources: tuple[Catalog, dict, list]) -> None:
    cat, truth, _ = ingested_sources
    ids = set(image_ids(cat))  # what the labelling stage (and so pretraining) sees
    for slug in (*SEGMENTATION, "hssod", *TRACKING):
        for fx in truth[slug]:
            assert (f"{slug}/{fx.key}" in ids) == fx.pretraining, fx.key
    assert all(f"hot-2024-vis/{fx.key}" in ids for fx in truth["hot-2024-vis"])


def test_fixture_structure_is_learnable(ingested_sources: tuple[Catalog, dict, list]) -> None:
    """Per-pixel spectra are ambiguous, neighbourhoods are not: nearest class mean on 3x3-averaged spectra beats
    the same classifier on single pixels by a wide margin (what a head with spatial context can exploit)."""
    from scipy.ndimage import uniform_filter

    _, truth, _ = ingested_sources
    images = [fx for fx in truth["hsi-drive-v2-0"] if fx.label is not None]
    def pixels(fx: FixtureImage, smooth: bool) -> tuple[np.ndarray, np.ndarray]:
        cube = np.stack([uniform_filter(b, 3, mode="nearest") for b in fx.cube]) if smooth else fx.cube
        keep = fx.label != 0
        return cube[:, keep].T, fx.label[keep]
    train = [pixels(fx, False) for fx in images[:6]]
    x, y = np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in classes])
    accuracy = {}
    for smooth in (False, True):
        test = [pixels(fx, smooth) for fx in images[6:]]
        xt, yt = np.concatenate([t[0] for t in test]), np.concatenate([t[1] for t in test])
        predicted = classes[np.argmin(((xt[:, None] - means[None]) ** 2).sum(-1), axis=1)]
        accuracy[smooth] = float((predicted == yt).mean())
    assert accuracy[False] < 0.6 and accuracy[True] > accuracy[False] + 0.2, accuracy


@pytest.fixture()
def small(tmp_path: Path) -> tuple[Path, Catalog, dict[str, list[FixtureImage]]]:
    """HSI Drive and HOT-2023 NIR ingested into a fresh catalog (tests here change their sources)."""
    src = tmp_path / "src"
    truth = {slug: write_dataset(slug, src) for slug in ("hsi-drive-v2-0", "hot-2023-nir")}
    cat = Catalog(tmp_path / "cat").init()
    assert {r.status for r in _run(src, cat)} == {"ingested"}
    return src, cat, truth


def test_bad_labels_are_quarantined_and_stored_labels_stay_intact(
        small: tuple[Path, Catalog, dict[str, list[FixtureImage]]]) -> None:
    src, cat, truth = small
    drive = src / "hsi-drive-v2-0"
    before = {i: cat.annotation(i).array for i in cat.annotated("hsi-drive-v2-0")}
    sequence_before = cat.sequence("hot-2023-nir/training/HSI-NIR/duck").boxes
    rows_before = len(cat.images())
    labelled = [fx for fx in truth["hsi-drive-v2-0"]]
    label_path = {fx.key: drive / "annotations" / fx.key.split("/")[1] / f"{Path(fx.key).name}.png"
                  for fx in labelled}
    # 1. a label map of another size, 2. one stored x-by-y, 3. an unknown class id, 4. a missing label file
    small_map, tall_map, unknown, missing = (fx.key for fx in labelled[:4])
    Image.fromarray(np.zeros((31, 48), np.uint8), mode="L").save(label_path[small_map])
    Image.fromarray(np.zeros((48, 32), np.uint8), mode="L").save(label_path[tall_map])
    bad = np.asarray(Image.open(label_path[unknown])).copy()
    bad[3, 4] = 42
    Image.fromarray(bad, mode="L").save(label_path[unknown])
    label_path[missing].unlink()
    # 5. a box count that differs from the frame count, 6. a box outside the frame
    duck = src / "hot-2023-nir" / "training" / "HSI-NIR" / "duck" / "groundtruth_rect.txt"
    duck.write_text("\n".join(duck.read_text().splitlines()[:-1]) + "\n")
    toy = src / "hot-2023-nir" / "validation" / "HSI-NIR" / "toy" / "groundtruth_rect.txt"
    lines = toy.read_text().splitlines()
    lines[4] = "30,20,5,5"  # 1-based: x 29..33 of a 32-pixel-wide frame
    toy.write_text("\n".join(lines) + "\n")

    results = _run(src, cat)
    statuses = {r.source_path: r.status for r in results}
    assert sum(s == "quarantined" for s in statuses.values()) == 4 + 10 + 10
    q = cat.quarantine().set_index("source_path")
    expect = {str(label_path[small_map]): ("labels.shape", "labels.files"),
              str(label_path[tall_map]): ("labels.shape", "transpose"),
              str(label_path[unknown]): ("labels.class_names", "class_names"),
              str(drive / f"{missing}.npy"): ("labels.files", "labels.files"),
              str(duck): ("labels.boxes", "one 'x y w h' line per frame"),
              str(toy): ("labels.boxes", "clip_boxes")}
    assert set(q.index) == set(expect)
    for path, (field, fix_word) in expect.items():
        assert q.loc[path, "field"] == field and fix_word in q.loc[path, "fix"], (path, q.loc[path].to_dict())
    assert "42" in q.loc[str(label_path[unknown]), "message"] and "line 5" in q.loc[str(toy), "message"]

    # what was stored is untouched: rows, label maps and sequences as before
    assert len(cat.images()) == rows_before and cat.verify().healthy
    for image_id, array in before.items():
        np.testing.assert_array_equal(cat.annotation(image_id).array, array)
    np.testing.assert_array_equal(cat.sequence("hot-2023-nir/training/HSI-NIR/duck").boxes, sequence_before)


def test_fresh_bad_sequence_never_enters_and_partial_ones_are_not_served(tmp_path: Path) -> None:
    src = tmp_path / "src"
    truth = write_dataset("hot-2023-rednir", src)
    card = src / "hot-2023-rednir" / "training" / "HSI-RedNIR" / "card" / "groundtruth_rect.txt"
    card.write_text(card.read_text() + "1 1 4 4\n")
    cat = Catalog(tmp_path / "cat").init()
    work = plan(src, cat)
    cup = [w for w in work.items if "/cup/" in w.primary]
    for w in work.items[:-1]:  # every frame but the last of 'cup'
        spec = spec_for_folder(Path(w.folder))
        assert spec is not None
        ingest_item(cat, spec, item_for(Path(w.folder), spec, w.primary))
    assert cat.sequences() == []  # card: quarantined; cup: one frame short
    with pytest.raises(KeyError):
        cat.sequence("hot-2023-rednir/training/HSI-RedNIR/card")
    with pytest.raises(CatalogError, match="9 of 10 frames"):
        cat.sequence("hot-2023-rednir/validation/HSI-RedNIR/cup")
    spec = spec_for_folder(Path(cup[-1].folder))
    assert spec is not None
    ingest_item(cat, spec, item_for(Path(cup[-1].folder), spec, cup[-1].primary))
    assert cat.sequences() == ["hot-2023-rednir/validation/HSI-RedNIR/cup"]
    assert len(cat.sequence("hot-2023-rednir/validation/HSI-RedNIR/cup")) == 10 == len(truth) // 2


def test_unchanged_images_are_skipped_and_a_split_change_rewrites_only_rows(
        small: tuple[Path, Catalog, dict[str, list[FixtureImage]]]) -> None:
    src, cat, _ = small
    assert {r.status for r in _run(src, cat)} == {"skipped"}
    cubes = sorted(p.name for p in Path(cat.root, "cubes").rglob("*.zarr"))
    drive = src / "hsi-drive-v2-0"
    moved, *rest = (drive / "validation_filenames.txt").read_text().split()
    (drive / "validation_filenames.txt").write_text("".join(f"{n}\n" for n in rest))
    with open(drive / "training_filenames.txt", "a") as fh:
        fh.write(f"{moved}\n")
    results = _run(src, cat)
    changed = [r for r in results if r.status == "ingested"]
    assert [r.image_id for r in changed] == [f"hsi-drive-v2-0/images/validation/{moved}_TC"]
    assert sorted(p.name for p in Path(cat.root, "cubes").rglob("*.zarr")) == cubes  # the cube is re-used
    row = cat.images().set_index("image_id").loc[changed[0].image_id]
    assert row["split"] == "train" and bool(row["pretraining"])
    assert len(cat.annotated("hsi-drive-v2-0", "train")) == 7
    report = cat.verify()
    assert report.healthy and len(report.orphans) == 1  # the label group of the old split assignment


def test_missing_split_list_is_quarantined_with_its_path(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_dataset("hsi-drive-v2-0", src)
    (src / "hsi-drive-v2-0" / "test_filenames.txt").unlink()
    cat = Catalog(tmp_path / "cat").init()
    results = _run(src, cat)
    assert {r.status for r in results} == {"quarantined"}
    q = cat.quarantine()
    assert list(q["source_path"]) == [str(src / "hsi-drive-v2-0" / "test_filenames.txt")]
    assert q.iloc[0]["field"] == "splits.lists.test" and "list" in q.iloc[0]["fix"]


def test_label_dtype_and_ids_of_a_user_dataset(ingested_sources: tuple[Catalog, dict, list]) -> None:
    cat, truth, _ = ingested_sources
    fx = truth["my-lab-labels"][0]
    got = cat.annotation(f"my-lab-labels/{fx.key}")  # from masks/<stem>.mat, key 'gt', declared in dataset.yaml
    assert got.array.dtype == np.uint8 and set(np.unique(got.array)) <= {0, 1, 2, 255}
    assert got.source_path.endswith(".mat") and got.num_classes == 3
