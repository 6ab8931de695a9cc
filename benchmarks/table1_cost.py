#!/usr/bin/env python
"""CPU time of the Table 1 experiment's parts, and of a whole campaign from them.

For one (data set, architecture) it runs every body of the protocol
(``mmim_ext.experiments.protocol.run_body``) for ``--epochs`` epochs after a one-epoch warm-up
and records CPU seconds (``time.process_time``, so that other processes on a shared core count
less than in wall time; still compare rows of one run): per body epoch of training steps, per
validation pass, per C3 epoch and per held-out measurement (``measure_information`` with the
package's ``MeasureConfig``, on the baseline's and C5's features). From these and the body
budgets (``--budgets``: the baseline's ``epochs_used`` per table seed; ``--tune-budgets``: per
tuning seed, after ``--tune-max-epochs``) it prints the CPU hours of the campaign's parts:
10 methods on every table seed with measurements, and the λ grid on every tuning seed.

    OMP_NUM_THREADS=1 python benchmarks/table1_cost.py --dataset mnist1d --arch mlp \\
        --budgets 30 27 27 30 27 29 30 31 30 27 --tune-budgets 29 26 30

Writes JSON to ``--json`` (default ``benchmarks/out/table1-cost-<dataset>-<arch>.json``, ignored).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import torch

BODIES = (("baseline", ("baseline", "baseline+c3")), ("c1", ("c1", "mmim")), ("c4", ("c4",)), ("c5", ("c5",)),
          ("c6", ("c6",)), ("rdm", ("rdm",)), ("iyh", ("iyh",)), ("mmim-total", ("mmim-total",)))


def _timers(spent: dict, calls: dict):
    def wrap(mod, name):
        f = getattr(mod, name)

        @functools.wraps(f)
        def timed(*a, **k):
            t = time.process_time()
            try:
                return f(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.process_time() - t
                calls[name] = calls.get(name, 0) + 1
        setattr(mod, name, timed)
    return wrap


def measure_parts(dataset: str, arch: str, epochs: int, cfg_kw: dict) -> dict:
    """CPU seconds per part of every body's run (see the module docstring)."""
    import mmim_ext.estimators as E
    import mmim_ext.training as T
    from mmim_ext.experiments import data as D
    from mmim_ext.experiments import measure as M
    from mmim_ext.experiments import protocol as P

    t = time.process_time()
    splits = D.load_dataset(dataset)
    out = {"dataset": dataset, "arch": arch, "epochs": epochs, "load_s": time.process_time() - t, "bodies": {}}
    spent, calls = {}, {}
    wrap = _timers(spent, calls)
    for name in ("evaluate_classifier", "train_c3", "train_classifier"):
        wrap(T, name)
    estimators = ("estimate_pairwise_mi", "estimate_unit_label_mi", "estimate_label_mi")
    for name in estimators:
        wrap(E, name)
    cfg = P.ProtocolConfig(dataset, arch, max_epochs=epochs, patience=epochs + 1, **cfg_kw)
    P.run_body(splits, cfg, "c1", 0, reg_weight=1e-3, budget=1)  # warm-up (allocations, first calls)
    for body, methods in BODIES:
        spent.clear()
        calls.clear()
        meas = (lambda h, y: M.measure_information(h, y, M.MeasureConfig())) if body in ("baseline", "c5") else None
        recs = P.run_body(splits, cfg, body, 0, reg_weight=1e-3, budget=None if body == "baseline" else epochs,
                          methods=methods, measure=meas)
        n = recs[0]["epochs_used"]
        ev = spent["evaluate_classifier"] / calls["evaluate_classifier"]
        row = {"eval_pass_s": ev, "steps_s_per_epoch": (spent["train_classifier"] - n * ev) / n}
        if "train_c3" in spent:
            row["c3_s_per_epoch"] = spent["train_c3"] / cfg.c3_epochs
        if meas is not None:
            row["measure_s"] = sum(spent.get(k, 0.0) for k in estimators)
        out["bodies"][body] = row
        print(body, json.dumps(row), flush=True)
    return out


def campaign_hours(parts: dict, budgets, tune_budgets, c3_epochs: int, grid: int = 6) -> dict:
    """CPU hours of the table (every method on every seed, measurements of the 8 bodies) and
    of the λ search (the baseline and ``grid`` values of every regularized body per tuning seed,
    the C3 stage after each ``c1`` run), from :func:`measure_parts`' per-part seconds."""
    b = parts["bodies"]
    ev = statistics.median(r["eval_pass_s"] for r in b.values())
    meas = statistics.mean(r["measure_s"] for r in b.values() if "measure_s" in r)
    c3 = statistics.mean(r["c3_s_per_epoch"] for r in b.values() if "c3_s_per_epoch" in r)
    reg = sum(r["steps_s_per_epoch"] + ev for k, r in b.items() if k != "baseline")
    base = b["baseline"]["steps_s_per_epoch"] + ev
    hours = {
        "table: training steps + validation": sum(e * (base + reg) for e in budgets) / 3600,
        "table: C3 stages": len(budgets) * 2 * c3_epochs * c3 / 3600,
        "table: held-out measurements": len(budgets) * len(BODIES) * meas / 3600,
        "λ search: training steps + validation": sum(e * (base + grid * reg) for e in tune_budgets) / 3600,
        "λ search: C3 stages": len(tune_budgets) * grid * c3_epochs * c3 / 3600,
    }
    hours["total"] = sum(hours.values())
    return hours


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist1d")
    p.add_argument("--arch", default="mlp")
    p.add_argument("--epochs", type=int, default=4, help="body epochs timed per body (after a 1-epoch warm-up)")
    p.add_argument("--budgets", type=int, nargs="+", required=True, help="baseline epochs_used per table seed")
    p.add_argument("--tune-budgets", type=int, nargs="+", required=True, help="baseline epochs_used per tuning seed")
    p.add_argument("--digits-settings", action="store_true",
                   help="docs/table1.md's digits settings: width 64, lr 3e-3, 256 pairs, 5 C3 epochs")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg_kw = (dict(width=64, lr=3e-3, reg_kwargs={"max_pairs": 256, "hidden": 8}, c3_epochs=5)
              if args.digits_settings else {})
    parts = measure_parts(args.dataset, args.arch, args.epochs, cfg_kw)
    hours = campaign_hours(parts, args.budgets, args.tune_budgets, cfg_kw.get("c3_epochs", 10))
    for k, v in hours.items():
        print(f"{k:40s} {v:6.2f} CPU-h")
    path = args.json or os.path.join("benchmarks", "out", f"table1-cost-{args.dataset}-{args.arch}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"parts": parts, "hours": hours, "budgets": args.budgets, "tune_budgets": args.tune_budgets,
                   "threads": torch.get_num_threads(), "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
