"""The pairwise critic-statistics op: public wrapper, validation, autograd and fake kernels.

The fused kernels live in ``csrc/`` and are registered as ``mmim_ext::pair_stats_fwd``,
``mmim_ext::pair_stats_bwd`` and ``mmim_ext::pair_stats_fwd_bwd`` (both in one pass, for
:func:`pair_stats_linear`). Autograd is attached here with ``torch.library.register_autograd``
(the backward is itself an op, so ``torch.compile`` and ``opcheck`` see both), and the fake
kernels give shapes to the compiler. When the extension is missing every call goes to
:func:`mmim_ext.ops.reference.pair_stats_reference`.
"""

from __future__ import annotations

import math

import torch

from mmim_ext import _extension
from mmim_ext._checks import fmt_shape as _fmt
from mmim_ext.ops.reference import pair_stats_reference

__all__ = ["cpu_cache_info", "empty_cpu_cache", "fused_available", "num_pairs", "one_pass_applies", "pair_stats",
           "pair_stats_linear", "pair_stats_mine_loss"]

#: Scratch budget of one fused call, in bytes. The CPU kernel stages the R shuffled copies of h
#: and, in the backward, gradient buffers of that size for each part of the pairs (one per
#: thread, and up to four per thread while all of them fit in 32 MB); when R is so large that
#: they would exceed this budget, the permutation rows are processed in groups and the groups'
#: log-mean-exps combined (exactly, by a log-sum-exp weighted by group size). The planning
#: counts one buffer per thread; the parts beyond that can add at most 32 MB to the budget.
FUSED_SCRATCH_BYTES = 256 * 2**20

_FLOAT = (torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)
_BACKENDS = ("auto", "fused", "reference")


def num_pairs(m: int) -> int:
    """Number of unordered pairs ``i < j`` among ``m`` units."""
    return m * (m - 1) // 2



