"""Diagnostics on constructed cases with known answers."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from mmim_ext.diagnostics import (GradientSNR, ResidualBlock, ResidualRatioMonitor, margin_quantiles, margins,
                                  residual_ratios, separability_probe, summarize, weight_norms)


class Scale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return self.c * x


def test_gradient_snr_known_answer():
    lin = nn.Linear(2, 1, bias=False)
    model = nn.Sequential(lin)
    snr = GradientSNR(model)
    assert list(snr.layers) == ["0"]
    for g in ([1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [2.0, 4.0]):
        lin.weight.grad = torch.tensor([g])
        snr.step()
    out = snr.end_epoch(epoch=7)["0"]
    grads = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [2.0, 4.0]])
    mean_norm = np.linalg.norm(grads.mean(0))
    std_norm = np.linalg.norm(grads.std(0, ddof=1))
    assert out["mean_norm"] == pytest.approx(mean_norm, rel=1e-12)
    assert out["std_norm"] == pytest.approx(std_norm, rel=1e-12)
    assert out["snr"] == pytest.approx(mean_norm / std_norm, rel=1e-12)
    assert out["n_batches"] == 4 and snr.history[-1]["epoch"] == 7
    with pytest.raises(RuntimeError, match="at least 2"):
        snr.end_epoch()  # reset: nothing accumulated since


def test_gradient_snr_identical_batches_is_infinite_and_training_loop_works():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    snr = GradientSNR(model)
    assert set(snr.layers) == {"0", "2"}
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    for _ in range(3):  # the same batch and weights: zero spread
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        snr.step()
    out = snr.end_epoch()
    assert all(v["snr"] == math.inf and v["mean_norm"] > 0 for v in out.values())


def test_weight_norms():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
        model[2].weight.fill_(1.0)
    assert weight_norms(model) == pytest.approx({"0": 5.0, "2": math.sqrt(2.0)})
    with pytest.raises(ValueError, match="no 'weight'"):
        weight_norms(model, {"act": model[1]})


def test_residual_ratio_half_branch():
    block = ResidualBlock(Scale(0.5))
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(block(x), 1.5 * x)
    torch.testing.assert_close(residual_ratios(block, x), torch.full((32,), 0.5, dtype=torch.float64))
    # tanh, not ReLU, before the second block: a ReLU zeroes whole rows now and then (the
    # monitor skips ||x|| = 0 samples, so the count would vary with the random input).
    model = nn.Sequential(nn.Linear(6, 6), block, nn.Tanh(), ResidualBlock(Scale(2.0)))
    mon = ResidualRatioMonitor(model)
    model(x)
    model(x[:8])
    r = mon.ratios()
    assert set(r) == {"1", "3"} and r["1"].shape == (40,)
    torch.testing.assert_close(r["1"], torch.full((40,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(r["3"], torch.full((40,), 2.0, dtype=torch.float64))
    summ = mon.end_epoch(epoch=1)
    assert summ["1"]["q50"] == pytest.approx(0.5) and summ["1"]["frac_below_1"] == 1.0
    assert summ["3"]["q05"] == pytest.approx(2.0) and summ["3"]["frac_below_1"] == 0.0
    assert mon.ratios() == {}  # reset after end_epoch
    mon.enabled = False
    model(x)
    assert mon.ratios() == {}
    mon.enabled = True
    mon.remove()
    model(x)
    assert mon.ratios() == {}


def test_residual_ratio_projection_shortcut_and_named_branch():
    # shortcut(x) = 2x, branch F(x) = 0.5x: ||F|| / ||shortcut(x)|| = 0.25
    blk = ResidualBlock(Scale(0.5), shortcut=Scale(2.0))
    model = nn.Sequential(blk)
    mon = ResidualRatioMonitor(model)
    x = torch.randn(10, 3, 4)
    model(x)
    torch.testing.assert_close(mon.ratios()["0"], torch.full((10,), 0.25, dtype=torch.float64))
    # A user's own residual code: hook the branch by name.
    class MyBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = Scale(0.5)

        def forward(self, x):
            return x + self.f(x)

    m2 = nn.Sequential(MyBlock())
    mon2 = ResidualRatioMonitor(m2, branches=["0.f"])
    x2 = torch.randn(5, 7)
    x2[2] = 0.0  # ratio undefined: skipped
    m2(x2)
    torch.testing.assert_close(mon2.ratios()["0.f"], torch.full((4,), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="no ResidualBlock"):
        ResidualRatioMonitor(m2)


def test_margins_separable_toy_set():
    g = torch.Generator().manual_seed(0)
    n = 200
    y = torch.randint(0, 2, (n,), generator=g)
    sign = 2.0 * y.double() - 1.0
    h = torch.stack([sign * (0.5 + torch.rand(n, generator=g, dtype=torch.float64)),
                     torch.randn(n, generator=g, dtype=torch.float64)], 1)
    # The maximum-margin separator of this set is h_0 = 0; z_1 - z_0 = 2 h_0 * 3.
    lin = nn.Linear(2, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-3.0, 0.0], [3.0, 0.0]], dtype=torch.float64))
        lin.bias.zero_()
    raw, nrm = margins(lin(h), y, lin.weight)
    assert (raw > 0).all()
    torch.testing.assert_close(raw, 6.0 * h[:, 0].abs())
    # Normalized margin = Euclidean distance of h to the boundary h_0 = 0.
    torch.testing.assert_close(nrm, h[:, 0].abs())
    q = margin_quantiles(lin(h), y, lin.weight)
    assert q["raw"]["frac_positive"] == 1.0 and q["normalized"]["min"] > 0.49
    assert q["normalized"]["q50"] == pytest.approx(float(h[:, 0].abs().median()), abs=0.02)
    # Flipping the labels flips every margin.
    raw_bad, _ = margins(lin(h), 1 - y, lin.weight)
    assert (raw_bad < 0).all()


def test_margins_multiclass_definition():
    z = torch.tensor([[3.0, 1.0, 2.5], [0.0, 0.0, 1.0], [1.0, 2.0, -1.0]])
    y = torch.tensor([0, 2, 0])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    raw, nrm = margins(z, y, w)
    torch.testing.assert_close(raw, torch.tensor([0.5, 1.0, -1.0], dtype=torch.float64))
    # ||w0-w1|| = sqrt2, ||w0-w2|| = 1, ||w2-w0|| = 1, ||w2-w1|| = 1
    want0 = min((3.0 - 1.0) / math.sqrt(2), (3.0 - 2.5) / 1.0)
    want2 = min((1.0 - 2.0) / math.sqrt(2), (1.0 + 1.0) / 1.0)
    torch.testing.assert_close(nrm, torch.tensor([want0, 1.0, want2], dtype=torch.float64))
    with pytest.raises(ValueError, match="labels"):
        margins(z, torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="C >= 2"):
        margins(torch.randn(3, 1), torch.zeros(3, dtype=torch.long))


def test_separability_probe_needs_the_right_component():
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 2, n)
    big = rng.normal(size=n) * 5
    # Two perfectly correlated noisy columns dominate the first principal component; the class
    # sits on the third column, which is the second component.
    feats = np.stack([big, (2 * y - 1) + 0.05 * rng.normal(size=n), big + 0.01 * rng.normal(size=n)], 1)
    res = separability_probe(torch.tensor(feats), torch.tensor(y))
    acc = {r["n_components"]: r["accuracy"] for r in res}
    assert [r["n_components"] for r in res] == [1, 2, 3]
    assert acc[1] < 0.75 and acc[2] == 1.0 and acc[3] == 1.0
    assert res[0]["explained_variance"] == pytest.approx(2 / 3, abs=0.02) and res[-1]["explained_variance"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="n_components"):
        separability_probe(feats, y, [0])
    with pytest.raises(ValueError, match="two classes"):
        separability_probe(feats, np.zeros(n))


def test_summarize():
    s = summarize(torch.arange(101, dtype=torch.float64))
    assert s["q05"] == pytest.approx(5.0) and s["q50"] == pytest.approx(50.0) and s["q95"] == pytest.approx(95.0)
    assert s["min"] == 0.0 and s["max"] == 100.0 and s["n"] == 101
