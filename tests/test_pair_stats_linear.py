"""pair_stats_linear and its op pair_stats_fwd_bwd: statistics and gradients in one pass.

The one-pass results must equal, up to rounding, what pair_stats followed by autograd gives for
the same linear loss, for every input that requires a gradient.
"""

import pytest
import torch

import mmim_ext
from mmim_ext.ops import critic_stats as ops_mod

from conftest import DEVICES, make_inputs, requires_fused, with_edge_gate_units

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}
NAMES = ("h", "wa", "wb", "b", "v", "c")


def _coefs(P, dtype, device, seed=7):
    g = torch.Generator().manual_seed(seed)
    ct = torch.randn(P, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    cl = torch.randn(P, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return ct, cl


def _linear(inputs, ct, cl, wanted=NAMES, backend="auto"):
    h, wa, wb, b, v, c, perms, pairs = inputs
    diff = [t.detach().clone().requires_grad_(n in wanted) for n, t in zip(NAMES, (h, wa, wb, b, v, c))]
    loss, t, l = mmim_ext.pair_stats_linear(*diff, perms, ct, cl, pairs, backend=backend)
    grads = {}
    if loss.requires_grad:
        req = [x for x in diff if x.requires_grad]
        grads = dict(zip([n for n in NAMES if n in wanted], torch.autograd.grad(loss, req)))
    return loss.detach(), t, l, grads


def _autograd(inputs, ct, cl, wanted=NAMES, backend="fused"):
    h, wa, wb, b, v, c, perms, pairs = inputs
    diff = [t.detach().clone().requires_grad_(n in wanted) for n, t in zip(NAMES, (h, wa, wb, b, v, c))]
    t, l = mmim_ext.pair_stats(*diff, perms, pairs, backend=backend)
    loss = (ct * t).sum() + (cl * l).sum()
    req = [x for x in diff if x.requires_grad]
    grads = dict(zip([n for n in NAMES if n in wanted], torch.autograd.grad(loss, req))) if req else {}
    return loss.detach(), t.detach(), l.detach(), grads


def _assert_same(got, want, dtype):
    (lg, tg, lmg, gg), (lw, tw, lmw, gw) = got, want
    for a, b in ((tg, tw), (lmg, lmw)):
        torch.testing.assert_close(a, b, **TOL[dtype])
    scale = max(1.0, lw.abs().item())
    torch.testing.assert_close(lg / scale, lw / scale, **TOL[dtype])
    assert gg.keys() == gw.keys()
    for name in gw:
        s = max(1.0, gw[name].abs().max().item())
        torch.testing.assert_close(gg[name] / s, gw[name] / s, **TOL[dtype], msg=lambda m: f"grad {name}: {m}")


@requires_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("B,m,K,R", [(16, 5, 3, 1), (19, 4, 5, 3), (300, 3, 4, 2)])
def test_matches_pair_stats_and_autograd(B, m, K, R, shared, dtype, device):
    # B=19: padding to the lane count; B=300: more than one 256-sample chunk of the forward
    inputs = make_inputs(B, m, K, R, shared=shared, dtype=dtype, device=device, seed=B + m)
    ct, cl = _coefs(m * (m - 1) // 2, dtype, device)
    _assert_same(_linear(inputs, ct, cl), _autograd(inputs, ct, cl), dtype)


@requires_fused
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("R", [1, 2])
def test_gate_threshold_edge_weights(R, shared, dtype):
    # the one pass's gate by threshold must fall back to the gate from x where it is unsafe
    # (float32: the AVX2 build's threshold loops; float64 always gates from x)
    inputs = with_edge_gate_units(make_inputs(21, 5, 8, R, shared=shared, dtype=dtype, seed=12))
    ct, cl = _coefs(10, dtype, "cpu")
    _assert_same(_linear(inputs, ct, cl), _autograd(inputs, ct, cl, backend="reference"), dtype)


@requires_fused
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("hscale", [1.0, 1e3])
def test_one_pass_statistics_with_ties_and_large_terms(shared, hscale):
    # R = 1, float32, B a multiple of the tile: the CPU one pass scores in the threshold form and
    # runs its own unit loop for this case (pair_stats_cpu_backward.h, units_backward_r1_form).
    # h from a ReLU with zero biases gives exact ties b == t; a large h scale, large terms that
    # cancel in the sums.
    h, wa, wb, b, v, c, perms, pairs = make_inputs(64, 7, 16, 1, shared=shared, dtype=torch.float32, seed=31)
    h = (h * hscale).relu()
    b = torch.where(torch.arange(16) % 2 == 0, torch.zeros_like(b), b)
    inputs = (h, wa, wb, b, v, c, perms, pairs)
    ct, cl = _coefs(21, torch.float32, "cpu")
    got = _linear(inputs, ct, cl)
    # the statistics against the float64 reference, to float32 rounding of their terms' size
    ref = [x.double() for x in (h, wa, wb, b, v, c)]
    t64, l64 = mmim_ext.pair_stats(*ref, perms, backend="reference")
    size = mmim_ext.pair_stats(*(x.abs() for x in ref), perms, backend="reference")[0]
    assert ((got[1].double() - t64).abs() <= 1e-5 * size + 1e-6).all()
    assert ((got[2].double() - l64).abs() <= 1e-5 * size + 1e-6).all()
    if hscale == 1.0:
        # (at h ~ 1e3 the shuffled scores' rounding moves the float32 softmax weights, so the
        # gradients of two float32 computations differ by more than TOL)
        _assert_same(got, _autograd(inputs, ct, cl, backend="reference"), torch.float32)


@requires_fused
@pytest.mark.parametrize("shared", [True, False])
def test_explicit_pairs_and_reference_backend(shared):
    pairs = torch.tensor([[3, 1], [2, 2], [0, 4], [4, 0]])
    inputs = make_inputs(13, 5, 6, 2, shared=shared, pairs=pairs)
    ct, cl = _coefs(4, torch.float64, "cpu")
    fused = _linear(inputs, ct, cl)
    _assert_same(fused, _autograd(inputs, ct, cl), torch.float64)
    _assert_same(_linear(inputs, ct, cl, backend="reference"), fused, torch.float64)


@requires_fused
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("wanted", [("h",), ("wa", "c"), ("b", "v"), ()])
def test_only_requested_gradients(shared, wanted):
    inputs = make_inputs(21, 4, 3, 2, shared=shared, seed=3)
    ct, cl = _coefs(6, torch.float64, "cpu")
    got = _linear(inputs, ct, cl, wanted=wanted)
    assert set(got[3]) == set(wanted)
    want = _autograd(inputs, ct, cl, wanted=wanted)
    _assert_same(got, want, torch.float64)


@requires_fused
def test_op_equals_forward_then_backward_ops():
    for shared in (False, True):
        h, wa, wb, b, v, c, perms, pairs = make_inputs(37, 5, 4, 2, shared=shared, seed=11)
        ops = torch.ops.mmim_ext
        t, l = ops.pair_stats_fwd(h, wa, wb, b, v, c, perms, pairs)
        ct, cl = _coefs(t.shape[0], torch.float64, "cpu")
        for need in ((True, True), (True, False), (False, True), (False, False)):
            one = ops.pair_stats_fwd_bwd(ct, cl, h, wa, wb, b, v, c, perms, pairs, *need)
            two = (t, l) + tuple(ops.pair_stats_bwd(ct, cl, h, wa, wb, b, v, c, perms, pairs, l, *need))
            assert len(one) == 8
            for x, y in zip(one, two):
                assert x.shape == y.shape
                torch.testing.assert_close(x, y, **TOL[torch.float64])


@requires_fused
@pytest.mark.parametrize("shared", [True, False])
def test_gradcheck(shared):
    h, wa, wb, b, v, c, perms, _ = make_inputs(5, 3, 2, 2, shared=shared, requires_grad=True, seed=2)
    ct, cl = (x.requires_grad_(True) for x in _coefs(3, torch.float64, "cpu"))

    def f(h, wa, wb, b, v, c, ct, cl):
        return mmim_ext.pair_stats_linear(h, wa, wb, b, v, c, perms, ct, cl, backend="fused")[0]

    assert torch.autograd.gradcheck(f, (h, wa, wb, b, v, c, ct, cl), eps=1e-6, atol=1e-7)


@requires_fused
def test_upstream_gradient_scales_and_double_backward_raises():
    inputs = make_inputs(12, 4, 3, 1, shared=False, seed=5)
    ct, cl = _coefs(6, torch.float64, "cpu")
    h = inputs[0].clone().requires_grad_(True)
    loss, _, _ = mmim_ext.pair_stats_linear(h, *inputs[1:7], ct, cl)
    (g1,) = torch.autograd.grad(loss, h, retain_graph=True)
    (g3,) = torch.autograd.grad(3.0 * loss, h, retain_graph=True)
    torch.testing.assert_close(g3, 3.0 * g1)
    (g,) = torch.autograd.grad(loss, h, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), h)


@requires_fused
def test_many_permutation_rows_fall_back_to_grouped_calls(monkeypatch):
    inputs = make_inputs(10, 4, 3, 6, shared=False, seed=8)
    ct, cl = _coefs(6, torch.float64, "cpu")
    whole = _linear(inputs, ct, cl)
    # a budget of two permutation rows per call: pair_stats's grouped path, then autograd (the
    # one pass, which has no grouping, must not run)
    monkeypatch.setattr(ops_mod, "FUSED_SCRATCH_BYTES", 3 * (torch.get_num_threads() + 1) * 4 * 10 * 8)

    def one_pass_called(*args):
        raise AssertionError("the one pass ran for an R that needs grouped calls")

    monkeypatch.setattr(ops_mod._PairStatsLinear, "apply", one_pass_called)
    _assert_same(_linear(inputs, ct, cl), whole, torch.float64)


@requires_fused
def test_cpu_fused_runs_the_one_pass(monkeypatch):
    # The point of pair_stats_linear: on the CPU with the kernel it must take the one pass, not
    # pair_stats + autograd (whose results are the same, so the parity tests cannot tell).
    calls = []
    real = ops_mod._PairStatsLinear.apply
    monkeypatch.setattr(ops_mod._PairStatsLinear, "apply", lambda *a: calls.append(1) or real(*a))
    inputs = make_inputs(12, 4, 3, 1, shared=False, seed=13)
    ct, cl = _coefs(6, torch.float64, "cpu")
    _linear(inputs, ct, cl)
    _linear(inputs, ct, cl, backend="fused")
    assert len(calls) == 2
    _linear(inputs, ct, cl, backend="reference")
    assert len(calls) == 2


@requires_fused
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    h, wa, wb, b, v, c, perms, _ = make_inputs(6, 4, 3, 2, shared=False, device=device)
    ct, cl = _coefs(6, torch.float64, device)
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            torch.ops.mmim_ext.pair_stats_fwd_bwd.default,
            (ct, cl, h, wa, wb, b, v, c, perms, None, *need),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
        )


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (lambda ct, cl: (ct[:-1], cl), ValueError, "'coef_t' must have shape"),
        (lambda ct, cl: (ct, cl.float()), TypeError, "'coef_lme' must have h's dtype"),
        (lambda ct, cl: (ct.tolist(), cl), TypeError, "'coef_t' must be a torch.Tensor"),
    ],
)
def test_bad_coefficients_raise(bad, exc, match):
    h, wa, wb, b, v, c, perms, _ = make_inputs(8, 4, 3, 1, shared=False)
    ct, cl = bad(*_coefs(6, torch.float64, "cpu"))
    with pytest.raises(exc, match=match):
        mmim_ext.pair_stats_linear(h, wa, wb, b, v, c, perms, ct, cl)


