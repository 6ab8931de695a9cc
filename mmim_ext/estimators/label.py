"""``I(Y; h)`` between a discrete label and a whole feature vector, and one-call estimates of
``I(Y; h)`` and of ``I(Y; h_i)`` per unit on data sets (nats).

Because ``Y`` is discrete, the product of the marginals is integrated exactly over the classes
(no negative sampling): the marginal term of the bound is
``log (1/B) sum_n sum_y p(y) exp(T(y, h_n))`` with ``p(y)`` the batch's class frequencies.

The critic of :class:`LabelMINE` is ``T(y, h) = f(h)_y``, an MLP with one output per class. The
optimal Donsker-Varadhan critic ``log p(y | h) / p(y) + const`` has exactly this form (a
classifier's log-probabilities shifted by the log prior), so the bound is tight for a critic
that classifies as well as the Bayes classifier.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmim_ext._checks import check_choice, check_features, check_labels, check_positive_int
from mmim_ext.estimators.base import MIEstimator, check_coef, check_finite
from mmim_ext.estimators.bounds import BOUNDS, LogEMA, critic_adam, mine_loss, nwj_bound, standardize
from mmim_ext.estimators.unit_label import UnitLabelMINE

__all__ = ["LabelMINE", "estimate_label_mi", "estimate_unit_label_mi"]


class LabelMINE(MIEstimator):
    """``I(Y; h)`` for a label ``Y`` in ``0..num_classes-1`` and features ``h`` ``[B, m]`` (nats).

    Args:
        num_units: ``m``.
        num_classes: number of classes.
        hidden, layers: width and depth of the critic MLP ``f: R^m -> R^num_classes``.
        estimator: ``"mine"`` (DV with MINE's moving-average gradient), ``"nwj"`` or
            ``"smile"`` (clipped DV with the Jensen-Shannon gradient).
        ema, smile_clip: see :mod:`mmim_ext.estimators.bounds`.
        standardize: standardize each unit with batch statistics (MI is unchanged).

    Entry points (:mod:`mmim_ext.estimators.base`), ``h`` ``[B, m]`` float, ``labels`` ``[B]``
    int64: ``critic_loss(h, labels) -> (estimate 0-d, loss 0-d)``; ``penalty(h, labels,
    coef=1.0) -> (estimate without gradient, coef * estimate)`` through the frozen critic
    (differentiable w.r.t. ``h`` only); ``evaluate(h, labels) -> 0-d tensor``. No negative
    sampling (the label marginal is integrated exactly), so no random state.
    """

    def __init__(self, num_units: int, num_classes: int, hidden: int = 64, layers: int = 2,
                 estimator: str = "mine", ema: float = 0.01, smile_clip: float = 5.0, standardize: bool = True):
        super().__init__()
        owner = "LabelMINE"
        check_positive_int(owner, "num_units", num_units)
        check_positive_int(owner, "num_classes", num_classes, 2)
        check_positive_int(owner, "hidden", hidden)
        check_positive_int(owner, "layers", layers, 0)
        check_choice(owner, "estimator", estimator, BOUNDS)
        if not 0.0 < float(ema) <= 1.0:
            raise ValueError(f"{owner}: argument 'ema' must be in (0, 1], got {ema!r}")
        self.num_units, self.num_classes = num_units, num_classes
        self.estimator = estimator
        self.smile_clip = float(smile_clip)
        self.standardize = standardize
        mods: list[nn.Module] = []
        d = num_units
        for _ in range(layers):
            mods += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        mods.append(nn.Linear(d, num_classes))
        self.critic = nn.Sequential(*mods)
        with torch.no_grad():
            self.critic[-1].weight.mul_(0.1)  # T starts near a constant: estimate ~ 0
            self.critic[-1].bias.fill_(1.0 if estimator == "nwj" else 0.0)
        self._ema = LogEMA(1, ema) if estimator == "mine" else None

    def _prepare(self, h, labels, owner):
        check_features(owner, "h", h, self.num_units)
        check_finite(owner, "h", h)
        if labels is None:
            raise ValueError(f"{owner}: argument 'labels' is required (I(Y; h) needs the labels)")
        check_labels(owner, labels, h.shape[0], self.num_classes)
        h = h.to(self.critic[-1].weight.dtype)
        return standardize(h) if self.standardize else h

    def _stats(self, h, labels, detach):
        if detach:
            params = {k: p.detach() for k, p in self.critic.named_parameters()}
            scores = torch.func.functional_call(self.critic, params, (h,))
        else:
            scores = self.critic(h)  # [B, C]
        B = h.shape[0]
        t_joint = scores.gather(1, labels.view(-1, 1)).mean().reshape(1)
        logp = torch.log((torch.bincount(labels, minlength=self.num_classes).to(h.dtype) / B).clamp_min(1e-30))
        clip = self.smile_clip if self.estimator == "smile" else math.inf
        lme = (torch.logsumexp((scores.clamp(-clip, clip) + logp).flatten(), 0) - math.log(B)).reshape(1)
        return t_joint, lme, scores, logp

    def critic_loss(self, h: torch.Tensor, labels: torch.Tensor):
        """A critic update: ``(estimate 0-d, loss 0-d)`` (MINE's moving-average gradient in
        training mode, the Jensen-Shannon loss for ``"smile"``)."""
        h = self._prepare(h, labels, "LabelMINE.critic_loss")
        t_joint, lme, scores, logp = self._stats(h, labels, detach=False)
        est = nwj_bound(t_joint, lme) if self.estimator == "nwj" else t_joint - lme
        if self.estimator == "mine":
            loss = mine_loss(t_joint, lme, self._ema, training=self.training)
        elif self.estimator == "nwj":
            loss = -est
        else:
            joint = scores.gather(1, labels.view(-1, 1))
            js = -F.softplus(-joint).mean() - (F.softplus(scores) * logp.exp()).sum(1).mean()
            loss = -js.reshape(1)
        return est[0], loss[0]

    def _frozen(self, h, labels, *, owner="LabelMINE.forward"):
        h = self._prepare(h, labels, owner)
        t_joint, lme, _, _ = self._stats(h, labels, detach=True)
        est = nwj_bound(t_joint, lme) if self.estimator == "nwj" else t_joint - lme
        return est[0]

    def penalty(self, h: torch.Tensor, labels: torch.Tensor, *, coef: float = 1.0):
        """``(estimate without gradient, coef * estimate)`` through the frozen critic."""
        coef = check_coef("LabelMINE.penalty", coef)
        est = self._frozen(h, labels, owner="LabelMINE.penalty")
        return est.detach(), coef * est

    @torch.no_grad()
    def evaluate(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The bound (nats, 0-d) on held-out data: no training, no moving average."""
        return self._frozen(h, labels, owner="LabelMINE.evaluate")


def _check_data(owner, h, labels, batch_size, val_fraction, max_epochs, patience, lr):
    if not isinstance(h, torch.Tensor):
        h = torch.as_tensor(h)
    if h.dim() == 1:
        h = h.unsqueeze(1)
    if not h.is_floating_point():
        h = h.float()
    check_features(owner, "h", h)
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"{owner}: argument 'h' contains NaN or infinite values")
    labels = torch.as_tensor(labels)
    check_labels(owner, labels, h.shape[0])
    check_positive_int(owner, "batch_size", batch_size, 2)
    check_positive_int(owner, "max_epochs", max_epochs)
    check_positive_int(owner, "patience", patience)
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"{owner}: argument 'val_fraction' must be in (0, 1), got {val_fraction!r}")
    if not float(lr) > 0:
        raise ValueError(f"{owner}: argument 'lr' must be > 0, got {lr!r}")
    n_val = int(round(h.shape[0] * val_fraction))
    if n_val < 16 or h.shape[0] - n_val < 16:
        raise ValueError(f"{owner}: needs at least 16 training and 16 validation samples; got {h.shape[0]} "
                         f"samples with val_fraction={val_fraction}")
    return h.detach().float(), labels


