"""Label files, label variants and the label store: readers of every label format, per-chunk checksums checked on
read, verify reporting damaged and orphan label groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import zarr
from PIL import Image

from base.errors import CatalogError, CorruptChunkError, InputError
from catalog.annotation_store import chunk_checksums, label_location, read_annotation, write_label_group
from catalog.annotations import AnnotationSpec, apply_variant, may_pretrain
from catalog.catalog import Catalog
from catalog.cubes.writer import CubeWrite
from catalog.fixtures.matlab import write_mat_v73
from catalog.readers.annotations import class_ids, read_boxes, read_label_map, saliency_mask


def seg(**kw: object) -> AnnotationSpec:
    return AnnotationSpec(**{"kind": "segmentation", "files": "x", "class_names": ["a", "b", "c"], **kw})


MAP = np.arange(20, dtype=np.uint8).reshape(4, 5) % 3


def test_png_maps_grey_palette_and_16_bit(tmp_path: Path) -> None:
    Image.fromarray(MAP, mode="L").save(tmp_path / "l.png")
    palette = Image.fromarray(MAP, mode="L").convert("P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(tmp_path / "p.png")
    Image.fromarray(MAP.astype(np.uint16) * 300).save(tmp_path / "i16.png")
    np.testing.assert_array_equal(read_label_map(tmp_path / "l.png", seg()), MAP)
    np.testing.assert_array_equal(read_label_map(tmp_path / "p.png", seg()), MAP)  # palette indices are the ids
    np.testing.assert_array_equal(read_label_map(tmp_path / "i16.png", seg()), MAP.astype(np.uint16) * 300)


def test_colour_png_is_rejected_for_classes_but_read_as_a_mask(tmp_path: Path) -> None:
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[1:3, 1:4] = (200, 30, 90)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with pytest.raises(InputError) as err:
        read_label_map(tmp_path / "c.png", seg())
    assert err.value.field == "labels.files" and "single-channel" in err.value.fix
    mask = saliency_mask(read_label_map(tmp_path / "c.png", AnnotationSpec(kind="saliency", files="x")), None)
    np.testing.assert_array_equal(mask, (rgb[..., 0] > 0).astype(np.uint8))
    grey3 = np.repeat(MAP[..., None], 3, axis=-1)
    Image.fromarray(grey3).save(tmp_path / "g.png")  # a grey map saved as RGB: equal channels collapse
    np.testing.assert_array_equal(read_label_map(tmp_path / "g.png", seg()), MAP)


@pytest.mark.parametrize(("values", "threshold", "expected"), [
    (np.array([[0, 1], [1, 0]]), None, [[0, 1], [1, 0]]),
    (np.array([[0, 255], [255, 0]]), None, [[0, 1], [1, 0]]),
    (np.array([[3, 250], [240, 12]]), None, [[0, 1], [1, 0]]),  # JPEG-compressed 0/255
    (np.array([[0, 0], [0, 0]]), None, [[0, 0], [0, 0]]),  # no salient object
    (np.array([[0, 100], [200, 0]]), 150, [[0, 0], [1, 0]]),
])
def test_saliency_threshold(values: np.ndarray, threshold: float | None, expected: list) -> None:
    np.testing.assert_array_equal(saliency_mask(values, threshold), np.asarray(expected, np.uint8))


def test_npy_npz_and_mat_keys_and_orientation(tmp_path: Path) -> None:
    np.save(tmp_path / "m.npy", MAP)
    np.savez(tmp_path / "m.npz", gt=MAP, other=np.zeros((2, 2, 2)))
    np.savez(tmp_path / "two.npz", gt=MAP, also=MAP)
    scipy.io.savemat(tmp_path / "v5.mat", {"gt": MAP, "cube": np.zeros((4, 5, 3))})
    write_mat_v73(tmp_path / "v73.mat", {"gt": MAP.astype(np.float64)})  # MATLAB order, stored reversed
    np.testing.assert_array_equal(read_label_map(tmp_path / "m.npy", seg()), MAP)
    np.testing.assert_array_equal(read_label_map(tmp_path / "m.npz", seg()), MAP)  # the only 2-D array
    np.testing.assert_array_equal(read_label_map(tmp_path / "v5.mat", seg()), MAP)
    np.testing.assert_array_equal(read_label_map(tmp_path / "v73.mat", seg()), MAP)
    np.testing.assert_array_equal(read_label_map(tmp_path / "v73.mat", seg(options={"transpose": True})), MAP.T)
    with pytest.raises(InputError) as err:
        read_label_map(tmp_path / "two.npz", seg())
    assert err.value.field == "labels.options.key" and "also" in err.value.fix
    with pytest.raises(InputError) as err:
        read_label_map(tmp_path / "v5.mat", seg(options={"key": "labels"}))
    assert err.value.field == "labels.options.key" and "gt" in err.value.fix
    (tmp_path / "bad.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    with pytest.raises(InputError) as err:
        read_label_map(tmp_path / "bad.mat", seg())
    assert err.value.field == "labels.files"
    (tmp_path / "x.xyz").write_bytes(b"")
    with pytest.raises(InputError, match="labels.format"):
        read_label_map(tmp_path / "x.xyz", seg())


def test_class_ids_accept_whole_floats_only() -> None:
    np.testing.assert_array_equal(class_ids(Path("f"), MAP.astype(np.float64)), MAP)
    with pytest.raises(InputError, match="non-integer"):
        class_ids(Path("f"), MAP + 0.5)
    with pytest.raises(InputError, match="negative"):
        class_ids(Path("f"), MAP.astype(np.int16) - 1)


@pytest.mark.parametrize("sep", ["\t", ",", " ", ", "])
def test_box_files_with_any_separator(tmp_path: Path, sep: str) -> None:
    path = tmp_path / "groundtruth_rect.txt"
    path.write_text(f"1{sep}2{sep}30{sep}40\n5.5{sep}6{sep}7{sep}8\n\n")
    np.testing.assert_array_equal(read_boxes(path), [[1, 2, 30, 40], [5.5, 6, 7, 8]])


def test_box_file_with_a_bad_line_names_it(tmp_path: Path) -> None:
    path = tmp_path / "groundtruth_rect.txt"
    path.write_text("1 2 3 4\n1 2 3\n")
    with pytest.raises(InputError) as err:
        read_boxes(path)
    assert err.value.field == "labels.boxes" and "line 2" in err.value.problem


def test_variant_folds_dropped_classes_into_the_ignore_index() -> None:
    names = ["unlabelled", "road", "water", "glass"]
    array = np.array([[0, 1, 2, 3]], np.uint8)
    out, kept, ignore = apply_variant(array, names, 0, ["water"])
    assert kept == ["unlabelled", "road", "glass"] and ignore == 0
    np.testing.assert_array_equal(out, [[0, 1, 0, 2]])
    out, kept, ignore = apply_variant(np.array([[0, 1, 2, 255]], np.uint8), ["a", "b", "c"], 255, ["b"])
    assert kept == ["a", "c"] and ignore == 255
    np.testing.assert_array_equal(out, [[0, 255, 1, 255]])


def test_may_pretrain_keeps_evaluation_images_out() -> None:
    assert may_pretrain(["pretraining"], ["train"], "test")  # a pretraining-only dataset: every image
    assert may_pretrain(["pretraining", "evaluation"], ["train"], "train")
    assert not may_pretrain(["pretraining", "evaluation"], ["train"], "test")
    assert may_pretrain(["pretraining", "evaluation"], ["train"], None)  # no split: not an evaluation image
    assert not may_pretrain(["evaluation"], ["train"], "train")


def _catalog_with_label(tmp_path: Path) -> tuple[Catalog, str, np.ndarray]:
    cat = Catalog(tmp_path / "cat", chunk_xy=8).init()
    label = (np.arange(20 * 30).reshape(20, 30) % 3).astype(np.uint8)
    location = label_location("ds", "img", "f" * 64)
    write_label_group(cat, location, label, {"kind": "segmentation", "class_names": ["a", "b", "c"],
                                             "ignore_index": None, "variants": {}, "source_path": "/src/img.png"})
    cat.write_cube(CubeWrite(dataset="ds", image_id="ds/img", key="img", sha256="a" * 64,
                             data=np.ones((3, 20, 30), np.uint16), wavelength_nm=np.array([500.0, 600.0, 700.0]),
                             attrs={}, index_fields={"split": "train", "pretraining": True,
                                                     "label_kind": "segmentation", "label_location": location,
                                                     "label_sha256": "f" * 64}))
    return cat, location, label


def test_label_round_trip_and_chunk_checksums(tmp_path: Path) -> None:
    cat, location, label = _catalog_with_label(tmp_path)
    got = cat.annotation("ds/img")
    np.testing.assert_array_equal(got.array, label)
    assert got.kind == "segmentation" and got.class_names == ["a", "b", "c"] and got.source_path == "/src/img.png"
    assert set(chunk_checksums(label, 8)) == {f"{j}.{i}" for j in range(3) for i in range(4)}
    assert cat.annotated("ds") == ["ds/img"] and cat.annotated("ds", "test") == []
    row = cat.images().iloc[0]
    assert row["split"] == "train" and bool(row["pretraining"]) and row["label_kind"] == "segmentation"
    arr = zarr.open_group(str(tmp_path / "cat" / location), mode="r+")["label"]
    arr[17, 25] = 2 if label[17, 25] != 2 else 1
    with pytest.raises(CorruptChunkError) as err:
        read_annotation(cat, "ds/img")
    assert err.value.chunk == (2, 3) and err.value.array == "label" and "ds/img" in str(err.value)
    report = cat.verify()
    assert report.corrupt == ["ds/img"] and not report.healthy


def test_verify_reports_missing_and_orphan_label_groups(tmp_path: Path) -> None:
    cat, location, label = _catalog_with_label(tmp_path)
    assert cat.verify().healthy
    write_label_group(cat, label_location("ds", "gone", "e" * 64), label, {"kind": "saliency"})
    assert cat.verify().orphans == [label_location("ds", "gone", "e" * 64)]
    import shutil

    shutil.rmtree(tmp_path / "cat" / location)
    report = cat.verify()
    assert report.missing == ["ds/img"] and not report.healthy
    with pytest.raises(CatalogError, match="label group"):
        cat.annotation("ds/img")


def test_images_without_labels_say_so(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat").init()
    cat.write_cube(CubeWrite(dataset="ds", image_id="ds/plain", key="plain", sha256="b" * 64,
                             data=np.ones((3, 4, 4), np.uint16), wavelength_nm=np.array([500.0, 600.0, 700.0]),
                             attrs={}))
    with pytest.raises(KeyError, match="ds/plain"):
        cat.annotation("ds/plain")
    row = cat.images().iloc[0]
    assert bool(row["pretraining"]) and pd.isna(row["split"]) and pd.isna(row["frame_index"])
    assert cat.sequences() == [] and cat.annotated("ds") == []
    with pytest.raises(KeyError, match="no sequence"):
        cat.sequence("ds/none")
