"""Property-based tests (hypothesis) of pair_stats, pair_stats_linear and kde_lse over their
documented input space, each against an independent float64 definition.

What is drawn
    pair_stats / pair_stats_linear: B, m, K, R, P small (B up to 257, past the CPU kernel's
    256-sample chunk); float32 and float64 (CUDA: also float16 / bfloat16); a shared critic
    (``[K]``, ``[]``) or one per pair (``[P, K]``, ``[P]``); ``pairs=None`` or explicit pairs in
    any order with ``i > j`` and duplicates (``i == j`` in the ``diagonal`` tests); every tensor
    (h, each critic parameter, perms, pairs, the coefficients) contiguous, transposed, sliced with
    a step, at a storage offset or expanded (stride 0), the gaps of the strided ones filled with
    NaN (or an out-of-range index) so that a kernel reading outside the view fails; zero,
    subnormal, tiny and huge critic weights (the threshold form's fallbacks); large logits; R
    split into groups of rows (``mmim_ext.ops.critic_stats.FUSED_SCRATCH_BYTES`` shrunk); 1 or 2 intra-op threads;
    any subset of the inputs requiring gradients; P = 0 in its own test. kde_lse: N (0 in its
    own test), M, d (0 included), scale (0 included), points far apart, ``y`` the same tensor as
    ``x``, the same layouts.

The oracle
    ``_definition`` and ``_kde_definition`` materialize every critic (kernel) evaluation at once
    in float64 from the inputs as given (float32 inputs upcast exactly), and their gradients come
    from autograd on them. The fused kernel and the library's own reference
    (``mmim_ext.pair_stats_reference``, with a drawn scratch budget so that its chunking and
    checkpointing run too) are both checked against it.

Tolerances
    float64: ``1e-11 * (1 + S)`` per output, where ``S`` bounds the size of the critic's terms
    (``|c| + sum_k |v_k| (|wa_k a| + |wb_k b| + |b_k|)``, largest over the pair's evaluations):
    rounding is relative to the terms, not to their (possibly cancelling) sum. float32:
    ``2e-5 * (1 + S)`` (CUDA 1e-4: its exp is the hardware one), as the other tests allow.
    Gradients per tensor, relative to ``max(1, max|ref|)``: the same, plus
    ``(K + 4) * eps * S``: the weights ``exp(T - lme)`` carry the relative error of ``T``.
    Cases where some critic unit's input ``wa a + wb b + bias`` lies within rounding of the ReLU's
    kink are rejected (``_gates_decided``): there the derivative depends on the last bit of a
    sum, and two correct implementations differ.

Tests named ``*_diagonal_*``, ``*_nonfinite_*``, ``*_thread_count*`` and ``*_empty_*`` check
contracts that the code of December 2026 breaks (the h gradient of a pair ``(i, i)`` with one row
of perms per call; NaN in wa/wb/b swallowed, and b = -inf giving a NaN gradient w.r.t. v; results
that change with the thread count; the references' outputs for P = 0 / N = 0 detached from the
graph); they are expected to pass with the fixes that come with them.

Every CPU build: this process runs the build the CPU dispatch picks; ``test_in_cpu_build`` runs
the kernel tests of this file once per other build (``MMIM_EXT_CPU_CAPABILITY=scalar|base|avx2``,
one pytest subprocess per build, results read from its JUnit XML) and reports each test per build.

Running
    CI profile (default, derandomized; about 425 examples: 297 in this process and 64 in each
    of the two per-build subprocesses):
        python -m pytest tests/test_properties.py
    Long run (10x the examples, about 4,250; random, failures kept in .hypothesis/ for replay):
        HYPOTHESIS_PROFILE=slow python -m pytest tests/test_properties.py
        (or: python -m pytest tests/test_properties.py --hypothesis-profile=slow)
    Add ``--hypothesis-show-statistics`` for the example counts. The profiles are registered in
    tests/conftest.py; a test's count is a multiple of the profile's ``max_examples``.
    GPU: ``python -m pytest tests/test_properties.py -k cuda`` (skipped without a CUDA device).
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch
from hypothesis import assume, event, given, note, settings
from hypothesis import strategies as st

import mmim_ext
from mmim_ext.ops import critic_stats as ops_mod
from mmim_ext.ops.kde import kde_fused_available, kde_lse, kde_lse_reference

from conftest import DEVICES

NAMES = ("h", "wa", "wb", "b", "v", "c")
FUSED_CPU = mmim_ext.fused_available("cpu")
KDE_FUSED_CPU = kde_fused_available("cpu")
_CHILD_ENV = "MMIM_EXT_PROPERTIES_CHILD"  # set in the per-build subprocesses


def _n(weight: float) -> int:
    """Examples for a test: `weight` times the profile's max_examples (ci 6, slow 60), a third of
    that in the per-build subprocesses (they repeat the kernel tests for the other builds)."""
    if os.environ.get(_CHILD_ENV):
        weight /= 3
    return max(1, round(weight * settings.default.max_examples))


def _fused_available(device: str, kde: bool = False) -> bool:
    return kde_fused_available(device) if kde else mmim_ext.fused_available(device)


def _dtypes(device: str):
    if device == "cuda":
        return (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    return (torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# Layouts: a leaf tensor and the view of it that the op receives.

_LAYOUTS = {
    0: ("contig", "offset"),
    1: ("contig", "step", "offset", "expand0"),
    2: ("contig", "transposed", "step", "step_t", "offset", "expand0", "expand1"),
}


def _leaf_values_shape(shape, kind):
    """The shape of the values behind a view: size 1 in the dimension an expand broadcasts."""
    if kind == "expand0":
        return (1,) + tuple(shape[1:])
    if kind == "expand1":
        return (shape[0], 1)
    return tuple(shape)


def _arrange(val, kind, shape, filler):
    """(leaf, view_fn): `leaf` stores `val`, `view_fn(leaf)` is the view of layout `kind` with
    shape `shape` (for the expand kinds `val` has size 1 in the broadcast dimension). Entries of
    the leaf outside the view hold `filler`."""
    shape = tuple(shape)
    if kind == "contig":
        return val.clone(), lambda t: t
    if kind == "offset":  # contiguous, at a storage offset of 3
        leaf = torch.full((val.numel() + 3,), filler, dtype=val.dtype)
        leaf[3:] = val.flatten()
        return leaf, lambda t: t[3:].view(shape)
    if kind == "transposed":  # column-major
        return val.t().contiguous(), lambda t: t.t()
    if kind == "step":  # every other element of the last dimension
        leaf = torch.full(shape[:-1] + (2 * shape[-1],), filler, dtype=val.dtype)
        leaf[..., ::2] = val
        return leaf, lambda t: t[..., ::2]
    if kind == "step_t":  # transposed and every other row, at an offset: no unit stride at all
        n0, n1 = shape
        leaf = torch.full((n1, 2 * n0 + 1), filler, dtype=val.dtype)
        leaf[:, 1::2] = val.t()
        return leaf, lambda t: t[:, 1::2].t()
    if kind in ("expand0", "expand1"):
        return val.clone(), lambda t: t.expand(shape)
    raise AssertionError(kind)


class _Operand:
    """One argument: its leaf values (float64 or int64, CPU) and its layout."""

    def __init__(self, val, kind, shape, filler):
        self.kind = kind
        self.leaf, self.view_fn = _arrange(val, kind, shape, filler)

    def make(self, dtype=None, device="cpu", requires_grad=False, exact=False):
        """(leaf, view) in `dtype` on `device`; the leaf requires grad when asked. exact: a float64
        CPU leaf holding the values rounded to `dtype` (the definition's input)."""
        leaf = self.leaf
        if leaf.is_floating_point():
            leaf = leaf.to(dtype).double() if exact else leaf.to(dtype)
        leaf = leaf.to("cpu" if exact else device).requires_grad_(requires_grad and leaf.is_floating_point())
        return leaf, self.view_fn(leaf)

    def pullback(self, vec):
        """J^T vec for the view's Jacobian J: where a gradient of the view lands on the leaf."""
        leaf = torch.zeros(self.leaf.shape, dtype=torch.float64, requires_grad=True)
        (out,) = torch.autograd.grad((self.view_fn(leaf) * vec).sum(), leaf)
        return out


def _draw_kind(draw, ndim, exclude=()):
    return draw(st.sampled_from([k for k in _LAYOUTS[ndim] if k not in exclude]))


# ---------------------------------------------------------------------------------------------
# pair_stats: the definition, in float64, by direct materialization.


def _definition(h, wa, wb, b, v, c, perms, pairs):
    """(t_joint, lme, size): every critic evaluation at once, ``[P, 1 + R, B, K]``, float64.

    Row 0 of the second axis is the joint sample ``(h[n, i], h[n, j])``, rows 1..R the shuffled
    ``(h[n, i], h[perms[r, n], j])``. ``size[p]`` bounds the magnitude of the terms of pair p's
    critic over its evaluations (the scale of its rounding errors).
    """
    B, m = h.shape
    if pairs is None:
        pairs = torch.tensor([(i, j) for i in range(m) for j in range(i + 1, m)], dtype=torch.long).view(-1, 2)
    P, K = pairs.shape[0], wa.shape[-1]
    i, j = pairs[:, 0], pairs[:, 1]
    if wa.dim() == 1:
        wa, wb, b, v, c = tuple(t.expand(P, K) for t in (wa, wb, b, v)) + (c.expand(P),)
    first = h[:, i].t()[:, None, :, None]  # [P, 1, B, 1]
    seconds = [h[:, j]] + [h[perms[r]][:, j] for r in range(perms.shape[0])]
    second = torch.stack(seconds).permute(2, 0, 1)[..., None]  # [P, 1 + R, B, 1]
    w = lambda t: t[:, None, None, :]  # noqa: E731  [P, 1, 1, K]
    scores = (w(v) * torch.relu(w(wa) * first + w(wb) * second + w(b))).sum(-1) + c[:, None, None]
    t_joint = scores[:, 0].mean(-1)
    shuffled = scores[:, 1:].reshape(P, perms.shape[0] * B)
    lme = torch.logsumexp(shuffled, -1) - math.log(shuffled.shape[1])
    with torch.no_grad():
        a = lambda t: t.detach().abs().nan_to_num(0.0, 0.0, 0.0)  # noqa: E731
        terms = (w(a(v)) * (w(a(wa)) * a(first) + w(a(wb)) * a(second) + w(a(b)))).sum(-1) + a(c)[:, None, None]
        size = terms.flatten(1).amax(1) if terms.numel() else terms.new_zeros(P)
    return t_joint, lme, size


def _gates_decided(h, wa, wb, b, perms, pairs, dtype):
    """False when some critic unit's input x = wa a + wb b' + bias, over all evaluations, is within
    rounding of the ReLU's kink (or of underflow) without being exactly 0 from zero terms."""
    B, m = h.shape
    if pairs is None:
        pairs = torch.tensor([(i, j) for i in range(m) for j in range(i + 1, m)], dtype=torch.long).view(-1, 2)
    P, K = pairs.shape[0], wa.shape[-1]
    if P == 0:
        return True
    if wa.dim() == 1:
        wa, wb, b = (t.expand(P, K) for t in (wa, wb, b))
    first = h[:, pairs[:, 0]].t()[:, None, :, None]
    second = torch.cat([h[:, pairs[:, 1]][None], h[perms][:, :, pairs[:, 1]]]).permute(2, 0, 1)[..., None]
    w = lambda t: t[:, None, None, :]  # noqa: E731
    ta, tb, tc = w(wa) * first, w(wb) * second, w(b).expand(P, 1, 1, K)
    x = ta + tb + tc
    mag = ta.abs() + tb.abs() + tc.abs()
    fin = torch.finfo(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    rel = 2e-6 if fin.bits == 32 else 1e-13  # well above the few roundings of x in the kernel
    floor = 1000 * fin.smallest_normal * fin.eps  # a hundred-odd subnormal steps
    zero_terms = mag == 0
    ok = zero_terms | ((x.abs() > rel * mag) & (x.abs() > floor)) | ~torch.isfinite(x)
    return bool(ok.all())


# ---------------------------------------------------------------------------------------------
# pair_stats: the strategy.

_SPECIALS = {  # dtype: (subnormal, tiny normal, small, big), see conftest.with_edge_gate_units
    torch.float32: (1e-40, 1e-38, 1e-20, 10.0),
    torch.float64: (1e-310, 1e-307, 1e-200, 100.0),
}


def _sprinkle(g, t, choices, p):
    """Replace each entry of `t` by one of `choices` with probability p."""
    if p == 0 or t.numel() == 0:
        return t
    mask = torch.rand(t.shape, generator=g) < p
    pick = torch.tensor(choices, dtype=torch.float64)[torch.randint(len(choices), t.shape, generator=g)]
    return torch.where(mask, pick, t)


class PairCase:
    """A drawn pair_stats / pair_stats_linear input: sizes, values, layouts and how to run it."""

    def describe(self):
        lay = {k: o.kind for k, o in self.ops.items() if o is not None}
        return (f"dtype={self.dtype} B={self.B} m={self.m} K={self.K} R={self.R} P={self.P} shared={self.shared} "
                f"pairs={'None' if self.ops['pairs'] is None else 'explicit'} threads={self.threads} "
                f"rows_per_call={self.rows} ref_scratch={self.ref_scratch} wanted={sorted(self.wanted)} "
                f"layouts={lay} v_scale={self.v_scale} special_p={self.special_p} nonfinite={self.nonfinite}")

    def tensors(self, device="cpu", wanted=(), exact=False):
        """(leaves, views): dicts by argument name; float tensors in the case's dtype (exact: in
        float64 on the CPU, holding the dtype-rounded values)."""
        leaves, views = {}, {}
        for name, op in self.ops.items():
            if op is None:
                leaves[name] = views[name] = None
            else:
                leaves[name], views[name] = op.make(self.dtype, device, name in wanted, exact)
        return leaves, views

    @contextlib.contextmanager
    def environment(self, itemsize):
        """The drawn thread count, and a scratch budget that gives `rows` perms rows per call."""
        threads, budget = torch.get_num_threads(), ops_mod.FUSED_SCRATCH_BYTES
        torch.set_num_threads(self.threads)
        try:
            if self.rows is not None:
                ops_mod.FUSED_SCRATCH_BYTES = (self.rows + 1) * (self.threads + 1) * self.m * self.B * itemsize
                assert ops_mod._rows_per_call(self.B, self.m, self.R, itemsize) == self.rows
            yield
        finally:
            torch.set_num_threads(threads)
            ops_mod.FUSED_SCRATCH_BYTES = budget


@st.composite
def pair_cases(draw, device="cpu", diagonal=False, nonfinite=None, sizes="small", empty=False):
    """A PairCase. empty: explicit pairs, P = 0 (otherwise P >= 1);
    diagonal: explicit pairs, some with i == j (otherwise i != j always);
    nonfinite: "nan" or "inf" written into one critic parameter; sizes="parts": large enough for
    the CPU kernel to split the pairs into more parts at more threads (4 per thread, of at least
    2^16 critic evaluations: pair_parts), compared with itself only."""
    case = PairCase()
    dtype = case.dtype = draw(st.sampled_from(_dtypes(device)))
    half = dtype in (torch.float16, torch.bfloat16)
    if sizes == "parts":
        B = draw(st.sampled_from([64, 257]))
        R = draw(st.integers(1, 3))
        K = draw(st.sampled_from([16, 17]))
    else:
        B = draw(st.one_of(st.integers(2, 20), st.sampled_from([31, 32, 33, 64, 112, 257])))
        # diagonal pairs: mostly R = 1 and groups of one row, the kernel's special cases
        R = draw(st.integers(1, 3 if diagonal else 6))
        K = draw(st.one_of(st.integers(1, 8), st.sampled_from([16, 17, 32])))
    shared = draw(st.booleans())
    explicit = diagonal or empty or draw(st.booleans())
    if explicit:
        m = draw(st.integers(1 if diagonal else 2, 10))
        P = 0 if empty else draw(st.integers(1, 40) if sizes == "small" else st.integers(20, 160))
    else:
        m = draw(st.integers(2, 12) if sizes == "small" else st.integers(8, 18))
        P = m * (m - 1) // 2
    work = P * (1 + R) * B * K
    if sizes == "parts":
        assume(4 * 2**16 <= work <= 600_000)
    else:
        assume(work <= 200_000)
    case.B, case.m, case.K, case.R, case.P, case.shared = B, m, K, R, P, shared
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    case.v_scale = 1.0 if half else draw(st.sampled_from([1.0, 20.0, 300.0 if dtype == torch.float64 else 100.0]))
    case.special_p = 0.0 if half else draw(st.sampled_from([0.0, 0.15, 0.5]))
    h_scale = 1.0 if half else draw(st.sampled_from([1.0, 0.01, 30.0]))
    ops = {}

    def operand(name, shape, make_values, exclude=(), filler=float("nan")):
        kind = _draw_kind(draw, len(shape), exclude)
        ops[name] = _Operand(make_values(_leaf_values_shape(shape, kind)), kind, shape, filler)

    operand("h", (B, m), lambda s: torch.randn(s, generator=g, dtype=torch.float64) * h_scale)
    pshape = (K,) if shared else (P, K)
    sub, tiny, small, big = _SPECIALS.get(dtype, (0.0, 0.0, 0.0, 1.0))
    special = {  # the gate-by-threshold edge cases: -wa/wb and -bias/wb overflowing or huge
        "wa": [0.0, sub, big, -big],
        "wb": [0.0, sub, -sub, tiny, -tiny, small, -small],
        "b": [0.0, big, -big],
        "v": [0.0],
    }
    for name in ("wa", "wb", "b", "v"):
        scale = case.v_scale if name == "v" else 1.0
        operand(name, pshape, lambda s, name=name, scale=scale: _sprinkle(
            g, torch.randn(s, generator=g, dtype=torch.float64) * scale, special[name], case.special_p))
    operand("c", () if shared else (P,), lambda s: torch.randn(s, generator=g, dtype=torch.float64))
    # perms: expand1 would repeat one index along a row (not a permutation)
    operand("perms", (R, B), lambda s: torch.stack([torch.randperm(B, generator=g) for _ in range(s[0])]),
            exclude=("expand1",), filler=2**40)
    if explicit:
        diag_frac = draw(st.sampled_from([0.25, 1.0])) if diagonal else 0.0
        dup = draw(st.booleans())

        def make_pairs(s):
            n = s[0]
            i = torch.randint(m, (n,), generator=g)
            j = (i + torch.randint(1, max(m, 2), (n,), generator=g)) % m  # j != i when m >= 2
            if diagonal:
                diag = torch.rand(n, generator=g) < diag_frac
                if n:
                    diag[torch.randint(n, (1,), generator=g)] = True
                j = torch.where(diag | (m == 1), i, j)
            out = torch.stack([i, j], 1)
            if dup and n >= 2:
                out[-1] = out[0]
            return out

        # pairs: expand1 would make every pair diagonal
        operand("pairs", (P, 2), make_pairs, exclude=("expand1",), filler=2**40)
    else:
        ops["pairs"] = None
    case.nonfinite = None
    if nonfinite is not None:
        target = draw(st.sampled_from(["wa", "wb", "b", "v", "c"]))
        count = draw(st.integers(1, 3))
        values = [float("nan")] if nonfinite == "nan" else [float("inf"), -float("inf")]
        flat = ops[target].leaf.view(-1)
        inside = torch.isfinite(flat).nonzero().view(-1)  # not the NaN filler of a strided view
        if inside.numel():
            for _ in range(count):
                pos = inside[torch.randint(inside.numel(), (1,), generator=g)]
                flat[pos] = values[int(torch.randint(len(values), (1,), generator=g))]
        case.nonfinite = (target, nonfinite, count)
    ct = lambda s: _sprinkle(g, torch.randn(s, generator=g, dtype=torch.float64), [0.0], 0.2)  # noqa: E731
    operand("coef_t", (P,), ct)
    operand("coef_lme", (P,), ct)
    case.ops = ops
    case.threads = draw(st.sampled_from([1, 2]))
    case.rows = draw(st.integers(1, R - 1)) if R > 1 and draw(st.booleans()) else None
    case.ref_scratch = draw(st.sampled_from([None, 1, 4096]))
    case.wanted = set(draw(st.sets(st.sampled_from(NAMES))))
    if diagonal:  # a pair (i, i) adds both of its terms to h's gradient: always asked for here
        case.wanted.add("h")
    case.want_coefs = draw(st.booleans())
    case.grad_seed = seed + 1
    if sizes != "parts":  # (compared with itself only)
        # the ReLU kinks: decided the same way by every correct implementation (module docstring)
        _, v64 = case.tensors(exact=True)
        assume(_gates_decided(v64["h"], v64["wa"], v64["wb"], v64["b"], v64["perms"], v64["pairs"], dtype))
    note(case.describe())
    # what was covered (shown by --hypothesis-show-statistics)
    event(f"dtype {str(dtype)[6:]}, {'shared' if shared else 'per-pair'} critic, "
          f"{'explicit' if explicit else 'all'} pairs")
    event("R split into groups" if case.rows is not None else f"R={R} in one call")
    event("a tensor not contiguous or expanded" if any(o is not None and o.kind not in ("contig", "offset")
                                                      for o in ops.values()) else "all contiguous")
    event(f"special weights p={case.special_p}, v scale {case.v_scale}, threads {case.threads}")
    return case


# ---------------------------------------------------------------------------------------------
# pair_stats: running a case and comparing.


def _rel(dtype, device):
    """Relative tolerance of an output against the float64 definition (module docstring)."""
    if dtype == torch.float64:
        return 1e-11 if device == "cpu" else 1e-9
    if dtype == torch.float32:
        return 2e-5 if device == "cpu" else 1e-4
    return 1e-4 + 2 * torch.finfo(dtype).eps  # half: float32 accumulation, one rounding to dtype


def _grad_rel(dtype, device, K, size_max, lme_max=0.0):
    eps = torch.finfo(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype).eps
    rel = _rel(dtype, device) + (K + 4) * eps * size_max
    if dtype in (torch.float16, torch.bfloat16):  # the weights use the rounded lme (test_cuda.py)
        rel += 4 * torch.finfo(dtype).eps * (1 + lme_max)
    return rel


def _upstream(case, exact=False, device="cpu"):
    """Upstream gradients of (t_joint, lme), ``[P]`` in the case's dtype (exact: the same values
    in float64)."""
    g = torch.Generator().manual_seed(case.grad_seed)
    out = [torch.randn(case.P, generator=g, dtype=torch.float64).to(case.dtype) for _ in range(2)]
    return [x.double() if exact else x.to(device) for x in out]


def _check_values(what, got, ref, bound):
    """Where `ref` is finite: `got` finite and within `bound`; where it is not: `got` not finite."""
    got = got.detach().cpu().double()
    ref = ref.detach().double()
    fin = torch.isfinite(ref)
    bad_nonfinite = fin & ~torch.isfinite(got) | ~fin & torch.isfinite(got)
    assert not bad_nonfinite.any(), (
        f"{what}: finite where the definition is not, or the reverse, at {bad_nonfinite.nonzero().view(-1).tolist()}: "
        f"got {got[bad_nonfinite].tolist()}, definition {ref[bad_nonfinite].tolist()}")
    err = (got - ref).abs()[fin]
    bound = torch.as_tensor(bound, dtype=torch.float64).expand(ref.shape)[fin]
    assert (err <= bound).all(), (
        f"{what}: max error {err.max().item():.3g} (bound {bound[(err - bound).argmax()].item():.3g}); "
        f"got {got.tolist()}, definition {ref.tolist()}")


def _check_grad(what, got, ref, rel, mask=None):
    """A gradient tensor, on the entries of `mask` (all by default): finite, and within
    rel * max(1, max|ref|) of the definition's."""
    got = got.detach().cpu().double()
    if mask is not None:
        got, ref = got[mask], ref[mask]
    assert torch.isfinite(ref).all(), f"{what}: the definition's gradient is not finite"
    assert torch.isfinite(got).all(), f"{what}: not finite at {(~torch.isfinite(got)).nonzero().view(-1).tolist()}"
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = (got - ref).abs()
    assert err.numel() == 0 or err.max().item() <= rel * scale, (
        f"{what}: max error {err.max().item():.3g} > {rel * scale:.3g} (scale {scale:.3g})")


def _critic_nonfinite_pairs(case) -> torch.Tensor:
    """``[P]`` bool: the pairs whose critic (wa, wb, b, v, c) holds a non-finite value; with a
    shared critic every pair or none."""
    _, views = case.tensors(exact=True)
    bad = torch.zeros(case.P, dtype=torch.bool)
    for name in ("wa", "wb", "b", "v", "c"):
        t = views[name].detach()
        nonfin = ~torch.isfinite(t)
        if t.dim() == 0 or (name != "c" and t.dim() == 1):  # shared critic
            bad |= bool(nonfin.any())
        else:
            bad |= nonfin.reshape(case.P, -1).any(1)
    return bad


def _untouched(case, bad_pairs):
    """Per argument, the leaf entries whose gradient depends on no pair in `bad_pairs` (``[P]``
    bool): the other pairs' critic rows, the units outside those pairs, a shared critic only
    when no pair is bad. Their gradients are defined whatever the bad pairs hold."""
    _, views = case.tensors(exact=True)
    pairs = views["pairs"]
    if pairs is None:
        pairs = torch.tensor([(i, j) for i in range(case.m) for j in range(i + 1, case.m)], dtype=torch.long).view(-1, 2)
    bad_units = torch.zeros(case.m, dtype=torch.bool)
    bad_units[pairs[bad_pairs].view(-1)] = True
    masks = {"h": bad_units.expand(case.B, case.m)}
    for name in ("wa", "wb", "b", "v", "c", "coef_t", "coef_lme"):
        shape = views[name].shape
        if len(shape) == 0 or (name not in ("c", "coef_t", "coef_lme") and len(shape) == 1):  # shared critic
            masks[name] = bad_pairs.any().expand(shape)
        else:
            masks[name] = bad_pairs.view(-1, *([1] * (len(shape) - 1))).expand(shape)
    # where a view entry lands on its leaf (an expanded leaf entry serves many)
    return {n: case.ops[n].pullback(masks[n].double()) == 0 for n in masks}


def _definition_run(case, linear):
    """The definition on the case's (dtype-rounded, upcast) inputs: outputs, size and gradients."""
    wanted = set(case.wanted) | ({"coef_t", "coef_lme"} if linear and case.want_coefs else set())
    leaves, views = case.tensors(wanted=wanted, exact=True)
    t, l, size = _definition(*(views[n] for n in NAMES), views["perms"], views["pairs"])
    out = {"t_joint": t.detach(), "lme": l.detach(), "size": size}
    if linear:
        loss = (views["coef_t"] * t).sum() + (views["coef_lme"] * l).sum()
        out["loss"] = loss.detach()
        out["loss_size"] = ((views["coef_t"].detach().abs() + views["coef_lme"].detach().abs()) * (1 + size)).sum()
    else:
        gt, gl = _upstream(case, exact=True)
        loss = (t * gt).sum() + (l * gl).sum()
    req = [n for n in leaves if leaves[n] is not None and leaves[n].requires_grad]
    out["grads"] = dict(zip(req, torch.autograd.grad(loss, [leaves[n] for n in req]))) if req else {}
    return out


def _op_run(case, device, linear, backend=None, ref_scratch=None):
    """pair_stats (or pair_stats_linear) on the case; backend None: pair_stats_reference itself."""
    wanted = set(case.wanted) | ({"coef_t", "coef_lme"} if linear and case.want_coefs else set())
    leaves, views = case.tensors(device, wanted)
    args = [views[n] for n in NAMES] + [views["perms"]]
    out = {}
    with case.environment(views["h"].element_size()):
        if linear:
            loss, t, l = mmim_ext.pair_stats_linear(*args, views["coef_t"], views["coef_lme"], views["pairs"],
                                                    backend=backend)
            out["loss"] = loss.detach()
        else:
            if backend is None:
                kw = {} if ref_scratch is None else {"max_scratch_bytes": ref_scratch}
                t, l = mmim_ext.pair_stats_reference(*args, views["pairs"], **kw)
            else:
                t, l = mmim_ext.pair_stats(*args, views["pairs"], backend=backend)
            gt, gl = _upstream(case, device=device)
            loss = (t * gt).sum() + (l * gl).sum()
        out["t_joint"], out["lme"] = t.detach(), l.detach()
        assert t.dtype == case.dtype and l.dtype == case.dtype and t.shape == (case.P,) and l.shape == (case.P,)
        req = [n for n in leaves if leaves[n] is not None and leaves[n].requires_grad]
        assert not req or loss.requires_grad, f"the outputs are detached from {req}, which require gradients"
        out["grads"] = dict(zip(req, torch.autograd.grad(loss, [leaves[n] for n in req]))) if req else {}
    return out


def _compare(case, got, ref, device, what, linear, nonfinite):
    rel = _rel(case.dtype, device)
    size = ref["size"]
    for key in ("t_joint", "lme"):
        _check_values(f"{what}: {key}", got[key], ref[key], rel * (1 + size))
    if linear:
        _check_values(f"{what}: loss", got["loss"], ref["loss"], rel * (1 + ref["loss_size"]))
    assert set(got["grads"]) == set(ref["grads"])
    size_max = size[torch.isfinite(size)].max().item() if size.numel() else 0.0
    lme_fin = ref["lme"][torch.isfinite(ref["lme"])]
    grel = _grad_rel(case.dtype, device, case.K, size_max, lme_fin.abs().max().item() if lme_fin.numel() else 0.0)
    bad_pairs = ~(torch.isfinite(ref["t_joint"]) & torch.isfinite(ref["lme"]))
    if nonfinite and what == "fused":
        # The fused kernels' contract for a diverged critic: every gradient that a critic with a
        # non-finite parameter feeds is NaN (its rows, a shared critic's whole gradient, its two
        # units' columns of h), even where the definition's limit is finite (b = -inf closes a
        # gate: the definition's derivative there is 0).
        crit_bad = _critic_nonfinite_pairs(case)
        if crit_bad.any():
            fed = _untouched(case, crit_bad)
            for name in ("h", "wa", "wb", "b", "v", "c"):
                if name in got["grads"]:
                    g = got["grads"][name].detach().cpu()
                    assert not torch.isfinite(g[~fed[name]]).any(), (
                        f"{what}: grad {name} is finite where a critic with a non-finite parameter feeds it")
            bad_pairs = bad_pairs | crit_bad
    masks = _untouched(case, bad_pairs) if bad_pairs.any() else {}
    if nonfinite:
        # and where the definition's autograd is finite: an inf weight behind a closed ReLU gate
        # gives it 0 * inf = NaN where the derivative is 0
        masks = {n: masks.get(n, True) & torch.isfinite(g) for n, g in ref["grads"].items()}
    for name, g in ref["grads"].items():
        if name in ("coef_t", "coef_lme"):  # d loss / d coef = the statistic: an output's tolerance
            bound = case.ops[name].pullback(rel * (1 + size.nan_to_num(0.0, 0.0, 0.0)))
            _check_values(f"{what}: grad {name}", got["grads"][name], g, bound)
            continue
        _check_grad(f"{what}: grad {name}", got["grads"][name], g, grel, masks.get(name))


def _check_case(case, device, linear, nonfinite=False):
    ref = _definition_run(case, linear)
    if not nonfinite:
        assert torch.isfinite(ref["t_joint"]).all() and torch.isfinite(ref["lme"]).all()
    if _fused_available(device):
        _compare(case, _op_run(case, device, linear, backend="fused"), ref, device, "fused", linear, nonfinite)
    if device == "cpu":  # the library's reference (CPU: CUDA runs the same PyTorch code)
        if linear:
            got = _op_run(case, device, linear, backend="reference")
        else:
            got = _op_run(case, device, linear, backend=None, ref_scratch=case.ref_scratch)
        _compare(case, got, ref, device, "pair_stats_reference", linear, nonfinite)


# ---------------------------------------------------------------------------------------------
# pair_stats and pair_stats_linear: the properties.


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=_n(10))
@given(data=st.data())
def test_pair_stats_matches_definition(device, data):
    case = data.draw(pair_cases(device))
    _check_case(case, device, linear=False)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=_n(6))
