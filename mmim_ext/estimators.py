"""Neural mutual-information estimators (MINE / NWJ / SMILE) as ``nn.Module`` s.

Every estimator owns its critic(s) as parameters and returns, from one ``forward`` call, the
current bound (nats) and the loss that trains the critic (minimize it with any optimizer). The
bound on a batch is a lower bound on the mutual information only in expectation and only for
a well-trained critic; the one-call functions in :mod:`mmim_ext.estimate` handle training,
validation and early stopping for data sets.

Modules
    :class:`PairwiseMINE`          ``I(h_i; h_j)`` (or ``I(h_i; h_j | Y)``) for many pairs of
                                   scalar units, through the fused op :func:`mmim_ext.pair_stats`.
    :class:`TotalCorrelationMINE`  ``I(h_1; ...; h_m) = KL(p(h) || prod_i p(h_i))`` (or given Y)
                                   with one joint critic over the whole vector.
    :class:`VectorMINE`            ``I(X; Y)`` between two vectors (concatenation critic).
    :class:`UnitLabelMINE`         ``I(Y; h_i)`` for every unit ``i`` of a layer at once.

Bounds (``estimator=``)
    ``"mine"``   Donsker-Varadhan ``E_P[T] - log E_Q[e^T]``; the critic is trained with MINE's
                 bias-corrected gradient, in which the batch ``E_Q[e^T]`` of the denominator is
                 replaced by an exponential moving average (rate ``ema``). The average starts
                 bias-corrected (as Adam's moments): the first step uses the batch value itself
                 instead of decaying from zero.
    ``"nwj"``    Nguyen-Wainwright-Jordan ``E_P[T] - E_Q[e^{T-1}]``.
    ``"smile"``  Song & Ermon's clipped DV ``E_P[T] - log E_Q[clip(e^T, e^-tau, e^tau)]``
                 (``tau = smile_clip``); its critic is trained with the Jensen-Shannon
                 gradient, as in the paper. The pairwise SMILE path needs per-sample scores,
                 which the fused op does not return, so it runs in plain PyTorch
                 (``O(R*B*P*K)`` memory: meant for small layers).

Product-of-marginals ("negative") samples (``negatives=``): ``"shuffle"`` draws
``num_negatives`` random permutations of the batch, ``"shift"`` ``num_negatives`` distinct
cyclic shifts, ``"all"`` every one of the ``B-1`` shifts (every off-diagonal pair). With
``labels`` every permutation maps each sample to a sample of the same class, which turns
``I(a; b)`` into ``I(a; b | Y)``.

With ``standardize=True`` each unit is standardized with the batch mean and standard deviation
inside the graph. Mutual information is invariant to such affine maps, and this keeps the
critics' inputs O(1) however large the activations get (so the bounds stay finite when a
regularizer pushes on the features) and removes the incentive to shrink or inflate features
to game the critic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmim_ext.ops import _one_pass_applies, _pair_stats_mine_loss, pair_stats, pair_stats_linear
from mmim_ext.reference import all_pairs

__all__ = [
    "ESTIMATORS",
    "NEGATIVES",
    "PairwiseMINE",
    "TotalCorrelationMINE",
    "UnitLabelMINE",
    "VectorMINE",
    "make_perms",
]

ESTIMATORS = ("mine", "nwj", "smile")
NEGATIVES = ("shuffle", "shift", "all")
_STD_EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# argument checks


def _check_choice(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: argument '{name}' must be one of {choices}, got {value!r}")


def _check_positive_int(owner: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: argument '{name}' must be an int >= {minimum}, got {value!r}")
    return value


def _check_features(owner: str, name: str, h, width: int | None = None) -> None:
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{owner}: argument '{name}' must be a torch.Tensor, got {type(h).__name__}")
    if h.dim() != 2:
        raise ValueError(f"{owner}: argument '{name}' must be 2-D [B, m], got shape {list(h.shape)}")
    if not h.is_floating_point():
        raise TypeError(f"{owner}: argument '{name}' must be a floating-point tensor, got {h.dtype}")
    if h.shape[0] < 2:
        raise ValueError(f"{owner}: argument '{name}' needs a batch of at least 2 samples, got B={h.shape[0]}")
    if width is not None and h.shape[1] != width:
        raise ValueError(f"{owner}: argument '{name}' must have {width} columns (units), got shape {list(h.shape)}")


def _check_labels(owner: str, labels, batch: int, num_classes: int | None = None) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{owner}: argument 'labels' must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{owner}: argument 'labels' must be int64 class indices, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"{owner}: argument 'labels' must have shape [{batch}] (one per sample), got {list(labels.shape)}")
    if num_classes is not None and labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{owner}: argument 'labels' holds values in [{lo}, {hi}], expected all in [0, {num_classes - 1}]")


def _standardize(h: torch.Tensor) -> torch.Tensor:
    """Per-column batch standardization; ``sqrt(var + eps)`` keeps dead (constant) units finite
    in value and gradient (``std`` itself has an infinite derivative at zero variance)."""
    mean = h.mean(0, keepdim=True)
    var = (h - mean).pow(2).mean(0, keepdim=True)
    return (h - mean) / torch.sqrt(var + _STD_EPS)


# ---------------------------------------------------------------------------------------------
# negative samples


def make_perms(batch: int, negatives: str = "shuffle", num_negatives: int = 1, labels=None, *,
               device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Permutations of the batch that produce product-of-marginals samples.

    Args:
        batch: batch size ``B`` (>= 2).
        negatives: ``"shuffle"`` (random permutations), ``"shift"`` (distinct random cyclic
            shifts) or ``"all"`` (every shift ``1..B-1``; ``num_negatives`` is ignored).
        num_negatives: number of rows ``R`` for ``"shuffle"`` and ``"shift"``.
        labels: optional ``[B]`` int64; then every row maps each sample to one of its own class
            (shifts cycle inside each class and skip the identity when the class has two or
            more members; ``"all"`` has ``max_class_size - 1`` rows).
        device, generator: where to build the result, and the random source.

    Returns:
        ``[R, B]`` int64, each row a permutation of ``0..B-1``.
    """
    _check_choice("make_perms", "negatives", negatives, NEGATIVES)
    _check_positive_int("make_perms", "batch", batch, 2)
    _check_positive_int("make_perms", "num_negatives", num_negatives)
    if labels is not None:
        _check_labels("make_perms", labels, batch)
        device = labels.device
    cpu = torch.device("cpu")
    if negatives == "shuffle":
        if labels is None:
            keys = torch.rand(num_negatives, batch, generator=generator, dtype=torch.float64)
            return keys.argsort(dim=1).to(device or cpu)
        lab = labels.to(cpu, torch.float64)
        keys = lab + 0.5 * torch.rand(num_negatives, batch, generator=generator, dtype=torch.float64)
        order = lab.argsort(stable=True)
        perms = torch.empty(num_negatives, batch, dtype=torch.int64)
        perms[:, order] = keys.argsort(dim=1)  # the k-th member of a class goes to a random member
        return perms.to(device or cpu)

    lab = torch.zeros(batch, dtype=torch.int64) if labels is None else labels.to(cpu)
    order = lab.argsort(stable=True)
    _, counts = torch.unique_consecutive(lab[order], return_counts=True)
    starts = counts.cumsum(0) - counts
    g_start = torch.repeat_interleave(starts, counts)
    g_size = torch.repeat_interleave(counts, counts)
    k = torch.arange(batch) - g_start
    if negatives == "all":
        shifts = torch.arange(1, max(2, int(counts.max())))
    else:
        n_max = int(counts.max())
        if num_negatives > max(1, n_max - 1) and labels is None:
            raise ValueError(f"make_perms: 'shift' with num_negatives={num_negatives} needs at most B-1={batch - 1} distinct shifts")
        pool = max(1, n_max - 1)
        pick = torch.randperm(pool, generator=generator)[: min(num_negatives, pool)]
        if num_negatives > pool:  # conditional case with tiny classes: reuse shifts
            pick = pick.repeat(math.ceil(num_negatives / pool))[:num_negatives]
        shifts = pick + 1
    # A shift s inside a class of size n becomes 1 + (s-1) mod (n-1), never the identity.
    size = g_size.unsqueeze(0)
    eff = torch.where(size > 1, 1 + (shifts.unsqueeze(1) - 1) % (size - 1).clamp(min=1), torch.zeros_like(size))
    new_pos = g_start + (k + eff) % size
    perms = torch.empty(shifts.shape[0], batch, dtype=torch.int64)
    perms[:, order] = order[new_pos]
    return perms.to(device or cpu)


