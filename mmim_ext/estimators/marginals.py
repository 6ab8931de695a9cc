"""Per-coordinate maps fitted on a training split and applied unchanged to the other splits.

Mutual information is unchanged by any invertible map applied to each coordinate separately, so
the one-call estimators may reshape every marginal before the critics see it. A neural critic
(ReLU units, a log-mean-exp over negatives) copes badly with heavy tails and far-apart modes:
a few extreme samples dominate ``log E_Q[e^T]`` and the critic's linear extrapolation. Mapping
each coordinate to a standard normal marginal removes that difficulty for every distribution
with a continuous marginal.

``"gaussianize"``  ``z = Phi^{-1}(F_train(x))`` with ``F_train`` the training split's empirical
                   CDF at mid-ranks (ties share one value), linearly interpolated between the
                   training values, and continued linearly beyond the smallest and largest
                   training values (slopes from the outermost ranks), so the map is strictly
                   increasing on the whole line: invertible, hence MI-preserving, also for
                   validation and test values outside the training range.
``"standardize"``  ``z = (x - mean_train) / std_train``, an affine map.
"""

from __future__ import annotations

import torch

from mmim_ext._checks import check_choice, check_features

__all__ = ["MARGINALS", "MarginalMap"]

#: The choices of ``marginals=`` of the one-call estimators.
MARGINALS = ("gaussianize", "standardize")

# Ranks between the outermost training value and the one the tail slope is taken from: a few,
# so that one extreme value does not set the slope alone.
_TAIL_RANKS = 10


class MarginalMap:
    """A per-column increasing map fitted on ``train`` (``[N, d]`` floating point).

    ``MarginalMap(train, kind)(x)`` maps ``x`` ``[M, d]`` (same columns) to float32 ``[M, d]``.
    """

    def __init__(self, train: torch.Tensor, kind: str = "gaussianize"):
        owner = "MarginalMap"
        check_choice(owner, "kind", kind, MARGINALS)
        check_features(owner, "train", train)
        self.kind = kind
        train = train.detach().double()
        self.width = train.shape[1]
        if kind == "standardize":
            self.mean = train.mean(0)
            self.std = train.std(0).clamp_min(1e-12)
            return
        n = train.shape[0]
        self.knots, self.values, self.slopes = [], [], []
        for col in train.t():
            xs, counts = torch.unique(col, sorted=True, return_counts=True)
            cum = counts.cumsum(0).double()
            u = (cum - 0.5 * counts.double()) / n  # mid-rank ECDF, in (0, 1) strictly
            z = torch.special.ndtri(u)
            k = min(_TAIL_RANKS, xs.numel() - 1)
            if k == 0:  # a constant column stays constant
                lo = hi = 0.0
            else:
                lo = float((z[k] - z[0]) / (xs[k] - xs[0]))
                hi = float((z[-1] - z[-1 - k]) / (xs[-1] - xs[-1 - k]))
            self.knots.append(xs)
            self.values.append(z)
            self.slopes.append((lo, hi))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        check_features("MarginalMap", "x", x, self.width)
        x = x.detach().double()
        if self.kind == "standardize":
            return ((x - self.mean) / self.std).float()
        out = torch.empty_like(x)
        for j, (xs, z, (lo, hi)) in enumerate(zip(self.knots, self.values, self.slopes)):
            out[:, j] = _interp(x[:, j].contiguous(), xs, z, lo, hi)
        return out.float()


def _interp(x, xs, z, lo_slope, hi_slope):
    """Piecewise-linear ``z(x)`` through the knots ``(xs, z)``, linear beyond both ends."""
    if xs.numel() == 1:
        return torch.full_like(x, float(z[0]))
    i = torch.searchsorted(xs, x).clamp(1, xs.numel() - 1)
    x0, x1, z0, z1 = xs[i - 1], xs[i], z[i - 1], z[i]
    inner = z0 + (x - x0) * (z1 - z0) / (x1 - x0)
    out = torch.where(x < xs[0], z[0] + (x - xs[0]) * lo_slope, inner)
    return torch.where(x > xs[-1], z[-1] + (x - xs[-1]) * hi_slope, out)

