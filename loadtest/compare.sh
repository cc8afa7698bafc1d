#!/usr/bin/env bash
# One command for the uload edge / nginx / HAProxy comparison (issue 4):
#
#   loadtest/compare.sh                      # 1M links
#   loadtest/compare.sh 1000000 10000000     # 1M, then 10M
#   loadtest/compare.sh 1000000 --perf       # also profile each server (perf)
#
# Installs what is missing (loadtest/install.sh), builds the release binary,
# then runs loadtest/compare.py (arguments are passed on; see --help there).
# Results: stdout, and /var/tmp/uload-loadtest/results-N.{md,json}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
workdir=/var/tmp/uload-loadtest
args=()
# --workdir DIR and --workdir=DIR (compare.py takes both): the trap below
# must read the pids file of the run it started, not the default one's.
prev=""
for a in "$@"; do
  case "$prev" in --workdir) workdir="$a" ;; esac
  case "$a" in
    --workdir=*) workdir="${a#--workdir=}" ;;
  esac
  args+=("$a")
  prev="$a"
done

# Kill whatever compare.py started if compare.py itself dies (it cleans up
# after itself on errors, Ctrl-C and SIGTERM; this covers SIGKILL).
cleanup() {
  local f="$workdir/pids"
  [ -f "$f" ] || return 0
  # Another run holds the work dir (this one's compare.py refused it, or
  # never got that far): those servers are that run's.
  if [ -e "$workdir/lock" ] && ! flock -n "$workdir/lock" true; then return 0; fi
  while read -r pgid name; do
    [ -n "$pgid" ] || continue
    if [ -r "/proc/$pgid/cmdline" ] && tr '\0' ' ' <"/proc/$pgid/cmdline" | grep -q -- "$name"; then
      kill -TERM -- "-$pgid" 2>/dev/null || true
      sleep 1
      kill -KILL -- "-$pgid" 2>/dev/null || true
    fi
  done <"$f"
  rm -f "$f"
}
trap cleanup EXIT

source loadtest/install.sh
source scripts/tools.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
cargo build --release --locked
python3 loadtest/compare.py --uload "$CARGO_TARGET_DIR/release/uload" --workdir "$workdir" ${args[@]+"${args[@]}"}
