import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import mmim_ext

# Hypothesis profiles (tests/test_properties.py scales its example counts from max_examples):
# "ci", the default, is derandomized so that every CI run draws the same examples and writes no
# example database; "slow" draws 10x as many (about 4,250 with the per-build runs), randomly,
# and keeps failures in .hypothesis/ to replay them. Select with HYPOTHESIS_PROFILE=slow or
# pytest's --hypothesis-profile=slow.
_HYPOTHESIS_COMMON = dict(deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=6, derandomize=True, database=None, **_HYPOTHESIS_COMMON)
settings.register_profile("slow", max_examples=60, **_HYPOTHESIS_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _devices():
    devs = ["cpu"]
    devs.append(pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")))
    return devs


DEVICES = _devices()

requires_fused = pytest.mark.skipif(not mmim_ext.fused_available("cpu"), reason="compiled extension not built")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, the previous count restored after it. For tests of tiny
    problems (a few pairs, batches of a few hundred): a second thread only adds synchronization,
    and on a busy 2-core CI machine OpenMP workers spin, which made such tests several times
    slower. Modules of such tests take it for every test with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def assert_same(a, b, where="state"):
    """`a` and `b` (tensors, or dicts, lists and tuples of them and of plain values) are the same:
    same types, keys and lengths, tensors of the same dtype and shape, equal bit for bit (NaN where
    NaN; -0.0 == 0.0). `where` names the object in the failure message."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.isnan(), b.isnan()), where
        assert torch.equal(a[~a.isnan()], b[~b.isnan()]), where  # infinities included
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def make_inputs(B, m, K, R, *, shared, dtype=torch.float64, device="cpu", pairs=None, scale=1.0,
                seed=0, requires_grad=False):
    """Random pair_stats inputs; `scale` multiplies the critic's output weights (large logits)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, m, generator=g, dtype=torch.float64)
    P = m * (m - 1) // 2 if pairs is None else pairs.shape[0]
    shape = (K,) if shared else (P, K)
    wa, wb, b = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    v = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    c = torch.randn(() if shared else (P,), generator=g, dtype=torch.float64)
    perms = torch.stack([torch.randperm(B, generator=g) for _ in range(R)])
    out = [t.to(device=device, dtype=dtype) for t in (h, wa, wb, b, v, c)]
    if requires_grad:
        for t in out:
            t.requires_grad_(True)
    return (*out, perms.to(device), None if pairs is None else pairs.to(device))


def with_edge_gate_units(inputs):
    """`inputs` (make_inputs, K >= 8) with critic units 0-5 set to the cases the kernels' gate by
    threshold (math::gate_threshold: [b > t] for wb > 0, [b < t] for wb < 0, t = -(wa a + bias)/wb)
    must hand back to the gate from x = wa a + wb b + bias: wb zero and +-subnormal, -wa/wb and
    -bias/wb overflowing; and a tiny normal wb whose threshold is huge but finite. Units 6, 7 keep
    their random weights (one of them given a negative wb)."""
    h, wa, wb, b, v, c, perms, pairs = inputs
    assert wa.shape[-1] >= 8, "with_edge_gate_units needs K >= 8"
    f32 = wa.dtype == torch.float32
    sub, tiny_normal, small = (1e-40, 1e-38, 1e-20) if f32 else (1e-310, 1e-307, 1e-200)
    big = 10.0 if f32 else 100.0  # big / tiny_normal overflows
    wa, wb, b = wa.clone(), wb.clone(), b.clone()
    cols = {  # unit: (wa, wb, bias); None keeps the random value
        0: (None, 0.0, None),
        1: (None, sub, None),
        2: (None, -sub, None),
        3: (big, tiny_normal, None),
        4: (None, -tiny_normal, big),
        5: (None, small, None),
    }
    for k, vals in cols.items():
        for t, x in zip((wa, wb, b), vals):
            if x is not None:
                t[..., k] = x
    wb[..., 7] = -wb[..., 7].abs()
    return h, wa, wb, b, v, c, perms, pairs
