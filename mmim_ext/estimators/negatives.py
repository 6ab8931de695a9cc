"""Product-of-marginals ("negative") samples: permutations of the batch.

``"shuffle"`` draws ``num_negatives`` random permutations of the batch, ``"shift"``
``num_negatives`` distinct cyclic shifts, ``"all"`` every one of the ``B-1`` shifts (every
off-diagonal pair). With ``labels`` every permutation maps each sample to a sample of the same
class, which turns ``I(a; b)`` into ``I(a; b | Y)``.
"""

from __future__ import annotations

import math

import torch

from mmim_ext._checks import check_choice, check_labels, check_positive_int

__all__ = ["NEGATIVES", "make_perms", "product_of_marginals"]

NEGATIVES = ("shuffle", "shift", "all")


def make_perms(batch: int, negatives: str = "shuffle", num_negatives: int = 1, labels=None, *,
               device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Permutations of the batch that produce product-of-marginals samples.

    Args:
        batch: batch size ``B`` (>= 2).
        negatives: ``"shuffle"`` (random permutations), ``"shift"`` (distinct random cyclic
            shifts) or ``"all"`` (every shift ``1..B-1``; ``num_negatives`` is ignored).
        num_negatives: number of rows ``R`` for ``"shuffle"`` and ``"shift"``.
        labels: optional ``[B]`` int64; then every row maps each sample to one of its own class
            (shifts cycle inside each class and skip the identity when the class has two or
            more members; ``"all"`` has ``max_class_size - 1`` rows).
        device, generator: where to build the result, and the random source.

    Returns:
        ``[R, B]`` int64, each row a permutation of ``0..B-1``.
    """
    check_choice("make_perms", "negatives", negatives, NEGATIVES)
    check_positive_int("make_perms", "batch", batch, 2)
    check_positive_int("make_perms", "num_negatives", num_negatives)
    if labels is not None:
        check_labels("make_perms", labels, batch)
        device = labels.device
    cpu = torch.device("cpu")
    if negatives == "shuffle":
        if labels is None:
            keys = torch.rand(num_negatives, batch, generator=generator, dtype=torch.float64)
            return keys.argsort(dim=1).to(device or cpu)
        lab = labels.to(cpu, torch.float64)
        keys = lab + 0.5 * torch.rand(num_negatives, batch, generator=generator, dtype=torch.float64)
        order = lab.argsort(stable=True)
        perms = torch.empty(num_negatives, batch, dtype=torch.int64)
        perms[:, order] = keys.argsort(dim=1)  # the k-th member of a class goes to a random member
        return perms.to(device or cpu)

    lab = torch.zeros(batch, dtype=torch.int64) if labels is None else labels.to(cpu)
    order = lab.argsort(stable=True)
    _, counts = torch.unique_consecutive(lab[order], return_counts=True)
    starts = counts.cumsum(0) - counts
    g_start = torch.repeat_interleave(starts, counts)
    g_size = torch.repeat_interleave(counts, counts)
    k = torch.arange(batch) - g_start
    if negatives == "all":
        shifts = torch.arange(1, max(2, int(counts.max())))
    else:
        n_max = int(counts.max())
        if num_negatives > max(1, n_max - 1) and labels is None:
            raise ValueError(f"make_perms: 'shift' with num_negatives={num_negatives} needs at most B-1={batch - 1} distinct shifts")
        pool = max(1, n_max - 1)
        pick = torch.randperm(pool, generator=generator)[: min(num_negatives, pool)]
        if num_negatives > pool:  # conditional case with tiny classes: reuse shifts
            pick = pick.repeat(math.ceil(num_negatives / pool))[:num_negatives]
        shifts = pick + 1
    # A shift s inside a class of size n becomes 1 + (s-1) mod (n-1), never the identity.
    size = g_size.unsqueeze(0)
    eff = torch.where(size > 1, 1 + (shifts.unsqueeze(1) - 1) % (size - 1).clamp(min=1), torch.zeros_like(size))
    new_pos = g_start + (k + eff) % size
    perms = torch.empty(shifts.shape[0], batch, dtype=torch.int64)
    perms[:, order] = order[new_pos]
    return perms.to(device or cpu)



def product_of_marginals(h: torch.Tensor, labels, num_draws: int, generator=None) -> torch.Tensor:
    """``num_draws`` samples of the batch with every column permuted independently (within class
    when ``labels`` is given): ``[num_draws * B, m]``."""
    B, m = h.shape
    draws = []
    for _ in range(num_draws):
        perms = make_perms(B, "shuffle", m, labels, device=h.device, generator=generator)  # [m, B]
        draws.append(torch.gather(h, 0, perms.t()))
    return torch.cat(draws, 0)

