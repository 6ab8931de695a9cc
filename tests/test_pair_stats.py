"""pair_stats: fused kernel vs the pure-PyTorch reference, gradients, opcheck, compile, bad input."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmim_ext
from mmim_ext.ops import all_pairs, pair_stats_reference

from conftest import DEVICES, make_inputs, requires_fused, with_edge_gate_units

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}
GRADS = ("h", "wa", "wb", "b", "v", "c")


def _naive(h, wa, wb, b, v, c, perms, pairs):
    """The definition, one pair and one sample at a time (float64), for tiny sizes."""
    B, m = h.shape
    pairs = all_pairs(m) if pairs is None else pairs
    R = perms.shape[0]
    tj, lm = [], []
    for p, (i, j) in enumerate(pairs.tolist()):
        sel = (lambda t: t) if wa.dim() == 1 else (lambda t: t[p])
        cp = c if c.dim() == 0 else c[p]

        def T(x, y):
            return cp + (sel(v) * torch.relu(sel(wa) * x + sel(wb) * y + sel(b))).sum()

        tj.append(sum(T(h[n, i], h[n, j]) for n in range(B)) / B)
        scores = torch.stack([T(h[n, i], h[perms[r, n], j]) for r in range(R) for n in range(B)])
        lm.append(torch.logsumexp(scores, 0) - math.log(R * B))
    return torch.stack(tj), torch.stack(lm)


def _run(backend, inputs, grad_seed=None):
    h, wa, wb, b, v, c, perms, pairs = inputs
    diff = [t.detach().clone().requires_grad_(True) for t in (h, wa, wb, b, v, c)]
    t, l = mmim_ext.pair_stats(*diff, perms, pairs, backend=backend)
    if grad_seed is None:
        return t.detach(), l.detach(), None
    g = torch.Generator().manual_seed(grad_seed)
    gt = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t)
    gl = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t)
    grads = torch.autograd.grad((t * gt).sum() + (l * gl).sum(), diff)
    return t.detach(), l.detach(), grads


def _assert_parity(inputs, dtype, grads=True):
    tf, lf, gf = _run("fused", inputs, 1 if grads else None)
    tr, lr, gr = _run("reference", inputs, 1 if grads else None)
    torch.testing.assert_close(tf, tr, **TOL[dtype])
    torch.testing.assert_close(lf, lr, **TOL[dtype])
    if grads:
        for name, a, b in zip(GRADS, gf, gr):
            scale = max(1.0, b.abs().max().item())
            torch.testing.assert_close(a / scale, b / scale, **TOL[dtype], msg=lambda s: f"grad {name}: {s}")


# ---------------------------------------------------------------------------------------------
# The reference itself against the definition.


@pytest.mark.parametrize("shared", [True, False])
def test_reference_matches_definition(shared):
    inputs = make_inputs(5, 4, 3, 2, shared=shared)
    t, l = pair_stats_reference(*inputs)
    tn, ln = _naive(*inputs)
    torch.testing.assert_close(t, tn)
    torch.testing.assert_close(l, ln)


def test_reference_chunking_does_not_change_results():
    inputs = make_inputs(9, 7, 4, 3, shared=False, requires_grad=True)
    t1, l1 = pair_stats_reference(*inputs)
    t2, l2 = pair_stats_reference(*inputs, max_scratch_bytes=1)  # one pair per chunk, checkpointed
    torch.testing.assert_close(t1, t2)
    torch.testing.assert_close(l1, l2)
    g1 = torch.autograd.grad((t1 + 2 * l1).sum(), inputs[:6])
    g2 = torch.autograd.grad((t2 + 2 * l2).sum(), inputs[:6])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# Fused vs reference.

SHAPES = [  # B, m, K, R
    (2, 2, 1, 1),
    (3, 5, 2, 2),
    (7, 3, 16, 5),
    (16, 9, 8, 1),
    (17, 6, 64, 2),
    (33, 11, 5, 5),
    (64, 4, 16, 1),
    (70, 13, 3, 2),
    (112, 5, 16, 1),  # float32 R=1: the forward's three-vector score tiles, the backward's units_backward_r1_form
]


@requires_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("B,m,K,R", SHAPES)
def test_fused_matches_reference(B, m, K, R, shared, dtype, device):
    inputs = make_inputs(B, m, K, R, shared=shared, dtype=dtype, device=device, seed=B * 131 + m)
    _assert_parity(inputs, dtype)


@requires_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [True, False])
def test_explicit_pairs_any_order(shared, dtype, device):
    m = 9
    g = torch.Generator().manual_seed(3)
    pairs = torch.randint(0, m, (40, 2), generator=g)  # i > j and i == j included
    pairs[0] = torch.tensor([5, 2])
    pairs[1] = torch.tensor([4, 4])
    inputs = make_inputs(13, m, 6, 2, shared=shared, dtype=dtype, device=device, pairs=pairs)
    _assert_parity(inputs, dtype)


@requires_fused
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_all_pairs_equals_explicit_row_major(dtype):
    # Large enough that several threads start in the middle of a row (pair index decoding).
    B, m, K, R = 3, 220, 1, 1
    inputs = make_inputs(B, m, K, R, shared=True, dtype=dtype)
    t1, l1 = mmim_ext.pair_stats(*inputs, backend="fused")
    explicit = list(inputs)
    explicit[7] = all_pairs(m)
    t2, l2 = mmim_ext.pair_stats(*explicit, backend="fused")
    assert torch.equal(t1, t2) and torch.equal(l1, l2)


@requires_fused
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_non_contiguous_h(dtype):
    h, wa, wb, b, v, c, perms, _ = make_inputs(12, 8, 5, 2, shared=False, dtype=dtype)
    wide = torch.randn(10, 24, dtype=dtype)
    h_nc = wide[:, ::2].t()[:, 1:9]  # [12, 8], non-contiguous
    assert not h_nc.is_contiguous()
    inputs = (h_nc, wa, wb, b, v, c, perms, None)
    _assert_parity(inputs, dtype)
    t1, l1, _ = _run("fused", inputs)
    t2, l2, _ = _run("fused", (h_nc.contiguous(), wa, wb, b, v, c, perms, None))
    assert torch.equal(t1, t2) and torch.equal(l1, l2)


@requires_fused
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [100.0, 1000.0])
def test_large_logits_stay_finite_and_exact(scale, dtype):
    # |T| reaches hundreds to thousands: exp(T) overflows, the log-sum-exp must not.
    inputs = make_inputs(40, 6, 8, 3, shared=False, dtype=dtype, scale=scale, seed=5)
    tf, lf, gf = _run("fused", inputs, 2)
    assert tf.abs().max() > 50
    assert torch.isfinite(tf).all() and torch.isfinite(lf).all()
    assert all(torch.isfinite(g).all() for g in gf)
    ref64 = [t.double() if t is not None and t.is_floating_point() else t for t in inputs]
    tr, lr, _ = _run("reference", ref64)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(lf.double(), lr, rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(tf.double(), tr, rtol=rtol, atol=rtol * scale)


@requires_fused
@pytest.mark.parametrize("budget_rows", [1, 2])
def test_many_permutation_rows_are_grouped_exactly(monkeypatch, budget_rows):
    # A scratch budget that fits only `budget_rows` rows per call: 7 rows go in groups whose
    # log-mean-exps are combined; values and gradients must not change.
    from mmim_ext.ops import critic_stats as ops

    B, m = 10, 6
    threads = torch.get_num_threads()
    monkeypatch.setattr(ops, "FUSED_SCRATCH_BYTES", (budget_rows + 1) * (threads + 1) * m * B * 8)
    assert ops._rows_per_call(B, m, 7, 8) == budget_rows
    inputs = make_inputs(B, m, 4, 7, shared=False, seed=21)
    _assert_parity(inputs, torch.float64)


@requires_fused
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [True, False])
def test_gate_threshold_edge_weights(shared, dtype):
    # the backward's gate by threshold must fall back to the gate from x where it is unsafe
    # (float32: the AVX2 build's threshold loops; float64 always gates from x, a check of the
    # edge values themselves)
    inputs = with_edge_gate_units(make_inputs(21, 5, 8, 2, shared=shared, dtype=dtype, seed=11))
    _assert_parity(inputs, dtype)


@requires_fused
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("B,K", [(21, 8), (16, 11)])
def test_h_gradient_only_two_unit_pass(B, K, shared):
    # R = 1, float32, the gradient w.r.t. h alone: the AVX2 build's two-unit loop
    # (units_backward_r1) pairs the units by the direction of their gate and leaves a unit over,
    # or gated from x (the edge units 0-5), to the one-unit loop. Odd K, and B with padding, give
    # units left over and padded weights; against the float64 reference.
    # Then the same inputs with every unit's gate by threshold (random weights only): all in pairs.
    plain = make_inputs(B, 6, K, 1, shared=shared, dtype=torch.float32, seed=B + K)
    for inputs in (with_edge_gate_units(plain), plain):
        got = _grads_with(inputs, {"h"}, grad_seed=1)["h"]
        ref = _run("reference", [t.double() if torch.is_floating_point(t) else t for t in inputs[:7]] + [None], 1)[2][0]
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(got.double() / scale, ref / scale, **TOL[torch.float32])


@requires_fused
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_threshold_score_form_per_pair_fallbacks(dtype):
    # The AVX2 build scores a float32 critic in the threshold form (pair_stats_cpu_score.h,
    # ScoreForm) when every unit's threshold is safe, else from x; per-pair critics get their
    # forms in blocks of 32 consecutive pairs. Over 120 pairs, so that block boundaries fall among
    # them: a third of the critics have a unit with wb = 0, some a subnormal wb (both: from x),
    # some a tiny normal wb (a huge but safe threshold: the form), the rest random (the form).
    h, wa, wb, b, v, c, perms, _ = make_inputs(24, 16, 8, 2, shared=False, dtype=dtype, seed=13)
    sub = 1e-40 if dtype == torch.float32 else 1e-310
    wb = wb.clone()
    wb[::3, 0] = 0.0
    wb[1::7, 1] = -sub
    wb[2::5, 2] = 1e-20
    wb[4::5, 3] = -1e-20
    _assert_parity((h, wa, wb, b, v, c, perms, None), dtype)


@requires_fused
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("scale", [1e10, 1e28, 1e33])
def test_threshold_score_form_large_h(scale, shared):
    # float32 h of magnitude `scale`: the threshold form is used while its terms stay below 2^100
    # (about 1.3e30) for |h| this large, and the scores come from x beyond that (1e33). Either
    # way the statistics are those of the float64 reference, relative to the scores' size.
    h, wa, wb, b, v, c, perms, _ = make_inputs(24, 6, 8, 2, shared=shared, dtype=torch.float64, seed=17)
    h = h * scale
    inputs32 = [t.float() for t in (h, wa, wb, b, v, c)] + [perms, None]
    tf, lf, _ = _run("fused", inputs32)
    tr, lr, _ = _run("reference", (h, wa, wb, b, v, c, perms, None))
    assert torch.isfinite(tf).all() and torch.isfinite(lf).all()
    size = tr.abs().max().item()
    torch.testing.assert_close(tf.double(), tr, rtol=1e-5, atol=1e-5 * size)
    torch.testing.assert_close(lf.double(), lr, rtol=1e-5, atol=1e-5 * size)


@requires_fused
def test_lme_is_bounded_by_max_score():
    # log-mean-exp lies between the mean and the max of the shuffled scores.
    inputs = make_inputs(20, 5, 4, 2, shared=True, scale=30.0)
    t, l, _ = _run("fused", inputs)
    h, wa, wb, b, v, c, perms, _ = inputs
    hp = h[perms]
    pairs = all_pairs(5)
    scores = torch.stack([
        c + (v * torch.relu(wa * h[:, i, None] + wb * hp[:, :, j, None] + b)).sum(-1).flatten()
        for i, j in pairs.tolist()
    ])
    assert (l <= scores.max(1).values + 1e-9).all()
    assert (l >= scores.mean(1) - 1e-9).all()


@requires_fused
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pairs", [None, "shuffled"])
def test_shared_critic_equals_replicated_per_pair(dtype, pairs):
    # A shared critic is read from one row for every pair (its score form made once, its gradient
    # summed over the pairs); per-pair critics from a row each. Same numbers: the forward and the
    # gradient w.r.t. h bitwise, the critic's gradient as the sum over pairs.
    B, m, K, R = 40, 9, 6, 2
    g = torch.Generator().manual_seed(7)
    idx = None
    if pairs == "shuffled":  # the first argument changes from pair to pair, and repeats
        idx = all_pairs(m)[torch.randperm(m * (m - 1) // 2, generator=g)][:30]
        idx = torch.cat([idx, idx[:5].flip(1), torch.tensor([[3, 3]])])
    h, wa, wb, b, v, c, perms, idx = make_inputs(B, m, K, R, shared=True, dtype=dtype, pairs=idx)
    P = m * (m - 1) // 2 if idx is None else idx.shape[0]
    rep = [t.expand(P, K).contiguous() for t in (wa, wb, b, v)] + [c.expand(P).contiguous()]
    shared = _run("fused", (h, wa, wb, b, v, c, perms, idx), 2)
    per_pair = _run("fused", (h, *rep, perms, idx), 2)
    assert torch.equal(shared[0], per_pair[0]) and torch.equal(shared[1], per_pair[1])
    assert torch.equal(shared[2][0], per_pair[2][0])
    for gs, gp in zip(shared[2][1:], per_pair[2][1:]):
        torch.testing.assert_close(gs, gp.sum(0), **TOL[dtype])


@requires_fused
def test_deterministic_and_thread_count_independent():
    inputs = make_inputs(37, 30, 8, 2, shared=True, dtype=torch.float32, seed=11)
    a = _run("fused", inputs, 3)
    b = _run("fused", inputs, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c1 = _run("fused", inputs, 3)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(a[0], c1[0])
    torch.testing.assert_close(a[1], c1[1])
    for x, y in zip(a[2], c1[2]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


@requires_fused
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(2, 40),
    m=st.integers(2, 12),
    K=st.integers(1, 20),
    R=st.integers(1, 6),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_parity(B, m, K, R, shared, seed):
    inputs = make_inputs(B, m, K, R, shared=shared, seed=seed)
    _assert_parity(inputs, torch.float64)


# ---------------------------------------------------------------------------------------------
# Gradients.


@requires_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck_fused(shared, seed, device):
    h, wa, wb, b, v, c, perms, _ = make_inputs(5, 4, 3, 2, shared=shared, seed=seed, device=device,
                                               requires_grad=True)

    def f(h, wa, wb, b, v, c):
        return mmim_ext.pair_stats(h, wa, wb, b, v, c, perms, backend="fused")

    assert torch.autograd.gradcheck(f, (h, wa, wb, b, v, c), eps=1e-6, atol=1e-7)


@requires_fused
def test_gradcheck_explicit_pairs():
    pairs = torch.tensor([[2, 0], [1, 1], [0, 3], [3, 2]])
    h, wa, wb, b, v, c, perms, pairs = make_inputs(6, 4, 2, 3, shared=False, pairs=pairs,
                                                   requires_grad=True, seed=9)

    def f(h, wa, wb, b, v, c):
        return mmim_ext.pair_stats(h, wa, wb, b, v, c, perms, pairs, backend="fused")

    assert torch.autograd.gradcheck(f, (h, wa, wb, b, v, c), eps=1e-6, atol=1e-7)


@requires_fused
def test_only_one_output_used():
    inputs = make_inputs(8, 5, 4, 2, shared=False, requires_grad=True)
    t, l = mmim_ext.pair_stats(*inputs, backend="fused")
    (g_h,) = torch.autograd.grad(l.sum(), inputs[0])
    t2, l2 = pair_stats_reference(*inputs)
    (g_ref,) = torch.autograd.grad(l2.sum(), inputs[0])
    torch.testing.assert_close(g_h, g_ref)


@requires_fused
def test_double_backward_raises_clearly():
    inputs = make_inputs(6, 3, 2, 1, shared=True, requires_grad=True)
    t, l = mmim_ext.pair_stats(*inputs, backend="fused")
    (g,) = torch.autograd.grad((t - l).sum(), inputs[0], create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g.sum().backward()


def test_double_backward_works_on_reference():
    h, wa, wb, b, v, c, perms, _ = make_inputs(5, 3, 2, 1, shared=True, requires_grad=True)

    def f(h):
        t, l = mmim_ext.pair_stats(h, wa, wb, b, v, c, perms, backend="reference")
        return (t - l).sum()

    assert torch.autograd.gradgradcheck(f, (h,), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# torch.library integration.


@requires_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [True, False])
def test_opcheck(shared, device):
    h, wa, wb, b, v, c, perms, _ = make_inputs(6, 4, 3, 2, shared=shared, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.mmim_ext.pair_stats_fwd.default, (h, wa, wb, b, v, c, perms, None))
    pairs = torch.tensor([[0, 3], [2, 1]])
    args = make_inputs(6, 4, 3, 2, shared=shared, pairs=pairs, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.mmim_ext.pair_stats_fwd.default, args)
    t, l = torch.ops.mmim_ext.pair_stats_fwd(h, wa, wb, b, v, c, perms, None)
    gt, gl = torch.randn_like(t), torch.randn_like(l)
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            torch.ops.mmim_ext.pair_stats_bwd.default,
            tuple(x.detach() for x in (gt, gl, h, wa, wb, b, v, c)) + (perms, None, l.detach(), *need),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
        )


def _grads_with(inputs, wanted, grad_seed=3):
    """Gradients of the fused op w.r.t. the inputs named in `wanted` only (the others detached)."""
    h, wa, wb, b, v, c, perms, pairs = inputs
    diff = [t.detach().clone().requires_grad_(name in wanted) for name, t in zip(GRADS, (h, wa, wb, b, v, c))]
    t, l = mmim_ext.pair_stats(*diff, perms, pairs, backend="fused")
    g = torch.Generator().manual_seed(grad_seed)
    gt = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t)
    gl = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t)
    req = [x for name, x in zip(GRADS, diff) if name in wanted]
    return dict(zip([n for n in GRADS if n in wanted], torch.autograd.grad((t * gt).sum() + (l * gl).sum(), req)))


@requires_fused
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("B,R", [(16, 1), (19, 3)])
def test_backward_computes_only_needed_gradients(B, R, shared, dtype):
    # A critic update on detached features (no gradient w.r.t. h) and a penalty through frozen
    # critics (gradient w.r.t. h only) take the kernel's reduced paths; they must give the same
    # gradients as the full backward.
    inputs = make_inputs(B, 7, 5, R, shared=shared, dtype=dtype, seed=B + R)
    full = _grads_with(inputs, set(GRADS))
    for wanted in ({"h"}, {"wa", "wb", "b", "v", "c"}, {"h", "v"}, {"c"}):
        part = _grads_with(inputs, wanted)
        assert set(part) == wanted
        for name in wanted:
            torch.testing.assert_close(part[name], full[name], rtol=1e-12 if dtype == torch.float64 else 1e-6,
                                       atol=1e-12 if dtype == torch.float64 else 1e-6, msg=name)
    # The op itself returns empty tensors for what was not asked for.
    h, wa, wb, b, v, c, perms, pairs = inputs
    t, l = torch.ops.mmim_ext.pair_stats_fwd(h, wa, wb, b, v, c, perms, pairs)
    args = (torch.ones_like(t), torch.ones_like(l), h, wa, wb, b, v, c, perms, pairs, l)
    only_h = torch.ops.mmim_ext.pair_stats_bwd(*args, True, False)
    only_p = torch.ops.mmim_ext.pair_stats_bwd(*args, False, True)
    both = torch.ops.mmim_ext.pair_stats_bwd(*args)
    assert only_h[0].shape == h.shape and all(x.numel() == 0 for x in only_h[1:])
    assert only_p[0].numel() == 0 and [x.shape for x in only_p[1:]] == [x.shape for x in both[1:]]
    if dtype == torch.float32 and R == 1:
        # the AVX2 build's argument-gradients-only pass takes units two at a time for R = 1
        # (units_backward_r1), adding them to the gradient rows in another order
        torch.testing.assert_close(only_h[0], both[0], rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(only_h[0], both[0])
    for x, y in zip(only_p[1:], both[1:]):
        assert torch.equal(x, y)


@requires_fused
def test_torch_compile_fullgraph():
    inputs = make_inputs(8, 5, 4, 2, shared=False, dtype=torch.float32, requires_grad=True)
    h, wa, wb, b, v, c, perms, _ = inputs

    def dv_bound(h, wa, wb, b, v, c, perms):
        t, l = mmim_ext.pair_stats(torch.tanh(h), wa, wb, b, v, c, perms)
        return (t - l).sum()

    compiled = torch.compile(dv_bound, fullgraph=True, backend="inductor")
    out = compiled(*inputs[:7])
    grads = torch.autograd.grad(out, (h, wa, v))
    ref = dv_bound(*inputs[:7])
    ref_grads = torch.autograd.grad(ref, (h, wa, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b_ in zip(grads, ref_grads):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


@requires_fused
def test_backend_selection():
    inputs = make_inputs(6, 4, 2, 1, shared=True)
    assert mmim_ext.fused_available("cpu")
    assert torch.ops.mmim_ext.cpu_capability() in ("avx2", "base", "scalar")
    t_auto, _ = mmim_ext.pair_stats(*inputs)
    t_fused, _ = mmim_ext.pair_stats(*inputs, backend="fused")
    assert torch.equal(t_auto, t_fused)
    with pytest.raises(ValueError, match="backend"):
        mmim_ext.pair_stats(*inputs, backend="fast")


# ---------------------------------------------------------------------------------------------
# The fallback and the instruction-set builds, in fresh processes.

_SCRIPT = r"""
import json, sys, warnings, torch
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import mmim_ext
sys.path.insert(0, sys.argv[2])
from conftest import make_inputs
inputs = make_inputs(11, 7, 5, 3, shared=False, requires_grad=True, seed=4)
t, l = mmim_ext.pair_stats(*inputs)
g = torch.autograd.grad((t - 2 * l).sum(), inputs[0])[0]
json.dump({"loaded": mmim_ext.extension_loaded(), "warnings": [str(x.message) for x in w],
           "cap": torch.ops.mmim_ext.cpu_capability() if mmim_ext.extension_loaded() else None,
           "t": t.tolist(), "l": l.tolist(), "g": g.flatten().tolist()}, open(sys.argv[1], "w"))
