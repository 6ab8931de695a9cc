"""Row-wise Gaussian-kernel log-sum-exp: the fused op behind the KDE information bounds.

For rows ``x_n`` of ``x`` ``[N, d]`` and ``y_l`` of ``y`` ``[M, d]``::

    kde_lse(x, y, scale)[n] = log sum_l exp(-scale * ||x_n - y_l||^2)

The fused kernels (``csrc/cpu/kde_kernel.cpp``; per-element math in ``csrc/kde_math.h``) stream
over ``l`` with an online maximum and sum, so memory is ``O((N + M) d)`` and no ``[N, M]`` matrix
is ever formed. The backward is its own op (``mmim_ext::kde_lse_bwd``): it recomputes the scores
and weights them by ``exp(score - out)`` (the softmax over ``l``), flash-attention style. Autograd
and fake kernels are attached here with ``torch.library``; without the extension every call goes
to :func:`kde_lse_reference`, a chunked pure-PyTorch version that is also the tests' oracle.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from mmim_ext import _extension
from mmim_ext._checks import fmt_shape as _fmt

__all__ = ["kde_lse", "kde_lse_reference", "kde_fused_available", "DEFAULT_KDE_SCRATCH_BYTES"]

#: Scratch budget of one chunk of the reference, in bytes (64 MiB).
DEFAULT_KDE_SCRATCH_BYTES = 64 * 2**20

_FLOAT = (torch.float32, torch.float64)
_BACKENDS = ("auto", "fused", "reference")



def _validate(x, y, scale) -> None:
    """Static checks (no data access), also valid while ``torch.compile`` traces."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"kde_lse: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"kde_lse: argument '{name}' must be 2-D [rows, d], got shape {_fmt(t.shape)}")
        if t.dtype not in _FLOAT:
            raise TypeError(f"kde_lse: argument '{name}' must be float32 or float64, got {t.dtype}")
    if y.dtype != x.dtype:
        raise TypeError(f"kde_lse: argument 'y' must have x's dtype {x.dtype}, got {y.dtype}")
    if y.device != x.device:
        raise ValueError(f"kde_lse: argument 'y' is on {y.device} but 'x' is on {x.device}; both must be on one device")
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"kde_lse: arguments 'x' {_fmt(x.shape)} and 'y' {_fmt(y.shape)} must have the same number of columns d"
        )
    if y.shape[0] < 1:
        raise ValueError("kde_lse: argument 'y' needs at least one row (the log-sum-exp over no terms is -inf)")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"kde_lse: argument 'scale' must be a Python float, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"kde_lse: argument 'scale' must be finite and >= 0, got {scale}")


def _check_values(x, y) -> None:
    for name, t in (("x", x), ("y", y)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"kde_lse: argument '{name}' contains NaN or infinite values")


def kde_fused_available(device: torch.device | str = "cpu") -> bool:
    """True when a compiled ``kde_lse`` kernel exists for ``device``."""
    dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _FUSED_DEVICES.get(dev_type, False)


def _lse_rows(xc: torch.Tensor, y: torch.Tensor, scale: float, col_chunk: int) -> torch.Tensor:
    """``log sum_l exp(-scale ||xc_n - y_l||^2)`` for a block of rows, merging column blocks."""
    acc = None
    for yc in y.split(col_chunk):
        # Differences, not the ||x||^2 + ||y||^2 - 2 x.y expansion: that one cancels badly for
        # nearby points, which are exactly the ones that dominate the sum.
        d2 = (xc.unsqueeze(1) - yc.unsqueeze(0)).pow(2).sum(-1)  # [rows, cols]
        part = torch.logsumexp(d2.mul(-scale), dim=1)
        acc = part if acc is None else torch.logaddexp(acc, part)
    return acc