@requires_fused
def test_second_backward_through_the_same_graph_recomputes():
    # The first backward hands the forward's buffers to autograd (scaled in place); a second one
    # (retain_graph) must compute them again and give the same gradients.
    inputs = make_inputs(14, 4, 3, 2, shared=False, seed=12)
    ct, cl = _coefs(6, torch.float64, "cpu")
    diff = [t.detach().clone().requires_grad_(True) for t in inputs[:6]]
    loss, _, _ = mmim_ext.pair_stats_linear(*diff, *inputs[6:7], ct, cl)
    first = torch.autograd.grad(2.0 * loss, diff, retain_graph=True)
    second = torch.autograd.grad(2.0 * loss, diff)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    want = _autograd(inputs, ct, cl)[3]
    for name, g in zip(NAMES, first):
        torch.testing.assert_close(g, 2.0 * want[name], **TOL[torch.float64])


# ---------------------------------------------------------------------------------------------
# pair_stats_fwd_bwd_mine: the one pass with MINE's moving-average rule for lme's gradient


def _mine_rule(P, dtype, seed=21):
    g = torch.Generator().manual_seed(seed)
    la = torch.randn(P, generator=g, dtype=torch.float64)
    la[0] = -float("inf")  # a pair's first batch
    lk = torch.log(torch.rand(P, generator=g, dtype=torch.float64) * 0.9 + 0.05)
    return torch.stack([la, lk], 1).to(dtype)