def _product_of_marginals(h: torch.Tensor, labels, num_draws: int, generator=None) -> torch.Tensor:
    """``num_draws`` samples of the batch with every column permuted independently (within class
    when ``labels`` is given): ``[num_draws * B, m]``."""
    B, m = h.shape
    draws = []
    for _ in range(num_draws):
        perms = make_perms(B, "shuffle", m, labels, device=h.device, generator=generator)  # [m, B]
        draws.append(torch.gather(h, 0, perms.t()))
    return torch.cat(draws, 0)


def critic_adam(params, lr: float) -> torch.optim.Adam:
    """Adam for critic parameters, the fused implementation where PyTorch has it.

    Per-pair critics have large parameters (four ``[P, K]`` tensors, 33.5 MB each at m=1024,
    K=16): the default Adam runs a dozen elementwise passes over each, the fused one a single
    multi-threaded pass (on this project's 2-core machine its step took 0.07 s against 0.31 s
    for a regularizer's critics at m=1024, ``benchmarks/RESULTS.md`` §8). Both compute the same
    update up to rounding. Falls back to the default where ``fused=True`` is refused (a device
    without the fused kernel).
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


# ---------------------------------------------------------------------------------------------
# bounds from scores


class _LogEMA(nn.Module):
    """Bias-corrected exponential moving average of ``E_Q[e^T]`` kept in log space per element."""

    def __init__(self, size: int, rate: float):
        super().__init__()
        self.rate = float(rate)
        self.register_buffer("log_acc", torch.full((size,), -math.inf, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(size, dtype=torch.float64))

    @torch.no_grad()
    def update(self, lme: torch.Tensor, index=None) -> torch.Tensor:
        """Fold in the batch values ``lme`` (for ``index`` or all elements); return the
        bias-corrected log average for those elements."""
        idx = slice(None) if index is None else index
        a = self.rate
        acc = self.log_acc[idx]
        cnt = self.count[idx] + 1
        new = torch.logaddexp(acc + math.log1p(-a), lme.detach().to(acc.dtype) + math.log(a))
        self.log_acc[idx] = new
        self.count[idx] = cnt
        corrected = new - torch.log1p(-torch.pow(1 - a, cnt))
        return corrected.to(lme.dtype)


def _mine_loss(t_joint, lme, ema: _LogEMA | None, index=None, training=True):
    """Negative DV bound whose gradient uses the EMA denominator (MINE's bias correction)."""
    if ema is None or not training or not lme.requires_grad:
        return -(t_joint - lme)
    log_avg = ema.update(lme, index)
    # value = lme, gradient = grad(E_Q[e^T]) / EMA(E_Q[e^T])
    ratio = torch.exp(lme - log_avg)
    surrogate = lme.detach() + ratio - ratio.detach()
    return -(t_joint - surrogate)


def _nwj(t_joint, lme):
    return t_joint - torch.exp(lme - 1.0)


def _lme(scores: torch.Tensor) -> torch.Tensor:
    """log-mean-exp over the first dimension."""
    return torch.logsumexp(scores, 0) - math.log(scores.shape[0])


def _bound_from_scores(estimator: str, joint, marg, *, ema=None, training=True, clip=5.0):
    """(estimate, loss) per element from joint scores ``[N_p, ...]`` and marginal scores ``[N_q, ...]``."""
    t_joint = joint.mean(0)
    if estimator == "mine":
        lme = _lme(marg)
        return (t_joint - lme), _mine_loss(t_joint, lme, ema, training=training)
    if estimator == "nwj":
        est = _nwj(t_joint, _lme(marg))
        return est, -est
    est = t_joint - _lme(marg.clamp(-clip, clip))
    # Jensen-Shannon gradient (Song & Ermon's training signal for SMILE).
    js = -F.softplus(-joint).mean(0) - F.softplus(marg).mean(0)
    return est, -js


class _MLP(nn.Sequential):
    def __init__(self, dim_in: int, hidden: int, layers: int, out_bias: float = 0.0):
        mods: list[nn.Module] = []
        d = dim_in
        for _ in range(layers):
            mods += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        last = nn.Linear(d, 1)
        with torch.no_grad():
            last.bias.fill_(out_bias)  # 1 for NWJ (bound 0 at T = 1), else 0
        mods.append(last)
        super().__init__(*mods)


# ---------------------------------------------------------------------------------------------
# pairwise


class PairwiseMINE(nn.Module):
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

    ``forward(h, labels=None, pair_index=None)``:
        h: ``[B, m]`` float32/float64; labels: optional ``[B]`` int64; pair_index: optional
        ``[S]`` int64 subset of the module's pairs (only those critics are evaluated).
        Returns ``(estimates [P] or [S] in nats, loss)``; ``loss`` is the SUM over pairs of the
        per-pair negative bounds (with the MINE gradient correction in training mode), so that
        each pair's critic receives the gradient of its own bound whatever ``P`` is (for a
        shared critic it is the mean).
    """

    def __init__(self, num_units: int, hidden: int = 16, per_pair: bool = True, pairs=None,
                 estimator: str = "mine", negatives: str = "shuffle", num_negatives: int = 1,
                 ema: float = 0.01, smile_clip: float = 5.0, standardize: bool = True, *,
                 backend: str = "auto"):
        super().__init__()
        owner = "PairwiseMINE"
        _check_positive_int(owner, "num_units", num_units, 2)
        _check_positive_int(owner, "hidden", hidden)
        _check_positive_int(owner, "num_negatives", num_negatives)
        _check_choice(owner, "estimator", estimator, ESTIMATORS)
        _check_choice(owner, "negatives", negatives, NEGATIVES)
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
        self._ema = _LogEMA(P, ema) if estimator == "mine" else None
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

    def _prepare(self, h, labels, pair_index):
        owner = "PairwiseMINE.forward"
        _check_features(owner, "h", h, self.num_units)
        if labels is not None:
            _check_labels(owner, labels, h.shape[0])
        if pair_index is not None:
            if not isinstance(pair_index, torch.Tensor) or pair_index.dtype != torch.int64 or pair_index.dim() != 1:
                raise ValueError(f"{owner}: argument 'pair_index' must be a 1-D int64 tensor")
            if pair_index.numel() == 0 or int(pair_index.min()) < 0 or int(pair_index.max()) >= self.num_pairs:
                raise ValueError(f"{owner}: argument 'pair_index' must be non-empty with values in [0, {self.num_pairs - 1}]")
        if h.dtype not in (torch.float32, torch.float64):
            h = h.float()
        if self.standardize:
            h = _standardize(h)
        pairs = self.pairs if pair_index is None else self.pairs[pair_index]
        return h, pairs

    def pair_statistics(self, h, perms, pair_index=None, detach=False):
        """Raw ``(t_joint, lme)`` of the critics on already-prepared features (see ``pair_stats``)."""
        pairs = self.pairs if pair_index is None else self.pairs[pair_index]
        params = self._params(pair_index, h.dtype, detach)
        return pair_stats(h, *params, perms, pairs, backend=self.backend)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None, pair_index: torch.Tensor | None = None,
                *, compute_loss: bool = True):
        """See the class docstring. With ``compute_loss=False`` the critic is used frozen (its
        parameters are detached, the EMA is left alone) and the loss returned is ``None``: the
        call a regularizer makes to get a penalty differentiable w.r.t. ``h`` only."""
        h, pairs = self._prepare(h, labels, pair_index)
        perms = make_perms(h.shape[0], self.negatives, self.num_negatives, labels, device=h.device)
        if not compute_loss:
            if self.estimator == "smile":
                t_joint, lme = self._smile_stats(h, perms, pairs, pair_index, detach=True)
            else:
                t_joint, lme = self.pair_statistics(h, perms, pair_index, detach=True)
            est = _nwj(t_joint, lme) if self.estimator == "nwj" else t_joint - lme
            self._record(est, pair_index)
            return est, None
        return self._loss(h, perms, pairs, pair_index)

    def _loss(self, h, perms, pairs, pair_index):
        """forward's ``(estimates, loss)`` on prepared features and drawn negatives."""
        if self.estimator == "smile":
            est, loss = self._smile(h, perms, pairs, pair_index)
        else:
            t_joint, lme = self.pair_statistics(h, perms, pair_index)
            if self.estimator == "mine":
                est = t_joint - lme
                loss = _mine_loss(t_joint, lme, self._ema, pair_index, self.training)
            else:
                est = _nwj(t_joint, lme)
                loss = -est
        self._record(est, pair_index)
        loss = loss.sum() if self.per_pair else loss.mean()
        return est, loss

    def critic_loss(self, h: torch.Tensor, labels: torch.Tensor | None = None,
                    pair_index: torch.Tensor | None = None):
        """``forward(h, labels, pair_index)`` for a critic update: ``(estimates, loss)``.

        The same loss, gradients and moving-average update as ``forward``. For the ``"mine"``
        estimator in training mode with the CPU kernel the loss comes from one pass over the
        samples (``mmim_ext::pair_stats_fwd_bwd_mine``: statistics and gradients together, the
        moving-average rule applied per pair once its ``lme`` is known) instead of a forward and a
        backward; the estimates are then returned without gradient. Other cases call ``forward``.
        """
        if not (self.estimator == "mine" and self.training and self._ema is not None):
            return self(h, labels, pair_index)
        h, pairs = self._prepare(h, labels, pair_index)
        perms = make_perms(h.shape[0], self.negatives, self.num_negatives, labels, device=h.device)
        if not _one_pass_applies(h, perms, self.backend):
            return self._loss(h, perms, pairs, pair_index)  # the general path, with these negatives
        P = pairs.shape[0]
        scale = 1.0 if self.per_pair else 1.0 / P
        ct = torch.full((P,), -scale, dtype=h.dtype, device=h.device)
        # The average's state before this batch: la = log(1 - a) + log_acc, lk = log(1 - (1 - a)^count)
        # with count including this batch (_LogEMA.update).
        ema = self._ema
        idx = slice(None) if pair_index is None else pair_index
        a = ema.rate
        la = ema.log_acc[idx] + math.log1p(-a)
        lk = torch.log1p(-torch.pow(1 - a, ema.count[idx] + 1))
        rule = torch.stack([la, lk], 1).to(h.dtype)
        params = self._params(pair_index, h.dtype)
        loss, t_joint, lme = _pair_stats_mine_loss(h, *params, perms, pairs, ct, -ct, rule, math.log(a))
        ema.update(lme, pair_index)
        est = t_joint - lme
        self._record(est, pair_index)
        return est, loss

    def penalty(self, h: torch.Tensor, labels: torch.Tensor | None = None, pair_index: torch.Tensor | None = None,
                *, coef: float = 1.0):
        """``coef`` times the sum over pairs of the estimates, with the critics frozen.

        The penalty a regularizer adds to the task loss: differentiable w.r.t. ``h`` only (the
        critics' parameters are detached, the EMA is left alone), the value that
        ``coef * self(h, labels, pair_index, compute_loss=False)[0].sum()`` gives. For the
        ``"mine"`` estimator (the Donsker-Varadhan bound ``t_joint - lme`` per pair) it is a fixed
        linear combination of the op's statistics, so it goes through
        :func:`mmim_ext.pair_stats_linear`: on the CPU kernel, the statistics and the gradient
        w.r.t. ``h`` in one pass over the samples instead of a forward and a backward. The other
        estimators take the general path.

        Returns:
            ``(estimates, value)``: the per-pair estimates (``[P]`` or ``[S]``, nats, without
            gradient; also recorded as by ``forward``) and ``value``, a 0-d tensor.
        """
        coef = float(coef)
        if not math.isfinite(coef):
            raise ValueError(f"PairwiseMINE.penalty: argument 'coef' must be a finite number, got {coef!r}")
        if self.estimator != "mine":
            est, _ = self(h, labels, pair_index, compute_loss=False)
            return est.detach(), coef * est.sum()
        h, pairs = self._prepare(h, labels, pair_index)
        perms = make_perms(h.shape[0], self.negatives, self.num_negatives, labels, device=h.device)
        params = self._params(pair_index, h.dtype, detach=True)
        ct = torch.full((pairs.shape[0],), coef, dtype=h.dtype, device=h.device)
        value, t_joint, lme = pair_stats_linear(h, *params, perms, ct, -ct, pairs, backend=self.backend)
        est = t_joint - lme
        self._record(est, pair_index)
        return est, value

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
        return _bound_from_scores("smile", joint, marg, clip=self.smile_clip)

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
        h, pairs = self._prepare(h, labels, None)
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
        est = _nwj(t_joint, lme) if self.estimator == "nwj" else t_joint - lme
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
        return joint, _lme(marg)

    def matrix(self) -> torch.Tensor:
        """Latest estimates as a symmetric ``[m, m]`` matrix (nats, zero diagonal and zero for
        pairs the module does not estimate)."""
        m = self.num_units
        out = torch.zeros(m, m, dtype=self.last.dtype, device=self.last.device)
        out[self.pairs[:, 0], self.pairs[:, 1]] = self.last
        out[self.pairs[:, 1], self.pairs[:, 0]] = self.last
        return out


