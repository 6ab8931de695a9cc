#!/usr/bin/env python
"""Compare ``mmim_ext.pair_stats`` backends: fused kernel vs eager reference vs torch.compile.

For every cell (m units, batch B, K hidden units per critic, R permutations, shared or
per-pair critics) and direction (forward, forward+backward) it

1. builds float32 inputs from a fixed seed and runs the fused op once (warm-up);
2. asserts correctness before any timing: the fused outputs (and, for per-pair critics, the
   parameter gradients) of a random subset of pairs against the eager reference on the same
   inputs, and then every baseline's full outputs/gradients against the fused ones;
3. times each backend (warm-up first, torch.compile's compilation excluded), reports the median;
4. measures peak memory in a fresh subprocess per (cell, backend, direction): the increase of
   the process's peak resident set (``VmHWM`` from ``/proc/self/status``, reset through
   ``/proc/self/clear_refs`` right before the call, after inputs exist and lazy initialization
   ran), so every allocation counts, torch's included. ``scratch`` = that increase minus the
   bytes of the outputs (and of the gradients for forward+backward).

Units: times in seconds; "Geval*K/s" = critic evaluations x K per second / 1e9, evaluations =
P*B*(1+R); nominal GFLOP/s = 6*K FLOPs per critic evaluation; "x compile" = time of
torch.compile(reference) / time of this backend, both from the same run; "%sgemm" = nominal
GFLOP/s over the float32 matmul rate measured in the same run.

Run ``python benchmarks/compare.py --help``; ``--quick`` is a small subset. Results go to
stdout and to a JSON file (``--json``, default ``benchmarks/out/compare-<time>.json``, a git-ignored
folder).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

import mmim_ext
from mmim_ext.ops.reference import DEFAULT_MAX_SCRATCH_BYTES, all_pairs, pair_stats_reference

try:  # the reference's per-chunk function: what a user would hand to torch.compile
    from mmim_ext.ops.reference import _chunk_stats as _ref_chunk_stats
except ImportError:  # pragma: no cover - only if the reference is reorganized
    _ref_chunk_stats = None

FULL_GRID = dict(m=[128, 256, 512, 1024, 2048], B=[128, 256, 512], K=[8, 16, 32], R=[1, 4],
                 mode=["per_pair", "shared"])
QUICK_GRID = dict(m=[128, 256, 512], B=[256], K=[16], R=[1], mode=["per_pair", "shared"])
# torch.compile baselines (CompiledReference); the first is the default
VARIANTS = ("chunk", "pairs_major", "chunk_ckpt", "whole")
BACKENDS = ("fused", "onepass", "compiled", "eager")
DIRECTIONS = ("fwd", "fwdbwd")
_MODE_ALIASES = {"per_pair": "per_pair", "per-pair": "per_pair", "perpair": "per_pair",
                 "shared": "shared"}

MEMORY_METHOD = ("peak RSS increase (VmHWM, reset via /proc/self/clear_refs right before the call) "
                 "in a fresh subprocess per cell; includes outputs and gradients")
MEMORY_METHOD_FALLBACK = ("peak RSS increase from resource.getrusage ru_maxrss in a fresh subprocess "
                          "(the high-water mark could not be reset: an upper bound)")


# ---------------------------------------------------------------------------------------------
# Cells and inputs


@dataclass(frozen=True)
class Cell:
    m: int
    B: int
    K: int
    R: int
    mode: str  # "per_pair" | "shared"

    @property
    def P(self) -> int:
        return self.m * (self.m - 1) // 2

    @property
    def evals(self) -> int:
        """Critic evaluations: P*B joint plus P*B*R marginal samples."""
        return self.P * self.B * (1 + self.R)

    @property
    def flops(self) -> int:
        """Nominal FLOPs of the forward: 6*K per critic evaluation."""
        return 6 * self.K * self.evals

    def label(self) -> str:
        return f"m={self.m} B={self.B} K={self.K} R={self.R} {self.mode}"


def make_inputs(cell: Cell, requires_grad: bool, seed: int = 0):
    """float32 inputs of one cell, the critic scaled so that T stays O(1).

    Returns ``(args, upstream)``: ``args = (h, wa, wb, b, v, c, perms)`` and the upstream
    gradients ``(g_t, g_lme)`` (``[P]`` each) used for the backward pass.
    """
    g = torch.Generator().manual_seed(seed)
    B, m, K, R, P = cell.B, cell.m, cell.K, cell.R, cell.P
    shape = (K,) if cell.mode == "shared" else (P, K)
    h = torch.randn(B, m, generator=g)
    wa = torch.randn(shape, generator=g)
    wb = torch.randn(shape, generator=g)
    b = 0.5 * torch.randn(shape, generator=g)
    v = torch.randn(shape, generator=g) / math.sqrt(K)
    c = 0.1 * torch.randn(shape[:-1], generator=g)
    perms = torch.stack([torch.randperm(B, generator=g) for _ in range(R)])
    tensors = [h, wa, wb, b, v, c]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    upstream = (torch.randn(P, generator=g), torch.randn(P, generator=g))
    return (*tensors, perms), upstream


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


# ---------------------------------------------------------------------------------------------
# Backends


def _fused(h, wa, wb, b, v, c, perms):
    return mmim_ext.pair_stats(h, wa, wb, b, v, c, perms, backend="fused")


def _onepass(h, wa, wb, b, v, c, perms, coef_t, coef_lme):
    """Forward+backward only: ``mmim_ext.pair_stats_linear`` with the upstream gradients as its
    coefficients (statistics and gradients in one pass over the samples on the CPU)."""
    return mmim_ext.pair_stats_linear(h, wa, wb, b, v, c, perms, coef_t, coef_lme, backend="fused")


_onepass.one_pass = True


def _eager(h, wa, wb, b, v, c, perms):
    return mmim_ext.pair_stats(h, wa, wb, b, v, c, perms, backend="reference")


def _checkpointed_chunk(*args):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(_ref_chunk_stats, *args, use_reentrant=False)


def _pairs_major_chunk(h, hp, wa, wb, bias, v, c, pi, pj):
    """``(t_joint, lme)`` of one chunk of pairs: the reference's arithmetic laid out pairs-major.

    Arguments as ``mmim_ext.ops.reference._chunk_stats`` (h: ``[B, m]``, hp: ``[R, B, m]``, wa, wb,
    bias, v: ``[P, K]``, c: ``[P]``), but the hidden layer is ``[P, B, K]`` (joint) and
    ``[P, R, B, K]`` (shuffled), K innermost, where the reference's is ``[.., B, P, K]``.
    """
    a, b = h[:, pi].t(), h[:, pj].t()  # [P, B]
    b_marg = hp[:, :, pj].permute(2, 0, 1)  # [P, R, B]
    u = a.unsqueeze(-1) * wa.unsqueeze(1) + bias.unsqueeze(1)  # [P, B, K]
    wb_, v_ = wb.unsqueeze(1), v.unsqueeze(1)  # [P, 1, K]
    t_joint = (torch.relu(u + b.unsqueeze(-1) * wb_) * v_).sum(-1).mean(-1) + c
    t_marg = (torch.relu(u.unsqueeze(1) + b_marg.unsqueeze(-1) * wb_.unsqueeze(1)) * v_.unsqueeze(1)).sum(-1)
    # [P, R, B], flattened per pair. With [R, P, B] instead (the log-sum-exp taken over R and B
    # after a transpose and reshape, or over two dims), torch 2.13's inductor compiled a
    # forward+backward that corrupted the heap at R = 1.
    n = t_marg.shape[1] * t_marg.shape[2]
    lme = torch.logsumexp(t_marg.flatten(1), dim=1) - math.log(n) + c
    return t_joint, lme


class CompiledReference:
    """torch.compile of the reference, in one of four forms (``variant``):

    * ``chunk`` (default): the reference's chunk loop in Python, each chunk's function
      (``mmim_ext.ops.reference._chunk_stats``, no activation checkpointing; hidden layer
      ``[.., B, chunk, K]``) compiled. Inductor fuses the hidden layer and its backward
      recomputes it, so this is the fastest compiled form of forward+backward measured; the
      forward under ``no_grad`` is what the reference itself runs.
    * ``pairs_major``: the same loop with each chunk's arithmetic written pairs-major
      (``_pairs_major_chunk``: hidden layer ``[chunk, .., B, K]``). At m=1024 its forward ran
      0.91x and its forward+backward 1.40x the time of ``chunk`` (``benchmarks/baseline_ab.py``,
      2026-12-03).
    * ``chunk_ckpt``: the same with each chunk wrapped in ``torch.utils.checkpoint`` (as the
      eager reference does when gradients are needed), compiled together.
    * ``whole``: ``torch.compile(pair_stats_reference)``; Dynamo unrolls the chunk loop, so
      compilation grows with P / chunk (minutes at m=1024): small m only.

    The chunk size is the reference's (scratch budget ``DEFAULT_MAX_SCRATCH_BYTES``).
    """

    def __init__(self, variant: str = VARIANTS[0]):
        if variant not in VARIANTS:
            raise ValueError(f"compiled variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if variant != "whole" and _ref_chunk_stats is None:
            raise RuntimeError("mmim_ext.ops.reference._chunk_stats is missing; use --compiled-variant whole")
        self.variant = variant
        # Compile in this process, not from inductor's on-disk graph caches: their keys leave out
        # the vector ISA the compiling process detected, so a graph compiled where inductor's ISA
        # probe failed (scalar C++) comes back from the cache in every later run. On 2026-12-03
        # that made the per-pair baseline 3.9x (forward) and 4.2x (forward+backward) slower.
        # Compilation is not timed, so this costs only the minutes of compiling.
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = False
        functorch_config.enable_autograd_cache = False
        self.reset()

    def reset(self):
        """Forget compiled graphs (a fresh compile per cell keeps Dynamo's recompile limit away)."""
        torch._dynamo.reset()
        if self.variant == "whole":
            self._whole = torch.compile(pair_stats_reference, dynamic=False)
        else:
            self._plain = torch.compile(_ref_chunk_stats, dynamic=False)
            self._ckpt = torch.compile(_checkpointed_chunk, dynamic=False)
            self._pairs_major = torch.compile(_pairs_major_chunk, dynamic=False)

    def __call__(self, h, wa, wb, b, v, c, perms):
        if self.variant == "whole":
            return self._whole(h, wa, wb, b, v, c, perms)
        B, m = h.shape
        pairs = all_pairs(m)
        P, K, R = pairs.shape[0], wa.shape[-1], perms.shape[0]
        shared = wa.dim() == 1
        per_pair = 4 * (1 + R) * B * K * h.element_size()
        chunk = max(1, min(P, DEFAULT_MAX_SCRATCH_BYTES // per_pair))
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (h, wa, wb, b, v, c))
        if self.variant == "pairs_major":
            fn = self._pairs_major
        else:
            fn = self._ckpt if (self.variant == "chunk_ckpt" and needs_grad) else self._plain
        hp = h[perms]
        t_parts, l_parts = [], []
        for start in range(0, P, chunk):
            sl = slice(start, min(P, start + chunk))
            n = sl.stop - sl.start
            if shared:
                params = (wa.expand(n, K), wb.expand(n, K), b.expand(n, K), v.expand(n, K), c.expand(n))
            else:
                params = (wa[sl], wb[sl], b[sl], v[sl], c[sl])
            tj, lm = fn(h, hp, *params, pairs[sl, 0], pairs[sl, 1])
            t_parts.append(tj)
            l_parts.append(lm)
        return torch.cat(t_parts), torch.cat(l_parts)


_VARIANT_TEXT = {
    "chunk": "the reference's chunk loop in Python, each chunk's function compiled WITHOUT activation "
             "checkpointing (checkpoint compiles too, but this form is faster: the strongest baseline of "
             "forward+backward measured)",
    "pairs_major": "the reference's chunk loop in Python, each chunk's arithmetic written pairs-major "
                   "([chunk, B, K] hidden layer) and compiled WITHOUT activation checkpointing",
    "chunk_ckpt": "the reference's chunk loop in Python, each chunk compiled inside torch.utils.checkpoint "
                  "(what the eager reference does under autograd)",
    "whole": "torch.compile(pair_stats_reference) as a whole (chunk loop unrolled by Dynamo)",
}


def _backend_fn(name: str, compiled: CompiledReference | None):
    if name == "fused":
        return _fused
    if name == "eager":
        return _eager
    if name == "onepass":
        return _onepass
    if name == "compiled":
        return compiled
    raise ValueError(f"unknown backend {name!r}")


# ---------------------------------------------------------------------------------------------
# One call, timing and correctness


def run_once(fn, args, upstream, direction: str):
    """One forward (under no_grad) or forward+backward; returns (outputs, grads or None)."""
    tensors = args[:6]
    if direction == "fwd":
        with torch.no_grad():
            return fn(*args), None
    for t in tensors:
        t.grad = None
    if getattr(fn, "one_pass", False):
        # the same gradients: d(sum gt*t_joint + gl*lme) = backward of (t_joint, lme) with (gt, gl)
        loss, tj, lme = fn(*args, *upstream)
        loss.backward()
        return (tj, lme), tuple(t.grad for t in tensors)
    tj, lme = fn(*args)
    torch.autograd.backward([tj, lme], list(upstream))
    return (tj.detach(), lme.detach()), tuple(t.grad for t in tensors)


def timed_call(fn, args, upstream, direction) -> float:
    """Seconds of one call (gradients cleared and garbage collected first, outside the timing)."""
    for t in args[:6]:
        t.grad = None
    gc.collect()
    t0 = time.perf_counter()
    run_once(fn, args, upstream, direction)
    return time.perf_counter() - t0


def time_calls(fn, args, upstream, direction, repeats: int, cell_seconds: float):
    """Median of up to ``repeats`` timed calls (at least 3 unless one call exceeds the cell budget)."""
    times = []
    for i in range(repeats):
        times.append(timed_call(fn, args, upstream, direction))
        if len(times) >= 3 and sum(times) > cell_seconds:
            break
        if len(times) == 1 and times[0] > cell_seconds:
            break
    return times


#: Fraction of gradient elements allowed outside tolerance. The critic's relu has a kink: when a
#: pre-activation ``wa*a + wb*b + bias`` rounds to opposite signs in two backends (they associate
#: the sum differently; the fused kernel precomputes ``wa*a + bias``), that sample's contribution
#: to the gradient switches on or off. Among millions of gradient elements a handful differ that
#: way; a real bug moves far more than this fraction.
KINK_FRACTION = 1e-4


def _close(name, got, want, rtol, atol_rel, kink_fraction=0.0):
    """``assert_close`` with float32 tolerances (absolute one relative to the scale); up to
    ``kink_fraction`` of the elements may exceed them. Returns the number that did."""
    atol = atol_rel * max(1.0, float(want.abs().max()) if want.numel() else 1.0)
    if kink_fraction > 0 and got.shape == want.shape and want.numel():
        bad = ((got - want).abs() > atol + rtol * want.abs()) | ~torch.isfinite(got)
        n_bad = int(bad.sum())
        if n_bad <= kink_fraction * want.numel() and bool(torch.isfinite(got).all()):
            return n_bad
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    return 0


_NAMES = ("h", "wa", "wb", "b", "v", "c")


def assert_matches(label, outs, grads, ref_outs, ref_grads, rtol=1e-3, atol_rel=1e-4,
                   sum_atol_rel=2e-3):
    """Outputs and gradients of two backends agree (float32 tolerances).

    Gradients that sum over pairs (``h``'s, and a shared critic's parameters, which sum over all
    P*B*(1+R) evaluations) accumulate in different orders in different backends, so their
    absolute tolerance is ``sum_atol_rel`` x their largest magnitude instead of ``atol_rel``.
    """
    _close(f"{label} t_joint", outs[0], ref_outs[0], rtol, atol_rel)
    _close(f"{label} lme", outs[1], ref_outs[1], rtol, atol_rel)
    kinks = 0
    if grads is not None and ref_grads is not None:
        shared = grads[1].dim() == 1  # wa is [K] for a shared critic, [P, K] per pair
        for n, g, r in zip(_NAMES, grads, ref_grads):
            summed = n == "h" or shared
            kinks += _close(f"{label} grad {n}", g, r, rtol, sum_atol_rel if summed else atol_rel,
                            kink_fraction=KINK_FRACTION)
    return kinks


def subset_check(cell, args, upstream, outs, grads, direction, n_pairs: int, seed: int = 1,
                 who: str = "fused"):
    """Outputs (of the fused op, or of ``who``) of ``n_pairs`` random pairs vs the eager reference on those pairs.

    Each pair's outputs (and, for per-pair critics, its parameter gradients) depend on that pair
    alone, so the reference evaluated on a subset checks the full fused call at any size. The
    gradients w.r.t. ``h`` and a shared critic sum over all pairs; those are checked against the
    full baselines instead.
    """
    P = cell.P
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(P, generator=g)[: min(n_pairs, P)].sort().values
    pairs = all_pairs(cell.m)[idx]
    h, wa, wb, b, v, c, perms = (a.detach() for a in args)
    if cell.mode == "per_pair":
        wa, wb, b, v, c = (t[idx].clone() for t in (wa, wb, b, v, c))
    params = [wa, wb, b, v, c]
    want_grads = direction == "fwdbwd" and cell.mode == "per_pair"
    if want_grads:
        for t in params:
            t.requires_grad_(True)
    with torch.set_grad_enabled(want_grads):
        tj, lme = pair_stats_reference(h, *params, perms, pairs)
    label = f"[{cell.label()} {direction}] {who} vs eager reference on {idx.numel()} pairs"
    assert_matches(label, (outs[0][idx], outs[1][idx]), None, (tj.detach(), lme.detach()), None)
    if want_grads:
        ref = torch.autograd.grad([tj, lme], params, [upstream[0][idx], upstream[1][idx]])
        for n, gf, gr in zip(_NAMES[1:], grads[1:], ref):
            _close(f"{label} grad {n}", gf[idx], gr, 1e-3, 1e-4, kink_fraction=KINK_FRACTION)


# ---------------------------------------------------------------------------------------------
# Peak memory in a subprocess


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_worker(spec: dict) -> dict:
    """Runs in a fresh process: one call of ``spec['backend']`` on one cell; peak-RSS increase."""
    import resource

    cell = Cell(**spec["cell"])
    direction, backend = spec["direction"], spec["backend"]
    if backend == "fused" and not mmim_ext.fused_available("cpu"):
        raise SystemExit(f"fused kernel unavailable: {mmim_ext._extension.load_error()}")
    if backend == "compiled" and spec.get("compiled_threads"):
        torch.set_num_threads(spec["compiled_threads"])
    compiled = CompiledReference(spec["compiled_variant"]) if backend == "compiled" else None
    fn = _backend_fn(backend, compiled)
    # Lazy initialization (thread pool, kernels, code pages) on a tiny problem, not counted.
    tiny = Cell(m=8, B=cell.B, K=cell.K, R=cell.R, mode=cell.mode)
    targs, tup = make_inputs(tiny, direction == "fwdbwd")
    if backend == "compiled":
        # Compile on the real shapes (graphs are shape-specialized), then forget the results.
        args, upstream = make_inputs(cell, direction == "fwdbwd")
        run_once(fn, args, upstream, direction)
        for t in args[:6]:
            t.grad = None
    else:
        run_once(fn, targs, tup, direction)
        args, upstream = make_inputs(cell, direction == "fwdbwd")
    del targs, tup
    gc.collect()
    _malloc_trim()
    rss0 = _status_kb("VmRSS")
    reset = _reset_hwm() and rss0 is not None
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outs, grads = run_once(fn, args, upstream, direction)
    if reset:
        peak_kb = (_status_kb("VmHWM") or 0) - rss0
        method = "vmhwm"
    else:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0
        method = "maxrss"
    out_bytes = _nbytes(*outs) + (_nbytes(*grads) if grads is not None else 0)
    return {"peak_bytes": peak_kb * 1024, "outputs_grads_bytes": out_bytes,
            "scratch_bytes": peak_kb * 1024 - out_bytes, "method": method}


def measure_memory(cell: Cell, backend: str, direction: str, compiled_variant: str,
                   timeout: float, compiled_threads: int | None = None) -> dict:
    spec = {"cell": asdict(cell), "backend": backend, "direction": direction,
            "compiled_variant": compiled_variant, "compiled_threads": compiled_threads}
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired:
        return {"error": f"memory subprocess exceeded {timeout:.0f} s"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": f"memory subprocess failed (rc={proc.returncode}): {proc.stderr.strip()[-300:]}"}


def measure_memory_retry(*args, attempts: int = 3, wait: float = 30.0) -> dict:
    """``measure_memory``, retried: the kernel may be mid-rebuild when the subprocess imports it."""
    for i in range(attempts):
        res = measure_memory(*args)
        if "error" not in res or "exceeded" in res["error"] or i == attempts - 1:
            return res
        time.sleep(wait)
    return res


# ---------------------------------------------------------------------------------------------
# Machine, sgemm roofline, linearity


def _extension_file() -> dict | None:
    """Path and modification time of the loaded ``mmim_ext._C`` (the kernel may be rebuilt mid-run)."""
    mod = sys.modules.get("mmim_ext._C")
    path = getattr(mod, "__file__", None)
    if not path:
        return None
    try:
        mtime = _dt.datetime.fromtimestamp(os.path.getmtime(path), _dt.timezone.utc).isoformat(timespec="seconds")
    except OSError:
        mtime = None
    return {"path": path, "mtime": mtime}


def inductor_vec_isa() -> str:
    """The vector ISA torch.compile's C++ code uses in this process: e.g. ``avx2``, or ``none``
    when inductor found none (its probe builds and loads a small library; if that fails, every
    compiled kernel is scalar)."""
    try:
        from torch._inductor import cpu_vec_isa

        isa = cpu_vec_isa.pick_vec_isa()
    except Exception as exc:  # pragma: no cover - torch internals moved
        return f"unknown ({type(exc).__name__}: {exc})"
    return str(isa) if isa else "none"


def machine_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "extension_loaded": mmim_ext.extension_loaded(),
            "fused_available": mmim_ext.fused_available("cpu")}
    try:
        info["kernel_cpu_capability"] = torch.ops.mmim_ext.cpu_capability()
    except (AttributeError, RuntimeError) as exc:
        info["kernel_cpu_capability"] = f"unavailable ({type(exc).__name__})"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for key in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "L2 cache", "L3 cache"):
            m = re.search(rf"^{re.escape(key)}:\s+(.*)$", out, re.M)
            if m:
                info[f"lscpu {key}"] = m.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info["extension_file"] = _extension_file()
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def sgemm_rate(n: int, repeats: int) -> dict:
    """float32 ``n x n`` matmul: median time and GFLOP/s (2*n^3 FLOPs)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"n": n, "repeats": repeats, "median_s": med, "gflops": 2 * n**3 / med / 1e9,
            "times_s": times}


def loglog_slope(xs, ys) -> float:
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    den = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / den


# The backends that run the compiled kernels (linearity and scratch lines are printed for these).
KERNEL_BACKENDS = ("fused", "onepass")


def linearity(rows) -> list[dict]:
    """Log-log slope of a kernel backend's median time vs m (ideal ~2, since P ~ m^2/2) and vs work."""
    groups: dict = {}
    for r in rows:
        if r["backend"] in KERNEL_BACKENDS and r.get("median_s"):
            c = r["cell"]
            key = (r["backend"], c["B"], c["K"], c["R"], c["mode"], r["direction"])
            groups.setdefault(key, []).append(r)
    out = []
    for (backend, B, K, R, mode, direction), rs in sorted(groups.items()):
        ms = sorted({r["cell"]["m"] for r in rs})
        if len(ms) < 2:
            continue
        rs = sorted(rs, key=lambda r: r["cell"]["m"])
        t = [r["median_s"] for r in rs]
        work = [Cell(**r["cell"]).evals * K for r in rs]
        out.append({"backend": backend, "B": B, "K": K, "R": R, "mode": mode, "direction": direction, "m": ms,
                    "slope_vs_m": loglog_slope(ms, t), "slope_vs_work": loglog_slope(work, t)})
    return out


# ---------------------------------------------------------------------------------------------
# Driver


def _fmt_s(x):
    if x is None:
        return "-"
    return f"{x:.4f}" if x < 10 else f"{x:.1f}"


def _fmt_mb(x):
    return "-" if x is None else f"{x / 2**20:.1f}"


def plot(rows, path) -> bool:
    """Log-log median time vs P*B*(1+R)*K, one panel per direction; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    colors = {"fused": "tab:blue", "onepass": "tab:purple", "compiled": "tab:orange", "eager": "tab:green"}
    for ax, direction in zip(axes[0], DIRECTIONS):
        for be in BACKENDS:
            for mode, marker in (("per_pair", "o"), ("shared", "s")):
                pts = sorted((Cell(**r["cell"]).evals * r["cell"]["K"], r["median_s"]) for r in rows
                             if r["backend"] == be and r["direction"] == direction
                             and r["cell"]["mode"] == mode and r.get("median_s"))
                if pts:
                    ax.loglog(*zip(*pts), marker=marker, ls="none", color=colors[be],
                              mfc=colors[be] if mode == "per_pair" else "none", label=f"{be} {mode}")
        ax.set_title({"fwd": "forward (no_grad)", "fwdbwd": "forward + backward"}[direction])
        ax.set_xlabel("critic evaluations x K  (P*B*(1+R)*K)")
        ax.set_ylabel("median time per call [s]")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("mmim_ext.pair_stats, float32 CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt_paired(pd):
    """Median per-round ratio of a ``--paired`` run (suffix ``e`` when the baseline is eager)."""
    if not pd:
        return "-"
    return f"{pd['median']:.2f}" + ("e" if pd["baseline"] == "eager" else "")


def print_table(rows, sgemm_gflops):
    head = (f"{'cell':<34} {'dir':<6} {'backend':<8} {'median s':>9} {'n':>2} {'Geval*K/s':>9} "
            f"{'GFLOP/s':>8} {'x compile':>9} {'paired x':>8} {'%sgemm':>6} {'peak MB':>8} {'scratch MB':>10}  note")
    print(head)
    print("-" * len(head))
    for r in rows:
        cell = Cell(**r["cell"])
        med = r.get("median_s")
        ratio = r.get("speedup_vs_compiled")
        frac = r.get("frac_sgemm")
        mem = r.get("memory") or {}
        print(f"{cell.label():<34} {r['direction']:<6} {r['backend']:<8} {_fmt_s(med):>9} "
              f"{len(r.get('times_s', [])):>2} "
              f"{(r['evals_k_per_s'] / 1e9 if med else 0):>9.3f} "
              f"{(r['gflops'] if med else 0):>8.2f} "
              f"{('%.2f' % ratio) if ratio else '-':>9} "
              f"{_fmt_paired(r.get('paired')):>8} "
              f"{('%.1f' % (100 * frac)) if frac else '-':>6} "
              f"{_fmt_mb(mem.get('peak_bytes')):>8} {_fmt_mb(mem.get('scratch_bytes')):>10}  "
              f"{r.get('note', '')}")


def _predict(rates, backend, direction, cell):
    """Predicted seconds of one call, from the rate measured on the largest cell so far (same
    backend, direction and mode); ``None`` before any measurement."""
    known = rates.get((backend, direction, cell.mode))
    if not known:
        return None
    work, rate = max(known)
    return cell.evals * cell.K / rate


def run(args) -> dict:
    grid = dict(QUICK_GRID if args.quick else FULL_GRID)
    for key in ("m", "B", "K", "R"):
        if getattr(args, key):
            grid[key] = getattr(args, key)
    if args.mode:
        grid["mode"] = [_MODE_ALIASES[x] for x in args.mode]
    directions = args.direction or list(DIRECTIONS)
    backends = args.backend or list(BACKENDS)
    if "fused" not in backends:
        backends = ["fused"] + backends  # every cell's correctness check starts from the fused op
    if not mmim_ext.fused_available("cpu"):
        sys.exit("compare.py: the fused CPU kernel is not available "
                 f"({mmim_ext._extension.load_error() or 'no CPU kernel registered'})")
    if args.threads:
        torch.set_num_threads(args.threads)

    cells = [Cell(m, B, K, R, mode) for m in grid["m"] for B in grid["B"] for K in grid["K"]
             for R in grid["R"] for mode in grid["mode"]]
    cells.sort(key=lambda c: (c.evals * c.K, c.mode))  # small first: rates predict the large ones

    info = machine_info()
    print(f"# mmim_ext pair_stats benchmark  {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC")
    print(f"# command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"# CPU: {info.get('lscpu Model name', '?')}, {info.get('lscpu CPU(s)', '?')} CPUs, "
          f"torch {info['torch']} ({info['torch_threads']} threads)")
    print(f"# ISA: fused kernel dispatched to {info['kernel_cpu_capability']}; "
          f"torch.backends.cpu.get_cpu_capability() = {info['torch_cpu_capability']}")
    print(f"# load average at start: {info.get('loadavg_start')}; kernel {info['extension_file']}")
    compiled = CompiledReference(args.compiled_variant) if "compiled" in backends else None
    if compiled is not None:
        info["inductor_vec_isa"] = inductor_vec_isa()
        if info["inductor_vec_isa"] == "none" and not args.allow_scalar_baseline:
            sys.exit("compare.py: torch.compile would generate scalar C++ here (inductor's vector-ISA probe "
                     "failed: torch._inductor.cpu_vec_isa.pick_vec_isa() is invalid), which makes the baseline "
                     "several times slower than it should be. Check that a fresh Python can load a library "
                     "(nothing on sys.path shadowing a standard module), or pass --allow-scalar-baseline.")
    print(f"# torch.compile baseline: variant '{args.compiled_variant}': {_VARIANT_TEXT[args.compiled_variant]}; "
          f"threads {args.compiled_threads or torch.get_num_threads()}"
          + (f"; inductor vector ISA {info['inductor_vec_isa']}, graphs compiled in this run (no on-disk graph cache)"
             if compiled is not None else ""))
    print(f"# memory: {MEMORY_METHOD if not args.no_memory else 'not measured (--no-memory)'}")

    sg0 = sgemm_rate(args.sgemm_n, args.sgemm_repeats)
    print(f"# sgemm (start): {sg0['n']}x{sg0['n']} float32 matmul, median {sg0['median_s']:.4f} s "
          f"= {sg0['gflops']:.1f} GFLOP/s")

    rows: list[dict] = []
    rates: dict = {}
    result = {"machine": info, "args": vars(args), "grid": grid, "compiled_variant": args.compiled_variant,
              "memory_method": MEMORY_METHOD, "sgemm_start": sg0, "rows": rows}
    try:
        _run_cells(args, cells, directions, backends, compiled, rows, rates, sg0["gflops"])
    finally:
        sg1 = sgemm_rate(args.sgemm_n, args.sgemm_repeats)
        sg = statistics.median(sg0["times_s"] + sg1["times_s"])
        sg_gflops = 2 * args.sgemm_n**3 / sg / 1e9
        for r in rows:
            if r["backend"] == "fused" and r["direction"] == "fwd" and r.get("median_s"):
                r["frac_sgemm"] = r["gflops"] / sg_gflops
        result.update(sgemm_end=sg1, sgemm_gflops=sg_gflops, linearity=linearity(rows))
        ext_end = _extension_file()
        result["machine"]["extension_file_end"] = ext_end
        if ext_end != info["extension_file"]:
            print(f"# WARNING: mmim_ext/_C was rebuilt during the run ({info['extension_file']} -> {ext_end}); "
                  "timings used the kernel loaded at the start, memory subprocesses may have loaded the new one")
        try:
            result["machine"]["loadavg_end"] = os.getloadavg()
        except OSError:
            pass
        print()
        print_table(rows, sg_gflops)
        print()
        print(f"# roofline: sgemm {args.sgemm_n}x{args.sgemm_n} float32 median over start+end = "
              f"{sg_gflops:.1f} GFLOP/s (start {sg0['gflops']:.1f}, end {sg1['gflops']:.1f}); "
              "%sgemm column = fused forward nominal GFLOP/s / this")
        for r in rows:
            if r.get("frac_sgemm"):
                print(f"#   fused fwd {Cell(**r['cell']).label()}: {r['gflops']:.2f} GFLOP/s = "
                      f"{100 * r['frac_sgemm']:.1f}% of sgemm")
        for lin in result["linearity"]:
            print(f"# linearity {lin['backend']} {lin['direction']} B={lin['B']} K={lin['K']} R={lin['R']} {lin['mode']}: "
                  f"log-log slope vs m = {lin['slope_vs_m']:.3f} (ideal ~2), vs P*B*(1+R)*K = "
                  f"{lin['slope_vs_work']:.3f} (ideal 1), m = {lin['m']}")
        for r in rows:
            mem = r.get("memory") or {}
            if r["backend"] in KERNEL_BACKENDS and "scratch_bytes" in mem:
                print(f"# scratch {r['backend']} {r['direction']} {Cell(**r['cell']).label()}: peak RSS increase "
                      f"{_fmt_mb(mem['peak_bytes'])} MB - outputs{'+grads' if r['direction'] == 'fwdbwd' else ''} "
                      f"{_fmt_mb(mem['outputs_grads_bytes'])} MB = {_fmt_mb(mem['scratch_bytes'])} MB")
        path = args.json or os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "out",
            f"compare-{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"# JSON: {path}")
        if not args.no_plot:
            png = os.path.splitext(path)[0] + ".png"
            if plot(rows, png):
                print(f"# plot: {png}")
    failed = [r for r in rows if r.get("check") == "FAILED"]
    if failed:
        print(f"# {len(failed)} correctness check(s) FAILED; see the notes above")
        result["failed_checks"] = len(failed)
    return result


def _run_cells(args, cells, directions, backends, compiled, rows, rates, sg_gflops):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    jobs = [(c, d) for c in cells for d in directions]
    bar = tqdm(jobs, desc="cells", file=sys.stderr, disable=tqdm is None or args.no_progress) if tqdm else jobs
    for cell, direction in bar:
        if tqdm and not args.no_progress:
            bar.set_postfix_str(f"{cell.label()} {direction}")
        cell_rows = _run_cell(args, cell, direction, backends, compiled, rates)
        rows.extend(cell_rows)


def _probe(fn, cell, direction, seed) -> float:
    """Predicted seconds of one call on ``cell`` from one call on a cell with m/4 units (work/16).

    A rough guide only: per-evaluation cost is not constant in m (the eager reference at m=1024
    once ran 3x slower than its m=256 probe predicted), so a cell just under budget may overrun it.
    """
    small = Cell(max(32, cell.m // 4), cell.B, cell.K, cell.R, cell.mode)
    a, up = make_inputs(small, direction == "fwdbwd", seed=seed)
    run_once(fn, a, up, direction)
    t0 = time.perf_counter()
    run_once(fn, a, up, direction)
    dt = time.perf_counter() - t0
    return dt * (cell.evals * cell.K) / (small.evals * small.K)


def _run_cell(args, cell, direction, backends, compiled, rates):
    rows = []
    base = {"cell": asdict(cell), "direction": direction, "P": cell.P, "evals": cell.evals,
            "nominal_flops": cell.flops}

    def skip(backend, why):
        rows.append({**base, "backend": backend, "median_s": None, "times_s": [], "note": f"SKIPPED: {why}"})
        print(f"  {cell.label()} {direction} {backend}: SKIPPED: {why}", flush=True)

    if cell.evals * cell.K > args.max_work:
        for be in backends:
            skip(be, f"P*B*(1+R)*K = {cell.evals * cell.K:.3g} > --max-work {args.max_work:.3g}")
        return rows
    args_t, upstream = make_inputs(cell, direction == "fwdbwd", seed=args.seed)

    results = {}
    for be in backends:
        if be == "onepass" and direction != "fwdbwd":
            continue  # its forward alone is the fused forward
        fn = _backend_fn(be, compiled)
        budget = args.budget if be != "eager" else min(args.budget, args.eager_budget)
        pred = _predict(rates, be, direction, cell)
        if pred is None and be != "compiled" and cell.m > 64:
            pred = _probe(fn, cell, direction, args.seed)
            row_probe = f"predicted {pred:.1f} s per call from a probe at m={max(32, cell.m // 4)}"
        else:
            row_probe = None
        if pred is not None and pred > budget:
            skip(be, f"predicted {pred:.0f} s per call > budget {budget:.0f} s")
            continue
        threads_before = torch.get_num_threads()
        if be == "compiled":
            if args.compiled_threads:
                # Inductor bakes the thread count into its kernels at compile time.
                torch.set_num_threads(args.compiled_threads)
            compiled.reset()
        try:
            row = _run_backend(args, cell, direction, be, fn, args_t, upstream, base, budget, pred,
                               row_probe, results, rates)
        finally:
            torch.set_num_threads(threads_before)
        if row is None:
            rows.append(results["failed_rows"][-1])
            continue
        rows.append(row)
        mem = row.get("memory") or {}
        print(f"  {cell.label()} {direction} {be}: median {row['median_s']:.4f} s over {len(row['times_s'])} "
              f"({row['gflops']:.2f} GFLOP/s), peak {_fmt_mb(mem.get('peak_bytes'))} MB", flush=True)
    comp = next((r for r in rows if r["backend"] == "compiled" and r.get("median_s")), None)
    for r in rows:
        if comp and r.get("median_s"):
            r["speedup_vs_compiled"] = comp["median_s"] / r["median_s"]
    if args.paired:
        paired_rounds(args, cell, direction, rows, compiled, args_t, upstream)
    return rows


def paired_baseline(rows) -> str | None:
    """The backend the paired ratios divide by: torch.compile when it was timed, else eager."""
    timed = {r["backend"] for r in rows if r.get("median_s")}
    return next((be for be in ("compiled", "eager") if be in timed), None)


def rotated(names: list, k: int) -> list:
    """``names`` in round ``k``'s order: started ``k`` places along, so that every name takes
    every position in turn over ``len(names)`` rounds."""
    k %= len(names)
    return names[k:] + names[:k]


def paired_rounds(args, cell, direction, rows, compiled, args_t, upstream):
    """``--paired N``: N rounds after the cell's own timing, each calling every timed backend of
    the cell once, the order rotated from round to round. A round's ratio (baseline time / this
    backend's time) compares two calls made seconds apart, so drift of the machine's speed over
    the minutes a cell takes (other load on a shared host) cancels in it; the row gets the median
    and quartiles of the per-round ratios (``paired``), next to the medians' ratio
    (``speedup_vs_compiled``)."""
    timed = [r for r in rows if r.get("median_s")]
    base_name = paired_baseline(rows)
    if base_name is None or len(timed) < 2:
        return
    names = [r["backend"] for r in timed]
    times = {be: [] for be in names}
    threads_before = torch.get_num_threads()
    for k in range(args.paired):
        for be in rotated(names, k):
            fn = _backend_fn(be, compiled)
            if be == "compiled" and args.compiled_threads:
                torch.set_num_threads(args.compiled_threads)
            try:
                times[be].append(timed_call(fn, args_t, upstream, direction))
            finally:
                torch.set_num_threads(threads_before)
    for r in timed:
        be = r["backend"]
        ratios = [tb / t for tb, t in zip(times[base_name], times[be])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
        r["paired"] = {"baseline": base_name, "rounds": args.paired, "times_s": times[be],
                       "baseline_times_s": times[base_name], "ratios": ratios,
                       "median": statistics.median(ratios), "q25": q[0], "q75": q[2]}
        if be != base_name:
            print(f"  {cell.label()} {direction} {be}: paired x {base_name} {r['paired']['median']:.2f} "
                  f"[{q[0]:.2f}, {q[2]:.2f}] over {args.paired} rounds (times {min(times[be]):.4f}-"
                  f"{max(times[be]):.4f} s, {base_name} {min(times[base_name]):.4f}-{max(times[base_name]):.4f} s)",
                  flush=True)


def _run_backend(args, cell, direction, be, fn, args_t, upstream, base, budget, pred, row_probe,
                 results, rates):
    """Warm-up, correctness check, timing and memory of one backend on one cell; the row, or
    ``None`` after a failed check (then a FAILED row is in ``results['failed_rows']``)."""
    row = {**base, "backend": be}
    if be == "compiled":
        row["threads"] = torch.get_num_threads()
    if row_probe:
        row["probe"] = row_probe
    # Warm-up (for torch.compile: compilation, not counted), then the correctness check.
    t0 = time.perf_counter()
    outs, grads = run_once(fn, args_t, upstream, direction)
    t_first = time.perf_counter() - t0
    if be == "compiled":
        row["compile_and_first_call_s"] = t_first
        t0 = time.perf_counter()
        outs, grads = run_once(fn, args_t, upstream, direction)
        t_first = time.perf_counter() - t0
    try:
        if be == "fused" or "fused" not in results:
            subset_check(cell, args_t, upstream, outs, grads, direction, args.check_pairs, who=be)
            row["check"] = f"{be} == eager reference on {min(args.check_pairs, cell.P)} random pairs"
        else:
            f_outs, f_grads = results["fused"]
            kinks = assert_matches(f"[{cell.label()} {direction}] fused vs {be}", f_outs, f_grads, outs, grads)
            row["check"] = f"fused == {be} (all outputs{' and gradients' if grads else ''})"
            if kinks:
                row["check"] += (f"; {kinks} gradient element(s) outside tolerance "
                                 f"(<= {KINK_FRACTION:g} of each gradient, relu-kink flips)")
    except AssertionError as exc:
        # Not timed: a wrong answer has no speed. The run goes on and exits non-zero.
        msg = " ".join(str(exc).split())[:400]
        results.setdefault("failed_rows", []).append(
            {**row, "median_s": None, "times_s": [], "check": "FAILED", "note": f"CHECK FAILED: {msg}"})
        print(f"  {cell.label()} {direction} {be}: CHECK FAILED: {msg}", flush=True)
        return None
    if be == "fused":
        results["fused"] = (outs, grads)
    del outs, grads
    if pred is None and t_first > budget:
        # No earlier rate: one warm-up call already showed the cell is over budget.
        times = [t_first]
        row["note"] = f"1 call only: the warm-up took {t_first:.0f} s > budget {budget:.0f} s"
    else:
        times = time_calls(fn, args_t, upstream, direction, args.repeats, args.cell_seconds)
    med = statistics.median(times)
    row.update(times_s=times, median_s=med, evals_k_per_s=cell.evals * cell.K / med,
               gflops=cell.flops / med / 1e9)
    rates.setdefault((be, direction, cell.mode), []).append((cell.evals * cell.K, cell.evals * cell.K / med))
    if not args.no_memory and be in args.memory_backends:
        row["memory"] = measure_memory_retry(cell, be, direction, args.compiled_variant,
                                             args.memory_timeout, args.compiled_threads)
        if "error" in row["memory"]:
            row["note"] = (row.get("note", "") + " memory: " + row["memory"]["error"]).strip()
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"small subset: {QUICK_GRID}")
    p.add_argument("--m", type=int, nargs="+", help=f"units (default grid {FULL_GRID['m']})")
    p.add_argument("--B", type=int, nargs="+", help=f"batch sizes (default {FULL_GRID['B']})")
    p.add_argument("--K", type=int, nargs="+", help=f"critic hidden units (default {FULL_GRID['K']})")
    p.add_argument("--R", type=int, nargs="+", help=f"permutations (default {FULL_GRID['R']})")
    p.add_argument("--mode", nargs="+", choices=sorted(_MODE_ALIASES), help="critic mode(s)")
    p.add_argument("--direction", nargs="+", choices=DIRECTIONS, help="fwd and/or fwdbwd (default both)")
    p.add_argument("--backend", nargs="+", choices=BACKENDS, help="backends (fused always runs)")
    p.add_argument("--compiled-variant", default=VARIANTS[0], choices=list(VARIANTS),
                   help="form of torch.compile(reference); see CompiledReference")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per backend and cell (median)")
    p.add_argument("--paired", type=int, default=0, metavar="N",
                   help="after each cell, N rounds calling every timed backend once (order rotated): "
                        "per-round ratios to torch.compile (or eager without it), robust to drift")
    p.add_argument("--cell-seconds", type=float, default=60.0,
                   help="stop repeating (after 3 calls) once a backend's timed calls exceed this")
    p.add_argument("--budget", type=float, default=120.0,
                   help="skip a backend on a cell whose predicted time per call exceeds this (s)")
    p.add_argument("--eager-budget", type=float, default=30.0,
                   help="the same budget for the eager reference (s)")
    p.add_argument("--max-work", type=float, default=2e11,
                   help="skip cells with P*B*(1+R)*K above this (memory guard: inputs/grads scale with it)")
    p.add_argument("--check-pairs", type=int, default=256,
                   help="random pairs checked against the eager reference before timing")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                   help="backends whose peak memory is measured")
    p.add_argument("--memory-timeout", type=float, default=900.0, help="seconds per memory subprocess")
    p.add_argument("--sgemm-n", type=int, default=2048, help="matrix size of the sgemm roofline")
    p.add_argument("--sgemm-repeats", type=int, default=7)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--allow-scalar-baseline", action="store_true",
                   help="time torch.compile even when inductor found no vector ISA (its kernels are then scalar)")
    p.add_argument("--compiled-threads", type=int,
                   help="thread count for the torch.compile baseline only (its many small OpenMP "
                        "regions suffer most when the machine is oversubscribed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="output JSON path")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG next to the JSON")
    p.add_argument("--_memory-worker", dest="memory_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.paired < 0:
        p.error(f"--paired must be >= 0 (rounds), got {args.paired}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return
    result = run(args)
    if result.get("failed_checks"):
        sys.exit(1)


if __name__ == "__main__":
    main()
