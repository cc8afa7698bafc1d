#!/usr/bin/env bash
# The README's test command: installs what the build needs (cmake, into
# ./.tools, see scripts/tools.sh), then builds and runs every test, and the
# unit tests of the load-test driver's statistics (Python, no servers).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/tools.sh
cargo test --locked "$@"
PYTHONDONTWRITEBYTECODE=1 python3 -m unittest discover -s loadtest -p 'test_*.py'