# ---------------------------------------------------------------------------------------------
# total correlation


class TotalCorrelationMINE(nn.Module):
    """Total correlation ``I(h_1; ...; h_m) = KL(p(h) || prod_i p(h_i))`` (nats), or with labels
    ``KL(p(h|Y) || prod_i p(h_i|Y))`` averaged over ``Y``.

    One critic ``T: R^m -> R`` (an MLP with ``layers`` hidden layers of width ``hidden``) scores
    joint samples (rows of ``h``) against product-of-marginals samples built by permuting every
    column of the batch independently (within each class when labels are given),
    ``num_negatives`` such draws per call.

    ``forward(h, labels=None)`` with ``h`` ``[B, m]`` returns ``(estimate scalar tensor, loss)``.
    """

    def __init__(self, num_units: int, hidden: int = 64, layers: int = 2, estimator: str = "mine",
                 num_negatives: int = 1, ema: float = 0.01, smile_clip: float = 5.0,
                 standardize: bool = True):
        super().__init__()
        owner = "TotalCorrelationMINE"
        _check_positive_int(owner, "num_units", num_units, 2)
        _check_positive_int(owner, "hidden", hidden)
        _check_positive_int(owner, "layers", layers)
        _check_positive_int(owner, "num_negatives", num_negatives)
        _check_choice(owner, "estimator", estimator, ESTIMATORS)
        if not 0.0 < float(ema) <= 1.0:
            raise ValueError(f"{owner}: argument 'ema' must be in (0, 1], got {ema!r}")
        self.num_units = num_units
        self.estimator = estimator
        self.num_negatives = num_negatives
        self.smile_clip = float(smile_clip)
        self.standardize = standardize
        self.critic = _MLP(num_units, hidden, layers, 1.0 if estimator == "nwj" else 0.0)
        self._ema = _LogEMA(1, ema) if estimator == "mine" else None

    def _prepare(self, h, labels, owner):
        _check_features(owner, "h", h, self.num_units)
        if labels is not None:
            _check_labels(owner, labels, h.shape[0])
        h = h.float() if h.dtype not in (torch.float32, torch.float64) else h
        return _standardize(h) if self.standardize else h

    def _scores(self, h, labels, draws, generator=None, detach=False):
        dtype = next(self.critic.parameters()).dtype
        critic = self.critic
        if detach:
            params = {k: p.detach() for k, p in self.critic.named_parameters()}
            critic = lambda z: torch.func.functional_call(self.critic, params, (z,))  # noqa: E731
        joint = critic(h.to(dtype))
        marg = critic(_product_of_marginals(h, labels, draws, generator).to(dtype))
        return joint, marg

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None, *, compute_loss: bool = True):
        """See the class docstring; ``compute_loss=False``: frozen critic, loss ``None``."""
        h = self._prepare(h, labels, "TotalCorrelationMINE.forward")
        joint, marg = self._scores(h, labels, self.num_negatives, detach=not compute_loss)
        if not compute_loss:
            est, _ = _bound_from_scores(self.estimator, joint, marg, training=False, clip=self.smile_clip)
            return est[0], None
        est, loss = _bound_from_scores(self.estimator, joint, marg, ema=self._ema,
                                       training=self.training, clip=self.smile_clip)
        return est[0], loss[0]

    @torch.no_grad()
    def evaluate(self, h: torch.Tensor, labels: torch.Tensor | None = None, *, num_draws: int = 16,
                 seed: int | None = 0) -> float:
        """Bound (nats) on held-out data with ``num_draws`` product-of-marginals draws."""
        h = self._prepare(h, labels, "TotalCorrelationMINE.evaluate")
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        joint, marg = self._scores(h, labels, num_draws, gen)
        est, _ = _bound_from_scores(self.estimator, joint, marg, training=False, clip=self.smile_clip)
        return float(est[0])


