"""One-call mutual-information estimates for data sets (nats).

Each function splits the samples into a training and a validation part, trains the critic(s)
of an estimator from this package on minibatches of the training part, evaluates
the bound on the whole validation part after every epoch (with many negative samples, so the
log-mean-exp term is accurate), stops early when the validation bound has not improved for
``patience`` epochs, and returns the best validation bound. The result is a held-out lower-bound
estimate: a critic fitted to noise in the training part does not inflate it.
"""

from __future__ import annotations

from typing import Callable

import torch

from mmim_ext._checks import check_choice, check_features, check_labels, check_positive_int
from mmim_ext.estimators.bounds import BOUNDS, critic_adam
from mmim_ext.estimators.negatives import NEGATIVES
from mmim_ext.estimators.pairwise import PairwiseMINE
from mmim_ext.estimators.total_correlation import TotalCorrelationMINE
from mmim_ext.estimators.vector import VectorMINE

__all__ = ["estimate_mi", "estimate_pairwise_mi", "estimate_total_correlation"]


def _as_2d(name: str, owner: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t)
        except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
            raise TypeError(f"{owner}: argument '{name}' must be a tensor or array, got {type(t).__name__}") from exc
    if t.dim() == 1:
        t = t.unsqueeze(1)
    if not t.is_floating_point():
        t = t.float()
    check_features(owner, name, t)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{owner}: argument '{name}' contains NaN or infinite values")
    return t.detach().float()


def _check_fit_args(owner: str, n: int, batch_size, val_fraction, max_epochs, patience, lr) -> None:
    check_positive_int(owner, "batch_size", batch_size, 2)
    check_positive_int(owner, "max_epochs", max_epochs)
    check_positive_int(owner, "patience", patience)
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"{owner}: argument 'val_fraction' must be in (0, 1), got {val_fraction!r}")
    if not float(lr) > 0:
        raise ValueError(f"{owner}: argument 'lr' must be > 0, got {lr!r}")
    n_val = int(round(n * val_fraction))
    if n_val < 16 or n - n_val < 16:
        raise ValueError(f"{owner}: needs at least 16 training and 16 validation samples; got {n} samples "
                         f"with val_fraction={val_fraction}")