@given(data=st.data())
def test_pair_stats_linear_matches_definition(device, data):
    case = data.draw(pair_cases(device))
    _check_case(case, device, linear=True)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=_n(4))
@given(data=st.data())
def test_pair_stats_diagonal_pairs_match_definition(device, data):
    # pairs (i, i): the critic scores (h[n, i], h[perms[r, n], i]); h's gradient gets both terms
    case = data.draw(pair_cases(device, diagonal=True))
    _check_case(case, device, linear=False)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=_n(3))
@given(data=st.data())
def test_pair_stats_linear_diagonal_pairs_match_definition(device, data):
    case = data.draw(pair_cases(device, diagonal=True))
    _check_case(case, device, linear=True)


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=_n(2))
@given(data=st.data())
def test_pair_stats_nonfinite_critic_params_propagate(device, kind, data):
    # NaN / inf in wa, wb, b, v or c: every statistic the definition makes non-finite is
    # non-finite, the others as usual, and so are the gradients that depend on no such pair
    # (their values are defined whatever that pair holds; see _untouched)
    case = data.draw(pair_cases(device, nonfinite=kind))
    _check_case(case, device, linear=False, nonfinite=True)


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=_n(1.5))
@given(data=st.data())
def test_pair_stats_linear_nonfinite_critic_params_propagate(device, kind, data):
    case = data.draw(pair_cases(device, nonfinite=kind))
    _check_case(case, device, linear=True, nonfinite=True)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=_n(1))
