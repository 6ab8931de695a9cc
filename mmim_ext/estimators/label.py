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

from mmim_ext._checks import check_positive_int
from mmim_ext.estimators.base import check_coef
from mmim_ext.estimators.bounds import LogEMA, mine_loss, nwj_bound
from mmim_ext.estimators.fitting import boot_generator, prepare_units, train_select, with_extras
from mmim_ext.estimators.intervals import bootstrap_label_bound
from mmim_ext.estimators.unit_label import LabelEstimator, UnitLabelMINE

__all__ = ["LabelMINE", "estimate_label_mi", "estimate_unit_label_mi"]


class LabelMINE(LabelEstimator):
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
        check_positive_int(owner, "layers", layers, 0)
        self._init_label(owner, num_units, num_classes, hidden, estimator, ema, smile_clip, standardize)
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

    @torch.no_grad()
    def _class_scores(self, h, labels):
        """Scores ``[B, 1, C]`` for every class (no gradient), for
        :func:`mmim_ext.estimators.intervals.bootstrap_label_bound`."""
        h = self._prepare(h, labels, "LabelMINE.evaluate")
        return self._stats(h, labels, detach=True)[2].unsqueeze(1)


def _fit_label(owner, make, h, labels, kw):
    """The held-out protocol of :mod:`mmim_ext.estimators.fitting` for a label module built by
    ``make(num_units, num_classes)``: ``(test bounds [E] float64, (low, high) or (), module)``."""
    if labels is None:
        raise ValueError(f"{owner}: argument 'labels' is required")
    (h_tr, h_va, h_te), (y_tr, y_va, y_te), gen = prepare_units(owner, h, labels, kw, min_units=1)
    num_classes = int(torch.as_tensor(labels).max()) + 1
    if num_classes < 2:
        raise ValueError(f"{owner}: argument 'labels' must hold at least two classes")
    # The critics see the training split's per-coordinate map (marginals=), not batch statistics:
    # a fixed function of h, so the test bound and its bootstrap use the same critic.
    mod = make(h_tr.shape[1], num_classes)
    size = mod.num_units if isinstance(mod, UnitLabelMINE) else 1

    def validate():
        return mod.evaluate(h_va, y_va)

    # A unit's critic is independent of the others': stopping point per unit (parameters are
    # stacked along dim 0); the one critic of LabelMINE as a whole.
    train_select(mod, (h_tr, y_tr), validate, size, gen, kw, owner)
    if not kw["return_ci"]:
        return mod.evaluate(h_te, y_te).double().reshape(-1), (), mod
    est, low, high = bootstrap_label_bound(mod.estimator, mod._class_scores(h_te, y_te), y_te,
                                           num_bootstrap=kw["num_bootstrap"], ci=kw["ci"],
                                           smile_clip=mod.smile_clip, generator=boot_generator(kw["seed"]))
    return est, (low, high), mod


def estimate_label_mi(h, labels, *, hidden: int = 64, layers: int = 2, estimator: str = "mine",
                      marginals: str = "gaussianize", batch_size: int = 256, lr: float = 1e-3, max_epochs: int = 100,
                      patience: int = 10, lr_decays: int = 2, min_delta: float = 1e-3, val_fraction: float = 0.2,
                      test_fraction: float = 0.2, return_ci: bool = False, ci: float = 0.95,
                      num_bootstrap: int = 200, seed: int | None = 0, progress: bool = False,
                      return_module: bool = False):
    """``I(Y; h)`` in nats, held out from every choice: a :class:`LabelMINE` critic trained on a
    training split, its stopping point chosen on a validation split, its bound reported on a test
    split (the protocol of :mod:`mmim_ext.estimators.fitting`).

    Args:
        h: ``[N, m]`` features (``[N]`` is read as one column); labels: ``[N]`` int64 in
            ``[0, C)``, ``C >= 2``.
        hidden, layers, estimator: the critic (:class:`LabelMINE`).
        marginals, batch_size, lr, max_epochs, patience, lr_decays, min_delta, val_fraction,
            test_fraction, return_ci, ci, num_bootstrap, seed, progress: as in
            :func:`mmim_ext.estimate_pairwise_mi`; the interval resamples the test samples, and
            the label marginal with them (:func:`~mmim_ext.estimators.intervals.bootstrap_label_bound`).

    Returns:
        float, the test bound; ``(estimate, low, high)`` with ``return_ci``; ``return_module``
        appends the trained :class:`LabelMINE`.
    """
    kw = dict(locals())
    est, ci_parts, mod = _fit_label(
        "estimate_label_mi",
        lambda m, c: LabelMINE(m, c, hidden=hidden, layers=layers, estimator=estimator, standardize=False),
        h, labels, kw)
    return with_extras(float(est[0]), tuple(float(v[0]) for v in ci_parts), mod, kw)


def estimate_unit_label_mi(h, labels, *, hidden: int = 16, estimator: str = "mine", marginals: str = "gaussianize",
                           batch_size: int = 256, lr: float = 5e-3, max_epochs: int = 100, patience: int = 10,
                           lr_decays: int = 2, min_delta: float = 1e-3, val_fraction: float = 0.2,
                           test_fraction: float = 0.2, return_ci: bool = False, ci: float = 0.95,
                           num_bootstrap: int = 200, seed: int | None = 0, progress: bool = False,
                           return_module: bool = False):
    """``I(Y; h_i)`` for every unit ``i`` in nats, with a :class:`mmim_ext.UnitLabelMINE` fitted
    as in :func:`estimate_label_mi`; each unit's stopping point is chosen on the validation split
    by its own bound, and every unit is reported on the test split.

    Returns:
        float32 ``[m]`` test bounds; ``(estimate, low, high)``, three such tensors, with
        ``return_ci``; ``return_module`` appends the module.
    """
    kw = dict(locals())
    est, ci_parts, mod = _fit_label(
        "estimate_unit_label_mi",
        lambda m, c: UnitLabelMINE(m, c, hidden=hidden, estimator=estimator, standardize=False),
        h, labels, kw)
    return with_extras(est.float(), tuple(v.float() for v in ci_parts), mod, kw)
