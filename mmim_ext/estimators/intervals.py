"""Held-out bounds from per-sample critic scores, and bootstrap intervals over the held-out set.

A variational bound evaluated on ``N`` held-out samples is a function of two averages: the joint
term ``mean_n T(x_n, y_n)`` and the log-mean-exp of the critic over negatives, pairs
``(x_n, y_pi(n))`` (or, for the total correlation, tuples of ``m`` different samples). Both are
plug-in functionals of the held-out sample's empirical distribution, so the bootstrap resamples
the held-out *samples*: a replicate draws ``N`` of them with replacement (multiplicities ``w``),
weights the joint term of sample ``n`` by ``w_n`` and a negative built from samples
``(n_1, ..., n_k)`` by ``w_n1 * ... * w_nk`` -- the weight that negative would have among the
negatives of the resampled set. One replicate is a few weighted sums over scores computed
once, so the negatives are resampled together with the evaluation samples at no extra critic
evaluations. The interval is the percentile interval of the replicates.

What it covers: the bound of the *trained* critic on the distribution (the sampling noise of
the held-out set, joint term and negatives). It does not cover the gap between that bound and
the true MI (a critic of finite capacity, finitely trained, is biased low) nor the variation of
the critic across training runs; ``docs/estimators.md`` reports the coverage of the truth.
"""

from __future__ import annotations

import math

import torch

__all__ = ["bootstrap_bound", "bootstrap_label_bound", "label_weighted_bounds", "pair_scores", "tuple_weights",
           "weighted_bounds"]

# Negatives per chunk of the weighted sums ([num_bootstrap, chunk] weights at a time).
_CHUNK = 1 << 15