@given(data=st.data())
def test_pair_stats_empty_pair_set_keeps_the_graph(device, data):
    # pairs of shape [0, 2]: empty statistics, still differentiable (zero gradients) w.r.t. the
    # inputs that require them, as on the fused path; pair_stats_reference's early return for
    # P = 0 is detached (December 2026), so loss.backward() raises there
    case = data.draw(pair_cases(device, empty=True))
    case.wanted = data.draw(st.sets(st.sampled_from(NAMES), min_size=1))
    _check_case(case, device, linear=data.draw(st.booleans()))


def _run_all_outputs(case):
    """pair_stats (forward, full backward) and pair_stats_linear (loss, outputs, gradients), fused."""
    case.wanted = set(NAMES)
    case.want_coefs = True
    a = _op_run(case, "cpu", linear=False, backend="fused")
    b = _op_run(case, "cpu", linear=True, backend="fused")
    flat = [a["t_joint"], a["lme"], *a["grads"].values(), b["loss"], b["t_joint"], b["lme"], *b["grads"].values()]
    return flat


@pytest.mark.skipif(not FUSED_CPU, reason="compiled extension not built")
@settings(max_examples=_n(1))
@given(data=st.data())
def test_pair_stats_bitwise_same_for_every_thread_count(data):
    # The pairs are split into parts by thread count (pair_parts); each result must not depend on
    # how many threads ran them.
    case = data.draw(pair_cases("cpu", sizes="parts"))
    case.rows = None
    results = {}
    for threads in (1, 2, 3):
        case.threads = threads
        results[threads] = _run_all_outputs(case)
    for threads in (2, 3):
        for k, (x, y) in enumerate(zip(results[1], results[threads])):
            assert torch.equal(x, y) or (x.isnan() == y.isnan()).all() and torch.equal(x.nan_to_num(), y.nan_to_num()), (
                f"output {k} differs between 1 and {threads} threads: max diff {(x - y).abs().max().item():.3g}")


