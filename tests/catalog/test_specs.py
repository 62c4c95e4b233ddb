"""Dataset specs: the 31 built-ins are complete and consistent; user specs are validated strictly."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from catalog.errors import InputError
from catalog.specs import builtin_specs, load_spec_file, slugify

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "pretraining-datasets.csv"


def test_all_31_subsets_declared_with_format_and_wavelengths() -> None:
    specs = builtin_specs()
    assert len(specs) == 31
    for spec in specs.values():
        assert spec.reader.name == spec.format
        assert spec.bands and spec.images
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
