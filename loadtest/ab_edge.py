#!/usr/bin/env python3
"""Instructions per redirect of uload edge builds, counted by callgrind.

CPU time per request on a shared 2-core VM moves by 10 to 20% from one run to
the next (compare.py's rounds show it); instruction counts do not. For each
edge (a binary, or a binary with uload.yaml settings) this:

 1. imports the same N links (loadtest/gen_links.py, as compare.py does) into
    a data dir of that binary's own;
 2. starts `uload edge` under `valgrind --tool=callgrind --instr-atstart=no`
    (nothing is counted while the table loads), with compare.py's configs
    (pingora `threads: 1`) on a free 127.0.0.1 port, and waits for a 301;
 3. runs wrk for --warmup seconds uncounted (start-up work that valgrind
    slows down, such as the log follower's first pass, must not land in the
    count), then switches instrumentation on (`callgrind_control -i on`), runs wrk with
    loadtest/redirect_mix.lua for a bounded time, switches it off and stops
    the edge, which writes the counts;
 4. reports instructions (Ir) per request: all threads, and split by where
    the code is (self cost by source file, inlined code included, from
    callgrind_annotate) and by function (inclusive cost).

Under valgrind the edge is about 50 times slower, so every wakeup finds
requests waiting: syscalls and epoll per request are fewer than natively.
That is the same for every edge measured, and kernel time is not counted at
all (Ir is user space only). The builds should have debug info
(CARGO_PROFILE_RELEASE_DEBUG=line-tables-only) for the split by file.

Usage: ab_edge.py [-n 1000000] [--seconds 20] --edge NAME:PATH[:KEY=VALUE,...] ...
Example:
  ab_edge.py --edge base:/path/old/uload --edge cur:/path/new/uload \\
             --edge rl:/path/new/uload:rate_limit.client_requests_per_second=10000000,rate_limit.client_burst=1000000000
"""

import argparse
import atexit
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compare  # noqa: E402  (the same configs, servers and clean-up)

# (label, regex on callgrind_annotate's "file:function" for self cost by file)
FILES = [
    ("src/metrics.rs (HttpMetrics::record, labels)", r"(^|/)src/metrics\.rs:"),
    ("src/edge/metrics.rs (EdgeMetrics: redirect_result, limit_decision)", r"(^|/)src/edge/metrics\.rs:"),
    ("prometheus crate (counter inc, histogram observe)", r"/prometheus-[^/]+/"),
    ("src/ratelimit.rs + src/edge/rate_limit.rs (limiter)", r"(^|/)src/(edge/rate_limit|ratelimit)\.rs:"),
    ("src/edge/client_limits.rs (header read wrapper, own code)", r"(^|/)src/edge/client_limits\.rs:"),
    ("src/edge/access_log.rs", r"(^|/)src/edge/access_log\.rs:"),
    ("src/edge/tls.rs", r"(^|/)src/edge/tls\.rs:"),
    ("src/edge/fast_path.rs (redirect fast path, own code)", r"(^|/)src/edge/fast_path\.rs:"),
    ("src/edge/proxy.rs (request_filter, record, respond)", r"(^|/)src/edge/proxy\.rs:"),
    ("src/edge/redirect.rs (route, resolve)", r"(^|/)src/edge/redirect\.rs:"),
    ("src/store/ (table lookup, follower)", r"(^|/)src/store/"),
    ("tokio time (timers)", r"/tokio-[^/]+/src/(runtime/)?time/"),
    ("tokio sync (watch, Notify)", r"/tokio-[^/]+/src/sync/"),
    ("pingora crates", r"/pingora-[^/]+/"),
    ("libc (malloc, memcpy, syscalls' wrappers)", r"libc\.so|/glibc|\?\?\?:(_int_|malloc|free|__mem)"),
]

# (label, regex on a function's name for its inclusive cost)
FUNCS = [
    ("ClientLimits::process_new (whole connection task)", r"client_limits::ClientLimits<A> as pingora_core::apps::ServerApp>::process_new"),
    ("client_limits::read_head", r"client_limits::read_head"),
    ("RedirectFastPath::answer (fast path, without the read and write)", r"fast_path::RedirectFastPath::answer"),
    ("HttpProxy::process_new_http (Pingora, per request)", r"as pingora_core::apps::HttpServerApp>::process_new_http"),
    ("Pingora's own connection loop (<T as ServerApp>::process_new; the baseline's)", r"<T as pingora_core::apps::ServerApp>::process_new"),
    ("HttpSession::read_request (Pingora's header read/parse)", r"v1::server::HttpSession::read_request"),
    ("EdgeProxy::request_filter", r"EdgeProxy as pingora_proxy::proxy_trait::ProxyHttp>::request_filter"),
    ("EdgeProxy::logging (logging phase)", r"EdgeProxy as pingora_proxy::proxy_trait::ProxyHttp>::logging"),
    ("HttpMetrics::record", r"uload::metrics::HttpMetrics::record"),
    ("LimiterTable::decide", r"uload::ratelimit::LimiterTable::decide"),
]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def annotate(out_file, inclusive):
    r = subprocess.run(["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", "--threshold=100", "--auto=no",
                        out_file], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=1800)
    rows = []
    for line in r.stdout.splitlines():
        m = re.match(r"\s*([\d,]+)(?:\s+\([^)]*\))?\s+(?:\*\s+)?(\S.*)$", line)
        if m and ":" in m.group(2):
            rows.append((int(m.group(1).replace(",", "")), m.group(2)))
    total = None
    m = re.search(r"^\s*([\d,]+)(?:\s+\([^)]*\))?\s+PROGRAM TOTALS", r.stdout, re.M)
    if m:
        total = int(m.group(1).replace(",", ""))
    return total, rows