# ---------------------------------------------------------------------------------------------
# kde_lse


def _kde_definition(x, y, scale):
    """``log sum_l exp(-scale ||x_n - y_l||^2)`` from the full ``[N, M, d]`` differences, and
    the softmax-weighted |score| per row (the scale of the rounding errors)."""
    s = -scale * ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    out = torch.logsumexp(s, 1)
    with torch.no_grad():
        size = (torch.softmax(s, 1) * s.abs()).sum(1) if s.numel() else out.new_zeros(x.shape[0])
    return out, size


@st.composite
def kde_cases(draw, device="cpu", empty=False):
    """A kde_lse input: x [N, d] (N = 0 when empty, else N >= 1), y [M, d] or x itself."""
    dtype = draw(st.sampled_from((torch.float32, torch.float64)))
    same = False if empty else draw(st.booleans())
    N = 0 if empty else draw(st.one_of(st.integers(1, 12), st.sampled_from([31, 64, 130])))
    M = draw(st.one_of(st.integers(1, 12), st.sampled_from([33, 257, 600])))
    d = draw(st.one_of(st.integers(0, 5), st.sampled_from([16, 33])))
    work = N * (N if same else M) * max(d, 1)
    assume(work <= 200_000)
    scale = draw(st.one_of(st.just(0.0), st.floats(1e-3, 50.0), st.just(1e3)))
    spread = draw(st.sampled_from([1.0, 1e-3, 10.0]))
    shift = draw(st.sampled_from([0.0, 100.0]))  # far apart: scores of -1e4 and below
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    kx = _draw_kind(draw, 2)
    x = _Operand(torch.randn(_leaf_values_shape((N, d), kx), generator=g, dtype=torch.float64) * spread,
                 kx, (N, d), float("nan"))
    if same:
        y = None
    else:
        ky = _draw_kind(draw, 2)
        y = _Operand(torch.randn(_leaf_values_shape((M, d), ky), generator=g, dtype=torch.float64) * spread + shift,
                     ky, (M, d), float("nan"))
    wanted = draw(st.sets(st.sampled_from(["x", "y"])))
    threads = draw(st.sampled_from([1, 2]))
    note(f"kde: dtype={dtype} N={N} M={M if not same else N} d={d} scale={scale} spread={spread} shift={shift} "
         f"same={same} layouts=({kx}, {None if same else y.kind}) wanted={sorted(wanted)} threads={threads}")
    return dict(dtype=dtype, x=x, y=y, d=d, work=work, scale=scale, wanted=wanted, threads=threads, seed=seed)


