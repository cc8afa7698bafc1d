#!/usr/bin/env python3
"""Does this machine's hypervisor charge for sleeping?

On a virtual machine, a thread that blocks can leave its vCPU idle; the
vCPU halts and the host may give the physical core to someone else. When the
thread is woken (by a thread on the other vCPU), the host has to run the vCPU
again, and the time it waits for that is counted as "steal" in /proc/stat.
A server that is faster than its load generator sleeps more often per
request (it empties its ready list and blocks in epoll_wait), so on a host
where waking a vCPU is slow it collects more steal, and its latency tail
grows with it (compare.py records steal per run; see docs/benchmarks.md,
"The issue 4 table on a slower day").

This measures the effect with no server involved, in alternation:
  busy      two processes spinning for SECONDS (no vCPU ever halts);
  pingpong  two processes bouncing a byte through pipes for SECONDS (each
            blocks once per round trip, as a server and its client do).
It prints the steal each collected. Nothing but two local processes and
pipes; bounded in time (2 x ROUNDS x SECONDS).

Usage: steal_probe.py [ROUNDS] [SECONDS]   (defaults 3 and 10)
"""

import os
import sys
import time


def steal_ticks():
    with open("/proc/stat") as f:
        v = f.readline().split()
    return int(v[8]) if len(v) > 8 else 0


def busy(seconds):
    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                pass
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    return None


def pingpong(seconds):
    to_child, from_parent = os.pipe()[::-1]
    from_child, to_parent = os.pipe()
    pid = os.fork()
    if pid == 0:
        while os.read(from_parent, 1) == b"x":
            os.write(to_parent, b"x")
        os._exit(0)
    end = time.monotonic() + seconds
    trips = 0
    while time.monotonic() < end:
        os.write(to_child, b"x")
        os.read(from_child, 1)
        trips += 1
    os.write(to_child, b"q")
    os.waitpid(pid, 0)
    return trips


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    hz = os.sysconf("SC_CLK_TCK")
    results = {"busy": [], "pingpong": []}
    for r in range(rounds):
        for name, run in (("busy", busy), ("pingpong", pingpong)):
            before = steal_ticks()
            trips = run(seconds)
            stolen = (steal_ticks() - before) / hz
            results[name].append(stolen)
            extra = f", {trips / seconds:,.0f} round trips/s" if trips is not None else ""
            print(f"round {r + 1} {name:8}: steal {stolen:.2f} s in {seconds:g} s{extra}", flush=True)
    for name, values in results.items():
        values.sort()
        print(f"{name:8}: median steal {values[len(values) // 2]:.2f} s per {seconds:g} s run")


if __name__ == "__main__":
    main()
