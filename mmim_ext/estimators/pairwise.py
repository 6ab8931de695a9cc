"""MI of many pairs of scalar units through the fused op :func:`mmim_ext.pair_stats`."""

from __future__ import annotations

import math

import torch
from torch import nn

from mmim_ext._checks import check_choice, check_features, check_labels, check_positive_int
from mmim_ext.estimators.bounds import BOUNDS, LogEMA, bound_from_scores, log_mean_exp, mine_loss, nwj_bound, standardize
from mmim_ext.estimators.base import MIEstimator, check_coef
from mmim_ext.estimators.negatives import NEGATIVES, make_perms
from mmim_ext.ops import all_pairs, one_pass_applies, pair_stats, pair_stats_linear, pair_stats_mine_loss

__all__ = ["PairwiseMINE"]


class PairwiseMINE(MIEstimator):
    """MI of many pairs of scalar units, ``I(h_i; h_j)`` or (with labels) ``I(h_i; h_j | Y)``.

    Every pair ``p = (i, j)`` has a critic ``T_p(a, b) = c_p + sum_k v_pk relu(wa_pk a + wb_pk b + b_pk)``
    (``K = hidden``), evaluated by the op :func:`mmim_ext.pair_stats` (fused kernel when
    compiled, PyTorch reference otherwise).

    Args:
        num_units: ``m``, the width of the layer.
        hidden: ``K``, hidden units of each pair's critic.
        per_pair: one critic per pair (``True``) or one critic shared by all pairs.
        pairs: ``None`` for all ``i < j`` (row-major), or ``[P, 2]`` int64 unit indices.
        estimator: ``"mine"``, ``"nwj"`` or ``"smile"`` (see the module docstring).
        negatives, num_negatives: product-of-marginals samples (see :func:`make_perms`).
        ema: rate of MINE's moving average of ``E_Q[e^T]``.
        smile_clip: ``tau`` of SMILE.
        standardize: standardize each unit with batch statistics (see the module docstring).
        backend: forwarded to :func:`mmim_ext.pair_stats`.

    Entry points (see :mod:`mmim_ext.estimators.base`; the module picks the kernel):
    ``critic_loss(h, labels=None, pair_index=None) -> (estimates, loss)``,
    ``penalty(h, labels=None, pair_index=None, *, coef=1.0) -> (estimates, value)``,
    ``evaluate(h, labels=None, ...) -> [P]`` and ``forward`` (``critic_loss`` while the critics
    train, ``penalty`` otherwise). ``h``: ``[B, m]`` float32/float64; ``labels``: optional
    ``[B]`` int64; ``pair_index``: optional ``[S]`` int64 subset of the module's pairs (only
    those critics are evaluated). Estimates are ``[P]`` or ``[S]`` in nats; ``loss`` is the SUM
    over pairs of the per-pair negative bounds, so that each pair's critic receives the gradient
    of its own bound whatever ``P`` is (for a shared critic it is the mean).
    """

    def __init__(self, num_units: int, hidden: int = 16, per_pair: bool = True, pairs=None,
                 estimator: str = "mine", negatives: str = "shuffle", num_negatives: int = 1,
                 ema: float = 0.01, smile_clip: float = 5.0, standardize: bool = True, *,
                 backend: str = "auto"):
        super().__init__()
        owner = "PairwiseMINE"
        check_positive_int(owner, "num_units", num_units, 2)
        check_positive_int(owner, "hidden", hidden)
        check_positive_int(owner, "num_negatives", num_negatives)
        check_choice(owner, "estimator", estimator, BOUNDS)
        check_choice(owner, "negatives", negatives, NEGATIVES)
        if not 0.0 < float(ema) <= 1.0:
            raise ValueError(f"{owner}: argument 'ema' must be in (0, 1], got {ema!r}")
        if not float(smile_clip) > 0:
            raise ValueError(f"{owner}: argument 'smile_clip' must be > 0, got {smile_clip!r}")
        if pairs is None:
            pairs = all_pairs(num_units)
        else:
            if not isinstance(pairs, torch.Tensor) or pairs.dtype != torch.int64 or pairs.dim() != 2 or pairs.shape[1] != 2:
                raise ValueError(f"{owner}: argument 'pairs' must be None or a [P, 2] int64 tensor, got "
                                 f"{getattr(pairs, 'shape', type(pairs).__name__)} {getattr(pairs, 'dtype', '')}")
            if pairs.shape[0] < 1:
                raise ValueError(f"{owner}: argument 'pairs' must hold at least one pair")
            if int(pairs.min()) < 0 or int(pairs.max()) >= num_units:
                raise ValueError(f"{owner}: argument 'pairs' must hold unit indices in [0, {num_units - 1}]")
            if bool((pairs[:, 0] == pairs[:, 1]).any()):
                raise ValueError(f"{owner}: argument 'pairs' must not pair a unit with itself")
            pairs = pairs.clone()
        self.num_units = num_units
        self.hidden = hidden
        self.per_pair = per_pair
        self.estimator = estimator
        self.negatives = negatives
        self.num_negatives = num_negatives
        self.smile_clip = float(smile_clip)
        self.standardize = standardize
        self.backend = backend
        self.register_buffer("pairs", pairs)
        P = pairs.shape[0]
        n = P if per_pair else 1
        # Scaled so that T starts near 0 (estimate ~ 0) with kinks spread over the data's range.
        self.wa = nn.Parameter(torch.randn(n, hidden))
        self.wb = nn.Parameter(torch.randn(n, hidden))
        self.b = nn.Parameter(torch.randn(n, hidden))
        self.v = nn.Parameter(0.1 * torch.randn(n, hidden) / math.sqrt(hidden))
        # NWJ's bound at T = 1 is 0 (at T = 0 it is -1/e per pair), so its critics start there.
        self.c = nn.Parameter(torch.full((n,), 1.0 if estimator == "nwj" else 0.0))
        self._ema = LogEMA(P, ema) if estimator == "mine" else None
        self.register_buffer("last", torch.zeros(P))

    @property
    def num_pairs(self) -> int:
        return self.pairs.shape[0]

    def _params(self, index, dtype, detach=False):
        ps = (self.wa, self.wb, self.b, self.v, self.c)
        if detach:
            ps = tuple(p.detach() for p in ps)
        if not self.per_pair:
            return tuple(p[0].to(dtype) for p in ps)  # [K] and [] for the op's shared-critic form
        if index is not None:
            ps = tuple(p[index] for p in ps)
        return tuple(p.to(dtype) for p in ps)

    def _prepare(self, h, labels, pair_index, owner):
        check_features(owner, "h", h, self.num_units)
        if labels is not None:
            check_labels(owner, labels, h.shape[0])
        if pair_index is not None:
            if not isinstance(pair_index, torch.Tensor) or pair_index.dtype != torch.int64 or pair_index.dim() != 1:
                raise ValueError(f"{owner}: argument 'pair_index' must be a 1-D int64 tensor")
            if pair_index.numel() == 0 or int(pair_index.min()) < 0 or int(pair_index.max()) >= self.num_pairs:
                raise ValueError(f"{owner}: argument 'pair_index' must be non-empty with values in [0, {self.num_pairs - 1}]")
        if h.dtype not in (torch.float32, torch.float64):
            h = h.float()
        if self.standardize:
            h = standardize(h)
        pairs = self.pairs if pair_index is None else self.pairs[pair_index]
        return h, pairs

    def pair_statistics(self, h, perms, pair_index=None, detach=False):
        """Raw ``(t_joint, lme)`` of the critics on already-prepared features (see ``pair_stats``)."""
        pairs = self.pairs if pair_index is None else self.pairs[pair_index]
        params = self._params(pair_index, h.dtype, detach)
        return pair_stats(h, *params, perms, pairs, backend=self.backend)

    def _negatives(self, h, labels):
        return make_perms(h.shape[0], self.negatives, self.num_negatives, labels, device=h.device)

    def critic_loss(self, h: torch.Tensor, labels: torch.Tensor | None = None,
                    pair_index: torch.Tensor | None = None):
        """A critic update: ``(estimates, loss)``.

        ``loss`` (0-d) is the sum over pairs of the per-pair negative bounds (MINE's
        moving-average gradient in training mode; the mean over pairs for a shared critic).
        Where the fused CPU kernel's one pass applies (``"mine"``), the statistics and the
        gradients are formed together (``pair_stats_mine_loss`` in training mode, whose
        moving-average rule is applied per pair once its ``lme`` is known;
        ``pair_stats_linear`` in eval mode, where the loss is linear in the statistics) and the
        estimates come back without gradient; elsewhere ``pair_stats`` and autograd.
        """
        h, pairs = self._prepare(h, labels, pair_index, "PairwiseMINE.critic_loss")
        perms = self._negatives(h, labels)
        if self.estimator == "mine" and one_pass_applies(h, perms, self.backend):
            return self._one_pass_loss(h, perms, pairs, pair_index)
        return self._loss(h, perms, pairs, pair_index)

    def _loss(self, h, perms, pairs, pair_index):
        """critic_loss's general path on prepared features and drawn negatives."""
        if self.estimator == "smile":
            est, loss = self._smile(h, perms, pairs, pair_index)
        else:
            t_joint, lme = self.pair_statistics(h, perms, pair_index)
            if self.estimator == "mine":
                est = t_joint - lme
                loss = mine_loss(t_joint, lme, self._ema, pair_index, self.training)
            else:
                est = nwj_bound(t_joint, lme)
                loss = -est
        self._record(est, pair_index)
        loss = loss.sum() if self.per_pair else loss.mean()
        return est, loss

    def _one_pass_loss(self, h, perms, pairs, pair_index):
        """critic_loss for ``"mine"`` through the fused one pass (the caller checked it applies)."""
        P = pairs.shape[0]
        scale = 1.0 if self.per_pair else 1.0 / P
        ct = torch.full((P,), -scale, dtype=h.dtype, device=h.device)
        params = self._params(pair_index, h.dtype)
        if not self.training:  # the plain DV loss: linear in the statistics
            loss, t_joint, lme = pair_stats_linear(h, *params, perms, ct, -ct, pairs, backend=self.backend)
        else:
            # The average's state before this batch: la = log(1 - a) + log_acc, lk = log(1 - (1 - a)^count)
            # with count including this batch (LogEMA.update).
            ema = self._ema
            idx = slice(None) if pair_index is None else pair_index
            a = ema.rate
            la = ema.log_acc[idx] + math.log1p(-a)
            lk = torch.log1p(-torch.pow(1 - a, ema.count[idx] + 1))
            rule = torch.stack([la, lk], 1).to(h.dtype)
            loss, t_joint, lme = pair_stats_mine_loss(h, *params, perms, pairs, ct, -ct, rule, math.log(a))
            ema.update(lme, pair_index)
        est = t_joint - lme
        self._record(est, pair_index)
        return est, loss

    def penalty(self, h: torch.Tensor, labels: torch.Tensor | None = None, pair_index: torch.Tensor | None = None,
                *, coef: float = 1.0):
        """``coef`` times the sum over pairs of the estimates, with the critics frozen.

        The penalty a regularizer adds to the task loss: differentiable w.r.t. ``h`` only (the
        critics' parameters are detached, the EMA is left alone). For the ``"mine"`` estimator
        (the Donsker-Varadhan bound ``t_joint - lme`` per pair) it is a fixed linear combination
        of the op's statistics, so it goes through :func:`mmim_ext.pair_stats_linear`: on the CPU
        kernel, the statistics and the gradient w.r.t. ``h`` in one pass over the samples
        instead of a forward and a backward. The other estimators take the general path.

        Returns:
            ``(estimates, value)``: the per-pair estimates (``[P]`` or ``[S]``, nats, without
            gradient; also recorded for :meth:`matrix`) and ``value``, a 0-d tensor.
        """
        coef = check_coef("PairwiseMINE.penalty", coef)
        if self.estimator != "mine":
            est = self._frozen(h, labels, pair_index, owner="PairwiseMINE.penalty")
            return est.detach(), coef * est.sum()
        h, pairs = self._prepare(h, labels, pair_index, "PairwiseMINE.penalty")
        perms = self._negatives(h, labels)
        params = self._params(pair_index, h.dtype, detach=True)
        ct = torch.full((pairs.shape[0],), coef, dtype=h.dtype, device=h.device)
        value, t_joint, lme = pair_stats_linear(h, *params, perms, ct, -ct, pairs, backend=self.backend)
        est = t_joint - lme
        self._record(est, pair_index)
        return est, value

    def _frozen(self, h, labels=None, pair_index=None, *, owner="PairwiseMINE.forward"):
        """Estimates through detached critics, differentiable w.r.t. ``h`` (the general path)."""
        h, pairs = self._prepare(h, labels, pair_index, owner)
        perms = self._negatives(h, labels)
        if self.estimator == "smile":
            t_joint, lme = self._smile_stats(h, perms, pairs, pair_index, detach=True)
        else:
            t_joint, lme = self.pair_statistics(h, perms, pair_index, detach=True)
        est = nwj_bound(t_joint, lme) if self.estimator == "nwj" else t_joint - lme
        self._record(est, pair_index)
        return est

    def _smile(self, h, perms, pairs, pair_index):
        wa, wb, b, v, c = self._params(pair_index, h.dtype)
        if not self.per_pair:
            wa, wb, b, v = (t.unsqueeze(0) for t in (wa, wb, b, v))
        a = h[:, pairs[:, 0]]  # [B, P]
        bj = h[:, pairs[:, 1]]

        def score(x, y):
            z = torch.relu(x.unsqueeze(-1) * wa + y.unsqueeze(-1) * wb + b)
            return (z * v).sum(-1) + c

        joint = score(a, bj)  # [B, P]
        marg = score(a.unsqueeze(0), bj[perms]).flatten(0, 1)  # [R*B, P]
        return bound_from_scores("smile", joint, marg, clip=self.smile_clip)

    @torch.no_grad()
    def _record(self, est, pair_index):
        if pair_index is None:
            self.last.copy_(est.detach().to(self.last.dtype))
        else:
            self.last[pair_index] = est.detach().to(self.last.dtype)

    @torch.no_grad()
    def evaluate(self, h: torch.Tensor, labels: torch.Tensor | None = None, *, negatives: str = "shift",
                 num_negatives: int = 256, max_evals: int = 2**24, seed: int | None = 0) -> torch.Tensor:
        """Bound per pair (nats) on held-out data with many negatives, without training.

        ``negatives="all"`` uses every other sample; ``"shift"`` ``num_negatives`` shifts. The
        shifts are processed in chunks of at most ``max_evals`` critic evaluations per call of
        the op and merged by log-sum-exp, so memory stays bounded for large validation sets.
        Updates :meth:`matrix`. Returns ``[P]``.
        """
        h, pairs = self._prepare(h, labels, None, "PairwiseMINE.evaluate")
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        num = min(num_negatives, h.shape[0] - 1)
        perms = make_perms(h.shape[0], negatives, num, labels, device=h.device, generator=gen)
        R, B = perms.shape
        per_row = max(1, self.num_pairs * B)
        step = max(1, max_evals // per_row)
        t_joint, parts = None, []
        for s in range(0, R, step):
            chunk = perms[s:s + step]
            if self.estimator == "smile":
                t, l = self._smile_stats(h, chunk, pairs)
            else:
                t, l = self.pair_statistics(h, chunk)
            t_joint = t
            parts.append(l + math.log(chunk.shape[0]))
        lme = torch.logsumexp(torch.stack(parts), 0) - math.log(R)
        est = nwj_bound(t_joint, lme) if self.estimator == "nwj" else t_joint - lme
        self._record(est, None)
        return est

    def _smile_stats(self, h, perms, pairs, pair_index=None, detach=False):
        # clipped critic for the marginal term, plain for the joint term
        wa, wb, b, v, c = self._params(pair_index, h.dtype, detach)
        if not self.per_pair:
            wa, wb, b, v = (t.unsqueeze(0) for t in (wa, wb, b, v))
        a = h[:, pairs[:, 0]]
        bj = h[:, pairs[:, 1]]

        def score(x, y):
            z = torch.relu(x.unsqueeze(-1) * wa + y.unsqueeze(-1) * wb + b)
            return (z * v).sum(-1) + c

        joint = score(a, bj).mean(0)
        marg = score(a.unsqueeze(0), bj[perms]).clamp(-self.smile_clip, self.smile_clip).flatten(0, 1)
        return joint, log_mean_exp(marg)

    def matrix(self) -> torch.Tensor:
        """Latest estimates as a symmetric ``[m, m]`` matrix (nats, zero diagonal and zero for
        pairs the module does not estimate)."""
        m = self.num_units
        out = torch.zeros(m, m, dtype=self.last.dtype, device=self.last.device)
        out[self.pairs[:, 0], self.pairs[:, 1]] = self.last
        out[self.pairs[:, 1], self.pairs[:, 0]] = self.last
        return out