def _kde_run(case, fn, device="cpu", exact=False):
    """(out, grads by name, size or None): `fn(x, y, scale)` on the case's views; exact: float64
    leaves holding the dtype-rounded values, and `fn` returns (out, size)."""
    dtype = case["dtype"]
    xl, xv = case["x"].make(dtype, device, "x" in case["wanted"], exact)
    yl, yv = (xl, xv) if case["y"] is None else case["y"].make(dtype, device, "y" in case["wanted"], exact)
    threads = torch.get_num_threads()
    torch.set_num_threads(case["threads"])
    try:
        out = fn(xv, yv, case["scale"])
        out, size = out if exact else (out, None)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(case["seed"] + 1), dtype=torch.float64)
        g = g.to(dtype).to(out)  # the same upstream values in every dtype
        req = {"x": xl} if xl.requires_grad else {}
        if case["y"] is not None and yl.requires_grad:
            req["y"] = yl
        assert not req or out.requires_grad, f"the output is detached from {list(req)}, which require gradients"
        grads = dict(zip(req, torch.autograd.grad((out * g).sum(), list(req.values())))) if req else {}
    finally:
        torch.set_num_threads(threads)
    return out.detach(), grads, size


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=_n(6))
@given(data=st.data())
def test_kde_lse_matches_definition(device, data):
    _check_kde_case(data.draw(kde_cases(device)), device)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=_n(1))
