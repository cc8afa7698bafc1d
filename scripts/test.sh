#!/usr/bin/env bash
# The README's test command: installs what the build needs (cmake, into
# ./.tools, see scripts/tools.sh), then builds and runs every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/tools.sh
cargo test --locked "$@"
