"""Label, fuse and relabel flows on tiny fixture catalogs with tiny random-init models."""

from __future__ import annotations

from pathlib import Path

import pytest

from catalog.catalog import Catalog
from catalog.fixtures import write_dataset
from catalog.masks import MaskStore
from pipelines.params import LabelParams, PathParams, Profile, SpatialParams, SpectralParams
from pipelines.profiles import resolve
from stages.labelling import label as stage
from stages.labelling.fuse import fusion_id

#: The demo profile with a smaller spectral branch: what these tests label with, passed as flow parameters.
FAST = LabelParams(spectral=SpectralParams(stride=3, max_objects=3))


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _ingest(root: Path, catalog: str, slugs: list[str]) -> None:
    from stages.ingest import IngestConfig, run_ingest

    for slug in slugs:
        write_dataset(slug, root)
    run_ingest(Catalog(catalog).init(), IngestConfig(source_root=str(root)))


def test_label_then_relabel_only_what_changed(prefect_server: None, tmp_path: Path) -> None:
    from pipelines.label import label_flow

    catalog = str(tmp_path / "cat")
    _ingest(tmp_path / "src", catalog, ["cave", "hot-2024-rednir"])
    cat = Catalog(catalog)
    images = list(cat.images()["image_id"])
    rows = label_flow(Profile.demo, PathParams(catalog=catalog), FAST)
    assert sorted(r["image_id"] for r in rows) == sorted(images)
    resolved = resolve(Profile.demo, label=FAST).label
    ids = {b: stage.cached_labeler(b, spec).labeler_id for b, spec in resolved.labelers.items()}
    store = MaskStore(cat)
    for image_id in images:
        for lid in ids.values():
            ms = store.read(image_id, labeler_id=lid)
            assert ms.attrs["weights"] == "random-init" and ms.masks.shape[1:] == cat.open(image_id).shape[1:]
        fused = cat.fused(image_id)
        assert fused.labeler_id == fusion_id(list(ids.values()), resolved.tau)
    # the demo profile's loose thresholds give masks in every branch, as a UI run with the same parameters does
    assert all(r["fused_masks"] >= 1 and r["spatial_masks"] >= 1 and r["spectral_masks"] >= 1
               and r["material_masks"] >= 1 for r in rows)
    overlays = list((Path(catalog) / "reports" / "overlays").glob("*.png"))
    assert overlays

    # unchanged inputs relabel nothing: every stage skips
    assert all(stage.pending(cat, lid) == [] for lid in ids.values())
    parts_before = len(MaskStore(cat).index(refresh=True))
    assert label_flow(Profile.demo, PathParams(catalog=catalog), FAST) == []
    assert len(MaskStore(cat).index(refresh=True)) == parts_before

    # a changed parameter gives a new labeler id: that branch relabels every image, the others nothing
    changed = LabelParams(branches=["spatial"], spatial=SpatialParams(points_per_side=3),
                          spectral=FAST.spectral)
    new_id = stage.cached_labeler("spatial", resolve(Profile.demo, label=changed).label.labelers["spatial"]).labeler_id
    assert new_id != ids["spatial"] and sorted(stage.pending(cat, new_id)) == sorted(images)
    label_flow(Profile.demo, PathParams(catalog=catalog), changed)
    assert stage.pending(cat, new_id) == [] and stage.pending(cat, ids["material"]) == []


def test_relabel_flow_ingests_and_labels_only_new_folders(prefect_server: None, tmp_path: Path) -> None:
    from pipelines.label import label_flow, relabel_flow

    root, catalog = tmp_path / "src", str(tmp_path / "cat")
    _ingest(root, catalog, ["harvard"])
    paths = PathParams(source_root=str(root), catalog=catalog)
    label_flow(Profile.demo, paths, FAST)
    assert relabel_flow(Profile.demo, paths, FAST) == []  # nothing new
    write_dataset("hsi-road", root)
    rows = relabel_flow(Profile.demo, paths, FAST)
    assert rows and {r["image_id"].split("/")[0] for r in rows} == {"hsi-road"}
    cat = Catalog(catalog)
    assert set(cat.images()["dataset"]) == {"harvard", "hsi-road"}
    for image_id in cat.images("hsi-road")["image_id"]:
        assert len(cat.fused(image_id)) >= 1


def test_show_writes_an_overlay(prefect_server: None, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.label import label_flow

    catalog = str(tmp_path / "cat")
    _ingest(tmp_path / "src", catalog, ["hsi-road"])
    label_flow(Profile.demo, PathParams(catalog=catalog), LabelParams(overlays=0, spectral=FAST.spectral))
    image_id = Catalog(catalog).images()["image_id"][0]
    out = tmp_path / "show.png"
    res = CliRunner().invoke(app, ["show", image_id, "--catalog", catalog, "--out", str(out), "--profile", "demo"])
    assert res.exit_code == 0, res.output
    from PIL import Image

    with Image.open(out) as im:
        assert im.width > 4 * 18 and im.height > 14
