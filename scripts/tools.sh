#!/usr/bin/env bash
# Installs the build tools a fresh machine lacks into ./.tools (never system-wide)
# and prints the PATH entries to use. Sourced by scripts/test.sh and scripts/up.sh.
#
# pingora's dependency tree builds zlib-ng through the `cmake` crate, which needs
# a `cmake` binary. PyPI ships cmake as a self-contained wheel, so a venv gives us
# one without root or apt.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
if ! command -v cmake >/dev/null 2>&1; then
  if [ ! -x "$tools/venv/bin/cmake" ]; then
    echo "uload: cmake not found; installing it from PyPI into $tools/venv" >&2
    python3 -m venv "$tools/venv"
    "$tools/venv/bin/python" -m pip install --quiet 'cmake>=3.20,<5'
  fi
  export PATH="$tools/venv/bin:$PATH"
fi
