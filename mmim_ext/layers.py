"""Layers the package's methods are built around.

* :class:`GaussianLinear` — the Gaussian output layer of MMIM's second stage (C3): weights
  ``N(mu, diag sigma^2)`` sampled by reparameterization, ``kl()`` against the prior
  ``N(mu_0, lambda^2 I)``.
* :class:`ResidualBlock` — ``y = shortcut(x) + F(x)``, the block whose ``||F(x)|| / ||x||`` the
  diagnostics follow.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmim_ext._checks import check_positive_int

__all__ = ["GaussianLinear", "ResidualBlock"]


def _inv_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class GaussianLinear(nn.Module):
    """Linear layer with Gaussian weights ``Q = N(mu, diag sigma^2)`` and a fixed Gaussian prior
    ``P = N(mu0, prior_std^2 I)`` (weights and bias alike).

    ``mu`` is stored in ``weight`` ``[out, in]`` and ``bias`` ``[out]`` (so code that reads
    ``layer.weight`` sees the mean), ``sigma = softplus(weight_rho)`` / ``softplus(bias_rho)``.

    Args:
        in_features, out_features: sizes.
        prior_std: ``lambda``, standard deviation of the prior.
        init_from: an ``nn.Linear`` whose weights initialize ``mu`` AND the prior mean ``mu0``
            ("the layer's initialization", docs/design.md). Without it both come from
            ``nn.Linear``'s default initialization.
        prior_from: optional ``nn.Linear`` that sets ``mu0`` instead (e.g. the head's weights
            before stage-1 training, which keeps the prior independent of the data while
            ``mu`` starts from the trained head).
        init_std: initial ``sigma`` (default ``prior_std / 10``).

    In training mode ``forward`` samples with the local reparameterization trick (the output
    ``x W^T + b`` is Gaussian with mean ``x mu^T + mu_b`` and variance ``x^2 sigma^2 + sigma_b^2``,
    sampled per example): an unbiased, lower-variance estimate of ``E_Q[loss]`` per example.
    In eval mode it uses the mean.
    """

    def __init__(self, in_features: int, out_features: int, *, prior_std: float = 0.1,
                 init_from: nn.Linear | None = None, prior_from: nn.Linear | None = None,
                 init_std: float | None = None):
        super().__init__()
        owner = "GaussianLinear"
        check_positive_int(owner, "in_features", in_features)
        check_positive_int(owner, "out_features", out_features)
        if not (isinstance(prior_std, (int, float)) and math.isfinite(prior_std) and prior_std > 0):
            raise ValueError(f"{owner}: argument 'prior_std' must be a finite number > 0, got {prior_std!r}")
        init_std = prior_std / 10 if init_std is None else init_std
        if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std > 0):
            raise ValueError(f"{owner}: argument 'init_std' must be a finite number > 0, got {init_std!r}")
        for name, lin in (("init_from", init_from), ("prior_from", prior_from)):
            if lin is None:
                continue
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"{owner}: argument '{name}' must be an nn.Linear or None, got {type(lin).__name__}")
            if lin.in_features != in_features or lin.out_features != out_features:
                raise ValueError(f"{owner}: argument '{name}' is Linear({lin.in_features}, {lin.out_features}), "
                                 f"expected Linear({in_features}, {out_features})")
        self.in_features, self.out_features = in_features, out_features
        self.prior_std = float(prior_std)
        src = init_from if init_from is not None else nn.Linear(in_features, out_features)
        w0 = src.weight.detach().clone()
        b0 = src.bias.detach().clone() if src.bias is not None else torch.zeros(out_features, dtype=w0.dtype)
        self.weight = nn.Parameter(w0.clone())
        self.bias = nn.Parameter(b0.clone())
        rho = _inv_softplus(float(init_std))
        self.weight_rho = nn.Parameter(torch.full_like(w0, rho))
        self.bias_rho = nn.Parameter(torch.full_like(b0, rho))
        if prior_from is not None:
            w0 = prior_from.weight.detach().clone()
            b0 = prior_from.bias.detach().clone() if prior_from.bias is not None else torch.zeros_like(b0)
        self.register_buffer("prior_weight", w0.to(self.weight.device))
        self.register_buffer("prior_bias", b0.to(self.weight.device))

    @property
    def weight_std(self) -> torch.Tensor:
        return nn.functional.softplus(self.weight_rho)

    @property
    def bias_std(self) -> torch.Tensor:
        return nn.functional.softplus(self.bias_rho)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.shape[-1] != self.in_features:
            raise ValueError(f"GaussianLinear: argument 'x' must have last dimension {self.in_features}, "
                             f"got {list(getattr(x, 'shape', []))}")
        mean = nn.functional.linear(x, self.weight, self.bias)
        if not self.training:
            return mean
        var = nn.functional.linear(x * x, self.weight_std.pow(2), self.bias_std.pow(2))
        return mean + torch.sqrt(var.clamp_min(1e-30)) * torch.randn_like(mean)

    def sample_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One draw ``(W [out, in], b [out])`` from ``Q``."""
        w = self.weight + self.weight_std * torch.randn_like(self.weight)
        b = self.bias + self.bias_std * torch.randn_like(self.bias)
        return w, b

    def kl(self) -> torch.Tensor:
        """``KL(Q || P)`` in nats (scalar tensor, differentiable)."""
        lam2 = self.prior_std ** 2
        total = self.weight.new_zeros(())
        for mu, rho, mu0 in ((self.weight, self.weight_rho, self.prior_weight),
                             (self.bias, self.bias_rho, self.prior_bias)):
            sigma = nn.functional.softplus(rho)
            total = total + (math.log(self.prior_std) - torch.log(sigma.clamp_min(1e-30))
                             + (sigma.pow(2) + (mu - mu0).pow(2)) / (2 * lam2) - 0.5).sum()
        return total

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prior_std={self.prior_std}"


class ResidualBlock(nn.Module):
    """``y = shortcut(x) + branch(x)`` (``shortcut=None``: identity).

    :class:`ResidualRatioMonitor` finds these blocks and records ``||branch(x)|| / ||shortcut(x)||``
    per sample; with the identity shortcut that is ``||F(x)|| / ||x||``, which stays below 1
    when the block is invertible in the sense of Zhao & Sun.
    """

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut

    def forward(self, x):
        f = self.branch(x)  # the branch runs first: the monitor's shortcut hook relies on this order
        s = x if self.shortcut is None else self.shortcut(x)
        return s + f
