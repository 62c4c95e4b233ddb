"""Markdown that shows dataset-controlled text as text: a crafted dataset name, path or class name cannot become a
link, an image or HTML in the Prefect UI's markdown artifacts (a base module: stages and pipelines both use it).
"""

from __future__ import annotations

import re
import string
from typing import Any

#: Every ASCII punctuation character: CommonMark lets a backslash escape each of them, and an escaped one is always
#: literal text (no emphasis, link, image, autolink, entity, raw HTML, table cell or heading can start from it).
_PUNCTUATION = re.compile("([" + re.escape(string.punctuation) + "])")
#: Line breaks and other control characters: a value stays on its own line (no new block, list or table row).
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")


def escape_markdown(text: object) -> str:
    """``text`` (any value, via ``str``) as inline markdown that renders to exactly that text on one line:
    every ASCII punctuation character backslash-escaped, line breaks and control characters folded to a space."""
    return _PUNCTUATION.sub(r"\\\1", _CONTROL.sub(" ", str(text)))


def escape_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a table artifact with every text cell escaped (the Prefect UI renders each string cell as markdown);
    numbers, booleans and None stay as they are, so the table still sorts them as values."""
    return [{k: escape_markdown(v) if isinstance(v, str) else v for k, v in row.items()} for row in rows]