# ---------------------------------------------------------------------------------------------
# two vectors


class VectorMINE(nn.Module):
    """``I(X; Y)`` between two vectors with a concatenation critic ``T(x, y) = MLP([x, y])``.

    ``forward(x, y)`` with ``x`` ``[B, dx]`` and ``y`` ``[B, dy]`` (1-D inputs are read as one
    column) returns ``(estimate scalar tensor, loss)``. Negatives pair ``x`` with permuted ``y``.
    """

    def __init__(self, x_dim: int, y_dim: int, hidden: int = 64, layers: int = 2, estimator: str = "mine",
                 negatives: str = "shuffle", num_negatives: int = 1, ema: float = 0.01,
                 smile_clip: float = 5.0, standardize: bool = True):
        super().__init__()
        owner = "VectorMINE"
        _check_positive_int(owner, "x_dim", x_dim)
        _check_positive_int(owner, "y_dim", y_dim)
        _check_positive_int(owner, "hidden", hidden)
        _check_positive_int(owner, "layers", layers)
        _check_positive_int(owner, "num_negatives", num_negatives)
        _check_choice(owner, "estimator", estimator, ESTIMATORS)
        _check_choice(owner, "negatives", negatives, NEGATIVES)
        if not 0.0 < float(ema) <= 1.0:
            raise ValueError(f"{owner}: argument 'ema' must be in (0, 1], got {ema!r}")
        self.x_dim, self.y_dim = x_dim, y_dim
        self.estimator = estimator
        self.negatives = negatives
        self.num_negatives = num_negatives
        self.smile_clip = float(smile_clip)
        self.standardize = standardize
        self.critic = _MLP(x_dim + y_dim, hidden, layers, 1.0 if estimator == "nwj" else 0.0)
        self._ema = _LogEMA(1, ema) if estimator == "mine" else None

    def _prepare(self, x, y, owner):
        if isinstance(x, torch.Tensor) and x.dim() == 1:
            x = x.unsqueeze(1)
        if isinstance(y, torch.Tensor) and y.dim() == 1:
            y = y.unsqueeze(1)
        _check_features(owner, "x", x, self.x_dim)
        _check_features(owner, "y", y, self.y_dim)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{owner}: arguments 'x' and 'y' must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
        dtype = next(self.critic.parameters()).dtype
        x, y = x.to(dtype), y.to(dtype)
        if self.standardize:
            x, y = _standardize(x), _standardize(y)
        return x, y

    def _scores(self, x, y, perms):
        B = x.shape[0]
        joint = self.critic(torch.cat([x, y], 1))
        R = perms.shape[0]
        xm = x.unsqueeze(0).expand(R, B, -1)
        marg = self.critic(torch.cat([xm, y[perms]], 2)).flatten(0, 1)
        return joint, marg

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        x, y = self._prepare(x, y, "VectorMINE.forward")
        perms = make_perms(x.shape[0], self.negatives, self.num_negatives, device=x.device)
        joint, marg = self._scores(x, y, perms)
        est, loss = _bound_from_scores(self.estimator, joint, marg, ema=self._ema,
                                       training=self.training, clip=self.smile_clip)
        return est[0], loss[0]

    @torch.no_grad()
    def evaluate(self, x, y, *, num_negatives: int = 64, seed: int | None = 0) -> float:
        """Bound (nats) on held-out data with ``num_negatives`` cyclic shifts of ``y``."""
        x, y = self._prepare(x, y, "VectorMINE.evaluate")
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        perms = make_perms(x.shape[0], "shift", min(num_negatives, x.shape[0] - 1), generator=gen, device=x.device)
        joint, marg = self._scores(x, y, perms)
        est, _ = _bound_from_scores(self.estimator, joint, marg, training=False, clip=self.smile_clip)
        return float(est[0])


