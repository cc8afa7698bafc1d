"""Unit tests of compare.py's statistics and verdicts (no servers started).

Run: python3 -m unittest discover -s loadtest -p 'test_*.py'
"""

import math
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402


def rounds(edge_cpu, nginx_cpu):
    """Round runs as compare.py records them (only the keys targets() reads)."""
    runs = []
    for i, (e, n) in enumerate(zip(edge_cpu, nginx_cpu), 1):
        for server, cpu in (("edge", e), ("nginx", n)):
            runs.append({"tag": f"r{i}-{server}", "server": server, "cpu_us_per_req": cpu, "p99_us": 400.0})
    return runs


def summary(runs):
    out = {}
    for server in ("edge", "nginx"):
        cpu = sorted(r["cpu_us_per_req"] for r in runs if r["server"] == server)
        out[server] = {"cpu_us_per_req": cpu[len(cpu) // 2], "p99_ms": 0.4, "known_non_3xx": 0, "socket_errors": 0}
    return out


def cpu_verdict(edge_cpu, nginx_cpu):
    runs = rounds(edge_cpu, nginx_cpu)
    lines = compare.targets(1_000_000, summary(runs), runs)
    return next(l for l in lines if "server CPU per redirect" in l)


class MedianInterval(unittest.TestCase):
    def test_order_statistics_and_coverage(self):
        # n = 24: x(7) and x(18), coverage 1 - 2 P(B(24, 1/2) <= 6) = 0.9773
        xs = [i / 100 for i in range(24, 0, -1)]
        low, high, coverage = compare.median_interval(xs)
        self.assertEqual((low, high), (0.07, 0.18))
        self.assertAlmostEqual(coverage, 1 - 2 * sum(math.comb(24, i) for i in range(7)) / 2**24)
        self.assertGreaterEqual(coverage, 0.95)
        # k = 8 would fall under 95%
        self.assertLess(1 - 2 * sum(math.comb(24, i) for i in range(8)) / 2**24, 0.95)

    def test_few_values_give_the_extremes(self):
        low, high, coverage = compare.median_interval([0.9, 0.7, 0.8, 0.75, 0.85])
        self.assertEqual((low, high), (0.7, 0.9))
        self.assertAlmostEqual(coverage, 1 - 2 / 32)

    def test_seven_values(self):
        # n = 7: only (x(1), x(7)) reaches 95% (98.4%); (x(2), x(6)) covers 87.5%
        low, high, coverage = compare.median_interval([5, 1, 4, 2, 7, 3, 6])
        self.assertEqual((low, high), (1, 7))
        self.assertAlmostEqual(coverage, 1 - 2 / 128)


class Verdicts(unittest.TestCase):
    def test_met_robustly(self):
        v = cpu_verdict([7.0] * 7, [10.0, 10.2, 9.8, 10.1, 9.9, 10.0, 10.3])
        self.assertTrue(v.startswith("- MET:"), v)
        self.assertIn(", robustly", v)

    def test_met_but_the_interval_crosses(self):
        # per-round ratios 0.70 .. 0.85, median 0.78
        v = cpu_verdict([7.0, 7.2, 7.8, 8.0, 8.2, 8.5, 7.5], [10.0] * 7)
        self.assertTrue(v.startswith("- MET:"), v)
        self.assertIn("not robustly", v)

    def test_not_met_robustly(self):
        v = cpu_verdict([9.0] * 7, [10.0] * 7)
        self.assertTrue(v.startswith("- NOT MET:"), v)
        self.assertIn(", robustly", v)

    def test_too_few_rounds_are_never_robust(self):
        # 3 rounds: the interval (smallest, largest) covers the median 75%
        v = cpu_verdict([7.0] * 3, [10.0] * 3)
        self.assertTrue(v.startswith("- MET:"), v)
        self.assertIn("not robustly", v)

    def test_pairs_by_round_not_by_order(self):
        runs = rounds([7.0, 9.0], [10.0, 9.0])
        runs.reverse()
        self.assertEqual(compare.paired_ratios(runs, "cpu_us_per_req"), [0.7, 1.0])


class Pool(unittest.TestCase):
    def results(self, edge_cpu, nginx_cpu, n=1_000_000, sha="a", wrk="wrk -t1 -c32 -d10s"):
        return {"info": {"n": n, "uload_sha256": sha, "wrk": wrk}, "runs": rounds(edge_cpu, nginx_cpu)}

    def test_rounds_of_several_files_stay_paired(self):
        a = self.results([7.0, 8.0], [10.0, 10.0])
        b = self.results([9.0, 6.0, 7.5], [10.0, 10.0, 10.0])
        pooled = compare.pool([a, b])
        self.assertEqual(sorted(compare.paired_ratios(pooled, "cpu_us_per_req")), [0.6, 0.7, 0.75, 0.8, 0.9])
        self.assertEqual(len({r["tag"] for r in pooled}), 10)

    def test_more_rounds_can_settle_a_verdict(self):
        # Each file alone: median 0.76 with an interval reaching past 0.8;
        # together the interval is under it.
        ratios = [0.70, 0.72, 0.73, 0.74, 0.75, 0.76, 0.77, 0.78, 0.79, 0.82, 0.85]
        runs = [self.results([r * 10 for r in ratios], [10.0 + k / 100] * len(ratios)) for k in range(5)]
        m, low, high, cov, met, robust = compare.verdict(compare.paired_ratios(runs[0]["runs"], "cpu_us_per_req"), 0.8)
        self.assertTrue(met)
        self.assertFalse(robust)
        pooled = compare.pool(runs)
        m, low, high, cov, met, robust = compare.verdict(compare.paired_ratios(pooled, "cpu_us_per_req"), 0.8)
        self.assertTrue(met and robust, (m, low, high, cov))

    def test_a_pool_is_robust_only_if_every_run_agrees(self):
        import json, os, tempfile
        # 30 rounds at 0.70 and a second run of 11 at 0.82: pooled, the
        # median and its interval are under 0.8, but one run says otherwise.
        a = self.results([7.0] * 30, [10.0] * 30)
        b = self.results([8.2] * 11, [10.0 + k / 100 for k in range(11)])
        with tempfile.TemporaryDirectory() as d:
            paths = []
            for i, r in enumerate((a, b)):
                paths.append(os.path.join(d, f"{i}.json"))
                with open(paths[-1], "w") as f:
                    json.dump(r, f)
            report = compare.pool_report(paths)
        line = next(l for l in report.splitlines() if l.startswith("pooled: server CPU"))
        self.assertIn("met (target 0.8), not robustly", line)
        self.assertIn("run medians 0.700, 0.8", line)
        m, low, high, cov, met, robust = compare.verdict(
            compare.paired_ratios(compare.pool([a, b]), "cpu_us_per_req"), 0.8)
        self.assertTrue(met and robust, "the interval alone would call it robust")

    def test_refuses_the_same_runs_twice_or_other_wrk_settings(self):
        a = self.results([7.0], [10.0])
        with self.assertRaises(ValueError):
            compare.pool([a, self.results([7.0], [10.0])])
        with self.assertRaises(ValueError):
            compare.pool([a, self.results([8.0], [10.0], wrk="wrk -t1 -c64 -d10s")])
        with self.assertRaises(ValueError):
            compare.pool([a, self.results([8.0], [10.0], sha=None)])

    def test_refuses_mixed_sizes_or_binaries(self):
        with self.assertRaises(ValueError):
            compare.pool([self.results([7.0], [10.0]), self.results([7.0], [10.0], n=10_000_000)])
        with self.assertRaises(ValueError):
            compare.pool([self.results([7.0], [10.0]), self.results([7.0], [10.0], sha="b")])


if __name__ == "__main__":
    unittest.main()