def _validate(h, wa, wb, b, v, c, perms, pairs) -> tuple[int, bool]:
    """Static checks (shapes, dtypes, devices); returns ``(P, shared)``.

    These checks need no data, so they also run while ``torch.compile`` traces.
    """
    for name, t in (("h", h), ("wa", wa), ("wb", wb), ("b", b), ("v", v), ("c", c),
                    ("perms", perms)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"pair_stats: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if pairs is not None and not isinstance(pairs, torch.Tensor):
        raise TypeError(f"pair_stats: argument 'pairs' must be None or a torch.Tensor, got {type(pairs).__name__}")
    if h.dim() != 2:
        raise ValueError(f"pair_stats: argument 'h' must be 2-D [B, m], got shape {_fmt(h.shape)}")
    B, m = h.shape
    if B < 2:
        raise ValueError(f"pair_stats: argument 'h' needs a batch of at least 2 samples, got B={B}")
    if h.dtype not in _FLOAT + _HALF:
        raise TypeError(f"pair_stats: argument 'h' must be float32 or float64, got {h.dtype}")
    if h.dtype in _HALF and h.device.type != "cuda":
        raise TypeError(
            f"pair_stats: argument 'h' has dtype {h.dtype}, which is supported on CUDA only; "
            "use float32 or float64 on the CPU"
        )
    dev = h.device
    for name, t in (("wa", wa), ("wb", wb), ("b", b), ("v", v), ("c", c), ("perms", perms), ("pairs", pairs)):
        if t is not None and t.device != dev:
            raise ValueError(f"pair_stats: argument '{name}' is on {t.device} but 'h' is on {dev}; all tensors must be on one device")
    for name, t in (("wa", wa), ("wb", wb), ("b", b), ("v", v), ("c", c)):
        if t.dtype != h.dtype:
            raise TypeError(f"pair_stats: argument '{name}' must have h's dtype {h.dtype}, got {t.dtype}")

    if pairs is None:
        if m < 2:
            raise ValueError(f"pair_stats: argument 'h' needs at least 2 units (columns) when pairs is None, got m={m}")
        P = num_pairs(m)
    else:
        if pairs.dtype != torch.int64:
            raise TypeError(f"pair_stats: argument 'pairs' must be int64, got {pairs.dtype}")
        if pairs.dim() != 2 or pairs.shape[1] != 2:
            raise ValueError(f"pair_stats: argument 'pairs' must have shape [P, 2], got {_fmt(pairs.shape)}")
        P = pairs.shape[0]

    if wa.dim() not in (1, 2):
        raise ValueError(f"pair_stats: argument 'wa' must be [K] (shared critic) or [P, K] (one critic per pair), got {_fmt(wa.shape)}")
    shared = wa.dim() == 1
    K = wa.shape[-1]
    if K < 1:
        raise ValueError("pair_stats: argument 'wa' must have at least one hidden unit (K >= 1), got K=0")
    want = (K,) if shared else (P, K)
    for name, t in (("wb", wb), ("b", b), ("v", v)):
        if tuple(t.shape) != want:
            mode = "shared critic" if shared else f"one critic per pair, P={P}"
            raise ValueError(f"pair_stats: argument '{name}' must have shape {_fmt(want)} ({mode}), got {_fmt(t.shape)}")
    if not shared and wa.shape[0] != P:
        raise ValueError(f"pair_stats: argument 'wa' must have shape [P, K] = {_fmt((P, K))} (one row per pair), got {_fmt(wa.shape)}")
    want_c = () if shared else (P,)
    if tuple(c.shape) != want_c:
        raise ValueError(f"pair_stats: argument 'c' must have shape {_fmt(want_c)}, got {_fmt(c.shape)}")

    if perms.dtype != torch.int64:
        raise TypeError(f"pair_stats: argument 'perms' must be int64, got {perms.dtype}")
    if perms.dim() != 2 or perms.shape[0] < 1:
        raise ValueError(f"pair_stats: argument 'perms' must have shape [R, B] with R >= 1, got {_fmt(perms.shape)}")
    if perms.shape[1] != B:
        raise ValueError(f"pair_stats: every row of 'perms' must have length B={B}, got {_fmt(perms.shape)}")
    return P, shared


def _check_values(h, perms, pairs) -> None:
    """Data-dependent checks; skipped while compiling (the compiled kernels check them too)."""
    B, m = h.shape
    ref = torch.arange(B, device=perms.device)
    bad = (perms.sort(dim=1).values != ref).any(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"pair_stats: row {row} of 'perms' is not a permutation of 0..{B - 1}")
    if pairs is not None and pairs.numel() > 0:
        lo, hi = int(pairs.min()), int(pairs.max())
        if lo < 0 or hi >= m:
            raise ValueError(f"pair_stats: 'pairs' holds unit indices in [{lo}, {hi}], expected all in [0, {m - 1}] (m={m})")
    if not bool(torch.isfinite(h).all()):
        raise ValueError("pair_stats: argument 'h' contains NaN or infinite values")


# Looked up once at import (the dispatcher's answer cannot change afterwards, and a dict lookup
# is traceable by torch.compile where the dispatcher query is not).
_FUSED_DEVICES = {dev: _extension.has_kernel("pair_stats_fwd", dev) for dev in ("cpu", "cuda")}


def fused_available(device: torch.device | str = "cpu") -> bool:
    """True when a compiled ``pair_stats`` kernel exists for ``device``."""
    dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _FUSED_DEVICES.get(dev_type, False)


def cpu_cache_info() -> dict:
    """The CPU kernels' block cache: where their large outputs and buffers (1 MiB and up) take
    their memory.

    The per-pair critic gradients are large (four ``[P, K]`` tensors, 134 MB at m=1024, K=16), and
    the C library hands blocks that large back to the OS when they are freed, so that every call
    faulted its gradients in again (several percent of a one pass at m=1024). A
    block whose last tensor died goes back to this cache instead, and a later call of the same
    size reuses it (each tensor still gets its own storage). The cache keeps at most
    ``MMIM_EXT_CPU_CACHE_MB`` mebibytes of free blocks (read once, at the first call; default
    1024, 0 turns it off); :func:`empty_cpu_cache` releases them.

    Returns ``{"free_bytes", "free_blocks", "limit_bytes", "reused", "allocated"}``: the free
    blocks held now, the limit, and how many blocks calls so far took from the cache and from the
    system. All zero when the extension is not loaded.
    """
    keys = ("free_bytes", "free_blocks", "limit_bytes", "reused", "allocated")
    if not _extension.extension_loaded():
        return dict.fromkeys(keys, 0)
    return dict(zip(keys, torch.ops.mmim_ext.cpu_cache_info()))


def empty_cpu_cache() -> None:
    """Release the free blocks of the CPU kernels' block cache (see :func:`cpu_cache_info`)."""
    if _extension.extension_loaded():
        torch.ops.mmim_ext.empty_cpu_cache()


def pair_stats(h, wa, wb, b, v, c, perms, pairs=None, *, backend: str = "auto"):
    """Pairwise critic statistics for MINE-style estimators.

    For every pair ``p = (i, j)`` the critic ``T_p(x, y) = c_p + sum_k v_pk relu(wa_pk x + wb_pk y + b_pk)``
    is averaged over the joint samples and log-mean-exp'ed over the shuffled samples:

    * ``t_joint[p] = mean_n T_p(h[n, i], h[n, j])``
    * ``lme[p] = log mean_{r, n} exp(T_p(h[n, i], h[perms[r, n], j]))``

    ``t_joint - lme`` is the Donsker-Varadhan lower bound on ``I(h_i; h_j)`` in nats.

    Args:
        h: ``[B, m]`` activations, float32 or float64 (CUDA also float16/bfloat16 with float32
            accumulation), any strides.
        wa, wb, b, v: ``[K]`` (one critic shared by all pairs) or ``[P, K]`` (one per pair),
            in ``h``'s dtype.
        c: ``[]`` (shared) or ``[P]``.
        perms: ``[R, B]`` int64, each row a permutation of ``0..B-1``.
        pairs: ``None`` for all ``i < j`` in row-major order, or ``[P, 2]`` int64 in any order.
        backend: ``"auto"`` (fused kernel when compiled for the device, else the reference),
            ``"fused"`` (error when unavailable) or ``"reference"``.

    Returns:
        ``(t_joint, lme)``, each ``[P]`` in ``h``'s dtype, differentiable w.r.t. ``h, wa, wb, b, v, c``.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"pair_stats: argument 'backend' must be one of {_BACKENDS}, got {backend!r}")
    _validate(h, wa, wb, b, v, c, perms, pairs)
    use_fused = backend == "fused" or (backend == "auto" and fused_available(h.device))
    if use_fused and not fused_available(h.device):
        why = _extension.load_error() or f"no kernel was compiled for device type '{h.device.type}'"
        raise RuntimeError(f"pair_stats: backend='fused' is unavailable ({why})")
    if not torch.compiler.is_compiling() and h.device.type != "meta":
        _check_values(h, perms, pairs)
    if use_fused:
        return _fused_grouped(h, wa, wb, b, v, c, perms, pairs)
    return pair_stats_reference(h, wa, wb, b, v, c, perms, pairs)


def pair_stats_linear(h, wa, wb, b, v, c, perms, coef_t, coef_lme, pairs=None, *, backend: str = "auto"):
    """A fixed linear combination of the statistics, with its gradients computed in the forward.

    ``loss = sum_p coef_t[p] * t_joint[p] + coef_lme[p] * lme[p]`` for the statistics of
    :func:`pair_stats` (same arguments). The Donsker-Varadhan bounds summed over pairs are
    ``coef_t = 1, coef_lme = -1``; a penalty through frozen critics or any loss whose gradient
    w.r.t. ``(t_joint, lme)`` does not depend on their values has this form.

    Because the upstream gradients are known before the forward, the CPU kernel computes the
    statistics and the gradients of ``loss`` w.r.t. the inputs that require them in one pass over
    the samples (``mmim_ext::pair_stats_fwd_bwd``): no separate forward pass and no recompute of
    the shuffled scores in the backward, against ``pair_stats`` followed by ``backward()``. The
    gradients are kept until ``loss.backward()``, which scales them by the upstream gradient of
    ``loss``. Other devices and the reference run ``pair_stats`` and autograd; the result is the
    same up to rounding.

    Args:
        h, wa, wb, b, v, c, perms, pairs, backend: as for :func:`pair_stats`.
        coef_t, coef_lme: ``[P]`` in ``h``'s dtype and device. They may require gradients (the
            gradient of ``loss`` w.r.t. them is ``t_joint``, ``lme``).

    Returns:
        ``(loss, t_joint, lme)``: ``loss`` a 0-d tensor, differentiable once (no double backward
        through the fused path); ``t_joint`` and ``lme`` ``[P]``, without gradient.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"pair_stats_linear: argument 'backend' must be one of {_BACKENDS}, got {backend!r}")
    P, _ = _validate(h, wa, wb, b, v, c, perms, pairs)
    for name, t in (("coef_t", coef_t), ("coef_lme", coef_lme)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"pair_stats_linear: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (P,):
            raise ValueError(f"pair_stats_linear: argument '{name}' must have shape [P] = [{P}], got {_fmt(t.shape)}")
        if t.dtype != h.dtype or t.device != h.device:
            raise TypeError(
                f"pair_stats_linear: argument '{name}' must have h's dtype {h.dtype} and device {h.device}, "
                f"got {t.dtype} on {t.device}"
            )
    # The one pass: the CPU kernel, unless R needs pair_stats's grouped calls. Everything else
    # (including backend="fused" without a kernel, which pair_stats reports) goes through pair_stats.
    if not one_pass_applies(h, perms, backend):
        t_joint, lme = pair_stats(h, wa, wb, b, v, c, perms, pairs, backend=backend)
        loss = (coef_t * t_joint).sum() + (coef_lme * lme).sum()
        return loss, t_joint.detach(), lme.detach()
    if not torch.compiler.is_compiling():
        _check_values(h, perms, pairs)
    return _PairStatsLinear.apply(h, wa, wb, b, v, c, perms, pairs, coef_t, coef_lme)


class _PairStatsLinear(torch.autograd.Function):
    """pair_stats_linear's one pass: the gradients are formed in the forward and scaled in the backward.

    The first backward hands the forward's gradient buffers to autograd, scaled in place, so that
    no copy of the ``[P, K]`` gradients is made; a later backward through the same graph
    (``retain_graph=True``) computes them again from the saved inputs.
    """

    @staticmethod
    def forward(ctx, h, wa, wb, b, v, c, perms, pairs, coef_t, coef_lme, ema=None, log_a=0.0):
        # ema, log_a: MINE's moving-average rule (pair_stats_mine_loss); the gradients are then
        # those of the loss with coef_lme[p] * exp(lme[p] - log_avg[p]) in place of coef_lme[p].
        need_h = bool(ctx.needs_input_grad[0])
        need_params = any(ctx.needs_input_grad[1:6])
        ctx.ema, ctx.log_a = ema, log_a
        if need_h or need_params:
            t_joint, lme, *grads = _one_pass(coef_t, coef_lme, ema, log_a, h, wa, wb, b, v, c, perms, pairs,
                                             need_h, need_params)
        else:
            t_joint, lme = torch.ops.mmim_ext.pair_stats_fwd(h, wa, wb, b, v, c, perms, pairs)
            grads = None
        loss = (coef_t * t_joint).sum() + (coef_lme * lme).sum()
        ctx.mark_non_differentiable(t_joint, lme)
        ctx.need_h, ctx.need_params = need_h, need_params
        ctx.grads = grads
        ctx.save_for_backward(h, wa, wb, b, v, c, perms, pairs, coef_t, coef_lme, t_joint, lme)
        return loss, t_joint, lme

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_t, _grad_lme):
        h, wa, wb, b, v, c, perms, pairs, coef_t, coef_lme, t_joint, lme = ctx.saved_tensors
        need_h, need_params = ctx.need_h, ctx.need_params
        out = [None] * 6
        if need_h or need_params:
            grads, ctx.grads = ctx.grads, None
            if grads is None:  # not the first backward through this graph
                _, _, *grads = _one_pass(coef_t, coef_lme, ctx.ema, ctx.log_a, h, wa, wb, b, v, c, perms, pairs,
                                         need_h, need_params)
            unit = bool(grad_loss == 1)
            wanted = (need_h,) + (need_params,) * 5
            out = [(g if unit else g.mul_(grad_loss)) if need else None for g, need in zip(grads, wanted)]
            del grads
        gct = t_joint * grad_loss if ctx.needs_input_grad[8] else None
        gcl = lme * grad_loss if ctx.needs_input_grad[9] else None
        return (*out, None, None, gct, gcl, None, None)


