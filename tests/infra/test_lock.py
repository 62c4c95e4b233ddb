"""The hash-pinned lock covers every dependency pyproject.toml declares, at a version it allows, with a sha256 for
every distribution, and keeps the pins of infra/constraints.txt (torch and torchvision above all)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "infra" / "requirements.lock"


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_entries(text: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of every entry of a pip-compile lock."""
    out: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=[A-Za-z])", text):
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)", block)  # name[extras]==version
        if m:
            out[_name(m.group(1))] = (m.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return out


def missing_from_lock(pyproject: dict, lock: dict[str, tuple[str, list[str]]]) -> list[str]:
    """Declared requirements (dependencies and every extra) that the lock lacks or pins outside their range."""
    project = pyproject["project"]
    declared = [*project["dependencies"], *(r for extra in project.get("optional-dependencies", {}).values()
                                           for r in extra)]
    problems = []
    for line in declared:
        req = Requirement(line)
        entry = lock.get(_name(req.name))
        if entry is None:
            problems.append(f"{req.name}: not in the lock")
        elif req.specifier and not req.specifier.contains(entry[0], prereleases=True):
            problems.append(f"{req.name}: locked {entry[0]} outside {req.specifier}")
    return problems


def test_every_declared_dependency_is_locked_with_hashes() -> None:
    lock = lock_entries(LOCK.read_text())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert missing_from_lock(pyproject, lock) == []
    assert all(hashes for _, hashes in lock.values()), [n for n, (_, h) in lock.items() if not h]
    assert lock["sam2"] == ("1.1.0", [lock["sam2"][1][0]]) and len(lock["sam2"][1]) == 1  # its one source archive


def test_a_dependency_missing_from_the_lock_is_caught() -> None:
    lock = lock_entries(LOCK.read_text())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pyproject["project"]["dependencies"].append("not-a-locked-package>=1")
    del lock["zarr"]
    assert missing_from_lock(pyproject, lock) == ["zarr: not in the lock", "not-a-locked-package: not in the lock"]
    lock["zarr"] = ("2.18.0", ["0" * 64])
    assert missing_from_lock(pyproject, lock)[0].startswith("zarr: locked 2.18.0 outside")


def test_the_lock_keeps_the_constraints_pins() -> None:
    lock = lock_entries(LOCK.read_text())
    pins = dict(re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", (REPO / "infra" / "constraints.txt").read_text(),
                           re.MULTILINE))
    assert {_name(k): v for k, v in pins.items()} == {k: v for k, (v, _) in lock.items()
                                                      if k not in ("pip", "setuptools", "wheel")}
    assert lock["torch"][0] == "2.14.1" and lock["torchvision"][0] == "0.29.1"
    assert "sqlalchemy[asyncio]==" in LOCK.read_text()  # extras stay: pip's hash mode installs them as pinned
