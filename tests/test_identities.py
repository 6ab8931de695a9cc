"""The two identities behind Table 1's C1 (docs/table1.md), checked where every term is known.

With ``I(h)`` the total correlation ``TC(h) = Σ_i H(h_i) − H(h)``:

    TC(h) − TC(h|Y) = Σ_i I(Y;h_i) − I(Y;h)              so  C1 = C4 + C5 + C6 = −I(Y;h)
    I(h_i;h_j) − I(h_i;h_j|Y) = I(Y;h_i) + I(Y;h_j) − I(Y;h_i,h_j)
                              so  C1_pairwise = (m−2)·Σ_i I(Y;h_i) − Σ_{i<j} I(Y;h_i,h_j)

Each term is computed by its own formula (joint-covariance log-determinants vs conditional
covariances; posterior-entropy quadrature vs density-ratio quadrature), so agreement tests the
identities, not one formula twice. A last test runs the package's estimators on samples on both
sides of the pairwise identity.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

# ----------------------------------------------------------------------------- Gaussian (Y, h)


def _logdet(a):
    sign, val = np.linalg.slogdet(a)
    assert sign > 0
    return val


def _gaussian_terms(S, dy, m):
    """Every term for (Y, h) jointly Gaussian with covariance S (Y = first dy coordinates)."""
    Y = list(range(dy))
    H = list(range(dy, dy + m))
    sub = lambda idx: S[np.ix_(idx, idx)]  # noqa: E731

    def mi(a, b):  # I(A;B) = ½ log(det S_A det S_B / det S_AB), joint-covariance route
        return 0.5 * (_logdet(sub(a)) + _logdet(sub(b)) - _logdet(sub(a + b)))

    # Conditional covariance of h given Y (Schur complement): the conditional route.
    Shh, Shy, Syy = sub(H), S[np.ix_(H, Y)], sub(Y)
    C = Shh - Shy @ np.linalg.solve(Syy, Shy.T)
    tc = 0.5 * (sum(math.log(S[i, i]) for i in H) - _logdet(Shh))
    tc_y = 0.5 * (sum(math.log(C[k, k]) for k in range(m)) - _logdet(C))
    pairs = list(itertools.combinations(range(m), 2))
    i_pair = {(a, b): mi([H[a]], [H[b]]) for a, b in pairs}
    # I(h_a;h_b|Y) from the partial correlation.
    i_pair_y = {(a, b): -0.5 * math.log(1 - C[a, b] ** 2 / (C[a, a] * C[b, b])) for a, b in pairs}
    i_yh = mi(Y, H)
    i_yhi = [mi(Y, [H[a]]) for a in range(m)]
    i_yhij = {(a, b): mi(Y, [H[a], H[b]]) for a, b in pairs}
    return dict(tc=tc, tc_y=tc_y, i_pair=i_pair, i_pair_y=i_pair_y, i_yh=i_yh, i_yhi=i_yhi, i_yhij=i_yhij, m=m)


def _check_identities(t, atol):
    m = t["m"]
    # Total correlation form: TC(h) − TC(h|Y) = Σ I(Y;h_i) − I(Y;h), i.e. C1 = −I(Y;h).
    c1 = t["tc"] - t["tc_y"] - sum(t["i_yhi"])
    assert c1 == pytest.approx(-t["i_yh"], abs=atol)
    # Pairwise form, pair by pair and summed.
    for (a, b), v in t["i_pair"].items():
        rhs = t["i_yhi"][a] + t["i_yhi"][b] - t["i_yhij"][(a, b)]
        assert v - t["i_pair_y"][(a, b)] == pytest.approx(rhs, abs=atol)
    c1_pw = sum(t["i_pair"].values()) - sum(t["i_pair_y"].values()) - sum(t["i_yhi"])
    assert c1_pw == pytest.approx((m - 2) * sum(t["i_yhi"]) - sum(t["i_yhij"].values()), abs=atol)
    return c1, c1_pw


@pytest.mark.parametrize("seed,dy,m", [(0, 1, 4), (1, 2, 5), (2, 3, 3)])
def test_identities_gaussian(seed, dy, m):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(dy + m, dy + m))
    S = A @ A.T + 0.3 * np.eye(dy + m)  # a random SPD joint covariance
    t = _gaussian_terms(S, dy, m)
    assert t["i_yh"] > 0.05 and all(v > 0 for v in t["i_yhi"])  # not a degenerate case
    c1, c1_pw = _check_identities(t, atol=1e-9)
    # The pairwise form is a different quantity from the total one in general.
    assert abs(c1 - c1_pw) > 1e-3


# ----------------------------------------------------------------------------- discrete Y, mixture h

P_Y = np.array([0.3, 0.5, 0.2])
MU = np.array([[-1.0, 0.5, 0.0], [0.8, -0.6, 0.4], [0.2, 1.2, -1.0]])


def _covs():
    rng = np.random.default_rng(5)
    out = []
    for _ in range(3):
        A = rng.normal(size=(3, 3)) * 0.6
        out.append(A @ A.T + 0.4 * np.eye(3))
    return np.stack(out)


SIG = _covs()


def _log_normal(x, mu, cov):
    d = len(mu)
    diff = x - mu
    sol = np.linalg.solve(cov, diff.T).T
    return -0.5 * (np.sum(diff * sol, 1) + d * math.log(2 * math.pi) + _logdet(cov))


def _nodes(mu, cov, n):
    """Gauss-Hermite product rule for E_{N(mu, cov)}: nodes [n^d, d], weights [n^d]."""
    z, w = np.polynomial.hermite.hermgauss(n)
    d = len(mu)
    Z = np.array(list(itertools.product(z, repeat=d)))
    W = np.prod(np.array(list(itertools.product(w, repeat=d))), 1) / math.pi ** (d / 2)
    L = np.linalg.cholesky(cov)
    return mu + math.sqrt(2) * Z @ L.T, W


def _mix_expect(f, dims, n):
    """E[f(h_dims)] under the mixture, by quadrature over each component."""
    tot = 0.0
    for y in range(3):
        x, w = _nodes(MU[y, dims], SIG[y][np.ix_(dims, dims)], n)
        tot += P_Y[y] * float(np.sum(w * f(x)))
    return tot


def _log_parts(x, dims):
    """log p(y) + log p(h_dims | y) for every class: [N, 3]."""
    return np.stack([math.log(P_Y[y]) + _log_normal(x, MU[y, dims], SIG[y][np.ix_(dims, dims)]) for y in range(3)], 1)


def _log_marg(x, dims):
    lp = _log_parts(x, dims)
    mx = lp.max(1, keepdims=True)
    return (mx + np.log(np.exp(lp - mx).sum(1, keepdims=True)))[:, 0]


def _i_y(dims, n):
    """I(Y; h_dims) = H(Y) − E[H(Y | h_dims)] (posterior-entropy route)."""
    def cond_entropy(x):
        lp = _log_parts(x, dims)
        post = lp - _log_marg(x, dims)[:, None]
        return -np.sum(np.exp(post) * post, 1)
    return float(-(P_Y * np.log(P_Y)).sum()) - _mix_expect(cond_entropy, dims, n)


def _mixture_terms(n1=80, n2=48, n3=22):
    m = 3
    pairs = list(itertools.combinations(range(m), 2))
    # Marginal dependence by density-ratio quadrature (the mixture is not Gaussian).
    tc = _mix_expect(lambda x: _log_marg(x, [0, 1, 2]) - sum(_log_marg(x[:, [k]], [k]) for k in range(3)),
                     [0, 1, 2], n3)
    i_pair = {(a, b): _mix_expect(lambda x: _log_marg(x, [a, b]) - _log_marg(x[:, [0]], [a])
                                  - _log_marg(x[:, [1]], [b]), [a, b], n2) for a, b in pairs}
    # Within a class h is Gaussian: closed forms.
    tc_y = sum(P_Y[y] * 0.5 * (np.log(np.diag(SIG[y])).sum() - _logdet(SIG[y])) for y in range(3))
    i_pair_y = {(a, b): sum(P_Y[y] * -0.5 * math.log(1 - SIG[y][a, b] ** 2 / (SIG[y][a, a] * SIG[y][b, b]))
                            for y in range(3)) for a, b in pairs}
    i_yhi = [_i_y([k], n1) for k in range(m)]
    i_yhij = {(a, b): _i_y([a, b], n2) for a, b in pairs}
    i_yh = _i_y([0, 1, 2], n3)
    return dict(tc=tc, tc_y=tc_y, i_pair=i_pair, i_pair_y=i_pair_y, i_yh=i_yh, i_yhi=i_yhi, i_yhij=i_yhij, m=m)


def test_identities_discrete_label_gaussian_mixture():
    t = _mixture_terms()
    assert t["i_yh"] > 0.3 and t["tc"] > 0.01  # informative, dependent: not a trivial case
    _check_identities(t, atol=2e-4)
    # Quadrature converged: a coarser rule gives the same terms.
    coarse = _mixture_terms(60, 36, 16)
    assert coarse["i_yh"] == pytest.approx(t["i_yh"], abs=2e-4)
    assert coarse["tc"] == pytest.approx(t["tc"], abs=2e-4)


# ----------------------------------------------------------------------------- estimators on samples

def _sample_mixture(n, dims, seed):
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=P_Y)
    h = np.empty((n, len(dims)))
    for c in range(3):
        idx = np.flatnonzero(y == c)
        h[idx] = rng.multivariate_normal(MU[c, dims], SIG[c][np.ix_(dims, dims)], size=len(idx))
    return torch.tensor(h, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


@pytest.mark.slow
def test_estimators_agree_on_both_sides_of_the_pairwise_identity():
    """I(h_1;h_2) − I(h_1;h_2|Y) (pairwise critics; the conditional term class by class) against
    I(Y;h_1) + I(Y;h_2) − I(Y;h_1,h_2) (label critics), on samples of the mixture, and both
    against the quadrature value."""
    from mmim_ext.estimators import estimate_label_mi, estimate_pairwise_mi, estimate_unit_label_mi

    dims = [0, 1]
    h, y = _sample_mixture(6000, dims, seed=0)
    t = _mixture_terms()
    truth = t["i_pair"][(0, 1)] - t["i_pair_y"][(0, 1)]
    kw = dict(max_epochs=60, patience=8, seed=0)
    i12 = float(estimate_pairwise_mi(h, **kw)[0, 1])
    # I(h_1;h_2|Y) = Σ_y p(y) I(h_1;h_2|Y=y): one estimate per class (an exact use of the definition
    # that needs no label-aware critic).
    i12_y = sum(float((y == c).float().mean()) * float(estimate_pairwise_mi(h[y == c], **kw)[0, 1]) for c in range(3))
    left = i12 - i12_y
    units = estimate_unit_label_mi(h, y, **kw)
    right = float(units.sum()) - estimate_label_mi(h, y, **kw)
    assert i12 == pytest.approx(t["i_pair"][(0, 1)], abs=0.05)
    assert float(units[0]) == pytest.approx(t["i_yhi"][0], abs=0.05)
    assert left == pytest.approx(truth, abs=0.08)
    assert right == pytest.approx(truth, abs=0.08)
    assert left == pytest.approx(right, abs=0.1)
