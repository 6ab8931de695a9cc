"""Which ``torch.compile`` form of the reference is the strongest baseline: variants alternated.

For one cell and direction, compiles each ``--variants`` form of ``compare.py``'s
``CompiledReference`` (compilation not timed), checks its outputs and gradients against the eager
reference on random pairs (``compare.subset_check``), then runs ``--rounds`` rounds in one
process, each calling every variant once (the order rotated from round to round), and reports
per variant the median time and per round the ratio to the first variant, with their median. A
round's ratio compares calls made seconds apart, so drift of a shared host's speed cancels in it::

    python benchmarks/baseline_ab.py --m 1024 --direction fwdbwd --variants chunk pairs_major --rounds 6 \\
        --json benchmarks/out/baseline-ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import (VARIANTS, Cell, CompiledReference, make_inputs, rotated, run_once, subset_check,  # noqa: E402
                     timed_call)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=1024, help="hidden units (pairs: m(m-1)/2)")
    p.add_argument("--B", type=int, default=256, help="batch size")
    p.add_argument("--K", type=int, default=16, help="critic hidden units")
    p.add_argument("--R", type=int, default=1, help="permutations")
    p.add_argument("--mode", default="per_pair", choices=["per_pair", "shared"], help="critic mode")
    p.add_argument("--direction", default="fwdbwd", choices=["fwd", "fwdbwd"], help="forward or forward+backward")
    p.add_argument("--variants", nargs="+", default=["chunk", "pairs_major"], choices=list(VARIANTS),
                   help="CompiledReference variants; ratios are to the first")
    p.add_argument("--rounds", type=int, default=6, help="rounds, each calling every variant once")
    p.add_argument("--check-pairs", type=int, default=64, help="random pairs checked against the eager reference")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    for name in ("m", "B", "K", "R", "rounds", "check_pairs"):
        low = 2 if name == "m" else 1
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if len(set(args.variants)) != len(args.variants) or len(args.variants) < 2:
        p.error(f"--variants must name at least two different variants, got {args.variants}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    cell = Cell(m=args.m, B=args.B, K=args.K, R=args.R, mode=args.mode)
    inputs, upstream = make_inputs(cell, args.direction == "fwdbwd")
    # All made first: each CompiledReference resets Dynamo, which would drop graphs compiled before.
    fns = {name: CompiledReference(name) for name in args.variants}
    for name in args.variants:
        outs, grads = run_once(fns[name], inputs, upstream, args.direction)  # compiles
        subset_check(cell, inputs, upstream, outs, grads, args.direction, args.check_pairs, who=name)
        print(f"{cell.label()} {args.direction} {name}: compiled, matches the eager reference on "
              f"{min(args.check_pairs, cell.P)} random pairs", flush=True)
    times = {name: [] for name in args.variants}
    names = list(args.variants)
    for k in range(args.rounds):
        for name in rotated(names, k):
            times[name].append(timed_call(fns[name], inputs, upstream, args.direction))
        print(f"round {k + 1}: " + ", ".join(f"{n} {times[n][-1]:.4f} s" for n in names), flush=True)
    first = names[0]
    result = {"cell": asdict(cell), "direction": args.direction,
              "args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "variants": {}}
    for name in names:
        ratios = [t / t0 for t, t0 in zip(times[name], times[first])]
        result["variants"][name] = {"times_s": times[name], "median_s": statistics.median(times[name]),
                                    "ratios_to_first": ratios, "median_ratio": statistics.median(ratios)}
        print(f"{name:12s} median {statistics.median(times[name]):.4f} s "
              f"(calls {min(times[name]):.4f}-{max(times[name]):.4f} s); time / {first} per round: "
              f"median {statistics.median(ratios):.3f} [{', '.join(f'{r:.3f}' for r in ratios)}]")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"JSON: {args.json}")
    return result


if __name__ == "__main__":
    main()