def _one_pass(coef_t, coef_lme, ema, log_a, h, wa, wb, b, v, c, perms, pairs, need_h, need_params):
    if ema is None:
        return torch.ops.mmim_ext.pair_stats_fwd_bwd(coef_t, coef_lme, h, wa, wb, b, v, c, perms, pairs, need_h,
                                                     need_params)
    return torch.ops.mmim_ext.pair_stats_fwd_bwd_mine(coef_t, coef_lme, ema, log_a, h, wa, wb, b, v, c, perms, pairs,
                                                      need_h, need_params)


def one_pass_applies(h, perms, backend: str) -> bool:
    """Whether pair_stats_linear's one pass runs (the CPU kernel, R within one fused call)."""
    return (
        backend != "reference"
        and h.device.type == "cpu"
        and fused_available("cpu")
        and _rows_per_call(h.shape[0], h.shape[1], perms.shape[0], h.element_size()) >= perms.shape[0]
    )


def pair_stats_mine_loss(h, wa, wb, b, v, c, perms, pairs, coef_t, coef_lme, ema, log_a: float):
    """MINE's loss with its moving-average gradient, in the one pass (the caller checked
    :func:`one_pass_applies` and the arguments, as :func:`pair_stats_linear` does).

    ``loss = sum_p coef_t[p] t_joint[p] + coef_lme[p] lme[p]`` whose gradients are taken with
    ``coef_lme[p] * exp(lme[p] - log_avg[p])`` in place of ``coef_lme[p]``, ``log_avg[p] =
    logaddexp(ema[p, 0], log_a + lme[p]) - ema[p, 1]`` (see ``mmim_ext.estimators.bounds.mine_loss``).
    Returns ``(loss, t_joint, lme)``; the caller folds ``lme`` into its average.
    """
    if not torch.compiler.is_compiling():
        _check_values(h, perms, pairs)
    return _PairStatsLinear.apply(h, wa, wb, b, v, c, perms, pairs, coef_t, coef_lme, ema, float(log_a))


