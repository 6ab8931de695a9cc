"""CUDA kernels of pair_stats: parity, gradients, torch.library checks, streams, graphs, half precision.

Every test here needs a GPU and a build with the CUDA kernels (``FORCE_CUDA=1``) and skips
cleanly otherwise. The device-parametrized tests of ``test_pair_stats.py`` and
``test_op_contract.py`` cover the CUDA case of the generic parity, gradcheck, opcheck, aliasing,
direct-call validation and strided-input tests; this file adds what is specific to the GPU
kernels: tile and chunk boundaries of their launch configuration, bitwise determinism (no
atomics), a non-default stream, CUDA graph capture, torch.compile on CUDA, all R permutation rows
in one call, and float16/bfloat16 against a float64 reference.

Tolerance rule for float16/bfloat16 (``eps`` = ``torch.finfo(dtype).eps``): the kernels read the
half inputs exactly (upcast), accumulate in float32, weight the backward's shuffled samples with
the float32 ``lme`` (not the one rounded to the input dtype), and round each output once. Against
the float64 reference on the same half-rounded inputs (and half-rounded upstream gradients),
per element:

* ``|fused - ref| <= eps/2 * |ref| + tol * max|ref|``: one rounding to the output dtype (at most
  half an ulp, ``eps/2`` relative) plus float32 arithmetic in another order, ``tol = 1e-4`` for
  the statistics and ``1e-3`` for the gradients (sums of terms of mixed sign).

At the largest element that is at most 0.15% (float16) or 0.5% (bfloat16) of the value, so a 1%
error fails the test (each test asserts this of its own bound). The case ``c + 40`` puts
``|lme|`` near 40, where rounding ``lme`` to bfloat16 before weighting would be off by up to 13%.
"""

import pytest
import torch

import mmim_ext

from conftest import make_inputs

_HAVE_CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.skipif(not _HAVE_CUDA, reason="no CUDA device"),
    pytest.mark.skipif(_HAVE_CUDA and not mmim_ext.fused_available("cuda"),
                       reason="mmim_ext was built without CUDA kernels (build with FORCE_CUDA=1)"),
]

GRADS = ("h", "wa", "wb", "b", "v", "c")
# GPU float32 uses the hardware exp (--use_fast_math); float64 is IEEE throughout.
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4)}

# (B, m, K, R): B around the kernels' sample tiles (64, 128, 256 samples per warp), odd R
# (source chunks of 2), K = 1 and K not a power of two.
SHAPES = [
    (2, 2, 1, 1),
    (31, 5, 3, 2),
    (65, 7, 16, 3),
    (130, 6, 5, 1),
    (257, 4, 33, 2),
    (300, 9, 16, 5),
]


def _grads_of(inputs, backend, seed=1):
    """Forward and the gradients of a random linear function of both outputs."""
    h, wa, wb, b, v, c, perms, pairs = inputs
    diff = [t.detach().clone().requires_grad_(True) for t in (h, wa, wb, b, v, c)]
    t, l = mmim_ext.pair_stats(*diff, perms, pairs, backend=backend)
    g = torch.Generator().manual_seed(seed)
    gt = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t)
    gl = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t)
    grads = torch.autograd.grad((t * gt).sum() + (l * gl).sum(), diff)
    return t.detach(), l.detach(), grads


def _to(inputs, device=None, dtype=None):
    out = []
    for k, t in enumerate(inputs):
        if t is None:
            out.append(None)
        elif k < 6:
            out.append(t.detach().to(device=device or t.device, dtype=dtype or t.dtype))
        else:
            out.append(t.to(device=device or t.device))
    return tuple(out)


def _assert_close_scaled(a, b, tol, what):
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    torch.testing.assert_close(a / scale, b / scale, **tol, msg=lambda s: f"{what}: {s}")


# ---------------------------------------------------------------------------------------------
# Parity.


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("B,m,K,R", SHAPES)
def test_cuda_matches_float64_reference(B, m, K, R, shared, dtype):
    inputs = make_inputs(B, m, K, R, shared=shared, dtype=dtype, device="cuda", seed=B + 7 * m)
    tf, lf, gf = _grads_of(inputs, "fused")
    ref = _to(inputs, device="cpu", dtype=torch.float64)
    tr, lr, gr = _grads_of(ref, "reference")
    torch.testing.assert_close(tf.cpu().double(), tr, **TOL[dtype])
    torch.testing.assert_close(lf.cpu().double(), lr, **TOL[dtype])
    for name, a, b in zip(GRADS, gf, gr):
        assert a.dtype == dtype and a.device.type == "cuda"
        _assert_close_scaled(a.cpu().double(), b, TOL[dtype], f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [True, False])