@requires_fused
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("B,R", [(10, 2), (32, 1)])
def test_mine_rule_equals_the_linear_one_pass_with_the_ratio(B, R, dtype, shared, device):
    # The op's gradients are pair_stats_fwd_bwd's with grad_lme[p] times
    # exp(lme[p] - logaddexp(ema[p, 0], log_a + lme[p]) + ema[p, 1]), the ratio formed from the
    # lme the pass computes; the expected values come from the CPU ops (on CUDA the op runs the
    # forward and backward kernels with the ratio applied between them). B=32, R=1 in float32:
    # the CPU pass's own unit loop for all gradients (units_backward_r1_form).
    inputs = make_inputs(B, 4, 3, R, shared=shared, dtype=dtype, seed=5)
    h, wa, wb, b, v, c, perms, pairs = inputs
    P = 6
    ct, cl = _coefs(P, dtype, "cpu")
    rule, log_a = _mine_rule(P, dtype), -4.6
    on = [None if x is None else x.to(device) for x in (ct, cl, rule, *inputs)]
    got = torch.ops.mmim_ext.pair_stats_fwd_bwd_mine(*on[:3], log_a, *on[3:])
    t, lme = torch.ops.mmim_ext.pair_stats_fwd(h, wa, wb, b, v, c, perms, pairs)
    ratio = (lme + rule[:, 1] - torch.logaddexp(rule[:, 0], lme + log_a)).exp()
    want = torch.ops.mmim_ext.pair_stats_fwd_bwd(ct, cl * ratio, h, wa, wb, b, v, c, perms, pairs)
    tol = TOL[dtype]
    for x, y in zip(got, want):
        assert torch.allclose(x.cpu(), y, **tol), (x, y)
    assert not torch.allclose(ratio, torch.ones_like(ratio))


@requires_fused
@pytest.mark.parametrize("device", DEVICES)
def test_mine_rule_opcheck_and_bad_rule(device):
    h, wa, wb, b, v, c, perms, _ = make_inputs(6, 4, 3, 2, shared=False, device=device)
    ct, cl = _coefs(6, torch.float64, device)
    rule = _mine_rule(6, torch.float64).to(device)
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            torch.ops.mmim_ext.pair_stats_fwd_bwd_mine.default,
            (ct, cl, rule, -2.3, h, wa, wb, b, v, c, perms, None, *need),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
        )
    with pytest.raises(RuntimeError, match="'ema' must be a \\[P, 2\\] tensor"):
        torch.ops.mmim_ext.pair_stats_fwd_bwd_mine(ct, cl, rule[:-1], -2.3, h, wa, wb, b, v, c, perms, None)
    with pytest.raises(RuntimeError, match="'log_a' must be finite and <= 0"):
        torch.ops.mmim_ext.pair_stats_fwd_bwd_mine(ct, cl, rule, 0.5, h, wa, wb, b, v, c, perms, None)
