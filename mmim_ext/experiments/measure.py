"""Did the penalty move what it targets? Information measured on held-out features.

After training, every run's penultimate features on samples it never trained on (validation +
test splits) are handed to the package's one-call estimators, each trained from scratch on a
part of those features, stopped on a second part and evaluated on a third that played no part in
any choice (so the numbers are held-out lower bounds without selection bias, comparable across
methods because every run gets the same estimator and budget):

* ``pairwise_mi_sum`` / ``pairwise_mi_mean``: ``Σ_{i<j} I(h_i; h_j)`` (the sum over the
  measured pairs scaled to all ``m(m-1)/2`` pairs) and the mean per pair;
* ``cond_pairwise_mi_sum`` / ``cond_pairwise_mi_mean``: the same for ``I(h_i; h_j | Y)``;
* ``sum_unit_label_mi``: ``Σ_i I(Y; h_i)`` over all units (the sum over ``num_units``
  measured units, a fixed seeded subset, scaled by ``m / num_units``);
* ``label_mi``: ``I(Y; h)`` of the whole layer (:class:`mmim_ext.estimators.LabelMINE`).

To stay cheap only ``num_pairs`` pairs (a fixed seeded subset, the same for every run) are
measured. All values in nats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["MeasureConfig", "measure_information", "pair_subset"]


@dataclass
class MeasureConfig:
    """Estimator budget of the held-out measurements (the quick run uses a smaller one)."""

    num_pairs: int = 16
    num_units: int = 12
    pair_hidden: int = 8
    pair_max_epochs: int = 8
    pair_patience: int = 3
    unit_max_epochs: int = 4
    label_max_epochs: int = 20
    patience: int = 4
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def pair_subset(m: int, num_pairs: int, seed: int = 0) -> torch.Tensor:
    """A fixed random subset of ``min(num_pairs, m(m-1)/2)`` pairs ``i < j``: ``[S, 2]`` int64."""
    iu = torch.triu_indices(m, m, offset=1).t().contiguous()
    if num_pairs >= iu.shape[0]:
        return iu
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(iu.shape[0], generator=gen)[:num_pairs].sort().values
    return iu[idx].contiguous()


def measure_information(h: torch.Tensor, labels: torch.Tensor, cfg: MeasureConfig | None = None) -> dict:
    """The held-out measurements listed in the module docstring for features ``h`` ``[N, m]``
    and labels ``[N]`` int64; returns a dict of floats (nats) plus the settings used."""
    from mmim_ext.estimators import estimate_label_mi, estimate_pairwise_mi, estimate_unit_label_mi

    cfg = cfg or MeasureConfig()
    h = h.detach().float()
    N, m = h.shape
    pairs = pair_subset(m, cfg.num_pairs, cfg.seed)
    P_all = m * (m - 1) // 2
    S = pairs.shape[0]
    common = dict(pairs=pairs, hidden=cfg.pair_hidden, max_epochs=cfg.pair_max_epochs, patience=cfg.pair_patience,
                  batch_size=256, val_negatives=128, seed=cfg.seed)
    mat = estimate_pairwise_mi(h, **common)
    pair_vals = mat[pairs[:, 0], pairs[:, 1]]
    cmat = estimate_pairwise_mi(h, labels, **common)
    cpair_vals = cmat[pairs[:, 0], pairs[:, 1]]
    gen = torch.Generator().manual_seed(cfg.seed)
    unit_idx = torch.randperm(m, generator=gen)[: min(cfg.num_units, m)].sort().values
    units = estimate_unit_label_mi(h[:, unit_idx], labels, max_epochs=cfg.unit_max_epochs, patience=cfg.patience,
                                   seed=cfg.seed)
    label = estimate_label_mi(h, labels, max_epochs=cfg.label_max_epochs, patience=cfg.patience, seed=cfg.seed)
    dead = int((h.std(0) < 1e-6).sum())
    return {
        "pairwise_mi_sum": float(pair_vals.sum()) * P_all / S,
        "pairwise_mi_mean": float(pair_vals.mean()),
        "cond_pairwise_mi_sum": float(cpair_vals.sum()) * P_all / S,
        "cond_pairwise_mi_mean": float(cpair_vals.mean()),
        "sum_unit_label_mi": float(units.sum()) * m / unit_idx.numel(),
        "label_mi": float(label),
        "dead_units": dead,
        "n_samples": int(N),
        "pairs_measured": int(S),
        "settings": cfg.to_dict(),
    }
