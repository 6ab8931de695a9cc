"""Information-plane coordinates by binning (Shwartz-Ziv & Tishby).

Every activation is clipped to ``[lo, hi]`` and mapped to one of ``n_bins`` equal bins, or to a
bin of fixed width ``bin_width`` (Saxe et al.'s scheme); the row of bin indices of a sample is
its *pattern*. For a deterministic network evaluated on distinct
inputs ``X`` the pattern is a function of ``X``, so ``I(X;T) = H(T)``, and
``I(T;Y) = H(T) - sum_y p(y) H(T | Y=y) = H(T) + H(Y) - H(T, Y)``. All entropies are plug-in
(empirical frequencies) and in bits.

Patterns are identified on the tensor's device with ``torch.unique(dim=0)`` on the integer bin
matrix, so nothing is turned into Python tuples and GPU tensors stay on the GPU.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["BinnedMI", "bin_indices", "binned_mi", "pattern_ids"]

_LN2 = 0.6931471805599453


class BinnedMI(NamedTuple):
    """Result of :func:`binned_mi` with ``return_num_patterns=True``."""

    i_xt: float  #: I(X;T) = H(T) in bits
    i_ty: float  #: I(T;Y) in bits
    n_patterns: int  #: number of distinct bin patterns of T


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"binned_mi: argument 't' must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 1:
        return t.unsqueeze(1)
    if t.dim() < 1:
        raise ValueError("binned_mi: argument 't' must have a sample axis, got a 0-d tensor")
    return t.reshape(t.shape[0], -1)


def bin_indices(t: torch.Tensor, n_bins: int | None = 30, lo: float = -1.0, hi: float | None = 1.0, *,
                bin_width: float | None = None) -> torch.Tensor:
    """Bin index of every activation, ``[N, units]`` int64 (non-negative).

    Two schemes (docs/infoplane.md):

    * ``n_bins`` equal bins over ``[lo, hi]`` (``bin_width=None``): ``t`` ``[N, ...]`` (flattened
      per sample) is clipped to ``[lo, hi]`` and mapped to
      ``min(floor((v - lo) / (hi - lo) * n_bins), n_bins - 1)``.
    * Fixed-width bins (``bin_width=w``, ``n_bins`` ignored): ``floor((v - lo) / w)`` after
      clipping to ``[lo, hi]``; the last bin is ``ceil((hi - lo) / w) - 1`` (it may be narrower
      than ``w``). ``hi=None`` leaves the range open above, so every value keeps its own bin of
      width ``w`` however large it grows: with ``lo = 0`` these are the bins of Saxe et al.'s code
      for ReLU layers (``floor(v / 0.07)``).

    Computed in float64 (float32 on devices without float64) so that bin edges do not move with
    the input dtype.
    """
    t = _as_2d(t)
    if bin_width is None:
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"binned_mi: argument 'n_bins' must be a positive int, got {n_bins!r}")
        if hi is None:
            raise ValueError("binned_mi: argument 'hi' may be None only with 'bin_width' (an open range "
                             "cannot be split into n_bins equal bins)")
    else:
        if isinstance(bin_width, bool) or not isinstance(bin_width, (int, float)) or not (
                math.isfinite(bin_width) and bin_width > 0):
            raise ValueError(f"binned_mi: argument 'bin_width' must be a finite number > 0, got {bin_width!r}")
    if hi is not None and not (float(hi) > float(lo)):
        raise ValueError(f"binned_mi: arguments 'lo' and 'hi' must satisfy lo < hi, got lo={lo}, hi={hi}")
    if not t.dtype.is_floating_point:
        t = t.to(torch.float32)
    wide = torch.float32 if t.device.type == "mps" else torch.float64
    v = t.detach().to(wide)
    if bool(torch.isnan(v).any()):
        raise ValueError("binned_mi: argument 't' contains NaN values")
    v = v.clamp(float(lo), None if hi is None else float(hi))
    if bin_width is None:
        idx = torch.floor((v - float(lo)) / (float(hi) - float(lo)) * n_bins)
        return idx.clamp_max(n_bins - 1).to(torch.int64)
    idx = torch.floor((v - float(lo)) / float(bin_width))
    if hi is not None:
        idx = idx.clamp_max(math.ceil((float(hi) - float(lo)) / float(bin_width)) - 1)
    return idx.to(torch.int64)


def pattern_ids(bins: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Dense pattern id of every row of an integer matrix ``[N, units]``: ``([N] int64, n_patterns)``."""
    if bins.shape[1] == 0:
        return torch.zeros(bins.shape[0], dtype=torch.int64, device=bins.device), 1 if bins.shape[0] else 0
    _, inverse = torch.unique(bins, dim=0, return_inverse=True)
    n = int(inverse.max()) + 1 if inverse.numel() else 0
    return inverse, n


