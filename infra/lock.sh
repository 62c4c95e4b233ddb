#!/usr/bin/env bash
# Regenerate infra/requirements.lock: every distribution of pyproject.toml's dependencies (with the dev extra) and of
# infra/requirements.in, at the versions infra/constraints.txt pins, each with the sha256 of every file the package
# indexes offer. pip-tools runs from a scratch virtual environment, never the project's.
# Usage: bash infra/lock.sh   (after changing pyproject.toml, infra/constraints.txt or infra/requirements.in)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
"${HVP_PYTHON:-python3.11}" -m venv "$scratch/venv"
"$scratch/venv/bin/python" -m pip install --quiet pip-tools setuptools wheel
cd "$root"
# sam2 is a source archive: its metadata is built without CUDA and without build isolation (no torch download).
SAM2_BUILD_CUDA=0 "$scratch/venv/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --no-strip-extras \
  --extra dev --no-build-isolation --no-emit-index-url --no-emit-find-links -c infra/constraints.txt \
  -o infra/requirements.lock pyproject.toml infra/requirements.in
