"""The ingest stage end to end on the fixtures of all 31 subsets: exact values, wavelengths, idempotency,
quarantine of bad input without damage to what is stored."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from catalog.catalog import Catalog
from catalog.fixtures.broken import make_broken_fixtures
from catalog.specs import builtin_specs, spec_for_folder
from stages.ingest import IngestConfig, plan, run_ingest


def _run(source: Path, catalog: Catalog, datasets: list[str] | None = None) -> list:
    return run_ingest(catalog, IngestConfig(source_root=str(source), datasets=datasets)).files


@pytest.fixture(scope="module")
def ingested(ingested_sources: tuple[Catalog, dict, list]) -> tuple[Catalog, dict, list]:
    return ingested_sources


def test_every_subset_ingests_exactly(ingested: tuple[Catalog, dict, list],
                                      fixture_sources: tuple[Path, dict]) -> None:
    cat, truth, results = ingested
    quarantined = [r.message for r in results if r.status == "quarantined"]
    assert quarantined == [] and cat.quarantine().empty
    df = cat.images()
    assert set(df["dataset"]) == set(builtin_specs()) | {"my-lab-camera", "my-lab-labels"}
    assert len(df) == sum(len(v) for v in truth.values())
    for slug, images in truth.items():
        for fx in images:
            image_id = f"{slug}/{fx.key}"
            da = cat.open(image_id)
            # stored in the smallest lossless dtype, the source's recorded
            assert da.attrs["source_dtype"] == fx.cube.dtype.str and da.dtype.itemsize <= fx.cube.dtype.itemsize
            np.testing.assert_array_equal(da.values, fx.cube, err_msg=image_id)
            np.testing.assert_allclose(da["wavelength"].values, fx.wavelengths, rtol=1e-6, err_msg=image_id)
            assert (cat.rgb(image_id) is not None) == fx.has_rgb, image_id
            assert da.attrs["reader"] == spec_for_folder(fixture_sources[0] / slug).format


def test_index_rows_and_attrs(ingested: tuple[Catalog, dict, list]) -> None:
    cat, _, _ = ingested
    df = cat.images()
    assert (df["wl_min"] >= 300).all() and (df["wl_max"] <= 2600).all() and (df["wl_min"] < df["wl_max"]).all()
    assert df["sha256"].str.len().eq(64).all() and df["image_id"].is_unique
    row = df[df["dataset"] == "hot-2024-rednir"].iloc[0]
    assert row["bands"] == 15
    da = cat.open(row["image_id"])
    for key in ("dataset", "image_id", "source_path", "source_sha256", "reader", "reader_version", "value_scale"):
        assert key in da.attrs, key
    assert cat.verify().healthy


def test_sampling_keeps_one_frame_in_every_100(ingested: tuple[Catalog, dict, list]) -> None:
    cat, truth, _ = ingested
    ids = sorted(cat.images("hot-2024-vis")["image_id"])
    assert ids == sorted(f"hot-2024-vis/{fx.key}" for fx in truth["hot-2024-vis"])
    assert len(ids) >= 2 and all(i.endswith(("0000", "0100")) for i in ids)


def test_second_run_writes_nothing(ingested: tuple[Catalog, dict, list], fixture_sources: tuple[Path, dict]) -> None:
    cat, _, _ = ingested
    cubes_before = sorted(p for p in Path(cat.root, "cubes").rglob("*.zarr"))
    results = _run(fixture_sources[0], cat)
    assert {r.status for r in results} == {"skipped"}
    assert sorted(p for p in Path(cat.root, "cubes").rglob("*.zarr")) == cubes_before


def test_changed_source_is_reingested_and_old_cube_kept(tmp_path: Path) -> None:
    from catalog.fixtures import write_dataset

    truth = write_dataset("harvard", tmp_path / "src")
    cat = Catalog(tmp_path / "cat").init()
    _run(tmp_path / "src", cat)
    import scipy.io

    target = tmp_path / "src" / "harvard" / f"{truth[0].key}.mat"
    mat = scipy.io.loadmat(target)
    mat["ref"] = mat["ref"] * 0 + 1
    scipy.io.savemat(target, {"ref": mat["ref"]})
    results = _run(tmp_path / "src", cat)
    statuses = sorted(r.status for r in results)
    assert statuses.count("ingested") == 1 and statuses.count("skipped") == len(truth) - 1
    assert float(cat.open(f"harvard/{truth[0].key}").max()) == 1.0
    report = cat.verify()
    assert report.healthy and len(report.orphans) == 1


def test_bad_input_is_quarantined_and_nothing_stored_is_damaged(tmp_path: Path) -> None:
    from catalog.fixtures import write_dataset

    write_dataset("cave", tmp_path / "good")
    cat = Catalog(tmp_path / "cat").init()
    _run(tmp_path / "good", cat)
    before = {i: cat.open(i).values for i in cat.images()["image_id"]}

    cases = make_broken_fixtures(tmp_path / "broken")
    assert len(cases) >= 12
    results = _run(tmp_path / "broken", cat)
    q = cat.quarantine()
    for case in cases:
        folder = str(tmp_path / "broken" / case.folder)
        target = str(Path(folder, case.file)) if case.file else folder
        rows = q[q["source_path"] == target]
        if case.rejected:
            assert len(rows) == 1, f"{case.name}: not quarantined ({target})"
            assert rows.iloc[0]["field"].startswith(case.field), (case.name, rows.iloc[0]["field"])
            assert rows.iloc[0]["fix"], case.name
        else:
            assert rows.empty, case.name
    ids = set(cat.images()["image_id"])
    assert "good-camera/cube" in ids and "wl-micrometres/cube" in ids
    assert "micrometres" in cat.open("wl-micrometres/cube").attrs["wavelength_note"]
    np.testing.assert_allclose(cat.open("wl-micrometres/cube")["wavelength"].values, [450, 500, 550, 600, 650, 700])
    for image_id, values in before.items():
        np.testing.assert_array_equal(cat.open(image_id).values, values)
    assert cat.verify().healthy
    assert sum(r.status == "quarantined" for r in results) + 2 == sum(c.rejected for c in cases)  # 2 spec problems


def test_unknown_source_root_is_a_clear_error(tmp_path: Path) -> None:
    from base.errors import InputError

    with pytest.raises(InputError, match="SOURCE_DIR"):
        plan(tmp_path / "missing")


def test_a_new_image_is_hashed_while_it_is_written_and_lands_where_its_hash_says(
        fixture_sources: tuple[Path, dict], tmp_path: Path) -> None:
    """A never-stored image takes the overlapped path (source hash on a thread, cube to a temporary, then moved to
    its content-addressed location); the result equals the hash-first path's, and a second ingest skips it."""
    import zarr

    from stages.ingest import ingest_item, item_for, prepare, source_sha256

    source, _ = fixture_sources
    work = plan(source, Catalog(str(tmp_path / "plan")).init(), ["cave"])
    w = work.items[0]
    spec = spec_for_folder(Path(w.folder))
    assert spec is not None
    item = item_for(Path(w.folder), spec, w.primary)
    sha = source_sha256(item)
    overlapped, first = Catalog(str(tmp_path / "a")).init(), Catalog(str(tmp_path / "b")).init()
    assert not overlapped.has_cube(spec.slug, item.key)
    assert ingest_item(overlapped, spec, item).status == "ingested"  # overlapped: nothing stored before
    assert overlapped.has_cube(spec.slug, item.key)
    first.write_cube(prepare(spec, item, sha))  # the hash-first path
    a, b = (c.images().iloc[0] for c in (overlapped, first))
    assert a["sha256"] == b["sha256"] == sha and a["location"] == b["location"] == overlapped.location_for(
        spec.slug, item.key, sha)
    attrs = [dict(zarr.open_group(str(tmp_path / n / a["location"]), mode="r").attrs) for n in ("a", "b")]
    assert attrs[0]["source_sha256"] == attrs[1]["source_sha256"] == sha
    assert attrs[0]["content_sha256"] == attrs[1]["content_sha256"] and attrs[0]["complete"]
    np.testing.assert_array_equal(overlapped.open(a["image_id"]).values, first.open(b["image_id"]).values)
    report = overlapped.verify()
    assert report.healthy and not report.stale and not report.in_progress
    again = ingest_item(overlapped, spec, item)  # no plan: the stored cube sends it down the hash-first path
    assert again.status == "skipped" and "already catalogued" in again.message


