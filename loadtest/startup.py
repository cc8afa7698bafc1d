#!/usr/bin/env python3
"""Start-up of `uload edge` to the first served redirect, A/B between builds.

Usage:
  startup.py --runs 7 --known CODE [--warm 1] [--out FILE.json] NAME:BINARY:DATA_DIR ...

For each run, every NAME in turn (A B C A B C ...): writes a uload.yaml and a
pingora.yaml (threads: 1) into a scratch directory, starts
`BINARY edge --config uload.yaml` on a free 127.0.0.1 port with DATA_DIR,
and polls GET /CODE (every 2 ms, one connection per poll, loopback only)
until a 3xx answers; the time from just before the spawn to that answer is
the start-up. The edge is then stopped (SIGTERM, then SIGKILL after 5 s)
before the next one starts, so that starts never compete for the CPU.
--warm N starts each N times first without recording (page cache, binary).
A start that gives no redirect within --timeout seconds is reported and
counted as missing. Prints per-start figures and the median per NAME, with
the CPU time (utime + stime of all the edge's threads, /proc/PID/stat, in
clock ticks of 10 ms) it had used when the first redirect came: on a shared,
busy machine that varies less than the wall time.
--prefix runs the edge under another command (perf record), stopped with
SIGINT instead of SIGTERM.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402


# The same port picking and probe as the comparison uses.
free_port = compare.free_port
probe = compare.probe


def write_configs(wd, data_dir):
    port, admin, metrics = free_port(), free_port(), free_port()
    with open(os.path.join(wd, "pingora.yaml"), "w") as f:
        f.write(compare.pingora_yaml(wd))
    with open(os.path.join(wd, "uload.yaml"), "w") as f:
        f.write(f"""data_dir: {data_dir}
public_base_url: http://127.0.0.1:{port}
edge:
  listen: 127.0.0.1:{port}
  default_status: 301
  admin_upstreams: ["127.0.0.1:{admin}"]
  pingora_conf: {wd}/pingora.yaml
admin:
  listen: 127.0.0.1:{admin}
metrics:
  listen: 127.0.0.1:{metrics}
""")
    return port


TICK_MS = 1000.0 / os.sysconf("SC_CLK_TCK")


def cpu_ms(pid):
    """utime + stime of the process (all its threads) so far, in ms."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * TICK_MS
    except (OSError, IndexError, ValueError):
        return None


def start_once(binary, data_dir, code, timeout_s, prefix=()):
    with tempfile.TemporaryDirectory(prefix="uload-startup-") as wd:
        port = write_configs(wd, data_dir)
        log = open(os.path.join(wd, "edge.log"), "w")
        t0 = time.monotonic()
        proc = subprocess.Popen([*prefix, binary, "edge", "--config", f"{wd}/uload.yaml"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        ms = cpu = None
        try:
            deadline = t0 + timeout_s
            while time.monotonic() < deadline:
                st = probe(port, f"/{code}")
                if st is not None and 300 <= st < 400:
                    ms = (time.monotonic() - t0) * 1000.0
                    cpu = cpu_ms(proc.pid)
                    break
                if proc.poll() is not None:
                    break
                time.sleep(0.002)
        finally:
            if proc.poll() is None:
                # SIGINT: a `perf record` prefix writes its data and exits too.
                os.killpg(proc.pid, signal.SIGINT if prefix else signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.close()
        if ms is None:
            with open(os.path.join(wd, "edge.log")) as f:
                sys.stderr.write(f"{binary} {data_dir}: no redirect; log tail:\n{f.read()[-2000:]}\n")
        return ms, cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("edges", nargs="+", help="NAME:BINARY:DATA_DIR")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warm", type=int, default=1)
    ap.add_argument("--known", required=True, help="a code the data dir holds")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--out", help="write the figures as JSON here too")
    ap.add_argument("--prefix", default="",
                    help="command to run the edge under, e.g. 'perf record -e cpu-clock -g -o FILE --' "
                         "(one start per edge: use --runs 1 --warm 0)")
    args = ap.parse_args()
    edges = []
    for e in args.edges:
        name, binary, data = e.split(":", 2)
        edges.append((name, binary, data))
    prefix = args.prefix.split()
    for _ in range(args.warm):
        for name, binary, data in edges:
            start_once(binary, data, args.known, args.timeout)
    runs = {name: [] for name, _, _ in edges}
    cpus = {name: [] for name, _, _ in edges}
    for i in range(args.runs):
        for name, binary, data in edges:
            ms, cpu = start_once(binary, data, args.known, args.timeout, prefix)
            runs[name].append(ms)
            cpus[name].append(cpu)
            print(f"run {i + 1} {name}: {'-' if ms is None else f'{ms:.1f} ms'}"
                  f" (CPU {'-' if cpu is None else f'{cpu:.0f} ms'})", flush=True)
    print()
    def med(xs):
        # A start that failed (no redirect within the timeout) has no time;
        # it is counted, not dropped in silence.
        ok = [x for x in xs if x is not None]
        failed = f" ({len(xs) - len(ok)} of {len(xs)} failed)" if len(ok) < len(xs) else ""
        return ("-" if not ok else f"{statistics.median(ok):.0f} ms, max {max(ok):.0f} ms") + failed

    print("| build | starts (ms, in order) | median, max | CPU to the first redirect (ms, in order) | median, max CPU |")
    print("|---|---|---|---|---|")
    for name, figures in runs.items():
        shown = ", ".join("-" if m is None else f"{m:.0f}" for m in figures)
        cpu_shown = ", ".join("-" if c is None else f"{c:.0f}" for c in cpus[name])
        print(f"| {name} | {shown} | {med(figures)} | {cpu_shown} | {med(cpus[name])} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"runs": runs, "cpu_ms": cpus, "edges": edges, "known": args.known}, f, indent=1)


if __name__ == "__main__":
    main()