# ---------------------------------------------------------------------------------------------
# label vs every unit


class _LabelCriticScores(torch.autograd.Function):
    """``S[n, i, y] = sum_k v[i, k] relu(base[n, i, k] + emb[i, y, k])`` for every sample, unit
    and class, computed over chunks of units.

    Written out directly, autograd keeps several ``[B, m, C, K]`` tensors (168 MB each at
    B=256, m=1024, C=10, K=16) and streams each through memory a few times. Here a chunk's
    ``[B, chunk, C, K]`` pre-activations are formed, used and dropped (they stay in cache), and
    the backward forms them again from the saved ``base``, ``emb``, ``v``: forward + backward
    0.78 → 0.39 s at that size on this project's machine (``benchmarks/RESULTS.md`` §8). Once
    differentiable.
    """

    @staticmethod
    def forward(ctx, base, emb, v, chunk: int):
        m = base.shape[1]
        out = base.new_empty(base.shape[0], m, emb.shape[1])
        for i0 in range(0, m, chunk):
            i1 = min(i0 + chunk, m)
            pre = (base[:, i0:i1, None, :] + emb[None, i0:i1]).relu_()
            out[:, i0:i1] = torch.einsum("biyk,ik->biy", pre, v[i0:i1])
        ctx.save_for_backward(base, emb, v)
        ctx.chunk = chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        base, emb, v = ctx.saved_tensors
        need_base, need_emb, need_v = ctx.needs_input_grad[:3]
        g_base = torch.empty_like(base) if need_base else None
        g_emb = torch.empty_like(emb) if need_emb else None
        g_v = torch.empty_like(v) if need_v else None
        m = base.shape[1]
        for i0 in range(0, m, ctx.chunk):
            i1 = min(i0 + ctx.chunk, m)
            pre = base[:, i0:i1, None, :] + emb[None, i0:i1]  # [B, chunk, C, K]
            g = grad[:, i0:i1]
            if need_v:
                g_v[i0:i1] = torch.einsum("biy,biyk->ik", g, pre.relu())
            if need_base or need_emb:
                g_pre = (g[..., None] * v[None, i0:i1, None, :]).masked_fill_(pre <= 0, 0)
                if need_base:
                    g_base[:, i0:i1] = g_pre.sum(2)
                if need_emb:
                    g_emb[i0:i1] = g_pre.sum(0)
        return g_base, g_emb, g_v, None


