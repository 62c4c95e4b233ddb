"""Ingest on the cases a new user hits with real and hand-made files: each asserts the fix of one reported failure
(wavelengths from the files, out-of-range bands, a miscounted header, symlinks, unreadable files, two ingests of
the same source at once) and the bounds on hostile input."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from base.errors import InputError
from catalog.catalog import INDEX_SCHEMA, Catalog
from catalog.fixtures.envi import write_envi
from catalog.fixtures.hsd import write_hsd
from catalog.specs import load_spec_file, spec_for_folder
from stages import ingest as stage
from stages.ingest import FileResult, IngestConfig, IngestResult, ingest_item, plan, run_ingest
from stages.ingest.discover import item_for, list_items


def _run(source: Path | str, catalog: Catalog) -> tuple[list[FileResult], IngestResult]:
    run = run_ingest(catalog, IngestConfig(source_root=str(source)))
    return run.files, run


def _dataset(folder: Path, **spec: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.yaml").write_text(yaml.safe_dump({"name": folder.name, **spec}, sort_keys=False))
    return folder


def _cube(bands: int = 6, h: int = 8, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, (bands, h, w)).astype(np.uint16)


# ---------------------------------------------------------------------------------------------- wavelengths
def test_minimal_envi_spec_reads_wavelengths_from_the_header(tmp_path: Path) -> None:
    folder = _dataset(tmp_path / "src" / "my-envi", format="envi", files="*.hdr")
    wl = np.linspace(410.0, 980.0, 6)
    write_envi(folder / "scan.hdr", _cube(), wavelengths=wl)
    assert load_spec_file(folder / "dataset.yaml").wavelengths_from == "file"
    cat = Catalog(tmp_path / "cat").init()
    results, _ = _run(tmp_path / "src", cat)
    assert [r.status for r in results] == ["ingested"], results
    np.testing.assert_allclose(cat.open("my-envi/scan")["wavelength"].values, wl)


def test_hsd_and_hdf5_files_give_their_wavelengths_by_default(tmp_path: Path) -> None:
    hsd = _dataset(tmp_path / "src" / "city", format="hsd", files="*.hsd")
    write_hsd(hsd / "a.hsd", _cube(16).astype(np.float32), 4, 450, 20.0, 750)
    h5 = _dataset(tmp_path / "src" / "h5cam", format="hdf5", files="*.h5", options={"key": "cube", "axes": "byx"})
    with h5py.File(h5 / "b.h5", "w") as f:
        f["cube"] = _cube()
        f["meta/Wavelength"] = np.linspace(0.45, 0.95, 6)
        f["meta/Wavelength"].attrs["units"] = "micrometers"
    cat = Catalog(tmp_path / "cat").init()
    results, work = _run(tmp_path / "src", cat)
    assert {r.status for r in results} == {"ingested"} and not work.problems, results
    np.testing.assert_allclose(cat.open("city/a")["wavelength"].values, 450 + 20.0 * np.arange(16))
    np.testing.assert_allclose(cat.open("h5cam/b")["wavelength"].values, np.linspace(450, 950, 6))


def test_npy_without_wavelengths_is_still_refused_at_the_spec(tmp_path: Path) -> None:
    folder = _dataset(tmp_path / "x", format="npy", files="*.npy")
    with pytest.raises(InputError, match="wavelengths_nm"):
        load_spec_file(folder / "dataset.yaml")


def test_one_band_out_of_range_is_dropped_with_a_note(tmp_path: Path) -> None:
    folder = _dataset(tmp_path / "src" / "uv-cam", format="npy", files="*.npy", options={"axes": "byx"},
                      wavelengths_nm=[250.0, 450.0, 500.0, 550.0, 600.0, 650.0])
    cube = _cube()
    np.save(folder / "c.npy", cube)
    cat = Catalog(tmp_path / "cat").init()
    results, _ = _run(tmp_path / "src", cat)
    assert results[0].status == "ingested" and "band 0 (250 nm)" in results[0].message
    da = cat.open("uv-cam/c")
    np.testing.assert_array_equal(da.values, cube[1:])
    np.testing.assert_allclose(da["wavelength"].values, [450, 500, 550, 600, 650])
    assert "dropped band 0 (250 nm) outside 300-2600 nm" in da.attrs["band_note"]


def test_out_of_range_bands_can_quarantine_instead(tmp_path: Path) -> None:
    _dataset(tmp_path / "src" / "uv-cam", format="npy", files="*.npy", options={"axes": "byx"},
             wavelengths_nm=[450.0, 500.0, 550.0, 600.0, 650.0, 2650.0], out_of_range_bands="quarantine")
    np.save(tmp_path / "src" / "uv-cam" / "c.npy", _cube())
    cat = Catalog(tmp_path / "cat").init()
    results, _ = _run(tmp_path / "src", cat)
    assert results[0].status == "quarantined"
    row = cat.quarantine().iloc[0]
    assert "band 5 (2650 nm)" in row["message"] and row["field"].startswith("wavelength")
    assert "unit" not in row["fix"] and "out_of_range_bands: drop" in row["fix"]


# ---------------------------------------------------------------------------------------------- headers
def test_header_declaring_one_band_too_many_blames_the_header(tmp_path: Path) -> None:
    folder = _dataset(tmp_path / "src" / "my-envi", format="envi", files="*.hdr")
    header = folder / "scan.hdr"
    write_envi(header, _cube(), wavelengths=np.linspace(410.0, 980.0, 6))
    header.write_text(header.read_text().replace("bands = 6", "bands = 7"))
    cat = Catalog(tmp_path / "cat").init()
    results, _ = _run(tmp_path / "src", cat)
    assert results[0].status == "quarantined"
    row = cat.quarantine().iloc[0]
    assert row["source_path"] == str(header) and row["field"] == "header.bands"
    assert "holds exactly 6 bands" in row["message"] and "bands = 6" in row["fix"]
    assert "truncated" not in row["message"]


# ---------------------------------------------------------------------------------------------- symlinks
def test_symlink_loops_are_reported_not_skipped(tmp_path: Path) -> None:
    folder = _dataset(tmp_path / "src" / "cam", format="npy", files="**/*.npy", options={"axes": "byx"},
                      wavelengths_nm=[450.0, 500.0, 550.0, 600.0, 650.0, 700.0])
    np.save(folder / "good.npy", _cube())
    (folder / "self.npy").symlink_to(folder / "self.npy")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to(folder, target_is_directory=True)
    (tmp_path / "src" / "looped").symlink_to(tmp_path / "src" / "looped")
    cat = Catalog(tmp_path / "cat").init()
    results, work = _run(tmp_path / "src", cat)
    assert [r.image_id for r in results] == ["cam/good"]
    problems = {str(p): e for _, p, e in work.problems}
    assert set(problems) == {str(folder / "self.npy"), str(folder / "sub" / "up"), str(tmp_path / "src" / "looped")}
    assert all("symlink loop" in e.problem for e in problems.values())
    assert set(cat.quarantine()["source_path"]) == set(problems)


def test_links_and_patterns_leaving_the_source_root_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    np.save(outside / "secret.npy", _cube(seed=1))
    folder = _dataset(tmp_path / "src" / "cam", format="npy", files="*.npy", options={"axes": "byx"},
                      wavelengths_nm=[450.0, 500.0, 550.0, 600.0, 650.0, 700.0])
    np.save(folder / "good.npy", _cube())
    (folder / "link.npy").symlink_to(outside / "secret.npy")
    results, work = _run(tmp_path / "src", Catalog(tmp_path / "cat").init())
    assert [r.image_id for r in results] == ["cam/good"]
    [(_, path, exc)] = work.problems
    assert path == str(folder / "link.npy") and "outside the source root" in exc.problem
    for bad in ("../outside/*.npy", "/etc/*", "a/../../*.npy"):
        _dataset(tmp_path / "bad", format="npy", files=bad, wavelengths_nm=[450.0, 500.0, 550.0])
        with pytest.raises(InputError, match="leaves the dataset folder") as err:
            load_spec_file(tmp_path / "bad" / "dataset.yaml")
        assert err.value.field == "files"
    _dataset(tmp_path / "bad", format="npy", files="*.npy", rgb="../rgb/{stem}.png", wavelengths_nm=[450.0, 500.0])
    with pytest.raises(InputError, match="leaves the dataset folder"):
        load_spec_file(tmp_path / "bad" / "dataset.yaml")


def test_a_linked_dataset_folder_is_fine(tmp_path: Path) -> None:
    real = _dataset(tmp_path / "disk2" / "cam", format="npy", files="*.npy", options={"axes": "byx"},
                    wavelengths_nm=[450.0, 500.0, 550.0, 600.0, 650.0, 700.0])
    np.save(real / "good.npy", _cube())
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "cam").symlink_to(real, target_is_directory=True)
    results, work = _run(tmp_path / "src", Catalog(tmp_path / "cat").init())
    assert [r.status for r in results] == ["ingested"] and not work.problems


# ---------------------------------------------------------------------------------------------- bounds
def test_huge_trees_and_specs_are_bounded(tmp_path: Path) -> None:
    folder = _dataset(tmp_path / "src" / "cam", format="npy", files="**/*.npy", wavelengths_nm=[450.0, 500.0, 550.0])
    for i in range(30):
        (folder / f"{i}.npy").write_bytes(b"")
    spec = load_spec_file(folder / "dataset.yaml")
    with pytest.raises(InputError, match="more than 20 files") as err:
        list_items(folder, spec, tmp_path / "src", max_entries=20)
    assert err.value.field == "files"
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{k}: &{k} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, k in zip("abcdefgh", "bcdefghi", strict=True))
    (folder / "dataset.yaml").write_text(bomb + "name: x\nformat: npy\nfiles: '*.npy'\n")
    with pytest.raises(InputError, match="aliases"):
        load_spec_file(folder / "dataset.yaml")
    for big in ({"files": [f"{i}/*.npy" for i in range(65)]}, {"wavelengths_nm": list(range(400, 5401))},
                {"files": "*" * 17 + ".npy"}):
        _dataset(tmp_path / "big", **{"format": "npy", "files": "*.npy", "wavelengths_nm": [450.0, 500.0], **big})
        with pytest.raises(InputError):
            load_spec_file(tmp_path / "big" / "dataset.yaml")


# ---------------------------------------------------------------------------------------------- unreadable
def test_unreadable_file_is_quarantined_once_with_an_absolute_path(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _dataset(tmp_path / "src" / "cam", format="npy", files="*.npy", options={"axes": "byx"},
                      wavelengths_nm=[450.0, 500.0, 550.0, 600.0, 650.0, 700.0])
    np.save(folder / "good.npy", _cube())
    np.save(folder / "locked.npy", _cube(seed=2))
    attempts = []

    def guarded_open(path: object, *args: object, **kwargs: object) -> object:
        if Path(str(path)).name == "locked.npy":  # what a file without read permission does (tests may run as root)
            attempts.append(path)
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(stage, "open", guarded_open, raising=False)
    monkeypatch.chdir(tmp_path)
    cat = Catalog("cat").init()
    results, _ = _run("src", cat)  # a relative source root, as a user types it
    assert sorted(r.status for r in results) == ["ingested", "quarantined"]
    row = cat.quarantine().iloc[0]
    assert row["source_path"] == str(tmp_path / "src" / "cam" / "locked.npy") and os.path.isabs(row["source_path"])
    assert row["field"] == "file" and row["error_class"] == "PermissionError" and "Permission denied" in row["message"]
    assert len(attempts) == 1


# ---------------------------------------------------------------------------------------------- concurrency
def _ingest_all(source: str, catalog: str, barrier: object) -> None:
    cat = Catalog(catalog)
    work = plan(source, cat)  # both plan before either commits: neither knows the other's sha256
    barrier.wait()  # type: ignore[attr-defined]
    for w in work.items:
        spec = spec_for_folder(Path(w.folder))
        assert spec is not None
        ingest_item(cat, spec, item_for(Path(w.folder), spec, w.primary), w.known_sha256)


def test_same_source_ingested_twice_at_once_never_duplicates(tmp_path: Path) -> None:
    folder = _dataset(tmp_path / "src" / "cam", format="npy", files="*.npy", options={"axes": "byx"},
                      wavelengths_nm=[450.0, 500.0, 550.0, 600.0, 650.0, 700.0])
    for i in range(3):
        np.save(folder / f"c{i}.npy", _cube(6, 64, 64, seed=i))
    catalog = str(tmp_path / "cat")
    Catalog(catalog).init()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_ingest_all, args=(str(tmp_path / "src"), catalog, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    cat = Catalog(catalog)
    rows = cat.storage.read_table("index", INDEX_SCHEMA)[0].to_pandas()
    assert sorted(rows["image_id"]) == ["cam/c0", "cam/c1", "cam/c2"]  # one row each, not two
    assert cat.verify().healthy and not cat.verify().orphans
