#!/usr/bin/env bash
# Checks every shipped configuration file with the tool that reads it:
#   conf/uload.yaml          -> uload check-config (the real binary)
#   conf/prometheus/*.yml    -> promtool check rules / check config, and
#                               promtool test rules tests/prometheus/alerts_test.yml
#   conf/systemd/*.service   -> systemd-analyze verify (where systemd is installed)
#   conf/grafana/*.json      -> parsed as JSON; every metric it graphs must be
#                               one the edge or admin exports (docs/operations.md)
# promtool is not on a fresh machine: it is taken from Debian's `prometheus`
# package (downloaded, not installed: only the promtool binary is extracted
# into ./.tools/bin). Called by .ci/run after the tests have built the binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
bin="${CARGO_TARGET_DIR:-$root/target}/debug/uload"
[ -x "$bin" ] || cargo build --locked --quiet
fail=0

echo "check-conf: uload check-config conf/uload.yaml"
"$bin" check-config conf/uload.yaml || fail=1

promtool="$(command -v promtool || true)"
if [ -z "$promtool" ]; then
  promtool="$root/.tools/bin/promtool"
  if [ ! -x "$promtool" ]; then
    echo "check-conf: promtool not found; extracting it from Debian's prometheus package" >&2
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && { apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null; }; })
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
    mkdir -p "$root/.tools/bin"
    cp "$tmp/x/usr/bin/promtool" "$promtool"
  fi
fi
echo "check-conf: promtool check rules/config"
"$promtool" check rules conf/prometheus/alerts.yml || fail=1
# What each alert does with given series (when it fires, when it must not).
"$promtool" test rules tests/prometheus/alerts_test.yml || fail=1
"$promtool" check config conf/prometheus/prometheus.yml || fail=1

if command -v systemd-analyze >/dev/null 2>&1; then
  echo "check-conf: systemd-analyze verify"
  units="$(mktemp -d)"
  # verify checks that ExecStart's binary exists: point it at the one just built.
  for f in conf/systemd/*.service; do
    sed "s|/usr/local/bin/uload|$bin|" "$f" >"$units/$(basename "$f")"
  done
  # Warnings are errors here: an unknown key is a silently ignored setting.
  out="$(systemd-analyze verify "$units"/*.service 2>&1)" || fail=1
  if [ -n "$out" ]; then echo "$out"; fail=1; fi
  rm -rf "$units"
else
  echo "check-conf: systemd-analyze not installed; unit files not checked"
fi

echo "check-conf: grafana dashboards"
python3 - "$bin" <<'PY' || fail=1
import json, re, sys, glob
known = set(re.findall(r"`([a-z_]+)", open("docs/operations.md").read()))
bad = []
for path in glob.glob("conf/grafana/*.json"):
    dash = json.load(open(path))
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            for name in re.findall(r"\b([a-z_]+(?:_total|_seconds|_bytes|_links|_sequence|_records|_up|_applied|_bucket|_fds|_threads))\b", t["expr"]):
                base = re.sub(r"_bucket$", "", name)
                if base not in known:
                    bad.append(f"{path}: panel {panel['title']!r}: {name} is not documented in docs/operations.md")
for b in bad:
    print(b)
sys.exit(1 if bad else 0)
PY
exit $fail