"""


def _subprocess_run(tmp_path, env_extra):
    out = tmp_path / "out.json"
    env = dict(os.environ, **env_extra)
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", _SCRIPT, str(out), here], check=True, env=env, cwd=tmp_path)
    return json.loads(out.read_text())


@requires_fused
def test_fallback_without_extension_gives_same_numbers(tmp_path):
    fused = _subprocess_run(tmp_path, {})
    fallback = _subprocess_run(tmp_path, {"MMIM_EXT_DISABLE": "1"})
    assert fused["loaded"] and not fallback["loaded"]
    assert len(fallback["warnings"]) == 1 and "falling back" in fallback["warnings"][0]
    for key in ("t", "l", "g"):
        torch.testing.assert_close(torch.tensor(fused[key]), torch.tensor(fallback[key]), rtol=1e-10, atol=1e-10)


@requires_fused
def test_baseline_instruction_set_build(tmp_path):
    best = _subprocess_run(tmp_path, {})
    base = _subprocess_run(tmp_path, {"MMIM_EXT_CPU_CAPABILITY": "base"})
    assert base["cap"] == "base"
    for key in ("t", "l", "g"):
        torch.testing.assert_close(torch.tensor(best[key]), torch.tensor(base[key]), rtol=1e-10, atol=1e-10)


_BUILD_PARITY_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from conftest import make_inputs
from test_pair_stats import _assert_parity
cap = torch.ops.mmim_ext.cpu_capability()
assert cap == sys.argv[1], (cap, sys.argv[1])
cases = [  # B, m, K, R, shared, scale: B beyond one 256-sample chunk and off the lane count,
           # B a multiple of the padding (joint weights without padding zeros), large logits
           # (scale) for the exp of the log-sum-exp
    (2, 2, 1, 1, False, 1.0), (19, 5, 3, 2, True, 1.0), (300, 3, 4, 3, False, 1.0),
    (32, 4, 3, 1, False, 1.0), (48, 3, 2, 2, True, 1.0),
    (33, 4, 16, 1, False, 40.0), (41, 6, 5, 2, True, 40.0),
]
for dtype in (torch.float64, torch.float32):
    for B, m, K, R, shared, scale in cases:
        # float32 logits in the hundreds make the sample weights exp(T - lme) depend on rounding
        # in the last bits of T (the float32 reference has the same problem): scale 4 there.
        scale = scale if dtype == torch.float64 else min(scale, 4.0)
        _assert_parity(make_inputs(B, m, K, R, shared=shared, dtype=dtype, scale=scale, seed=B + m), dtype)
    pairs = torch.tensor([[3, 1], [2, 2], [0, 4], [4, 0]])
    _assert_parity(make_inputs(13, 5, 6, 2, shared=False, dtype=dtype, pairs=pairs), dtype)
# the backward's reduced paths (only the gradient w.r.t. h, only the critic's) in this build
h, wa, wb, b, v, c, perms, pairs = make_inputs(32, 4, 3, 2, shared=False, seed=4)
t, l = torch.ops.mmim_ext.pair_stats_fwd(h, wa, wb, b, v, c, perms, pairs)
args = (torch.ones_like(t), -torch.ones_like(l), h, wa, wb, b, v, c, perms, pairs, l)
both = torch.ops.mmim_ext.pair_stats_bwd(*args)
assert torch.equal(torch.ops.mmim_ext.pair_stats_bwd(*args, True, False)[0], both[0])
assert all(torch.equal(x, y) for x, y in zip(torch.ops.mmim_ext.pair_stats_bwd(*args, False, True)[1:], both[1:]))
# the one pass of pair_stats_fwd_bwd in this build against the forward and backward ops
for shared in (False, True):
    h, wa, wb, b, v, c, perms, pairs = make_inputs(300, 4, 3, 2, shared=shared, seed=6)
    t, l = torch.ops.mmim_ext.pair_stats_fwd(h, wa, wb, b, v, c, perms, pairs)
    ct, cl = torch.randn_like(t), torch.randn_like(l)
    one = torch.ops.mmim_ext.pair_stats_fwd_bwd(ct, cl, h, wa, wb, b, v, c, perms, pairs)
    two = (t, l) + tuple(torch.ops.mmim_ext.pair_stats_bwd(ct, cl, h, wa, wb, b, v, c, perms, pairs, l))
    for x, y in zip(one, two):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
inputs = make_inputs(5, 3, 2, 2, shared=False, requires_grad=True, seed=9)
assert torch.autograd.gradcheck(lambda *a: torch.ops.mmim_ext.pair_stats_fwd(*a, inputs[6], None),
                                inputs[:6], eps=1e-6, atol=1e-7)
print("ok", cap)
"""


