#!/usr/bin/env bash
# Create (once) and link the project's virtualenv, then install streamprune into it in editable mode.
# The ~7 GB venv lives outside the clone, keyed by the hash of setup.cfg, so a fresh clone (CI) with
# the same dependencies reuses it and only re-points the editable install (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

find_python() {
  if command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys' >/dev/null 2>&1; then
    command -v python3.12; return
  fi
  for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
  return 1
}

py=$(find_python) || { echo "error: Python 3.12 not found (looked for python3.12 on PATH and in pyenv); install it first" >&2; exit 2; }
# key: the dependency lists and the interpreter, not the rest of setup.cfg (metadata edits keep the venv)
requirements() {
  "$py" - <<'PY'
import configparser
cfg = configparser.ConfigParser(); cfg.read("setup.cfg")
reqs = cfg["options"]["install_requires"].split() + cfg["options.extras_require"]["test"].split()
print("\n".join(r for r in reqs if r))
PY
}
key=$( (requirements; "$py" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)
cache="${STREAMPRUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/streamprune}"
venv="$cache/venv-$key"

# LIBERO's hf-egl-probe is an sdist whose setup.py runs `cmake` from PATH inside pip's isolated build env.
# A `cmake` from a virtualenv (the PyPI shim lerobot installs; on PATH when a venv is activated) is a Python
# script that was seen to fail there (ModuleNotFoundError: cmake), so the install runs with the first other
# cmake's directory at the front of PATH.
system_cmake_dir() {
  local c
  for c in $(type -ap cmake); do
    case "$c" in "$cache"/*|"$root"/*|*/shims/*|"${VIRTUAL_ENV:-/nonexistent}"/*) continue ;; esac
    dirname "$c"; return
  done
  return 1
}

if [ ! -f "$venv/.complete" ]; then
  echo "bootstrap: building $venv with $py (first run: ~7 GB, a few minutes; later runs reuse it)"
  rm -rf "$venv"
  mkdir -p "$cache"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
  # install_requires from setup.cfg plus the test extras, without installing the project itself yet
  requirements > "$venv/requirements.txt"
  cmake_dir=$(system_cmake_dir) || { echo "error: CMake not found; LIBERO's hf-egl-probe is built with it (apt-get install cmake g++ make)" >&2; exit 2; }
  PATH="$cmake_dir:$PATH" "$venv/bin/python" -m pip install --progress-bar off -r "$venv/requirements.txt"
  touch "$venv/.complete"
fi

ln -sfn "$venv" .venv
# Re-point the editable install at this clone when it points elsewhere (another clone, CI).
if [ "$(.venv/bin/python -P -c 'import streamprune, os; print(os.path.dirname(os.path.dirname(streamprune.__file__)))' 2>/dev/null)" != "$root" ]; then
  # through the venv's own path: console scripts get a shebang that stays valid for every clone
  "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
fi