def measure(args, name, path, settings, links_dir, wd, codes):
    # one data dir per binary (edges of the same binary share it)
    data = os.path.join(wd, f"data-{hashlib.sha1(path.encode()).hexdigest()[:10]}")
    if not os.path.isdir(data):
        imp = subprocess.run([path, "import", f"{links_dir}/links.csv", "--data-dir", data],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3600)
        if imp.returncode != 0:
            raise RuntimeError(f"{name}: import failed:\n{imp.stdout[-2000:]}")
    port, admin_port, metrics_port = compare.free_port(), compare.free_port(), compare.free_port()
    sname = f"edge-{name}"
    cargs = types.SimpleNamespace(pingora_set=[], follow_interval_ms=0, variants={sname: settings},
                                  edge_bins={sname: path}, uload_bin=path)
    cmd = compare.write_configs(sname, wd, links_dir, args.n, port, admin_port, metrics_port, cargs)
    # write_configs points edge-NAME at data-edge-NAME; use this binary's data dir
    conf = os.path.join(wd, sname, "uload.yaml")
    with open(conf) as f:
        text = f.read()
    with open(conf, "w") as f:
        f.write(re.sub(r"^data_dir: .*$", f"data_dir: {data}", text, count=1, flags=re.M))
    out = os.path.join(wd, f"callgrind-{name}.out")
    for old in [out] + [os.path.join(wd, x) for x in os.listdir(wd) if x.startswith(f"callgrind-{name}.out.")]:
        if os.path.exists(old):
            os.remove(old)
    vg = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
          "--dump-instr=no", "--compress-strings=no"] + cmd
    env = {k: v for k, v in os.environ.items() if not k.startswith("ULOAD_")}
    env["RUST_LOG"] = "warn"
    srv = compare.Server(sname, vg, port, wd, env)
    t0 = time.monotonic()
    srv.start()
    known = "/" + codes[len(codes) // 2]
    while True:
        st = compare.probe(port, known, timeout=10)
        if st == 301:
            break
        if not srv.alive() or time.monotonic() - t0 > args.start_timeout:
            tail = srv.log_tail()
            srv.stop()
            raise RuntimeError(f"{name}: no redirect under valgrind:\n{tail}")
        time.sleep(0.5)
    log(f"{name}: serving under callgrind after {time.monotonic() - t0:.0f} s")
    pid = str(srv.proc.pid)
    env_w = dict(os.environ, LT_CODES=f"{links_dir}/codes.txt", LT_UNKNOWN=f"{links_dir}/unknown.txt",
                 LT_SEED=str(args.seed))
    if args.warmup > 0:
        # Not counted: the log follower's first pass over the log (it starts
        # with the edge, and valgrind slows it 50-fold) and the first touches
        # of the table.
        warm = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.warmup}s", "--timeout", "10s",
                "-s", os.path.join(HERE, "redirect_mix.lua"), f"http://127.0.0.1:{port}"]
        subprocess.run(warm, env=env_w, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=args.warmup + 120)
    subprocess.run(["callgrind_control", "-i", "on", pid], stdout=subprocess.DEVNULL, timeout=120, check=True)
    wrk = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds}s", "--latency", "--timeout", "10s",
           "-s", os.path.join(HERE, "redirect_mix.lua"), f"http://127.0.0.1:{port}"]
    p = subprocess.run(wrk, env=env_w, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=args.seconds + 120)
    subprocess.run(["callgrind_control", "-i", "off", pid], stdout=subprocess.DEVNULL, timeout=120, check=True)
    with open(os.path.join(wd, f"wrk-{name}.txt"), "w") as f:
        f.write(" ".join(wrk) + "\n" + p.stdout)
    m = re.search(r"^LT_RESULT (\{.*\})$", p.stdout, re.M)
    if p.returncode != 0 or not m:
        srv.stop()
        raise RuntimeError(f"{name}: wrk failed:\n{p.stdout[-2000:]}")
    res = json.loads(m.group(1))
    # SIGTERM: Pingora shuts down, valgrind writes the counts
    os.killpg(srv.proc.pid, signal.SIGTERM)
    try:
        srv.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pass
    srv.stop()
    if not os.path.exists(out):
        raise RuntimeError(f"{name}: no callgrind output {out}")
    req = max(res["requests"], 1)
    total, self_rows = annotate(out, False)
    _, incl_rows = annotate(out, True)
    by_file = {}
    for label, rx in FILES:
        r = re.compile(rx)
        by_file[label] = sum(ir for ir, fn in self_rows if r.search(fn)) / req
    by_func = {}
    for label, rx in FUNCS:
        r = re.compile(rx)
        # the largest matching entry (a function appears once per file it spans)
        by_func[label] = max((ir for ir, fn in incl_rows if r.search(fn)), default=0) / req
    return {"name": name, "path": path, "settings": settings, "requests": res["requests"],
            "known_non_3xx": res.get("known_non_3xx"), "socket_errors": res.get("socket_errors"),
            "ir_total": total, "ir_per_req": (total or 0) / req, "self_by_file": by_file, "incl_by_func": by_func,
            "callgrind_out": out}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edge", action="append", required=True, metavar="NAME:PATH[:KEY=VALUE,...]",
                    help="an edge to measure: a uload binary, optionally with uload.yaml SECTION.KEY=VALUE settings")
    ap.add_argument("-n", type=int, default=1_000_000, help="links (default 1000000)")
    ap.add_argument("--seconds", type=int, default=20, help="wrk run under callgrind (default 20)")
    ap.add_argument("--warmup", type=int, default=15,
                    help="seconds of wrk before counting starts (default 15), so that start-up work "
                         "still running under valgrind (the follower's first log pass) is not counted")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--workdir", default="/var/tmp/uload-loadtest/callgrind")
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate", "wrk"):
        if not shutil.which(tool):
            sys.exit(f"ab_edge: {tool} not found")
    edges = []
    for e in args.edge:
        parts = e.split(":", 2)
        if len(parts) < 2 or not os.access(parts[1], os.X_OK):
            ap.error(f"--edge {e!r}: expected NAME:PATH[:KEY=VALUE,...] with an executable PATH")
        edges.append((parts[0], os.path.abspath(parts[1]), parts[2].split(",") if len(parts) == 3 else []))
    os.makedirs(args.workdir, exist_ok=True)
    compare._pids_file = os.path.join(args.workdir, "pids")
    atexit.register(compare.stop_all)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, compare._on_signal)
    links_dir = os.path.join(args.workdir, f"links-{args.n}")
    subprocess.run([sys.executable, os.path.join(HERE, "gen_links.py"), "-n", str(args.n), "--out", links_dir,
                    "--seed", str(args.seed)], check=True)
    codes = compare.read_codes(f"{links_dir}/codes.txt")
    results = []
    for name, path, settings in edges:
        log(f"{name}: {path} {','.join(settings)}")
        r = measure(args, name, path, settings, links_dir, args.workdir, codes)
        log(f"{name}: {r['requests']:,} requests, {r['ir_per_req']:,.0f} Ir per request")
        results.append(r)
    ref = results[0]
    lines = [f"Instructions (callgrind Ir, user space, all threads) per request; {args.n:,} links; "
             f"wrk -t1 -c{args.connections} -d{args.seconds}s redirect_mix.lua; ratios to {ref['name']}.", "",
             "| | " + " | ".join(r["name"] for r in results) + " |", "|---|" + "---|" * len(results),
             "| requests under callgrind | " + " | ".join(f"{r['requests']:,}" for r in results) + " |",
             "| **Ir per request** | " + " | ".join(
                 f"**{r['ir_per_req']:,.0f}** ({r['ir_per_req'] / ref['ir_per_req']:.3f}×)" for r in results) + " |"]
    lines.append("| *self, by source file (inlined code counted where it was written)* |" + " |" * len(results))
    for label, _ in FILES:
        lines.append(f"| {label} | " + " | ".join(f"{r['self_by_file'][label]:,.0f}" for r in results) + " |")
    lines.append("| *inclusive, by function* |" + " |" * len(results))
    for label, _ in FUNCS:
        lines.append(f"| {label} | " + " | ".join(f"{r['incl_by_func'][label]:,.0f}" for r in results) + " |")
    lines.append("| non-3xx for known codes, socket errors | " + " | ".join(
        f"{r['known_non_3xx']}, {r['socket_errors']}" for r in results) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.workdir, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(text, end="")


if __name__ == "__main__":
    main()