def test_cuda_explicit_pairs(shared, dtype):
    m = 11
    g = torch.Generator().manual_seed(5)
    pairs = torch.randint(0, m, (70, 2), generator=g)  # any order, i > j, i == j, duplicates
    pairs[0] = torch.tensor([7, 2])
    pairs[1] = torch.tensor([4, 4])
    pairs[2] = pairs[3] = torch.tensor([1, 9])
    inputs = make_inputs(77, m, 6, 3, shared=shared, dtype=dtype, device="cuda", pairs=pairs, seed=2)
    tf, lf, gf = _grads_of(inputs, "fused")
    tr, lr, gr = _grads_of(_to(inputs, device="cpu", dtype=torch.float64), "reference")
    torch.testing.assert_close(tf.cpu().double(), tr, **TOL[dtype])
    torch.testing.assert_close(lf.cpu().double(), lr, **TOL[dtype])
    for name, a, b in zip(GRADS, gf, gr):
        _assert_close_scaled(a.cpu().double(), b, TOL[dtype], f"grad {name}")


@pytest.mark.parametrize("shared", [True, False])
def test_cuda_matches_cpu_kernel(shared):
    """Same shared per-element math on both devices: float64 results agree to rounding."""
    if not mmim_ext.fused_available("cpu"):
        pytest.skip("no CPU kernel")
    inputs = make_inputs(45, 10, 7, 2, shared=shared, dtype=torch.float64, device="cuda", seed=4)
    tg, lg, gg = _grads_of(inputs, "fused")
    tc, lc, gc = _grads_of(_to(inputs, device="cpu"), "fused")
    torch.testing.assert_close(tg.cpu(), tc, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(lg.cpu(), lc, rtol=1e-11, atol=1e-11)
    for name, a, b in zip(GRADS, gg, gc):
        _assert_close_scaled(a.cpu(), b, dict(rtol=1e-10, atol=1e-10), f"grad {name}")


def test_cuda_large_logits_finite():
    inputs = make_inputs(96, 6, 8, 2, shared=False, dtype=torch.float32, device="cuda", scale=300.0, seed=8)
    tf, lf, gf = _grads_of(inputs, "fused")
    tr, lr, _ = _grads_of(_to(inputs, device="cpu", dtype=torch.float64), "reference")
    assert torch.isfinite(lf).all() and all(torch.isfinite(x).all() for x in gf)
    # Scores reach thousands; float32 rounding is relative to them, not to a mean near zero.
    _assert_close_scaled(lf.cpu().double(), lr, TOL[torch.float32], "lme")
    _assert_close_scaled(tf.cpu().double(), tr, TOL[torch.float32], "t_joint")


def test_cuda_moderate_size_float32():
    """A size where every kernel runs many blocks: B=256 (the issue's batch), K=16."""
    inputs = make_inputs(256, 40, 16, 2, shared=False, dtype=torch.float32, device="cuda", seed=12)
    tf, lf, gf = _grads_of(inputs, "fused")
    tr, lr, gr = _grads_of(_to(inputs, dtype=torch.float64), "reference")
    torch.testing.assert_close(tf.double(), tr, **TOL[torch.float32])
    torch.testing.assert_close(lf.double(), lr, **TOL[torch.float32])
    for name, a, b in zip(GRADS, gf, gr):
        _assert_close_scaled(a.double(), b, TOL[torch.float32], f"grad {name}")


# ---------------------------------------------------------------------------------------------
# Gradients and torch.library.


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_cuda_gradcheck(shared, seed):
    h, wa, wb, b, v, c, perms, _ = make_inputs(7, 5, 3, 2, shared=shared, seed=seed, device="cuda",
                                               requires_grad=True)

    def f(h, wa, wb, b, v, c):
        return mmim_ext.pair_stats(h, wa, wb, b, v, c, perms, backend="fused")

    assert torch.autograd.gradcheck(f, (h, wa, wb, b, v, c), eps=1e-6, atol=1e-7)


def test_cuda_gradcheck_explicit_pairs():
    pairs = torch.tensor([[2, 0], [1, 1], [0, 3], [3, 2], [0, 3]])
    h, wa, wb, b, v, c, perms, pairs = make_inputs(6, 4, 2, 3, shared=False, pairs=pairs, device="cuda",
                                                   requires_grad=True, seed=9)

    def f(h, wa, wb, b, v, c):
        return mmim_ext.pair_stats(h, wa, wb, b, v, c, perms, pairs, backend="fused")

    assert torch.autograd.gradcheck(f, (h, wa, wb, b, v, c), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("shared", [True, False])
def test_cuda_bitwise_deterministic(shared):
    """No atomics: two runs give identical bits, including a shared critic's reduced gradients."""
    inputs = make_inputs(200, 23, 9, 3, shared=shared, dtype=torch.float32, device="cuda", seed=21)
    a = _grads_of(inputs, "fused")
    b = _grads_of(inputs, "fused")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


@pytest.mark.parametrize("shared", [True, False])
def test_cuda_opcheck(shared):
    """torch.library's checks of every op on CUDA; a shared critic and m = 2 (P = 1) are the
    cases where gradients are easiest to hand out as views of one buffer."""
    for m in (2, 5):
        h, wa, wb, b, v, c, perms, _ = make_inputs(33, m, 3, 2, shared=shared, device="cuda", seed=m,
                                                   requires_grad=True)
        torch.library.opcheck(torch.ops.mmim_ext.pair_stats_fwd.default, (h, wa, wb, b, v, c, perms, None))
        args = [x.detach() for x in (h, wa, wb, b, v, c)]
        t, l = torch.ops.mmim_ext.pair_stats_fwd(*args, perms, None)
        gt, gl = torch.randn_like(t), torch.randn_like(l)
        ema = torch.stack([torch.full_like(l, 0.2), torch.zeros_like(l)], 1)
        utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
        for need in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(torch.ops.mmim_ext.pair_stats_bwd.default,
                                  (gt, gl, *args, perms, None, l, *need), test_utils=utils)
            torch.library.opcheck(torch.ops.mmim_ext.pair_stats_fwd_bwd.default,
                                  (gt, gl, *args, perms, None, *need), test_utils=utils)
            torch.library.opcheck(torch.ops.mmim_ext.pair_stats_fwd_bwd_mine.default,
                                  (gt, gl, ema, -2.0, *args, perms, None, *need), test_utils=utils)


def test_cuda_torch_compile_fullgraph():
    inputs = make_inputs(70, 6, 4, 2, shared=False, dtype=torch.float32, device="cuda", requires_grad=True, seed=13)

    def dv_bound(h, wa, wb, b, v, c, perms):
        t, l = mmim_ext.pair_stats(torch.tanh(h), wa, wb, b, v, c, perms)
        return (t - l).sum()

    compiled = torch.compile(dv_bound, fullgraph=True)
    out = compiled(*inputs[:7])
    grads = torch.autograd.grad(out, inputs[:6])
    ref = dv_bound(*inputs[:7])
    ref_grads = torch.autograd.grad(ref, inputs[:6])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, a, b_ in zip(GRADS, grads, ref_grads):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5, msg=name)


def test_cuda_all_permutation_rows_in_one_call(monkeypatch):
    """The CPU path splits R into groups to bound its scratch; on CUDA one call takes all rows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mmim_ext.ops import critic_stats as ops

    class CountFwd(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.mmim_ext.pair_stats_fwd.default:
                CountFwd.calls += 1
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(ops, "FUSED_SCRATCH_BYTES", 1)  # the CPU path would take one row per call
    inputs = make_inputs(40, 6, 4, 5, shared=False, dtype=torch.float32, device="cuda", seed=3)
    with CountFwd():
        t, l = mmim_ext.pair_stats(*inputs, backend="fused")
    assert CountFwd.calls == 1
    t1, l1 = torch.ops.mmim_ext.pair_stats_fwd(*inputs)
    assert torch.equal(t, t1) and torch.equal(l, l1)


# ---------------------------------------------------------------------------------------------
# Streams, graphs, devices.


def test_cuda_non_default_stream():
    inputs = make_inputs(100, 12, 8, 2, shared=False, dtype=torch.float32, device="cuda", seed=6)
    expect = _grads_of(inputs, "fused")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = _grads_of(inputs, "fused")
    side.synchronize()
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
    assert all(torch.equal(x, y) for x, y in zip(got[2], expect[2]))


@pytest.mark.parametrize("explicit", [False, True])
def test_cuda_graph_capture(explicit):
    """Forward and backward ops capture into a CUDA graph (no host synchronization) and replay
    with new data in the captured buffers."""
    m = 10
    pairs = torch.tensor([[0, 9], [3, 1], [4, 4], [2, 7]]) if explicit else None
    static = make_inputs(64, m, 5, 2, shared=False, dtype=torch.float32, device="cuda", pairs=pairs, seed=1)
    h, wa, wb, b, v, c, perms, pr = static
    P = h.shape[1] * (h.shape[1] - 1) // 2 if pr is None else pr.shape[0]
    gt = torch.randn(P, device="cuda")
    gl = torch.randn(P, device="cuda")

    def step():
        t, l = torch.ops.mmim_ext.pair_stats_fwd(h, wa, wb, b, v, c, perms, pr)
        grads = torch.ops.mmim_ext.pair_stats_bwd(gt, gl, h, wa, wb, b, v, c, perms, pr, l)
        return t, l, grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture (allocator, lazy init)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    fresh = make_inputs(64, m, 5, 2, shared=False, dtype=torch.float32, device="cuda", pairs=pairs, seed=2)
    for dst, src in zip((h, wa, wb, b, v, c, perms), fresh[:7]):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    t_e, l_e = torch.ops.mmim_ext.pair_stats_fwd(*fresh)
    g_e = torch.ops.mmim_ext.pair_stats_bwd(gt, gl, *fresh[:8], l_e)
    assert torch.equal(out[0], t_e) and torch.equal(out[1], l_e)
    assert all(torch.equal(x, y) for x, y in zip(out[2], g_e))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_second_device_guard():
    inputs = make_inputs(50, 6, 4, 2, shared=True, dtype=torch.float64, device="cuda:1", seed=3)
    with torch.cuda.device(0):
        t, l, grads = _grads_of(inputs, "fused")
    assert t.device == torch.device("cuda:1") and all(g.device == torch.device("cuda:1") for g in grads)
    tr, lr, _ = _grads_of(_to(inputs, device="cpu"), "reference")
    torch.testing.assert_close(t.cpu(), tr, **TOL[torch.float64])
    torch.testing.assert_close(l.cpu(), lr, **TOL[torch.float64])


# ---------------------------------------------------------------------------------------------
# float16 / bfloat16: float32 accumulation, outputs in the input dtype.


def _assert_within(got, ref, eps, tol, what):
    """|got - ref| <= eps/2 |ref| + tol max|ref| elementwise, and that bound would catch a 1% error."""
    scale = max(ref.abs().max().item(), 1e-30)
    bound = 0.5 * eps * ref.abs() + tol * scale
    err = (got.double() - ref).abs()
    worst = int((err - bound).argmax())
    assert (err <= bound).all(), (f"{what}: error {err.flatten()[worst].item():.3g} > bound "
                                  f"{bound.flatten()[worst].item():.3g} at |ref| = {ref.abs().flatten()[worst].item():.3g}")
    big = int(ref.abs().argmax())
    assert 0.01 * scale > bound.flatten()[big].item(), f"{what}: the bound would not catch a 1% error"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("c_shift", [0.0, 40.0])
def test_cuda_half_precision_against_float64(dtype, shared, c_shift):
    h, wa, wb, b, v, c, perms, _ = make_inputs(160, 9, 12, 2, shared=shared, seed=17)
    c = c + c_shift
    half = [t.to("cuda", dtype) for t in (h, wa, wb, b, v, c)]
    P = 9 * 8 // 2
    g = torch.Generator().manual_seed(1)
    gt, gl = (torch.randn(P, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))

    diff = [t.clone().requires_grad_(True) for t in half]
    tf, lf = mmim_ext.pair_stats(*diff, perms.cuda(), backend="fused")
    gf = torch.autograd.grad((tf * gt.cuda()).sum() + (lf * gl.cuda()).sum(), diff)
    assert tf.dtype == dtype and lf.dtype == dtype and all(x.dtype == dtype for x in gf)

    # The same half-rounded inputs and upstream gradients, upcast exactly, through the float64 reference.
    ref_in = [t.detach().cpu().double().requires_grad_(True) for t in half]
    tr, lr = mmim_ext.pair_stats(*ref_in, perms, backend="reference")
    gr = torch.autograd.grad((tr * gt.double()).sum() + (lr * gl.double()).sum(), ref_in)
    if c_shift:
        assert lr.abs().min().item() > 20  # the regime where a rounded lme would show
    eps = torch.finfo(dtype).eps
    _assert_within(tf.cpu(), tr.detach(), eps, 1e-4, "t_joint")
    _assert_within(lf.cpu(), lr.detach(), eps, 1e-4, "lme")
    for name, a, r in zip(GRADS, gf, gr):
        _assert_within(a.cpu(), r, eps, 1e-3, f"grad {name}")


def test_cuda_half_backward_uses_unrounded_lme():
    """The op's backward, given the forward's rounded lme, equals the one given the float32 lme
    the forward formed before rounding (for which the float32 op stands in: same kernels, same
    float32 arithmetic on the same upcast values)."""
    h, wa, wb, b, v, c, perms, _ = make_inputs(96, 7, 6, 3, shared=False, seed=23)
    c = c + 40.0
    half = [t.to("cuda", torch.bfloat16) for t in (h, wa, wb, b, v, c)]
    f32 = [t.float() for t in half]
    perms = perms.cuda()
    P = 21
    gt = torch.randn(P, device="cuda").to(torch.bfloat16)
    gl = torch.randn(P, device="cuda").to(torch.bfloat16)
    _, l16 = torch.ops.mmim_ext.pair_stats_fwd(*half, perms, None)
    _, l32 = torch.ops.mmim_ext.pair_stats_fwd(*f32, perms, None)
    assert torch.equal(l16, l32.to(torch.bfloat16))
    assert not torch.equal(l16.float(), l32)  # the rounding the backward must not inherit
    got = torch.ops.mmim_ext.pair_stats_bwd(gt, gl, *half, perms, None, l16)
    want = torch.ops.mmim_ext.pair_stats_bwd(gt.float(), gl.float(), *f32, perms, None, l32)
    for name, x, y in zip(GRADS, got, want):
        assert torch.equal(x, y.to(torch.bfloat16)), f"grad {name}"


# ---------------------------------------------------------------------------------------------
# kde_lse on CUDA (csrc/cuda/kde_kernel.cu).


def _kde_ops():
    kde_ops = pytest.importorskip("mmim_ext.ops.kde")
    if not kde_ops.kde_fused_available("cuda"):
        pytest.skip("mmim_ext was built without the CUDA kde_lse kernel")
    return kde_ops


def _kde_inputs(N, M, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=torch.float64)
    y = torch.randn(M, d, generator=g, dtype=torch.float64)
    return x.to("cuda", dtype), y.to("cuda", dtype)


# (N, M, d): around the 128-thread blocks, 32 x 32 shared tiles and the 256-column splits.
KDE_SHAPES = [(1, 1, 1), (5, 33, 3), (130, 70, 31), (200, 300, 33), (129, 600, 64), (64, 2000, 5)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N,M,d", KDE_SHAPES)
def test_cuda_kde_matches_reference(N, M, d, dtype):
    kde_ops = _kde_ops()
    x, y = _kde_inputs(N, M, d, dtype, seed=N + M + d)
    scale = 0.5 / d
    xf, yf = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    out = kde_ops.kde_lse(xf, yf, scale, backend="fused")
    g = torch.randn(N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gx, gy = torch.autograd.grad((out * g.to(out)).sum(), (xf, yf))
    xr, yr = x.double().cpu().requires_grad_(True), y.double().cpu().requires_grad_(True)
    ref = kde_ops.kde_lse_reference(xr, yr, scale)
    gxr, gyr = torch.autograd.grad((ref * g).sum(), (xr, yr))
    torch.testing.assert_close(out.double().cpu(), ref.detach(), **TOL[dtype])
    _assert_close_scaled(gx.double().cpu(), gxr, TOL[dtype], "grad x")
    _assert_close_scaled(gy.double().cpu(), gyr, TOL[dtype], "grad y")


def test_cuda_kde_gradcheck_and_self_distances():
    kde_ops = _kde_ops()
    x, y = _kde_inputs(6, 5, 3, torch.float64, seed=3)
    x.requires_grad_(True)
    y.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: kde_ops.kde_lse(a, b, 0.7, backend="fused"), (x, y))
    # y = x (the KDE bound's case): the diagonal gives exp(0) = 1 in every row.
    out = kde_ops.kde_lse(x.detach(), x.detach(), 3.0, backend="fused")
    ref = kde_ops.kde_lse_reference(x.detach().cpu(), x.detach().cpu(), 3.0)
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float64])


def test_cuda_kde_opcheck_and_determinism():
    kde_ops = _kde_ops()
    x, y = _kde_inputs(40, 300, 7, torch.float32, seed=5)
    torch.library.opcheck(torch.ops.mmim_ext.kde_lse.default, (x.requires_grad_(True), y.requires_grad_(True), 0.2))
    x, y = x.detach(), y.detach()
    out = torch.ops.mmim_ext.kde_lse(x, y, 0.2)
    g = torch.randn_like(out)
    a = torch.ops.mmim_ext.kde_lse_bwd(g, x, y, 0.2, out)
    b = torch.ops.mmim_ext.kde_lse_bwd(g, x, y, 0.2, out)
    assert torch.equal(out, torch.ops.mmim_ext.kde_lse(x, y, 0.2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
