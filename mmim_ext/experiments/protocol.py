"""The Table 1 protocol: methods, equal budgets, early stopping, the C3 stage, one run.

Budget (the same for every method, so that a difference in accuracy is the regularizer's):

* For each (data set, architecture, seed) the **baseline** trains with early stopping on the
  validation cross-entropy (``patience`` epochs without a new minimum, at most ``max_epochs``).
  The number of epochs it trained, ``epochs_used``, is that seed's **body budget**.
* Every other method trains the body (and the linear head) for exactly that many epochs.
* Every method, the baseline included, then keeps the checkpoint with the lowest validation
  cross-entropy among its epochs (the one early stopping selects), so selection is identical.
* Methods with a C3 stage (``mmim``, ``baseline+c3``) spend ``c3_epochs`` more epochs *after*
  the body budget, training only a Gaussian output layer on the frozen features
  (:func:`mmim_ext.train_c3`). ``mmim`` is exactly ``c1`` followed by that stage and
  ``baseline+c3`` exactly ``baseline`` followed by it: the same trained body (same seed,
  same λ) is shared, so the C3 stage's effect is measured on its own.

For one seed every method starts from the same initial weights and sees the same mini-batch
order (a ``DataLoader`` with its own seeded generator).
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from mmim_ext.experiments.data import Splits
from mmim_ext.experiments.models import build_model

__all__ = [
    "BODY_OF",
    "METHODS",
    "METHOD_LABELS",
    "TUNED_METHODS",
    "TUNE_GRID",
    "WITH_C3",
    "ProtocolConfig",
    "heldout_features",
    "run_body",
]

METHODS = ("baseline", "baseline+c3", "mmim", "c1", "c4", "c5", "c6", "rdm", "iyh", "mmim-total")
METHOD_LABELS = {
    "baseline": "Baseline",
    "baseline+c3": "Baseline + C3 stage",
    "mmim": "MMIM (C1, then C3 stage)",
    "c1": "C1 alone (no C3 stage)",
    "c4": "C4 = Σ I(h_i;h_j)",
    "c5": "C5 = −Σ I(h_i;h_j\\|Y)",
    "c6": "C6 = −Σ I(Y;h_i)",
    "rdm": "RDM (C4 + C5)",
    "iyh": "−I(Y;h) (one critic)",
    "mmim-total": "MMIM-total (C4, C5 as total corr.)",
}
#: The body each method trains (methods sharing a body share the trained weights).
BODY_OF = {m: m for m in METHODS} | {"baseline+c3": "baseline", "mmim": "c1"}
#: Methods that add the C3 stage after the body budget.
WITH_C3 = frozenset({"baseline+c3", "mmim"})
#: Methods with a strength λ to tune.
TUNED_METHODS = tuple(m for m in METHODS if BODY_OF[m] != "baseline")
#: Log grid of λ searched on the validation split (the penalties are in nats).
TUNE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

# make_regularizer name and options of every regularized body.
_REGULARIZER_OF = {
    "c1": ("mmim", {}),
    "c4": ("c4", {}),
    "c5": ("c5", {}),
    "c6": ("c6", {}),
    "rdm": ("rdm", {}),
    "iyh": ("iyh", {}),
    "mmim-total": ("mmim", {"mode": "total"}),
}


@dataclass
class ProtocolConfig:
    """Settings shared by every run of one (data set, architecture).

    ``max_epochs``/``patience``: the baseline's early stopping (the body budget, see the module
    docstring). ``c3_epochs``: length of the C3 stage. ``reg_kwargs`` go to
    :func:`mmim_ext.make_regularizer` for the MMIM-family regularizers (``iyh`` uses its own
    defaults). Defaults sized for 2 CPU cores: 1,024 of the 8,128 pairs of a 128-unit layer per
    step (an unbiased estimate of the full pairwise sum), critics with 8 hidden units.
    """

    dataset: str
    arch: str
    max_epochs: int = 200
    patience: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    width: int = 128
    c3_epochs: int = 10
    c3_beta: float = 1.0
    c3_prior_std: float = 0.1
    reg_kwargs: dict = field(default_factory=lambda: {"max_pairs": 1024, "hidden": 8})
    device: str = "cpu"
    progress: bool = False

    def validate(self) -> None:
        for name in ("max_epochs", "patience", "batch_size", "width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name in ("batch_size", "width") else 1):
                raise ValueError(f"argument '{name}' must be a positive int (batch_size, width >= 2), got {v!r}")
        if isinstance(self.c3_epochs, bool) or not isinstance(self.c3_epochs, int) or self.c3_epochs < 1:
            raise ValueError(f"argument 'c3_epochs' must be an int >= 1, got {self.c3_epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"argument 'lr' must be > 0, got {self.lr!r}")

    def fingerprint(self) -> dict:
        """The settings a stored run must share with this config to be reused (not device/progress)."""
        d = asdict(self)
        d.pop("device")
        d.pop("progress")
        return d


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


class _Batches(Dataset):
    """``(x[idx], y[idx])`` for a list of indices ``idx``: one gather per mini-batch instead of
    ``B`` per-sample ``__getitem__`` calls and a collate (which cost as much as the MLP's step)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx):
        return self.x[idx], self.y[idx]


def _train_loader(x, y, batch_size: int, seed: int) -> DataLoader:
    # A dedicated generator: the batch order depends on the seed only, not on how much of the
    # global RNG a method's critics consumed, so every method sees the same order.
    gen = torch.Generator().manual_seed(int(seed))
    bs = min(batch_size, len(y))
    # The sampler and generator of DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True,
    # generator=gen, drop_last=True), so the generator is consumed as there (a draw per epoch
    # for the loader's base seed, then the permutations) and the batches are the same samples
    # in the same order; only the per-sample fetch and collate are gone.
    # drop_last: a trailing batch of one sample has no pairs to shuffle for MINE.
    data = _Batches(x, y)
    sampler = BatchSampler(RandomSampler(data, generator=gen), bs, drop_last=True)
    return DataLoader(data, sampler=sampler, batch_size=None, generator=gen)


class _EvalBatches:
    """Fixed ``(inputs, labels)`` batches of 1,024 samples, made once (a DataLoader re-collated
    them sample by sample at every epoch's evaluation), each cloned so that it is a fresh
    allocation as a collated batch was.

    Every pass draws one number from PyTorch's global generator, as a DataLoader's iterator does
    for its base seed: the C3 stage's weight samples (and critics built without a seed) read that
    stream after the evaluations, so a run gives the same numbers as with the DataLoader.
    """

    def __init__(self, x, y):
        self.batches = [(x[i:i + 1024].clone(), y[i:i + 1024].clone()) for i in range(0, len(y), 1024)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        torch.empty((), dtype=torch.int64).random_()
        return iter(self.batches)


def _eval_loader(x, y) -> _EvalBatches:
    return _EvalBatches(x, y)


def clean_history(history, stage: int) -> list[dict]:
    """JSON-able scalars of a training history (list of per-epoch dicts), tagged with ``stage``."""
    out = []
    for rec in history or []:
        flat = dict(rec)
        flat.update(flat.pop("terms", None) or {})  # the helper nests the regularizer's terms
        row = {"stage": stage}
        for k, v in flat.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, bool) or isinstance(v, str):
                row[k] = v
            elif isinstance(v, (int, float)):
                row[k] = float(v) if isinstance(v, float) else v
        out.append(row)
    return out


@torch.no_grad()
def heldout_features(body, splits: Splits, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features ``[N, m]`` (float32) and labels ``[N]`` of the validation and test
    splits (samples the model was not trained on), in eval mode."""
    was = body.training
    body.eval()
    try:
        x = torch.cat([splits.x_val, splits.x_test])
        y = torch.cat([splits.y_val, splits.y_test])
        feats = torch.cat([body(x[i:i + 1024].to(device)).float().cpu() for i in range(0, len(y), 1024)])
    finally:
        body.train(was)
    return feats, y


def run_body(splits: Splits, cfg: ProtocolConfig, body_method: str, seed: int, *, reg_weight: float = 0.0,
             budget: int | None = None, methods=None, measure=None) -> list[dict]:
    """Train one body and return one record per requested method built on it.

    Args:
        splits: the data.
        cfg: shared settings.
        body_method: ``"baseline"`` or a regularized body (``"c1"``, ``"c4"``, ...).
        seed: initial weights and batch order.
        reg_weight: λ (ignored for the baseline).
        budget: body epochs; ``None`` only for the baseline, which then early-stops (its
            ``epochs_used`` is the budget of every other method on this seed).
        methods: the methods to report from this body (default: the body itself); e.g.
            ``("c1", "mmim")`` adds the C3 stage after the ``c1`` record is taken.
        measure: optional ``measure(features [N, m], labels [N]) -> dict`` applied to the
            held-out features of the trained body; its result goes under ``"mi"``.

    Returns:
        Records ``{"dataset", "arch", "method", "body_method", "seed", "reg_weight",
        "epochs_used", "best_epoch", "budget", "c3_epochs", "acc_val", "acc_test", "val_loss",
        "wall_s", "history", ...}`` (accuracies in percent, losses in nats, ``history`` one
        dict per epoch with ``stage`` 1 = body, 2 = C3 stage).
    """
    from mmim_ext.regularizers import make_regularizer
    from mmim_ext.training import evaluate_classifier, train_c3, train_classifier

    methods = tuple(methods or (body_method,))
    bad = [m for m in methods if m not in METHODS or BODY_OF[m] != body_method]
    if bad:
        raise ValueError(f"run_body: methods {bad} are not built on body {body_method!r}")
    if (budget is None) != (body_method == "baseline"):
        raise ValueError("run_body: the baseline early-stops (budget=None); every other body needs the "
                         "baseline's epochs_used as 'budget'")
    seed_everything(seed)
    body, head = build_model(cfg.arch, splits.input_shape, splits.num_classes, width=cfg.width)
    prior_head = copy.deepcopy(head)  # C3's prior mean: the head's initialization (data-independent)
    loader = _train_loader(splits.x_train, splits.y_train, cfg.batch_size, seed)
    val_loader = _eval_loader(splits.x_val, splits.y_val)
    reg = None
    if body_method != "baseline":
        name, extra = _REGULARIZER_OF[body_method]
        kw = dict(extra) if name == "iyh" else {**cfg.reg_kwargs, **extra}
        if kw.get("mode") == "total":
            kw.pop("max_pairs", None)
        reg = make_regularizer(name, cfg.width, splits.num_classes, **kw)
    t0 = time.perf_counter()
    if budget is None:
        hist = train_classifier(body, head, loader, epochs=cfg.max_epochs, lr=cfg.lr, device=cfg.device,
                                progress=cfg.progress, val_loader=val_loader, patience=cfg.patience,
                                restore_best=True)
    else:
        hist = train_classifier(body, head, loader, epochs=int(budget), regularizer=reg,
                                reg_weight=float(reg_weight) if reg is not None else 0.0, lr=cfg.lr,
                                device=cfg.device, progress=cfg.progress, val_loader=val_loader,
                                restore_best=True)
    body_wall = time.perf_counter() - t0
    body_hist = clean_history(hist, 1)
    best = [i for i, r in enumerate(hist) if r.get("best")]
    if not best:
        raise ValueError(f"run_body: {body_method} seed {seed}: the validation loss was never finite "
                         f"(diverged?); last record {hist[-1]}")
    best_epoch = 1 + best[0]
    mi = None
    if measure is not None:
        t1 = time.perf_counter()
        mi = dict(measure(*heldout_features(body, splits, cfg.device)))
        mi["seconds"] = time.perf_counter() - t1
    base = {"dataset": splits.name, "arch": cfg.arch, "body_method": body_method, "seed": int(seed),
            "reg_weight": float(reg_weight) if body_method != "baseline" else 0.0,
            "epochs_used": len(hist), "best_epoch": best_epoch,
            "budget": "early stopping" if budget is None else "baseline's epochs_used",
            "stopped_early": bool(budget is None and len(hist) < cfg.max_epochs),
            "config": cfg.fingerprint()}
    if mi is not None:
        base["mi"] = mi
    records = []
    c3_head, c3_hist, c3_wall = None, None, 0.0
    for method in methods:
        rec = dict(base, method=method)
        if method in WITH_C3:
            if c3_head is None:
                t2 = time.perf_counter()
                c3_head, h2 = train_c3(body, head, loader, epochs=cfg.c3_epochs, beta=cfg.c3_beta,
                                       prior_std=cfg.c3_prior_std, lr=cfg.lr, n_train=len(splits.y_train),
                                       device=cfg.device, progress=cfg.progress, prior_head=prior_head)
                c3_hist = clean_history(h2, 2)
                c3_wall = time.perf_counter() - t2
            final_head, rec["c3_epochs"] = c3_head, cfg.c3_epochs
            rec["history"] = body_hist + c3_hist
            rec["c3_bound"] = c3_hist[-1]["c3_bound"]
            rec["wall_s"] = body_wall + c3_wall
        else:
            final_head, rec["c3_epochs"] = head, 0
            rec["history"] = body_hist
            rec["wall_s"] = body_wall
        vl, va = evaluate_classifier(body, final_head, val_loader, device=cfg.device)
        _, te = evaluate_classifier(body, final_head, _eval_loader(splits.x_test, splits.y_test), device=cfg.device)
        rec.update(val_loss=vl, acc_val=va, acc_test=te)
        records.append(rec)
    return records
