"""Variational bounds from critic scores, the critics' moving average and optimizer.

Bounds (``estimator=`` of every estimator module)
    ``"mine"``   Donsker-Varadhan ``E_P[T] - log E_Q[e^T]``; the critic is trained with MINE's
                 bias-corrected gradient, in which the batch ``E_Q[e^T]`` of the denominator is
                 replaced by an exponential moving average (rate ``ema``). The average starts
                 bias-corrected (as Adam's moments): the first step uses the batch value itself
                 instead of decaying from zero.
    ``"nwj"``    Nguyen-Wainwright-Jordan ``E_P[T] - E_Q[e^{T-1}]``.
    ``"smile"``  Song & Ermon's clipped DV ``E_P[T] - log E_Q[clip(e^T, e^-tau, e^tau)]``
                 (``tau = smile_clip``); its critic is trained with the Jensen-Shannon
                 gradient, as in the paper.

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

__all__ = ["BOUNDS", "CriticMLP", "LogEMA", "bound_from_scores", "critic_adam", "log_mean_exp", "mine_loss",
           "nwj_bound", "standardize"]

#: The bounds every estimator offers (``estimator=``).
BOUNDS = ("mine", "nwj", "smile")
STD_EPS = 1e-5


def standardize(h: torch.Tensor) -> torch.Tensor:
    """Per-column batch standardization; ``sqrt(var + eps)`` keeps dead (constant) units finite
    in value and gradient (``std`` itself has an infinite derivative at zero variance)."""
    mean = h.mean(0, keepdim=True)
    var = (h - mean).pow(2).mean(0, keepdim=True)
    return (h - mean) / torch.sqrt(var + STD_EPS)



def critic_adam(params, lr: float) -> torch.optim.Adam:
    """Adam for critic parameters, the fused implementation where PyTorch has it.

    Per-pair critics have large parameters (four ``[P, K]`` tensors, 33.5 MB each at m=1024,
    K=16): the default Adam runs a dozen elementwise passes over each, the fused one a single
    multi-threaded pass (about four times faster for a regularizer's critics at m=1024 on a
    2-core CPU). Both compute the same
    update up to rounding. Falls back to the default where ``fused=True`` is refused (a device
    without the fused kernel).
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)



class LogEMA(nn.Module):
    """Bias-corrected exponential moving average of ``E_Q[e^T]`` kept in log space per element."""

    def __init__(self, size, rate: float):
        """``size``: the number of elements, or a shape (``[C, P]`` for per-class averages)."""
        super().__init__()
        self.rate = float(rate)
        shape = (size,) if isinstance(size, int) else tuple(size)
        self.register_buffer("log_acc", torch.full(shape, -math.inf, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(shape, dtype=torch.float64))

    @torch.no_grad()
    def update(self, lme: torch.Tensor, index=None) -> torch.Tensor:
        """Fold in the batch values ``lme`` (for ``index``, any index of the buffers such as a
        tuple ``(class, pairs)``, or all elements); return the bias-corrected log average for
        those elements."""
        idx = slice(None) if index is None else index
        a = self.rate
        acc = self.log_acc[idx]
        cnt = self.count[idx] + 1
        new = torch.logaddexp(acc + math.log1p(-a), lme.detach().to(acc.dtype) + math.log(a))
        self.log_acc[idx] = new
        self.count[idx] = cnt
        corrected = new - torch.log1p(-torch.pow(1 - a, cnt))
        return corrected.to(lme.dtype)


def mine_loss(t_joint, lme, ema: LogEMA | None, index=None, training=True):
    """Negative DV bound whose gradient uses the EMA denominator (MINE's bias correction)."""
    if ema is None or not training or not lme.requires_grad:
        return -(t_joint - lme)
    log_avg = ema.update(lme, index)
    # value = lme, gradient = grad(E_Q[e^T]) / EMA(E_Q[e^T])
    ratio = torch.exp(lme - log_avg)
    surrogate = lme.detach() + ratio - ratio.detach()
    return -(t_joint - surrogate)


def nwj_bound(t_joint, lme):
    return t_joint - torch.exp(lme - 1.0)


def log_mean_exp(scores: torch.Tensor) -> torch.Tensor:
    """log-mean-exp over the first dimension."""
    return torch.logsumexp(scores, 0) - math.log(scores.shape[0])


def bound_from_scores(estimator: str, joint, marg, *, ema=None, training=True, clip=5.0):
    """(estimate, loss) per element from joint scores ``[N_p, ...]`` and marginal scores ``[N_q, ...]``."""
    t_joint = joint.mean(0)
    if estimator == "mine":
        lme = log_mean_exp(marg)
        return (t_joint - lme), mine_loss(t_joint, lme, ema, training=training)
    if estimator == "nwj":
        est = nwj_bound(t_joint, log_mean_exp(marg))
        return est, -est
    est = t_joint - log_mean_exp(marg.clamp(-clip, clip))
    # Jensen-Shannon gradient (Song & Ermon's training signal for SMILE).
    js = -F.softplus(-joint).mean(0) - F.softplus(marg).mean(0)
    return est, -js


class CriticMLP(nn.Sequential):
    """ReLU MLP ``R^dim_in -> R`` (``layers`` hidden layers of width ``hidden``).

    With ``squares=True`` the first layer sees ``[z, z * z]``: the square of every input
    coordinate next to the coordinate. A ReLU network builds squares only piecewise, from many
    units, yet dependence through a shared scale or variance (scale mixtures such as the
    multivariate t, heteroscedastic noise) lives in quantities like ``|x|^2`` and ``|y|^2``,
    which the first layer then forms exactly as linear combinations.
    """

    def __init__(self, dim_in: int, hidden: int, layers: int, out_bias: float = 0.0, squares: bool = False):
        mods: list[nn.Module] = []
        d = 2 * dim_in if squares else dim_in
        for _ in range(layers):
            mods += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        last = nn.Linear(d, 1)
        with torch.no_grad():
            last.bias.fill_(out_bias)  # 1 for NWJ (bound 0 at T = 1), else 0
        mods.append(last)
        super().__init__(*mods)
        self.squares = bool(squares)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.squares:
            z = torch.cat([z, z * z], -1)
        return super().forward(z)

