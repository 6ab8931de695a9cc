"""Product-of-marginals ("negative") samples: permutations of the batch.

``"shuffle"`` draws ``num_negatives`` random derangements of the batch, ``"shift"``
``num_negatives`` distinct cyclic shifts, ``"all"`` every one of the ``B-1`` shifts (every
off-diagonal pair). With ``labels`` every permutation maps each sample to a sample of the same
class (negatives of ``I(a; b | Y)``).

No negative pairs a sample with itself wherever its group (its class, or the batch without
labels) has two or more members: ``(a_n, b_n)`` is a joint sample, so counting it among the
product-of-marginals samples biases the log-mean-exp term towards the joint (by a weight of
``1/B`` per shuffle). A class with one member in the batch has no other sample to pair with: it
maps to itself.
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
        negatives: ``"shuffle"`` (random derangements, uniform over them), ``"shift"`` (distinct
            random cyclic shifts) or ``"all"`` (every shift ``1..B-1``; ``num_negatives`` is
            ignored).
        num_negatives: number of rows ``R`` for ``"shuffle"`` and ``"shift"``.
        labels: optional ``[B]`` int64; then every row maps each sample to one of its own class
            (random derangements within each class; shifts cycle inside each class; ``"all"`` has
            ``max_class_size - 1`` rows). A class with a single member maps to itself.
        device, generator: where to build the result, and the random source.

    Returns:
        ``[R, B]`` int64, each row a permutation of ``0..B-1`` without fixed points outside
        single-member classes.
    """
    check_choice("make_perms", "negatives", negatives, NEGATIVES)
    check_positive_int("make_perms", "batch", batch, 2)
    check_positive_int("make_perms", "num_negatives", num_negatives)
    if labels is not None:
        check_labels("make_perms", labels, batch)
        if int(labels.min()) < 0:
            raise ValueError(f"make_perms: argument 'labels' must hold class indices >= 0, got {int(labels.min())}")
        device = labels.device
    cpu = torch.device("cpu")
    if negatives == "shuffle":
        lab = torch.zeros(batch, dtype=torch.int64) if labels is None else labels.to(cpu)
        return _random_derangements(lab, num_negatives, generator).to(device or cpu)

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



def _random_derangements(lab: torch.Tensor, rows: int, generator) -> torch.Tensor:
    """``rows`` independent permutations, each uniform over the permutations that map every sample
    to ANOTHER sample of its class (classes of one sample map to themselves).

    Rejection sampling per (row, class) block: uniform permutations of each block's members are
    drawn by sorting random keys (padded blocks of the largest class's size, several candidates
    per block at a time), each block takes its first candidate without a fixed point, and only
    the blocks where none qualifies are drawn again. Conditioning a uniform permutation on "no
    fixed point" gives a uniform derangement (about 1 candidate in e qualifies), so every
    derangement stays possible, unlike Sattolo's algorithm (single cycles only). Sorting only the
    pending blocks keeps the cost near e sorts of each block instead of re-sorting whole rows.
    Each round draws at least 2 candidates per block (60% of blocks settle), and up to 16 (all
    but 0.07% settle) while the pending keys number fewer than 2^14, so that small calls finish
    in one or two rounds of a few tensor ops instead of a dozen.
    """
    batch = lab.shape[0]
    if batch >= 2 and bool((lab == lab[0]).all()):
        return _random_derangements_one_class(batch, rows, generator)
    perms = torch.arange(batch).repeat(rows, 1)
    counts = torch.bincount(lab)
    order = lab.argsort(stable=True)
    starts = counts.cumsum(0) - counts
    groups = (counts >= 2).nonzero().squeeze(1)  # the classes that can be deranged
    if groups.numel() == 0:
        return perms
    sizes = counts[groups]
    width = int(sizes.max())
    slot = torch.arange(width)
    valid = slot < sizes.unsqueeze(1)  # [G, S]
    members = order[(starts[groups].unsqueeze(1) + slot).clamp(max=batch - 1)]  # [G, S] sample ids
    pending_row = torch.arange(rows).repeat_interleave(groups.numel())
    pending_grp = torch.arange(groups.numel()).repeat(rows)
    while pending_row.numel() > 0:
        n = pending_row.numel()
        candidates = max(2, min(16, (1 << 14) // (n * width)))
        ok_slot = valid[pending_grp]  # [n, S]
        keys = torch.rand(candidates, n, width, generator=generator, dtype=torch.float64)
        keys = keys.masked_fill(~ok_slot, math.inf)  # padding sorts last: slots < size permute among themselves
        sigma = keys.argsort(dim=2)  # member k of the block goes to member sigma[k]
        fixed = (sigma == slot) & ok_slot
        good = ~fixed.any(2)  # [T, n]
        accepted = good.any(0)
        first = good.to(torch.int8).argmax(0)
        sig = sigma[first, torch.arange(n)][accepted]  # [n_acc, S]
        grp = pending_grp[accepted]
        row = pending_row[accepted].unsqueeze(1).expand_as(sig)
        src = members[grp]
        dst = src.gather(1, sig)
        mask = valid[grp]
        perms[row[mask], src[mask]] = dst[mask]
        pending_row, pending_grp = pending_row[~accepted], pending_grp[~accepted]
    return perms


def _random_derangements_one_class(batch: int, rows: int, generator) -> torch.Tensor:
    """:func:`_random_derangements` where every sample has the same label (the calls without
    labels, and each class's call of the conditional estimators): the same draws, sorts and
    choices, without the per-class bookkeeping (one block per row, no padding, members
    ``0..B-1``), which cost more than the sorting at the batch sizes of a training step."""
    perms = torch.arange(batch).repeat(rows, 1)
    slot = torch.arange(batch)
    pending = torch.arange(rows)
    while pending.numel() > 0:
        n = pending.numel()
        candidates = max(2, min(16, (1 << 14) // (n * batch)))
        keys = torch.rand(candidates, n, batch, generator=generator, dtype=torch.float64)
        sigma = keys.argsort(dim=2)
        good = ~(sigma == slot).any(2)  # [T, n]
        accepted = good.any(0)
        first = good.to(torch.int8).argmax(0)
        perms[pending[accepted]] = sigma[first, torch.arange(n)][accepted]
        pending = pending[~accepted]
    return perms


def product_of_marginals(h: torch.Tensor, labels, num_draws: int, generator=None) -> torch.Tensor:
    """``num_draws`` samples of the batch with every column permuted independently by a random
    derangement (within class when ``labels`` is given): ``[num_draws * B, m]``, draw by draw."""
    B, m = h.shape
    perms = make_perms(B, "shuffle", m * num_draws, labels, device=h.device, generator=generator)
    perms = perms.view(num_draws, m, B).transpose(1, 2)  # [draws, B, m]: row n, column i <- perms[i, n]
    return torch.gather(h.unsqueeze(0).expand(num_draws, B, m), 1, perms).reshape(num_draws * B, m)
