"""Information-plane coordinates by kernel density bounds (Kolchinsky & Tracey; Saxe et al.).

Model the layer as ``T = h(X) + noise`` with Gaussian noise of variance ``noise_var`` per unit, so
``T`` is a mixture of ``N`` Gaussians centred at the activations ``t_n``. With
``D_nl = ||t_n - t_l||^2`` the pairwise-distance bounds on the mixture entropy give::

    I(X;T) <= -(1/N) sum_n log( (1/N) sum_l exp(-D_nl / (2 sigma^2)) )     (KL upper bound)
    I(X;T) >= -(1/N) sum_n log( (1/N) sum_l exp(-D_nl / (8 sigma^2)) )     (Bhattacharyya lower)

(the Gaussian normalizing constants cancel against ``H(T|X)``). ``I(T;Y) = H(T) - sum_y p(y)
H(T|Y=y)`` uses the same estimator on the whole set and within each class, as in Saxe et al.'s
code; those two values are estimates built from the bounds, not bounds on ``I(T;Y)`` themselves.

Each term is a row-wise log-sum-exp over all pairs: :func:`mmim_ext.kde_lse`, fused
(memory ``O(N d)``) when the extension is built.
"""

from __future__ import annotations

import math

import torch

from mmim_ext.ops import kde_lse

__all__ = ["kde_mi", "kde_entropy_term"]

_LN2 = math.log(2.0)


def kde_entropy_term(t: torch.Tensor, scale: float, *, backend: str = "auto") -> torch.Tensor:
    """``-(1/N) sum_n log((1/N) sum_l exp(-scale D_nl))`` in nats, a 0-d tensor in ``t``'s dtype.

    ``t`` is ``[N, d]``; ``scale = 1/(2 sigma^2)`` gives the upper, ``1/(8 sigma^2)`` the lower
    pairwise-distance bound (up to constants that cancel in mutual information).
    """
    n = t.shape[0]
    lse = kde_lse(t, t, scale, backend=backend)
    return math.log(n) - lse.mean()


def kde_mi(t: torch.Tensor, y: torch.Tensor, noise_var: float, *, backend: str = "auto",
           bounds: tuple[str, ...] = ("upper", "lower")) -> dict:
    """KDE upper and lower estimates of ``I(X;T)`` and ``I(T;Y)`` for one layer, in bits.

    Args:
        t: ``[N, ...]`` activations (flattened per sample), float32 or float64 (other floating
            dtypes are computed in float32).
        y: ``[N]`` integer class labels (or ``[N, C]`` one-hot / scores, reduced by argmax).
        noise_var: ``sigma^2 > 0``, variance of the added Gaussian noise, in squared activation
            units. Smaller values push ``I(X;T)`` towards ``log2 N``.
        backend: passed to :func:`mmim_ext.kde_lse`.
        bounds: which of ``"upper"`` and ``"lower"`` to compute (each costs the same).

    Returns:
        dict with float values ``i_xt_upper``, ``i_xt_lower``, ``i_ty_upper``, ``i_ty_lower``
        (bits), for the requested bounds.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"kde_mi: argument 't' must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(noise_var, bool) or not isinstance(noise_var, (int, float)):
        raise TypeError(f"kde_mi: argument 'noise_var' must be a float, got {type(noise_var).__name__}")
    if not (math.isfinite(noise_var) and noise_var > 0):
        raise ValueError(f"kde_mi: argument 'noise_var' must be finite and > 0, got {noise_var}")
    scales = {"upper": 1.0 / (2.0 * noise_var), "lower": 1.0 / (8.0 * noise_var)}
    if isinstance(bounds, str) or not bounds or any(b not in scales for b in bounds):
        raise ValueError(f"kde_mi: argument 'bounds' must be a non-empty tuple of 'upper' and/or 'lower', got {bounds!r}")
    if t.dim() < 1 or t.shape[0] < 1:
        raise ValueError(f"kde_mi: argument 't' needs at least one sample, got shape {list(t.shape)}")
    t = t.detach().reshape(t.shape[0], -1)
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"kde_mi: argument 'y' must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() == 2 and y.shape[1] > 1:
        y = y.argmax(dim=1)
    y = y.reshape(-1).to(t.device)
    if y.shape[0] != t.shape[0]:
        raise ValueError(f"kde_mi: argument 'y' must have one label per row of 't' ({t.shape[0]}), got {y.shape[0]}")
    classes, counts = torch.unique(y, return_counts=True)
    n = t.shape[0]
    out = {}
    with torch.no_grad():
        for name in dict.fromkeys(bounds):
            scale = scales[name]
            h_t = float(kde_entropy_term(t, scale, backend=backend))
            h_t_given_y = 0.0
            for cls, cnt in zip(classes.tolist(), counts.tolist()):
                h_t_given_y += cnt / n * float(kde_entropy_term(t[y == cls], scale, backend=backend))
            out[f"i_xt_{name}"] = h_t / _LN2
            out[f"i_ty_{name}"] = (h_t - h_t_given_y) / _LN2
    return out
