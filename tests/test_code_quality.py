"""The code stays lint-clean (ruff, in the default run) and type-clean (mypy, a slow case)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_clean() -> None:
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.integration
def test_mypy_clean() -> None:
    out = subprocess.run([sys.executable, "-m", "mypy", "catalog", "stages", "pipelines", "infra", "model"],
                         cwd=REPO, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