@requires_fused
@pytest.mark.parametrize("cap", ["scalar", "base"])
def test_every_instruction_set_build_matches_reference(cap):
    # "scalar" runs the shared header's scalar functions, those the CUDA kernels call: on a
    # machine without a GPU this is how the tests exercise that arithmetic.
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, MMIM_EXT_CPU_CAPABILITY=cap)
    out = subprocess.run([sys.executable, "-c", _BUILD_PARITY_SCRIPT, cap, here], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == f"ok {cap}"


def test_capability_env_rejects_unknown(tmp_path):
    if not mmim_ext.fused_available("cpu"):
        pytest.skip("compiled extension not built")
    code = "import torch, mmim_ext; torch.ops.mmim_ext.cpu_capability()"
    env = dict(os.environ, MMIM_EXT_CPU_CAPABILITY="avx9")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "MMIM_EXT_CPU_CAPABILITY must be 'scalar', 'base' or 'avx2'" in out.stderr


# ---------------------------------------------------------------------------------------------
# Bad input.


def _good():
    return list(make_inputs(6, 4, 3, 2, shared=True))


def _bad_cases():
    cases = []

    def case(name, fn, exc, match):
        cases.append(pytest.param(fn, exc, match, id=name))

    case("h_1d", lambda a: a.__setitem__(0, a[0][:, 0]), ValueError, "'h' must be 2-D")
    case("h_3d", lambda a: a.__setitem__(0, a[0][None]), ValueError, "'h' must be 2-D")
    case("B_lt_2", lambda a: (a.__setitem__(0, a[0][:1]), a.__setitem__(6, a[6][:, :1])), ValueError, "at least 2 samples")
    case("h_int", lambda a: a.__setitem__(0, a[0].long()), TypeError, "'h' must be float32 or float64")
    case("h_half_cpu", lambda a: a.__setitem__(0, a[0].half()), TypeError, "CUDA only")
    case("one_unit", lambda a: (a.__setitem__(0, a[0][:, :1])), ValueError, "at least 2 units")
    case("wa_dtype", lambda a: a.__setitem__(1, a[1].float()), TypeError, "'wa' must have h's dtype")
    case("wb_shape", lambda a: a.__setitem__(2, a[2][:2]), ValueError, "'wb' must have shape")
    case("wa_3d", lambda a: a.__setitem__(1, a[1][None, None]), ValueError, "'wa' must be")
    case("v_per_pair_mismatch", lambda a: a.__setitem__(4, a[4].expand(6, 3)), ValueError, "'v' must have shape")
    case("c_shape", lambda a: a.__setitem__(5, a[5].reshape(1)), ValueError, "'c' must have shape")
    case("perms_dtype", lambda a: a.__setitem__(6, a[6].int()), TypeError, "'perms' must be int64")
    case("perms_len", lambda a: a.__setitem__(6, a[6][:, :5]), ValueError, "length B=6")
    case("perms_1d", lambda a: a.__setitem__(6, a[6][0]), ValueError, r"'perms' must have shape \[R, B\]")
    case("perms_not_perm", lambda a: a[6].__setitem__((1, 0), a[6][1, 1].item()), ValueError, "row 1 of 'perms' is not a permutation")
    case("perms_out_of_range", lambda a: a[6].__setitem__((0, 2), 6), ValueError, "row 0 of 'perms' is not a permutation")
    case("pairs_shape", lambda a: a.__setitem__(7, torch.zeros(3, 3, dtype=torch.long)), ValueError, r"'pairs' must have shape \[P, 2\]")
    case("pairs_dtype", lambda a: a.__setitem__(7, torch.zeros(3, 2)), TypeError, "'pairs' must be int64")
    case("pairs_range", lambda a: a.__setitem__(7, torch.tensor([[0, 4]])), ValueError, r"expected all in \[0, 3\]")
    case("pairs_negative", lambda a: a.__setitem__(7, torch.tensor([[-1, 2]])), ValueError, r"expected all in \[0, 3\]")
    case("h_nan", lambda a: a[0].__setitem__((2, 1), float("nan")), ValueError, "NaN or infinite")
    case("h_inf", lambda a: a[0].__setitem__((0, 0), float("inf")), ValueError, "NaN or infinite")
    case("not_tensor", lambda a: a.__setitem__(3, [1.0, 2.0, 3.0]), TypeError, "'b' must be a torch.Tensor")
    return cases


@pytest.mark.parametrize("backend", ["reference", pytest.param("fused", marks=requires_fused)])
@pytest.mark.parametrize("mutate,exc,match", _bad_cases())
def test_bad_input_raises(mutate, exc, match, backend):
    args = _good()
    mutate(args)
    with pytest.raises(exc, match=match):
        mmim_ext.pair_stats(*args, backend=backend)


@requires_fused
def test_direct_op_call_checks_values():
    # The compiled op guards its own memory accesses (a caller may skip the Python wrapper).
    h, wa, wb, b, v, c, perms, _ = _good()
    bad = perms.clone()
    bad[0, 0] = 100
    with pytest.raises(RuntimeError, match="not a permutation"):
        torch.ops.mmim_ext.pair_stats_fwd(h, wa, wb, b, v, c, bad, None)
    with pytest.raises(RuntimeError, match="unit index"):
        torch.ops.mmim_ext.pair_stats_fwd(h, wa, wb, b, v, c, perms, torch.tensor([[0, 9]]))
    with pytest.raises(RuntimeError, match="must be 2-D"):
        torch.ops.mmim_ext.pair_stats_fwd(h[0], wa, wb, b, v, c, perms, None)


def test_fused_backend_unavailable_device_message():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device exists")
    args = _good()
    args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(RuntimeError, match="backend='fused' is unavailable"):
        mmim_ext.pair_stats(*args[:7], backend="fused")
