"""Total correlation ``I(h_1; ...; h_m)`` with one joint critic."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from mmim_ext._checks import check_choice, check_features, check_labels, check_positive_int
from mmim_ext.estimators.base import MIEstimator, check_coef, check_finite
from mmim_ext.estimators.bounds import BOUNDS, CriticMLP, LogEMA, bound_from_scores, standardize
from mmim_ext.estimators.negatives import product_of_marginals

__all__ = ["TotalCorrelationMINE"]


class TotalCorrelationMINE(MIEstimator):
    """Total correlation ``I(h_1; ...; h_m) = KL(p(h) || prod_i p(h_i))`` (nats), or the
    class-conditional ``sum_y p(y) KL(p(h|y) || prod_i p(h_i|y))`` with ``num_classes``.

    One critic (an MLP with ``layers`` hidden layers of width ``hidden``) scores joint samples
    (rows of ``h``) against product-of-marginals samples built by permuting every column of the
    batch independently by random derangements, ``num_negatives`` such draws per call.

    Conditional (``num_classes=C``): the optimal critic ``log p(h|y) / prod_i p(h_i|y)`` depends
    on the label, so the critic sees it: ``T(h, y) = MLP([h, onehot(y)])`` (input ``m + C``),
    and the columns are permuted within each class, each product-of-marginals row keeping the
    label of its class. The bound is then the Donsker-Varadhan bound of
    ``KL(p(h, y) || p(y) prod_i p(h_i | y))``, which is exactly the conditional total
    correlation. A module built without ``num_classes`` but called with labels keeps the earlier
    label-blind critic (negatives within class) for one release, with a ``FutureWarning``.

    Entry points (see :mod:`mmim_ext.estimators.base`): ``critic_loss(h, labels=None)``,
    ``penalty(h, labels=None, *, coef=1.0)``, ``evaluate(h, labels=None)`` and ``forward``, with
    ``h`` ``[B, m]`` float and ``labels`` ``[B]`` int64 (in ``[0, C)``); estimates are 0-d
    tensors in nats. ``seed``: the module's own generator for negatives (see
    :mod:`mmim_ext.estimators.base`).
    """

    def __init__(self, num_units: int, hidden: int = 64, layers: int = 2, estimator: str = "mine",
                 num_negatives: int = 1, ema: float = 0.01, smile_clip: float = 5.0,
                 standardize: bool = True, *, num_classes: int | None = None, seed: int | None = None):
        super().__init__()
        owner = "TotalCorrelationMINE"
        check_positive_int(owner, "num_units", num_units, 2)
        check_positive_int(owner, "hidden", hidden)
        check_positive_int(owner, "layers", layers)
        check_positive_int(owner, "num_negatives", num_negatives)
        check_choice(owner, "estimator", estimator, BOUNDS)
        if num_classes is not None:
            check_positive_int(owner, "num_classes", num_classes, 2)
        if not 0.0 < float(ema) <= 1.0:
            raise ValueError(f"{owner}: argument 'ema' must be in (0, 1], got {ema!r}")
        self.num_units = num_units
        self.num_classes = num_classes
        self.estimator = estimator
        self.num_negatives = num_negatives
        self.smile_clip = float(smile_clip)
        self.standardize = standardize
        extra = 0 if num_classes is None else num_classes
        self.critic = CriticMLP(num_units + extra, hidden, layers, 1.0 if estimator == "nwj" else 0.0)
        self._ema = LogEMA(1, ema) if estimator == "mine" else None
        self._init_random(owner, seed)

    def _prepare(self, h, labels, owner):
        check_features(owner, "h", h, self.num_units)
        check_finite(owner, "h", h)
        if labels is not None:
            check_labels(owner, labels, h.shape[0], self.num_classes)
            if int(labels.min()) < 0:
                raise ValueError(f"{owner}: argument 'labels' must hold class indices >= 0")
            if self.num_classes is None:
                warnings.warn(f"{owner}: labels given to a TotalCorrelationMINE built without num_classes: its "
                              "critic does not see the label (negatives are drawn within each class only). Build "
                              "it with num_classes=C; this fallback will become an error.", FutureWarning,
                              stacklevel=3)
        elif self.num_classes is not None:
            raise ValueError(f"{owner}: argument 'labels' is required: the module was built with "
                             f"num_classes={self.num_classes} (a critic of the class-conditional total correlation)")
        h = h.float() if h.dtype not in (torch.float32, torch.float64) else h
        return standardize(h) if self.standardize else h

    def _scores(self, h, labels, draws, generator=None, detach=False):
        dtype = next(self.critic.parameters()).dtype
        critic = self.critic
        if detach:
            params = {k: p.detach() for k, p in self.critic.named_parameters()}
            critic = lambda z: torch.func.functional_call(self.critic, params, (z,))  # noqa: E731
        generator = self.generator if generator is None else generator
        joint = h.to(dtype)
        marg = product_of_marginals(h, labels, draws, generator).to(dtype)
        if self.num_classes is not None:
            # Each product-of-marginals row is built within one class and keeps its label.
            onehot = F.one_hot(labels, self.num_classes).to(dtype)
            joint = torch.cat([joint, onehot], 1)
            marg = torch.cat([marg, onehot.repeat(draws, 1)], 1)
        return critic(joint), critic(marg)

    def critic_loss(self, h: torch.Tensor, labels: torch.Tensor | None = None):
        """A critic update: ``(estimate, loss)``, both 0-d (nats; MINE's moving-average
        gradient in training mode)."""
        h = self._prepare(h, labels, "TotalCorrelationMINE.critic_loss")
        joint, marg = self._scores(h, labels, self.num_negatives)
        est, loss = bound_from_scores(self.estimator, joint, marg, ema=self._ema,
                                       training=self.training, clip=self.smile_clip)
        return est[0], loss[0]

    def penalty(self, h: torch.Tensor, labels: torch.Tensor | None = None, *, coef: float = 1.0):
        """``(estimate, coef * estimate)`` through the frozen critic: the estimate (0-d, nats)
        without gradient, the value (0-d) differentiable w.r.t. ``h`` only."""
        coef = check_coef("TotalCorrelationMINE.penalty", coef)
        est = self._frozen(h, labels, owner="TotalCorrelationMINE.penalty")
        return est.detach(), coef * est

    def _frozen(self, h, labels=None, *, owner="TotalCorrelationMINE.forward"):
        h = self._prepare(h, labels, owner)
        joint, marg = self._scores(h, labels, self.num_negatives, detach=True)
        est, _ = bound_from_scores(self.estimator, joint, marg, training=False, clip=self.smile_clip)
        return est[0]

    @torch.no_grad()
    def evaluate(self, h: torch.Tensor, labels: torch.Tensor | None = None, *, num_draws: int = 16,
                 seed: int | None = 0) -> torch.Tensor:
        """Bound (nats, 0-d tensor) on held-out data with ``num_draws`` product-of-marginals draws
        (``seed`` seeds them; ``None``: the module's own generator)."""
        check_positive_int("TotalCorrelationMINE.evaluate", "num_draws", num_draws)
        h = self._prepare(h, labels, "TotalCorrelationMINE.evaluate")
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        joint, marg = self._scores(h, labels, num_draws, gen)
        est, _ = bound_from_scores(self.estimator, joint, marg, training=False, clip=self.smile_clip)
        return est[0]
