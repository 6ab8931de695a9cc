"""Fused CUDA ``pair_stats`` against ``torch.compile`` of the reference, on one GPU.

Called by ``scripts/gpu_check.sh`` (see docs/cuda.md); runs on its own as well::

    python benchmarks/gpu_bench.py --m 1024 4096 --json results/gpu_check/bench.json

Per cell (m, direction) with ``B = 256, K = 16, R = 1`` and one critic per pair by default:

* ``fused``: ``mmim_ext.pair_stats(..., backend="fused")``, the public call, so its time includes
  the wrapper's value checks and the op's index checks (each a host synchronization).
* ``compiled``: ``torch.compile(mmim_ext.pair_stats_reference)`` applied to chunks of pairs
  (explicit ``pairs`` and parameter slices), the chunk loop in Python. The chunk holds at most
  ``--chunk-mib`` of the reference's hidden activations (its own sizing rule, with a GPU-sized
  budget instead of its 256 MiB default) and divides P, so every call has one shape and Dynamo
  compiles once per cell. Compilation is excluded from the timing (reported as
  ``compile_s``: the first call).

Directions: ``fwd`` = forward under ``no_grad``; ``fwdbwd`` = forward and backward with upstream
gradients for both outputs and gradients w.r.t. ``h, wa, wb, b, v, c``. Before timing, the two
backends' statistics (and, for ``fwdbwd``, gradients) are compared: ``check`` is the largest
difference relative to the largest reference value.

Times are medians of ``--repeats`` calls after ``--warmup`` calls, each bracketed by CUDA events
on the current stream after a ``torch.cuda.synchronize()``. Needs a CUDA device; exits with
status 2 without one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

import mmim_ext


def _largest_divisor_at_most(n: int, cap: int) -> int:
    for d in range(max(1, min(n, cap)), 0, -1):
        if n % d == 0:
            return d
    return 1


def make_cell(m: int, B: int, K: int, R: int, shared: bool, seed: int = 0, device: str = "cuda"):
    """Inputs on `device`, float32: h, (wa, wb, b, v, c), perms."""
    g = torch.Generator(device=device).manual_seed(seed)
    P = m * (m - 1) // 2
    shape = (K,) if shared else (P, K)
    h = torch.randn(B, m, device=device, generator=g)
    params = [torch.randn(shape, device=device, generator=g) / math.sqrt(2.0) for _ in range(3)]
    params.append(torch.randn(shape, device=device, generator=g) / math.sqrt(K))
    params.append(torch.randn(() if shared else (P,), device=device, generator=g))
    perms = torch.stack([torch.randperm(B, device=device, generator=g) for _ in range(R)])
    return h, params, perms


class CompiledReference:
    """``torch.compile(pair_stats_reference)`` over chunks of pairs (see the module docstring)."""

    def __init__(self, m: int, B: int, K: int, R: int, shared: bool, chunk_bytes: int, device: str = "cuda"):
        P = m * (m - 1) // 2
        per_pair = 4 * (1 + R) * B * K * 4  # the reference's rule: a few [1+R, B, chunk, K] float32
        self.chunk = _largest_divisor_at_most(P, max(1, chunk_bytes // per_pair))
        self.scratch = self.chunk * per_pair  # so that the reference keeps the chunk whole
        self.shared = shared
        self.pairs = mmim_ext.all_pairs(m, device=device).split(self.chunk)
        torch._dynamo.reset()
        self.fn = torch.compile(mmim_ext.pair_stats_reference, dynamic=False)

    def __call__(self, h, wa, wb, b, v, c, perms):
        n = len(self.pairs)
        # Views by split: autograd joins each parameter's chunk gradients with one cat.
        per_chunk = [(x,) * n for x in (wa, wb, b, v, c)] if self.shared else [x.split(self.chunk) for x in
                                                                                 (wa, wb, b, v, c)]
        t_parts, l_parts = [], []
        for q, pairs in enumerate(self.pairs):
            t, l = self.fn(h, *(x[q] for x in per_chunk), perms, pairs, max_scratch_bytes=self.scratch)
            t_parts.append(t)
            l_parts.append(l)
        return torch.cat(t_parts), torch.cat(l_parts)


def _fused(h, wa, wb, b, v, c, perms):
    return mmim_ext.pair_stats(h, wa, wb, b, v, c, perms, backend="fused")


def _run(fn, direction, h, params, perms, upstream):
    """One call: statistics (fwd) or statistics and gradients (fwdbwd)."""
    if direction == "fwd":
        with torch.no_grad():
            return fn(h, *params, perms), None
    leaves = [x.detach().requires_grad_(True) for x in (h, *params)]
    t, l = fn(*leaves, perms)
    torch.autograd.backward((t, l), upstream)
    return (t.detach(), l.detach()), [x.grad for x in leaves]


def _timed(fn, direction, h, params, perms, upstream, warmup, repeats, deadline):
    for _ in range(warmup):
        _run(fn, direction, h, params, perms, upstream)
    times = []
    for _ in range(repeats):
        if times and time.monotonic() > deadline:
            break
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _run(fn, direction, h, params, perms, upstream)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def _rel_diff(got, ref) -> float:
    scale = max(ref.abs().max().item(), 1e-30)
    return (got.double() - ref.double()).abs().max().item() / scale


def bench_cell(m, direction, args, deadline, device="cuda"):
    B, K, R, shared = args.B, args.K, args.R, args.mode == "shared"
    P = m * (m - 1) // 2
    row = dict(m=m, B=B, K=K, R=R, mode=args.mode, direction=direction, P=P)
    h, params, perms = make_cell(m, B, K, R, shared, device=device)
    g = torch.Generator(device=device).manual_seed(1)
    upstream = (torch.randn(P, device=device, generator=g), torch.randn(P, device=device, generator=g))
    row["critic_evals_x_K"] = P * B * (1 + R) * K

    # fused: correctness against the compiled reference first, then timing
    out_f, grads_f = _run(_fused, direction, h, params, perms, upstream)
    torch.cuda.synchronize()
    row["fused_s"] = _timed(_fused, direction, h, params, perms, upstream, args.warmup, args.repeats, deadline)
    row["fused_median_s"] = statistics.median(row["fused_s"])
    row["fused_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30

    if time.monotonic() + args.min_compiled_seconds > deadline:
        row["note"] = "compiled reference skipped: out of time"
        return row
    torch.cuda.reset_peak_memory_stats()
    try:
        comp = CompiledReference(m, B, K, R, shared, args.chunk_mib * 2**20, device=device)
        row["compiled_chunk_pairs"] = comp.chunk
        t0 = time.monotonic()
        out_c, grads_c = _run(comp, direction, h, params, perms, upstream)
        torch.cuda.synchronize()
        row["compile_s"] = time.monotonic() - t0
        row["check_t_joint"] = _rel_diff(out_f[0], out_c[0])
        row["check_lme"] = _rel_diff(out_f[1], out_c[1])
        if grads_f is not None:
            for name, a, r in zip(("h", "wa", "wb", "b", "v", "c"), grads_f, grads_c):
                row[f"check_grad_{name}"] = _rel_diff(a, r)
        del out_c, grads_c
        row["compiled_s"] = _timed(comp, direction, h, params, perms, upstream, args.warmup, args.repeats, deadline)
        row["compiled_median_s"] = statistics.median(row["compiled_s"])
        row["compiled_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["speedup"] = row["compiled_median_s"] / row["fused_median_s"]
    except torch.cuda.OutOfMemoryError as exc:
        row["note"] = f"compiled reference out of memory ({str(exc).splitlines()[0][:80]})"
    checks = [v for k, v in row.items() if k.startswith("check_")]
    if checks:
        row["check"] = max(checks)
    return row


def print_table(rows, file=sys.stdout):
    head = (f"{'m':>5} {'dir':7} {'fused ms':>10} {'compiled ms':>12} {'speedup':>8} {'Geval*K/s':>10} "
            f"{'check':>9} {'n':>5}  note")
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in rows:
        f = r.get("fused_median_s")
        cm = r.get("compiled_median_s")
        rate = r["critic_evals_x_K"] / f / 1e9 if f else float("nan")
        n = f"{len(r.get('fused_s', []))}/{len(r.get('compiled_s', []))}"
        print(f"{r['m']:>5} {r['direction']:7} {f * 1e3 if f else float('nan'):>10.3f} "
              f"{cm * 1e3 if cm else float('nan'):>12.3f} {r.get('speedup', float('nan')):>7.1f}x {rate:>10.1f} "
              f"{r.get('check', float('nan')):>9.1e} {n:>5}  {r.get('note', '')}", file=file)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--K", type=int, default=16)
    p.add_argument("--R", type=int, default=1)
    p.add_argument("--mode", choices=("per_pair", "shared"), default="per_pair")
    p.add_argument("--directions", nargs="+", choices=("fwd", "fwdbwd"), default=["fwd", "fwdbwd"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--chunk-mib", type=int, default=4096,
                   help="hidden-activation budget of one compiled chunk (the reference's sizing rule)")
    p.add_argument("--time-budget", type=float, default=240.0,
                   help="seconds for the whole run; cells stop repeating (after one timed call) past it")
    p.add_argument("--min-compiled-seconds", type=float, default=20.0,
                   help="skip the compiled reference of a cell when less than this is left")
    p.add_argument("--json", default=None, help="write the rows and the environment here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; nothing to time", file=sys.stderr)
        return 2
    if not mmim_ext.fused_available("cuda"):
        print("gpu_bench: mmim_ext has no CUDA kernels (build with FORCE_CUDA=1)", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.time_budget
    env = dict(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
               torch=torch.__version__, cuda=torch.version.cuda, host_cpus=os.cpu_count())
    print(f"gpu_bench: {env['device']} (sm_{''.join(map(str, env['capability']))}), torch {env['torch']}, "
          f"CUDA {env['cuda']}; B={args.B} K={args.K} R={args.R} {args.mode}, float32; medians of up to "
          f"{args.repeats} calls after {args.warmup} warm-up")
    rows = []
    for m in args.m:
        for direction in args.directions:
            if time.monotonic() > deadline:
                rows.append(dict(m=m, direction=direction, critic_evals_x_K=0, note="skipped: out of time"))
                continue
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.monotonic()
            try:
                row = bench_cell(m, direction, args, deadline)
            except torch.cuda.OutOfMemoryError as exc:
                row = dict(m=m, direction=direction, critic_evals_x_K=0,
                           note=f"out of memory ({str(exc).splitlines()[0][:80]})")
            row["cell_s"] = time.monotonic() - t0
            rows.append(row)
            fm, cm = row.get("fused_median_s"), row.get("compiled_median_s")
            print(f"gpu_bench: m={m} {direction}: fused {fm * 1e3 if fm else float('nan'):.3f} ms, compiled "
                  f"{cm * 1e3 if cm else float('nan'):.3f} ms (compile {row.get('compile_s', float('nan')):.0f} s, "
                  f"cell {row['cell_s']:.0f} s) {row.get('note', '')}", flush=True)
    print()
    print_table(rows)
    print("speedup = compiled median / fused median (same GPU, same run); Geval*K/s = P*B*(1+R)*K / fused median "
          "/ 1e9; check = largest |fused - compiled| / largest |compiled| over outputs (and gradients)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(env=env, args=vars(args), rows=rows), f, indent=1)
        print(f"gpu_bench: wrote {args.json}")
    bad = [r for r in rows if r.get("check", 0.0) > 1e-3]
    if bad:
        print(f"gpu_bench: fused and compiled reference disagree in {len(bad)} cell(s) (check > 1e-3)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
