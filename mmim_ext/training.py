"""Training helpers for information-regularized classifiers and the two-stage MMIM procedure.

Model contract: a classifier is split into
    ``body``  an ``nn.Module`` mapping a batch of inputs to the penultimate features ``[B, m]``,
    ``head``  an ``nn.Linear(m, num_classes)`` mapping features to logits.
The regularizers act on the body's output; C3 replaces the head by a
:class:`mmim_ext.GaussianLinear`. A model written as one ``nn.Sequential`` splits as
``body = model[:-1]``, ``head = model[-1]``.

Loaders yield ``(inputs, labels)`` with int64 labels ``[B]``.

MMIM (docs/design.md): stage 1 trains body and head on ``CE + reg_weight * C1``
(:func:`train_classifier` with a :class:`mmim_ext.MMIMRegularizer`); stage 2 freezes the body
and trains a Gaussian head on ``E_Q[CE] + beta * KL(Q||P) / n`` (:func:`train_c3`), where
``KL/n`` is the reported C3 bound. :func:`train_mmim` runs both.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmim_ext.layers import GaussianLinear

__all__ = ["accuracy", "evaluate_classifier", "train_c3", "train_classifier", "train_mmim"]


def _check_body_head(owner: str, body, head, head_types=(nn.Linear,)) -> None:
    if not isinstance(body, nn.Module):
        raise TypeError(f"{owner}: argument 'body' must be an nn.Module mapping inputs to features [B, m], got {type(body).__name__}")
    if not isinstance(head, head_types):
        names = " or ".join(t.__name__ for t in head_types)
        raise TypeError(f"{owner}: argument 'head' must be an {names} mapping features to logits, got {type(head).__name__}")


def _check_epochs(owner: str, name: str, epochs) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"{owner}: argument '{name}' must be an int >= 0, got {epochs!r}")


def _check_loader(owner: str, loader) -> None:
    if not hasattr(loader, "__iter__"):
        raise TypeError(f"{owner}: argument 'train_loader' must be an iterable of (inputs, labels) batches, got {type(loader).__name__}")


def _unpack(owner: str, batch, device):
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(f"{owner}: every batch must be a pair (inputs, labels), got {type(batch).__name__}")
    x, y = batch[0], batch[1]
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() != 1:
        raise ValueError(f"{owner}: labels must be a 1-D int64 tensor [B], got "
                         f"{getattr(y, 'dtype', type(y).__name__)} {list(getattr(y, 'shape', []))}")
    return x.to(device), y.to(device)


def _features(owner: str, body, x, m: int):
    feats = body(x)
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[1] != m:
        raise ValueError(f"{owner}: 'body' must return features [B, {m}] (the head's in_features), got "
                         f"{list(getattr(feats, 'shape', [])) if isinstance(feats, torch.Tensor) else type(feats).__name__}")
    return feats


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def train_classifier(body: nn.Module, head: nn.Linear, train_loader, *, epochs: int, regularizer: nn.Module | None = None,
                     reg_weight: float = 1.0, lr: float = 1e-3, device="cpu", progress: bool = True,
                     on_epoch: Callable[[dict], None] | None = None, val_loader=None,
                     patience: int | None = None, restore_best: bool = False) -> list[dict]:
    """Train ``head(body(x))`` with Adam on ``CE + reg_weight * regularizer(features, labels)``.

    Args:
        body, head: the model (see the module docstring); trained in place.
        train_loader: iterable of ``(inputs, labels)``.
        epochs: passes over the loader.
        regularizer: a feature regularizer (e.g. :func:`mmim_ext.make_regularizer`) or ``None``;
            it runs its own critic updates inside its call.
        reg_weight: ``lambda``.
        lr: Adam learning rate of body and head.
        device: where to train (modules are moved there in place).
        progress: tqdm bar over batches.
        on_epoch: called as ``on_epoch(record)`` after every epoch.
        val_loader: optional held-out ``(inputs, labels)`` batches; after every epoch the
            plain cross-entropy (nats, no penalty) and accuracy on them are recorded as
            ``val_loss`` / ``val_acc``. Required by ``patience`` and ``restore_best``.
        patience: early stopping: stop once ``val_loss`` has not reached a new minimum for
            this many epochs (``epochs`` is then only the cap). ``None``: run every epoch.
        restore_best: at the end, load the body and head weights of the epoch with the lowest
            ``val_loss`` (the checkpoint early stopping selects); that record gets ``best=True``.

    Returns:
        One dict per epoch: ``epoch`` (1-based), ``loss`` (mean total loss), ``ce`` (mean
        cross-entropy, nats), ``penalty`` (mean penalty, nats; 0 without regularizer),
        ``terms`` (batch-mean of ``regularizer.terms``), ``train_acc`` (percent, on the fly),
        ``seconds``, and with ``val_loader`` ``val_loss`` (nats), ``val_acc`` (percent) and
        ``best`` (bool). ``len(history)`` is the number of epochs trained.
    """
    owner = "train_classifier"
    _check_body_head(owner, body, head)
    _check_loader(owner, train_loader)
    _check_epochs(owner, "epochs", epochs)
    if regularizer is not None and not callable(regularizer):
        raise TypeError(f"{owner}: argument 'regularizer' must be callable as reg(features, labels) or None")
    if not (isinstance(reg_weight, (int, float)) and math.isfinite(reg_weight)):
        raise ValueError(f"{owner}: argument 'reg_weight' must be a finite number, got {reg_weight!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"{owner}: argument 'lr' must be > 0, got {lr!r}")
    if patience is not None:
        _check_epochs(owner, "patience", patience)
        if patience < 1:
            raise ValueError(f"{owner}: argument 'patience' must be an int >= 1 or None, got {patience!r}")
    if (patience is not None or restore_best) and val_loader is None:
        raise ValueError(f"{owner}: 'patience' and 'restore_best' need a 'val_loader' (early stopping "
                         "watches the validation loss)")
    body.to(device)
    head.to(device)
    if isinstance(regularizer, nn.Module):
        regularizer.to(device)
    params = list(body.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    history = []
    best_loss, best_state, best_idx = math.inf, None, None
    for epoch in range(1, epochs + 1):
        body.train()
        head.train()
        if isinstance(regularizer, nn.Module):
            regularizer.train()
        start = time.perf_counter()
        sums = {"loss": 0.0, "ce": 0.0, "penalty": 0.0}
        term_sums: dict[str, float] = {}
        n_seen, n_correct, n_batches = 0, 0, 0
        bar = _bar(progress, len(train_loader) if hasattr(train_loader, "__len__") else None, f"epoch {epoch}/{epochs}")
        try:
            for batch in train_loader:
                x, y = _unpack(owner, batch, device)
                feats = _features(owner, body, x, head.in_features)
                logits = head(feats)
                ce = F.cross_entropy(logits, y)
                loss = ce
                pen = 0.0
                if regularizer is not None:
                    penalty = regularizer(feats, y)
                    loss = ce + reg_weight * penalty
                    pen = float(penalty.detach())
                    for k, v in getattr(regularizer, "terms", {}).items():
                        term_sums[k] = term_sums.get(k, 0.0) + float(v)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                b = y.shape[0]
                n_seen += b
                n_batches += 1
                n_correct += int((logits.detach().argmax(1) == y).sum())
                sums["loss"] += float(loss.detach()) * b
                sums["ce"] += float(ce.detach()) * b
                sums["penalty"] += pen * b
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(ce=f"{float(ce):.3f}", pen=f"{pen:.3f}")
        finally:
            if bar is not None:
                bar.close()
        if n_seen == 0:
            raise ValueError(f"{owner}: argument 'train_loader' yielded no batches")
        record = {"epoch": epoch, **{k: v / n_seen for k, v in sums.items()},
                  "terms": {k: v / n_batches for k, v in term_sums.items()},
                  "train_acc": 100.0 * n_correct / n_seen, "seconds": time.perf_counter() - start}
        if val_loader is not None:
            record["val_loss"], record["val_acc"] = evaluate_classifier(body, head, val_loader, device=device)
            record["best"] = False
            if record["val_loss"] < best_loss:
                best_loss, best_idx = record["val_loss"], len(history)
                if restore_best:
                    # Copies on the host: the models this serves are small, and a checkpoint
                    # must not alias parameters the optimizer keeps updating.
                    best_state = (copy.deepcopy(body.state_dict()), copy.deepcopy(head.state_dict()))
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        stale = len(history) if best_idx is None else len(history) - 1 - best_idx  # NaN never improves
        if patience is not None and stale >= patience:
            break
    if best_idx is not None:
        history[best_idx]["best"] = True
    if best_state is not None:
        body.load_state_dict(best_state[0])
        head.load_state_dict(best_state[1])
    return history


def train_c3(body: nn.Module, head: nn.Linear, train_loader, *, epochs: int, beta: float = 1.0,
             prior_std: float = 0.1, lr: float = 1e-3, n_train: int | None = None, device="cpu",
             progress: bool = True, prior_head: nn.Linear | None = None, init_std: float | None = None,
             on_epoch: Callable[[dict], None] | None = None):
    """Stage 2 of MMIM: a Gaussian output layer on frozen features, minimizing
    ``E_Q[CE] + beta * KL(Q || P) / n``.

    Args:
        body: frozen (run in eval mode under ``no_grad``; its parameters are not touched).
        head: the trained ``nn.Linear``; it initializes ``Q``'s mean, and also the prior mean
            unless ``prior_head`` is given.
        train_loader, epochs, lr, device, progress, on_epoch: as in :func:`train_classifier`.
        beta: weight of the KL term.
        prior_std: ``lambda`` of the prior ``P = N(mu0, lambda^2 I)``.
        n_train: training-set size ``n`` (default ``len(train_loader.dataset)``).
        prior_head: the head's initialization (before any training) to use as ``mu0``; the
            bound ``I(W; S) <= KL(Q||P)`` needs a prior that does not depend on the data, which
            a trained head does. :func:`train_mmim` passes it.
        init_std: initial posterior standard deviation (see :class:`mmim_ext.GaussianLinear`).

    Returns:
        ``(gaussian_head, history)``; each record has ``epoch``, ``loss``, ``ce`` (sampled
        weights), ``kl`` (nats, end of epoch), ``c3_bound`` (= ``kl / n``, nats), ``train_acc``
        (mean weights, percent), ``seconds``.
    """
    owner = "train_c3"
    _check_body_head(owner, body, head)
    _check_loader(owner, train_loader)
    _check_epochs(owner, "epochs", epochs)
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"{owner}: argument 'beta' must be a finite number >= 0, got {beta!r}")
    if n_train is None:
        try:
            n_train = len(train_loader.dataset)
        except (AttributeError, TypeError) as exc:
            raise ValueError(f"{owner}: pass 'n_train' (the training-set size); the loader has no sized .dataset") from exc
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise ValueError(f"{owner}: argument 'n_train' must be an int >= 1, got {n_train!r}")
    body.to(device)
    was_training = body.training
    body.eval()
    gl = GaussianLinear(head.in_features, head.out_features, prior_std=prior_std,
                        init_from=head, prior_from=prior_head, init_std=init_std).to(device)
    opt = torch.optim.Adam(gl.parameters(), lr=lr)
    history = []
    try:
        for epoch in range(1, epochs + 1):
            gl.train()
            start = time.perf_counter()
            n_seen, n_correct = 0, 0
            sums = {"loss": 0.0, "ce": 0.0}
            bar = _bar(progress, len(train_loader) if hasattr(train_loader, "__len__") else None, f"C3 epoch {epoch}/{epochs}")
            try:
                for batch in train_loader:
                    x, y = _unpack(owner, batch, device)
                    with torch.no_grad():
                        feats = _features(owner, body, x, head.in_features)
                    ce = F.cross_entropy(gl(feats), y)
                    loss = ce + beta * gl.kl() / n_train
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        gl.eval()
                        n_correct += int((gl(feats).argmax(1) == y).sum())
                        gl.train()
                    b = y.shape[0]
                    n_seen += b
                    sums["loss"] += float(loss.detach()) * b
                    sums["ce"] += float(ce.detach()) * b
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(ce=f"{float(ce):.3f}")
            finally:
                if bar is not None:
                    bar.close()
            if n_seen == 0:
                raise ValueError(f"{owner}: argument 'train_loader' yielded no batches")
            kl = float(gl.kl().detach())
            record = {"epoch": epoch, **{k: v / n_seen for k, v in sums.items()}, "kl": kl,
                      "c3_bound": kl / n_train, "train_acc": 100.0 * n_correct / n_seen,
                      "seconds": time.perf_counter() - start}
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
    finally:
        body.train(was_training)
    gl.eval()
    return gl, history


def train_mmim(body: nn.Module, head: nn.Linear, train_loader, *, stage1_epochs: int, stage2_epochs: int,
               regularizer: nn.Module | None, reg_weight: float = 1.0, lr: float = 1e-3, c3_lr: float | None = None,
               beta: float = 1.0, prior_std: float = 0.1, n_train: int | None = None, device="cpu",
               progress: bool = True, on_epoch: Callable[[dict], None] | None = None):
    """The two-stage MMIM procedure.

    Stage 1: :func:`train_classifier` with ``regularizer`` (C1, or an ablation, or ``None`` for
    a baseline). Stage 2: :func:`train_c3` on the frozen body, with the head's weights before
    stage 1 as the prior mean.

    Returns:
        ``(gaussian_head, history)``: ``history`` holds the stage-1 records then the stage-2
        records, each with ``"stage": 1`` or ``2``. Evaluate with ``accuracy(body, gaussian_head, loader)``.
    """
    owner = "train_mmim"
    _check_body_head(owner, body, head)
    _check_epochs(owner, "stage1_epochs", stage1_epochs)
    _check_epochs(owner, "stage2_epochs", stage2_epochs)
    prior_head = copy.deepcopy(head)

    def tag(stage):
        def cb(rec):
            rec["stage"] = stage
            if on_epoch is not None:
                on_epoch(rec)
        return cb

    h1 = train_classifier(body, head, train_loader, epochs=stage1_epochs, regularizer=regularizer,
                          reg_weight=reg_weight, lr=lr, device=device, progress=progress, on_epoch=tag(1))
    gl, h2 = train_c3(body, head, train_loader, epochs=stage2_epochs, beta=beta, prior_std=prior_std,
                      lr=lr if c3_lr is None else c3_lr, n_train=n_train, device=device, progress=progress,
                      prior_head=prior_head.to(device), on_epoch=tag(2))
    return gl, h1 + h2


@torch.no_grad()
def _evaluate(owner: str, body: nn.Module, head: nn.Module, loader, device) -> tuple[float, float]:
    _check_body_head(owner, body, head, (nn.Linear, GaussianLinear))
    modes = (body.training, head.training)
    body.to(device).eval()
    head.to(device).eval()
    loss, correct, seen = 0.0, 0, 0
    try:
        for batch in loader:
            x, y = _unpack(owner, batch, device)
            logits = head(_features(owner, body, x, head.in_features))
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            seen += y.shape[0]
    finally:
        body.train(modes[0])
        head.train(modes[1])
    if seen == 0:
        raise ValueError(f"{owner}: argument 'loader' yielded no batches")
    return loss / seen, 100.0 * correct / seen


def evaluate_classifier(body: nn.Module, head: nn.Module, loader, device="cpu") -> tuple[float, float]:
    """``(mean cross-entropy in nats, top-1 accuracy in percent)`` of ``head(body(x))`` over
    ``loader`` in eval mode (train/eval modes restored afterwards)."""
    return _evaluate("evaluate_classifier", body, head, loader, device)


def accuracy(body: nn.Module, head: nn.Module, loader, device="cpu") -> float:
    """Top-1 accuracy of ``head(body(x))`` over ``loader`` in percent (eval mode; a
    :class:`GaussianLinear` head uses its mean weights)."""
    return _evaluate("accuracy", body, head, loader, device)[1]
