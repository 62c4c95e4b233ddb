#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment, then run the main job (`demo`) or the tests (`test`).
# Usage: bash infra/bootstrap.sh demo [hvp demo options] | bash infra/bootstrap.sh test [pytest options]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HVP_VENV:-$root/.venv}"
constraints="$root/infra/constraints.txt"
stamp="$venv/.hvp-installed"
want="$(cat "$root/pyproject.toml" "$constraints" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  py="${HVP_PYTHON:-python3.11}"
  command -v "$py" >/dev/null || py=python3
  "$py" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required (torch 2.14.1 wheels)"'
  echo "[bootstrap] creating the virtual environment in $venv (about 2 minutes on first run)"
  "$py" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints")
  # torch first: sam2 builds against it without build isolation (no CUDA extension on CPU machines).
  "${pip[@]}" torch torchvision setuptools wheel
  SAM2_BUILD_CUDA=0 "${pip[@]}" --no-build-isolation sam2
  "${pip[@]}" -e "$root[dev]"
  echo "$want" > "$stamp"
fi

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  demo) exec "$venv/bin/hvp" demo "$@" ;;
  test) cd "$root" && exec "$venv/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash infra/bootstrap.sh demo|test [args]" >&2; exit 2 ;;
esac