def _entropy_bits(ids: torch.Tensor) -> torch.Tensor:
    """Plug-in entropy (bits) of the empirical distribution of integer ids ``[N]`` (float64)."""
    counts = torch.bincount(ids).to(torch.float64)
    counts = counts[counts > 0]
    p = counts / counts.sum()
    return -(p * p.log()).sum() / _LN2


def _labels(y: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"binned_mi: argument 'y' must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() == 2 and y.shape[1] > 1:  # one-hot or scores -> class index
        y = y.argmax(dim=1)
    y = y.reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"binned_mi: argument 'y' must have one label per row of 't' ({n}), got {y.shape[0]}")
    if y.dtype.is_floating_point:
        if not bool((y == y.round()).all()):
            raise ValueError("binned_mi: argument 'y' must hold integer class labels")
    _, inverse = torch.unique(y, return_inverse=True)
    return inverse


def binned_mi(
    t: torch.Tensor,
    y: torch.Tensor,
    n_bins: int | None = 30,
    lo: float = -1.0,
    hi: float | None = 1.0,
    *,
    bin_width: float | None = None,
    return_num_patterns: bool = False,
):
    """Binned information-plane coordinates of one layer, in bits.

    Args:
        t: ``[N, ...]`` activations of one layer for ``N`` distinct inputs (flattened per sample),
            any floating dtype and device.
        y: ``[N]`` integer class labels (or ``[N, C]`` one-hot / scores, reduced by argmax).
        n_bins: number of equal bins over ``[lo, hi]`` (ignored with ``bin_width``).
        lo, hi: bin range; values outside are clipped into the first / last bin. With
            ``bin_width``, ``hi=None`` leaves the range open above (:func:`bin_indices`).
        bin_width: fixed bin width (same units as ``t``) instead of ``n_bins`` equal bins.
        return_num_patterns: also return the number of distinct patterns.

    Returns:
        ``(i_xt, i_ty)`` as Python floats in bits, where ``i_xt = H(T)`` and
        ``i_ty = H(T) - sum_y p(y) H(T|Y=y)``; with ``return_num_patterns=True`` a
        :class:`BinnedMI` ``(i_xt, i_ty, n_patterns)``.
    """
    bins = bin_indices(t, n_bins, lo, hi, bin_width=bin_width)
    N = bins.shape[0]
    if N == 0:
        raise ValueError("binned_mi: argument 't' has no samples")
    yi = _labels(y, N).to(bins.device)
    ids, n_pat = pattern_ids(bins)
    h_t = _entropy_bits(ids)
    h_y = _entropy_bits(yi)
    n_cls = int(yi.max()) + 1
    h_ty = _entropy_bits(ids * n_cls + yi)
    i_xt = float(h_t)
    # Clamp the round-off of H(T) + H(Y) - H(T,Y) at the mathematically valid range [0, H(T)].
    i_ty = min(max(float(h_t + h_y - h_ty), 0.0), i_xt)
    if return_num_patterns:
        return BinnedMI(i_xt, i_ty, n_pat)
    return i_xt, i_ty
