"""Two probes of the information-plane study that need networks other than the 12-10-7-5-4-3-2 MLP.

* :func:`separability_run` — a wider MLP 12-64-64-64-2 (the narrow net's 3-unit penultimate layer
  is separated by its own head by construction, so a probe there shows nothing): held-out
  accuracy of a linear SVM and of k-nearest neighbours on the top-k principal components of the
  input, the middle hidden layer and the penultimate layer, at initialization and after training.
* :func:`residual_run` — a small residual MLP (12 -> 16, two blocks ``x + F(x)`` with
  ``F = Linear-tanh-Linear``, 16 -> 2): per block over training, the global Lipschitz bound of
  ``F`` (product of spectral norms), the largest Jacobian norm of ``F`` over the inputs, and the
  per-sample ratio ``||F(x)|| / ||x||``.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from mmim_ext.diagnostics import (PROBE_CLASSIFIERS, ResidualBlock, jacobian_norm_max, lipschitz_bound,
                                  residual_ratios, separability_probe, summarize)
from mmim_ext.infoplane import log_schedule

__all__ = ["WIDE_WIDTHS", "PROBE_KS", "separability_run", "residual_net", "residual_run"]

WIDE_WIDTHS = (12, 64, 64, 64, 2)
PROBE_KS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def _train(model, x, y, train_idx, epochs, seed, on_epoch=None, lr=1e-3, batch_size=256):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    xtr, ytr = x[train_idx], y[train_idx]
    for epoch in range(1, epochs + 1):
        order = torch.randperm(xtr.shape[0], generator=gen)
        for start in range(0, xtr.shape[0], batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch)


def separability_run(x, y, train_idx, test_idx, seed: int, epochs: int) -> dict:
    """Held-out separability of the input, middle and penultimate layer of the wide MLP (tanh).

    Returns ``{"widths", "epochs", "layers": {...}, "stages": {"start"|"end": {layer: {classifier:
    [per-k dicts of separability_probe]}}}, "test_accuracy"}``.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    mods = []
    for i in range(len(WIDE_WIDTHS) - 1):
        lin = nn.Linear(WIDE_WIDTHS[i], WIDE_WIDTHS[i + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / WIDE_WIDTHS[i] ** 0.5)
            lin.bias.zero_()
        mods.append(lin)
        if i < len(WIDE_WIDTHS) - 2:
            mods.append(nn.Tanh())
    model = nn.Sequential(*mods)
    n_hidden = len(WIDE_WIDTHS) - 2
    probe_layers = {"input": None, "middle": model[2 * ((n_hidden - 1) // 2) + 1], "penultimate": model[-2]}

    def stage():
        store = {}
        hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: store.__setitem__(n, o.detach()))
                 for n, m in probe_layers.items() if m is not None]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        store["input"] = x
        out = {}
        for name in probe_layers:
            t = store[name]
            ks = [k for k in PROBE_KS if k <= t.shape[1]]
            out[name] = {clf: separability_probe(t[train_idx], y[train_idx], ks, test_features=t[test_idx],
                                                 test_y=y[test_idx], classifier=clf, seed=seed)
                         for clf in PROBE_CLASSIFIERS}
        return out

    start = stage()
    t0 = time.perf_counter()
    _train(model, x, y, train_idx, epochs, seed)
    end = stage()
    with torch.no_grad():
        acc = float((model(x[test_idx]).argmax(1) == y[test_idx]).double().mean())
    return {"widths": list(WIDE_WIDTHS), "epochs": epochs, "activation": "tanh",
            "layers": {"input": "x (12 bits)", "middle": f"h{(n_hidden + 1) // 2}", "penultimate": f"h{n_hidden}"},
            "stages": {"start": start, "end": end}, "test_accuracy": acc, "wall_s": time.perf_counter() - t0}


def residual_net(seed: int, width: int = 16, n_blocks: int = 2) -> nn.Sequential:
    """12 -> width (tanh), ``n_blocks`` blocks ``x + Linear(tanh(Linear(x)))``, width -> 2."""
    torch.manual_seed(seed)
    blocks = [ResidualBlock(nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)))
              for _ in range(n_blocks)]
    return nn.Sequential(nn.Linear(12, width), nn.Tanh(), *blocks, nn.Linear(width, 2))


def residual_run(x, y, train_idx, test_idx, seed: int, epochs: int, points: int) -> dict:
    """Invertibility diagnostics of the residual blocks over training (module docstring).

    Returns ``{"history": [{"epoch", "block", "lipschitz_bound", "jacobian_max", "ratio":
    summary, "certified"}], "test_accuracy", ...}``; ``certified`` is ``lipschitz_bound < 1``.
    """
    model = residual_net(seed)
    blocks = {str(i): m for i, m in enumerate(model) if isinstance(m, ResidualBlock)}
    schedule = set(log_schedule(epochs, points))
    history = []

    def record(epoch):
        if epoch not in schedule:
            return
        inputs = {}
        hooks = [b.register_forward_hook(lambda _m, i, _o, n=n: inputs.__setitem__(n, i[0].detach()))
                 for n, b in blocks.items()]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        for name, blk in blocks.items():
            lip = lipschitz_bound(blk.branch)
            history.append({"epoch": epoch, "block": name, "lipschitz_bound": lip,
                            "jacobian_max": jacobian_norm_max(blk.branch, inputs[name]),
                            "ratio": summarize(residual_ratios(blk, inputs[name])), "certified": lip < 1.0})

    record(0)
    t0 = time.perf_counter()
    _train(model, x, y, train_idx, epochs, seed, on_epoch=record)
    with torch.no_grad():
        acc = float((model(x[test_idx]).argmax(1) == y[test_idx]).double().mean())
    return {"architecture": "12-16(tanh) + 2 x [x + Linear(16,16) tanh Linear(16,16)] + 16-2", "epochs": epochs,
            "history": history, "test_accuracy": acc, "wall_s": time.perf_counter() - t0}
