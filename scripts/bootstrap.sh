#!/usr/bin/env bash
# bootstrap.sh [video|robot]: make this clone's environment for one of the two tested stacks.
#
#   video  .venv        the core with the current torch / transformers releases, Ray, lmms-eval, the bench plot
#   robot  .venv-robot  the core at lerobot's bounds (torch 2.11, transformers 5.5) with lerobot and the simulators
#
# Dependencies only live in a shared cached venv, keyed by the hash of requirements/<env>.lock and the
# interpreter, so fresh clones (CI) reuse it. Each clone gets its own small venv layered on it (a .pth adds the
# cached site-packages) with streamprune installed editable from this clone, so every clone runs its own code.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
env=${1:-video}
case "$env" in
  video) clone_venv=.venv ;;
  robot) clone_venv=.venv-robot ;;
  *) echo "error: bootstrap.sh takes video or robot, got '$env'" >&2; exit 2 ;;
esac
lock="requirements/$env.lock"

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
py=$("$py" -c 'import os, sys; print(os.path.realpath(sys.executable))')
key=$( (cat "$lock"; "$py" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)
cache="${STREAMPRUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/streamprune}"
deps="$cache/venv-$env-$key"

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

if [ ! -f "$deps/.complete" ]; then
  echo "bootstrap: building the $env dependencies in $deps (first run: several GB, a few minutes; later runs reuse it)"
  rm -rf "$deps"
  mkdir -p "$cache"
  "$py" -m venv "$deps"
  "$deps/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
  path="$PATH"
  if [ "$env" = robot ]; then
    cmake_dir=$(system_cmake_dir) || { echo "error: CMake not found; LIBERO's hf-egl-probe is built with it (apt-get install cmake g++ make)" >&2; exit 2; }
    path="$cmake_dir:$PATH"
  fi
  PATH="$path" "$deps/bin/python" -m pip install --progress-bar off -r "$lock"
  touch "$deps/.complete"
fi

# This clone's venv: rebuilt when it layers on other dependencies (a changed lock), was made by another version
# of this script or of setup.cfg (the console scripts it installs), or is the old shared link.
site=$("$deps/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
stamp="$deps $(cat "$root/scripts/bootstrap.sh" "$root/setup.cfg" | sha256sum | cut -c1-16)"
if [ -L "$clone_venv" ] || [ "$(cat "$clone_venv/streamprune-stamp" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$clone_venv"
  "$py" -m venv --without-pip "$clone_venv"
  clone_site=$("$clone_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  # addsitedir also runs the cached venv's own .pth files; this clone's site-packages stay first on sys.path
  echo "import site; site.addsitedir('$site')" > "$clone_site/_streamprune_deps.pth"
  echo "$deps" > "$clone_venv/streamprune-deps"
  echo "$stamp" > "$clone_venv/streamprune-stamp"
  # the dependencies' commands (lerobot-eval, ray, pytest, ruff, ...): console scripts re-pointed at this venv's
  # interpreter, so they import this clone's streamprune too; native executables linked as they are
  for tool in "$deps"/bin/*; do
    name=$(basename "$tool")
    [ -f "$tool" ] && [ -x "$tool" ] && [ ! -e "$clone_venv/bin/$name" ] || continue
    case "$name" in activate*|Activate*|python*|pip*) continue ;; esac
    if head -c 2 "$tool" | grep -q '^#!'; then
      if head -n 1 "$tool" | grep -qx "#!$deps/bin/python[0-9.]*"; then
        { echo "#!$root/$clone_venv/bin/python"; tail -n +2 "$tool"; } > "$clone_venv/bin/$name"
        chmod +x "$clone_venv/bin/$name"
      fi
    else
      ln -s "$tool" "$clone_venv/bin/$name"
    fi
  done
fi
# streamprune from this clone (editable: dist-info for the console script and lmms-eval's entry point)
if [ "$("$clone_venv/bin/python" -P -c 'import streamprune, os; print(os.path.dirname(os.path.dirname(streamprune.__file__)))' 2>/dev/null)" != "$root" ]; then
  # quietly (setuptools' notices about package data are noise here); the log is shown if it fails
  "$clone_venv/bin/python" -m pip install --no-deps --no-build-isolation --disable-pip-version-check -e . \
    > "$clone_venv/install.log" 2>&1 || { cat "$clone_venv/install.log" >&2; exit 1; }
fi
