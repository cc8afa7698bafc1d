#!/usr/bin/env bash
# The README's run command: builds uload (installing cmake locally when the
# machine lacks it, see scripts/tools.sh) and runs admin and edge together
# with the data dir ./data. Extra arguments go to `uload up`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/tools.sh
cargo build --release --locked
exec "${CARGO_TARGET_DIR:-target}/release/uload" up --config conf/uload.yaml "$@"
