"""kde_lse: fused kernel vs the chunked reference vs the definition, gradients, opcheck, bad input."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmim_ext.ops.kde import kde_fused_available, kde_lse, kde_lse_reference

requires_kde = pytest.mark.skipif(not kde_fused_available("cpu"), reason="compiled kde_lse kernel not built")
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def _definition(x, y, scale):
    """One row and one column at a time in float64: log sum_l exp(-scale ||x_n - y_l||^2)."""
    x, y = x.double(), y.double()
    out = []
    for n in range(x.shape[0]):
        s = torch.stack([-scale * ((x[n] - y[l]) ** 2).sum() for l in range(y.shape[0])])
        out.append(torch.logsumexp(s, 0))
    return torch.stack(out) if out else x.new_zeros(0)


def _inputs(N, M, d, dtype, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=torch.float64) * spread
    y = torch.randn(M, d, generator=g, dtype=torch.float64) * spread
    return x.to(dtype), y.to(dtype)


def test_reference_matches_definition():
    x, y = _inputs(9, 13, 3, torch.float64, 0)
    torch.testing.assert_close(kde_lse_reference(x, y, 0.8), _definition(x, y, 0.8), rtol=1e-12, atol=1e-12)


def test_reference_chunking_does_not_change_result():
    x, y = _inputs(37, 41, 5, torch.float64, 1)
    full = kde_lse_reference(x, y, 0.5)
    # A budget of a few pairs forces both row and column chunks (and the logaddexp merges).
    tiny = kde_lse_reference(x, y, 0.5, max_scratch_bytes=3 * 5 * 8 * 7)
    torch.testing.assert_close(tiny, full, rtol=1e-12, atol=1e-12)


def test_reference_chunked_gradients_match_unchunked():
    x, y = _inputs(20, 17, 3, torch.float64, 2)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ys = [y.clone().requires_grad_(True) for _ in range(2)]
    g = torch.randn(20, dtype=torch.float64)
    a = torch.autograd.grad((kde_lse_reference(xs[0], ys[0], 0.7) * g).sum(), (xs[0], ys[0]))
    b = torch.autograd.grad((kde_lse_reference(xs[1], ys[1], 0.7, max_scratch_bytes=3 * 3 * 8 * 5) * g).sum(),
                            (xs[1], ys[1]))
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


@requires_kde
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,M,d", [(1, 1, 1), (3, 1, 2), (7, 300, 3), (257, 513, 10), (600, 9, 1), (5, 5, 0)])
def test_fused_matches_reference(N, M, d, dtype):
    x, y = _inputs(N, M, d, dtype, N + M + d)
    torch.testing.assert_close(kde_lse(x, y, 0.7, backend="fused"), kde_lse(x, y, 0.7, backend="reference"),
                               **TOL[dtype])


@requires_kde
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 70), M=st.integers(1, 300), d=st.integers(1, 12),
       scale=st.floats(0.0, 50.0), spread=st.sampled_from([0.1, 1.0, 10.0]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 10_000))
def test_fused_matches_reference_property(N, M, d, scale, spread, dtype, seed):
    x, y = _inputs(N, M, d, dtype, seed, spread)
    ref = kde_lse_reference(x.double(), y.double(), scale)
    got = kde_lse(x, y, scale, backend="fused")
    assert torch.isfinite(got).all()
    # float32 inputs: the scores -scale*D are exact only to float32 relative precision.
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5 * (1 + float(ref.abs().max())))
    torch.testing.assert_close(got.double(), ref, **tol)


@requires_kde
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_distances_stay_finite(dtype):
    # Scores around -1e6: a naive sum of exp underflows to log(0) = -inf.
    x, y = _inputs(40, 150, 4, dtype, 3, spread=30.0)
    y = y + 300.0
    scale = 5.0
    got = kde_lse(x, y, scale, backend="fused")
    ref = _definition(x, y, scale)
    assert torch.isfinite(got).all() and float(ref.max()) < -1e4
    assert not torch.isfinite(torch.exp(-scale * torch.cdist(x.double(), y.double()) ** 2).sum(1).log()).any()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0.0)
    # Gradients stay finite too (weights are exp(s - out) <= 1).
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    gx, gy = torch.autograd.grad(kde_lse(xr, yr, scale).sum(), (xr, yr))
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all()


@requires_kde
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("same", [False, True])
def test_fused_gradients_match_reference(dtype, same):
    x, y = _inputs(65, 300, 6, dtype, 4)
    g = torch.randn(65, generator=torch.Generator().manual_seed(5), dtype=dtype)

    def grads(backend):
        xr = x.clone().requires_grad_(True)
        yr = xr if same else y.clone().requires_grad_(True)
        out = kde_lse(xr, yr, 0.9, backend=backend)
        return torch.autograd.grad((out * g).sum(), (xr,) if same else (xr, yr))

    for a, b in zip(grads("fused"), grads("reference")):
        torch.testing.assert_close(a, b, **({} if dtype == torch.float32 else TOL[dtype]))


@requires_kde
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck_float64(seed):
    x, y = _inputs(6, 5, 3, torch.float64, seed)
    x.requires_grad_(True)
    y.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: kde_lse(a, b, 0.6, backend="fused"), (x, y))


@requires_kde
def test_non_contiguous_inputs():
    base = torch.randn(30, 16, dtype=torch.float64)
    x = base[::2, ::3]  # [15, 6], strided both ways
    y = torch.randn(6, 40, dtype=torch.float64).t()  # [40, 6], column-major
    assert not x.is_contiguous() and not y.is_contiguous()
    torch.testing.assert_close(kde_lse(x, y, 0.4, backend="fused"), _definition(x, y, 0.4), **TOL[torch.float64])


@requires_kde
def test_opcheck():
    x, y = _inputs(9, 11, 3, torch.float64, 6)
    x.requires_grad_(True)
    y.requires_grad_(True)
    torch.library.opcheck(torch.ops.mmim_ext.kde_lse.default, (x, y, 0.3))
    out = torch.ops.mmim_ext.kde_lse(x.detach(), y.detach(), 0.3)
    torch.library.opcheck(torch.ops.mmim_ext.kde_lse_bwd.default,
                          (torch.randn(9, dtype=torch.float64), x.detach(), y.detach(), 0.3, out))


@requires_kde
def test_torch_compile_fullgraph():
    x, y = _inputs(12, 20, 3, torch.float32, 7)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(a, b):
        return kde_lse(a, b, 0.5).mean()

    torch.testing.assert_close(f(x, y), kde_lse(x, y, 0.5, backend="reference").mean(), rtol=1e-5, atol=1e-5)


@requires_kde
def test_double_backward_raises():
    x, y = _inputs(4, 5, 2, torch.float64, 8)
    x.requires_grad_(True)
    (gx,) = torch.autograd.grad(kde_lse(x, y, 0.5).sum(), (x,), create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gx.sum().backward()


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: kde_lse(torch.randn(3), torch.randn(4, 1), 1.0), ValueError, "'x' must be 2-D"),
        (lambda: kde_lse(torch.randn(3, 2), torch.randn(4, 3), 1.0), ValueError, "same number of columns"),
        (lambda: kde_lse(torch.randn(3, 2), torch.randn(0, 2), 1.0), ValueError, "at least one row"),
        (lambda: kde_lse(torch.randn(3, 2), torch.randn(4, 2, dtype=torch.float64), 1.0), TypeError, "x's dtype"),
        (lambda: kde_lse(torch.ones(3, 2, dtype=torch.int64), torch.ones(4, 2, dtype=torch.int64), 1.0),
         TypeError, "float32 or float64"),
        (lambda: kde_lse(torch.randn(3, 2), torch.randn(4, 2), -1.0), ValueError, "'scale' must be finite and >= 0"),
        (lambda: kde_lse(torch.randn(3, 2), torch.randn(4, 2), float("nan")), ValueError, "'scale'"),
        (lambda: kde_lse(torch.randn(3, 2), torch.randn(4, 2), torch.tensor(1.0)), TypeError, "Python float"),
        (lambda: kde_lse(torch.tensor([[0.0, float("nan")]]), torch.randn(4, 2), 1.0), ValueError, "NaN or infinite"),
        (lambda: kde_lse(torch.randn(3, 2), torch.randn(4, 2), 1.0, backend="gpu"), ValueError, "'backend'"),
        (lambda: kde_lse([[1.0]], torch.randn(4, 1), 1.0), TypeError, "'x' must be a torch.Tensor"),
    ],
)
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@requires_kde
def test_kernel_checks_direct_calls():
    with pytest.raises(RuntimeError, match="same number of columns"):
        torch.ops.mmim_ext.kde_lse(torch.randn(3, 2), torch.randn(4, 3), 1.0)
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        torch.ops.mmim_ext.kde_lse(torch.randn(3, 2), torch.tensor([[float("inf"), 0.0]]), 1.0)
    with pytest.raises(RuntimeError, match="'scale' must be finite"):
        torch.ops.mmim_ext.kde_lse(torch.randn(3, 2), torch.randn(4, 2), -2.0)


_SCRIPT = r"""
import json, sys
import torch
import mmim_ext
from mmim_ext.ops.kde import kde_fused_available
from mmim_ext.infoplane import kde_mi
sys.path.insert(0, sys.argv[1])
from test_kde import _fallback_case
json.dump({"fused": kde_fused_available("cpu"), **_fallback_case()}, sys.stdout)
"""


def _fallback_case():
    """kde_lse, its gradient and kde_mi on fixed data (run in this process and in a subprocess)."""
    from mmim_ext.infoplane import kde_mi

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(30, 4, generator=g, dtype=torch.float64)
    out = kde_lse(x, y, 0.4)
    (gx,) = torch.autograd.grad(out.sum(), (x,))
    t = torch.tanh(torch.randn(80, 3, generator=g, dtype=torch.float64))
    lab = torch.randint(0, 3, (80,), generator=g)
    return {"out": out.tolist(), "gx": gx.tolist(), "mi": kde_mi(t, lab, 0.05)}


@requires_kde
def test_fallback_without_extension_gives_same_numbers():
    # Only the fallback runs in a subprocess (importing torch there is the slow part).
    env = dict(os.environ, MMIM_EXT_DISABLE="1")
    res = subprocess.run([sys.executable, "-c", _SCRIPT, os.path.dirname(os.path.abspath(__file__))],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    fallback = json.loads(res.stdout)
    fused = _fallback_case()
    assert kde_fused_available("cpu") and not fallback["fused"]
    for key in ("out", "gx"):
        torch.testing.assert_close(torch.tensor(fused[key]), torch.tensor(fallback[key]), rtol=1e-10, atol=1e-10)
    for key, val in fused["mi"].items():
        assert math.isclose(val, fallback["mi"][key], rel_tol=1e-9, abs_tol=1e-9), key
