#!/usr/bin/env python3
"""How soon a link created through the edge is served by it: the time from
the moment the client has the 201 to the moment it has the first redirect
for the new code, polled back to back on a kept-alive connection.

    ULOAD_API_KEY=... python3 loadtest/propagation.py --base http://127.0.0.1:8080 \\
        [--count 2000] [--seconds 20]

One create at a time (POST /api/links through the edge), then GET /{code}
until it redirects (404 until then); the clock is time.perf_counter_ns,
read right after each answer is read whole. A poll costs tens of
microseconds of this client's time, so the figure is close to the edge's
own (where k6's journey.js, with its JavaScript between polls and 0.8 of a
core of its own on a 2-vCPU machine, adds its own delays). It runs
alongside journey.js when `loadtest/k6_up.sh` is given LT_PROBE=1.

Loopback only (the base URL must be 127.0.0.0/8 or ::1); bounded by
--count creates and --seconds, and each poll loop by 2 s. Prints one line
of figures (ms) and writes --json if asked. Exit 1 on any error or a link
not served within 2 s.
"""
import argparse
import http.client
import ipaddress
import json
import os
import sys
import time
import urllib.parse


def pct(sorted_ms, p):
    if not sorted_ms:
        return float("nan")
    i = min(len(sorted_ms) - 1, max(0, int(round(p / 100 * len(sorted_ms) + 0.5)) - 1))
    return sorted_ms[i]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="http://127.0.0.1:8080")
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    key = os.environ.get("ULOAD_API_KEY", "")
    if len(key) < 16:
        sys.exit("propagation.py: set ULOAD_API_KEY (at least 16 characters)")
    u = urllib.parse.urlsplit(args.base)
    if not ipaddress.ip_address(u.hostname).is_loopback:
        sys.exit(f"propagation.py: {args.base} is not a loopback address")
    api = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    edge = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    times_ms, first_poll, polls = [], 0, 0
    deadline = time.monotonic() + args.seconds
    for i in range(args.count):
        if time.monotonic() >= deadline:
            break
        body = json.dumps({"url": f"https://example.com/propagation/{os.getpid()}/{i}/{time.time_ns()}"})
        api.request("POST", "/api/links", body=body, headers=headers)
        r = api.getresponse()
        data = r.read()
        t0 = time.perf_counter_ns()
        if r.status != 201:
            sys.exit(f"propagation.py: create answered {r.status}: {data[:200]!r}")
        code = json.loads(data)["code"]
        n = 0
        while True:
            edge.request("GET", f"/{code}")
            g = edge.getresponse()
            g.read()
            t1 = time.perf_counter_ns()
            n += 1
            if 300 <= g.status < 400:
                break
            if g.status != 404:
                sys.exit(f"propagation.py: GET /{code} answered {g.status}")
            if t1 - t0 > 2_000_000_000:
                sys.exit(f"propagation.py: /{code} not served within 2 s of its 201")
        times_ms.append((t1 - t0) / 1e6)
        polls += n
        first_poll += n == 1
    times_ms.sort()
    if not times_ms:
        sys.exit("propagation.py: no link created")
    out = {
        "links": len(times_ms),
        "served_on_first_poll": first_poll / len(times_ms),
        "polls_per_link": polls / len(times_ms),
        "median_ms": pct(times_ms, 50),
        "p90_ms": pct(times_ms, 90),
        "p99_ms": pct(times_ms, 99),
        "max_ms": times_ms[-1],
    }
    print("propagation (201 -> first redirect, ms): links {links}, median {median_ms:.3f}, "
          "p90 {p90_ms:.3f}, p99 {p99_ms:.3f}, max {max_ms:.3f}; served on the first poll "
          "{served_on_first_poll:.0%}, {polls_per_link:.1f} polls a link".format(**out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
