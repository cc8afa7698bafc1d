#!/usr/bin/env bash
# The edge-restart chaos test of tests/chaos_edge.rs at 10M links, outside CI:
# import N links with `uload import`, start the edge, then SIGKILL it and start
# it again (no admin running) RESTARTS times, timing each restart to the first
# served redirect and checking 2,000 sampled links plus the first and last.
#
#   tests/chaos/edge_restart_10m.sh                   # N=10000000
#   N=1000000 RESTARTS=5 tests/chaos/edge_restart_10m.sh
#
# Environment:
#   N            links (default 10000000)
#   RESTARTS     SIGKILL + restart rounds (default 3)
#   LINKS_DIR    loadtest/gen_links.py output dir (default
#                /var/tmp/uload-loadtest/links-N, the one loadtest/compare.py
#                uses; reused when it holds the same N, else written: about
#                40 s and 3 GB at 10M)
#   CHAOS_TMPDIR where the test's temp dir (data dir: about 2 GB at 10M) goes
#                (default /var/tmp)
#
# It builds the release binary and test (`cargo test --release`, honouring
# CARGO_TARGET_DIR) and runs the ignored test `edge_restart_with_a_given_table`
# with CHAOS_EDGE_TSV pointing at LINKS_DIR/links.tsv; the figures are the
# lines starting with "edge restart". Every process it starts is killed when
# the test ends (Drop guards); everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/tools.sh
N="${N:-10000000}"
RESTARTS="${RESTARTS:-3}"
LINKS_DIR="${LINKS_DIR:-/var/tmp/uload-loadtest/links-$N}"
export CHAOS_TMPDIR="${CHAOS_TMPDIR:-/var/tmp}"
python3 loadtest/gen_links.py -n "$N" --out "$LINKS_DIR" >&2
CHAOS_EDGE_TSV="$LINKS_DIR/links.tsv" CHAOS_EDGE_RESTARTS="$RESTARTS" \
  cargo test --release --locked --test chaos_edge -- \
  --ignored --nocapture --exact edge_restart_with_a_given_table
