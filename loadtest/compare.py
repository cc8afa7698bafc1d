#!/usr/bin/env python3
"""uload edge vs nginx vs HAProxy on the same links, the same load, the same run.

For each link count N (default 1000000):

 1. loadtest/gen_links.py writes N links (lowercase base36 codes) and the
    files for each server (reused when already there for the same N/seed).
 2. `uload import links.csv` into a fresh data dir (status 301, like the
    others); the import time is reported.
 3. Each server is started on its own 127.0.0.1 port with ONE worker:
      uload edge  `uload edge --config uload.yaml`, pingora `threads: 1`
      nginx       `worker_processes 1`, `map $uri $target` + `return 301`
      HAProxy     `nbthread 1`, `path,map(FILE)` + `http-request redirect`
    Start-up time = from just before the process is spawned to the first 301
    for a known code (polled every 2 ms). Servers are started one after the
    other (never competing for CPU while starting), --startup-runs times
    each; the last instance stays up for the load.
 4. A correctness sample per server: 1000 random known codes (status 301 and
    the exact Location) and 100 unknown codes (404), one by one.
 5. wrk with loadtest/redirect_mix.lua, a warm-up run per server, then
    --rounds rounds of A B C, then C B A, ... (the same wrk command against
    each in turn; the order reverses every round).
    Per run: requests/s, p50/p90/p99/p99.9 latency, server CPU (utime+stime of
    every process of the server, from /proc/<pid>/stat, before and after) per
    request, wrk's own CPU, the CPU of everything else on the machine during
    the run, load average, socket errors, non-3xx answers to known codes.
 6. RSS and PSS (sum over the server's processes, /proc/<pid>/smaps_rollup)
    after start-up and after the load.
 7. Prints ONE table per N: medians across rounds and each figure's ratio to
    nginx, then the issue's targets with met / not met. The two targets that
    compare with nginx (CPU per request, p99) are judged on the median of the
    per-round ratios (each round's edge run over its nginx run, measured back
    to back, so a machine that is busier for a while moves both), with the
    ratio of the medians printed beside it. Everything goes to
    WORKDIR/results-N.json and WORKDIR/results-N.md as well.
 8. --perf: one more wrk run per server under `perf record -e cpu-clock -g`
    (--perf-call-graph dwarf: DWARF unwinding, through glibc too),
    `perf report --no-children` kept in WORKDIR/perf-<server>-N.txt, and for
    the edges the share of each part of the request path (metrics, limiter,
    header reads, ...; inlined calls resolved with llvm-addr2line, so build
    with line tables and frame pointers) in WORKDIR/perf-<server>-N-shares.txt;
    `compare.py --shares PERF_DATA` prints those shares for any such file.
    --syscalls: one more run per server under `perf stat` (syscalls and
    context switches per request).
    --edge-variant NAME:KEY=VALUE,...: one more edge (same data dir, its own
    pingora.yaml / uload.yaml settings) in the same rounds. KEY is a
    pingora.yaml key, or SECTION.KEY for uload.yaml (edge.follow_interval_ms,
    rate_limit.client_requests_per_second, ...; a rate_limit section gets a
    state_dir in the variant's own directory).
    --edge-bin NAME:PATH: one more edge from another uload binary (an older
    commit's build, for an A/B), with edge's settings and its own data dir
    imported with that binary, in the same rounds; --ratio-to edge-NAME makes
    the table's ratios relative to it.

Every process it starts is in its own process group and is killed on exit
(also on Ctrl-C / SIGTERM); their group ids are in WORKDIR/pids so that
compare.sh's trap can kill them if this driver itself is killed.

Usage: compare.py [--uload PATH] [--rounds 3] [--duration 10] [N ...]
"""

import argparse
import atexit
import collections
import fcntl
import hashlib
import http.client
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLK = os.sysconf("SC_CLK_TCK")
SERVERS = ("edge", "nginx", "haproxy")
LABEL = {"edge": "uload edge", "nginx": "nginx", "haproxy": "HAProxy"}
NOT_FOUND = '{"error":{"code":"not_found","field":null,"message":"no such short link"}}'

_running = []  # Server objects to stop on exit
_pids_file = None
_workdir_lock = None  # held for the run (flock on WORKDIR/lock)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def url_for(i):
    return f"https://example.com/articles/{i}?utm_source=uload&utm_medium=short"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- /proc