# Bytes of one chunk's pre-activations in _LabelCriticScores on the CPU (a few MB: in L2/L3).
_LABEL_CHUNK_BYTES = 2 << 20


def _label_critic_scores(base: torch.Tensor, emb: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    B, m, K = base.shape
    per_unit = B * emb.shape[1] * K * base.element_size()
    chunk = m if base.device.type != "cpu" else max(1, min(m, _LABEL_CHUNK_BYTES // max(1, per_unit)))
    return _LabelCriticScores.apply(base, emb, v, chunk)


class UnitLabelMINE(nn.Module):
    """``I(Y; h_i)`` for every unit ``i`` of a layer at once (nats).

    Unit ``i`` has the critic ``T_i(y, a) = c_i + sum_k v_ik relu(e_iyk + w_ik a + b_ik)`` (an MLP
    on ``[onehot(y), a]`` with ``hidden`` units). Because ``Y`` is discrete the product of the
    marginals is integrated exactly over the classes: the marginal term is
    ``log (1/B) sum_n sum_y p(y) exp(T_i(y, h_ni))`` with ``p(y)`` the batch's class
    frequencies, so no negative sampling is needed.

    ``forward(h, labels)`` with ``h`` ``[B, m]`` and ``labels`` ``[B]`` int64 returns
    ``(estimates [m], loss)``; ``loss`` is the sum over units.
    """

    def __init__(self, num_units: int, num_classes: int, hidden: int = 16, estimator: str = "mine",
                 ema: float = 0.01, smile_clip: float = 5.0, standardize: bool = True):
        super().__init__()
        owner = "UnitLabelMINE"
        _check_positive_int(owner, "num_units", num_units)
        _check_positive_int(owner, "num_classes", num_classes, 2)
        _check_positive_int(owner, "hidden", hidden)
        _check_choice(owner, "estimator", estimator, ESTIMATORS)
        if not 0.0 < float(ema) <= 1.0:
            raise ValueError(f"{owner}: argument 'ema' must be in (0, 1], got {ema!r}")
        self.num_units, self.num_classes = num_units, num_classes
        self.estimator = estimator
        self.smile_clip = float(smile_clip)
        self.standardize = standardize
        self.emb = nn.Parameter(torch.randn(num_units, num_classes, hidden))
        self.w = nn.Parameter(torch.randn(num_units, hidden))
        self.b = nn.Parameter(torch.randn(num_units, hidden))
        self.v = nn.Parameter(0.1 * torch.randn(num_units, hidden) / math.sqrt(hidden))
        self.c = nn.Parameter(torch.full((num_units,), 1.0 if estimator == "nwj" else 0.0))
        self._ema = _LogEMA(num_units, ema) if estimator == "mine" else None
        self.register_buffer("last", torch.zeros(num_units))

    def _scores(self, h, labels, detach=False):
        """Joint scores ``[B, m]`` and scores for every class ``[B, m, C]``."""
        emb, w, b, v, c = (self.emb, self.w, self.b, self.v, self.c)
        if detach:
            emb, w, b, v, c = (t.detach() for t in (emb, w, b, v, c))
        base = h.unsqueeze(-1) * w + b  # [B, m, K]
        scores = _label_critic_scores(base, emb, v) + c.unsqueeze(-1)  # [B, m, C]
        joint = scores.gather(2, labels.view(-1, 1, 1).expand(-1, self.num_units, 1)).squeeze(2)
        return joint, scores

    def forward(self, h: torch.Tensor, labels: torch.Tensor, *, compute_loss: bool = True):
        """See the class docstring; ``compute_loss=False``: frozen critic, loss ``None``."""
        owner = "UnitLabelMINE.forward"
        _check_features(owner, "h", h, self.num_units)
        if labels is None:
            raise ValueError(f"{owner}: argument 'labels' is required (I(Y; h_i) needs the labels)")
        _check_labels(owner, labels, h.shape[0], self.num_classes)
        h = h.to(self.w.dtype)
        if self.standardize:
            h = _standardize(h)
        joint, scores = self._scores(h, labels, detach=not compute_loss)
        B = h.shape[0]
        p = torch.bincount(labels, minlength=self.num_classes).to(h.dtype) / B
        logp = torch.log(p.clamp_min(1e-30))
        t_joint = joint.mean(0)
        if not compute_loss:
            clip = self.smile_clip if self.estimator == "smile" else math.inf
            lme = torch.logsumexp(scores.clamp(-clip, clip) + logp, dim=2).logsumexp(0) - math.log(B)
            est = _nwj(t_joint, lme) if self.estimator == "nwj" else t_joint - lme
            with torch.no_grad():
                self.last.copy_(est.detach().to(self.last.dtype))
            return est, None
        if self.estimator == "smile":
            clipped = scores.clamp(-self.smile_clip, self.smile_clip)
            lme = torch.logsumexp(clipped + logp, dim=2).logsumexp(0) - math.log(B)
            est = t_joint - lme
            # JS gradient: marginal expectation of softplus(T) under p(y) p(h)
            js = -F.softplus(-joint).mean(0) - (F.softplus(scores) * p).sum(2).mean(0)
            loss = -js
        else:
            lme = torch.logsumexp(scores + logp, dim=2).logsumexp(0) - math.log(B)
            if self.estimator == "mine":
                est = t_joint - lme
                loss = _mine_loss(t_joint, lme, self._ema, training=self.training)
            else:
                est = _nwj(t_joint, lme)
                loss = -est
        with torch.no_grad():
            self.last.copy_(est.detach().to(self.last.dtype))
        return est, loss.sum()
