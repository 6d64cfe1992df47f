#!/usr/bin/env bash
# Make sure a headless-capable Chromium is on PATH (the web UI test screenshots the dashboard with it).
# Installs Debian's `chromium` package when missing; needs root (as on the project's machines).
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
  echo "ensure_chromium: already present: $(command -v chromium)"
  exit 0
fi

if [ "${EUID:-$(id -u)}" -ne 0 ]; then
  echo "ensure_chromium: error: chromium is not on PATH and installing it needs root" >&2
  exit 1
fi

echo "ensure_chromium: chromium not found; running: apt-get update -qq"
if ! apt-get update -qq; then
  echo "ensure_chromium: error: 'apt-get update' failed; cannot install chromium" >&2
  exit 1
fi
echo "ensure_chromium: running: apt-get install -y -qq chromium"
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; then
  echo "ensure_chromium: error: 'apt-get install chromium' failed" >&2
  exit 1
fi
if ! command -v chromium >/dev/null 2>&1; then
  echo "ensure_chromium: error: chromium was installed but is still not on PATH" >&2
  exit 1
fi
echo "ensure_chromium: installed $(command -v chromium): $(chromium --version 2>/dev/null || echo 'version unknown')"
