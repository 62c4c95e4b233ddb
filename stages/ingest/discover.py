"""Finding a dataset's source files safely: a bounded walk that follows symlinks only where they stay inside the
source root, reports the ones that loop, dangle or lead out, and matches the spec's ``files`` patterns.

A dataset folder under the source root may itself be a link (where the operator put the data); inside it, every
file and followed folder must resolve into the source root or into that dataset folder. Patterns follow pathlib's
glob syntax (``*``, ``?``, ``[...]`` within one path component, ``**`` for any number of folders).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
from collections import defaultdict
from functools import cache
from pathlib import Path

from base.errors import InputError
from catalog.readers.base import SourceItem
from catalog.specs import SPEC_FILENAME, DatasetSpec

#: Files and folders one dataset walk may visit before it stops with an error (a runaway tree or link farm).
MAX_ENTRIES = 1_000_000


def within(path: str, folders: list[str]) -> bool:
    """Whether a resolved path lies inside one of the (resolved) folders."""
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


def link_problem(path: Path, field: str, folders: list[str]) -> tuple[str | None, InputError | None]:
    """Follow a symlink: its resolved target, or the problem with it (a loop, a missing target, or a target
    outside ``folders``)."""
    try:
        target = os.path.realpath(path, strict=True)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, InputError(path, field, "symlink loop: the link leads back to itself",
                                    "replace the link by the file or folder it should point at, or remove it")
        return None, InputError(path, field, f"broken symlink to {os.readlink(path)!r} (the target does not exist)",
                                "restore the target, or remove the link")
    if not within(target, folders):
        return None, InputError(path, field, f"symlink to {target}, outside the source root",
                                "copy the data into the source root instead of linking to elsewhere (links may not "
                                "lead out of it)")
    return target, None


def walk_files(folder: Path, source_root: Path, max_entries: int = MAX_ENTRIES) -> tuple[list[str], list[InputError]]:
    """Relative POSIX paths of the files under ``folder`` and the links that could not be followed.

    Folder links inside the allowed area are followed, each real folder once (a link back to a folder being walked
    is a loop, reported); the walk stops with an InputError after ``max_entries`` entries.
    """
    top = os.path.realpath(folder)
    allowed = [os.path.realpath(source_root), top]
    files: list[str] = []
    problems: list[InputError] = []
    seen = {top}
    stack: list[tuple[str, str, tuple[str, ...]]] = [(str(folder), "", (top,))]
    count = 0
    while stack:
        path, rel, ancestors = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: (e.is_symlink(), e.name))  # real folders before links to them
        except OSError as exc:
            problems.append(InputError(path, "files", f"cannot list the folder ({exc.strerror})",
                                       "make the folder readable, or exclude it"))
            continue
        subdirs: list[tuple[str, str, tuple[str, ...]]] = []
        for entry in entries:
            count += 1
            if count > max_entries:
                raise InputError(folder, "files", f"more than {max_entries} files and folders under the dataset "
                                 "folder", "split the dataset into several folders, or move unrelated files out")
            name = f"{rel}{entry.name}"
            if entry.is_symlink():
                target, problem = link_problem(Path(entry.path), "files", allowed)
                if problem is not None:
                    problems.append(problem)
                elif target is not None and os.path.isdir(target):
                    if target in ancestors:
                        problems.append(InputError(entry.path, "files", f"symlink loop: the link leads back to "
                                                   f"{target}, a folder that contains it",
                                                   "remove the link, or point it at a folder outside its own "
                                                   "ancestry"))
                    elif target not in seen:
                        seen.add(target)
                        subdirs.append((entry.path, name + "/", (*ancestors, target)))
                elif target is not None and os.path.isfile(target):
                    files.append(name)
            elif entry.is_dir(follow_symlinks=False):
                real = os.path.realpath(entry.path)
                if real not in seen:
                    seen.add(real)
                    subdirs.append((entry.path, name + "/", (*ancestors, real)))
            elif entry.is_file(follow_symlinks=False):
                files.append(name)
        stack.extend(reversed(subdirs))
    return sorted(files), problems


@cache
def pattern_regex(pattern: str) -> re.Pattern[str]:
    """A glob pattern (pathlib syntax) as a regular expression over relative POSIX paths."""
    out: list[str] = []
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            if i and parts[i - 1] == "**":
                continue  # '**/**' is '**' (and nested stars would backtrack badly)
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        out.append(_component(part) + ("" if last else "/"))
    return re.compile("".join(out) + r"\Z")


def _component(part: str) -> str:
    """One path component's wildcards (``*``, ``?``, ``[...]``, ``[!...]``) as a regex that never crosses '/'."""
    out, i = [], 0
    while i < len(part):
        c = part[i]
        if c == "*":
            while i + 1 < len(part) and part[i + 1] == "*":
                i += 1
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (j := part.find("]", i + 2 if part[i + 1:i + 2] in ("!", "]") else i + 1)) > i:
            body = part[i + 1:j]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\").replace("/", "") + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def matching(files: list[str], patterns: list[str]) -> list[str]:
    """The files (relative POSIX paths) that match any of the patterns."""
    regexes = [pattern_regex(p) for p in patterns]
    return [f for f in files if any(r.match(f) for r in regexes)]


def _excluded(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel, p.removeprefix("**/")) for p in patterns)


def list_items(folder: Path, spec: DatasetSpec, source_root: Path | None = None,
               max_entries: int = MAX_ENTRIES) -> tuple[list[SourceItem], list[InputError]]:
    """Every source image of a dataset folder: the spec's globs minus excludes, one in every ``sample_every``
    per sub-folder (video frames), each with its companion files and aligned RGB resolved; and the problems
    found on the way (symlink loops, links out of ``source_root``, items whose companions cannot be used).
    The walk is bounded by ``max_entries`` (an InputError beyond)."""
    root = (source_root or folder.parent).absolute()
    files, problems = walk_files(folder, root, max_entries)
    folder = folder.resolve()
    rels = [r for r in matching(files, spec.files) if not _excluded(r, spec.exclude) and r != SPEC_FILENAME]
    if spec.sample_every > 1:
        by_dir: dict[str, list[str]] = defaultdict(list)
        for r in rels:
            by_dir[r.rsplit("/", 1)[0] if "/" in r else ""].append(r)
        rels = sorted(r for group in by_dir.values() for r in group[:: spec.sample_every])
    items = []
    for r in rels:
        try:
            items.append(item_for(folder, spec, r))
        except InputError as exc:
            problems.append(exc)
    return items, problems


def item_for(folder: Path, spec: DatasetSpec, primary_rel: str) -> SourceItem:
    """The SourceItem of one primary file (relative to the dataset folder)."""
    primary = folder / primary_rel
    key = primary_rel.rsplit(".", 1)[0] if "." in Path(primary_rel).name else primary_rel
    bare = SourceItem(dataset=spec.slug, root=folder, primary=primary, files=(primary,), key=key,
                      stem_suffix=spec.stem_suffix)
    companions = spec.reader.companions(primary, spec.reader_options(primary))
    rgb = bare.resolve(spec.rgb) if spec.rgb else None
    files = (primary, *companions, *([rgb] if rgb else []))
    return SourceItem(dataset=spec.slug, root=folder, primary=primary, files=files, key=key, rgb=rgb,
                      stem_suffix=spec.stem_suffix)