@given(data=st.data())
def test_kde_lse_empty_x_keeps_the_graph(device, data):
    # N = 0: an empty output, still differentiable w.r.t. x and y (zero gradients), as on the
    # fused path; the reference's early return for N = 0 is detached (December 2026)
    case = data.draw(kde_cases(device, empty=True))
    case["wanted"] = data.draw(st.sets(st.sampled_from(["x", "y"]), min_size=1))
    _check_kde_case(case, device)


def _check_kde_case(case, device):
    dtype, d = case["dtype"], case["d"]
    ref, ref_grads, size = _kde_run(case, _kde_definition, exact=True)
    assert torch.isfinite(ref).all()
    runs = []
    if _fused_available(device, kde=True):
        runs.append(("fused", device, lambda x, y, s: kde_lse(x, y, s, backend="fused")))
    if device == "cpu":
        # a budget of 16 (row, column) pairs: the chunked, checkpointed path on small cases
        budget = None if case["work"] > 4000 else 16 * 3 * max(d, 1) * torch.finfo(dtype).bits // 8
        runs.append(("kde_lse_reference", "cpu", lambda x, y, s: kde_lse_reference(x, y, s, max_scratch_bytes=budget)
                     if budget else kde_lse_reference(x, y, s)))
    rel = _rel(dtype, device)
    size_max = size.max().item() if size.numel() else 0.0
    for what, dev, fn in runs:
        out, grads, _ = _kde_run(case, fn, dev)
        assert out.dtype == dtype and out.shape == ref.shape
        # float64 leaves hold the dtype-rounded values, so the definition saw exactly these inputs
        _check_values(f"{what}: out", out, ref, rel * (1 + size))
        assert set(grads) == set(ref_grads)
        for name, gr in ref_grads.items():
            _check_grad(f"{what}: grad {name}", grads[name], gr,
                        _rel(dtype, device) + (d + 4) * torch.finfo(dtype).eps * size_max)


@pytest.mark.skipif(not KDE_FUSED_CPU, reason="compiled kde_lse kernel not built")
@settings(max_examples=_n(0.5))
@given(data=st.data())
def test_kde_lse_bitwise_same_for_every_thread_count(data):
    case = data.draw(kde_cases("cpu"))
    case["wanted"] = {"x", "y"}
    results = []
    for threads in (1, 2, 3):
        case["threads"] = threads
        out, grads, _ = _kde_run(case, lambda x, y, s: kde_lse(x, y, s, backend="fused"))
        results.append([out, *grads.values()])
    for res in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], res))


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, never a crash or a hang.


def _valid_pair_args(g, dtype, shared, explicit):
    B, m, K, R = 6, 4, 3, 2
    pairs = torch.tensor([[0, 3], [2, 1], [1, 1]]) if explicit else None
    P = 3 if explicit else 6
    shape = (K,) if shared else (P, K)
    args = {"h": torch.randn(B, m, generator=g, dtype=torch.float64).to(dtype)}
    for name in ("wa", "wb", "b", "v"):
        args[name] = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    args["c"] = torch.randn(() if shared else (P,), generator=g, dtype=torch.float64).to(dtype)
    args["perms"] = torch.stack([torch.randperm(B, generator=g) for _ in range(R)])
    args["pairs"] = pairs
    args["coef_t"] = torch.randn(P, generator=g, dtype=torch.float64).to(dtype)
    args["coef_lme"] = torch.randn(P, generator=g, dtype=torch.float64).to(dtype)
    return args


def _set(name, fn):
    def mutate(a):
        a[name] = fn(a[name], a)
    return mutate


def _set_item(name, index, value):
    def mutate(a):
        a[name] = a[name].clone()
        a[name][index] = value
    return mutate


_OTHER_FLOAT = {torch.float32: torch.float64, torch.float64: torch.float32}