def pair_scores(mod, h: torch.Tensor, index: torch.Tensor, pair_index: torch.Tensor,
                labels: torch.Tensor | None = None):
    """Per-sample scores of a :class:`~mmim_ext.estimators.pairwise.PairwiseMINE`'s critics.

    The critic of the class docstring, ``c + sum_k v_k relu(wa_k a + wb_k b + b_k)``, evaluated
    in PyTorch (the fused op returns only the per-pair averages). A conditional module
    (``num_classes`` set) scores each sample, and each negative, with the critic of the class
    of its first sample (``labels`` required; negatives are drawn within classes).

    Args:
        h: ``[N, m]`` prepared features (what the module's critics see).
        index: ``[M, 2]`` int64, the negatives: unit ``i`` of sample ``index[:, 0]`` with unit
            ``j`` of sample ``index[:, 1]``.
        pair_index: ``[S]`` int64, which of the module's pairs.
        labels: ``[N]`` int64 classes, for a conditional module.

    Returns:
        ``joint [N, S]`` and ``marg [M, S]`` in ``h``'s dtype (nats of the critic's scale).
    """
    pairs = mod.pairs[pair_index]
    sel = pair_index if mod.per_pair else torch.zeros_like(pair_index)
    params = [p.detach() for p in (mod.wa, mod.wb, mod.b, mod.v, mod.c)]
    conditional = getattr(mod, "num_classes", None) is not None
    if conditional:
        if labels is None:
            raise ValueError("pair_scores: argument 'labels' is required for a conditional module")
        params = [p[:, sel].to(h.dtype) for p in params]  # [C, S, K] and [C, S]
    else:
        params = [p[sel].to(h.dtype) for p in params]  # [S, K] and [S]
    a, b = h[:, pairs[:, 0]], h[:, pairs[:, 1]]

    def score(rows_a, rows_b):
        wa, wb, bias, v, c = (p[labels[rows_a]] for p in params) if conditional else params
        x, y = a[rows_a].unsqueeze(-1), b[rows_b].unsqueeze(-1)
        return (torch.relu(x * wa + y * wb + bias) * v).sum(-1) + c

    rows = torch.arange(h.shape[0])
    step = max(1, (1 << 22) // (pairs.shape[0] * params[0].shape[-1]))
    marg = torch.cat([score(index[s:s + step, 0], index[s:s + step, 1]) for s in range(0, index.shape[0], step)])
    joint = torch.cat([score(rows[s:s + step], rows[s:s + step]) for s in range(0, h.shape[0], step)])
    return joint, marg


def tuple_weights(weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``prod_k weights[index[:, k]]``: ``[M, nb]`` weights of ``M`` negatives built from the
    samples ``index`` ``[M, k]``, given ``weights`` ``[N, nb]`` (one row per sample)."""
    out = weights.index_select(0, index[:, 0])
    for k in range(1, index.shape[1]):
        out *= weights.index_select(0, index[:, k])
    return out


def _bound(estimator: str, t_joint, lme):
    if estimator == "nwj":
        return t_joint - torch.exp(lme - 1.0)
    return t_joint - lme


def weighted_bounds(estimator: str, joint: torch.Tensor, marg: torch.Tensor, index: torch.Tensor,
                    weights: torch.Tensor, *, groups: torch.Tensor | None = None,
                    smile_clip: float = 5.0) -> torch.Tensor:
    """The bound for each row of sample multiplicities ``weights`` ``[nb, N]``: ``[nb, P]`` float64.

    Args:
        estimator: ``"mine"`` (Donsker-Varadhan), ``"nwj"`` or ``"smile"`` (marginal scores
            clipped to ``[-smile_clip, smile_clip]``).
        joint: ``[N, P]`` critic scores of the ``N`` held-out samples, ``P`` bounds at once.
        marg: ``[M, P]`` scores of ``M`` negatives.
        index: ``[M, k]`` int64, the held-out samples each negative is built from; its weight is
            the product of their multiplicities.
        weights: ``[nb, N]`` non-negative multiplicities (small integers: they are multiplied in
            float32, exact up to 2^24), each row summing to ``N``.
        groups: optional ``[N]`` int64 classes; then the bound is formed per class (joint
            samples of the class, negatives whose first sample is in it) and averaged with the
            class frequencies (over the classes that have negatives), as a class-conditional
            bound is.
    """
    N, P = joint.shape
    joint, marg, w = joint.double(), marg.double(), weights.double()
    if estimator == "smile":
        marg = marg.clamp(-smile_clip, smile_clip)
    wt = w.t().float().contiguous()  # [N, nb]: rows gathered per negative
    if groups is None:
        groups = torch.zeros(N, dtype=torch.int64)
    marg_group = groups[index[:, 0]]
    total = torch.zeros(w.shape[0], P, dtype=torch.float64)
    norm = torch.zeros(w.shape[0], 1, dtype=torch.float64)
    for g in torch.unique(groups):
        in_g = groups == g
        wg = w[:, in_g]
        share = wg.sum(1, keepdim=True)  # [nb, 1]
        t_joint = (wg @ joint[in_g]) / share.clamp_min(1e-300)
        sel = (marg_group == g).nonzero().squeeze(1)
        shift = marg[sel].max(0).values  # [P]
        sz = torch.zeros(w.shape[0], P + 1, dtype=torch.float64)
        for start in range(0, sel.numel(), _CHUNK):
            rows = sel[start:start + _CHUNK]
            wm = tuple_weights(wt, index[rows])  # [Mc, nb]
            e = torch.cat([torch.exp(marg[rows] - shift), torch.ones(rows.numel(), 1, dtype=marg.dtype)], 1)
            sz += (wm.t() @ e.float()).double()  # the weighted sums and (last column) the weights' sum
        s, z = sz[:, :P], sz[:, P:]
        lme = torch.log(s.clamp_min(1e-300) / z.clamp_min(1e-300)) + shift
        # A class without negatives in a row (fewer than two members, or none of its negatives
        # drawn) has no log-mean-exp: it is left out and the other classes' weights renormalized,
        # as PairwiseMINE does with a class of fewer than two samples in a batch.
        has = (z > 0) & (share > 0)
        total += torch.where(has, share * _bound(estimator, t_joint, lme), torch.zeros_like(lme))
        norm += torch.where(has, share, torch.zeros_like(share))
    return total / norm


def bootstrap_bound(estimator: str, joint: torch.Tensor, marg: torch.Tensor, index: torch.Tensor, *,
                    groups: torch.Tensor | None = None, num_bootstrap: int = 200, ci: float = 0.95,
                    smile_clip: float = 5.0, generator: torch.Generator | None = None):
    """Bound and percentile bootstrap interval from per-sample scores (nats).

    Arguments as :func:`weighted_bounds`; ``num_bootstrap`` resamples of the ``N`` held-out
    samples (multinomial multiplicities), ``ci`` the interval's level.

    Returns:
        ``(estimate [P], low [P], high [P])`` float64; ``estimate`` is the bound on the held-out
        set itself (all multiplicities 1).
    """
    w = _resample_weights(joint.shape[0], num_bootstrap, generator)
    total = weighted_bounds(estimator, joint, marg, index, w, groups=groups, smile_clip=smile_clip)
    return _percentile_interval(total, ci)


def _resample_weights(N: int, num_bootstrap: int, generator) -> torch.Tensor:
    """``[1 + num_bootstrap, N]`` float64 multiplicities: row 0 all ones (the held-out set
    itself), then one multinomial resample of the ``N`` samples per row."""
    draws = torch.randint(0, N, (num_bootstrap, N), generator=generator)
    w = torch.zeros(num_bootstrap, N, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(num_bootstrap, N, dtype=torch.float64))
    return torch.cat([torch.ones(1, N, dtype=torch.float64), w])


def _percentile_interval(total: torch.Tensor, ci: float):
    """``(row 0, low, high)`` of bounds ``[1 + nb, P]`` whose row 0 is the unresampled set."""
    alpha = (1.0 - ci) / 2.0
    reps = total[1:]
    return total[0], torch.quantile(reps, alpha, dim=0), torch.quantile(reps, 1.0 - alpha, dim=0)


def label_weighted_bounds(estimator: str, scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, *,
                          smile_clip: float = 5.0) -> torch.Tensor:
    """The label bound of :class:`~mmim_ext.LabelMINE` / :class:`~mmim_ext.UnitLabelMINE` for
    each row of sample multiplicities ``weights`` ``[nb, N]``: ``[nb, E]`` float64 (nats).

    The product of the marginals is integrated exactly over the classes, with the class
    frequencies of the (resampled) set: ``p_w(y) = sum_{n: y_n = y} w_n / N`` and
    ``lme = log (1/N) sum_n w_n sum_y p_w(y) exp(T(y, h_n))``, the module's value on the data
    set that holds sample ``n`` ``w_n`` times.

    Args:
        estimator: ``"mine"``, ``"nwj"`` or ``"smile"`` (scores clipped in the marginal term).
        scores: ``[N, E, C]`` critic scores ``T_e(y, h_n)`` for every class ``y`` of ``E``
            bounds at once (one for ``LabelMINE``, one per unit for ``UnitLabelMINE``).
        labels: ``[N]`` int64 classes in ``[0, C)``.
        weights: ``[nb, N]`` non-negative multiplicities, each row summing to ``N``.
    """
    N, E, C = scores.shape
    s, w = scores.double(), weights.double()
    joint = s.gather(2, labels.view(N, 1, 1).expand(N, E, 1)).squeeze(2)  # [N, E]
    t_joint = (w @ joint) / N
    p = (w @ torch.nn.functional.one_hot(labels, C).double()) / N  # [nb, C]
    if estimator == "smile":
        s = s.clamp(-smile_clip, smile_clip)
    shift = s.amax(dim=(0, 2))  # [E]: exp below cannot overflow
    ex = torch.exp(s - shift.view(1, E, 1)).reshape(N, E * C)
    inner = (w @ ex).view(-1, E, C)  # [nb, E, C]: sum_n w_n exp(T(y, h_n))
    lme = torch.log((inner * p.unsqueeze(1)).sum(2).clamp_min(1e-300) / N) + shift
    return _bound(estimator, t_joint, lme)


def bootstrap_label_bound(estimator: str, scores: torch.Tensor, labels: torch.Tensor, *, num_bootstrap: int = 200,
                          ci: float = 0.95, smile_clip: float = 5.0, generator: torch.Generator | None = None):
    """Label bound and percentile bootstrap interval over the held-out samples (nats).

    Arguments as :func:`label_weighted_bounds`; returns ``(estimate [E], low [E], high [E])``
    float64, ``estimate`` on the held-out set itself.
    """
    w = _resample_weights(scores.shape[0], num_bootstrap, generator)
    return _percentile_interval(label_weighted_bounds(estimator, scores, labels, w, smile_clip=smile_clip), ci)
