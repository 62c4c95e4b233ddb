"""Dataset-controlled text (dataset names, folder and file names) reaches the UI's markdown artifacts as text: no
link, image or HTML can be planted through a dataset.yaml or a file name."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from markdown_it import MarkdownIt

from base.markdown import escape_markdown
from catalog.catalog import Catalog
from catalog.specs import spec_for_folder
from pipelines.wiring import markdown_table
from stages.ingest import IngestConfig, run_ingest

LINK = "[x](http://evil)"
IMG = "<img src=x onerror=alert(1)>"
PLANTED = f"{LINK} {IMG} **bold** `code` ![i](http://evil/i.png) <http://evil> www.evil.com | cell &amp; # h"


def _render(markdown: str) -> str:
    """HTML as a CommonMark renderer with raw HTML allowed (the riskiest setting) makes it."""
    return MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)


def _text(rendered: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", rendered))


@pytest.mark.parametrize("text", [LINK, IMG, PLANTED, "line one\nline two\r\n# heading", "a\\b", "-1.5", ""])
def test_escaped_text_renders_as_exactly_that_text(text: str) -> None:
    rendered = _render(escape_markdown(text))
    for tag in ("<a", "<img", "<strong", "<code", "<h1", "<em"):
        assert tag not in rendered, rendered
    expected = " ".join(text.split()) if "\n" in text else text
    assert _text(rendered).strip() == expected


def test_planted_dataset_reaches_the_markdown_table_as_text(tmp_path: Path) -> None:
    # A user dataset whose dataset.yaml name and file names carry markup: stored as given, shown as text.
    folder = tmp_path / "sources" / "planted"
    (folder / "captures").mkdir(parents=True)
    names = ["[x](javascript:alert(1)) a", f"{IMG} b"]  # a file name holds no '/': the dataset name has the URL
    rng = np.random.default_rng(0)
    for name in names:
        np.save(folder / "captures" / f"{name}.npy", rng.integers(0, 4000, (12, 10, 5), dtype=np.uint16))
    (folder / "dataset.yaml").write_text(yaml.safe_dump({
        "name": PLANTED, "format": "npy", "files": "captures/*.npy", "options": {"axes": "yxb"},
        "wavelengths_nm": [450.0, 500.0, 550.0, 600.0, 650.0]}))
    cat = Catalog(tmp_path / "catalog").init()
    results = run_ingest(cat, IngestConfig(source_root=str(tmp_path / "sources"))).files
    assert [r.status for r in results] == ["ingested", "ingested"], results
    spec = spec_for_folder(folder)
    assert spec is not None and spec.name == PLANTED
    rows = [{"dataset name": spec.name, "image": r["image_id"], "source": r["source_path"], "bands": r["bands"]}
            for r in cat.images().to_dict("records")]
    assert {r["image"].rsplit("/", 1)[-1] for r in rows} == set(names)  # the markup really is in the data

    rendered = _render(markdown_table(rows))
    assert "<a" not in rendered and "<img" not in rendered and "<strong" not in rendered
    assert rendered.count("<tr>") == 3  # header and one row per image: no row or cell injected
    text = _text(rendered)
    for row in rows:
        for value in row.values():
            assert str(value) in text


def test_table_artifacts_escape_every_text_cell(monkeypatch: pytest.MonkeyPatch) -> None:
    # The UI renders each string cell of a table artifact as markdown: publish_table escapes them, numbers stay.
    import pipelines.wiring as wiring

    sent: dict[str, Any] = {}
    monkeypatch.setattr(wiring, "create_table_artifact", lambda **kw: sent.update(kw))
    rows = [{"dataset": PLANTED, "images": 3, "share": 0.5, "ok": True, "note": None}]
    wiring.publish_table("ingest-summary", rows, "per dataset")
    (cell,) = sent["table"]
    assert {k: v for k, v in cell.items() if k != "dataset"} == {"images": 3, "share": 0.5, "ok": True, "note": None}
    rendered = _render(cell["dataset"])
    assert "<a" not in rendered and "<img" not in rendered
    assert _text(rendered).strip() == PLANTED
    assert sent["key"] == "ingest-summary" and rows[0]["dataset"] == PLANTED  # the caller's rows are not changed
