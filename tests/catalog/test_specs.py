"""Dataset specs: the 31 built-ins are complete and consistent; user specs are validated strictly."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from base.errors import InputError
from catalog.specs import builtin_specs, load_spec_file, released_input, slugify

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "pretraining-datasets.csv"


def test_all_31_subsets_declared_with_format_and_wavelengths() -> None:
    specs = builtin_specs()
    pretraining = {k for k, s in specs.items() if "pretraining" in s.roles}
    assert len(pretraining) == 31
    airborne = {"whu-hi-longkou", "whu-hi-hanchuan", "whu-hi-honghu", "indian-pines", "pavia-university", "salinas",
                "abu-beach", "hyperfree-stone", "aviris-targets", "hermiston", "river"}
    assert set(specs) - pretraining == {"hot-2023-vis", "hot-2023-nir", "hot-2023-rednir", *airborne}  # evaluation
    for slug in airborne:  # every airborne benchmark states its GSD (HyperFree's position embedding needs it)
        assert specs[slug].gsd_m and specs[slug].labels is not None and specs[slug].roles == ["evaluation"]
    for spec in specs.values():
        assert spec.reader.name == spec.format
        assert spec.bands and (spec.images or "pretraining" not in spec.roles)
        wl = spec.wavelength_values()
        assert (wl is None) == (spec.wavelengths_from == "file")
        if wl is not None:
            assert len(wl) == spec.bands and all(wl[1:] > wl[:-1])
        spec.reader_options()  # the options validate against the reader's model


@pytest.mark.skipif(not REFERENCE.exists(), reason="shared reference table not beside the checkout")
def test_builtins_match_reference_table() -> None:
    specs = {s.name: s for s in builtin_specs().values()}
    with REFERENCE.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 31
    for row in rows:
        spec = specs[row["name"]]
        assert spec.images == int(row["images"])
        # HyKo v2-VIS: the files hold 15 channels although the table says 16 (documented in the spec's notes).
        if row["name"] != "HyKo v2-VIS":
            assert spec.bands == int(row["bands"]), row["name"]


def test_slugify() -> None:
    assert slugify("HOT-2024 VIS") == "hot-2024-vis"
    assert slugify("Agricultural Plant (aphid)") == "agricultural-plant-aphid"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "dataset.yaml"
    p.write_text(text)
    return p


def test_user_spec_minimal_ok(tmp_path: Path) -> None:
    spec = load_spec_file(_write(tmp_path, "name: Lab\nformat: npy\nfiles: '*.npy'\nwavelengths_nm: [500, 600, 700]\n"))
    assert spec.slug == "lab" and spec.files == ["*.npy"] and list(spec.wavelength_values()) == [500, 600, 700]


@pytest.mark.parametrize(("text", "field", "fix_word"), [
    ("name: Lab\nformat: npy\nfiles: '*.npy'\nwavelengths_nm: [5]\ncolour: red\n", "colour", "remove"),
    ("name: Lab\nformat: npy\nfiles: '*.npy'\nwavelengths_nm: fast\n", "wavelengths_nm", "expected"),
    ("name: Lab\nformat: npy\nfiles: '*.npy'\n", "<spec>", "wavelengths_from"),
    ("name: Lab\nformat: npy\nwavelengths_nm: [1, 2]\n", "files", "add"),
    ("name: Lab\nformat: pdf\nfiles: '*'\nwavelengths_nm: [1, 2]\n", "format", "use one of"),
    ("name: Lab\nformat: npy\nfiles: '*'\nwavelengths_nm: [1, 2]\noptions: {axis: yxb}\n", "options.axis", "options"),
    ("name: Lab\nformat: npy\nfiles: '*'\nwavelengths_nm: [1, 2]\nbands: 3\n", "<spec>", "correct"),
    ("- just\n- a list\n", "<top level>", "name"),
    ("name: [unclosed\n", "<yaml>", "YAML"),
])
def test_user_spec_errors_name_field_and_fix(tmp_path: Path, text: str, field: str, fix_word: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(InputError) as err:
        load_spec_file(path)
    assert err.value.field == field
    assert err.value.path == str(path)
    assert fix_word in err.value.fix + err.value.problem


def test_downstream_builtins_declare_labels_splits_and_roles() -> None:
    specs = builtin_specs()
    drive = specs["hsi-drive-v2-0"]
    assert drive.roles == ["pretraining", "evaluation"] and drive.pretraining_splits == ["train"]
    assert drive.labels.kind == "segmentation" and drive.labels.ignore_index == 0
    assert len(drive.labels.class_names) == 11 and drive.labels.class_names[8] == "water"
    assert drive.labels.variants["hs3bench"].drop == ["water"]
    assert set(drive.splits.lists) == {"train", "val", "test"}
    city = specs["hyperspectral-city-v2"]
    assert len(city.labels.class_names) == 19 and city.labels.ignore_index == 255 and not city.labels.required
    hssod = specs["hssod"]
    assert hssod.labels.kind == "saliency" and hssod.splits.ordered == {"train": 0.8, "test": 0.2}
    for slug in ("hot-2023-vis", "hot-2023-nir", "hot-2023-rednir"):
        assert specs[slug].roles == ["evaluation"] and specs[slug].labels.kind == "track"
        assert specs[slug].sample_every == 1 and specs[slug].labels.options.one_based
    assert specs["hot-2024-vis"].roles == ["pretraining"] and specs["hot-2024-vis"].labels is None


LABELLED = ("name: Lab\nformat: npy\nfiles: '*.npy'\nwavelengths_nm: [500, 600, 700]\n"
            "roles: [pretraining, evaluation]\n")
SEG = "labels: {kind: segmentation, files: 'gt/{stem}.png', class_names: [bg, leaf], ignore_index: 255}\n"
SPLITS = "splits: {globs: {train: 'a*', test: 'b*'}}\n"


def test_user_spec_with_labels_and_splits(tmp_path: Path) -> None:
    text = (LABELLED + "labels:\n  kind: segmentation\n  files: ['gt/{stem}.mat', 'gt/{stem}.png']\n"
            "  options: {key: gt, transpose: true}\n  class_names: [bg, leaf, stem]\n  ignore_index: 255\n"
            "  variants: {no-stem: {drop: [stem]}}\n"
            "splits: {lists: {train: train.txt, val: val.txt}, default: test}\npretraining_splits: [train, val]\n")
    spec = load_spec_file(_write(tmp_path, text))
    assert spec.labels.files == ["gt/{stem}.mat", "gt/{stem}.png"] and spec.labels.options.key == "gt"
    assert spec.labels.options.transpose and spec.labels.names() == ["bg", "leaf", "stem"]
    assert spec.splits.names() == ["train", "val", "test"] and spec.pretraining_splits == ["train", "val"]


@pytest.mark.parametrize(("text", "field", "word"), [
    (LABELLED + SPLITS, "<spec>", "labels"),  # evaluation needs labels
    (LABELLED + SEG, "<spec>", "splits"),  # ... and splits
    (LABELLED + SEG + SPLITS + "pretraining_splits: [training]\n", "<spec>", "pretraining_splits"),
    (LABELLED + SPLITS + "labels: {kind: segmentation, files: x.png}\n", "labels", "class_names"),
    (LABELLED + SPLITS + "labels: {kind: outline, files: x.png}\n", "labels.kind", "expected"),
    (LABELLED + SPLITS + "labels: {kind: saliency, files: x.png, ignore_index: 3}\n", "labels", "segmentation"),
    (LABELLED + SPLITS + "labels: {kind: track, files: gt.txt, format: image}\n", "labels", "boxes"),
    (LABELLED + SPLITS + "labels: {kind: track, files: gt.txt}\nsample_every: 10\n", "<spec>", "sample_every"),
    (LABELLED + SPLITS + "labels: {kind: segmentation, files: x.png, class_names: [a, b], ignore_index: 255, "
     "variants: {v: {drop: [c]}}}\n", "labels", "not in 'class_names'"),
    (LABELLED + SPLITS + "labels: {kind: segmentation, files: x.png, class_names: [a, a]}\n", "labels", "dupl"),
    (LABELLED + SEG + "labels_file: x\n" + SPLITS, "labels_file", "remove"),
    (LABELLED + SEG + "splits: {lists: {train: a.txt}, globs: {test: 'b*'}}\n", "splits", "one of"),
    (LABELLED + SEG + "splits: {ordered: {train: 0.5, test: 0.4}}\n", "splits", "sum"),
    (LABELLED + SEG + "splits: {}\n", "splits", "default"),
    (LABELLED + SEG + SPLITS + "roles: [teaching]\n", "roles.0", "expected"),
    (LABELLED.replace("[pretraining, evaluation]", "[evaluation, evaluation]") + SEG + SPLITS, "<spec>", "twice"),
    (LABELLED + SEG.replace("}\n", ", options: {mat_key: gt}}\n") + SPLITS, "labels.options.mat_key", "remove"),
])
def test_user_label_spec_errors_name_field_and_fix(tmp_path: Path, text: str, field: str, word: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(InputError) as err:
        load_spec_file(path)
    assert err.value.field == field, str(err.value)
    assert err.value.path == str(path) and err.value.fix
    assert word in err.value.fix + err.value.problem, str(err.value)

# ---------------------------------------------------------------- the released reader's handling (spec.released)
HYPERBLOOD_NOISY_NM = [376.82, 381.7583, 386.7018, 391.6505, 396.6044, 619.7518, 624.9409, 630.1353, 1012.2913,
                       1017.8618, 1023.4377, 1029.0188, 1034.605, 1040.1965, 1045.7932]


def test_released_hyperblood_keeps_the_113_shared_bands_and_drops_the_damaged_row() -> None:
    spec = builtin_specs()["hyperblood"]
    assert spec.released is not None and spec.released.keep_wavelengths_nm is not None
    full = np.sort(np.array(spec.released.keep_wavelengths_nm + HYPERBLOOD_NOISY_NM))
    assert full.size == 128
    cube = np.arange(128 * 520 * 2, dtype=np.float32).reshape(128, 520, 2)
    out, wl = released_input(spec, cube, full)
    assert out.shape == (113, 519, 2) and wl.tolist() == spec.released.keep_wavelengths_nm
    assert out[0, 445, 0] == cube[5, 446, 0]  # band 5 is the first kept; row 445 is gone
    f2k = cube[5:121, :10]  # F(2k): 116 bands starting at 401.56 nm, another height, no damaged row
    out, wl = released_input(spec, f2k, full[5:121])
    assert out.shape == (113, 10, 2) and np.array_equal(out[43], f2k[46])  # 619.8-630.1 nm dropped


def test_released_orientation_band_range_and_assigned_wavelengths() -> None:
    specs = builtin_specs()
    cube = np.random.default_rng(0).random((249, 3, 5)).astype(np.float32)
    hwc = cube.transpose(1, 2, 0)
    rotated, _ = released_input(specs["lib-hsi"], cube, np.linspace(397, 1004, 249))
    np.testing.assert_array_equal(rotated.transpose(1, 2, 0), np.rot90(hwc, -1, axes=(0, 1)))  # the release's call
    transposed, _ = released_input(specs["hsodbit-v2"], cube, np.linspace(401.5, 998.5, 249))
    np.testing.assert_array_equal(transposed, cube.transpose(0, 2, 1))
    viscor, wl = released_input(specs["deephs-viscor"], cube, np.linspace(408.03, 901.26, 249))
    assert viscor.shape == (224, 3, 5) and wl[0] == 400 and wl[-1] == 1000
    umos, wl = released_input(specs["um-os"], cube[:33], np.linspace(400, 720, 33))
    assert umos.shape[0] == 31 and wl[-1] == 700
    same, wl = released_input(specs["cave"], cube[:31], np.linspace(400, 700, 31))  # no recorded difference
    assert np.array_equal(same, cube[:31]) and wl[-1] == 700
    with pytest.raises(InputError, match=r"hyperblood.released.*no band"):
        released_input(specs["hyperblood"], cube[:3], np.array([2000.0, 2100.0, 2200.0]))


def test_airborne_label_declarations_are_checked(tmp_path: Path) -> None:
    base = "name: Scene\nformat: npy\nfiles: '*.npy'\nwavelengths_nm: [500, 600, 700]\nroles: [evaluation]\n"
    ok = load_spec_file(_write(tmp_path, base + "labels: {kind: pixel_classes, files: gt.npy, class_names: "
                                              "[unlabelled, a, b], pixel_split: {fraction: 0.1, seed: 3}}\n"))
    assert ok.labels is not None and ok.labels.pixel_split is not None and ok.splits is None
    for labels, message in (
        ("{kind: pixel_classes, files: gt.npy, class_names: [unlabelled, a]}", "pixel_split"),
        ("{kind: pixel_classes, files: gt.npy, class_names: [a, b], pixel_split: {per_class: 1}}", "unlabelled"),
        ("{kind: anomaly_map, files: gt.npy, target_spectrum: s.txt}", "target_spectrum"),
        ("{kind: change_pair, files: gt.npy}", "second"),
        ("{kind: pixel_classes, files: gt.npy, class_names: [unlabelled, a], pixel_split: "
         "{per_class: 1, fraction: 0.5}}", "one of"),
    ):
        with pytest.raises(InputError, match=message):
            load_spec_file(_write(tmp_path, base + f"labels: {labels}\n"))
