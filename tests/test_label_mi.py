"""I(Y; h) of a whole layer (LabelMINE, estimate_label_mi, estimate_unit_label_mi), the ``iyh``
regularizer built on it, early stopping in train_classifier, and the Table 1 statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmim_ext.estimators import LabelMINE, estimate_label_mi, estimate_unit_label_mi
from mmim_ext.regularizers import LabelMIRegularizer, make_regularizer


def _two_class_data(n=3000, mu=1.0, extra=2, seed=0):
    """Y uniform on {0, 1}; h_0 | y ~ N(±mu, 1); ``extra`` pure-noise columns."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    h = torch.randn(n, 1 + extra, generator=g)
    h[:, 0] += (2 * y - 1).float() * mu
    return h, y


def _truth(mu):
    """I(Y; h_0) = H(h_0) − H(h_0 | Y) by quadrature (nats)."""
    xs = np.linspace(-14, 14, 400001)
    pdf = 0.5 * (np.exp(-(xs - mu) ** 2 / 2) + np.exp(-(xs + mu) ** 2 / 2)) / math.sqrt(2 * math.pi)
    h = -np.sum(pdf * np.log(pdf)) * (xs[1] - xs[0])
    return h - 0.5 * math.log(2 * math.pi * math.e)


@pytest.mark.parametrize("mu", [0.5, 1.5])
def test_label_mi_matches_quadrature(mu):
    h, y = _two_class_data(mu=mu)
    truth = _truth(mu)
    est, low, high = estimate_label_mi(h, y, max_epochs=60, patience=8, return_ci=True)
    assert est == pytest.approx(truth, abs=0.04)
    assert low < est < high and high - low < 0.2
    units, ulow, uhigh = estimate_unit_label_mi(h, y, max_epochs=60, patience=8, return_ci=True)
    assert units.shape == ulow.shape == uhigh.shape == (3,) and units.dtype == torch.float32
    assert bool((ulow <= units).all() and (units <= uhigh).all())
    assert float(units[0]) == pytest.approx(truth, abs=0.04)
    assert float(units[1:].abs().max()) < 0.03  # noise units carry no label information
    # the interval is computed on the test bound itself: the same value without return_ci
    assert estimate_label_mi(h, y, max_epochs=60, patience=8) == pytest.approx(est, abs=1e-5)


def test_label_estimates_not_positively_biased_on_independent_data():
    """The test-split bound of the critic chosen on the validation split: over 20 seeds of
    independent (label, features) its mean is not positive by more than its standard error.
    (The best validation bound over epochs, a maximum of noisy values, was: +0.0014 +- 0.0008
    for estimate_label_mi at these settings.)"""
    label, units = [], []
    for s in range(20):
        g = torch.Generator().manual_seed(100 + s)
        h, y = torch.randn(800, 3, generator=g), torch.randint(0, 3, (800,), generator=g)
        kw = dict(max_epochs=20, patience=3, lr_decays=0, seed=s)
        label.append(estimate_label_mi(h, y, hidden=16, **kw))
        units.append(float(estimate_unit_label_mi(h[:, :2], y, hidden=8, **kw).mean()))
    for vals in (np.array(label), np.array(units)):
        assert vals.mean() <= vals.std(ddof=1) / math.sqrt(len(vals)), vals


@pytest.mark.parametrize("estimator", ["mine", "nwj", "smile"])
def test_label_bootstrap_weights_equal_resampled_data(estimator):
    """A bootstrap replicate of the label bound (multiplicities w) equals the module's bound on
    the data set that repeats sample n w_n times, label marginal included."""
    from mmim_ext.estimators import UnitLabelMINE
    from mmim_ext.estimators.intervals import _resample_weights, label_weighted_bounds

    torch.manual_seed(0)
    h, y = torch.randn(60, 3, dtype=torch.float64), torch.randint(0, 4, (60,))
    y[:4] = torch.arange(4)
    w = _resample_weights(60, 3, torch.Generator().manual_seed(1))
    for mod in (LabelMINE(3, 4, hidden=8, estimator=estimator, standardize=False).double(),
                UnitLabelMINE(3, 4, hidden=8, estimator=estimator, standardize=False).double()):
        with torch.no_grad():
            for p in mod.parameters():
                p.add_(torch.randn_like(p))  # scores well away from 0, beyond SMILE's clip
        got = label_weighted_bounds(estimator, mod._class_scores(h, y), y, w, smile_clip=mod.smile_clip)
        for r in range(w.shape[0]):
            idx = torch.repeat_interleave(torch.arange(60), w[r].long())
            want = mod.evaluate(h[idx], y[idx]).reshape(-1)
            torch.testing.assert_close(got[r], want.double(), rtol=1e-9, atol=1e-9)


