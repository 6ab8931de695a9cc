#!/usr/bin/env python
"""Wall time of a regularizer's training call: what one training step with MMIM costs.

For each named regularizer (``mmim_ext.make_regularizer``: mmim, c4, c5, c6, rdm) and width m it
builds the regularizer (per-pair critics, ``hidden`` units each) and float32 features
``[B, m]`` that require grad with labels of ``classes`` classes, and times

* ``train``: a call in training mode (``critic_steps`` Adam updates of the regularizer's own
  critics on the detached features, then the penalty through the updated critics) followed by
  ``penalty.backward()``: the regularizer's share of one training step;
* ``penalty``: the same in eval mode (no critic update): the penalty and its gradient w.r.t. the
  features alone;
* ``critics`` = train - penalty (medians): the critic updates.

Medians over ``--calls`` calls after one warm-up call. The machine is shared: compare rows of one
run. Prints a table and writes JSON (``--json``, default
``benchmarks/out/regularizer-step-<time>.json``, a git-ignored folder).

    python benchmarks/regularizer_step.py --m 256 512 1024 --regularizer mmim c4 c6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm

import mmim_ext
from compare import machine_info

NAMES = ("mmim", "c4", "c5", "c6", "rdm")


def time_call(reg, h, labels, train: bool) -> float:
    reg.train(train)
    h.grad = None
    t0 = time.perf_counter()
    reg(h, labels).backward()
    return time.perf_counter() - t0


def run_cell(name: str, m: int, args) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    reg = mmim_ext.make_regularizer(name, m, args.classes, hidden=args.hidden, critic_steps=args.critic_steps)
    h = torch.randn(args.B, m, generator=g).requires_grad_(True)
    labels = torch.arange(args.B) % args.classes
    times = {"train": [], "penalty": []}
    for mode in times:  # warm-up: lazy initialization, first allocations, the critics' Adam state
        time_call(reg, h, labels, mode == "train")
    for _ in range(args.calls):
        for mode in times:
            times[mode].append(time_call(reg, h, labels, mode == "train"))
    train, penalty = statistics.median(times["train"]), statistics.median(times["penalty"])
    return {"regularizer": name, "m": m, "pairs": m * (m - 1) // 2, "B": args.B, "classes": args.classes,
            "hidden": args.hidden, "critic_steps": args.critic_steps, "calls": args.calls,
            "train_s": train, "penalty_s": penalty, "critics_s": train - penalty,
            "train_calls_s": times["train"], "penalty_calls_s": times["penalty"]}


def print_table(rows) -> None:
    print(f"{'regularizer':<12}{'m':>6}{'pairs':>10}{'B':>5}  {'train s':>9}{'penalty s':>11}{'critics s':>11}")
    for r in rows:
        print(f"{r['regularizer']:<12}{r['m']:>6}{r['pairs']:>10}{r['B']:>5}  {r['train_s']:>9.3f}"
              f"{r['penalty_s']:>11.3f}{r['critics_s']:>11.3f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--regularizer", nargs="+", default=["mmim"], choices=NAMES, help="named regularizers")
    p.add_argument("--m", type=int, nargs="+", default=[256, 512, 1024], help="feature widths (units)")
    p.add_argument("--B", type=int, default=256, help="batch size")
    p.add_argument("--classes", type=int, default=10, help="number of classes of the labels")
    p.add_argument("--hidden", type=int, default=16, help="hidden units per critic")
    p.add_argument("--critic-steps", type=int, default=1, help="critic updates per training call")
    p.add_argument("--calls", type=int, default=5, help="timed calls per mode and cell (median)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="output JSON path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name, val, lo in (("--B", args.B, 2), ("--classes", args.classes, 2), ("--hidden", args.hidden, 1),
                          ("--critic-steps", args.critic_steps, 0), ("--calls", args.calls, 1)):
        if val < lo:
            p.error(f"{name} must be at least {lo}, got {val}")
    if min(args.m) < 2:
        p.error(f"--m values must be at least 2, got {args.m}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cells = [(name, m) for name in args.regularizer for m in args.m]
    rows = []
    bar = tqdm(cells, desc="regularizer calls", disable=args.no_progress, file=sys.stderr)
    for name, m in bar:
        bar.set_postfix_str(f"{name} m={m}")
        rows.append(run_cell(name, m, args))
    print_table(rows)
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                     time.strftime("regularizer-step-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"command": " ".join(sys.argv), "machine": machine_info(), "rows": rows}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
