"""``I(Y; h_i)`` for every unit of a layer at once, with the label marginal integrated exactly."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmim_ext._checks import check_choice, check_features, check_labels, check_positive_int
from mmim_ext.estimators.base import MIEstimator, check_coef, check_finite
from mmim_ext.estimators.bounds import BOUNDS, LogEMA, mine_loss, nwj_bound, standardize
from mmim_ext.estimators.sharding import Shard
from mmim_ext.ops import label_critic_scores

__all__ = ["LabelEstimator", "UnitLabelMINE"]


class LabelEstimator(MIEstimator):
    """What the label-MI modules share: argument checks and the preparation of ``(h, labels)``.

    ``_quantity`` names what a subclass estimates, for the error raised without labels.
    """

    _quantity = "I(Y; h)"

    def _init_label(self, owner, num_units, num_classes, hidden, estimator, ema, smile_clip, standardize):
        check_positive_int(owner, "num_units", num_units)
        check_positive_int(owner, "num_classes", num_classes, 2)
        check_positive_int(owner, "hidden", hidden)
        check_choice(owner, "estimator", estimator, BOUNDS)
        if not 0.0 < float(ema) <= 1.0:
            raise ValueError(f"{owner}: argument 'ema' must be in (0, 1], got {ema!r}")
        self.num_units, self.num_classes = num_units, num_classes
        self.estimator = estimator
        self.smile_clip = float(smile_clip)
        self.standardize = standardize

    def _prepare(self, h, labels, owner):
        """Checked ``h`` ``[B, num_units]`` in the parameters' dtype (standardized with batch
        statistics if ``self.standardize``)."""
        check_features(owner, "h", h, self.num_units)
        check_finite(owner, "h", h)
        if labels is None:
            raise ValueError(f"{owner}: argument 'labels' is required ({self._quantity} needs the labels)")
        check_labels(owner, labels, h.shape[0], self.num_classes)
        h = h.to(next(self.parameters()).dtype)
        return standardize(h) if self.standardize else h


class UnitLabelMINE(LabelEstimator):
    """``I(Y; h_i)`` for every unit ``i`` of a layer at once (nats).

    Unit ``i`` has the critic ``T_i(y, a) = c_i + sum_k v_ik relu(e_iyk + w_ik a + b_ik)`` (an MLP
    on ``[onehot(y), a]`` with ``hidden`` units). Because ``Y`` is discrete the product of the
    marginals is integrated exactly over the classes: the marginal term is
    ``log (1/B) sum_n sum_y p(y) exp(T_i(y, h_ni))`` with ``p(y)`` the batch's class
    frequencies, so no negative sampling is needed.

    Entry points (see :mod:`mmim_ext.estimators.base`): ``critic_loss(h, labels)``,
    ``penalty(h, labels, *, coef=1.0)``, ``evaluate(h, labels)`` and ``forward``, with ``h``
    ``[B, m]`` float and ``labels`` ``[B]`` int64 in ``[0, num_classes)``; estimates are ``[m]``
    in nats, losses and penalty values sums over units.

    With ``process_group`` (a ``torch.distributed`` group) the units are sharded: this rank keeps
    the critics of a contiguous block of them (``self.shard``; ``num_units`` is then the block's
    size and ``total_units`` the layer's width) and every call is collective on the global batch
    (each rank passes its part, or with ``gather_batch=False`` every rank the same global batch).
    ``critic_loss`` returns the block's estimates and loss, ``penalty`` the block's estimates and
    the value summed over ranks, ``evaluate`` every unit's estimate; see
    :mod:`mmim_ext.estimators.sharding`.
    """

    _quantity = "I(Y; h_i)"

    def __init__(self, num_units: int, num_classes: int, hidden: int = 16, estimator: str = "mine",
                 ema: float = 0.01, smile_clip: float = 5.0, standardize: bool = True, *, process_group=None,
                 gather_batch: bool = True):
        super().__init__()
        owner = "UnitLabelMINE"
        self._init_label(owner, num_units, num_classes, hidden, estimator, ema, smile_clip, standardize)
        self.emb = nn.Parameter(torch.randn(num_units, num_classes, hidden))
        self.w = nn.Parameter(torch.randn(num_units, hidden))
        self.b = nn.Parameter(torch.randn(num_units, hidden))
        self.v = nn.Parameter(0.1 * torch.randn(num_units, hidden) / math.sqrt(hidden))
        self.c = nn.Parameter(torch.full((num_units,), 1.0 if estimator == "nwj" else 0.0))
        self._ema = LogEMA(num_units, ema) if estimator == "mine" else None
        self.register_buffer("last", torch.zeros(num_units))
        self.total_units = num_units
        self.shard = None
        if process_group is not None:
            # Built whole, then cut: a rank's critics start as the same units' critics without a group.
            self.shard = Shard(owner, process_group, num_units, gather_batch=gather_batch, what="units")
            names = ["emb", "w", "b", "v", "c", "last"] + (["_ema.log_acc", "_ema.count"] if self._ema else [])
            self.shard.cut_(self, {n: 0 for n in names})
            self.num_units = self.shard.size

    def _scores(self, h, labels, detach=False):
        """Joint scores ``[B, m]`` and scores for every class ``[B, m, C]``."""
        emb, w, b, v, c = (self.emb, self.w, self.b, self.v, self.c)
        if detach:
            emb, w, b, v, c = (t.detach() for t in (emb, w, b, v, c))
        base = h.unsqueeze(-1) * w + b  # [B, m, K]
        scores = label_critic_scores(base, emb, v) + c.unsqueeze(-1)  # [B, m, C]
        joint = scores.gather(2, labels.view(-1, 1, 1).expand(-1, self.num_units, 1)).squeeze(2)
        return joint, scores

    def _marginal(self, h, labels, scores, clip=math.inf):
        """``(lme [m], p [C])`` from the scores: the label marginal ``p(y)`` (the batch's class
        frequencies) is integrated exactly."""
        B = h.shape[0]
        p = torch.bincount(labels, minlength=self.num_classes).to(h.dtype) / B
        logp = torch.log(p.clamp_min(1e-30))
        lme = torch.logsumexp(scores.clamp(-clip, clip) + logp, dim=2).logsumexp(0) - math.log(B)
        return lme, p

    def critic_loss(self, h: torch.Tensor, labels: torch.Tensor):
        """A critic update: ``(estimates [m], loss)``; ``loss`` (0-d) is the sum over units of the
        negative bounds (MINE's moving-average gradient in training mode)."""
        if self.shard is not None and not self.shard.inside:
            return self.shard.run(self.critic_loss, h, labels, out="local", width=self.total_units)
        h = self._prepare(h, labels, "UnitLabelMINE.critic_loss")
        joint, scores = self._scores(h, labels)
        t_joint = joint.mean(0)
        if self.estimator == "smile":
            lme, p = self._marginal(h, labels, scores, self.smile_clip)
            est = t_joint - lme
            # JS gradient: marginal expectation of softplus(T) under p(y) p(h)
            js = -F.softplus(-joint).mean(0) - (F.softplus(scores) * p).sum(2).mean(0)
            loss = -js
        else:
            lme, _ = self._marginal(h, labels, scores)
            if self.estimator == "mine":
                est = t_joint - lme
                loss = mine_loss(t_joint, lme, self._ema, training=self.training)
            else:
                est = nwj_bound(t_joint, lme)
                loss = -est
        self._record(est)
        return est, loss.sum()

    def penalty(self, h: torch.Tensor, labels: torch.Tensor, *, coef: float = 1.0):
        """``(estimates [m] without gradient, coef * estimates.sum())`` through the frozen
        critics; the value (0-d) is differentiable w.r.t. ``h`` only."""
        coef = check_coef("UnitLabelMINE.penalty", coef)
        if self.shard is not None and not self.shard.inside:
            return self.shard.run(self.penalty, h, labels, out="penalty", width=self.total_units, coef=coef)
        est = self._frozen(h, labels, owner="UnitLabelMINE.penalty")
        return est.detach(), coef * est.sum()

    def _frozen(self, h, labels, *, owner="UnitLabelMINE.forward"):
        if self.shard is not None and not self.shard.inside:
            return self.shard.run(self._frozen, h, labels, out="local", width=self.total_units, owner=owner)
        h = self._prepare(h, labels, owner)
        joint, scores = self._scores(h, labels, detach=True)
        clip = self.smile_clip if self.estimator == "smile" else math.inf
        lme, _ = self._marginal(h, labels, scores, clip)
        t_joint = joint.mean(0)
        est = nwj_bound(t_joint, lme) if self.estimator == "nwj" else t_joint - lme
        self._record(est)
        return est

    @torch.no_grad()
    def evaluate(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Bound per unit (nats, ``[m]``) on held-out data: no training, no gradient. The label
        marginal is integrated exactly, so there is no negative sampling to vary. With
        ``process_group``: every unit's, on every rank."""
        if self.shard is not None and not self.shard.inside:
            return self.shard.run(self.evaluate, h, labels, out="gather", width=self.total_units)
        return self._frozen(h, labels, owner="UnitLabelMINE.evaluate")

    @torch.no_grad()
    def _class_scores(self, h, labels):
        """Scores ``[B, m, C]`` of every unit's critic for every class (no gradient); for
        :func:`mmim_ext.estimators.intervals.bootstrap_label_bound`. Not sharded."""
        h = self._prepare(h, labels, "UnitLabelMINE.evaluate")
        return self._scores(h, labels, detach=True)[1]

    @torch.no_grad()
    def _record(self, est):
        self.last.copy_(est.detach().to(self.last.dtype))