def _fit_label_critic(mod, h, labels, evaluate, *, batch_size, val_fraction, max_epochs, patience, lr,
                      min_delta, seed, min_steps=20):
    """Train ``mod`` on a training part of ``(h, labels)`` and return the best validation value of
    ``evaluate(mod, h_val, y_val)`` (a tensor), stopping after ``patience`` epochs without a rise
    of more than ``min_delta`` nats in any element."""
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(seed)
        torch.manual_seed(seed)
    else:
        gen.seed()
    N = h.shape[0]
    perm = torch.randperm(N, generator=gen)
    n_val = int(round(N * val_fraction))
    va, tr = perm[:n_val], perm[n_val:]
    # Affine standardization by the training part's statistics: MI is unchanged.
    mean, std = h[tr].mean(0, keepdim=True), h[tr].std(0, keepdim=True).clamp_min(1e-12)
    h = (h - mean) / std
    h_tr, y_tr, h_va, y_va = h[tr], labels[tr], h[va], labels[va]
    opt = critic_adam(mod.parameters(), lr)
    n_tr = h_tr.shape[0]
    bs = min(batch_size, n_tr)
    best, stale = None, 0
    for _ in range(max_epochs):
        done = 0
        while done < min_steps:
            order = torch.randperm(n_tr, generator=gen)
            for s in range(0, n_tr - bs + 1, bs):
                idx = order[s:s + bs]
                _, loss = mod.critic_loss(h_tr[idx], y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
        mod.eval()
        val = evaluate(mod, h_va, y_va).detach().double().reshape(-1)
        mod.train()
        if best is None:
            best = val.clone()
        else:
            improved = bool((val > best + min_delta).any())
            best = torch.maximum(best, val)
            stale = 0 if improved else stale + 1
        if stale >= patience:
            break
    return best


def _prepare(owner, h, labels, estimator, batch_size, val_fraction, max_epochs, patience, lr, seed):
    """Checked ``(h, labels, num_classes)`` for the one-call label estimators; seeds torch's RNG."""
    h, labels = _check_data(owner, h, labels, batch_size, val_fraction, max_epochs, patience, lr)
    check_choice(owner, "estimator", estimator, BOUNDS)
    num_classes = int(labels.max()) + 1
    if num_classes < 2:
        raise ValueError(f"{owner}: argument 'labels' must hold at least two classes")
    if seed is not None:
        torch.manual_seed(seed)
    return h, labels, num_classes


def estimate_label_mi(h, labels, *, hidden: int = 64, layers: int = 2, estimator: str = "mine",
                      batch_size: int = 256, lr: float = 1e-3, max_epochs: int = 100, patience: int = 10,
                      min_delta: float = 1e-3, val_fraction: float = 0.2, seed: int | None = 0) -> float:
    """``I(Y; h)`` in nats: a :class:`LabelMINE` critic trained on a training part of the
    samples, its best bound on the held-out part returned (see
    :mod:`mmim_ext.estimators.fitting` for the protocol).

    Args:
        h: ``[N, m]`` features (``[N]`` is read as one column); labels: ``[N]`` int64.
        hidden, layers, estimator: the critic (:class:`LabelMINE`).
        batch_size, lr, max_epochs, patience, min_delta, val_fraction, seed: training and early
            stopping, as in :func:`mmim_ext.estimate_pairwise_mi`.
    """
    owner = "estimate_label_mi"
    h, labels, num_classes = _prepare(owner, h, labels, estimator, batch_size, val_fraction, max_epochs, patience,
                                      lr, seed)
    mod = LabelMINE(h.shape[1], num_classes, hidden=hidden, layers=layers, estimator=estimator)

    def evaluate(mod, hv, yv):
        return mod.evaluate(hv, yv)

    best = _fit_label_critic(mod, h, labels, evaluate, batch_size=batch_size, val_fraction=val_fraction,
                             max_epochs=max_epochs, patience=patience, lr=lr, min_delta=min_delta, seed=seed)
    return float(best[0])


def estimate_unit_label_mi(h, labels, *, hidden: int = 16, estimator: str = "mine", batch_size: int = 256,
                           lr: float = 5e-3, max_epochs: int = 100, patience: int = 10, min_delta: float = 1e-3,
                           val_fraction: float = 0.2, seed: int | None = 0) -> torch.Tensor:
    """``I(Y; h_i)`` for every unit ``i`` (nats, float32 ``[m]``), with a
    :class:`mmim_ext.UnitLabelMINE` trained as in :func:`estimate_label_mi`; each unit's entry
    is its best bound on the held-out part."""
    owner = "estimate_unit_label_mi"
    h, labels, num_classes = _prepare(owner, h, labels, estimator, batch_size, val_fraction, max_epochs, patience,
                                      lr, seed)
    mod = UnitLabelMINE(h.shape[1], num_classes, hidden=hidden, estimator=estimator)

    def evaluate(mod, hv, yv):
        return mod.evaluate(hv, yv)

    best = _fit_label_critic(mod, h, labels, evaluate, batch_size=batch_size, val_fraction=val_fraction,
                             max_epochs=max_epochs, patience=patience, lr=lr, min_delta=min_delta, seed=seed)
    return best.float()
