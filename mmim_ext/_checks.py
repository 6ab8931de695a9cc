"""Argument checks shared by every layer of the package (package-private module).

Each check raises ``TypeError`` or ``ValueError`` whose message names the calling function
(``owner``), the argument and what was expected.
"""

from __future__ import annotations

import torch


def fmt_shape(shape) -> str:
    """``[2, 3]`` for a shape, as the error messages print it."""
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def check_choice(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: argument '{name}' must be one of {choices}, got {value!r}")


def check_positive_int(owner: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: argument '{name}' must be an int >= {minimum}, got {value!r}")
    return value


def check_features(owner: str, name: str, h, width: int | None = None) -> None:
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


def check_labels(owner: str, labels, batch: int, num_classes: int | None = None) -> None:
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