def _split(n: int, val_fraction: float, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def _standardize_with(train: torch.Tensor, *others: torch.Tensor):
    """Standardize by the training part's statistics (a pure affine map: MI unchanged)."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True).clamp_min(1e-12)
    return tuple((t - mean) / std for t in (train, *others))


def _fit(step: Callable[[torch.Tensor], None], evaluate: Callable[[], torch.Tensor], n_train: int,
         batch_size: int, max_epochs: int, patience: int, min_delta: float, gen: torch.Generator,
         progress: bool, desc: str, min_steps: int = 20) -> torch.Tensor:
    """Minibatch epochs with early stopping; returns the best validation value per element."""
    bs = min(batch_size, n_train)
    best = None
    stale = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_epochs, desc=desc, leave=False)
    try:
        for _ in range(max_epochs):
            # An "epoch" is at least one pass and at least ``min_steps`` steps, so small data
            # sets still give the critic enough updates between two evaluations.
            done = 0
            while done < min_steps:
                order = torch.randperm(n_train, generator=gen)
                for s in range(0, n_train - bs + 1, bs):  # drop the ragged tail: DV is biased on tiny batches
                    step(order[s:s + bs])
                    done += 1
            val = evaluate().detach().double().reshape(-1)
            if best is None:
                best, stale = val.clone(), 0
            else:
                improved = bool((val > best + min_delta).any())
                best = torch.maximum(best, val)
                stale = 0 if improved else stale + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(best=f"{float(best.mean()):.4f}", stale=stale)
            if stale >= patience:
                break
    finally:
        if bar is not None:
            bar.close()
    return best


def _train_critics(mod, train_inputs, evaluate: Callable[[], torch.Tensor], lr: float, batch_size: int,
                   max_epochs: int, patience: int, min_delta: float, gen: torch.Generator, progress: bool,
                   desc: str) -> torch.Tensor:
    """Adam on ``mod``'s own training loss over minibatches of ``train_inputs`` (tensors indexed
    by sample, or ``None`` passed through), with :func:`_fit`'s early stopping on ``evaluate``."""
    opt = critic_adam(mod.parameters(), lr)

    def step(idx):
        _, loss = mod(*(None if t is None else t[idx] for t in train_inputs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _fit(step, evaluate, train_inputs[0].shape[0], batch_size, max_epochs, patience, min_delta, gen,
                progress, desc)


def _seeded_generator(seed):
    """The generator of the split and the minibatches; a seed also seeds torch's global RNG (the
    critics' initialization and random negatives)."""
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(seed)
        torch.manual_seed(seed)
    else:
        gen.seed()
    return gen


def _prepare_units(owner: str, h, labels, estimator, batch_size, val_fraction, max_epochs, patience, lr,
                   seed):
    """Checks for the estimators over the units of one matrix ``h`` [N, m], seeding, and the
    standardized train/validation split: (h_tr, h_va, y_tr, y_va, generator)."""
    h = _as_2d("h", owner, h)
    N, m = h.shape
    if m < 2:
        raise ValueError(f"{owner}: argument 'h' needs at least 2 columns (units), got shape {list(h.shape)}")
    if labels is not None:
        labels = torch.as_tensor(labels)
        check_labels(owner, labels, N)
    check_choice(owner, "estimator", estimator, BOUNDS)
    _check_fit_args(owner, N, batch_size, val_fraction, max_epochs, patience, lr)
    gen = _seeded_generator(seed)
    tr, va = _split(N, val_fraction, gen)
    h_tr, h_va = _standardize_with(h[tr], h[va])
    y_tr = None if labels is None else labels[tr]
    y_va = None if labels is None else labels[va]
    return h_tr, h_va, y_tr, y_va, gen


def estimate_pairwise_mi(h, labels=None, *, pairs=None, hidden: int = 16, estimator: str = "mine",
                         negatives: str = "shuffle", num_negatives: int = 8, per_pair: bool = True,
                         batch_size: int = 500, lr: float = 5e-3, max_epochs: int = 300,
                         patience: int = 15, min_delta: float = 1e-3, val_fraction: float = 0.2,
                         val_negatives: int = 256, seed: int | None = 0, progress: bool = False,
                         backend: str = "auto", return_module: bool = False, process_group=None):
    """Pairwise mutual information ``I(h_i; h_j)`` (or ``I(h_i; h_j | Y)`` with ``labels``) in nats.

    Args:
        h: ``[N, m]`` samples (tensor or array; 1-D is not accepted: ``m >= 2``).
        labels: optional ``[N]`` int64 classes; negatives are then drawn within each class.
        pairs: optional ``[P, 2]`` int64 subset of pairs (others stay 0 in the result).
        hidden, estimator, negatives, num_negatives, per_pair, backend: see
            :class:`mmim_ext.PairwiseMINE` (training-time negatives).
        batch_size, lr, max_epochs, patience, min_delta: critic training (Adam) and early
            stopping (stop after ``patience`` epochs in which no pair's validation bound rose
            by more than ``min_delta`` nats).
        val_fraction: share of the samples held out for validation.
        val_negatives: cyclic shifts per validation sample for the log-mean-exp term.
        seed: seed of the split, the minibatches and the critic initialization (``None``: no seeding).
        progress: show a tqdm bar over epochs.
        return_module: also return the trained :class:`PairwiseMINE`.
        process_group: a ``torch.distributed`` group that shares the work by pairs: every rank
            passes the same ``h`` (and ``labels``, and an int ``seed``) and trains the critics of
            its block of pairs (see :class:`PairwiseMINE`); every rank returns the whole matrix.

    Returns:
        ``[m, m]`` float32 tensor, symmetric, zero diagonal: the best validation bound per pair
        (or ``(matrix, module)`` with ``return_module=True``).
    """
    owner = "estimate_pairwise_mi"
    check_choice(owner, "negatives", negatives, NEGATIVES)
    check_positive_int(owner, "val_negatives", val_negatives)
    if process_group is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"{owner}: argument 'seed' must be an int when 'process_group' is given (every rank "
                         f"draws the same split and minibatches from it), got {seed!r}")
    h_tr, h_va, y_tr, y_va, gen = _prepare_units(owner, h, labels, estimator, batch_size, val_fraction,
                                                 max_epochs, patience, lr, seed)
    m = h_tr.shape[1]
    shard_kw = {} if process_group is None else {"process_group": process_group, "gather_batch": False}
    mod = PairwiseMINE(m, hidden=hidden, per_pair=per_pair, pairs=pairs, estimator=estimator,
                       negatives=negatives, num_negatives=num_negatives, backend=backend, **shard_kw)

    def evaluate():
        return mod.evaluate(h_va, y_va, negatives="shift", num_negatives=val_negatives)

    best = _train_critics(mod, (h_tr, y_tr), evaluate, lr, batch_size, max_epochs, patience, min_delta, gen,
                          progress, owner)
    if mod.shard is not None:  # evaluate() gave every pair's bound; the module records its own block
        best = best[mod.shard.lo:mod.shard.hi]
    mod.last.copy_(best.to(mod.last.dtype))
    out = mod.matrix().float()
    return (out, mod) if return_module else out


def estimate_total_correlation(h, labels=None, *, hidden: int = 64, layers: int = 2, estimator: str = "mine",
                               num_negatives: int = 4, batch_size: int = 500, lr: float = 1e-3,
                               max_epochs: int = 300, patience: int = 15, min_delta: float = 1e-3,
                               val_fraction: float = 0.2, val_draws: int = 16, seed: int | None = 0,
                               progress: bool = False, return_module: bool = False):
    """Total correlation ``I(h_1; ...; h_m)`` (or given ``labels``) in nats.

    Args:
        h: ``[N, m]`` samples, ``m >= 2``.
        labels: optional ``[N]`` int64; gives the class-conditional total correlation.
        hidden, layers, estimator, num_negatives: see :class:`mmim_ext.TotalCorrelationMINE`.
        batch_size, lr, max_epochs, patience, min_delta, val_fraction, seed, progress: as in
            :func:`estimate_pairwise_mi`.
        val_draws: product-of-marginals draws of the validation set for the log-mean-exp term.

    Returns:
        float, the best validation bound (or ``(value, module)`` with ``return_module=True``).
    """
    owner = "estimate_total_correlation"
    check_positive_int(owner, "val_draws", val_draws)
    h_tr, h_va, y_tr, y_va, gen = _prepare_units(owner, h, labels, estimator, batch_size, val_fraction,
                                                 max_epochs, patience, lr, seed)
    m = h_tr.shape[1]
    mod = TotalCorrelationMINE(m, hidden=hidden, layers=layers, estimator=estimator, num_negatives=num_negatives)

    def evaluate():
        return torch.tensor(mod.evaluate(h_va, y_va, num_draws=val_draws))

    best = float(_train_critics(mod, (h_tr, y_tr), evaluate, lr, batch_size, max_epochs, patience, min_delta,
                                gen, progress, owner)[0])
    return (best, mod) if return_module else best


def estimate_mi(x, y, *, hidden: int = 64, layers: int = 2, estimator: str = "mine", negatives: str = "shuffle",
                num_negatives: int = 4, batch_size: int = 500, lr: float = 1e-3, max_epochs: int = 300,
                patience: int = 15, min_delta: float = 1e-3, val_fraction: float = 0.2,
                val_negatives: int = 64, seed: int | None = 0, progress: bool = False,
                return_module: bool = False):
    """Mutual information ``I(X; Y)`` between two vectors in nats.

    Args:
        x: ``[N, dx]`` (or ``[N]``) samples; y: ``[N, dy]`` (or ``[N]``) samples.
        hidden, layers, estimator, negatives, num_negatives: see :class:`mmim_ext.VectorMINE`.
        batch_size, lr, max_epochs, patience, min_delta, val_fraction, seed, progress: as in
            :func:`estimate_pairwise_mi`.
        val_negatives: cyclic shifts of ``y`` per validation sample.

    Returns:
        float, the best validation bound (or ``(value, module)`` with ``return_module=True``).
    """
    owner = "estimate_mi"
    x = _as_2d("x", owner, x)
    y = _as_2d("y", owner, y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{owner}: arguments 'x' and 'y' must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    check_choice(owner, "estimator", estimator, BOUNDS)
    check_choice(owner, "negatives", negatives, NEGATIVES)
    N = x.shape[0]
    _check_fit_args(owner, N, batch_size, val_fraction, max_epochs, patience, lr)
    check_positive_int(owner, "val_negatives", val_negatives)
    gen = _seeded_generator(seed)
    tr, va = _split(N, val_fraction, gen)
    x_tr, x_va = _standardize_with(x[tr], x[va])
    y_tr, y_va = _standardize_with(y[tr], y[va])
    mod = VectorMINE(x.shape[1], y.shape[1], hidden=hidden, layers=layers, estimator=estimator,
                     negatives=negatives, num_negatives=num_negatives)

    def evaluate():
        return torch.tensor(mod.evaluate(x_va, y_va, num_negatives=val_negatives))

    best = float(_train_critics(mod, (x_tr, y_tr), evaluate, lr, batch_size, max_epochs, patience, min_delta,
                                gen, progress, owner)[0])
    return (best, mod) if return_module else best

