"""Conditional MI with critics that see the label (issue 31 item 1).

The case every test here is built on: two equiprobable classes, N(0, 1) marginals, correlation
+0.8 in one class and -0.8 in the other. ``I(A; B | Y) = -1/2 log(1 - 0.64) = 0.511`` nats in
each class, so also conditionally; a critic that does not see the label can only score the
mixture, whose dependence is much weaker (about 0.18 nats).
"""

from __future__ import annotations

import math

import pytest
import torch

import mmim_ext
from test_estimators import expected_pairwise, generator_copy

TRUTH = -0.5 * math.log(1 - 0.64)  # 0.511 nats

pytestmark = pytest.mark.usefixtures("one_thread")


def opposite_correlations(n, seed, rho=0.8):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    a = torch.randn(n, generator=g)
    r = torch.where(y == 0, rho, -rho)
    b = r * a + math.sqrt(1 - rho * rho) * torch.randn(n, generator=g)
    return torch.stack([a, b], 1), y


def _train(mod, h, y, steps, lr, batch=500, use_labels=True):
    opt = torch.optim.Adam(mod.parameters(), lr=lr)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        idx = torch.randint(0, h.shape[0], (batch,), generator=g)
        _, loss = mod.critic_loss(h[idx], y[idx] if use_labels else None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mod


def test_label_aware_pairwise_critics_find_the_conditional_mi():
    # 300 Adam steps on batches of 500 from 4000 samples, evaluated on 4000 held-out samples with
    # 256 shifts per class. Measured with these seeds: label-aware 0.483, label-blind (critic
    # without the label, negatives within class) 0.171.
    h, y = opposite_correlations(4000, 0)
    hv, yv = opposite_correlations(4000, 1)
    torch.manual_seed(0)
    aware = _train(mmim_ext.PairwiseMINE(2, num_classes=2, seed=0), h, y, 300, 5e-3)
    torch.manual_seed(0)
    with pytest.warns(FutureWarning, match="num_classes"):
        blind = _train(mmim_ext.PairwiseMINE(2, seed=0), h, y, 300, 5e-3)
    est_aware = float(aware.evaluate(hv, yv)[0])
    with pytest.warns(FutureWarning):
        est_blind = float(blind.evaluate(hv, yv)[0])
    assert abs(est_aware - TRUTH) < 0.05, (est_aware, TRUTH)
    assert est_blind < TRUTH - 0.2, est_blind
    assert aware.wa.shape == (2, 1, 16) and aware._ema.log_acc.shape == (2, 1)


def test_label_aware_total_correlation_finds_the_conditional_value():
    # Two variables: the total correlation is the MI. The critic sees [h, onehot(y)]. Measured
    # with these seeds (250 steps, batches of 256): label-aware 0.458, label-blind 0.152 (400
    # steps of 500 with 4 draws gave 0.496 and 0.189).
    h, y = opposite_correlations(3000, 2)
    hv, yv = opposite_correlations(3000, 3)
    torch.manual_seed(0)
    aware = _train(mmim_ext.TotalCorrelationMINE(2, hidden=32, num_classes=2, seed=0), h, y, 250, 3e-3, 256)
    torch.manual_seed(0)
    with pytest.warns(FutureWarning, match="num_classes"):
        blind = _train(mmim_ext.TotalCorrelationMINE(2, hidden=32, seed=0), h, y, 250, 3e-3, 256)
    est_aware = float(aware.evaluate(hv, yv))
    with pytest.warns(FutureWarning):
        est_blind = float(blind.evaluate(hv, yv))
    assert abs(est_aware - TRUTH) < 0.1, (est_aware, TRUTH)
    assert est_blind < TRUTH - 0.2, est_blind


@pytest.mark.parametrize("negatives", ["shuffle", "shift"])
@pytest.mark.parametrize("per_pair", [True, False])
def test_unconditional_estimates_are_the_ops_with_the_same_seed(negatives, per_pair):
    # An unconditional module's estimates (critic_loss, forward, penalty) are those of
    # pair_stats on the standardized batch with the negatives make_perms draws from a generator
    # seeded like the module's: the conditional machinery leaves them unchanged.
    g = torch.Generator().manual_seed(4)
    h = torch.randn(64, 4, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    mod = mmim_ext.PairwiseMINE(4, hidden=8, per_pair=per_pair, negatives=negatives, num_negatives=3,
                                seed=123).double()
    ref_gen = torch.Generator().manual_seed(123)
    for call in (mod.critic_loss, mod, mod.penalty):
        want = expected_pairwise(mod, h, None, None, ref_gen)
        est, _ = call(h)
        assert torch.allclose(est.detach(), want, rtol=1e-10, atol=1e-12), call


def test_conditional_critic_loss_and_evaluate_combine_the_classes():
    # critic_loss and evaluate of a conditional module against the per-class formula (class 2
    # has one sample: skipped, the weights renormalized over the other two classes).
    g = torch.Generator().manual_seed(8)
    labels = torch.tensor([0] * 20 + [1] * 11 + [2])[torch.randperm(32, generator=g)]
    h = torch.randn(32, 3, generator=g, dtype=torch.float64)
    mod = mmim_ext.PairwiseMINE(3, hidden=4, num_classes=3, num_negatives=2, seed=5).double().eval()
    want = expected_pairwise(mod, h, labels, None, generator_copy(mod))
    est, loss = mod.critic_loss(h, labels)
    assert torch.allclose(est.detach(), want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(loss, -want.sum(), rtol=1e-10, atol=1e-12)  # eval mode: the plain DV loss
    loss.backward()
    assert float(mod.wa.grad[2].abs().sum()) == 0.0 and float(mod.wa.grad[:2].abs().sum()) > 0
    ev = mod.evaluate(h, labels, negatives="all")
    want_ev = expected_pairwise(mod, h, labels, None, None, negatives="all")
    assert torch.allclose(ev, want_ev, rtol=1e-10, atol=1e-12)


def test_conditional_bad_input():
    h = torch.randn(20, 3)
    mod = mmim_ext.PairwiseMINE(3, num_classes=4)
    with pytest.raises(ValueError, match="'labels' is required"):
        mod.critic_loss(h)
    with pytest.raises(ValueError, match="'labels' holds values in"):
        mod.penalty(h, torch.full((20,), 4))
    with pytest.raises(ValueError, match="no class with two or more samples"):
        mod.critic_loss(h[:3], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="num_classes"):
        mmim_ext.PairwiseMINE(3, num_classes=1)
    tc = mmim_ext.TotalCorrelationMINE(3, num_classes=2)
    with pytest.raises(ValueError, match="'labels' is required"):
        tc.penalty(h)
    with pytest.raises(ValueError, match="'labels' holds values in"):
        tc.critic_loss(h, torch.full((20,), 2))


@pytest.mark.parametrize("mode", ["pairwise", "total"])
def test_regularizer_c5_critics_see_the_label(mode):
    # C5 = -I(h|Y): its critics are built with num_classes; the term is minus the critic's
    # penalty on the same negatives (the regularizer's random state restored between the two).
    import copy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(48, 4, generator=g)
    y = torch.randint(0, 3, (48,), generator=g)
    reg = mmim_ext.make_regularizer("rdm", 4, 3, mode=mode, seed=1).eval()
    assert reg.c5_critic.num_classes == 3 and reg.c4_critic.num_classes is None
    if mode == "pairwise":
        assert reg.c5_critic.wa.shape == (3, 6, 16)
    critic = copy.deepcopy(reg.c5_critic)
    reg(h, y)
    est, _ = critic.penalty(h, y)
    assert reg.terms["c5"] == pytest.approx(-float(est.sum()), rel=1e-6, abs=1e-7)
