#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment, then run the main job (`demo`) or the tests (`test`).
# Usage: bash infra/bootstrap.sh demo [hvp demo options] | bash infra/bootstrap.sh test [pytest options]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HVP_VENV:-$root/.venv}"
lock="$root/infra/requirements.lock"
stamp="$venv/.hvp-installed"
want="$(cat "$root/pyproject.toml" "$root/infra/constraints.txt" "$lock" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  py="${HVP_PYTHON:-python3.11}"
  command -v "$py" >/dev/null || py=python3
  "$py" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required (torch 2.14.1 wheels)"'
  echo "[bootstrap] creating the virtual environment in $venv (about 2 minutes on first run)"
  "$py" -m venv "$venv"
  # Every distribution comes from the lock and must match one of its sha256 hashes (infra/lock.sh makes the lock
  # from pyproject.toml and the pins of infra/constraints.txt). Nothing is built in an isolated environment, whose
  # build tools pip would fetch unchecked. The locked pip, setuptools and wheel come first (the pip bundled with
  # Python 3.11 rejects extras such as sqlalchemy[asyncio] in hash-checking mode), then every other distribution
  # (torch among them), then sam2, a source archive pinned by its hash, built against that torch without CUDA.
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  awk -v dir="$work" '
    /^[A-Za-z]/ { split($1, pin, "=="); name = tolower(pin[1])
                  part = (name == "sam2") ? "sam2" : (name ~ /^(pip|setuptools|wheel)$/) ? "build" : "rest" }
    part != "" { print > (dir "/" part ".txt") }' "$lock"
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes --no-build-isolation)
  "${pip[@]}" --no-deps -r "$work/build.txt"
  "${pip[@]}" -r "$work/rest.txt"
  SAM2_BUILD_CUDA=0 "${pip[@]}" --no-deps -r "$work/sam2.txt"
  rm -rf "$work"
  trap - EXIT
  # the project itself (its dependencies are all installed above; a local folder has no hash to check)
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$root"
  "$venv/bin/python" -m pip check
  echo "$want" > "$stamp"
fi

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  demo) exec "$venv/bin/hvp" demo "$@" ;;
  # both tiers: the fast default tier and the integration tier (a later -m in the arguments wins)
  test) cd "$root" && exec "$venv/bin/python" -m pytest -m "integration or slow or not (integration or slow)" "$@" ;;
  *) echo "usage: bash infra/bootstrap.sh demo|test [args]" >&2; exit 2 ;;
esac
