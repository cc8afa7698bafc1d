#!/usr/bin/env bash
# Installs the build tools a fresh machine lacks into ./.tools (never system-wide)
# and puts them on PATH. Sourced by scripts/test.sh, scripts/up.sh, .ci/run and
# the load tests, and by hand (README: `source scripts/tools.sh && cargo bench`),
# so it sets no shell options (an interactive shell must not inherit `set -e`);
# it returns non-zero when an install fails, which its callers' own `set -e` or
# `&&` act on.
#
# pingora's dependency tree builds zlib-ng through the `cmake` crate, which needs
# a `cmake` binary. PyPI ships cmake as a self-contained wheel, so a venv gives us
# one without root or apt.
uload_tools() {
  local root tools
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
  tools="$root/.tools"
  if ! command -v cmake >/dev/null 2>&1; then
    if [ ! -x "$tools/venv/bin/cmake" ]; then
      echo "uload: cmake not found; installing it from PyPI into $tools/venv" >&2
      if ! { python3 -m venv "$tools/venv" &&
        "$tools/venv/bin/python" -m pip install --quiet 'cmake>=3.20,<5'; }; then
        echo "uload: installing cmake into $tools/venv failed" >&2
        return 1
      fi
    fi
    export PATH="$tools/venv/bin:$PATH"
  fi
}
uload_tools
