"""Coverage of the one-call estimators' bootstrap intervals on Gaussian pairs over data seeds.

Each data seed draws ``--n`` samples of four independent Gaussian pairs (correlations 0.25,
0.5, 0.75, 0.9; truths ``-1/2 log(1 - rho^2)``) and runs one ``estimate_pairwise_mi(...,
pairs=the four pairs, return_ci=True)`` (per-pair critics, per-pair stopping points). Reports,
per correlation, the share of intervals that contain the truth, their mean width and the mean
error. Results are appended to a JSON file as they come (resumable, mergeable with --merge):

    python benchmarks/estimator_coverage.py --threads 1 --n 10000 --seeds 0-19 --out results/coverage.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import mmim_ext
from resumable_json import load, run_meta, save

RHOS = (0.25, 0.5, 0.75, 0.9)


def _seeds(text: str):
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def table(rows, ci: float = 0.95) -> str:
    lines = [f"| rho | truth | n | seeds | covered ({ci:.0%} intervals) | mean width | mean error | "
             "mean estimate +- s.e. |", "|---|---|---|---|---|---|---|---|"]
    for n in sorted({r["n"] for r in rows}):
        for rho in RHOS:
            rs = [r for r in rows if r["rho"] == rho and r["n"] == n]
            if not rs:
                continue
            truth = rs[0]["truth"]
            cov = sum(r["low"] <= truth <= r["high"] for r in rs)
            est = torch.tensor([r["estimate"] for r in rs], dtype=torch.float64)
            se = float(est.std() / math.sqrt(len(rs))) if len(rs) > 1 else float("nan")
            width = sum(r["high"] - r["low"] for r in rs) / len(rs)
            lines.append(f"| {rho} | {truth:.3f} | {n} | {len(rs)} | {cov}/{len(rs)} ({cov / len(rs):.0%}) | "
                         f"{width:.3f} | {float(est.mean()) - truth:+.3f} | {float(est.mean()):.3f} +- {se:.3f} |")
        rs = [r for r in rows if r["n"] == n]
        cov = sum(r["low"] <= r["truth"] <= r["high"] for r in rs)
        lines.append(f"| all | | {n} | | {cov}/{len(rs)} ({cov / len(rs):.0%}) | | | |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--seeds", default="0-19", help="'a-b' or comma-separated data seeds")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="results/coverage.json")
    p.add_argument("--merge", nargs="+", default=None, help="only print the table of these JSON files")
    args = p.parse_args(argv)
    if args.merge:
        print(table([r for path in args.merge for r in load(path)["rows"]]))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    state = load(args.out)
    state["meta"].append(run_meta())
    done = {(r["seed"], r["n"]) for r in state["rows"]}
    pairs = torch.tensor([[2 * k, 2 * k + 1] for k in range(len(RHOS))])
    for seed in _seeds(args.seeds):
        if (seed, args.n) in done:
            continue
        g = torch.Generator().manual_seed(5000 + seed)
        cols = []
        for rho in RHOS:
            x = torch.randn(args.n, generator=g)
            cols += [x, rho * x + math.sqrt(1 - rho * rho) * torch.randn(args.n, generator=g)]
        t0 = time.perf_counter()
        est, low, high = mmim_ext.estimate_pairwise_mi(torch.stack(cols, 1), pairs=pairs, return_ci=True, seed=seed)
        secs = time.perf_counter() - t0
        for k, rho in enumerate(RHOS):
            i, j = 2 * k, 2 * k + 1
            state["rows"].append({"seed": seed, "n": args.n, "rho": rho, "truth": -0.5 * math.log(1 - rho * rho),
                                  "estimate": float(est[i, j]), "low": float(low[i, j]), "high": float(high[i, j]),
                                  "seconds": secs})
        print(f"seed {seed}: " + ", ".join(f"{float(est[2 * k, 2 * k + 1]):.3f} [{float(low[2 * k, 2 * k + 1]):.3f}, "
                                           f"{float(high[2 * k, 2 * k + 1]):.3f}]" for k in range(len(RHOS)))
              + f" ({secs:.1f} s)", flush=True)
        save(state, args.out)
    print(table(state["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
