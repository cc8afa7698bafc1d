#!/usr/bin/env bash
# Runs the k6 scripts once against `uload up` (admin + edge in one process),
# started here with a temporary config, data dir and API key:
#
#   loadtest/k6_up.sh                    # journey, write_burst, redirect_mix
#   loadtest/k6_up.sh journey            # only some of them
#
# The data dir (on /var/tmp, a real disk: creations are fsynced) starts with
# 100,000 imported links (loadtest/gen_links.py) for redirect_mix.js.
# Pingora runs with the shipped conf's `threads: 2`.
# Summaries: stdout and $WORKDIR/k6-<script>.{txt,json}.
# Every process started here is killed on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
WORKDIR="${WORKDIR:-/var/tmp/uload-loadtest}"
scripts=("$@")
[ "${#scripts[@]}" -gt 0 ] || scripts=(journey write_burst redirect_mix)

source loadtest/install.sh
source scripts/tools.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
# LT_ULOAD_BIN: test this binary instead of building one.
if [ -z "${LT_ULOAD_BIN:-}" ]; then cargo build --release --locked; fi
mkdir -p "$WORKDIR/bin"
cp "${LT_ULOAD_BIN:-$CARGO_TARGET_DIR/release/uload}" "$WORKDIR/bin/uload-k6.tmp"
mv "$WORKDIR/bin/uload-k6.tmp" "$WORKDIR/bin/uload-k6"
uload="$WORKDIR/bin/uload-k6"

tmp="$(mktemp -d "$WORKDIR/k6-up.XXXXXX")"
up_pid=""
cleanup() {
  if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then
    kill -TERM -- "-$up_pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$up_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$up_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp/data"
}
trap cleanup EXIT

read -r edge_port admin_port metrics_port < <(python3 - <<'EOF'
import socket
ss = [socket.socket() for _ in range(3)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])
EOF
)
export ULOAD_API_KEY="${ULOAD_API_KEY:-k6-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
for v in $(env | grep -o '^ULOAD_[A-Z0-9_]*' | grep -v '^ULOAD_API_KEY$'); do unset "$v"; done

cat >"$tmp/pingora.yaml" <<EOF
---
version: 1
threads: 2
pid_file: $tmp/edge.pid
upgrade_sock: $tmp/edge-upgrade.sock
error_log: null
grace_period_seconds: 0
graceful_shutdown_timeout_seconds: 1
EOF
cat >"$tmp/uload.yaml" <<EOF
data_dir: $tmp/data
public_base_url: http://127.0.0.1:$edge_port
edge:
  listen: 127.0.0.1:$edge_port
  admin_upstreams: ["127.0.0.1:$admin_port"]
  pingora_conf: pingora.yaml
admin:
  listen: 127.0.0.1:$admin_port
metrics:
  listen: 127.0.0.1:$metrics_port
EOF

links="$WORKDIR/links-100000"
python3 loadtest/gen_links.py -n 100000 --out "$links"
"$uload" import "$links/links.tsv" --data-dir "$tmp/data" >"$tmp/import.log" 2>&1

RUST_LOG="${RUST_LOG:-warn}" setsid "$uload" up --config "$tmp/uload.yaml" >"$tmp/up.log" 2>&1 &
up_pid=$!
base="http://127.0.0.1:$edge_port"
ok=0
for _ in $(seq 1 300); do   # up to 30 s: the edge marks the admin healthy within health_check_interval
  if curl -sf -o /dev/null "$base/api/health"; then ok=1; break; fi
  kill -0 "$up_pid" 2>/dev/null || break
  sleep 0.1
done
if [ "$ok" != 1 ]; then
  echo "k6_up: uload up did not answer /api/health through the edge:" >&2
  tail -20 "$tmp/up.log" >&2
  exit 1
fi
echo "k6_up: uload up on $base (pid $up_pid), data in $tmp/data; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "k6_up: edge /health: $(curl -s "$base/health")"

# utime+stime of the uload up process, in clock ticks
cpu_ticks() { awk '{print $14 + $15}' "/proc/$up_pid/stat"; }
# user+system seconds of this shell's waited-for children (k6; sed and awk
# add a few ms): `times` must run in this shell, not in a subshell, so it
# writes a file that `children_cpu` reads.
save_times() { times >"$tmp/times"; }
children_cpu() {
  awk 'NR==2 { t=0; for (i=1;i<=2;i++) { split($i,a,/[ms]/); t+=a[1]*60+a[2] } printf "%.2f", t }' "$tmp/times"
}
hz="$(getconf CLK_TCK)"
status=0
for s in "${scripts[@]}"; do
  echo "=== k6 $s ($(date -u +%H:%M:%S) UTC, load average $(cut -d' ' -f1-3 /proc/loadavg))"
  rc=0
  save_times; k0="$(children_cpu)"
  c0="$(cpu_ticks)"; t0="$(date +%s.%N)"
  # LT_PROBE=1: loadtest/propagation.py alongside (one create at a time,
  # polled back to back), for as long as the script runs at most.
  probe_pid=""
  if [ -n "${LT_PROBE:-}" ]; then
    python3 loadtest/propagation.py --base "$base" --seconds "${LT_PROBE_SECONDS:-20}" \
      --json "$WORKDIR/propagation-$s.json" >"$WORKDIR/propagation-$s.txt" 2>&1 &
    probe_pid=$!
  fi
  "$K6_BIN" run --no-color -e BASE_URL="$base" -e CODES="$links/codes.txt" \
    --summary-export "$WORKDIR/k6-$s.json" "loadtest/k6/$s.js" >"$WORKDIR/k6-$s.txt" 2>&1 || rc=$?
  # the summary (thresholds, checks, metrics), without the progress lines
  sed -n '/THRESHOLDS\|█ TOTAL RESULTS\|checks\.\.\.\|✓\|✗/,$p' "$WORKDIR/k6-$s.txt" | grep -v 'running (' || true
  c1="$(cpu_ticks)"; t1="$(date +%s.%N)"
  # k6's CPU is taken before the probe is waited for (`times` counts every
  # child waited for).
  save_times; k1="$(children_cpu)"
  if [ -n "$probe_pid" ]; then
    wait "$probe_pid" || rc=1
    cat "$WORKDIR/propagation-$s.txt"
  fi
  echo "=== k6 $s: exit $rc; uload up used $(awk -v a="$c0" -v b="$c1" -v hz="$hz" 'BEGIN{printf "%.2f", (b-a)/hz}') s of CPU in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s; k6 used $(awk -v a="$k0" -v b="$k1" 'BEGIN{printf "%.2f", b-a}') s (load average $(cut -d' ' -f1-3 /proc/loadavg))"
  [ "$rc" = 0 ] || status=$rc
done
exit "$status"
