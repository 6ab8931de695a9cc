"""The CPU kernels' block cache (csrc/cpu/output_cache.h): reuse, isolation, limit, release."""

import json
import os
import subprocess
import sys

import pytest
import torch

import mmim_ext

from conftest import make_inputs, requires_fused

# m=300, K=16: each [P, K] critic gradient is 44,850 x 16 x 4 B = 2.9 MB (the cache takes blocks
# of 1 MiB and up).
M, B, K, R = 300, 64, 16, 1


def _one_pass(args, seed=1):
    g = torch.Generator().manual_seed(seed)
    P = mmim_ext.num_pairs(M)
    coef_t, coef_lme = torch.randn(P, generator=g), torch.randn(P, generator=g)
    h, wa, wb, b, v, c, perms = args
    leaves = [t.detach().requires_grad_(True) for t in (h, wa, wb, b, v, c)]
    loss, _, _ = mmim_ext.pair_stats_linear(*leaves, perms, coef_t, coef_lme, backend="fused")
    loss.backward()
    return [t.grad for t in leaves]


def _inputs(seed):
    *ts, perms, _ = make_inputs(B, M, K, R, shared=False, dtype=torch.float32, seed=seed)
    return (*ts, perms)


@requires_fused
def test_freed_gradients_are_reused_and_stale_contents_never_leak():
    if mmim_ext.cpu_cache_info()["limit_bytes"] < 32 * 2**20:
        pytest.skip("the block cache is off or too small here (MMIM_EXT_CPU_CACHE_MB)")
    mmim_ext.empty_cpu_cache()
    first = _one_pass(_inputs(0))
    ptrs = {g.data_ptr() for g in first[1:5]}
    before = mmim_ext.cpu_cache_info()
    # Poisoned blocks: an element the next call does not write would stay NaN.
    for g in first:
        g.fill_(float("nan"))
    del first
    after_free = mmim_ext.cpu_cache_info()
    assert after_free["free_blocks"] >= before["free_blocks"] + 4
    # Other inputs into the reused blocks: the same numbers as into fresh memory.
    reused = _one_pass(_inputs(1))
    info = mmim_ext.cpu_cache_info()
    assert info["reused"] >= after_free["reused"] + 4
    assert len({g.data_ptr() for g in reused[1:5]} & ptrs) == 4
    assert all(torch.isfinite(g).all() for g in reused)
    kept = [g.clone() for g in reused]
    del reused
    mmim_ext.empty_cpu_cache()
    assert mmim_ext.cpu_cache_info()["free_bytes"] == 0
    fresh = _one_pass(_inputs(1))
    for a, b in zip(kept, fresh):
        assert torch.equal(a, b)


@requires_fused
def test_held_gradients_are_not_reused_or_touched():
    held = _one_pass(_inputs(2))
    copies = [g.clone() for g in held]
    again = _one_pass(_inputs(3))
    assert not {g.data_ptr() for g in held} & {g.data_ptr() for g in again}
    for g, c in zip(held, copies):
        assert torch.equal(g, c)
    # A view keeps its block: the view's storage is the block's.
    view = held[1][:5]
    ptr = held[1].data_ptr()
    del held
    later = _one_pass(_inputs(4))
    assert ptr not in {g.data_ptr() for g in later}
    assert torch.equal(view, copies[1][:5])


@requires_fused
def test_cached_tensors_behave_as_ordinary_ones():
    grads = _one_pass(_inputs(5))
    gwa = grads[1]
    assert gwa.is_contiguous() and gwa.device.type == "cpu" and gwa.dtype == torch.float32
    # In-place ops, a resizable storage (the cache serves the new size), a numpy view (which makes
    # any storage non-resizable, so last).
    n0 = gwa.numel()
    ref = gwa.clone()
    gwa.mul_(2)
    assert torch.equal(gwa, 2 * ref)
    gwa.resize_(n0 * 2)
    assert torch.equal(gwa[:n0].view_as(ref), 2 * ref)
    assert torch.equal(torch.from_numpy(gwa.numpy())[:n0].view_as(ref), 2 * ref)


def _run(env_extra, code):
    env = dict(os.environ, **env_extra)
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=here, capture_output=True, text=True)


_SCRIPT = """
import json, torch, mmim_ext
from test_output_cache import _one_pass, _inputs
g = _one_pass(_inputs(0)); del g
g = _one_pass(_inputs(1)); del g
print(json.dumps(mmim_ext.cpu_cache_info()))
"""


@requires_fused
def test_limit_from_the_environment():
    off = _run({"MMIM_EXT_CPU_CACHE_MB": "0"}, _SCRIPT)
    assert off.returncode == 0, off.stderr
    assert json.loads(off.stdout.strip().splitlines()[-1]) == dict(free_bytes=0, free_blocks=0, limit_bytes=0,
                                                            reused=0, allocated=0)
    # 5 MiB holds one 2.9 MB gradient block and not two.
    small = _run({"MMIM_EXT_CPU_CACHE_MB": "5"}, _SCRIPT)
    assert small.returncode == 0, small.stderr
    info = json.loads(small.stdout.strip().splitlines()[-1])
    assert info["limit_bytes"] == 5 * 2**20 and 0 < info["free_bytes"] <= 5 * 2**20
    bad = _run({"MMIM_EXT_CPU_CACHE_MB": "lots"}, _SCRIPT)
    assert bad.returncode != 0
    assert "MMIM_EXT_CPU_CACHE_MB must be a whole number of mebibytes" in bad.stderr and "'lots'" in bad.stderr


@requires_fused
def test_calls_from_two_threads_share_the_cache_safely():
    import threading

    expected = {seed: [g.clone() for g in _one_pass(_inputs(seed))] for seed in (6, 7)}
    results, errors = {}, []

    def run(seed):
        try:
            for k in range(3):
                results[(seed, k)] = _one_pass(_inputs(seed))
                if k < 2:
                    del results[(seed, k)]  # back to the cache while the other thread allocates
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (6, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for seed in (6, 7):
        for a, b in zip(results[(seed, 2)], expected[seed]):
            assert torch.equal(a, b)
