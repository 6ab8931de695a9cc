"""pair_stats on special inputs, in every CPU build: diagonal and repeated pairs, non-finite critic
parameters, and results that do not depend on the number of threads.

The build this process runs (the best one, unless MMIM_EXT_CPU_CAPABILITY says otherwise) is
checked in-process; the other builds (MMIM_EXT_CPU_CAPABILITY=scalar|base|avx2; "scalar" runs the
shared header's scalar functions, those the CUDA kernels call) in a fresh process each, since the
capability is read once per process.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import mmim_ext

from conftest import make_inputs, requires_fused

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("h", "wa", "wb", "b", "v", "c")
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=3e-5, atol=3e-5)}


def _builds():
    caps = ["scalar", "base"]
    if mmim_ext.fused_available("cpu") and torch.ops.mmim_ext.cpu_capability() == "avx2":
        caps.append("avx2")
    return caps


def _in_build(cap, check):
    """Runs check() (a function of this module, returning a count of cases) in build `cap`: here
    when this process runs that build, else in a fresh process."""
    if torch.ops.mmim_ext.cpu_capability() == cap:
        return check()
    code = (f"import sys, torch; sys.path.insert(0, {HERE!r}); import test_pair_stats_special as t; "
            f"assert torch.ops.mmim_ext.cpu_capability() == {cap!r}; print(t.{check.__name__}())")
    env = dict(os.environ, MMIM_EXT_CPU_CAPABILITY=cap)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    return int(out.stdout.strip())


def _close(got, want, dtype, what):
    for name, x, y in zip(("t_joint", "lme") + NAMES, got, want):
        s = max(1.0, y.abs().max().item()) if y.numel() else 1.0
        torch.testing.assert_close(x.double() / s, y / s, **TOL[dtype], msg=lambda m: f"{what} {name}: {m}")


def _mine_rule(P, g):
    return torch.stack([torch.randn(P, generator=g, dtype=torch.float64),
                        torch.log(torch.rand(P, generator=g, dtype=torch.float64) * 0.9 + 0.05)], 1)


def _outputs(kind, inputs, dtype, backend, gt, gl, rule=None, log_a=-2.0):
    """(t_joint, lme, d/dh, d/dwa, .., d/dc) of sum(gt t_joint + gl lme): kind "stats" (pair_stats
    and autograd: the fused backward op), "linear" (pair_stats_linear: the one pass) or "mine" (the
    one pass with MINE's moving-average rule, pair_stats_fwd_bwd_mine; the reference takes lme's
    upstream gradient times the rule's ratio, formed from its own lme)."""
    diff = [t.detach().to(dtype).requires_grad_(True) for t in inputs[:6]]
    perms, pairs = inputs[6], inputs[7]
    gt, gl = gt.to(dtype), gl.to(dtype)
    if kind == "mine" and backend == "fused":
        out = torch.ops.mmim_ext.pair_stats_fwd_bwd_mine(gt, gl, rule.to(dtype), log_a,
                                                        *[x.detach() for x in diff], perms, pairs)
        return [x.detach() for x in out]
    if kind == "linear":
        loss, t, l = mmim_ext.pair_stats_linear(*diff, perms, gt, gl, pairs, backend=backend)
    else:
        t, l = mmim_ext.pair_stats(*diff, perms, pairs, backend=backend)
        if kind == "mine":
            ld = l.detach()
            gl = gl * (ld + rule[:, 1].to(dtype) - torch.logaddexp(rule[:, 0].to(dtype), ld + log_a)).exp()
        loss = (t * gt).sum() + (l * gl).sum()
    return [x.detach() for x in (t, l, *torch.autograd.grad(loss, diff))]


def _fused_and_reference(inputs, seed):
    """``(kind, dtype, fused outputs, float64 reference outputs)`` for every kind of _outputs and
    both dtypes, with the upstream gradients and MINE rule drawn from `seed`."""
    h, pairs = inputs[0], inputs[7]
    P = h.shape[1] * (h.shape[1] - 1) // 2 if pairs is None else pairs.shape[0]
    g = torch.Generator().manual_seed(seed)
    gt, gl = torch.randn(P, generator=g, dtype=torch.float64), torch.randn(P, generator=g, dtype=torch.float64)
    rule = _mine_rule(P, g)
    for kind in ("stats", "linear", "mine"):
        ref = _outputs(kind, inputs, torch.float64, "reference", gt, gl, rule)
        for dtype in (torch.float64, torch.float32):
            yield kind, dtype, _outputs(kind, inputs, dtype, "fused", gt, gl, rule), ref


# ---------------------------------------------------------------------------------------------
# Diagonal (i, i), repeated and reversed (i > j) pairs against the float64 reference, with R = 1
# (where the kernel's unit loops hold the joint sample's two argument rows at once) and R = 2.


def check_diagonal_pairs():
    pairs = torch.tensor([[0, 0], [2, 2], [1, 2], [2, 1], [1, 2], [0, 0], [3, 0], [1, 1]])
    count = 0
    for B, R in ((16, 1), (21, 1), (32, 1), (13, 2)):
        for shared in (False, True):
            inputs = make_inputs(B, 4, 5, R, shared=shared, pairs=pairs, seed=B + R)
            for kind, dtype, got, ref in _fused_and_reference(inputs, seed=B):
                _close(got, ref, dtype, f"{kind} B={B} R={R} shared={shared} {dtype}")
                count += 1
    return count


@requires_fused
def test_diagonal_pair_h_gradient_issue_repro():
    # The reported case: one unit, the pair (0, 0), R = 1, float64 (gradient off by 0.066).
    torch.manual_seed(0)
    B, K = 16, 4
    h = torch.randn(B, 1, dtype=torch.float64, requires_grad=True)
    wa, wb, b, v = (torch.randn(K, dtype=torch.float64) for _ in range(4))
    c = torch.zeros((), dtype=torch.float64)
    perms, pairs = torch.randperm(B)[None], torch.tensor([[0, 0]])
    g = {}
    for be in ("fused", "reference"):
        t, l = mmim_ext.pair_stats(h, wa, wb, b, v, c, perms, pairs, backend=be)
        g[be] = torch.autograd.grad((t - l).sum(), h)[0]
    torch.testing.assert_close(g["fused"], g["reference"], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Non-finite critic parameters. The statistics are non-finite exactly where the reference's are
# (NaN where NaN). Every gradient a pair with a non-finite critic contributes to is NaN: its
# critic's (its rows, or all of a shared critic's, and c's) and h's columns of its two units.
# That covers the reference's non-finite gradients (where a ReLU's zero gate cuts a NaN off, the
# reference may keep a finite value there). Every other output equals the reference's.


def _expected_nan(shared, got, bad_pair, bad_units):
    """The poisoned gradient entries, [h, wa, wb, b, v, c]."""
    out = [torch.full(x.shape, shared, dtype=torch.bool) for x in got[2:]]
    if not shared:
        out[0][:, list(bad_units)] = True
        for x in out[1:]:
            x[bad_pair] = True
    return out


def check_non_finite_critics():
    m, bad_pair, bad_units = 4, 2, (0, 3)  # all pairs: pair 2 is (0, 3)
    count = 0
    cases = [(x, R) for x in (float("nan"),) for R in (1, 2)] + [(float("inf"), 1), (-float("inf"), 2)]
    for nonfinite, R in cases:
        for name in ("wa", "wb", "b", "v", "c"):
            for shared in (False, True):
                inputs = list(make_inputs(19, m, 5, R, shared=shared, seed=7 + R))
                x = inputs[NAMES.index(name)].clone()
                if name == "c":
                    idx = () if shared else (bad_pair,)
                else:
                    idx = (1,) if shared else (bad_pair, 1)
                x[idx] = nonfinite
                inputs[NAMES.index(name)] = x
                for kind, dtype, got, ref in _fused_and_reference(inputs, seed=3):
                    what = f"{nonfinite} in {name} shared={shared} R={R} {kind} {dtype}"
                    for q in (0, 1):
                        assert torch.equal(got[q].isfinite(), ref[q].isfinite()), (what, q, got[q], ref[q])
                        assert torch.equal(got[q].isnan(), ref[q].isnan()) or nonfinite == nonfinite, (what, q)
                    for q, (x, y, e) in enumerate(zip(got[2:], ref[2:], _expected_nan(shared, got, bad_pair, bad_units))):
                        assert torch.equal(x.isnan(), e), (what, NAMES[q], x)
                        assert not (~y.isfinite() & ~e).any(), (what, NAMES[q], y)
                    for q, (x, y) in enumerate(zip(got, ref)):
                        keep = x.isfinite() & y.isfinite()
                        assert torch.equal(keep, x.isfinite()), (what, q, x, y)
                        s = max(1.0, y[keep].abs().max().item()) if keep.any() else 1.0
                        torch.testing.assert_close(x[keep].double() / s, y[keep] / s, **TOL[dtype],
                                                   msg=lambda msg: f"{what} output {q}: {msg}")
                    count += 1
    return count


def check_special_inputs():
    return check_diagonal_pairs() + check_non_finite_critics()


@requires_fused
@pytest.mark.parametrize("cap", _builds())
def test_diagonal_pairs_and_non_finite_critics_match_reference(cap):
    # one process per build: 48 diagonal-pair cases, 240 non-finite ones
    assert _in_build(cap, check_special_inputs) == 48 + 240


# ---------------------------------------------------------------------------------------------
# Thread-count invariance: the same bytes for 1, 2 and 8 intra-op threads, for the forward, the
# backward (all gradients, h's alone, the critic's alone) and the one pass, with shared and
# per-pair critics. The backward's h-gradient rows are held one wave of blocks at a time; with
# MMIM_EXT_CPU_WAVE_BYTES=1 a wave is one block per thread (here: two waves of one block with one
# thread, one wave of two with two or more), which must not change the sums either.

_THREADS_SCRIPT = r"""
import hashlib, json, sys, torch, mmim_ext
sys.path.insert(0, sys.argv[1])
from conftest import make_inputs
out = {}
for threads in (1, 2, 8):
    torch.set_num_threads(threads)
    for shared in (False, True):
        for R in (1, 2):
            h, wa, wb, b, v, c, perms, _ = make_inputs(40, 160, 16, R, shared=shared, dtype=torch.float32, seed=R)
            P = h.shape[1] * (h.shape[1] - 1) // 2
            gt = torch.randn(P, generator=torch.Generator().manual_seed(1))
            gl = torch.randn(P, generator=torch.Generator().manual_seed(2))
            fwd = torch.ops.mmim_ext.pair_stats_fwd(h, wa, wb, b, v, c, perms, None)
            res = {"fwd": fwd}
            for need in ((True, True), (True, False), (False, True)):
                res[f"bwd {need}"] = torch.ops.mmim_ext.pair_stats_bwd(gt, gl, h, wa, wb, b, v, c, perms, None,
                                                                      fwd[1], *need)
                res[f"one pass {need}"] = torch.ops.mmim_ext.pair_stats_fwd_bwd(gt, gl, h, wa, wb, b, v, c, perms,
                                                                               None, *need)
            for name, ts in res.items():
                key = f"{name} shared={shared} R={R}"
                out.setdefault(key, {})[threads] = [hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
                                                    for t in ts]
print(json.dumps(out))
"""


@requires_fused
def test_results_do_not_depend_on_thread_count():
    env = dict(os.environ, MMIM_EXT_CPU_WAVE_BYTES="1")
    out = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, HERE], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    runs = json.loads(out.stdout)
    assert len(runs) == 28
    for key, by_threads in runs.items():
        assert by_threads["2"] == by_threads["1"], f"{key}: 2 threads differ from 1"
        assert by_threads["8"] == by_threads["1"], f"{key}: 8 threads differ from 1"