@torch.compiler.assume_constant_result  # a plain int for the tracer (thread count at trace time)
def _rows_per_call(B: int, m: int, R: int, itemsize: int) -> int:
    """Permutation rows per fused call so that its scratch stays within FUSED_SCRATCH_BYTES."""
    threads = max(1, torch.get_num_threads())
    per_row = (threads + 1) * m * B * itemsize  # staged copy + a gradient buffer per thread
    return max(1, min(R, FUSED_SCRATCH_BYTES // max(1, per_row) - 1))


def _fused_grouped(h, wa, wb, b, v, c, perms, pairs):
    R = perms.shape[0]
    if h.device.type != "cpu":
        # The grouping bounds the CPU kernel's scratch (sized from CPU threads). The CUDA kernels
        # read the shuffled samples through perms and keep no per-row scratch, and every extra
        # call would re-read the [P, K] parameters: all R rows go in one call.
        return torch.ops.mmim_ext.pair_stats_fwd(h, wa, wb, b, v, c, perms, pairs)
    rows = _rows_per_call(h.shape[0], h.shape[1], R, h.element_size())
    if rows >= R:
        return torch.ops.mmim_ext.pair_stats_fwd(h, wa, wb, b, v, c, perms, pairs)
    # lme over all R rows = log( sum_g (R_g / R) exp(lme_g) ); t_joint is the same in every group.
    t_joint, parts, logw = None, [], []
    for start in range(0, R, rows):
        group = perms[start:start + rows]
        t, l = torch.ops.mmim_ext.pair_stats_fwd(h, wa, wb, b, v, c, group, pairs)
        t_joint = t if t_joint is None else t_joint
        parts.append(l)
        logw.append(math.log(group.shape[0] / R))
    stacked = torch.stack(parts) + torch.tensor(logw, dtype=parts[0].dtype, device=parts[0].device)[:, None]
    return t_joint, torch.logsumexp(stacked, dim=0)


# ---------------------------------------------------------------------------------------------
# torch.library registrations: only when the compiled op exists.


def _setup_context(ctx, inputs, output):
    h, wa, wb, b, v, c, perms, pairs = inputs
    _, lme = output
    ctx.save_for_backward(h, wa, wb, b, v, c, perms, pairs, lme)


def _backward(ctx, grad_t, grad_lme):
    h, wa, wb, b, v, c, perms, pairs, lme = ctx.saved_tensors
    # Only the gradients autograd needs: a critic update on detached features needs no gradient
    # w.r.t. h, a penalty through frozen critics none w.r.t. the critic (the kernels skip that work).
    need_h = bool(ctx.needs_input_grad[0])
    need_params = any(ctx.needs_input_grad[1:6])
    grads = torch.ops.mmim_ext.pair_stats_bwd(
        grad_t, grad_lme, h, wa, wb, b, v, c, perms, pairs, lme, need_h, need_params
    )
    return (
        grads[0] if need_h else None,
        *(g if need_params else None for g in grads[1:]),
        None,
        None,
    )


def _fake_fwd(h, wa, wb, b, v, c, perms, pairs):
    P = num_pairs(h.shape[1]) if pairs is None else pairs.shape[0]
    return h.new_empty(P), h.new_empty(P)


def _fake_bwd(grad_t, grad_lme, h, wa, wb, b, v, c, perms, pairs, lme, need_h=True, need_params=True):
    # The kernels return contiguous gradients whatever the inputs' strides; a gradient not asked
    # for is an empty [0] tensor.
    wanted = (need_h,) + (need_params,) * 5
    return tuple(t.new_empty(t.shape if w else (0,)) for t, w in zip((h, wa, wb, b, v, c), wanted))


def _fake_fwd_bwd(grad_t, grad_lme, h, wa, wb, b, v, c, perms, pairs, need_h=True, need_params=True):
    return (*_fake_fwd(h, wa, wb, b, v, c, perms, pairs),
            *_fake_bwd(grad_t, grad_lme, h, wa, wb, b, v, c, perms, pairs, None, need_h, need_params))


if _extension.extension_loaded():
    torch.library.register_fake("mmim_ext::pair_stats_fwd")(_fake_fwd)
    torch.library.register_fake("mmim_ext::pair_stats_bwd")(_fake_bwd)
    torch.library.register_fake("mmim_ext::pair_stats_fwd_bwd")(_fake_fwd_bwd)

    @torch.library.register_fake("mmim_ext::pair_stats_fwd_bwd_mine")
    def _fake_fwd_bwd_mine(grad_t, grad_lme, ema, log_a, h, wa, wb, b, v, c, perms, pairs, need_h=True,
                           need_params=True):
        return _fake_fwd_bwd(grad_t, grad_lme, h, wa, wb, b, v, c, perms, pairs, need_h, need_params)
    torch.library.register_autograd("mmim_ext::pair_stats_fwd", _backward, setup_context=_setup_context)
    _extension.forbid_double_backward("pair_stats_bwd", "mmim_ext.pair_stats")
