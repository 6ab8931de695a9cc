"""MI of many pairs of scalar units through the fused op :func:`mmim_ext.pair_stats`."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from mmim_ext._checks import check_choice, check_features, check_labels, check_positive_int
from mmim_ext.estimators.base import MIEstimator, check_coef, check_finite
from mmim_ext.estimators.bounds import BOUNDS, LogEMA, bound_from_scores, log_mean_exp, mine_loss, nwj_bound, standardize
from mmim_ext.estimators.negatives import NEGATIVES, make_perms
from mmim_ext.estimators.sharding import Shard, broadcast_generator_
from mmim_ext.ops import all_pairs, one_pass_applies, pair_stats, pair_stats_linear, pair_stats_mine_loss

__all__ = ["PairwiseMINE"]


class PairwiseMINE(MIEstimator):
    """MI of many pairs of scalar units, ``I(h_i; h_j)`` or ``I(h_i; h_j | Y)`` (nats).

    Every pair ``p = (i, j)`` has a critic ``T_p(a, b) = c_p + sum_k v_pk relu(wa_pk a + wb_pk b + b_pk)``
    (``K = hidden``), evaluated by the op :func:`mmim_ext.pair_stats` (fused kernel when
    compiled, PyTorch reference otherwise).

    Conditional MI (``num_classes=C``): ``I(h_i; h_j | Y) = sum_y p(y) I(h_i; h_j | Y = y)`` and
    the optimal critic ``log p(a, b | y) / (p(a | y) p(b | y))`` depends on ``y``, so each class
    has its own critic parameters (``[C, P, K]`` per pair, ``[C, 1, K]`` shared). Each class's
    samples are scored by the op on that class's rows with negatives drawn among them
    (derangements within the class), and the per-class bounds (and losses) are combined with the
    class weights ``p(y)``: the batch frequencies of the classes that have at least two samples
    in the batch, renormalized over those classes (a class with fewer than two samples has no
    negative sample and is skipped for that batch; a batch where no class has two samples is an
    error). Every statistic of the unconditional estimator is kept per class (the moving
    average is ``[C, P]``). Compute is that of one unconditional call (the classes partition the
    batch), in ``C`` calls of the op. Memory grows ``C``-fold: at ``m = 1024`` (``P = 523,776``
    pairs), ``C = 10``, ``K = 16`` in float32 the critics hold ``C * P * (4K + 1) = 340.5 M``
    parameters, 1.36 GB, as much again for their gradients and 2.72 GB for Adam's two moments:
    5.45 GB in all, plus 84 MB for the moving average (float64). ``per_pair=False`` (one critic
    per class shared by all pairs) or ``max_pairs`` in a regularizer are the cheaper options.

    A module built without ``num_classes`` but called with labels keeps the earlier behaviour
    for one release, with a ``FutureWarning``: one label-blind critic per pair and negatives
    drawn within each class. That critic cannot represent a dependence that differs between
    classes (correlation +0.8 in one class and -0.8 in another: truth 0.511 nats, it finds about
    0.18), so build conditional estimators with ``num_classes``.

    Args:
        num_units: ``m``, the width of the layer.
        hidden: ``K``, hidden units of each pair's critic.
        per_pair: one critic per pair (``True``) or one critic shared by all pairs.
        pairs: ``None`` for all ``i < j`` (row-major), or ``[P, 2]`` int64 unit indices.
        estimator: ``"mine"``, ``"nwj"`` or ``"smile"`` (see the module docstring).
        negatives, num_negatives: product-of-marginals samples (see :func:`make_perms`); within a
            class, ``"shift"`` uses at most ``n_y - 1`` distinct shifts.
        ema: rate of MINE's moving average of ``E_Q[e^T]``.
        smile_clip: ``tau`` of SMILE.
        standardize: standardize each unit with batch statistics (see the module docstring).
        num_classes: ``C >= 2`` for the conditional estimator (labels then required), ``None``
            for the unconditional one.
        seed: seed of the module's own generator for negatives (``None``: drawn from PyTorch's
            global generator); its state is saved in ``state_dict()``.
        backend: forwarded to :func:`mmim_ext.pair_stats`.
        process_group: a ``torch.distributed`` group over which the pairs are sharded: this rank
            keeps a contiguous block of them (``self.shard``) with their critics and moving
            averages (see :mod:`mmim_ext.estimators.sharding`). Every call is then collective, on
            the global batch, with the negatives of rank 0's generator; ``critic_loss`` returns
            the block's estimates and loss, ``penalty`` the block's estimates and the value summed
            over ranks, ``evaluate`` every pair's estimate and :meth:`matrix` the whole matrix on
            every rank. ``pair_index`` holds global pair indices.
        gather_batch: with ``process_group``, whether each rank passes its own part of the batch
            (gathered here) or every rank the same global batch (``False``; a caller that
            gathered it, e.g. :class:`mmim_ext.MMIMRegularizer`).

    Entry points (see :mod:`mmim_ext.estimators.base`; the module picks the kernel):
    ``critic_loss(h, labels=None, pair_index=None) -> (estimates, loss)``,
    ``penalty(h, labels=None, pair_index=None, *, coef=1.0) -> (estimates, value)``,
    ``evaluate(h, labels=None, ...) -> [P]`` and ``forward`` (``critic_loss`` while the critics
    train, ``penalty`` otherwise). ``h``: ``[B, m]`` float32/float64; ``labels``: ``[B]`` int64
    in ``[0, C)``; ``pair_index``: optional ``[S]`` int64 subset of the module's pairs (only
    those critics are evaluated). Estimates are ``[P]`` or ``[S]`` in nats; ``loss`` is the SUM
    over pairs of the per-pair negative bounds, so that each pair's critic receives the gradient
    of its own bound whatever ``P`` is (for a shared critic it is the mean).
    """

    def __init__(self, num_units: int, hidden: int = 16, per_pair: bool = True, pairs=None,
                 estimator: str = "mine", negatives: str = "shuffle", num_negatives: int = 1,
                 ema: float = 0.01, smile_clip: float = 5.0, standardize: bool = True, *,
                 num_classes: int | None = None, seed: int | None = None, backend: str = "auto",
                 process_group=None, gather_batch: bool = True):
        super().__init__()
        owner = "PairwiseMINE"
        check_positive_int(owner, "num_units", num_units, 2)
        check_positive_int(owner, "hidden", hidden)
        check_positive_int(owner, "num_negatives", num_negatives)
        check_choice(owner, "estimator", estimator, BOUNDS)
        check_choice(owner, "negatives", negatives, NEGATIVES)
        if num_classes is not None:
            check_positive_int(owner, "num_classes", num_classes, 2)
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
        self.num_classes = num_classes
        self.backend = backend
        self.register_buffer("pairs", pairs)
        P = pairs.shape[0]
        n = P if per_pair else 1
        lead = () if num_classes is None else (num_classes,)
        # Scaled so that T starts near 0 (estimate ~ 0) with kinks spread over the data's range.
        self.wa = nn.Parameter(torch.randn(*lead, n, hidden))
        self.wb = nn.Parameter(torch.randn(*lead, n, hidden))
        self.b = nn.Parameter(torch.randn(*lead, n, hidden))
        self.v = nn.Parameter(0.1 * torch.randn(*lead, n, hidden) / math.sqrt(hidden))
        # NWJ's bound at T = 1 is 0 (at T = 0 it is -1/e per pair), so its critics start there.
        self.c = nn.Parameter(torch.full((*lead, n), 1.0 if estimator == "nwj" else 0.0))
        self._ema = LogEMA((*lead, P), ema) if estimator == "mine" else None
        self.register_buffer("last", torch.zeros(P))
        self._init_random(owner, seed)  # after the critics: their initialization is unchanged
        self.shard = None
        if process_group is not None:
            if not per_pair:
                raise ValueError(f"{owner}: argument 'process_group' needs per_pair=True (a shared critic has no pairs to shard)")
            # Built whole, then cut: a rank's critics start as the same pairs' critics of the
            # module built without a group from the same seed.
            self.shard = Shard(owner, process_group, P, gather_batch=gather_batch)
            names = {"wa": -2, "wb": -2, "b": -2, "v": -2, "c": -1, "pairs": 0, "last": 0}
            if self._ema is not None:
                names.update({"_ema.log_acc": -1, "_ema.count": -1})
            self.shard.cut_(self, names)
            broadcast_generator_(self.shard.group, self.generator)  # the same negatives on every rank

    @property
    def num_pairs(self) -> int:
        return self.pairs.shape[0]

    # -- plumbing ---------------------------------------------------------------------------------

    def _prepare(self, h, labels, pair_index, owner):
        check_features(owner, "h", h, self.num_units)
        check_finite(owner, "h", h)
        if labels is not None:
            check_labels(owner, labels, h.shape[0], self.num_classes)
        elif self.num_classes is not None:
            raise ValueError(f"{owner}: argument 'labels' is required: the module was built with "
                             f"num_classes={self.num_classes} (class-specific critics of I(h_i; h_j | Y))")
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

    def _groups(self, h, labels, owner, negatives=None, num_negatives=None, generator=None):
        """``[(cls, h_rows, weight, perms)]``: the batch split by class with the class weights
        ``p(y)`` and negatives drawn within each class; one group ``(None, h, 1.0, perms)`` for
        the unconditional estimator."""
        negatives = self.negatives if negatives is None else negatives
        generator = self.generator if generator is None else generator
        R = self.num_negatives if num_negatives is None else num_negatives
        B = h.shape[0]
        if self.num_classes is None:
            if labels is not None:
                warnings.warn(f"{owner}: labels given to a PairwiseMINE built without num_classes: its critics do not "
                              "see the label (negatives are drawn within each class only), which underestimates "
                              "I(h_i; h_j | Y) wherever the dependence differs between classes. Build it with "
                              "num_classes=C; this fallback will become an error.", FutureWarning, stacklevel=3)
            if num_negatives is not None and negatives == "shift" and labels is None:
                R = min(R, B - 1)  # evaluate(): as many shifts as the batch has
            return [(None, h, 1.0, make_perms(B, negatives, R, labels, device=h.device, generator=generator))]
        counts = torch.bincount(labels, minlength=self.num_classes).tolist()
        present = [y for y, n in enumerate(counts) if n >= 2]
        if not present:
            raise ValueError(f"{owner}: argument 'labels' has no class with two or more samples in this batch of "
                             f"{B}; the conditional estimate needs negatives within a class")
        total = sum(counts[y] for y in present)
        groups = []
        for y in present:
            rows = (labels == y).nonzero().squeeze(1)
            n = counts[y]
            r = R if negatives == "shuffle" else min(R, n - 1)
            perms = make_perms(n, negatives, r, device=h.device, generator=generator)
            groups.append((y, h.index_select(0, rows), n / total, perms))
        return groups

    def _class_params(self, detach=False, index=None):
        """The critic parameters of the pairs ``index`` (``None``: all) by class:
        ``[(wa, wb, b, v, c)]`` indexed by class (one ``unbind`` per call, so that the backward
        stacks the classes' gradients once), or the parameters themselves (a one-element list)
        for the unconditional estimator.

        The pairs are gathered by ``index_select`` once for every class before the ``unbind``
        (one gather per parameter instead of one advanced-indexing gather per class and
        parameter, each of whose backwards scattered into a full ``[P, K]`` zero tensor); the
        indices are distinct, so the values and gradients are the same."""
        ps = (self.wa, self.wb, self.b, self.v, self.c)
        if detach:
            ps = tuple(p.detach() for p in ps)
        if index is not None and self.per_pair:
            dim = 0 if self.num_classes is None else 1
            ps = tuple(p.index_select(dim, index) for p in ps)
        if self.num_classes is None:
            return [ps]
        return list(zip(*(p.unbind(0) for p in ps)))

    def _params(self, ps, dtype):
        """One class's (or the unconditional) parameters from :meth:`_class_params` in the op's form."""
        if not self.per_pair:
            return tuple(p[0].to(dtype) for p in ps)  # [K] and [] for the op's shared-critic form
        return tuple(p.to(dtype) for p in ps)

    def _ema_index(self, cls, pair_index):
        if cls is None:
            return pair_index
        return (cls, slice(None) if pair_index is None else pair_index)

    def pair_statistics(self, h, perms, pair_index=None, detach=False, cls=None):
        """Raw ``(t_joint, lme)`` of the critics (of class ``cls`` for a conditional module) on
        already-prepared features (see ``pair_stats``)."""
        pairs = self.pairs if pair_index is None else self.pairs[pair_index]
        ps = self._class_params(detach, pair_index)[0 if cls is None else cls]
        return pair_stats(h, *self._params(ps, h.dtype), perms, pairs, backend=self.backend)

    # -- entry points -----------------------------------------------------------------------------

    def critic_loss(self, h: torch.Tensor, labels: torch.Tensor | None = None,
                    pair_index: torch.Tensor | None = None):
        """A critic update: ``(estimates, loss)``.

        ``loss`` (0-d) is the sum over pairs of the per-pair negative bounds (MINE's
        moving-average gradient in training mode; the mean over pairs for a shared critic; the
        ``p(y)``-weighted sum over classes for a conditional module). Where the fused CPU
        kernel's one pass applies (``"mine"``), the statistics and the gradients are formed
        together (``pair_stats_mine_loss`` in training mode, whose moving-average rule is
        applied per pair once its ``lme`` is known; ``pair_stats_linear`` in eval mode, where
        the loss is linear in the statistics) and the estimates come back without gradient;
        elsewhere ``pair_stats`` and autograd.
        """
        if self.shard is not None and not self.shard.inside:
            return self.shard.run(self.critic_loss, h, labels, pair_index, out="local", width=self.num_units)
        owner = "PairwiseMINE.critic_loss"
        h, pairs = self._prepare(h, labels, pair_index, owner)
        params = self._class_params(index=pair_index)
        est, loss = 0.0, 0.0
        for cls, hg, w, perms in self._groups(h, labels, owner):
            ps = self._params(params[0 if cls is None else cls], h.dtype)
            if self.estimator == "mine" and one_pass_applies(hg, perms, self.backend):
                e, l = self._one_pass_loss(hg, perms, pairs, pair_index, ps, w, cls)
            else:
                e, l = self._loss(hg, perms, pairs, pair_index, ps, cls)
                l = w * (l.sum() if self.per_pair else l.mean())
            est, loss = est + w * e, loss + l
        self._record(est, pair_index)
        return est, loss

    def _loss(self, h, perms, pairs, pair_index, ps, cls):
        """critic_loss's general path: ``(estimates, per-pair loss)``."""
        if self.estimator == "smile":
            return self._smile(h, perms, pairs, ps)
        t_joint, lme = pair_stats(h, *ps, perms, pairs, backend=self.backend)
        if self.estimator == "mine":
            return t_joint - lme, mine_loss(t_joint, lme, self._ema, self._ema_index(cls, pair_index), self.training)
        est = nwj_bound(t_joint, lme)
        return est, -est

    def _one_pass_loss(self, h, perms, pairs, pair_index, ps, weight, cls):
        """critic_loss for ``"mine"`` through the fused one pass (the caller checked it applies)."""
        P = pairs.shape[0]
        scale = weight * (1.0 if self.per_pair else 1.0 / P)
        ct = torch.full((P,), -scale, dtype=h.dtype, device=h.device)
        if not self.training:  # the plain DV loss: linear in the statistics
            loss, t_joint, lme = pair_stats_linear(h, *ps, perms, ct, -ct, pairs, backend=self.backend)
            return t_joint - lme, loss
        # The average's state before this batch: la = log(1 - a) + log_acc, lk = log(1 - (1 - a)^count)
        # with count including this batch (LogEMA.update).
        ema = self._ema
        idx = self._ema_index(cls, pair_index)
        idx = slice(None) if idx is None else idx
        a = ema.rate
        la = ema.log_acc[idx] + math.log1p(-a)
        lk = torch.log1p(-torch.pow(1 - a, ema.count[idx] + 1))
        rule = torch.stack([la, lk], 1).to(h.dtype)
        loss, t_joint, lme = pair_stats_mine_loss(h, *ps, perms, pairs, ct, -ct, rule, math.log(a))
        ema.update(lme, idx)
        return t_joint - lme, loss

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
        owner = "PairwiseMINE.penalty"
        coef = check_coef(owner, coef)
        if self.shard is not None and not self.shard.inside:
            return self.shard.run(self.penalty, h, labels, pair_index, out="penalty", width=self.num_units, coef=coef)
        if self.estimator != "mine":
            est = self._frozen(h, labels, pair_index, owner=owner)
            return est.detach(), coef * est.sum()
        h, pairs = self._prepare(h, labels, pair_index, owner)
        params = self._class_params(detach=True, index=pair_index)
        est, value = 0.0, 0.0
        for cls, hg, w, perms in self._groups(h, labels, owner):
            ps = self._params(params[0 if cls is None else cls], h.dtype)
            ct = torch.full((pairs.shape[0],), coef * w, dtype=h.dtype, device=h.device)
            val, t_joint, lme = pair_stats_linear(hg, *ps, perms, ct, -ct, pairs, backend=self.backend)
            est, value = est + w * (t_joint - lme), value + val
        self._record(est, pair_index)
        return est, value

    def _frozen(self, h, labels=None, pair_index=None, *, owner="PairwiseMINE.forward"):
        """Estimates through detached critics, differentiable w.r.t. ``h`` (the general path)."""
        if self.shard is not None and not self.shard.inside:
            return self.shard.run(self._frozen, h, labels, pair_index, out="local", width=self.num_units, owner=owner)
        h, pairs = self._prepare(h, labels, pair_index, owner)
        params = self._class_params(detach=True, index=pair_index)
        est = 0.0
        for cls, hg, w, perms in self._groups(h, labels, owner):
            ps = self._params(params[0 if cls is None else cls], h.dtype)
            if self.estimator == "smile":
                t_joint, lme = self._smile_stats(hg, perms, pairs, ps)
            else:
                t_joint, lme = pair_stats(hg, *ps, perms, pairs, backend=self.backend)
            est = est + w * (nwj_bound(t_joint, lme) if self.estimator == "nwj" else t_joint - lme)
        self._record(est, pair_index)
        return est

    @torch.no_grad()
    def evaluate(self, h: torch.Tensor, labels: torch.Tensor | None = None, *, negatives: str = "shift",
                 num_negatives: int = 256, max_evals: int = 2**24, seed: int | None = 0) -> torch.Tensor:
        """Bound per pair (nats, ``[P]``) on held-out data with many negatives, without training.

        ``negatives="all"`` uses every other sample (of the class, for a conditional module);
        ``"shift"`` ``num_negatives`` shifts. The shifts are processed in chunks of at most
        ``max_evals`` critic evaluations per call of the op and merged by log-sum-exp, so memory
        stays bounded for large validation sets. ``seed`` seeds the shifts (``None``: drawn from
        the module's own generator). Updates :meth:`matrix`. With ``process_group``: every pair's
        bound, on every rank.
        """
        if self.shard is not None and not self.shard.inside:
            return self.shard.run(self.evaluate, h, labels, out="gather", width=self.num_units, negatives=negatives,
                                  num_negatives=num_negatives, max_evals=max_evals, seed=seed)
        owner = "PairwiseMINE.evaluate"
        check_choice(owner, "negatives", negatives, NEGATIVES)
        check_positive_int(owner, "num_negatives", num_negatives)
        check_positive_int(owner, "max_evals", max_evals)
        h, pairs = self._prepare(h, labels, None, owner)
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        params = self._class_params()
        est = 0.0
        for cls, hg, w, perms in self._groups(h, labels, owner, negatives, num_negatives, gen):
            ps = self._params(params[0 if cls is None else cls], h.dtype)
            R, B = perms.shape
            step = max(1, max_evals // max(1, self.num_pairs * B))
            t_joint, parts = None, []
            for s in range(0, R, step):
                chunk = perms[s:s + step]
                if self.estimator == "smile":
                    t, l = self._smile_stats(hg, chunk, pairs, ps)
                else:
                    t, l = pair_stats(hg, *ps, chunk, pairs, backend=self.backend)
                t_joint = t
                parts.append(l + math.log(chunk.shape[0]))
            lme = torch.logsumexp(torch.stack(parts), 0) - math.log(R)
            est = est + w * (nwj_bound(t_joint, lme) if self.estimator == "nwj" else t_joint - lme)
        self._record(est, None)
        return est

    # -- SMILE (clipped DV) in PyTorch ------------------------------------------------------------

    def _smile_scores(self, h, perms, pairs, ps):
        wa, wb, b, v, c = ps
        if not self.per_pair:
            wa, wb, b, v = (t.unsqueeze(0) for t in (wa, wb, b, v))
        a = h[:, pairs[:, 0]]  # [B, P]
        bj = h[:, pairs[:, 1]]

        def score(x, y):
            z = torch.relu(x.unsqueeze(-1) * wa + y.unsqueeze(-1) * wb + b)
            return (z * v).sum(-1) + c

        return score(a, bj), score(a.unsqueeze(0), bj[perms]).flatten(0, 1)  # [B, P], [R*B, P]

    def _smile(self, h, perms, pairs, ps):
        joint, marg = self._smile_scores(h, perms, pairs, ps)
        return bound_from_scores("smile", joint, marg, clip=self.smile_clip)

    def _smile_stats(self, h, perms, pairs, ps):
        # clipped critic for the marginal term, plain for the joint term
        joint, marg = self._smile_scores(h, perms, pairs, ps)
        return joint.mean(0), log_mean_exp(marg.clamp(-self.smile_clip, self.smile_clip))

    @torch.no_grad()
    def _record(self, est, pair_index):
        if pair_index is None:
            self.last.copy_(est.detach().to(self.last.dtype))
        else:
            self.last[pair_index] = est.detach().to(self.last.dtype)

    def matrix(self) -> torch.Tensor:
        """Latest estimates as a symmetric ``[m, m]`` matrix (nats, zero diagonal and zero for
        pairs the module does not estimate). With ``process_group``: every rank's pairs, on every
        rank (a collective call)."""
        m = self.num_units
        pairs, last = self.pairs, self.last
        if self.shard is not None:
            pairs, last = self.shard.gather(pairs), self.shard.gather(last)
        out = torch.zeros(m, m, dtype=last.dtype, device=last.device)
        out[pairs[:, 0], pairs[:, 1]] = last
        out[pairs[:, 1], pairs[:, 0]] = last
        return out
