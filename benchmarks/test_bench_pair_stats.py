"""pytest-benchmark suite for ``mmim_ext.pair_stats``.

Run: ``python -m pytest benchmarks/ --benchmark-only`` (sizes: see ``benchmarks/conftest.py``).
Each benchmark first asserts correctness on its own inputs (fused vs the eager reference on a
random subset of pairs; baselines vs the fused op on everything), then times the call. Nothing
here asserts a time: the numbers go to pytest-benchmark's table / ``--benchmark-json``.
"""

from __future__ import annotations

import pytest
import torch

import mmim_ext
from compare import (
    Cell,
    CompiledReference,
    _eager,
    _fused,
    _onepass,
    assert_matches,
    make_inputs,
    run_once,
    subset_check,
)

needs_fused = pytest.mark.skipif(
    not mmim_ext.fused_available("cpu"),
    reason=f"fused CPU kernel unavailable ({mmim_ext._extension.load_error() or 'not compiled'})",
)

MODES = ["per_pair", "shared"]
DIRECTIONS = ["fwd", "fwdbwd"]


def _cell(bench_size, mode) -> Cell:
    return Cell(bench_size["m"], bench_size["B"], bench_size["K"], bench_size["R"], mode)


def _bench(benchmark, fn, cell, args, upstream, direction, rounds):
    def setup():
        for t in args[:6]:
            t.grad = None

    benchmark.extra_info.update(
        m=cell.m, B=cell.B, K=cell.K, R=cell.R, mode=cell.mode, direction=direction,
        evals=cell.evals, nominal_gflop=cell.flops / 1e9,
    )
    benchmark.pedantic(run_once, args=(fn, args, upstream, direction), setup=setup,
                       rounds=rounds, iterations=1, warmup_rounds=1)
    # pytest-benchmark leaves stats empty with --benchmark-disable.
    stats = getattr(benchmark, "stats", None)
    med = getattr(getattr(stats, "stats", None), "median", None)
    if med:
        benchmark.extra_info["nominal_gflops_at_median"] = cell.flops / med / 1e9


@needs_fused
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_fused(benchmark, bench_size, mode, direction):
    cell = _cell(bench_size, mode)
    args, upstream = make_inputs(cell, direction == "fwdbwd")
    outs, grads = run_once(_fused, args, upstream, direction)
    subset_check(cell, args, upstream, outs, grads, direction, n_pairs=256)
    benchmark.group = f"{cell.label()} {direction}"
    _bench(benchmark, _fused, cell, args, upstream, direction, bench_size["rounds"])


@needs_fused
@pytest.mark.parametrize("step", ["critic_step", "penalty_step"])
def test_fused_partial_backward(benchmark, bench_size, step):
    """Forward+backward with only some gradients wanted, as in MMIM training: a critic update on
    detached features (no gradient w.r.t. h) and a penalty through frozen critics (only h's)."""
    cell = _cell(bench_size, "per_pair")
    args, upstream = make_inputs(cell, True)
    _, full = run_once(_fused, args, upstream, "fwdbwd")  # all gradients (checked in test_fused)
    wanted = [0] if step == "penalty_step" else [1, 2, 3, 4, 5]
    for i, t in enumerate(args[:6]):
        t.requires_grad_(i in wanted)
    _, part = run_once(_fused, args, upstream, "fwdbwd")
    for i in range(6):
        if i in wanted:
            torch.testing.assert_close(part[i], full[i], rtol=1e-6, atol=1e-6)
        else:
            assert part[i] is None
    benchmark.group = f"{cell.label()} fwdbwd {step}"
    _bench(benchmark, _fused, cell, args, upstream, "fwdbwd", bench_size["rounds"])


@needs_fused
@pytest.mark.parametrize("mode", MODES)
def test_onepass(benchmark, bench_size, mode):
    """Forward+backward through mmim_ext.pair_stats_linear with the upstream gradients as its
    coefficients: on the CPU statistics and gradients in one pass (same results as test_fused)."""
    cell = _cell(bench_size, mode)
    args, upstream = make_inputs(cell, True)
    one = run_once(_onepass, args, upstream, "fwdbwd")
    fused = run_once(_fused, args, upstream, "fwdbwd")
    assert_matches(f"[{cell.label()} fwdbwd] fused vs onepass", *fused, *one)
    benchmark.group = f"{cell.label()} fwdbwd"
    _bench(benchmark, _onepass, cell, args, upstream, "fwdbwd", bench_size["rounds"])


@needs_fused
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_eager_reference(benchmark, bench_size, mode, direction):
    cell = _cell(bench_size, mode)
    args, upstream = make_inputs(cell, direction == "fwdbwd")
    ref = run_once(_eager, args, upstream, direction)
    fused = run_once(_fused, args, upstream, direction)
    assert_matches(f"[{cell.label()} {direction}] fused vs eager", *fused, *ref)
    benchmark.group = f"{cell.label()} {direction}"
    _bench(benchmark, _eager, cell, args, upstream, direction, bench_size["rounds"])


@needs_fused
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_compiled_reference(benchmark, bench_size, mode, direction):
    if not bench_size["compiled"]:
        pytest.skip("MMIM_EXT_BENCH_COMPILED=0")
    cell = _cell(bench_size, mode)
    args, upstream = make_inputs(cell, direction == "fwdbwd")
    compiled = CompiledReference("chunk")
    ref = run_once(compiled, args, upstream, direction)  # compiles: excluded from the timing
    fused = run_once(_fused, args, upstream, direction)
    assert_matches(f"[{cell.label()} {direction}] fused vs torch.compile(reference)", *fused, *ref)
    benchmark.group = f"{cell.label()} {direction}"
    _bench(benchmark, compiled, cell, args, upstream, direction, bench_size["rounds"])


def test_sgemm_roofline(benchmark, bench_size):
    """float32 matmul rate of this machine (the roofline of compare.py), n=2048."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.testing.assert_close(torch.matmul(a[:64], b[:, :64]), (a[:64].double() @ b[:, :64].double()).float(),
                               rtol=1e-4, atol=1e-3)
    benchmark.group = "sgemm"
    benchmark.extra_info["nominal_gflop"] = 2 * n**3 / 1e9
    benchmark.pedantic(torch.matmul, args=(a, b), kwargs={"out": out}, rounds=5, iterations=1,
                       warmup_rounds=1)
