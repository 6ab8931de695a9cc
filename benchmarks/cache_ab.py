"""The CPU block cache's effect: fresh processes alternating with the cache off and on.

Each process (``--worker``) makes ``compare.py``'s inputs for one cell, calls one backend
(``onepass``: ``pair_stats_linear`` + backward; ``fused``: ``pair_stats`` + autograd) ``--calls``
times with the gradients dropped before every call (as ``optimizer.zero_grad()`` does), and
reports the median time of the calls after the first two, with the page faults and system CPU time
of each call (``getrusage``). The parent runs ``--alternations`` pairs of processes, cache off
(``MMIM_EXT_CPU_CACHE_MB=0``) then on (the environment's setting, or the default), and prints
each pair's ratio on / off and their median::

    python benchmarks/cache_ab.py --m 1024 --backend onepass --alternations 6 --json benchmarks/out/cache-ab.json

With ``--builds A B`` the pairs compare two builds of the package instead (two source trees, each
with its extension built in place: ``python setup.py build_ext --inplace``): each process imports
``mmim_ext`` from its tree (``PYTHONPATH``; the worker reports the module it imported and the parent
checks it), the cache at the environment's setting in both, the order of the two processes
alternating from pair to pair, and the ratio is B / A::

    python benchmarks/cache_ab.py --builds /tmp/tree-a /tmp/tree-b --alternations 16
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
                          cache=mmim_ext.cpu_cache_info(), module=os.path.abspath(mmim_ext.__file__))))


def run_process(args, cache_mb: str | None, tree: str | None = None) -> dict:
    env = dict(os.environ)
    if cache_mb is not None:
        env["MMIM_EXT_CPU_CACHE_MB"] = cache_mb
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([tree] + [x for x in [env.get("PYTHONPATH")] if x])
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--m", str(args.m), "--B", str(args.B),
           "--K", str(args.K), "--R", str(args.R), "--mode", args.mode, "--backend", args.backend,
           "--calls", str(args.calls)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"cache_ab: worker failed (MMIM_EXT_CPU_CACHE_MB={cache_mb}, tree {tree}):\n{out.stderr}")
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    if tree is not None and not rec["module"].startswith(os.path.join(os.path.abspath(tree), "")):
        sys.exit(f"cache_ab: the worker for tree {tree} imported {rec['module']}")
    return rec


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
    p.add_argument("--builds", nargs=2, metavar=("A", "B"), default=None,
                   help="compare two source trees with in-place builds (ratio B / A) instead of the cache off / on")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.builds:
        for tree in args.builds:
            if not os.path.isfile(os.path.join(tree, "mmim_ext", "__init__.py")):
                p.error(f"--builds: {tree!r} is not a source tree of mmim_ext (no mmim_ext/__init__.py)")
    for name, lo in (("m", 2), ("B", 1), ("K", 1), ("R", 1), ("alternations", 1), ("calls", 3)):
        if getattr(args, name) < lo:
            p.error(f"--{name} must be at least {lo}, got {getattr(args, name)}")
    if args.worker:
        worker(args)
        return
    if args.builds:
        builds_ab(args)
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
    summarize(args, records, ratios, "on/off", "on")


def summarize(args, records, ratios, ratio_name: str, second: str) -> None:
    """The pairs' median ratio (second process / first), and every record in ``--json``."""
    print(f"# median ratio {ratio_name} {statistics.median(ratios):.3f} over {len(ratios)} pairs; "
          f"{second} faster in {sum(r < 1 for r in ratios)} of them")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), pairs=records, median_ratio=statistics.median(ratios)), f, indent=1)
        print(f"# JSON: {args.json}")


def builds_ab(args) -> None:
    """``--builds A B``: pairs of fresh processes, one per tree, the first of a pair alternating."""
    tree_a, tree_b = (os.path.abspath(t) for t in args.builds)
    print(f"# cache_ab --builds: m={args.m} B={args.B} K={args.K} R={args.R} {args.mode} {args.backend}, "
          f"{args.calls} calls per process; A = {tree_a}, B = {tree_b}")
    print(f"{'pair':>4} {'A s':>8} {'B s':>8} {'B/A':>7}")
    records, ratios = [], []
    for k in range(args.alternations):
        if k % 2 == 0:
            a = run_process(args, None, tree_a)
            b = run_process(args, None, tree_b)
        else:
            b = run_process(args, None, tree_b)
            a = run_process(args, None, tree_a)
        ratio = b["median_s"] / a["median_s"]
        ratios.append(ratio)
        print(f"{k + 1:>4} {a['median_s']:>8.4f} {b['median_s']:>8.4f} {ratio:>7.3f}", flush=True)
        records.append(dict(a=a, b=b, ratio=ratio))
    summarize(args, records, ratios, "B/A", "B")


if __name__ == "__main__":
    main()
