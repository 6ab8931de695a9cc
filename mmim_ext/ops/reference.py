"""Pure-PyTorch reference for the pairwise critic statistics.

This is the fallback when the compiled extension is missing and the oracle of the tests, so it is
written for clarity: for a chunk of pairs it builds the critic's hidden layer ``[B, chunk, K]``,
reduces it, and moves on. The chunk size is chosen so that the scratch memory of one chunk stays
under ``max_scratch_bytes``; when gradients are needed each chunk is wrapped in activation
checkpointing so that the saved tensors stay within the same budget during the backward pass.

Nothing here is a strawman: it is the code a competent PyTorch user would write (vectorized over
pairs, samples and hidden units, log-sum-exp by ``torch.logsumexp``) and it is what
``torch.compile`` is benchmarked on.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["pair_stats_reference", "all_pairs", "DEFAULT_MAX_SCRATCH_BYTES"]

#: Scratch budget of one chunk of the reference, in bytes (256 MiB).
DEFAULT_MAX_SCRATCH_BYTES = 256 * 2**20


def all_pairs(m: int, device=None) -> torch.Tensor:
    """All unordered pairs ``i < j`` of ``m`` units in row-major order, ``[m(m-1)/2, 2]`` int64."""
    idx = torch.triu_indices(m, m, offset=1, device=device)
    return idx.t().contiguous()


def _critic(a, b, wa, wb, bias, v, c):
    """Critic scores for a chunk of pairs.

    a, b: ``[S, B, P]`` first and second argument; wa, wb, bias, v: ``[P, K]``; c: ``[P]``.
    Returns ``[S, B, P]``.
    """
    hidden = torch.relu(a.unsqueeze(-1) * wa + b.unsqueeze(-1) * wb + bias)  # [S, B, P, K]
    return (hidden * v).sum(-1) + c


def _chunk_stats(h, hp, wa, wb, bias, v, c, pi, pj):
    """(t_joint, lme) for one chunk of pairs ``(pi, pj)``; ``hp`` is ``h`` permuted, ``[R, B, m]``."""
    a = h[:, pi]  # [B, P]
    t_joint = _critic(a.unsqueeze(0), h[:, pj].unsqueeze(0), wa, wb, bias, v, c)[0].mean(0)
    t_marg = _critic(a.unsqueeze(0), hp[:, :, pj], wa, wb, bias, v, c)  # [R, B, P]
    n = t_marg.shape[0] * t_marg.shape[1]
    lme = torch.logsumexp(t_marg.flatten(0, 1), dim=0) - math.log(n)
    return t_joint, lme


def pair_stats_reference(
    h: torch.Tensor,
    wa: torch.Tensor,
    wb: torch.Tensor,
    b: torch.Tensor,
    v: torch.Tensor,
    c: torch.Tensor,
    perms: torch.Tensor,
    pairs: torch.Tensor | None = None,
    *,
    max_scratch_bytes: int = DEFAULT_MAX_SCRATCH_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ``(t_joint, lme)``; same contract as :func:`mmim_ext.pair_stats`.

    Inputs are assumed valid (the public wrapper validates them). Half-precision inputs are
    computed in float32 and returned in their own dtype.
    """
    out_dtype = h.dtype
    if h.dtype in (torch.float16, torch.bfloat16):
        h, wa, wb, b, v, c = (t.float() for t in (h, wa, wb, b, v, c))
    B, m = h.shape
    if pairs is None:
        pairs = all_pairs(m, device=h.device)
    P = pairs.shape[0]
    if P == 0:
        # Empty statistics that still hang on the graph, so that a loss built from them
        # back-propagates zeros to every input (as the fused kernel's backward does).
        link = sum(t.reshape(-1)[:0] for t in (h, wa, wb, b, v, c)).to(out_dtype)
        return link, link.clone()
    K = wa.shape[-1]
    R = perms.shape[0]
    shared = wa.dim() == 1
    hp = h[perms]  # [R, B, m]: the second argument of the marginal samples

    # Per pair and chunk the live tensors are a few [1+R, B, chunk, K] activations.
    per_pair = 4 * (1 + R) * B * K * h.element_size()
    chunk = max(1, min(P, int(max_scratch_bytes // max(per_pair, 1))))
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (h, wa, wb, b, v, c)
    )

    t_parts, l_parts = [], []
    for start in range(0, P, chunk):
        sl = slice(start, min(P, start + chunk))
        pi, pj = pairs[sl, 0], pairs[sl, 1]
        n = pi.shape[0]
        if shared:
            params = (wa.expand(n, K), wb.expand(n, K), b.expand(n, K), v.expand(n, K), c.expand(n))
        else:
            params = (wa[sl], wb[sl], b[sl], v[sl], c[sl])
        if needs_grad and P > chunk:
            tj, lm = checkpoint(_chunk_stats, h, hp, *params, pi, pj, use_reentrant=False)
        else:
            tj, lm = _chunk_stats(h, hp, *params, pi, pj)
        t_parts.append(tj)
        l_parts.append(lm)
    t_joint = torch.cat(t_parts) if len(t_parts) > 1 else t_parts[0]
    lme = torch.cat(l_parts) if len(l_parts) > 1 else l_parts[0]
    return t_joint.to(out_dtype), lme.to(out_dtype)
