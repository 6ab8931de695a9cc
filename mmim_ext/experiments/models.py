"""Model bodies for the Table 1 protocol, returned as ``(body, head)`` pairs.

``body`` maps an input batch ``[B, 1, *spatial]`` (float32) to penultimate features ``[B, m]``
(after a ReLU; these are the units ``h_1..h_m`` the MMIM terms are measured on) and ``head`` is a
plain ``nn.Linear(m, num_classes)`` producing logits. Keeping the two apart is the contract the
regularizers and training helpers rely on: the penalty sees ``body(x)``, the classifier
loss sees ``head(body(x))``, and MMIM's second stage swaps ``head`` for a Gaussian layer.

Architectures (sized for 2 CPU cores; ``width`` is ``m``, 128 by default):

* ``mlp``: flatten -> Linear(d, 256) -> ReLU -> Linear(256, m) -> ReLU
* ``cnn``: two conv blocks (32 and 64 channels, 3x3 in 2-D, 5 and 3 taps in 1-D, ReLU, max-pool
  where the input is large enough) -> flatten -> Linear(., m) -> ReLU. 8x8 digits pool once
  (-> 4x4), 28x28 images twice (-> 7x7), 40-sample signals twice (-> 10).
"""

from __future__ import annotations

import math

from torch import nn

__all__ = ["ARCHS", "build_model"]

ARCHS = ("mlp", "cnn")


def _mlp(input_shape, width, hidden):
    d = math.prod(input_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, width), nn.ReLU())


def _cnn(input_shape, width):
    if len(input_shape) == 3:
        c, h, w = input_shape
        # Pool only while the map stays >= 4 wide: 8x8 pools once, 28x28 twice.
        pool2 = min(h, w) >= 16
        layers = [nn.Conv2d(c, 32, 3, padding=1), nn.ReLU()]
        if pool2:
            layers.append(nn.MaxPool2d(2))
        layers += [nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        hh, ww = (h // 2, w // 2) if pool2 else (h, w)
        flat = 64 * (hh // 2) * (ww // 2)
    elif len(input_shape) == 2:
        c, n = input_shape
        pool2 = n >= 16
        layers = [nn.Conv1d(c, 32, 5, padding=2), nn.ReLU()]
        if pool2:
            layers.append(nn.MaxPool1d(2))
        layers += [nn.Conv1d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2)]
        nn_ = n // 2 if pool2 else n
        flat = 64 * (nn_ // 2)
    else:
        raise ValueError(f"cnn: input shape must be [C, L] or [C, H, W], got {list(input_shape)}")
    if flat < 1:
        raise ValueError(f"cnn: input {list(input_shape)} is too small for two conv blocks")
    layers += [nn.Flatten(), nn.Linear(flat, width), nn.ReLU()]
    return nn.Sequential(*layers)


def build_model(arch: str, input_shape, num_classes: int, *, width: int = 128,
                hidden: int = 256) -> tuple[nn.Module, nn.Linear]:
    """Build ``(body, head)`` for ``arch`` in {"mlp", "cnn"}.

    Args:
        arch: "mlp" or "cnn".
        input_shape: one input's shape without the batch axis, ``(C, L)`` or ``(C, H, W)``.
        num_classes: number of output logits.
        width: penultimate width ``m`` (units the regularizers act on).
        hidden: width of the MLP's first hidden layer.

    Returns:
        ``body``: ``[B, *input_shape]`` -> ``[B, width]``; ``head``: ``nn.Linear(width, num_classes)``.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if width < 2:
        raise ValueError(f"build_model: argument 'width' must be >= 2, got {width}")
    if num_classes < 2:
        raise ValueError(f"build_model: argument 'num_classes' must be >= 2, got {num_classes}")
    if arch == "mlp":
        body = _mlp(input_shape, width, hidden)
    elif arch == "cnn":
        body = _cnn(input_shape, width)
    else:
        raise ValueError(f"build_model: argument 'arch' must be one of {', '.join(ARCHS)}, got {arch!r}")
    return body, nn.Linear(width, num_classes)
