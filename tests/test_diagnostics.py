"""Diagnostics on constructed cases with known answers."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from mmim_ext.diagnostics import (GradientSNR, ResidualBlock, ResidualRatioMonitor, jacobian_norm_max, lipschitz_bound,
                                  margin_quantiles, margins, residual_ratios, separability_probe, summarize,
                                  svm_alignment, weight_norms)


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


def _component_data(rng, n):
    y = rng.integers(0, 2, n)
    big = rng.normal(size=n) * 5
    # Two perfectly correlated noisy columns dominate the first principal component; the class
    # sits on the third column, which is the second component.
    feats = np.stack([big, (2 * y - 1) + 0.05 * rng.normal(size=n), big + 0.01 * rng.normal(size=n)], 1)
    return feats, y


@pytest.mark.parametrize("classifier", ["linear_svm", "knn"])
def test_separability_probe_held_out_needs_the_right_component(classifier):
    rng = np.random.default_rng(0)
    feats, y = _component_data(rng, 300)
    test_feats, test_y = _component_data(rng, 200)
    res = separability_probe(torch.tensor(feats), torch.tensor(y), test_features=torch.tensor(test_feats),
                             test_y=torch.tensor(test_y), classifier=classifier)
    acc = {r["n_components"]: r["test_accuracy"] for r in res}
    assert [r["n_components"] for r in res] == [1, 2, 3]
    assert acc[1] < 0.75 and acc[2] == 1.0 and acc[3] == 1.0
    assert res[0]["explained_variance"] == pytest.approx(2 / 3, abs=0.02) and res[-1]["explained_variance"] == pytest.approx(1.0)
    # Without a test split only the training accuracy is reported.
    train_only = separability_probe(feats, y, classifier=classifier)
    assert all(r["test_accuracy"] is None for r in train_only) and train_only[1]["train_accuracy"] == 1.0
    with pytest.raises(ValueError, match="n_components"):
        separability_probe(feats, y, [0])
    with pytest.raises(ValueError, match="two classes"):
        separability_probe(feats, np.zeros(300))
    with pytest.raises(ValueError, match="go together"):
        separability_probe(feats, y, test_features=test_feats)
    with pytest.raises(ValueError, match="classifier"):
        separability_probe(feats, y, classifier="tree")


def test_separability_probe_held_out_exposes_memorization_and_fits_on_train_only():
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(1)
    # Random labels on random features: 1-nearest-neighbour memorizes the training split
    # (training accuracy 1) and is at chance on held-out samples.
    X, y = rng.normal(size=(400, 20)), rng.integers(0, 2, 400)
    Xt, yt = rng.normal(size=(2000, 20)), rng.integers(0, 2, 2000)
    (r,) = separability_probe(X, y, [20], test_features=Xt, test_y=yt, classifier="knn", n_neighbors=1)
    assert r["train_accuracy"] == 1.0 and abs(r["test_accuracy"] - 0.5) < 0.05
    # The test projection uses the training split's centring, scaling and components.
    Xt2 = Xt[:300] * 3.0 + 7.0  # a test split with other statistics
    (r2,) = separability_probe(X, y, [5], test_features=Xt2, test_y=yt[:300], classifier="knn", n_neighbors=3)
    mu, sd = X.mean(0), X.std(0)
    pca = PCA(n_components=5, random_state=0).fit((X - mu) / sd)
    knn = KNeighborsClassifier(n_neighbors=3).fit(pca.transform((X - mu) / sd), y)
    assert r2["test_accuracy"] == pytest.approx(knn.score(pca.transform((Xt2 - mu) / sd), yt[:300]))


def _max_margin_clouds(seed=0, n=100):
    """Two point clouds mirrored through the plane h_0 = 0: class 1 at h_0 >= 1, class 0 at h_0 <= -1.

    Support points sit on h_0 = +-1 at both ends of the h_1 range, so the maximum-margin separator
    is h_0 = 0 with margin 1.
    """
    rng = np.random.default_rng(seed)
    half = np.stack([1.0 + rng.uniform(0, 2, n), rng.uniform(-3, 3, n)], 1)
    half[:2] = [[1.0, -3.0], [1.0, 3.0]]
    h = np.concatenate([half, half * np.array([-1.0, 1.0])])
    y = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
    return torch.tensor(h), torch.tensor(y)


def test_svm_alignment_max_margin_head_has_cosine_one():
    h, y = _max_margin_clouds()
    # Head weights set to the max-margin direction: w_1 - w_0 = (4, 0), b_1 - b_0 = 0.
    w = torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    res = svm_alignment(h, y, w, torch.zeros(2, dtype=torch.float64))
    (pair,) = res["pairs"]
    assert pair["classes"] == [0, 1] and pair["n"] == 200 and pair["converged"]
    assert pair["cosine"] == pytest.approx(1.0, abs=1e-6) and res["cosine_min"] == pair["cosine"]
    assert pair["net_margin"] == pytest.approx(1.0, abs=1e-9)
    assert pair["svm_margin"] == pytest.approx(1.0, abs=1e-3) and pair["svm_train_accuracy"] == 1.0
    # The same head with the labels swapped points the wrong way: cosine -1, every sample on the
    # wrong side (the minimum margin is minus the farthest |h_0|), while the SVM still finds the
    # margin-1 separator.
    swapped = svm_alignment(h, 1 - y, w, None)
    assert swapped["cosine_min"] == pytest.approx(-1.0, abs=1e-6)
    assert swapped["net_margin_min"] == pytest.approx(-float(h[:, 0].abs().max()), abs=1e-9)
    assert swapped["svm_margin_min"] == pytest.approx(1.0, abs=1e-3)
    # A tilted head still separates the clouds but is not the max-margin direction.
    ang = 0.3
    wt = torch.tensor([[-math.cos(ang), -math.sin(ang)], [0.0, 0.0]], dtype=torch.float64)
    tilted = svm_alignment(h, y, wt, None)
    assert tilted["cosine_min"] == pytest.approx(math.cos(ang), abs=1e-4)
    assert 0 < tilted["net_margin_min"] < tilted["svm_margin_min"] - 0.1


def test_svm_alignment_three_classes_and_errors():
    h2, y2 = _max_margin_clouds(n=40)
    h = torch.cat([h2, torch.tensor([[0.0, 20.0]], dtype=torch.float64) + torch.randn(30, 2, dtype=torch.float64)])
    y = torch.cat([y2, torch.full((30,), 2)])
    w = torch.randn(3, 2, dtype=torch.float64)
    res = svm_alignment(h, y, w)
    assert [p["classes"] for p in res["pairs"]] == [[0, 1], [0, 2], [1, 2]]
    assert all(-1 - 1e-12 <= p["cosine"] <= 1 + 1e-12 for p in res["pairs"])
    with pytest.raises(ValueError, match="'weight' must be"):
        svm_alignment(h, y, torch.randn(3, 5))
    with pytest.raises(ValueError, match="labels in 'y'"):
        svm_alignment(h, y, torch.randn(2, 2))
    with pytest.raises(ValueError, match="'bias'"):
        svm_alignment(h, y, w, torch.zeros(2))


def test_lipschitz_bound_linear_known_norms():
    lin = nn.Linear(3, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.diag(torch.tensor([3.0, -0.5, 2.0])))
    assert lipschitz_bound(lin) == pytest.approx(3.0, rel=1e-6)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    lin2 = nn.Linear(5, 5).double()
    with torch.no_grad():
        lin2.weight.copy_(0.7 * q)
    assert lipschitz_bound(lin2) == pytest.approx(0.7, rel=1e-9)
    # Product over a nested Sequential with 1-Lipschitz activations; Sigmoid counts 1/4.
    branch = nn.Sequential(lin, nn.Tanh(), nn.Sequential(nn.Linear(3, 5), nn.ReLU()))
    with torch.no_grad():
        branch[2][0].weight.copy_(torch.zeros(5, 3))
        branch[2][0].weight[0, 0] = 1.5
    assert lipschitz_bound(branch) == pytest.approx(4.5, rel=1e-6)
    assert lipschitz_bound(nn.Sequential(lin, nn.Sigmoid())) == pytest.approx(0.75, rel=1e-6)


def test_lipschitz_bound_conv_known_norms():
    torch.manual_seed(0)
    # A 1x1 convolution applies the same channel matrix M at every pixel: its norm is ||M||_2.
    conv = nn.Conv2d(4, 3, 1).double()
    M = conv.weight.detach()[:, :, 0, 0]
    assert lipschitz_bound(conv, (4, 6, 5)) == pytest.approx(float(torch.linalg.matrix_norm(M, 2)), rel=1e-6)
    # A circular single-channel convolution is diagonalized by the 2-D DFT: its norm is the
    # largest |DFT| of the kernel zero-padded to the image size.
    circ = nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular", bias=True).double()
    H, W = 8, 6
    kern = torch.zeros(H, W, dtype=torch.float64)
    kern[:3, :3] = circ.weight.detach()[0, 0]
    want = float(torch.fft.fft2(kern).abs().max())
    assert lipschitz_bound(circ, (1, H, W)) == pytest.approx(want, rel=1e-6)
    # Shapes propagate through a conv stack (stride 2 halves the image for the second layer).
    stack = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 3, 1))
    assert lipschitz_bound(stack, (1, 8, 6)) > 0


def test_lipschitz_bound_errors_name_the_module():
    with pytest.raises(TypeError, match=r"'1' \(GELU\)"):
        lipschitz_bound(nn.Sequential(nn.Linear(2, 2), nn.GELU()))
    with pytest.raises(TypeError, match="BatchNorm1d"):
        lipschitz_bound(nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="input_shape"):
        lipschitz_bound(nn.Sequential(nn.Conv1d(1, 1, 3)))
    with pytest.raises(TypeError, match="LeakyReLU"):
        lipschitz_bound(nn.LeakyReLU(2.0))


def test_jacobian_norm_max_linear_and_tanh():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    x = torch.randn(50, 4, dtype=torch.float64)
    norms = jacobian_norm_max(lin, x, chunk=16, return_all=True)
    torch.testing.assert_close(norms, torch.full((50,), float(torch.linalg.matrix_norm(lin.weight.detach(), 2)),
                                                 dtype=torch.float64))
    branch = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    local = jacobian_norm_max(branch, x)
    assert 0 < local <= lipschitz_bound(branch) + 1e-9
    # At x = 0 with zero biases the Jacobian is W2 W1 exactly.
    with torch.no_grad():
        branch[0].bias.zero_()
    j0 = jacobian_norm_max(branch, torch.zeros(1, 4, dtype=torch.float64))
    assert j0 == pytest.approx(float(torch.linalg.matrix_norm((branch[2].weight @ branch[0].weight).detach(), 2)), rel=1e-9)


def test_residual_block_certified_invertible_when_lipschitz_below_one():
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).double()
    with torch.no_grad():
        for m in (branch[0], branch[2]):
            m.weight.mul_(0.8 / float(torch.linalg.matrix_norm(m.weight, 2)))
    L = lipschitz_bound(branch)
    assert L == pytest.approx(0.64, rel=1e-9)
    block = ResidualBlock(branch)
    x = torch.randn(200, 6, dtype=torch.float64) * 3
    with torch.no_grad():
        y = block(x)
        # Injective: ||y1 - y2|| >= (1 - L) ||x1 - x2|| for every pair ...
        exact = "donot_use_mm_for_euclid_dist"
        dy, dx = torch.cdist(y, y, compute_mode=exact), torch.cdist(x, x, compute_mode=exact)
        assert bool((dy >= (1 - L) * dx - 1e-9).all())
        # ... and invertible: x = y - F(x) is a contraction with fixed point x.
        z = y.clone()
        for _ in range(200):
            z = y - branch(z)
    torch.testing.assert_close(z, x, atol=1e-10, rtol=0)


def test_residual_block_with_lipschitz_above_one_is_not_injective():
    lin = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.fill_(-2.0)
    branch = nn.Sequential(nn.ReLU(), lin)  # F(x) = -2 relu(x)
    assert lipschitz_bound(branch) == pytest.approx(2.0)
    block = ResidualBlock(branch)
    x = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
    assert y[0, 0] == y[1, 0] == -1.0  # two inputs, one output
    # The per-sample ratio does not see it: ||F(x)|| / ||x|| is 2 at x = 1 but 0 at x = -1.
    torch.testing.assert_close(residual_ratios(block, x), torch.tensor([2.0, 0.0], dtype=torch.float64))


def test_summarize():
    s = summarize(torch.arange(101, dtype=torch.float64))
    assert s["q05"] == pytest.approx(5.0) and s["q50"] == pytest.approx(50.0) and s["q95"] == pytest.approx(95.0)
    assert s["min"] == 0.0 and s["max"] == 100.0 and s["n"] == 101