# (id, mutation, names of which the message must contain one, needs explicit pairs)
_PAIR_MUTATIONS = [
    ("h_1d", _set("h", lambda t, a: t[:, 0]), ["h"], False),
    ("h_3d", _set("h", lambda t, a: t[None]), ["h"], False),
    ("h_int", _set("h", lambda t, a: t.long()), ["h"], False),
    ("h_half_cpu", _set("h", lambda t, a: t.half()), ["h"], False),
    ("h_bool", _set("h", lambda t, a: t > 0), ["h"], False),
    ("h_one_sample", lambda a: (a.__setitem__("h", a["h"][:1]), a.__setitem__("perms", a["perms"][:, :1] * 0)), ["h"], False),
    ("h_one_unit_all_pairs", lambda a: (a.__setitem__("h", a["h"][:, :1]), a.__setitem__("pairs", None)), ["h"], False),
    ("h_nan", _set_item("h", (2, 1), float("nan")), ["h"], False),
    ("h_inf", _set_item("h", (0, 3), float("inf")), ["h"], False),
    ("h_neg_inf", _set_item("h", (5, 0), -float("inf")), ["h"], False),
    ("h_meta", _set("h", lambda t, a: t.to("meta")), ["h"], False),
    ("h_list", _set("h", lambda t, a: t.tolist()), ["h"], False),
    ("perms_int32", _set("perms", lambda t, a: t.int()), ["perms"], False),
    ("perms_float", _set("perms", lambda t, a: t.double()), ["perms"], False),
    ("perms_1d", _set("perms", lambda t, a: t[0]), ["perms"], False),
    ("perms_no_rows", _set("perms", lambda t, a: t[:0]), ["perms"], False),
    ("perms_short", _set("perms", lambda t, a: t[:, :-1]), ["perms"], False),
    ("perms_long", _set("perms", lambda t, a: torch.cat([t, t[:, :1]], 1)), ["perms"], False),
    ("perms_negative", _set_item("perms", (1, 0), -1), ["perms"], False),
    ("perms_repeat", lambda a: _set_item("perms", (1, 0), int(a["perms"][1, 1]))(a), ["perms"], False),
    ("perms_too_large", _set_item("perms", (0, 2), 6), ["perms"], False),
    ("perms_huge", _set_item("perms", (0, 2), 2**40), ["perms"], False),
    ("perms_meta", _set("perms", lambda t, a: t.to("meta")), ["perms"], False),
    ("perms_none", _set("perms", lambda t, a: None), ["perms"], False),
    ("pairs_int32", _set("pairs", lambda t, a: t.int()), ["pairs"], True),
    ("pairs_float", _set("pairs", lambda t, a: t.double()), ["pairs"], True),
    ("pairs_3_cols", _set("pairs", lambda t, a: torch.cat([t, t[:, :1]], 1)), ["pairs"], True),
    ("pairs_1d", _set("pairs", lambda t, a: t[:, 0]), ["pairs"], True),
    ("pairs_too_large", _set_item("pairs", (1, 1), 4), ["pairs"], True),
    ("pairs_huge", _set_item("pairs", (0, 0), 2**40), ["pairs"], True),
    ("pairs_negative", _set_item("pairs", (2, 0), -1), ["pairs"], True),
    ("pairs_meta", _set("pairs", lambda t, a: t.to("meta")), ["pairs"], True),
    ("pairs_list", _set("pairs", lambda t, a: t.tolist()), ["pairs"], True),
    ("pairs_more_than_critics", _set("pairs", lambda t, a: torch.cat([t, t[:1]])), None, True),
    ("backend", None, ["backend"], False),
]
for _name in ("wa", "wb", "b", "v", "c"):
    _PAIR_MUTATIONS += [
        (f"{_name}_other_float", _set(_name, lambda t, a: t.to(_OTHER_FLOAT[t.dtype])), [_name], False),
        (f"{_name}_int", _set(_name, lambda t, a: t.long()), [_name], False),
        (f"{_name}_meta", _set(_name, lambda t, a: t.to("meta")), [_name], False),
        # wa sets the mode and K: a wa that disagrees with the others may be reported through wb
        (f"{_name}_extra_dim", _set(_name, lambda t, a: t[None]), [_name, "wb"] if _name == "wa" else [_name], False),
        (f"{_name}_longer", _set(_name, lambda t, a: torch.cat([t, t[..., :1]], -1) if t.dim() else t.reshape(1)),
         [_name, "wb"] if _name == "wa" else [_name], False),
        (f"{_name}_float", _set(_name, lambda t, a: 0.5), [_name], False),
    ]
for _name in ("coef_t", "coef_lme"):
    _PAIR_MUTATIONS += [
        (f"{_name}_short", _set(_name, lambda t, a: t[:-1]), [_name], False),
        (f"{_name}_2d", _set(_name, lambda t, a: t[:, None]), [_name], False),
        (f"{_name}_other_float", _set(_name, lambda t, a: t.to(_OTHER_FLOAT[t.dtype])), [_name], False),
        (f"{_name}_meta", _set(_name, lambda t, a: t.to("meta")), [_name], False),
        (f"{_name}_list", _set(_name, lambda t, a: t.tolist()), [_name], False),
    ]
_CRITIC_NAMES = ["pairs", "wa", "wb", "b", "v", "c", "coef_t", "coef_lme"]


