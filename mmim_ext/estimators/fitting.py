"""One-call mutual-information estimates for data sets (nats), held out from every choice.

Each function splits the samples three ways:

* **training** (``1 - val_fraction - test_fraction``): the critic(s) of an estimator from this
  package are fitted on minibatches of it;
* **validation** (``val_fraction``): the bound is evaluated on it after every epoch (with many
  negatives); it chooses the stopping point -- per pair for :func:`estimate_pairwise_mi`, whose
  critics are independent -- and when to lower the learning rate;
* **test** (``test_fraction``): the critic at the chosen stopping point is evaluated once on it.

The returned value is the test bound. The validation bound at the chosen epoch is a maximum over
noisy values, optimistic by construction; the test samples played no part in any choice, so
the test bound of the chosen critic is an unbiased estimate of that critic's bound, which is a
lower bound on the mutual information (on independent data its mean is at most ~0).

Before any critic sees them, the coordinates are mapped by a per-coordinate increasing map
fitted on the training split (``marginals=``, :mod:`mmim_ext.estimators.marginals`); MI is
unchanged by such maps, and Gaussian marginals spare the critics heavy tails and far modes.

``return_ci=True`` adds a percentile bootstrap interval over the test samples and their
negatives (:mod:`mmim_ext.estimators.intervals`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from mmim_ext._checks import check_choice, check_features, check_labels, check_positive_int
from mmim_ext.estimators.bounds import BOUNDS, critic_adam
from mmim_ext.estimators.intervals import bootstrap_bound, pair_scores
from mmim_ext.estimators.marginals import MARGINALS, MarginalMap
from mmim_ext.estimators.negatives import NEGATIVES, make_perms
from mmim_ext.estimators.pairwise import PairwiseMINE
from mmim_ext.estimators.total_correlation import TotalCorrelationMINE
from mmim_ext.estimators.vector import VectorMINE

__all__ = ["estimate_mi", "estimate_pairwise_mi", "estimate_total_correlation"]
# prepare_units, train_select, boot_generator and with_extras are also the protocol of the label
# estimators (mmim_ext.estimators.label); they are not part of the package's public API.

# Learning-rate factor when the validation bound stalls, before training resumes from the best
# critic: a smaller step refines a critic that the noise of minibatch Adam keeps from settling.
_LR_DECAY = 0.25


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


def _check_fit_args(owner: str, n: int, kw: dict) -> None:
    check_positive_int(owner, "batch_size", kw["batch_size"], 2)
    check_positive_int(owner, "max_epochs", kw["max_epochs"])
    check_positive_int(owner, "patience", kw["patience"])
    check_positive_int(owner, "lr_decays", kw["lr_decays"], 0)
    check_positive_int(owner, "num_bootstrap", kw["num_bootstrap"], 10)
    check_choice(owner, "marginals", kw["marginals"], MARGINALS)
    vf, tf = kw["val_fraction"], kw["test_fraction"]
    if not 0.0 < float(vf) < 1.0:
        raise ValueError(f"{owner}: argument 'val_fraction' must be in (0, 1), got {vf!r}")
    if not 0.0 < float(tf) < 1.0 or float(vf) + float(tf) >= 1.0:
        raise ValueError(f"{owner}: argument 'test_fraction' must be in (0, 1) with val_fraction + test_fraction "
                         f"< 1, got test_fraction={tf!r}, val_fraction={vf!r}")
    if not 0.0 < float(kw["ci"]) < 1.0:
        raise ValueError(f"{owner}: argument 'ci' must be in (0, 1), got {kw['ci']!r}")
    if not float(kw["lr"]) > 0:
        raise ValueError(f"{owner}: argument 'lr' must be > 0, got {kw['lr']!r}")
    n_val, n_test = round(n * vf), round(n * tf)
    if min(n_val, n_test, n - n_val - n_test) < 16:
        raise ValueError(f"{owner}: needs at least 16 training, 16 validation and 16 test samples; got {n} "
                         f"samples with val_fraction={vf}, test_fraction={tf}")


def _split(n: int, val_fraction: float, test_fraction: float, gen: torch.Generator):
    """Disjoint (train, validation, test) index sets of a random permutation."""
    perm = torch.randperm(n, generator=gen)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return perm[n_val + n_test:], perm[:n_val], perm[n_val:n_val + n_test]


def _map_splits(kind: str, x: torch.Tensor, splits):
    """The per-coordinate map fitted on the training split, applied to every split."""
    tr = x[splits[0]]
    f = MarginalMap(tr, kind)
    return tuple(f(x[s]) for s in splits)


class _BestCritic:
    """The critic parameters at the best validation value seen: per element where every
    parameter is stacked per element along ``dim`` (independent per-pair critics), else as a
    whole, chosen by the mean over elements."""

    def __init__(self, mod: torch.nn.Module, size: int, dim: int = 0):
        self.params = list(mod.parameters())
        self.dim = dim
        self.rowwise = size > 1 and all(p.dim() > dim and p.shape[dim] == size for p in self.params)
        self.saved = [p.detach().clone() for p in self.params]
        self.value = torch.full((size,), -math.inf, dtype=torch.float64)

    @torch.no_grad()
    def update(self, val: torch.Tensor, min_delta: float) -> bool:
        """Record ``val`` ``[size]``; return whether some element rose by more than ``min_delta``."""
        if self.rowwise:
            rows = (val > self.value).nonzero().squeeze(1)
            for p, s in zip(self.params, self.saved):
                s.index_copy_(self.dim, rows, p.detach().index_select(self.dim, rows))
            gain = bool((val > self.value + min_delta).any())
            self.value = torch.maximum(self.value, val)
            return gain
        gain = float(val.mean()) > float(self.value.mean()) + min_delta
        if float(val.mean()) > float(self.value.mean()):
            for p, s in zip(self.params, self.saved):
                s.copy_(p.detach())
            self.value = val.clone()
        return gain

    @torch.no_grad()
    def restore(self) -> None:
        for p, s in zip(self.params, self.saved):
            p.copy_(s)


def train_select(mod, train_inputs, evaluate: Callable[[], torch.Tensor], size: int, gen: torch.Generator,
                 kw: dict, desc: str, min_steps: int = 20, element_dim: int = 0,
                 agree: Callable[[bool], bool] | None = None) -> torch.Tensor:
    """Adam on ``mod``'s own loss over minibatches of ``train_inputs`` (tensors indexed by
    sample, or ``None``); after every epoch ``evaluate()`` ``[size]`` on the validation split.

    When no element has gained ``min_delta`` for ``patience`` epochs, training resumes from the
    best critic with the learning rate times ``_LR_DECAY`` (``lr_decays`` times), then stops.
    Leaves ``mod`` at its best validation critic; returns the best validation values.
    """
    n_train = train_inputs[0].shape[0]
    bs = min(kw["batch_size"], n_train)
    best = _BestCritic(mod, size, element_dim)
    lr, decays_left, stale = float(kw["lr"]), kw["lr_decays"], 0
    opt = critic_adam(mod.parameters(), lr)
    bar = None
    if kw["progress"]:
        from tqdm.auto import tqdm

        bar = tqdm(total=kw["max_epochs"], desc=desc, leave=False)
    try:
        for _ in range(kw["max_epochs"]):
            # An "epoch" is at least one pass and at least ``min_steps`` steps, so small data
            # sets still give the critic enough updates between two evaluations.
            done = 0
            while done < min_steps:
                order = torch.randperm(n_train, generator=gen)
                for s in range(0, n_train - bs + 1, bs):  # drop the ragged tail: DV is biased on tiny batches
                    idx = order[s:s + bs]
                    _, loss = mod.critic_loss(*(None if t is None else t[idx] for t in train_inputs))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    done += 1
            val = evaluate().detach().double().reshape(-1).cpu()
            gained = best.update(val, kw["min_delta"])
            if agree is not None:  # sharded: every rank must stop (and decay) at the same epoch
                gained = agree(gained)
            stale = 0 if gained else stale + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(best=f"{float(best.value.mean()):.4f}", stale=stale, lr=f"{lr:.1e}")
            if stale >= kw["patience"]:
                if decays_left == 0:
                    break
                best.restore()
                decays_left -= 1
                lr *= _LR_DECAY
                opt = critic_adam(mod.parameters(), lr)
                stale = 0
    finally:
        if bar is not None:
            bar.close()
    best.restore()
    return best.value


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


def prepare_units(owner: str, h, labels, kw: dict, min_units: int = 2):
    """Checks for the estimators over the units of one matrix ``h`` [N, m] (``m >= min_units``),
    seeding, the split and the marginal map: ((h_tr, h_va, h_te), (y_tr, y_va, y_te), generator)."""
    h = _as_2d("h", owner, h)
    N, m = h.shape
    if m < min_units:
        raise ValueError(f"{owner}: argument 'h' needs at least {min_units} columns (units), got shape {list(h.shape)}")
    if labels is not None:
        labels = torch.as_tensor(labels)
        check_labels(owner, labels, N)
    check_choice(owner, "estimator", kw["estimator"], BOUNDS)
    _check_fit_args(owner, N, kw)
    gen = _seeded_generator(kw["seed"])
    splits = _split(N, kw["val_fraction"], kw["test_fraction"], gen)
    hs = _map_splits(kw["marginals"], h, splits)
    ys = (None,) * 3 if labels is None else tuple(labels[s] for s in splits)
    return hs, ys, gen


def boot_generator(seed):
    """The bootstrap's generator: its own stream, derived from the call's ``seed``."""
    return torch.Generator().manual_seed(0 if seed is None else seed + 1)


def with_extras(result, ci_parts, mod, kw):
    """What a one-call estimator returns: ``result``, then ``ci_parts`` (low, high) with
    ``return_ci``, then the module with ``return_module``."""
    out = (result, *ci_parts) if kw["return_ci"] else result
    if kw["return_module"]:
        return (*out, mod) if kw["return_ci"] else (out, mod)
    return out


def estimate_pairwise_mi(h, labels=None, *, pairs=None, hidden: int = 48, estimator: str = "mine",
                         negatives: str = "shuffle", num_negatives: int = 8, per_pair: bool = True,
                         marginals: str = "gaussianize", batch_size: int = 500, lr: float = 5e-3,
                         max_epochs: int = 300, patience: int = 10, lr_decays: int = 2, min_delta: float = 1e-3,
                         val_fraction: float = 0.2, test_fraction: float = 0.2, val_negatives: int = 256,
                         return_ci: bool = False, ci: float = 0.95, num_bootstrap: int = 200,
                         seed: int | None = 0, progress: bool = False, backend: str = "auto",
                         return_module: bool = False, process_group=None):
    """Pairwise mutual information ``I(h_i; h_j)`` (or ``I(h_i; h_j | Y)`` with ``labels``) in nats.

    Args:
        h: ``[N, m]`` samples (tensor or array; ``m >= 2``).
        labels: optional ``[N]`` int64 classes; negatives are then drawn within each class.
        pairs: optional ``[P, 2]`` int64 subset of pairs (others stay 0 in the result).
        hidden, estimator, negatives, num_negatives, per_pair, backend: see
            :class:`mmim_ext.PairwiseMINE` (training-time negatives).
        marginals: ``"gaussianize"`` or ``"standardize"``, the per-unit map fitted on the
            training split (:mod:`mmim_ext.estimators.marginals`).
        batch_size, lr, max_epochs, patience, lr_decays, min_delta: critic training (Adam);
            when no pair's validation bound has risen by more than ``min_delta`` nats for
            ``patience`` epochs, training resumes from the best critics with the learning rate
            divided by 4, ``lr_decays`` times, then stops.
        val_fraction, test_fraction: shares of the samples for validation (stopping point per
            pair) and for the reported test bound; the rest trains.
        val_negatives: cyclic shifts per validation or test sample for the log-mean-exp term.
        return_ci, ci, num_bootstrap: also return the ``ci`` percentile bootstrap interval over
            the test samples and their negatives (``num_bootstrap`` replicates).
        seed: seed of the split, the minibatches, the critic initialization and the bootstrap
            (``None``: no seeding).
        progress: show a tqdm bar over epochs.
        return_module: also return the trained :class:`PairwiseMINE`.
        process_group: a ``torch.distributed`` group that shares the work by pairs: every rank
            passes the same ``h`` (and ``labels``, and an int ``seed``), trains the critics of its
            block of pairs (see :class:`PairwiseMINE`) and stops when no rank's block improves;
            every rank returns the whole matrices.

    Returns:
        ``[m, m]`` float32 tensor, symmetric, zero diagonal: the test bound per pair; with
        ``return_ci`` ``(estimate, low, high)``, three such matrices; ``return_module`` appends
        the module.
    """
    owner = "estimate_pairwise_mi"
    kw = dict(locals())
    if process_group is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"{owner}: argument 'seed' must be an int when 'process_group' is given (every rank "
                         f"draws the same split, minibatches and negatives from it), got {seed!r}")
    check_choice(owner, "negatives", negatives, NEGATIVES)
    check_positive_int(owner, "val_negatives", val_negatives)
    (h_tr, h_va, h_te), (y_tr, y_va, y_te), gen = prepare_units(owner, h, labels, kw)
    m = h_tr.shape[1]
    # Label-aware critics for the conditional MI: its optimal critic depends on the class.
    cond = {} if labels is None else {"num_classes": max(2, int(torch.as_tensor(labels).max()) + 1)}
    # With a group every rank passes the same data and trains the critics of its block of pairs.
    shard_kw = {} if process_group is None else {"process_group": process_group, "gather_batch": False}
    mod = PairwiseMINE(m, hidden=hidden, per_pair=per_pair, pairs=pairs, estimator=estimator,
                       negatives=negatives, num_negatives=num_negatives, standardize=False, backend=backend,
                       **cond, **shard_kw)
    shard = mod.shard

    def evaluate(x, y):
        return mod.evaluate(x, y, negatives="shift", num_negatives=val_negatives)

    # per-pair critics are stacked along dim 0, or dim 1 after the class dim of conditional ones
    def validate():
        val = evaluate(h_va, y_va)  # every pair's bound, on every rank
        return val if shard is None else val[shard.lo:shard.hi]

    train_select(mod, (h_tr, y_tr), validate, mod.num_pairs, gen, kw, owner,
                 element_dim=1 if cond else 0, agree=None if shard is None else shard.any)
    ci_parts = ()
    if not return_ci:
        evaluate(h_te, y_te)
    else:
        est, low, high = _pairwise_ci(mod, h_te, y_te, kw)
        mod.last.copy_(est.to(mod.last.dtype))
        if shard is not None:  # this rank's block of pairs -> every pair, on every rank
            low, high = shard.gather(low), shard.gather(high)
        ci_parts = (_symmetric(mod, low), _symmetric(mod, high))
    return with_extras(mod.matrix().float(), ci_parts, mod, kw)


def _symmetric(mod, values) -> torch.Tensor:
    m = mod.num_units
    pairs = mod.pairs if mod.shard is None else mod.shard.gather(mod.pairs)
    out = torch.zeros(m, m)
    out[pairs[:, 0], pairs[:, 1]] = values.float()
    out[pairs[:, 1], pairs[:, 0]] = values.float()
    return out


def _shift_negatives(N: int, labels, num: int, conditional: bool) -> torch.Tensor:
    """``[M, 2]`` sample indices of the negatives that ``PairwiseMINE.evaluate`` draws with its
    default seed: ``num`` cyclic shifts, within each class (in class order) for a conditional
    module, so that the bootstrap's estimate is the module's."""
    gen = torch.Generator().manual_seed(0)
    if not conditional:
        perms = make_perms(N, "shift", min(num, N - 1), generator=gen)
        return torch.stack([torch.arange(N).repeat(perms.shape[0]), perms.reshape(-1)], 1)
    parts = []
    for y in torch.unique(labels).tolist():
        rows = (labels == y).nonzero().squeeze(1)
        n = rows.numel()
        if n < 2:
            continue  # no negative within the class: PairwiseMINE skips it too
        perms = make_perms(n, "shift", min(num, n - 1), generator=gen)
        parts.append(torch.stack([rows.repeat(perms.shape[0]), rows[perms.reshape(-1)]], 1))
    return torch.cat(parts)


@torch.no_grad()
def _pairwise_ci(mod, h, labels, kw):
    """Test bound and bootstrap interval per pair, in chunks of pairs that bound the score memory."""
    N = h.shape[0]
    cond = labels is not None and getattr(mod, "num_classes", None) is not None
    index = _shift_negatives(N, labels, kw["val_negatives"], cond)
    groups = None
    if cond:  # the class-frequency average of per-class bounds, over classes with negatives
        groups = labels
    P = mod.num_pairs
    chunk = max(1, (1 << 22) // index.shape[0])
    gen = boot_generator(kw["seed"])
    parts = []
    for s in range(0, P, chunk):
        pair_index = torch.arange(s, min(P, s + chunk))
        joint, marg = pair_scores(mod, h, index, pair_index, labels if cond else None)
        state = gen.get_state()  # the same resamples for every chunk of pairs
        parts.append(bootstrap_bound(kw["estimator"], joint, marg, index, groups=groups,
                                     num_bootstrap=kw["num_bootstrap"], ci=kw["ci"], smile_clip=mod.smile_clip,
                                     generator=gen))
        gen.set_state(state)
    return tuple(torch.cat([p[i] for p in parts]) for i in range(3))


def _fit_whole(mod, train, val, eval_kw: dict, gen, kw: dict, owner: str) -> None:
    """Train a one-estimate module (total correlation, vector MI) on ``train``, stopping and
    choosing the critic on ``val`` (:func:`train_select`); ``eval_kw`` go to ``mod.evaluate``."""
    def evaluate():
        return torch.as_tensor(mod.evaluate(*val, **eval_kw)).reshape(1)

    train_select(mod, train, evaluate, 1, gen, kw, owner)


def estimate_total_correlation(h, labels=None, *, hidden: int = 64, layers: int = 2, estimator: str = "mine",
                               num_negatives: int = 4, marginals: str = "gaussianize", batch_size: int = 500,
                               lr: float = 1e-3, max_epochs: int = 300, patience: int = 10, lr_decays: int = 2,
                               min_delta: float = 1e-3, val_fraction: float = 0.2, test_fraction: float = 0.2,
                               val_draws: int = 16, return_ci: bool = False, ci: float = 0.95,
                               num_bootstrap: int = 200, seed: int | None = 0, progress: bool = False,
                               return_module: bool = False):
    """Total correlation ``I(h_1; ...; h_m)`` (or given ``labels``) in nats.

    Args:
        h: ``[N, m]`` samples, ``m >= 2``.
        labels: optional ``[N]`` int64; gives the class-conditional total correlation.
        hidden, layers, estimator, num_negatives: see :class:`mmim_ext.TotalCorrelationMINE`.
        marginals, batch_size, lr, max_epochs, patience, lr_decays, min_delta, val_fraction,
            test_fraction, return_ci, ci, num_bootstrap, seed, progress: as in
            :func:`estimate_pairwise_mi`.
        val_draws: product-of-marginals draws of the validation or test set for the
            log-mean-exp term.

    Returns:
        float, the test bound; ``(estimate, low, high)`` with ``return_ci``; ``return_module``
        appends the module.
    """
    owner = "estimate_total_correlation"
    kw = dict(locals())
    check_positive_int(owner, "val_draws", val_draws)
    (h_tr, h_va, h_te), (y_tr, y_va, y_te), gen = prepare_units(owner, h, labels, kw)
    m = h_tr.shape[1]
    # a conditional critic sees the label: the optimal one depends on the class
    cond = {} if labels is None else {"num_classes": max(2, int(torch.as_tensor(labels).max()) + 1)}
    mod = TotalCorrelationMINE(m, hidden=hidden, layers=layers, estimator=estimator, num_negatives=num_negatives,
                               standardize=False, **cond)

    _fit_whole(mod, (h_tr, y_tr), (h_va, y_va), {"num_draws": val_draws}, gen, kw, owner)
    if not return_ci:
        return with_extras(float(mod.evaluate(h_te, y_te, num_draws=val_draws)), (), mod, kw)
    with torch.no_grad():
        N = h_te.shape[0]
        # the draws TotalCorrelationMINE.evaluate makes with its default seed: every column
        # permuted by its own derangement (within class with labels), draw by draw
        perms = make_perms(N, "shuffle", m * val_draws, y_te, generator=torch.Generator().manual_seed(0))
        index = perms.view(val_draws, m, N).transpose(1, 2).reshape(val_draws * N, m)
        joint_in = h_te
        marg_in = torch.gather(h_te.repeat(val_draws, 1), 0, index)
        if cond:
            onehot = torch.nn.functional.one_hot(y_te, cond["num_classes"]).to(h_te.dtype)
            joint_in = torch.cat([joint_in, onehot], 1)
            marg_in = torch.cat([marg_in, onehot.repeat(val_draws, 1)], 1)
        joint = mod.critic(joint_in).reshape(N, 1)
        marg = mod.critic(marg_in).reshape(-1, 1)
    est, low, high = bootstrap_bound(estimator, joint, marg, index, num_bootstrap=num_bootstrap, ci=ci,
                                     smile_clip=mod.smile_clip, generator=boot_generator(seed))
    return with_extras(float(est[0]), (float(low[0]), float(high[0])), mod, kw)


def estimate_mi(x, y, *, hidden: int = 64, layers: int = 2, estimator: str = "mine", negatives: str = "shuffle",
                num_negatives: int = 4, squares: bool = True, marginals: str = "gaussianize",
                batch_size: int = 500, lr: float = 1e-3,
                max_epochs: int = 300, patience: int = 10, lr_decays: int = 2, min_delta: float = 1e-3,
                val_fraction: float = 0.2, test_fraction: float = 0.2, val_negatives: int = 64,
                return_ci: bool = False, ci: float = 0.95, num_bootstrap: int = 200, seed: int | None = 0,
                progress: bool = False, return_module: bool = False):
    """Mutual information ``I(X; Y)`` between two vectors in nats.

    Args:
        x: ``[N, dx]`` (or ``[N]``) samples; y: ``[N, dy]`` (or ``[N]``) samples.
        hidden, layers, estimator, negatives, num_negatives, squares: see
            :class:`mmim_ext.VectorMINE`; by default the critic also sees the squared
            coordinates, which it needs where the dependence is in a shared scale
            (``docs/estimators.md`` compares both on a 5+5 multivariate t).
        marginals, batch_size, lr, max_epochs, patience, lr_decays, min_delta, val_fraction,
            test_fraction, return_ci, ci, num_bootstrap, seed, progress: as in
            :func:`estimate_pairwise_mi`.
        val_negatives: cyclic shifts of ``y`` per validation or test sample.

    Returns:
        float, the test bound; ``(estimate, low, high)`` with ``return_ci``; ``return_module``
        appends the module.
    """
    owner = "estimate_mi"
    kw = dict(locals())
    x = _as_2d("x", owner, x)
    y = _as_2d("y", owner, y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{owner}: arguments 'x' and 'y' must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    check_choice(owner, "estimator", estimator, BOUNDS)
    check_choice(owner, "negatives", negatives, NEGATIVES)
    N = x.shape[0]
    _check_fit_args(owner, N, kw)
    check_positive_int(owner, "val_negatives", val_negatives)
    gen = _seeded_generator(seed)
    splits = _split(N, val_fraction, test_fraction, gen)
    x_tr, x_va, x_te = _map_splits(marginals, x, splits)
    y_tr, y_va, y_te = _map_splits(marginals, y, splits)
    mod = VectorMINE(x.shape[1], y.shape[1], hidden=hidden, layers=layers, estimator=estimator,
                     negatives=negatives, num_negatives=num_negatives, standardize=False, squares=squares)

    _fit_whole(mod, (x_tr, y_tr), (x_va, y_va), {"num_negatives": val_negatives}, gen, kw, owner)
    if not return_ci:
        return with_extras(float(mod.evaluate(x_te, y_te, num_negatives=val_negatives)), (), mod, kw)
    with torch.no_grad():
        n = x_te.shape[0]
        # the negatives VectorMINE.evaluate draws (its default seed), so the estimate is the same
        perms = make_perms(n, "shift", min(val_negatives, n - 1), generator=torch.Generator().manual_seed(0))
        joint, marg = _vector_scores(mod, x_te, y_te, perms)
    index = torch.stack([torch.arange(n).repeat(perms.shape[0]), perms.reshape(-1)], 1)
    est, low, high = bootstrap_bound(estimator, joint, marg, index, num_bootstrap=num_bootstrap, ci=ci,
                                     smile_clip=mod.smile_clip, generator=boot_generator(seed))
    return with_extras(float(est[0]), (float(low[0]), float(high[0])), mod, kw)


def _vector_scores(mod, x, y, perms):
    """Joint ``[n, 1]`` and negative ``[R * n, 1]`` scores of a VectorMINE's critic."""
    n = x.shape[0]
    joint = mod.critic(torch.cat([x, y], 1))
    xm = x.unsqueeze(0).expand(perms.shape[0], n, -1)
    marg = mod.critic(torch.cat([xm, y[perms]], 2)).reshape(-1, 1)
    return joint.reshape(n, 1), marg