PLAIN_READER = """
import json, sys
import numpy as np
import xarray as xr
import zarr

out = {}
for path in sys.argv[1:]:
    ds = xr.open_zarr(path, consolidated=False)
    group = zarr.open_group(path, mode="r")
    wl = group["wavelength"]
    out[path] = {
        "data_vars": sorted(ds.data_vars), "cube_coords": {k: list(v.dims) for k, v in ds["cube"].coords.items()},
        "xr_wavelength": ds["cube"]["wavelength"].values.tolist(), "xr_units": ds["wavelength"].attrs.get("units"),
        "cube_values": bool(np.array_equal(ds["cube"].values, group["cube"][...])),
        "zarr_coordinates": group["cube"].attrs.get("coordinates"), "zarr_wl_dims": list(wl.metadata.dimension_names),
        "zarr_wavelength": wl[...].tolist(), "zarr_units": wl.attrs.get("units"),
    }
project = {"catalog", "stages", "model", "pipelines", "infra"}
out["project_modules"] = sorted({m.split(".")[0] for m in sys.modules} & project)
print(json.dumps(out))
"""


def test_plain_xarray_and_zarr_read_the_catalog_wavelengths(ingested: tuple[Catalog, dict, list],
                                                             tmp_path: Path) -> None:
    """A freshly ingested cube opened by plain ``xarray.open_zarr`` and plain zarr, in a process that imports no
    project code: ``wavelength`` (nm) is the coordinate of ``band`` on the cube, equal to what the catalog gives."""
    import json
    import subprocess
    import sys

    cat, _, _ = ingested
    df = cat.images().drop_duplicates("dataset")  # one image of every dataset
    paths = {f"{cat.root}/{loc}": image_id for loc, image_id in zip(df["location"], df["image_id"], strict=True)}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", PLAIN_READER, *paths], cwd=tmp_path, env=env, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen.pop("project_modules") == []
    assert len(seen) == len(paths) > 20
    for path, image_id in paths.items():
        plain, da = seen[path], cat.open(image_id)
        assert plain["data_vars"] == ["cube"] + (["rgb"] if cat.rgb(image_id) is not None else []), image_id
        assert plain["cube_coords"]["wavelength"] == ["band"] and plain["cube_values"], image_id
        assert plain["zarr_coordinates"].split()[0] == "wavelength" and plain["zarr_wl_dims"] == ["band"], image_id
        assert plain["xr_units"] == plain["zarr_units"] == da["wavelength"].attrs["units"] == "nm", image_id
        np.testing.assert_array_equal(plain["xr_wavelength"], da["wavelength"].values, err_msg=image_id)
        np.testing.assert_array_equal(plain["zarr_wavelength"], da["wavelength"].values, err_msg=image_id)
def test_runner_is_registered_records_its_config_and_counts(tmp_path: Path) -> None:
    import json

    from catalog.fixtures import write_dataset
    from stages.registry import STAGES

    assert STAGES.get("ingest").run is run_ingest and STAGES.get("ingest").config is IngestConfig
    write_dataset("cave", tmp_path / "src")
    write_dataset("harvard", tmp_path / "src")
    cat = Catalog(tmp_path / "cat").init()
    config = IngestConfig(source_root=str(tmp_path / "src"), datasets=["cave"])
    seen: list[str] = []
    result = run_ingest(cat, config, on_item=lambda r: seen.append(r.status))
    assert result.summary == [{"dataset": "cave", "ingested": 2, "skipped": 0, "quarantined": 0}]
    assert seen == ["ingested", "ingested"] and not result.problems
    assert json.loads(cat.storage.read_bytes("stages/ingest.json")) == {"stage": "ingest",
                                                                        "config": config.model_dump(mode="json")}
    assert run_ingest(cat, config).summary == [{"dataset": "cave", "ingested": 0, "skipped": 2, "quarantined": 0}]