def test_label_mine_bad_input():
    mod = LabelMINE(4, 3)
    with pytest.raises(ValueError, match="labels"):
        mod.critic_loss(torch.randn(8, 4), None)
    with pytest.raises(ValueError, match="columns"):
        mod.penalty(torch.randn(8, 5), torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        mod.evaluate(torch.randn(8, 4), torch.full((8,), 3))
    with pytest.raises(ValueError, match="16 training"):
        estimate_label_mi(torch.randn(20, 2), torch.randint(0, 2, (20,)))
    with pytest.raises(ValueError, match="estimator"):
        LabelMINE(4, 3, estimator="bogus")


@pytest.mark.parametrize("estimator", ["mine", "nwj", "smile"])
def test_label_mine_frozen_penalty_moves_only_features(estimator):
    torch.manual_seed(0)
    mod = LabelMINE(5, 3, estimator=estimator)
    h = torch.randn(32, 5, requires_grad=True)
    y = torch.randint(0, 3, (32,))
    est, value = mod.penalty(h, y, coef=2.0)
    assert not est.requires_grad and value.item() == pytest.approx(2.0 * est.item(), abs=1e-6)
    value.backward()
    assert h.grad is not None and all(p.grad is None for p in mod.parameters())
    est2, loss2 = mod.critic_loss(h.detach(), y)
    assert est2.item() == pytest.approx(est.item(), abs=1e-6)
    loss2.backward()
    assert all(p.grad is not None for p in mod.parameters())
    assert float(mod.evaluate(h.detach(), y)) == pytest.approx(est.item(), abs=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        mod.evaluate(torch.full((8, 5), float("nan")), torch.zeros(8, dtype=torch.int64))


def test_iyh_regularizer_contract():
    torch.manual_seed(0)
    reg = make_regularizer("iyh", 6, 4, hidden=16)
    assert isinstance(reg, LabelMIRegularizer)
    y = torch.randint(0, 4, (64,))
    h = torch.randn(64, 6)
    h[:, 0] += 2.0 * y.float()  # label information in unit 0
    h.requires_grad_(True)
    before = [p.detach().clone() for p in reg.critic.parameters()]
    vals = [float(reg(h, y).detach()) for _ in range(150)]  # critic updates in training mode
    assert any(not torch.equal(b, p) for b, p in zip(before, reg.critic.parameters()))
    assert vals[-1] < -0.3 and reg.terms["iyh"] == pytest.approx(-vals[-1], abs=1e-6)
    reg.eval()
    frozen = [p.detach().clone() for p in reg.critic.parameters()]
    pen = reg(h, y)
    pen.backward()
    assert all(torch.equal(f, p) for f, p in zip(frozen, reg.critic.parameters()))
    assert h.grad is not None and float(h.grad[:, 0].abs().sum()) > 0
    with pytest.raises(ValueError, match="features"):
        reg(torch.randn(8, 5), torch.zeros(8, dtype=torch.int64))


# ----------------------------------------------------------------------------- early stopping

def _toy_loaders(seed=0):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 5, generator=g)
    y = (x[:, 0] > 0).long()
    xv = torch.randn(48, 5, generator=g)
    yv = torch.randint(0, 2, (48,), generator=g)  # random validation labels: overfitting shows at once
    tr = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g)
    return tr, DataLoader(TensorDataset(xv, yv), batch_size=48)


def test_early_stopping_and_best_checkpoint():
    from mmim_ext.training import evaluate_classifier, train_classifier

    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU())
    head = torch.nn.Linear(16, 2)
    tr, va = _toy_loaders()
    hist = train_classifier(body, head, tr, epochs=200, lr=1e-2, progress=False, val_loader=va, patience=3,
                            restore_best=True)
    losses = [r["val_loss"] for r in hist]
    best = int(np.argmin(losses))
    assert len(hist) == best + 1 + 3 < 200  # stopped exactly `patience` epochs after the minimum
    assert [r["best"] for r in hist].count(True) == 1 and hist[best]["best"]
    vl, _ = evaluate_classifier(body, head, va)
    assert vl == pytest.approx(losses[best], rel=1e-6)  # the best weights were restored
    with pytest.raises(ValueError, match="val_loader"):
        train_classifier(body, head, tr, epochs=1, patience=2, progress=False)


# ----------------------------------------------------------------------------- statistics

def test_paired_stats_hand_computed():
    from mmim_ext.experiments.statistics import holm, paired_stats

    st = paired_stats([1.0, 2.0, 3.0])
    # mean 2, sd 1, t_{0.975, 2} = 4.302653: half-width 4.302653 / sqrt(3)
    assert st["mean"] == 2.0 and st["sd"] == pytest.approx(1.0)
    assert st["ci95"] == pytest.approx([2 - 2.484138, 2 + 2.484138], abs=1e-5)
    # t = 2 / (1 / sqrt 3) = 3.4641 with 2 d.o.f.: two-sided p = 0.07418
    assert st["p_t"] == pytest.approx(0.074180, abs=1e-5)
    # Exact Wilcoxon, n = 3, all positive: p = 2 / 2^3
    assert st["p_wilcoxon"] == pytest.approx(0.25)
    assert (st["wins"], st["ties"], st["losses"]) == (3, 0, 0)
    z = paired_stats([0.0, 0.0, 0.0])
    assert z["p_t"] == 1.0 and z["p_wilcoxon"] == 1.0 and z["ci95"] == [0.0, 0.0]
    assert paired_stats([0.3, 0.3])["p_t"] is None  # zero spread, non-zero mean: t undefined
    one = paired_stats([0.5])
    assert one["ci95"] is None and one["p_t"] is None and one["wins"] == 1
    with pytest.raises(ValueError, match="finite"):
        paired_stats([1.0, float("nan")])
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
    assert adj == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
