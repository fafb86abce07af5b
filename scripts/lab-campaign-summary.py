#!/usr/bin/env python3
"""Summarise scripts/lab-campaign.sh results: per candidate boots, stalls, L2 boot times, bench.

    scripts/lab-campaign-summary.py RESULTS.jsonl [--json]

A stall is a heartbeat loss of a booted L1 (the lab's stall detection); an L1 boot that failed
before its agent came up (and was retried by svff-lab) is counted apart. Stall rates are compared with Fisher's exact test (two-sided) against candidate B, and each
candidate's stall rate gets a one-sided 95 % upper bound (Clopper-Pearson; for 0 stalls in n
boots that is 1 - 0.05**(1/n), e.g. 9.5 % for n = 30).
"""
import json
import sys
from math import comb
from statistics import median


def fisher_two_sided(a, b, c, d):
    """p of the 2x2 table [[a, b], [c, d]] (stalled/not for two candidates)."""
    n1, n2, k = a + b, c + d, a + c
    n = n1 + n2

    def p(x):
        return comb(n1, x) * comb(n2, k - x) / comb(n, k)

    p0 = p(a)
    lo, hi = max(0, k - n2), min(k, n1)
    return min(1.0, sum(p(x) for x in range(lo, hi + 1) if p(x) <= p0 * (1 + 1e-9)))


def upper95(stalls, n):
    """One-sided 95 % Clopper-Pearson upper bound of a binomial rate."""
    if n == 0:
        return 1.0
    if stalls == n:
        return 1.0
    lo, hi = stalls / n, 1.0
    for _ in range(60):  # bisect P(X <= stalls | p) = 0.05
        mid = (lo + hi) / 2
        cdf = sum(comb(n, i) * mid**i * (1 - mid) ** (n - i) for i in range(stalls + 1))
        if cdf > 0.05:
            lo = mid
        else:
            hi = mid
    return hi


def main():
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    by = {}
    for r in rows:
        by.setdefault(r["candidate"], []).append(r)
    out = {}
    for c in sorted(by):
        rs = by[c]
        stalls = sum(1 for r in rs if r["stalled"])
        boot_failures = sum(1 for r in rs if r.get("l1_boot_retried"))
        l2 = [r["l2_boot_s"] for r in rs if r["l2_boot_s"] is not None]
        deadline = sum(1 for r in rs if r["l2_deadline_hit"])
        bench = {}
        for nvf in ("1", "4", "10"):
            avgs = [r["bench"][nvf]["avg_ms"] for r in rs if nvf in r.get("bench", {})]
            mins = [r["bench"][nvf]["min_ms"] for r in rs if nvf in r.get("bench", {})]
            if avgs:
                bench[nvf] = {
                    "boots": len(avgs),
                    "median_of_avg_ms": round(median(avgs), 1),
                    "min_ms": round(min(mins), 1),
                    "max_of_avg_ms": round(max(avgs), 1),
                }
        loads = [float(r["loadavg_before"].split()[0]) for r in rs]
        out[c] = {
            "env": rs[0]["env"],
            "boots": len(rs),
            "stalls": stalls,
            "l1_boot_failures_retried": boot_failures,
            "stall_upper95": round(upper95(stalls, len(rs)), 3),
            "l2_boots_timed": len(l2),
            "l2_deadline_hit": deadline,
            "l2_median_s": round(median(l2), 1) if l2 else None,
            "l2_min_s": min(l2) if l2 else None,
            "l2_max_s": max(l2) if l2 else None,
            "l1_boot_median_s": round(median([r["l1_boot_s"] for r in rs if r["l1_boot_s"]] or [0]), 1),
            "bench": bench,
            "loadavg1_median": round(median(loads), 2),
            "loadavg1_range": [min(loads), max(loads)],
            "failed_runs": [r["n"] for r in rs if r["rc"] != 0],
        }
    if "B" in out:
        b = out["B"]
        for c, v in out.items():
            if c != "B":
                v["fisher_p_vs_B"] = round(
                    fisher_two_sided(v["stalls"], v["boots"] - v["stalls"], b["stalls"], b["boots"] - b["stalls"]), 4
                )
    if "--json" in sys.argv:
        print(json.dumps(out, indent=2))
        return
    for c, v in out.items():
        print(f"{c} [{v['env']}]: {v['boots']} boots, {v['stalls']} stalled "
              f"(95% upper bound {v['stall_upper95']*100:.1f}%"
              + (f", Fisher p vs B {v['fisher_p_vs_B']}" if "fisher_p_vs_B" in v else "") + ")"
              + f"; L1 boots that failed before the agent and were retried: {v['l1_boot_failures_retried']}")
        print(f"   L2 boot: median {v['l2_median_s']} s, min {v['l2_min_s']}, max {v['l2_max_s']} "
              f"({v['l2_boots_timed']} timed, {v['l2_deadline_hit']} past the deadline); "
              f"L1 boot median {v['l1_boot_median_s']} s; load(1 min) median {v['loadavg1_median']} "
              f"range {v['loadavg1_range']}")
        for nvf, s in v["bench"].items():
            print(f"   bench {nvf:>2} VFs: median of per-boot avg {s['median_of_avg_ms']} ms, "
                  f"min {s['min_ms']} ms, worst avg {s['max_of_avg_ms']} ms ({s['boots']} boots)")
        if v["failed_runs"]:
            print(f"   non-zero exit in boots {v['failed_runs']}")


if __name__ == "__main__":
    main()
