#!/usr/bin/env bash
# The README's test command: installs what the build needs (cmake, into
# ./.tools, see scripts/tools.sh), then builds and runs every test, and the
# unit tests of the load-test driver's statistics (Python, no servers).
#
# Tests that need what this machine may not give (root, `mount`, `setpriv`)
# pass without their real checks there; each records it in the directory
# ULOAD_TEST_SKIPS names (tests/common/mod.rs, `skip`), and the list is
# printed after `cargo test`, whether it passed or not. The exit status is
# cargo test's, then the Python tests'.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/tools.sh
skips="$(mktemp -d "${TMPDIR:-/tmp}/uload-test-skips.XXXXXX")"
trap 'rm -rf "$skips"' EXIT
export ULOAD_TEST_SKIPS="$skips"
status=0
cargo test --locked "$@" || status=$?
shopt -s nullglob
skipped=("$skips"/*)
if [ "${#skipped[@]}" -eq 0 ]; then
  echo "no test skipped its real checks"
else
  echo "${#skipped[@]} tests skipped their real checks:"
  cat "${skipped[@]}" | sed 's/^/  /'
fi
if [ "$status" -ne 0 ]; then
  exit "$status"
fi
PYTHONDONTWRITEBYTECODE=1 python3 -m unittest discover -s loadtest -p 'test_*.py'
