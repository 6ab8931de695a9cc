"""The CPU block cache's effect: fresh processes alternating with the cache off and on.

Each process (``--worker``) makes ``compare.py``'s inputs for one cell, calls one backend
(``onepass``: ``pair_stats_linear`` + backward; ``fused``: ``pair_stats`` + autograd) ``--calls``
times with the gradients dropped before every call (as ``optimizer.zero_grad()`` does), and
reports the median time of the calls after the first two, with the page faults and system CPU time
of each call (``getrusage``). The parent runs ``--alternations`` pairs of processes, cache off
(``MMIM_EXT_CPU_CACHE_MB=0``) then on (the environment's setting, or the default), and prints
each pair's ratio on / off and their median::

    python benchmarks/cache_ab.py --m 1024 --backend onepass --alternations 6 --json benchmarks/results/cache-ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def steady(xs):
    """Median of a process's calls after the first two (warm-up, first allocations)."""
    return statistics.median(xs[2:])


def worker(args) -> None:
    import torch

    sys.path.insert(0, HERE)
    from compare import Cell, _fused, _onepass, make_inputs, run_once

    import mmim_ext

    fn = {"onepass": _onepass, "fused": _fused}[args.backend]
    cell = Cell(args.m, args.B, args.K, args.R, args.mode)
    inputs, upstream = make_inputs(cell, True)
    times, faults, system = [], [], []
    for _ in range(args.calls):
        for t in inputs[:6]:
            t.grad = None
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        run_once(fn, inputs, upstream, "fwdbwd")
        times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(r1.ru_minflt - r0.ru_minflt)
        system.append(r1.ru_stime - r0.ru_stime)
    print(json.dumps(dict(times_s=times, minor_faults=faults, system_s=system,
                          median_s=steady(times), threads=torch.get_num_threads(),
                          cache=mmim_ext.cpu_cache_info())))


def run_process(args, cache_mb: str | None) -> dict:
    env = dict(os.environ)
    if cache_mb is not None:
        env["MMIM_EXT_CPU_CACHE_MB"] = cache_mb
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--m", str(args.m), "--B", str(args.B),
           "--K", str(args.K), "--R", str(args.R), "--mode", args.mode, "--backend", args.backend,
           "--calls", str(args.calls)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"cache_ab: worker failed (MMIM_EXT_CPU_CACHE_MB={cache_mb}):\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, default=1024)
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--K", type=int, default=16)
    p.add_argument("--R", type=int, default=1)
    p.add_argument("--mode", choices=("per_pair", "shared"), default="per_pair")
    p.add_argument("--backend", choices=("onepass", "fused"), default="onepass")
    p.add_argument("--calls", type=int, default=9, help="calls per process, at least 3 (the median skips the first two)")
    p.add_argument("--alternations", type=int, default=6)
    p.add_argument("--json", default=None, help="write every process's record here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, lo in (("m", 2), ("B", 1), ("K", 1), ("R", 1), ("alternations", 1), ("calls", 3)):
        if getattr(args, name) < lo:
            p.error(f"--{name} must be at least {lo}, got {getattr(args, name)}")
    if args.worker:
        worker(args)
        return
    on_setting = os.environ.get("MMIM_EXT_CPU_CACHE_MB")
    print(f"# cache_ab: m={args.m} B={args.B} K={args.K} R={args.R} {args.mode} {args.backend}, "
          f"{args.calls} calls per process, cache off (0) vs on ({on_setting or 'default'})")
    print(f"{'pair':>4} {'off s':>8} {'on s':>8} {'on/off':>7}  {'faults off':>10} {'on':>6}  {'sys s off':>9} {'on':>6}")
    records, ratios = [], []
    for k in range(args.alternations):
        off = run_process(args, "0")
        on = run_process(args, on_setting)
        ratio = on["median_s"] / off["median_s"]
        ratios.append(ratio)
        print(f"{k + 1:>4} {off['median_s']:>8.4f} {on['median_s']:>8.4f} {ratio:>7.3f}  "
              f"{steady(off['minor_faults']):>10.0f} {steady(on['minor_faults']):>6.0f}  "
              f"{steady(off['system_s']):>9.3f} {steady(on['system_s']):>6.3f}", flush=True)
        records.append(dict(off=off, on=on, ratio=ratio))
    print(f"# median ratio on/off {statistics.median(ratios):.3f} over {len(ratios)} pairs; "
          f"on faster in {sum(r < 1 for r in ratios)} of them")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), pairs=records, median_ratio=statistics.median(ratios)), f, indent=1)
        print(f"# JSON: {args.json}")


if __name__ == "__main__":
    main()