def children(pid):
    """Every descendant of pid (from /proc/*/stat's ppid)."""
    parent = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rfind(")") + 2:].split()
        parent.setdefault(int(fields[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in parent.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def cpu_ticks(pids):
    """(utime, stime) summed over pids, in clock ticks."""
    u = s = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rfind(")") + 2:].split()
        u += int(fields[11])
        s += int(fields[12])
    return u, s


def memory(pids, solo_prefix=None):
    """RSS, PSS, PSS anon, PSS file (kB) summed over pids, and VmHWM.

    solo_prefix: mappings of files under this directory count with their RSS
    rather than their PSS. The edge variants map the same snapshot file, so
    PSS would split its pages between them; each edge alone would pay all of
    them (nginx and HAProxy map no such file, so for them PSS is unchanged).
    """
    m = {"rss_kb": 0, "pss_kb": 0, "pss_anon_kb": 0, "pss_file_kb": 0, "hwm_kb": 0}
    keys = {"Rss:": "rss_kb", "Pss:": "pss_kb", "Pss_Anon:": "pss_anon_kb", "Pss_File:": "pss_file_kb"}
    for p in pids:
        try:
            if solo_prefix:
                solo = False
                rss = 0
                with open(f"/proc/{p}/smaps") as f:
                    for line in f:
                        parts = line.split()
                        if not parts:
                            continue
                        if not parts[0].endswith(":"):  # a mapping's header line
                            path = parts[5] if len(parts) >= 6 else ""
                            solo = path.startswith(solo_prefix)
                            # smaps has no Pss_Anon/Pss_File per mapping (only
                            # smaps_rollup does): a mapping of a file is file
                            # memory, the rest ([heap], [stack], no name) anon.
                            anon = path == "" or path.startswith("[")
                            continue
                        if parts[0] == "Rss:":
                            rss = int(parts[1])
                            m["rss_kb"] += rss
                        elif parts[0] == "Pss:":
                            pss = rss if solo else int(parts[1])
                            m["pss_kb"] += pss
                            m["pss_anon_kb" if anon else "pss_file_kb"] += pss
            else:
                with open(f"/proc/{p}/smaps_rollup") as f:
                    for line in f:
                        parts = line.split()
                        if parts and parts[0] in keys:
                            m[keys[parts[0]]] += int(parts[1])
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        m["hwm_kb"] += int(line.split()[1])
        except OSError:
            continue
    return m


def machine_busy_ticks():
    """(ticks the machine's CPUs were busy, ticks the hypervisor took from
    them: "steal", time a vCPU wanted to run and was not given a CPU; each
    such stall freezes whatever runs on that vCPU, the load generator or
    the server, and shows up in the latency tail)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    steal = v[7] if len(v) > 7 else 0
    return sum(v[:7]) - idle, steal


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


# ---------------------------------------------------------------- servers

class Server:
    def __init__(self, name, cmd, port, workdir, env=None):
        self.name, self.cmd, self.port, self.workdir = name, cmd, port, workdir
        self.env = env
        self.proc = None
        self.logf = None

    def start(self):
        self.logf = open(os.path.join(self.workdir, f"{self.name}.log"), "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self.logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=self.env)
        _running.append(self)
        _write_pids()

    def pids(self):
        if not self.proc or self.proc.poll() is not None:
            return []
        return [self.proc.pid] + children(self.proc.pid)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if not self.proc:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                pass
        # whatever is left of the group (workers, a wedged master)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if self in _running:
            _running.remove(self)
        _write_pids()
        if self.logf:
            self.logf.close()
            self.logf = None
        self.proc = None

    def log_tail(self, n=15):
        try:
            with open(os.path.join(self.workdir, f"{self.name}.log"), "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode("utf-8", "replace")
        except OSError:
            return ""


def _write_pids():
    if not _pids_file:
        return
    with open(_pids_file, "w") as f:
        for s in _running:
            if s.proc:
                f.write(f"{s.proc.pid} {os.path.basename(s.cmd[0])}\n")


def stop_all():
    for s in list(_running):
        try:
            s.stop()
        except Exception as e:  # keep stopping the others
            log(f"stopping {s.name}: {e}")


def _on_signal(signum, frame):
    log(f"signal {signum}: stopping every server")
    stop_all()
    sys.exit(128 + signum)


def edge_settings(settings):
    """Splits KEY=VALUE settings into pingora.yaml lines and uload.yaml sections.

    A key without a dot is a pingora.yaml line; SECTION.KEY is KEY in
    uload.yaml's SECTION (edge.follow_interval_ms, rate_limit.client_burst, ...).
    Returns (pingora lines, {section: lines}).
    """
    pingora, sections = "", {}
    for kv in settings:
        k, v = kv.split("=", 1)
        if "." in k:
            section, key = k.split(".", 1)
            sections[section] = sections.get(section, "") + f"  {key}: {v}\n"
        else:
            pingora += f"{k}: {v}\n"
    return pingora, sections


def write_configs(name, wd, links_dir, n, port, admin_port, metrics_port, args):
    """Writes the server's config into wd and returns its command line."""
    if name == "edge" or name.startswith("edge-"):
        settings = list(args.pingora_set)
        if args.follow_interval_ms:
            settings.append(f"edge.follow_interval_ms={args.follow_interval_ms}")
        data = f"{wd}/data"
        uload_bin = args.uload_bin
        if name in args.edge_bins:
            # another build: its own copy of the binary and its own data dir
            # (imported with that binary), same settings as "edge"
            uload_bin = args.edge_bins[name]
            data = f"{wd}/data-{name}"
        if name != "edge":
            settings += args.variants.get(name, [])
            wd = os.path.join(wd, name)
            os.makedirs(wd, exist_ok=True)
        extra_pingora, sections = edge_settings(settings)
        # Each edge's state files (click table, limiter) in its own run
        # dir: the default, ./state, is the caller's directory (the
        # checkout), shared by every edge of the run and kept between runs.
        sections.setdefault("rate_limit", "")
        if "  state_dir:" not in sections["rate_limit"]:
            sections["rate_limit"] += f"  state_dir: {wd}/state\n"
        follow = sections.pop("edge", "")
        admin_extra = sections.pop("admin", "")
        metrics_extra = sections.pop("metrics", "")
        other = "".join(f"{sec}:\n{lines}" for sec, lines in sections.items())
        with open(os.path.join(wd, "pingora.yaml"), "w") as f:
            f.write(pingora_yaml(wd, extra_pingora))
        with open(os.path.join(wd, "uload.yaml"), "w") as f:
            f.write(f"""data_dir: {data}
public_base_url: http://127.0.0.1:{port}
edge:
  listen: 127.0.0.1:{port}
  default_status: 301
  # no admin runs here: /api is not used by the redirect benchmark
  admin_upstreams: ["127.0.0.1:{admin_port}"]
  pingora_conf: pingora.yaml
{follow}admin:
  listen: 127.0.0.1:{admin_port}
{admin_extra}metrics:
  listen: 127.0.0.1:{metrics_port}
{metrics_extra}{other}""")
        return [uload_bin, "edge", "--config", f"{wd}/uload.yaml"]
    if name == "nginx":
        tmp = os.path.join(wd, "nginx-tmp")
        os.makedirs(tmp, exist_ok=True)
        # Hash sized so that nginx's first try fits (see README): bucket 256
        # bytes (about 10 entries of 24 bytes), about 2 buckets per link.
        max_size = max(1024, 2 * n)
        with open(os.path.join(wd, "nginx.conf"), "w") as f:
            f.write(f"""worker_processes 1;
daemon off;
master_process on;
pid {wd}/nginx.pid;
error_log {wd}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  server_tokens off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  map_hash_bucket_size 256;
  map_hash_max_size {max_size};
  map $uri $target {{
    default "";
    include {links_dir}/nginx_map.conf;
  }}
  server {{
    listen 127.0.0.1:{port};
    default_type application/json;
    if ($target = "") {{ return 404 '{NOT_FOUND}'; }}
    add_header Cache-Control "public, max-age=3600";
    return 301 $target;
  }}
}}
""")
        return [shutil.which("nginx") or "/usr/sbin/nginx", "-c", f"{wd}/nginx.conf", "-p", wd,
                "-e", f"{wd}/nginx-error.log"]
    if name == "haproxy":
        with open(os.path.join(wd, "haproxy.cfg"), "w") as f:
            f.write(f"""global
    nbthread 1
    maxconn 4096
    pidfile {wd}/haproxy.pid
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend redirects
    bind 127.0.0.1:{port}
    # one map lookup per request (map_str: exact match on the path)
    http-request set-var(txn.target) path,map({links_dir}/haproxy.map)
    http-request redirect location %[var(txn.target)] code 301 if {{ var(txn.target) -m found }}
    http-request return status 404 content-type application/json string '{NOT_FOUND}'
    http-after-response set-header Cache-Control "public, max-age=3600" if {{ status 301 }}
""")
        return [shutil.which("haproxy") or "/usr/sbin/haproxy", "-f", f"{wd}/haproxy.cfg", "-db"]
    raise ValueError(name)


def pingora_yaml(wd, extra=""):
    """The edge's Pingora conf for a benchmark: one worker thread, files in wd."""
    return f"""---
version: 1
threads: 1
pid_file: {wd}/edge.pid
upgrade_sock: {wd}/edge-upgrade.sock
error_log: null
grace_period_seconds: 0
graceful_shutdown_timeout_seconds: 1
{extra}"""


def probe(port, path, timeout=2.0):
    """Status of one GET, or None when nothing answers yet."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data and len(data) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        parts = data.split(b" ", 2)
        return int(parts[1]) if len(parts) >= 2 else None
    except (OSError, ValueError):
        return None


def start_timed(server, known_path, timeout_s):
    """Starts the server; ms from spawn to the first 3xx for known_path, or None."""
    t0 = time.monotonic()
    server.start()
    deadline = t0 + timeout_s
    polls = 0
    while time.monotonic() < deadline:
        st = probe(server.port, known_path)
        polls += 1
        if st is not None and 300 <= st < 400:
            return (time.monotonic() - t0) * 1000.0
        if not server.alive():
            log(f"{server.name} exited while starting:\n{server.log_tail()}")
            return None
        time.sleep(0.002)
    log(f"{server.name}: no redirect within {timeout_s:.0f} s ({polls} polls)")
    return None


def check_sample(port, codes, unknown, n_known=1000, n_unknown=100, seed=7):
    """Known codes one by one: 301 + exact Location; unknown: 404."""
    rng = random.Random(seed)
    bad = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    def get(path):
        nonlocal conn
        for attempt in range(2):
            try:
                conn.request("GET", path)
                r = conn.getresponse()
                r.read()
                return r.status, r.getheader("location")
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        return None, None
    for _ in range(n_known):
        i = rng.randrange(len(codes))
        st, loc = get("/" + codes[i])
        if st != 301 or loc != url_for(i):
            bad.append(f"/{codes[i]}: {st} {loc}")
    for _ in range(n_unknown):
        c = unknown[rng.randrange(len(unknown))]
        st, _ = get("/" + c)
        if st != 404:
            bad.append(f"/{c} (unknown): {st}")
    conn.close()
    return bad


def read_codes(path, limit=None):
    with open(path) as f:
        out = []
        for line in f:
            out.append(line.rstrip("\n"))
            if limit and len(out) >= limit:
                break
        return out


# ---------------------------------------------------------------- wrk

SYSCALL_EVENTS = ["raw_syscalls:sys_enter", "context-switches", "syscalls:sys_enter_epoll_wait",
                  "syscalls:sys_enter_futex", "syscalls:sys_enter_recvfrom", "syscalls:sys_enter_read",
                  "syscalls:sys_enter_sendto", "syscalls:sys_enter_write", "syscalls:sys_enter_writev"]


def run_wrk(args, server, links_dir, duration, tag, wd, perf_out=None, stat_out=None):
    env = dict(os.environ, LT_CODES=f"{links_dir}/codes.txt", LT_UNKNOWN=f"{links_dir}/unknown.txt",
               LT_SEED=str(args.seed), LT_CLOSE="1" if args.close else "0")
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration}s", "--latency",
           "--timeout", "2s", "-s", os.path.join(HERE, "redirect_mix.lua"),
           f"http://127.0.0.1:{server.port}"]
    pids = server.pids()
    if not pids:
        raise RuntimeError(f"{server.name} is not running:\n{server.log_tail()}")
    perf = None
    if perf_out:
        perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "1999",
                                 "--call-graph", args.perf_call_graph,
                                 "-o", perf_out, "-p", ",".join(map(str, pids))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(0.5)
    if stat_out:
        perf = subprocess.Popen(["perf", "stat", "-x", ",", "-o", stat_out, "-e", ",".join(SYSCALL_EVENTS),
                                 "-p", ",".join(map(str, pids))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(0.5)
    la = loadavg()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, steal0 = machine_busy_ticks()
    u0, s0 = cpu_ticks(pids)
    t0 = time.monotonic()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=duration + 60, text=True)
    wall = time.monotonic() - t0
    u1, s1 = cpu_ticks(pids)
    busy1, steal1 = machine_busy_ticks()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if perf:
        perf.send_signal(signal.SIGINT)
        try:
            perf.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(perf.pid, signal.SIGKILL)
            perf.wait()
    with open(os.path.join(wd, f"wrk-{tag}.txt"), "w") as f:
        f.write(" ".join(cmd) + "\n" + p.stdout)
    m = re.search(r"^LT_RESULT (\{.*\})$", p.stdout, re.M)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({p.returncode}):\n{p.stdout[-2000:]}")
    r = json.loads(m.group(1))
    req = max(r["requests"], 1)
    wrk_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    server_cpu = (u1 - u0 + s1 - s0) / CLK
    if stat_out:
        counts = {}
        with open(stat_out) as f:
            for line in f:
                parts = line.strip().split(",")
                if len(parts) >= 3 and parts[2] in SYSCALL_EVENTS:
                    try:
                        counts[parts[2]] = float(parts[0])
                    except ValueError:
                        pass
        # perf stat counted from its start to its end; wrk's count is close
        # enough (the server is idle outside the run).
        r["per_request"] = {k.split(":")[-1].replace("sys_enter_", ""): v / req for k, v in counts.items()}
    r.update({
        "server": server.name, "tag": tag, "wall_s": round(wall, 3), "loadavg": la,
        "server_cpu_s": server_cpu,
        "server_user_s": (u1 - u0) / CLK, "server_sys_s": (s1 - s0) / CLK,
        "cpu_us_per_req": server_cpu * 1e6 / req,
        "user_us_per_req": (u1 - u0) / CLK * 1e6 / req,
        "sys_us_per_req": (s1 - s0) / CLK * 1e6 / req,
        "wrk_cpu_s": round(wrk_cpu, 3),
        "other_cpu_s": round((busy1 - busy0) / CLK - server_cpu - wrk_cpu, 3),
        "steal_s": round((steal1 - steal0) / CLK, 3),
        "bytes_per_resp": r["bytes"] / req,
    })
    return r


# ---------------------------------------------------------------- report

def fmt(v, unit=""):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if abs(v) >= 100 or v == int(v):
        s = f"{v:,.0f}"
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.2f}"
    return s + unit


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


ROWS = [
    # key, label, unit, lower is better
    ("rps", "requests/s", "", False),
    ("p50_ms", "p50 latency", " ms", True),
    ("p99_ms", "p99 latency", " ms", True),
    ("p999_ms", "p99.9 latency", " ms", True),
    ("cpu_us_per_req", "**server CPU per request**", " µs", True),
    ("user_us_per_req", "  of which user", " µs", True),
    ("sys_us_per_req", "  of which kernel", " µs", True),
    ("rss_mb", "RSS after load (sum of processes)", " MB", True),
    ("pss_mb", "PSS after load (sum of processes)", " MB", True),
    ("pss_b_per_link", "PSS per link", " B", True),
    ("startup_ms", "start-up to first redirect", " ms", True),
    ("known_non_3xx", "non-3xx for known codes (sum)", "", True),
    ("socket_errors", "socket errors (sum)", "", True),
    ("sample_bad", "sample check failures", "", True),
    ("bytes_per_resp", "bytes per response", "", True),
    ("wrk_cpu_us_per_req", "wrk CPU per request", " µs", True),
    ("idle_cpu_pct", "idle CPU (no load)", " %", True),
]


def summarize(name, runs, extra):
    rs = [r for r in runs if r["server"] == name]
    if not rs:
        return None
    med = lambda k: statistics.median(r[k] for r in rs)
    s = {
        "rps": med("rps"),
        "p50_ms": med("p50_us") / 1000, "p99_ms": med("p99_us") / 1000, "p999_ms": med("p999_us") / 1000,
        "cpu_us_per_req": med("cpu_us_per_req"), "user_us_per_req": med("user_us_per_req"),
        "sys_us_per_req": med("sys_us_per_req"),
        "known_non_3xx": sum(r["known_non_3xx"] for r in rs),
        "socket_errors": sum(r["socket_errors"] for r in rs),
        "bytes_per_resp": med("bytes_per_resp"),
        "wrk_cpu_us_per_req": statistics.median(r["wrk_cpu_s"] * 1e6 / max(r["requests"], 1) for r in rs),
        "rounds": len(rs),
    }
    s.update(extra)
    return s


def table(n, summ, ref="nginx"):
    """Medians per server, each followed by its ratio to `ref` (nginx unless --ratio-to)."""
    names = [s for s in summ if summ.get(s)]
    if not summ.get(ref):
        ref = None
    cols = []
    for s in names:
        cols.append(s)
        if ref and s != ref:
            cols.append(s + "/" + ref)
    head = "| figure (median of rounds) | " + " | ".join(
        LABEL[c] if "/" not in c else f"{LABEL[c.split('/')[0]]} ÷ {LABEL[ref]}" for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for key, label, unit, _ in ROWS:
        cells = []
        for c in cols:
            if "/" in c:
                a = summ[c.split("/")[0]].get(key)
                b = summ[ref].get(key)
                cells.append(ratio(a, b) if key not in ("known_non_3xx", "socket_errors", "sample_bad") else "")
            else:
                cells.append(fmt(summ[c].get(key), unit))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runs_table(runs):
    lines = ["| run | server | req/s | p50 ms | p99 ms | p99.9 ms | CPU µs/req | user | kernel | wrk CPU s | other CPU s | steal s | load avg | non-3xx known | sock err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append("| {tag} | {srv} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {p999:.2f} | {cpu:.1f} | {u:.1f} | {s:.1f} | {w:.1f} | {o:.1f} | {st} | {la:.2f} | {k} | {e} |".format(
            tag=r["tag"], srv=LABEL[r["server"]], rps=r["rps"], p50=r["p50_us"] / 1000,
            p99=r["p99_us"] / 1000, p999=r["p999_us"] / 1000, cpu=r["cpu_us_per_req"],
            u=r["user_us_per_req"], s=r["sys_us_per_req"], w=r["wrk_cpu_s"], o=r["other_cpu_s"],
            st=fmt(r.get("steal_s")),
            la=r["loadavg"][0], k=r["known_non_3xx"], e=r["socket_errors"]))
    return "\n".join(lines)


def paired_ratios(runs, key, a="edge", b="nginx"):
    """`a`'s figure over `b`'s, round by round (the two runs of a round are
    back to back, so they share the machine's state), in round order."""
    by = {}
    for r in runs:
        m = re.match(r"r(\d+)-", r["tag"])  # round runs only: "r3-edge", not warm-ups or profiles
        if m:
            by[(int(m.group(1)), r["server"])] = r[key]
    rounds = sorted({t for t, _ in by})
    return [by[(t, a)] / by[(t, b)] for t in rounds if (t, a) in by and (t, b) in by and by[(t, b)]]


def sha256_of(path):
    """The SHA-256 of a file in hex (the uload binary a run used), or None."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def pool(results):
    """Round runs of several results files (dicts as compare.py writes them)
    as one list, the rounds renumbered so that each file's pairs stay
    together and none collide. Refused (ValueError): files for different
    link counts or wrk settings, files from different uload binaries
    (`uload_sha256`; every file must record it or none), and the same runs
    given twice (which would only look like more rounds)."""
    def one(key, what):
        values = {json.dumps(r["info"].get(key)) for r in results}
        if len(values) > 1:
            raise ValueError(f"results with different {what}: {sorted(values)}")
    one("n", "link counts")
    one("wrk", "wrk settings")
    one("uload_sha256", "uload binaries (or some without a recorded binary)")
    seen = set()
    for r in results:
        key = json.dumps(r["runs"], sort_keys=True)
        if key in seen:
            raise ValueError("the same runs given twice")
        seen.add(key)
    pooled, offset = [], 0
    for r in results:
        last = 0
        for run in r["runs"]:
            m = re.match(r"r(\d+)-(.*)", run["tag"])
            if m:
                last = max(last, int(m.group(1)))
                pooled.append(dict(run, tag=f"r{offset + int(m.group(1))}-{m.group(2)}"))
        offset += last
    return pooled


def pool_report(paths):
    """`--pool`: the per-round verdicts of the two nginx targets for each
    file and for all of them together."""
    results = [json.load(open(p)) for p in paths]
    pooled = pool(results)
    out = []
    if results[0]["info"].get("uload_sha256") is None:
        out.append("note: these results do not record their uload binary; pool only runs of the same build")
    for key, label, limit in (("cpu_us_per_req", "server CPU per redirect ÷ nginx's", 0.8),
                              ("p99_us", "p99 ÷ nginx's", 1.0)):
        run_medians = []
        for name, runs in [(p, res["runs"]) for p, res in zip(paths, results)] + [("pooled", pooled)]:
            rs = paired_ratios(runs, key)
            if not rs:
                continue
            m, low, high, cov, met, robust = verdict(rs, limit)
            caveat = ""
            if name == "pooled":
                # The pooled interval takes the rounds of all runs as one
                # sample, blind to a shift between runs (the machine's, or
                # nginx's own): it is not called robust unless every run's
                # median is on the pooled median's side of the target.
                robust = robust and all((rm <= limit) == met for rm in run_medians)
                caveat = f" (run medians {', '.join(f'{rm:.3f}' for rm in run_medians)}; rounds of different runs taken as one sample)"
            else:
                run_medians.append(m)
            out.append(f"{name}: {label}: {len(rs)} rounds, median {m:.3f}, {cov:.1%} interval {low:.3f} to {high:.3f}: "
                       f"{'met' if met else 'NOT met'} (target {limit}), {'robustly' if robust else 'not robustly'}{caveat}")
    return "\n".join(out) + "\n"


def median_interval(xs, level=0.95):
    """A distribution-free confidence interval for the median of `xs`: the
    order statistics x(k) and x(n+1-k) for the largest k whose interval
    covers the median with probability at least `level` (binomial, p = 1/2),
    as (low, high, coverage). Fewer than 6 values cannot reach 95%: then the
    smallest and largest, with the coverage they do have."""
    xs = sorted(xs)
    n = len(xs)
    k, coverage = 1, 1 - 2 / 2 ** n
    for j in range(2, n // 2 + 1):
        c = 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2 ** n
        if c < level:
            break
        k, coverage = j, c
    return xs[k - 1], xs[n - k], coverage


def verdict(ratios, limit):
    """Per-round ratios against a target ratio (at most `limit`): their
    median, its confidence interval (low, high, coverage), whether the
    median meets the target, and whether the whole interval is on the same
    side of it and covers the median with at least 95% (robustly: 3 rounds
    give only 75%, too little to call anything robust)."""
    m = statistics.median(ratios)
    low, high, coverage = median_interval(ratios)
    met = m <= limit
    robust = coverage >= 0.95 and (high <= limit if met else low > limit)
    return m, low, high, coverage, met, robust


def targets(n, summ, runs=()):
    """The issue's targets. The two that compare with nginx are judged on the
    median of the per-round ratios (A and B measured back to back, as the
    benchmark guide asks), with the ratio of the medians shown beside it, and
    a confidence interval for that median: when the interval crosses the
    target, the verdict is the median's but not a robust one."""
    e, ng = summ.get("edge"), summ.get("nginx")
    out = []
    if not e:
        return out
    def line(name, ok, detail):
        out.append(f"- {'MET' if ok else 'NOT MET'}: {name} ({detail})")
    def paired(key, limit, medians):
        rs = paired_ratios(runs, key)
        if not rs:
            return medians <= limit, f"ratio of the medians {medians:.2f}×"
        m, low, high, coverage, met, clear = verdict(rs, limit)
        robust = "robustly" if clear else "not robustly: the interval crosses the target"
        return met, (f"median of the per-round ratios {m:.2f}×, {coverage:.0%} interval {low:.2f} to {high:.2f}, "
                            f"{robust} (rounds " + ", ".join(f"{x:.2f}" for x in rs)
                            + f"); ratio of the medians {medians:.2f}×")
    if ng:
        ok, how = paired("cpu_us_per_req", 0.8, e["cpu_us_per_req"] / ng["cpu_us_per_req"])
        line("server CPU per redirect ≤ 0.8 × nginx's", ok,
             f"{e['cpu_us_per_req']:.1f} µs vs {ng['cpu_us_per_req']:.1f} µs; {how}")
        ok, how = paired("p99_us", 1.0, e["p99_ms"] / ng["p99_ms"])
        line("p99 ≤ nginx's", ok, f"{e['p99_ms']:.2f} ms vs {ng['p99_ms']:.2f} ms; {how}")
        if e.get("pss_b_per_link") and ng.get("pss_b_per_link"):
            line("memory per link < ⅓ of nginx's" + ("" if n >= 10_000_000 else f" (target is at 10M; here {n:,})"),
                 e["pss_b_per_link"] < ng["pss_b_per_link"] / 3,
                 f"PSS {e['pss_b_per_link']:.0f} B vs {ng['pss_b_per_link']:.0f} B per link = {e['pss_b_per_link'] / ng['pss_b_per_link']:.2f}×")
    if e.get("startup_ms") is not None:
        line("start-up to first redirect < 200 ms" + ("" if n >= 10_000_000 else f" (target is at 10M; here {n:,})"),
             e["startup_ms"] < 200, f"{e['startup_ms']:.0f} ms")
    for name, v in summ.items():
        if name.startswith("edge-") and v and ng:
            out.append(f"- (variant) {LABEL[name]}: CPU per request {v['cpu_us_per_req']:.1f} µs = "
                       f"{v['cpu_us_per_req'] / ng['cpu_us_per_req']:.2f}× nginx, {v['cpu_us_per_req'] / e['cpu_us_per_req']:.2f}× the edge as configured; "
                       f"p99 {v['p99_ms']:.2f} ms")
    line("zero non-3xx for known codes, zero socket errors",
         e["known_non_3xx"] == 0 and e["socket_errors"] == 0 and e.get("sample_bad", 0) == 0,
         f"{e['known_non_3xx']} non-3xx, {e['socket_errors']} socket errors, {e.get('sample_bad', 0)} sample failures")
    return out


# ---------------------------------------------------------------- profile shares

# Parts of the edge's request path, found in each sample's call chain. Frames
# of the uload binary are expanded into their inlined calls (llvm-addr2line
# -i on the binary's debug info), because most of these functions are inlined;
# a frame is matched as "NAME @ FILE" (addr2line's short name and source file)
# or by perf's symbol. Needs a build with debug info and frame pointers, e.g.
# CARGO_PROFILE_RELEASE_DEBUG=line-tables-only RUSTFLAGS="-C force-frame-pointers=yes".
SHARE_PARTS = [
    ("connection task: ClientLimits::process_new, all of it (undercounted with dwarf: deep stacks are cut)", r"client_limits::ClientLimits<A> as pingora_core::apps::ServerApp>::process_new"),
    ("connection task without ClientLimits (HttpProxy as ServerApp>::process_new; the baseline's)", r"HttpProxy<SV(,C)?> as pingora_core::apps::ServerApp>::process_new"),
    ("  redirect fast path (RedirectFastPath::answer; src/edge/fast_path.rs)", r"RedirectFastPath::answer|@ .*src/edge/fast_path\.rs"),
    ("  Pingora's request handling (HttpProxy::process_new_http)", r"as pingora_core::apps::HttpServerApp>::process_new_http"),
    ("    Pingora's header read and parse (HttpSession::read_request)", r"HttpSession::read_request"),
    ("    request_filter (route, limits, lookup, response)", r"EdgeProxy as pingora_proxy::proxy_trait::ProxyHttp>::request_filter"),
    ("      table lookup (redirect::resolve)", r"uload::edge::redirect::resolve|^resolve @ .*src/edge/redirect\.rs"),
    ("      response write (proxy::send)", r"uload::edge::proxy::send"),
    ("    logging phase (EdgeProxy::logging)", r"EdgeProxy as pingora_proxy::proxy_trait::ProxyHttp>::logging"),
    ("      EdgeProxy::record", r"^record @ .*src/edge/proxy\.rs|EdgeProxy::record"),
    ("      HttpMetrics::record", r"^record @ .*src/metrics\.rs|uload::metrics::HttpMetrics::record"),
    ("  client_limits::read_head (the wrapper's header read)", r"client_limits::read_head|^read_head @ .*src/edge/client_limits\.rs"),
    ("    HeaderScan::complete", r"^complete @ .*src/edge/client_limits\.rs|HeaderScan"),
    ("    its recv (libc recv under read_head)", None),
    ("    read_head without its recv", None),
    ("EdgeMetrics (redirect_result, limit_decision; src/edge/metrics.rs)", r"@ .*src/edge/metrics\.rs|uload::edge::metrics::"),
    ("anything in src/metrics.rs (HttpMetrics)", r"@ .*src/metrics\.rs|uload::metrics::"),
    ("prometheus crate (counters, histogram observe)", r"@ .*/prometheus-[^/]+/|prometheus::"),
    ("metrics recording, all of it (the three rows above, each sample once)",
     r"@ .*src/edge/metrics\.rs|uload::edge::metrics::|@ .*src/metrics\.rs|uload::metrics::|@ .*/prometheus-[^/]+/|prometheus::"),
    ("rate limits (src/ratelimit.rs, src/edge/rate_limit.rs, client_ip, charge_miss)",
     r"@ .*src/ratelimit\.rs|@ .*src/edge/rate_limit\.rs|uload::ratelimit::|uload::edge::rate_limit::|EdgeProxy::client_ip|EdgeProxy::charge_miss|^(client_ip|charge_miss) @ .*src/edge/proxy\.rs"),
    ("access log (src/edge/access_log.rs)", r"@ .*src/edge/access_log\.rs|uload::edge::access_log::"),
    ("TLS plumbing (src/edge/tls.rs)", r"@ .*src/edge/tls\.rs|uload::edge::tls::"),
    # anchored at the start of the name: generic parameters of other
    # functions (a select!'s future tuple, say) mention these types too
    ("tokio timers: Sleep, timer entries, wheel (not the Timeout's inner future, not the idle park)",
     r"^<?tokio::time::sleep::|^tokio::time::timeout::poll_delay|^tokio::runtime::time::(<impl [^>]*>::(clear_entry|reregister|process_at_time)|entry::|wheel::)|"
     r"^(new_timeout|clear_entry|reregister|poll_elapsed|insert|remove|process_at_time|process_at_sharded_time) @ .*/tokio-[^/]+/src/(runtime/)?time/"),
    ("tokio watch / Notify (read_head's wait on the shutdown watch)",
     r"^<?tokio::sync::(watch|notify)::|@ .*/tokio-[^/]+/src/sync/(watch|notify)\.rs"),
    ("log follower thread", None),
    ("samples whose call chain never reaches uload code (unwinding stopped in libc or the kernel)", None),
]


def perf_shares(perf_data, out=None):
    """Children share of each SHARE_PARTS entry in a perf.data (recorded with
    -g), over all samples of the process. Returns the text table."""
    p = subprocess.run(["perf", "script", "-i", perf_data, "-F", "comm,tid,period,ip,sym,dso"],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=1800)
    samples = []  # (comm, [(ip, sym, dso)], leaf first)
    cur = None
    for line in p.stdout.splitlines():
        if not line.strip():
            continue
        if not line.startswith("\t") and not line.startswith(" " * 8):
            m = re.match(r"(.*?)\s+\d+\s+\d+\s*$", line)  # comm (may hold spaces), tid, period
            cur = ((m.group(1) if m else line).strip(), [])
            samples.append(cur)
            continue
        m = re.match(r"\s*([0-9a-f]+) (.*) \((.*)\)$", line)
        if m and cur is not None:
            cur[1].append((int(m.group(1), 16), m.group(2), m.group(3)))
    # the uload binary: the file with the most tokio frames (with
    # --call-graph dwarf, perf adds inlined frames of its own, dso "inlined")
    dsos = collections.Counter(d for _, fr in samples for _, sym, d in fr
                               if "tokio::" in sym and d.startswith("/"))
    binary = dsos.most_common(1)[0][0] if dsos else None
    # the file may have been replaced since (compare.py copies each run's
    # binary to the same place): prefer perf's build-id cache copy
    if binary:
        ids = subprocess.run(["perf", "buildid-list", "-i", perf_data], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True).stdout
        for line in ids.splitlines():
            bid, _, path = line.partition(" ")
            cached = os.path.expanduser(f"~/.debug/.build-id/{bid[:2]}/{bid[2:]}/elf")
            if path == binary and os.path.exists(cached):
                binary_file = cached
                break
        else:
            binary_file = binary
    inl = {}
    if binary and shutil.which("llvm-addr2line"):
        # perf script prints a user frame's address as a file offset; the
        # debug info wants the ELF virtual address (they differ by the text
        # segment's p_vaddr - p_offset)
        segs = []
        rl = subprocess.run(["readelf", "-lW", binary_file], stdout=subprocess.PIPE, text=True)
        for line in rl.stdout.splitlines():
            f = line.split()
            if f and f[0] == "LOAD":
                segs.append((int(f[1], 16), int(f[2], 16), int(f[4], 16)))  # offset, vaddr, filesz
        def vaddr(off):
            for o, v, n in segs:
                if o <= off < o + n:
                    return off - o + v
            return off
        addrs = sorted({(ip if k == 0 else ip - 1) for _, fr in samples
                        for k, (ip, _, d) in enumerate(fr) if d == binary})
        r = subprocess.run(["llvm-addr2line", "-i", "-f", "-C", "--output-style=JSON", "-e", binary_file],
                           input="".join(f"0x{vaddr(a):x}\n" for a in addrs), stdout=subprocess.PIPE,
                           text=True, timeout=1800)
        # one JSON line per address, in order: its inline stack, innermost first
        for a, line in zip(addrs, r.stdout.splitlines()):
            try:
                j = json.loads(line)
            except ValueError:
                continue
            inl[a] = [f"{f['FunctionName']} @ {f['FileName']}" for f in j.get("Symbol", [])]
    pats = [(label, re.compile(rx) if rx else None) for label, rx in SHARE_PARTS]
    counts = {label: 0 for label, _ in SHARE_PARTS}
    selfc = {label: 0 for label, _ in SHARE_PARTS}
    total = len(samples)
    for comm, fr in samples:
        names = []
        for k, (ip, sym, d) in enumerate(fr):
            names.append(sym)
            if d == binary:
                names.extend(inl.get(ip if k == 0 else ip - 1, []))
        # self: the sample is in the uload binary's own code, in this part
        # (innermost inlined function first, then perf's symbol)
        leaf_uload = []
        if fr and fr[0][2] == binary:
            leaf_uload = (inl.get(fr[0][0]) or [])[:1] or [fr[0][1]]
        for label, rx in pats:
            if rx is None:
                continue
            if any(rx.search(n) for n in names):
                counts[label] += 1
                if any(rx.search(n) for n in leaf_uload):
                    selfc[label] += 1
        if comm.startswith("log follower"):
            counts["log follower thread"] += 1
        if any("read_head" in n for n in names):
            if any(re.search(r"__libc_recv|\brecv\b|recvfrom", sym) for _, sym, d in fr):
                counts["    its recv (libc recv under read_head)"] += 1
            else:
                counts["    read_head without its recv"] += 1
        if fr and not any(d == binary for _, _, d in fr):
            counts["samples whose call chain never reaches uload code (unwinding stopped in libc or the kernel)"] += 1
    lines = [f"{perf_data}: {total} samples (cpu-clock), all threads of the edge; "
             f"children = samples with the part anywhere in their call chain (inlined calls included), self = samples whose innermost frame is uload code of the part itself", "",
             "| part | children | self |", "|---|---|---|"]
    for label, _ in SHARE_PARTS:
        c, sc = counts[label], selfc[label]
        lines.append(f"| {label} | {100 * c / max(total, 1):.2f}% | {100 * sc / max(total, 1):.2f}% |")
    text = "\n".join(lines) + "\n"
    if out:
        with open(out, "w") as f:
            f.write(text)
    return text


# ---------------------------------------------------------------- main

def compare(args, n, uload_bin):
    wd = os.path.join(args.workdir, f"run-{n}{args.tag}")
    if os.path.isdir(wd):
        shutil.rmtree(wd)
    os.makedirs(wd)
    links_dir = os.path.join(args.workdir, f"links-{n}")
    log(f"=== {n:,} links; work dir {wd}")
    t = time.monotonic()
    subprocess.run([sys.executable, os.path.join(HERE, "gen_links.py"), "-n", str(n), "--out", links_dir,
                    "--seed", str(args.seed)], check=True)
    log(f"links ready ({time.monotonic() - t:.1f} s)")

    # import into a fresh data dir
    t = time.monotonic()
    imp = subprocess.run([uload_bin, "import", f"{links_dir}/links.csv", "--data-dir", f"{wd}/data"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3600)
    import_s = time.monotonic() - t
    with open(os.path.join(wd, "import.log"), "w") as f:
        f.write(imp.stdout)
    if imp.returncode != 0:
        raise RuntimeError(f"uload import failed ({imp.returncode}):\n{imp.stdout[-2000:]}")
    log(f"uload import: {import_s:.1f} s")
    # --edge-bin: each other build imports the same links into its own data dir
    for name, path in args.edge_bins.items():
        if name not in args.servers:
            continue
        t = time.monotonic()
        imp2 = subprocess.run([path, "import", f"{links_dir}/links.csv", "--data-dir", f"{wd}/data-{name}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3600)
        with open(os.path.join(wd, f"import-{name}.log"), "w") as f:
            f.write(imp2.stdout)
        if imp2.returncode != 0:
            raise RuntimeError(f"{name}: uload import failed ({imp2.returncode}):\n{imp2.stdout[-2000:]}")
        log(f"{name}: uload import {time.monotonic() - t:.1f} s")

    codes = read_codes(f"{links_dir}/codes.txt")
    unknown = read_codes(f"{links_dir}/unknown.txt", limit=10000)
    known_path = "/" + codes[len(codes) // 2]

    ports = {s: free_port() for s in args.servers}
    admin_port = free_port()
    # every edge has its own metrics listener (an edge refuses to start when
    # its metrics.listen is taken)
    metrics_ports = {s: free_port() for s in args.servers}
    servers = {}
    for name in args.servers:
        cmd = write_configs(name, wd, links_dir, n, ports[name], admin_port, metrics_ports[name], args)
        env = None
        if name.startswith("edge"):
            env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
            env.pop("ULOAD_CONFIG", None)
            for k in list(env):
                if k.startswith("ULOAD_"):
                    env.pop(k)
        servers[name] = Server(name, cmd, ports[name], wd, env)

    startup_runs = args.startup_runs or (3 if n <= 2_000_000 else 1)
    start_timeout = args.start_timeout or min(1800, 60 + 60 * n / 1e6)
    extra = {s: {} for s in args.servers}
    for name, srv in servers.items():
        times = []
        for k in range(startup_runs):
            if srv.alive():
                srv.stop()
            ms = start_timed(srv, known_path, start_timeout)
            log(f"{name}: start-up {('%.0f ms' % ms) if ms is not None else 'FAILED'} (run {k + 1}/{startup_runs}), load avg {loadavg()[0]:.2f}")
            if ms is None:
                m = memory(srv.pids())
                extra[name]["start_failed"] = (
                    f"{LABEL[name]} served no redirect within {start_timeout:.0f} s"
                    + (f" (still loading: RSS {m['rss_kb'] / 1024:.0f} MB, PSS {m['pss_kb'] / 1024:.0f} MB)"
                       if srv.alive() else " (exited; see its log)"))
                log(extra[name]["start_failed"])
                srv.stop()
                break
            times.append(ms)
        extra[name]["startup_ms"] = statistics.median(times) if len(times) == startup_runs else None
        extra[name]["startup_runs_ms"] = times
        if not srv.alive():
            log(f"{name}: not running; left out of the load runs")
            srv.stop()
            continue
        m = memory(srv.pids(), solo_prefix=f"{wd}/data")
        extra[name]["mem_after_start"] = m
        # idle CPU: what the server burns with no load (follower polls, timers)
        u0, s0 = cpu_ticks(srv.pids())
        time.sleep(args.idle_s)
        u1, s1 = cpu_ticks(srv.pids())
        extra[name]["idle_cpu_pct"] = (u1 - u0 + s1 - s0) / CLK / args.idle_s * 100
        bad = check_sample(srv.port, codes, unknown)
        extra[name]["sample_bad"] = len(bad)
        if bad:
            log(f"{name}: {len(bad)} sample failures, e.g. {bad[:3]}")
        log(f"{name}: sample check {'ok' if not bad else 'FAILED'}; RSS {m['rss_kb'] / 1024:.0f} MB, PSS {m['pss_kb'] / 1024:.0f} MB")
    live = [s for s in args.servers if servers[s].alive()]

    runs = []
    for name in live:
        log(f"warm-up {LABEL[name]} ({args.warmup} s)")
        run_wrk(args, servers[name], links_dir, args.warmup, f"warmup-{name}", wd)
    for rnd in range(1, args.rounds + 1):
        # A B C, then C B A: the first and last servers change places every
        # round, so a position effect (caches, the other core's state)
        # cancels between them over an even number of rounds; a middle
        # server (nginx, with three servers) always runs second.
        order = live if rnd % 2 else live[::-1]
        for position, name in enumerate(order, 1):
            r = run_wrk(args, servers[name], links_dir, args.duration, f"r{rnd}-{name}", wd)
            r["position"] = position
            runs.append(r)
            log(f"round {rnd} {name:8s}: {r['rps']:9,.0f} req/s  p50 {r['p50_us'] / 1000:.2f} ms  p99 {r['p99_us'] / 1000:.2f} ms  "
                f"p99.9 {r['p999_us'] / 1000:.2f} ms  CPU {r['cpu_us_per_req']:.1f} µs/req  "
                f"non-3xx(known) {r['known_non_3xx']}  sock err {r['socket_errors']}  load {r['loadavg'][0]:.2f}")
    for name in live:
        m = memory(servers[name].pids(), solo_prefix=f"{wd}/data")
        extra[name]["mem_after_load"] = m
        extra[name]["rss_mb"] = m["rss_kb"] / 1024
        extra[name]["pss_mb"] = m["pss_kb"] / 1024
        extra[name]["pss_b_per_link"] = m["pss_kb"] * 1024 / n

    syscalls = {}
    if args.syscalls:
        for name in live:
            try:
                r = run_wrk(args, servers[name], links_dir, args.duration, f"syscalls-{name}", wd,
                            stat_out=os.path.join(wd, f"perf-stat-{name}.csv"))
                syscalls[name] = r.get("per_request", {})
                log(f"syscalls {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in syscalls[name].items()) + " per request")
            except Exception as ex:
                log(f"syscalls {name}: {ex}")

    perf_reports = {}
    if args.perf:
        for name in live:
            pdata = os.path.join(wd, f"perf-{name}.data")
            try:
                r = run_wrk(args, servers[name], links_dir, args.duration, f"perf-{name}", wd, perf_out=pdata)
                rep = subprocess.run(["perf", "report", "-i", pdata, "--no-children", "--stdio",
                                      "--percent-limit", "0.5"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=600)
                path = os.path.join(args.workdir, f"perf-{name}-{n}{args.tag}.txt")
                with open(path, "w") as f:
                    f.write(rep.stdout)
                flat = subprocess.run(["perf", "report", "-i", pdata, "--no-children", "--stdio", "-g", "none",
                                       "--percent-limit", "0.3", "--sort", "dso,symbol"],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=600)
                with open(os.path.join(args.workdir, f"perf-{name}-{n}{args.tag}-flat.txt"), "w") as f:
                    f.write(flat.stdout)
                perf_reports[name] = path
                if name.startswith("edge"):
                    perf_shares(pdata, os.path.join(args.workdir, f"perf-{name}-{n}{args.tag}-shares.txt"))
                log(f"perf {name}: {r['cpu_us_per_req']:.1f} µs/req under perf; report in {path}")
            except Exception as ex:
                log(f"perf {name}: {ex}")

    for name in list(servers):
        servers[name].stop()

    summ = {s: summarize(s, runs, extra[s]) for s in live}
    for s in args.servers:
        if s not in live:
            summ[s] = None
    info = {
        "n": n, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "uload_import_s": round(import_s, 2),
        "wrk": f"{'LT_CLOSE=1 ' if args.close else ''}wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency --timeout 2s -s loadtest/redirect_mix.lua",
        "rounds": args.rounds, "loadavg_end": loadavg(), "extra": extra, "perf": perf_reports,
        "syscalls_per_request": syscalls, "uload_sha256": args.uload_sha256,
    }
    md = [f"### {n:,} links", "",
          f"{info['date']}; {args.rounds} rounds, A B C then C B A, `{info['wrk']}`; uload import of the links: {import_s:.1f} s.",
          "", table(n, {k: v for k, v in summ.items() if v}, args.ratio_to), "",
          *[extra[s]["start_failed"] + "." for s in args.servers if extra[s].get("start_failed")],
          "Start-up runs (ms): " + "; ".join(
              f"{LABEL[s]} {', '.join('%.0f' % x for x in extra[s].get('startup_runs_ms', []))}" for s in args.servers),
          "", "Targets (issue 4):", *targets(n, summ, runs), "", "Every run:", "", runs_table(runs), ""]
    if syscalls:
        evs = [k.split(":")[-1].replace("sys_enter_", "") for k in SYSCALL_EVENTS]
        md += ["Per request, under load (`perf stat`, one extra run per server):", "",
               "| server | " + " | ".join(evs) + " |", "|---|" + "---|" * len(evs)]
        for name, c in syscalls.items():
            md.append(f"| {LABEL[name]} | " + " | ".join(f"{c.get(e, float('nan')):.2f}" for e in evs) + " |")
        md.append("")
    text = "\n".join(md)
    with open(os.path.join(args.workdir, f"results-{n}{args.tag}.json"), "w") as f:
        json.dump({"info": info, "summary": summ, "runs": runs}, f, indent=1)
    with open(os.path.join(args.workdir, f"results-{n}{args.tag}.md"), "w") as f:
        f.write(text)
    print(text, flush=True)


def main():
    global _pids_file, _workdir_lock
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sizes", nargs="*", type=int, default=[1_000_000], help="link counts (default 1000000)")
    ap.add_argument("--uload", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                                   "release", "uload"), help="uload release binary")
    ap.add_argument("--workdir", default="/var/tmp/uload-loadtest")
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset of edge,nginx,haproxy")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per server")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--close", action="store_true",
                    help="one request per connection (Connection: close), as clicks from many clients come, "
                         "instead of kept-alive connections")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--startup-runs", type=int, default=0, help="starts per server (default 3, 1 above 2M links)")
    ap.add_argument("--start-timeout", type=float, default=0, help="seconds (default 60 + 60 per million links)")
    ap.add_argument("--idle-s", type=float, default=3.0, help="seconds of idle CPU measurement")
    ap.add_argument("--perf", action="store_true", help="profile one extra run per server with perf")
    ap.add_argument("--perf-call-graph", default="fp", metavar="MODE",
                    help="perf record --call-graph MODE for --perf: fp (default) or dwarf (unwinds through "
                         "libc too, bigger files)")
    ap.add_argument("--shares", metavar="PERF_DATA",
                    help="only print the share of each part of the edge's request path in a perf.data "
                         "recorded with --perf (needs a build with debug info and frame pointers) and exit")
    ap.add_argument("--syscalls", action="store_true",
                    help="count syscalls and context switches per request (perf stat) in one extra run per server")
    ap.add_argument("--pingora-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra line for the edge's pingora.yaml, e.g. work_stealing=false (repeatable)")
    ap.add_argument("--follow-interval-ms", type=int, default=0,
                    help="edge.follow_interval_ms for the edge (default: uload's default)")
    ap.add_argument("--edge-variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                    help="also run an edge with these settings: pingora.yaml keys, or SECTION.KEY for uload.yaml; "
                         "e.g. nosteal:work_stealing=false or rl:rate_limit.client_requests_per_second=100 "
                         "(repeatable)")
    ap.add_argument("--edge-bin", action="append", default=[], metavar="NAME:PATH",
                    help="also run an edge from another uload binary (e.g. an older commit's build) as "
                         "server edge-NAME, with the same settings as edge, its own copy of the binary and "
                         "its own data dir imported with it, in the same rounds (repeatable)")
    ap.add_argument("--ratio-to", default="nginx", metavar="SERVER",
                    help="the table's ratio columns are to this server (default nginx; e.g. edge-base)")
    ap.add_argument("--tag", default="", help="suffix for the results files (e.g. an experiment's name)")
    ap.add_argument("--pool", nargs="+", metavar="RESULTS_JSON",
                    help="no run: the edge-vs-nginx verdicts (CPU per request, p99) of saved results-N.json files, "
                         "each and all rounds together (same link count and, where recorded, the same uload binary)")
    args = ap.parse_args()
    if args.shares:
        print(perf_shares(args.shares), end="")
        return
    if args.pool:
        try:
            print(pool_report(args.pool), end="")
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"compare.py --pool: {e}")
        return
    args.servers = [s for s in args.servers.split(",") if s]
    for s in args.servers:
        if s not in SERVERS:
            ap.error(f"unknown server {s}")
    # --edge-variant NAME:K=V,K=V adds "edge-NAME" right after "edge"
    args.variants = {}
    for v in args.edge_variant:
        vname, _, kvs = v.partition(":")
        if not vname or not kvs or any("=" not in kv for kv in kvs.split(",")):
            ap.error(f"--edge-variant {v!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
        name = f"edge-{vname}"
        args.variants[name] = kvs.split(",")
        LABEL[name] = f"uload edge ({kvs})"
        at = args.servers.index("edge") + 1 + len(args.variants) - 1 if "edge" in args.servers else 0
        args.servers.insert(at, name)
    # --edge-bin NAME:PATH adds "edge-NAME" after the edge variants
    args.edge_bins = {}
    for v in args.edge_bin:
        vname, _, path = v.partition(":")
        name = f"edge-{vname}"
        if not vname or not path or name in args.variants or name in args.edge_bins:
            ap.error(f"--edge-bin {v!r}: expected NAME:PATH with a NAME of its own")
        if not os.access(path, os.X_OK):
            ap.error(f"--edge-bin {v!r}: {path} is not an executable")
        args.edge_bins[name] = os.path.abspath(path)
        LABEL[name] = f"uload edge ({vname} build)"
        at = args.servers.index("edge") + 1 + len(args.variants) + len(args.edge_bins) - 1 \
            if "edge" in args.servers else len(args.edge_bins) - 1
        args.servers.insert(at, name)
    if args.ratio_to not in args.servers:
        args.ratio_to = "nginx"
    # The server the ratios are taken against runs right after the edge in
    # every round (the order reverses each round, so right before it every
    # other round): each per-round ratio pairs two runs back to back, with
    # the variants and builds around them, not between them.
    if "edge" in args.servers and args.ratio_to in args.servers and args.ratio_to != "edge":
        args.servers.remove(args.ratio_to)
        args.servers.insert(args.servers.index("edge") + 1, args.ratio_to)
    if args.rounds < 1 or args.duration < 1:
        ap.error("--rounds and --duration must be at least 1")
    os.makedirs(args.workdir, exist_ok=True)
    # One run per work dir: two would share (and overwrite) its pids file
    # and run directories, and stop each other's servers.
    _workdir_lock = open(os.path.join(args.workdir, "lock"), "w")
    try:
        fcntl.flock(_workdir_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        ap.error(f"{args.workdir} is in use by another compare.py run; give this one its own --workdir")
    _pids_file = os.path.join(args.workdir, "pids")
    atexit.register(stop_all)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    for tool in ("wrk",) + (("nginx",) if "nginx" in args.servers else ()) + (("haproxy",) if "haproxy" in args.servers else ()):
        if not shutil.which(tool):
            sys.exit(f"compare: {tool} not found; run loadtest/install.sh")
    # A private copy of the binary: other builds may replace target/release/uload mid-run.
    uload_bin = None
    if any(s.startswith("edge") for s in args.servers):
        if not os.access(args.uload, os.X_OK):
            sys.exit(f"compare: {args.uload} not found; cargo build --release")
        os.makedirs(os.path.join(args.workdir, "bin"), exist_ok=True)
        uload_bin = os.path.join(args.workdir, "bin", "uload")
        shutil.copy2(args.uload, uload_bin + ".tmp")
        os.replace(uload_bin + ".tmp", uload_bin)
    args.uload_bin = uload_bin
    # The binary the edges run (the private copy), for --pool's check.
    args.uload_sha256 = sha256_of(uload_bin) if uload_bin else None
    for name, path in args.edge_bins.items():
        copy = os.path.join(args.workdir, "bin", f"uload-{name}")
        os.makedirs(os.path.dirname(copy), exist_ok=True)
        shutil.copy2(path, copy + ".tmp")
        os.replace(copy + ".tmp", copy)
        args.edge_bins[name] = copy
    log(f"machine: {os.cpu_count()} CPUs, load avg {loadavg()}")
    for n in args.sizes:
        try:
            compare(args, n, uload_bin)
        except Exception as e:
            log(f"{n:,} links: FAILED: {e}")
            stop_all()
            raise


if __name__ == "__main__":
    main()