def kde_lse_reference(
    x: torch.Tensor, y: torch.Tensor, scale: float, *, max_scratch_bytes: int = DEFAULT_KDE_SCRATCH_BYTES
) -> torch.Tensor:
    """Pure-PyTorch ``kde_lse``: same contract as :func:`kde_lse`, inputs assumed valid.

    Works on blocks of rows and columns whose ``[rows, cols, d]`` difference tensor stays under
    ``max_scratch_bytes``; with gradients each row block is checkpointed so that the saved
    tensors obey the same budget during the backward pass.
    """
    N, d = x.shape
    M = y.shape[0]
    if N == 0:
        # Empty, but on the graph: a loss built from it back-propagates zeros (as the fused op).
        return x.reshape(-1)[:0] + y.reshape(-1)[:0]
    per_pair = 3 * max(d, 1) * x.element_size()  # differences, squares, and slack
    pairs = max(1, int(max_scratch_bytes // per_pair))
    col_chunk = max(1, min(M, pairs))
    row_chunk = max(1, min(N, pairs // col_chunk))
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    parts = []
    for xc in x.split(row_chunk):
        if needs_grad and N > row_chunk:
            parts.append(checkpoint(_lse_rows, xc, y, scale, col_chunk, use_reentrant=False))
        else:
            parts.append(_lse_rows(xc, y, scale, col_chunk))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def kde_lse(x: torch.Tensor, y: torch.Tensor, scale: float, *, backend: str = "auto") -> torch.Tensor:
    """Row-wise Gaussian-kernel log-sum-exp, ``out[n] = log sum_l exp(-scale ||x_n - y_l||^2)``.

    Args:
        x: ``[N, d]`` float32 or float64, any strides.
        y: ``[M, d]`` (``M >= 1``) in ``x``'s dtype and on its device. ``y`` may be ``x`` itself.
        scale: Python float ``>= 0``; ``1 / (2 sigma^2)`` gives a Gaussian kernel of variance
            ``sigma^2`` (squared distances are in the units of ``x`` squared).
        backend: ``"auto"`` (fused kernel when compiled for the device, else the reference),
            ``"fused"`` (error when unavailable) or ``"reference"``.

    Returns:
        ``[N]`` in ``x``'s dtype (natural log), differentiable w.r.t. ``x`` and ``y``.
        Memory is ``O((N + M) d)`` on the fused path.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"kde_lse: argument 'backend' must be one of {_BACKENDS}, got {backend!r}")
    _validate(x, y, scale)
    scale = float(scale)
    if not torch.compiler.is_compiling() and x.device.type != "meta":
        _check_values(x, y)
    use_fused = backend == "fused" or (backend == "auto" and kde_fused_available(x.device))
    if use_fused:
        if not kde_fused_available(x.device):
            why = _extension.load_error() or f"no kernel was compiled for device type '{x.device.type}'"
            raise RuntimeError(f"kde_lse: backend='fused' is unavailable ({why})")
        return torch.ops.mmim_ext.kde_lse(x, y, scale)
    return kde_lse_reference(x, y, scale)


# ---------------------------------------------------------------------------------------------
# torch.library registrations: only when the compiled op exists.


def _setup_context(ctx, inputs, output):
    x, y, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(x, y, output)


def _backward(ctx, grad_out):
    x, y, out = ctx.saved_tensors
    gx, gy = torch.ops.mmim_ext.kde_lse_bwd(grad_out, x, y, ctx.scale, out)
    return gx, gy, None


def _fake_fwd(x, y, scale):
    torch._check(x.dim() == 2 and y.dim() == 2, lambda: "kde_lse: x and y must be 2-D")
    torch._check(x.shape[1] == y.shape[1], lambda: "kde_lse: x and y must have the same number of columns")
    return x.new_empty(x.shape[0])


def _fake_bwd(grad_out, x, y, scale, out):
    # The kernels return contiguous gradients whatever the inputs' strides.
    return x.new_empty(x.shape), y.new_empty(y.shape)


def _register() -> bool:
    if not _extension.extension_loaded():
        return False
    try:
        torch.ops.mmim_ext.kde_lse  # noqa: B018  (raises when this build predates the op)
    except (AttributeError, RuntimeError):
        return False
    torch.library.register_fake("mmim_ext::kde_lse")(_fake_fwd)
    torch.library.register_fake("mmim_ext::kde_lse_bwd")(_fake_bwd)
    torch.library.register_autograd("mmim_ext::kde_lse", _backward, setup_context=_setup_context)
    _extension.forbid_double_backward("kde_lse_bwd", "mmim_ext.kde_lse")
    return True


_registered = _register()
# Looked up once at import: the dispatcher's answer cannot change afterwards, and a dict lookup is
# traceable by torch.compile where the dispatcher query is not. An extension built before this op
# existed loads fine but has no kde_lse schema (_registered is then False).
_FUSED_DEVICES = {dev: _registered and _extension.has_kernel("kde_lse", dev) for dev in ("cpu", "cuda")}
