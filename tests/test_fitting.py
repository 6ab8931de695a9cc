"""The one-call estimators' held-out protocol, intervals and marginal maps, at small sizes.

Accuracy at full size is in ``benchmarks/estimator_accuracy.py`` and the slow tests; coverage
over many data seeds in ``benchmarks/estimator_coverage.py``.
"""

import math

import pytest
import torch

import mmim_ext
from mmim_ext.estimators.intervals import bootstrap_bound, pair_scores, weighted_bounds
from mmim_ext.estimators.marginals import MarginalMap
from mmim_ext.estimators.negatives import make_perms

# Small, fast training for the protocol tests (their subject is the split and the interval,
# not the critic's accuracy).
FAST = dict(max_epochs=6, patience=2, lr_decays=0, batch_size=200, num_bootstrap=100)
TRAIN = {k: v for k, v in FAST.items() if k != "num_bootstrap"}


def gaussian_mi(rho):
    return -0.5 * math.log(1 - rho * rho)


def _pair(n, rho, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    return torch.stack([x, rho * x + math.sqrt(1 - rho * rho) * torch.randn(n, generator=g)], 1)


# ---------------------------------------------------------------------------------------------
# held out: no selection bias


def test_independent_data_mean_estimate_not_positive_beyond_its_standard_error():
    # Three independent units (three pairs) per seed; the per-seed mean over pairs, then the
    # mean over 20 seeds. The former protocol (best validation value per pair, a maximum over
    # epochs of noisy values) gave +0.0014 +- 0.0012 here with 15 epochs (-0.0002 +- 0.0011 with
    # 6); its bias grows with the number of epochs it maximizes over, the held-out bound's does not.
    per_seed = []
    for seed in range(20):
        h = torch.randn(400, 3, generator=torch.Generator().manual_seed(100 + seed))
        mat = mmim_ext.estimate_pairwise_mi(h, seed=seed, **TRAIN)
        per_seed.append(float(mat[torch.triu_indices(3, 3, 1).unbind()].mean()))
    x = torch.tensor(per_seed, dtype=torch.float64)
    mean, se = float(x.mean()), float(x.std() / math.sqrt(len(x)))
    assert mean <= se, (mean, se, per_seed)
    assert abs(mean) < 0.05, per_seed  # and not wildly negative either


def test_independent_vectors_mean_estimate_not_positive_beyond_its_standard_error():
    vals = []
    for seed in range(20):
        g = torch.Generator().manual_seed(200 + seed)
        vals.append(mmim_ext.estimate_mi(torch.randn(400, 2, generator=g), torch.randn(400, 2, generator=g),
                                         seed=seed, hidden=16, val_negatives=32, **TRAIN))
    x = torch.tensor(vals, dtype=torch.float64)
    assert float(x.mean()) <= float(x.std() / math.sqrt(len(x))), vals


def test_split_fraction_checks():
    h = _pair(1000, 0.6, 0)
    with pytest.raises(ValueError, match="test_fraction"):
        mmim_ext.estimate_pairwise_mi(h, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="16 test samples"):
        mmim_ext.estimate_mi(torch.randn(60, 1), torch.randn(60, 1), test_fraction=0.1)


# ---------------------------------------------------------------------------------------------
# intervals


def _sign_classes(n, seed):
    """Two equiprobable classes, correlation +0.8 in one and -0.8 in the other."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    h = _pair(n, 0.8, seed)
    return torch.stack([h[:, 0], torch.where(y == 1, h[:, 1], -h[:, 1])], 1), y


@pytest.mark.parametrize("fn", ["pairwise", "vector", "tc", "pairwise_cond", "tc_cond"])
def test_return_ci_gives_the_same_estimate_inside_its_interval(fn):
    h = _pair(1200, 0.7, 1)
    kw = dict(seed=0, **FAST)
    labels = ()
    if fn.endswith("_cond"):
        h, y = _sign_classes(1200, 1)
        labels = (y,)
    if fn.startswith("pairwise"):
        plain = mmim_ext.estimate_pairwise_mi(h, *labels, **kw)
        est, lo, hi = mmim_ext.estimate_pairwise_mi(h, *labels, return_ci=True, **kw)
        assert lo.shape == hi.shape == est.shape == (2, 2)
        assert torch.equal(lo, lo.t()) and float(hi.diagonal().abs().max()) == 0.0
        plain, est, lo, hi = (float(t[0, 1]) for t in (plain, est, lo, hi))
    elif fn == "vector":
        plain = mmim_ext.estimate_mi(h[:, :1], h[:, 1:], **kw)
        est, lo, hi = mmim_ext.estimate_mi(h[:, :1], h[:, 1:], return_ci=True, **kw)
    else:
        plain = mmim_ext.estimate_total_correlation(h, *labels, **kw)
        est, lo, hi = mmim_ext.estimate_total_correlation(h, *labels, return_ci=True, **kw)
    # the interval's own estimate is the module's evaluate on the same negatives (with labels:
    # label-aware critics, per-class bounds weighted by the class frequencies)
    assert abs(est - plain) < 1e-4, (est, plain)
    if labels:  # the conditional MI is 0.511 nats; a label-blind critic finds about 0.18
        assert est > 0.35, est
    assert lo < est < hi and hi - lo < 0.5, (lo, est, hi)


def test_interval_level_orders_widths():
    h = _pair(1200, 0.7, 2)
    _, lo90, hi90 = mmim_ext.estimate_pairwise_mi(h, return_ci=True, ci=0.8, seed=0, **FAST)
    _, lo99, hi99 = mmim_ext.estimate_pairwise_mi(h, return_ci=True, ci=0.99, seed=0, **FAST)
    assert float(lo99[0, 1]) <= float(lo90[0, 1]) and float(hi90[0, 1]) <= float(hi99[0, 1])


def test_intervals_cover_the_truth_over_seeds_at_small_size():
    # 20 data seeds at n = 600 (training 360, validation 120, test 120), truth 0.144 nats.
    # Measured: 16 of 20 intervals cover it, with FAST's short training and also with 40 epochs
    # and a learning-rate decay; the misses are estimates far below the truth (0.03): at this
    # size the critic's shortfall is not small against the test split's noise, and the interval
    # does not cover the shortfall. At n = 5,000 76 of 80 cover (benchmarks/estimator_coverage.py,
    # docs/estimators.md).
    truth = gaussian_mi(0.5)
    covered, ests = 0, []
    for seed in range(20):
        est, lo, hi = mmim_ext.estimate_pairwise_mi(_pair(600, 0.5, 300 + seed), return_ci=True, seed=seed,
                                                     val_negatives=64, **FAST)
        covered += float(lo[0, 1]) <= truth <= float(hi[0, 1])
        ests.append(float(est[0, 1]))
    assert covered >= 15, (covered, ests)


def test_weighted_bounds_equal_the_bound_of_an_explicit_resample():
    # A replicate's weighted sums are the bound of the resampled set whose negatives are the
    # pairs of distinct original samples: compare with that set built explicitly.
    g = torch.Generator().manual_seed(0)
    N, P = 30, 3
    joint = torch.randn(N, P, generator=g, dtype=torch.float64)
    full = torch.randn(N, N, P, generator=g, dtype=torch.float64)  # score of the pair (n, n')
    off = ~torch.eye(N, dtype=torch.bool)
    index = off.nonzero()
    marg = full[index[:, 0], index[:, 1]]
    pick = torch.randint(0, N, (N,), generator=g)
    w = torch.bincount(pick, minlength=N).double().unsqueeze(0)
    for estimator in ("mine", "nwj", "smile"):
        got = weighted_bounds(estimator, joint, marg, index, w, smile_clip=0.7)[0]
        t = joint[pick].mean(0)
        i, j = torch.meshgrid(pick, pick, indexing="ij")
        keep = i != j
        s = full[i[keep], j[keep]]
        if estimator == "smile":
            s = s.clamp(-0.7, 0.7)
        lme = torch.logsumexp(s, 0) - math.log(s.shape[0])
        want = t - torch.exp(lme - 1) if estimator == "nwj" else t - lme
        assert torch.allclose(got, want, atol=1e-5), (estimator, got, want)


def test_weighted_bounds_with_groups_average_the_class_bounds():
    g = torch.Generator().manual_seed(1)
    N = 40
    labels = torch.randint(0, 3, (N,), generator=g)
    joint = torch.randn(N, 1, generator=g, dtype=torch.float64)
    perms = make_perms(N, "shift", 5, labels, generator=g)
    index = torch.stack([torch.arange(N).repeat(5), perms.reshape(-1)], 1)
    marg = torch.randn(index.shape[0], 1, generator=g, dtype=torch.float64)
    got = weighted_bounds("mine", joint, marg, index, torch.ones(1, N), groups=labels)[0, 0]
    want = 0.0
    for c in range(3):
        rows = labels == c
        neg = labels[index[:, 0]] == c
        want += rows.double().mean() * (joint[rows].mean() - (torch.logsumexp(marg[neg, 0], 0) - math.log(int(neg.sum()))))
    assert torch.allclose(got, want.double(), atol=1e-6)


def test_bootstrap_interval_shrinks_with_more_samples():
    g = torch.Generator().manual_seed(2)
    widths = []
    for N in (100, 1600):
        joint = torch.randn(N, 1, generator=g) + 0.3
        perms = make_perms(N, "shift", 8, generator=g)
        index = torch.stack([torch.arange(N).repeat(8), perms.reshape(-1)], 1)
        marg = torch.randn(index.shape[0], 1, generator=g)
        _, lo, hi = bootstrap_bound("mine", joint, marg, index, num_bootstrap=200, generator=g)
        widths.append(float(hi - lo))
    assert widths[1] < widths[0] / 2.5, widths  # ~ 1/sqrt(N): a factor 4 expected


def test_pair_scores_match_the_op():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    h = torch.randn(64, 4, generator=g)
    perms = make_perms(64, "shift", 7, generator=g)
    index = torch.stack([torch.arange(64).repeat(7), perms.reshape(-1)], 1)
    for per_pair in (True, False):
        mod = mmim_ext.PairwiseMINE(4, hidden=5, per_pair=per_pair, standardize=False)
        with torch.no_grad():
            for p in mod.parameters():
                p.normal_(generator=g)
        joint, marg = pair_scores(mod, h, index, torch.arange(mod.num_pairs))
        params = [p.detach() if per_pair else p.detach()[0] for p in (mod.wa, mod.wb, mod.b, mod.v, mod.c)]
        t, lme = mmim_ext.pair_stats(h, *params, perms, mod.pairs)
        assert torch.allclose(joint.mean(0), t, atol=1e-4)
        assert torch.allclose(torch.logsumexp(marg, 0) - math.log(marg.shape[0]), lme, atol=1e-4)


def test_pair_scores_of_conditional_critics_use_the_class_critic():
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    h = torch.randn(50, 3, generator=g)
    labels = torch.randint(0, 3, (50,), generator=g)
    mod = mmim_ext.PairwiseMINE(3, hidden=4, standardize=False, num_classes=3)
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(generator=g)
    index = torch.randint(0, 50, (30, 2), generator=g)
    joint, marg = pair_scores(mod, h, index, torch.tensor([2, 0]), labels)
    for k, p in enumerate((2, 0)):
        i, j = mod.pairs[p].tolist()
        for n in (0, 7):
            y = int(labels[n])
            z = torch.relu(h[n, i] * mod.wa[y, p] + h[n, j] * mod.wb[y, p] + mod.b[y, p])
            assert torch.allclose(joint[n, k], (z * mod.v[y, p]).sum() + mod.c[y, p], atol=1e-5)
        a, b = index[5].tolist()
        y = int(labels[a])
        z = torch.relu(h[a, i] * mod.wa[y, p] + h[b, j] * mod.wb[y, p] + mod.b[y, p])
        assert torch.allclose(marg[5, k], (z * mod.v[y, p]).sum() + mod.c[y, p], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# marginal maps


def test_gaussianize_is_strictly_increasing_beyond_the_training_range():
    g = torch.Generator().manual_seed(4)
    train = torch.cat([torch.randn(500, 1, generator=g).pow(3), torch.randint(0, 5, (500, 1), generator=g).float()], 1)
    f = MarginalMap(train, "gaussianize")
    x = torch.linspace(-200, 200, 20001).unsqueeze(1).repeat(1, 2)
    z = f(x)
    assert torch.isfinite(z).all()
    assert (z[1:, 0] > z[:-1, 0]).all() and (z[1:, 1] > z[:-1, 1]).all()
    # on the training values: the normal quantile of the mid-rank ECDF (ties share one value)
    zt = f(train).double()
    ranks = train[:, 0].argsort().argsort().double()
    assert torch.allclose(zt[:, 0], torch.special.ndtri((ranks + 0.5) / 500), atol=1e-5)
    assert zt[:, 1].unique().numel() == 5
    assert abs(float(zt[:, 0].mean())) < 1e-3 and abs(float(zt[:, 0].std()) - 1) < 0.02


def test_gaussianize_makes_the_estimate_invariant_to_monotone_maps():
    h = _pair(1500, 0.7, 5)
    a = float(mmim_ext.estimate_pairwise_mi(h, seed=0, **TRAIN)[0, 1])
    warped = torch.stack([torch.exp(2 * h[:, 0]), h[:, 1].pow(3)], 1)
    b = float(mmim_ext.estimate_pairwise_mi(warped, seed=0, **TRAIN)[0, 1])
    # the training split maps to identical values; validation and test values between two
    # training values are interpolated in the warped scale, hence not bitwise equal
    assert abs(a - b) < 0.03, (a, b)


def test_standardize_map_and_bad_input():
    g = torch.Generator().manual_seed(6)
    train = 3 + 2 * torch.randn(200, 3, generator=g)
    f = MarginalMap(train, "standardize")
    assert torch.allclose(f(train).mean(0), torch.zeros(3), atol=1e-5)
    with pytest.raises(ValueError, match="'kind'"):
        MarginalMap(train, "rank")
    with pytest.raises(ValueError, match="3 columns"):
        f(torch.randn(5, 2))
    h = torch.randn(200, 2)
    with pytest.raises(ValueError, match="'marginals'"):
        mmim_ext.estimate_pairwise_mi(h, marginals="copula")
    with pytest.raises(ValueError, match="'ci'"):
        mmim_ext.estimate_mi(h[:, :1], h[:, 1:], return_ci=True, ci=95)
    with pytest.raises(ValueError, match="'num_bootstrap'"):
        mmim_ext.estimate_total_correlation(h, num_bootstrap=5)
    with pytest.raises(ValueError, match="'lr_decays'"):
        mmim_ext.estimate_pairwise_mi(h, lr_decays=-1)


# ---------------------------------------------------------------------------------------------
# Full-size accuracy (pytest -m slow; benchmarks/estimator_accuracy.py runs every case).


@pytest.mark.slow
def test_slow_student_t_pair_10k_samples():
    # bivariate t, nu = 2, shape correlation 0.5: heavy tails that standardized inputs leave to
    # the critic (the former protocol found 0.126 against 0.2265); measured with Gaussianized
    # marginals: 0.247, 0.216, 0.218 over the benchmark's data seeds 0-2.
    nu, rho, n = 2, 0.5, 10000
    lg, dg = math.lgamma, lambda x: float(torch.digamma(torch.tensor(x, dtype=torch.float64)))

    def g(d):
        return lg(nu / 2) - lg((nu + d) / 2) + (nu + d) / 2 * (dg((nu + d) / 2) - dg(nu / 2))

    truth = gaussian_mi(rho) + 2 * g(1) - g(2)  # 0.2265 nats
    ests = []
    for seed in range(3):
        gen = torch.Generator().manual_seed(1000 + seed)
        x = torch.randn(n, generator=gen, dtype=torch.float64)
        y = rho * x + math.sqrt(1 - rho * rho) * torch.randn(n, generator=gen, dtype=torch.float64)
        s = torch.sqrt(torch.randn(n, nu, generator=gen, dtype=torch.float64).pow(2).sum(1) / nu)
        ests.append(float(mmim_ext.estimate_pairwise_mi((torch.stack([x, y], 1) / s[:, None]).float(), seed=0)[0, 1]))
    assert abs(sum(ests) / 3 - truth) <= max(0.02, 0.05 * truth), (ests, truth)


@pytest.mark.slow
def test_slow_conditional_sign_case_10k_samples():
    # two equiprobable classes, correlation +0.8 / -0.8: I(h1; h2 | Y) = 0.511 nats; a
    # label-blind critic finds about 0.18
    n, truth = 10000, gaussian_mi(0.8)
    ests = []
    for seed in range(3):
        gen = torch.Generator().manual_seed(1000 + seed)
        y = torch.randint(0, 2, (n,), generator=gen)
        x = torch.randn(n, generator=gen, dtype=torch.float64)
        z = 0.8 * x + 0.6 * torch.randn(n, generator=gen, dtype=torch.float64)
        h = torch.stack([x, torch.where(y == 1, z, -z)], 1).float()
        ests.append(float(mmim_ext.estimate_pairwise_mi(h, y, seed=0)[0, 1]))
    assert abs(sum(ests) / 3 - truth) <= max(0.03, 0.06 * truth), (ests, truth)
