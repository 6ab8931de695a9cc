"""``I(X; Y)`` between two vectors with a concatenation critic."""

from __future__ import annotations

import torch

from mmim_ext._checks import check_choice, check_features, check_positive_int
from mmim_ext.estimators.base import MIEstimator, check_coef, check_finite
from mmim_ext.estimators.bounds import BOUNDS, CriticMLP, LogEMA, bound_from_scores, standardize
from mmim_ext.estimators.negatives import NEGATIVES, make_perms

__all__ = ["VectorMINE"]


class VectorMINE(MIEstimator):
    """``I(X; Y)`` between two vectors with a concatenation critic ``T(x, y) = MLP([x, y])``.

    Entry points (see :mod:`mmim_ext.estimators.base`): ``critic_loss(x, y)``,
    ``penalty(x, y, *, coef=1.0)``, ``evaluate(x, y)`` and ``forward``, with ``x`` ``[B, dx]`` and
    ``y`` ``[B, dy]`` float (1-D inputs are read as one column); estimates are 0-d tensors in
    nats. Negatives pair ``x`` with permuted ``y`` (derangements), drawn from the module's own
    generator (``seed``; see :mod:`mmim_ext.estimators.base`).

    ``squares=True`` feeds the critic ``[x, y]`` and their squares
    (:class:`~mmim_ext.estimators.bounds.CriticMLP`): it then forms ``|x|^2`` and ``|y|^2`` in its
    first layer, which dependence through a shared scale needs.
    """

    def __init__(self, x_dim: int, y_dim: int, hidden: int = 64, layers: int = 2, estimator: str = "mine",
                 negatives: str = "shuffle", num_negatives: int = 1, ema: float = 0.01,
                 smile_clip: float = 5.0, standardize: bool = True, *, seed: int | None = None,
                 squares: bool = False):
        super().__init__()
        owner = "VectorMINE"
        check_positive_int(owner, "x_dim", x_dim)
        check_positive_int(owner, "y_dim", y_dim)
        check_positive_int(owner, "hidden", hidden)
        check_positive_int(owner, "layers", layers)
        check_positive_int(owner, "num_negatives", num_negatives)
        check_choice(owner, "estimator", estimator, BOUNDS)
        check_choice(owner, "negatives", negatives, NEGATIVES)
        if not 0.0 < float(ema) <= 1.0:
            raise ValueError(f"{owner}: argument 'ema' must be in (0, 1], got {ema!r}")
        self.x_dim, self.y_dim = x_dim, y_dim
        self.estimator = estimator
        self.negatives = negatives
        self.num_negatives = num_negatives
        self.smile_clip = float(smile_clip)
        self.standardize = standardize
        self.critic = CriticMLP(x_dim + y_dim, hidden, layers, 1.0 if estimator == "nwj" else 0.0, squares=squares)
        self._ema = LogEMA(1, ema) if estimator == "mine" else None
        self._init_random(owner, seed)

    def _prepare(self, x, y, owner):
        if isinstance(x, torch.Tensor) and x.dim() == 1:
            x = x.unsqueeze(1)
        if isinstance(y, torch.Tensor) and y.dim() == 1:
            y = y.unsqueeze(1)
        check_features(owner, "x", x, self.x_dim)
        check_features(owner, "y", y, self.y_dim)
        check_finite(owner, "x", x)
        check_finite(owner, "y", y)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{owner}: arguments 'x' and 'y' must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
        dtype = next(self.critic.parameters()).dtype
        x, y = x.to(dtype), y.to(dtype)
        if self.standardize:
            x, y = standardize(x), standardize(y)
        return x, y

    def _scores(self, x, y, perms, critic=None):
        critic = self.critic if critic is None else critic
        B = x.shape[0]
        joint = critic(torch.cat([x, y], 1))
        R = perms.shape[0]
        xm = x.unsqueeze(0).expand(R, B, -1)
        marg = critic(torch.cat([xm, y[perms]], 2)).flatten(0, 1)
        return joint, marg

    def critic_loss(self, x: torch.Tensor, y: torch.Tensor):
        """A critic update: ``(estimate, loss)``, both 0-d (nats)."""
        x, y = self._prepare(x, y, "VectorMINE.critic_loss")
        perms = make_perms(x.shape[0], self.negatives, self.num_negatives, device=x.device, generator=self.generator)
        joint, marg = self._scores(x, y, perms)
        est, loss = bound_from_scores(self.estimator, joint, marg, ema=self._ema,
                                       training=self.training, clip=self.smile_clip)
        return est[0], loss[0]

    def penalty(self, x: torch.Tensor, y: torch.Tensor, *, coef: float = 1.0):
        """``(estimate, coef * estimate)`` through the frozen critic: the estimate (0-d, nats)
        without gradient, the value (0-d) differentiable w.r.t. ``x`` and ``y`` only."""
        coef = check_coef("VectorMINE.penalty", coef)
        est = self._frozen(x, y, owner="VectorMINE.penalty")
        return est.detach(), coef * est

    def _frozen(self, x, y, *, owner="VectorMINE.forward"):
        x, y = self._prepare(x, y, owner)
        perms = make_perms(x.shape[0], self.negatives, self.num_negatives, device=x.device, generator=self.generator)
        params = {k: p.detach() for k, p in self.critic.named_parameters()}
        joint, marg = self._scores(x, y, perms, lambda z: torch.func.functional_call(self.critic, params, (z,)))
        est, _ = bound_from_scores(self.estimator, joint, marg, training=False, clip=self.smile_clip)
        return est[0]

    @torch.no_grad()
    def evaluate(self, x, y, *, num_negatives: int = 64, seed: int | None = 0) -> torch.Tensor:
        """Bound (nats, 0-d tensor) on held-out data with ``num_negatives`` cyclic shifts of ``y``
        (``seed`` seeds them; ``None``: the module's own generator)."""
        check_positive_int("VectorMINE.evaluate", "num_negatives", num_negatives)
        x, y = self._prepare(x, y, "VectorMINE.evaluate")
        gen = self.generator if seed is None else torch.Generator().manual_seed(seed)
        perms = make_perms(x.shape[0], "shift", min(num_negatives, x.shape[0] - 1), generator=gen, device=x.device)
        joint, marg = self._scores(x, y, perms)
        est, _ = bound_from_scores(self.estimator, joint, marg, training=False, clip=self.smile_clip)
        return est[0]