@settings(max_examples=_n(6))
@given(data=st.data())
def test_pair_stats_bad_input_raises_naming_the_argument(data):
    mutation_id, mutate, names, needs_pairs = data.draw(st.sampled_from(_PAIR_MUTATIONS))
    linear = data.draw(st.booleans()) or mutation_id.startswith("coef")
    backend = data.draw(st.sampled_from(["auto", "fused", "reference"] if FUSED_CPU else ["auto", "reference"]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    shared = data.draw(st.booleans())
    explicit = needs_pairs or data.draw(st.booleans())
    if mutation_id == "pairs_more_than_critics":
        assume(not shared)  # a shared critic serves any number of pairs
        names = _CRITIC_NAMES
    args = _valid_pair_args(torch.Generator().manual_seed(data.draw(st.integers(0, 1000))), dtype, shared, explicit)
    if mutation_id == "backend":
        backend = data.draw(st.sampled_from(["fast", "cuda", "", "Fused"]))
    else:
        mutate(args)
    note(f"{mutation_id} linear={linear} backend={backend} dtype={dtype} shared={shared} explicit={explicit}")
    pos = [args[n] for n in NAMES] + [args["perms"]]
    with pytest.raises((ValueError, TypeError, RuntimeError)) as err:
        if linear:
            mmim_ext.pair_stats_linear(*pos, args["coef_t"], args["coef_lme"], args["pairs"], backend=backend)
        else:
            mmim_ext.pair_stats(*pos, args["pairs"], backend=backend)
    msg = str(err.value)
    assert any(f"'{n}'" in msg for n in names), (
        f"{mutation_id}: the message does not name {names}: {msg}")


_KDE_MUTATIONS = [
    ("x_1d", lambda a: a.update(x=a["x"][:, 0]), ["x"]),
    ("y_3d", lambda a: a.update(y=a["y"][None]), ["y"]),
    ("x_int", lambda a: a.update(x=a["x"].long()), ["x"]),
    ("y_half", lambda a: a.update(y=a["y"].half()), ["y"]),
    ("y_other_float", lambda a: a.update(y=a["y"].to(_OTHER_FLOAT[a["y"].dtype])), ["y"]),
    ("x_other_float", lambda a: a.update(x=a["x"].to(_OTHER_FLOAT[a["x"].dtype])), ["x", "y"]),
    ("x_meta", lambda a: a.update(x=a["x"].to("meta")), ["x"]),
    ("y_meta", lambda a: a.update(y=a["y"].to("meta")), ["y"]),
    ("columns", lambda a: a.update(y=torch.cat([a["y"], a["y"][:, :1]], 1)), ["x", "y"]),
    ("y_no_rows", lambda a: a.update(y=a["y"][:0]), ["y"]),
    ("x_nan", lambda a: a["x"].__setitem__((1, 0), float("nan")), ["x"]),
    ("y_inf", lambda a: a["y"].__setitem__((0, 1), float("inf")), ["y"]),
    ("x_list", lambda a: a.update(x=a["x"].tolist()), ["x"]),
    ("y_none", lambda a: a.update(y=None), ["y"]),
    ("scale_negative", lambda a: a.update(scale=-0.5), ["scale"]),
    ("scale_nan", lambda a: a.update(scale=float("nan")), ["scale"]),
    ("scale_inf", lambda a: a.update(scale=float("inf")), ["scale"]),
    ("scale_tensor", lambda a: a.update(scale=torch.tensor(1.0)), ["scale"]),
    ("scale_bool", lambda a: a.update(scale=True), ["scale"]),
    ("scale_str", lambda a: a.update(scale="1.0"), ["scale"]),
    ("backend", lambda a: a.update(backend="gpu"), ["backend"]),
]


@settings(max_examples=_n(3))
@given(data=st.data())
def test_kde_lse_bad_input_raises_naming_the_argument(data):
    mutation_id, mutate, names = data.draw(st.sampled_from(_KDE_MUTATIONS))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    args = {"x": torch.randn(5, 3, generator=g, dtype=torch.float64).to(dtype),
            "y": torch.randn(4, 3, generator=g, dtype=torch.float64).to(dtype), "scale": 0.7,
            "backend": data.draw(st.sampled_from(["auto", "fused", "reference"] if KDE_FUSED_CPU else ["auto", "reference"]))}
    mutate(args)
    note(f"{mutation_id} dtype={dtype} backend={args['backend']}")
    with pytest.raises((ValueError, TypeError, RuntimeError)) as err:
        kde_lse(args["x"], args["y"], args["scale"], backend=args["backend"])
    msg = str(err.value)
    assert any(f"'{n}'" in msg for n in names), f"{mutation_id}: the message does not name {names}: {msg}"


@pytest.mark.skipif(not FUSED_CPU, reason="compiled extension not built")
@settings(max_examples=_n(1))
@given(data=st.data())
def test_pair_stats_op_checks_values_itself(data):
    # The compiled ops guard their memory accesses without the Python wrapper's checks.
    mutation_id, mutate, names, _ = data.draw(st.sampled_from(
        [mu for mu in _PAIR_MUTATIONS if mu[0] in ("h_nan", "h_inf", "perms_repeat", "perms_too_large", "perms_huge",
                                                   "pairs_too_large", "pairs_huge", "pairs_negative")]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    args = _valid_pair_args(torch.Generator().manual_seed(data.draw(st.integers(0, 1000))), dtype,
                            data.draw(st.booleans()), True)
    mutate(args)
    pos = [args[n] for n in NAMES] + [args["perms"], args["pairs"]]
    op = data.draw(st.sampled_from(["fwd", "fwd_bwd"]))
    with pytest.raises(RuntimeError) as err:
        if op == "fwd":
            torch.ops.mmim_ext.pair_stats_fwd(*pos)
        else:
            torch.ops.mmim_ext.pair_stats_fwd_bwd(args["coef_t"], args["coef_lme"], *pos)
    assert any(f"'{n}'" in str(err.value) for n in names), str(err.value)


# ---------------------------------------------------------------------------------------------
# Every CPU build: the kernel tests of this file in one subprocess per build.

_KERNEL_TESTS = (
    "test_cpu_build_in_effect",
    "test_pair_stats_matches_definition",
    "test_pair_stats_linear_matches_definition",
    "test_pair_stats_diagonal_pairs_match_definition",
    "test_pair_stats_linear_diagonal_pairs_match_definition",
    "test_pair_stats_nonfinite_critic_params_propagate",
    "test_pair_stats_linear_nonfinite_critic_params_propagate",
    "test_pair_stats_bitwise_same_for_every_thread_count",
    "test_pair_stats_empty_pair_set_keeps_the_graph",
)
_BUILDS = ("scalar", "base", "avx2")


def _cpu_has_avx2_fma():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return "avx2" in flags and "fma" in flags


@pytest.mark.skipif(not FUSED_CPU, reason="compiled extension not built")
def test_cpu_build_in_effect():
    cap = torch.ops.mmim_ext.cpu_capability()
    forced = os.environ.get("MMIM_EXT_CPU_CAPABILITY")
    if forced:
        assert cap == {"default": "base"}.get(forced, forced)
    else:
        has = _cpu_has_avx2_fma()
        if has is None:
            pytest.skip("no /proc/cpuinfo to tell the best build")
        assert cap == ("avx2" if has else "base")


_build_results: dict = {}


def _results_in_build(build, tmp_dir):
    """{test id: (outcome, message)} from one pytest subprocess with MMIM_EXT_CPU_CAPABILITY=build."""
    if build not in _build_results:
        xml = os.path.join(tmp_dir, f"junit-{build}.xml")
        env = dict(os.environ, MMIM_EXT_CPU_CAPABILITY=build, HYPOTHESIS_PROFILE=settings.get_current_profile_name(),
                   **{_CHILD_ENV: "1"})
        selection = "(" + " or ".join(_KERNEL_TESTS) + ") and not cuda and not test_in_cpu_build"
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider",
                               "-k", selection, f"--junitxml={xml}", "--hypothesis-show-statistics"],
                              cwd=root, env=env, capture_output=True, text=True, timeout=1800)
        with open(os.path.join(tmp_dir, f"pytest-{build}.txt"), "w") as f:  # the child's report, statistics included
            f.write(proc.stdout + proc.stderr)
        results = {}
        if os.path.exists(xml):
            for case in ET.parse(xml).getroot().iter("testcase"):
                outcome, message = "passed", ""
                for tag in ("failure", "error", "skipped"):
                    el = case.find(tag)
                    if el is not None:
                        outcome, message = tag, (el.get("message") or "") + "\n" + (el.text or "")
                        break
                results[case.get("name")] = (outcome, message)
        _build_results[build] = (results, proc.returncode, proc.stdout[-3000:] + proc.stderr[-3000:])
    return _build_results[build]


@pytest.mark.skipif(not FUSED_CPU, reason="compiled extension not built")
@pytest.mark.skipif(bool(os.environ.get(_CHILD_ENV)), reason="inside a per-build subprocess")
@pytest.mark.parametrize("test", _KERNEL_TESTS)
@pytest.mark.parametrize("build", _BUILDS)
def test_in_cpu_build(build, test, tmp_path_factory):
    if build == torch.ops.mmim_ext.cpu_capability():
        pytest.skip(f"this process runs the {build} build: the tests above are its run")
    if build == "avx2" and not _cpu_has_avx2_fma():
        pytest.skip("this CPU has no AVX2+FMA")
    results, rc, tail = _results_in_build(build, str(tmp_path_factory.getbasetemp()))
    mine = {k: v for k, v in results.items() if k == test or k.startswith(test + "[")}
    assert mine, f"no result for {test} in the {build} build's run (exit {rc}):\n{tail}"
    failed = {k: v[1] for k, v in mine.items() if v[0] in ("failure", "error")}
    assert not failed, f"{build} build:\n" + "\n\n".join(f"{k}: {m[-2500:]}" for k, m in failed.items())
    assert any(v[0] == "passed" for v in mine.values()), f"{build} build: {test} only skipped: {mine}"
