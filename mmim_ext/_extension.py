"""Loading of the compiled extension ``mmim_ext._C``.

Importing ``_C`` runs the ``TORCH_LIBRARY`` registrations of the C++/CUDA kernels. When it is
missing (no compiler at install time, or ``MMIM_EXT_DISABLE=1``) every op falls back to its
pure-PyTorch reference and one warning says so.
"""

from __future__ import annotations

import os
import warnings

import torch

__all__ = ["extension_loaded", "forbid_double_backward", "has_kernel", "load_error"]

_loaded = False
_error: str | None = None

if os.environ.get("MMIM_EXT_DISABLE", "0") not in ("", "0"):
    _error = "disabled by MMIM_EXT_DISABLE=1"
    warnings.warn(
        "mmim_ext: the compiled extension is disabled (MMIM_EXT_DISABLE=1); falling back to the "
        "pure-PyTorch reference ops.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    try:
        from mmim_ext import _C  # noqa: F401  (the import registers the ops)

        _loaded = True
    except ImportError as exc:  # pragma: no cover - exercised only on broken installs
        _error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "mmim_ext: the compiled extension could not be loaded "
            f"({_error}); falling back to the pure-PyTorch reference ops.",
            RuntimeWarning,
            stacklevel=2,
        )


def extension_loaded() -> bool:
    """True when the compiled extension ``mmim_ext._C`` is loaded."""
    return _loaded


def load_error() -> str | None:
    """Why the extension is not loaded (``None`` when it is)."""
    return _error


def forbid_double_backward(bwd_op: str, public_name: str) -> None:
    """Give the compiled backward op ``mmim_ext::<bwd_op>`` an autograd formula that raises: the
    fused backward kernels have no derivative of their own, so a second derivative through them
    (``create_graph=True``) stops with a NotImplementedError naming `public_name` and the
    pure-PyTorch reference, which has one."""

    def _raise(ctx, *grads):
        raise NotImplementedError(
            f"{public_name}: double backward (create_graph=True through the fused kernel) is not "
            "supported; use backend='reference' for higher-order gradients"
        )

    def _no_context(ctx, inputs, output):
        pass

    torch.library.register_autograd(f"mmim_ext::{bwd_op}", _raise, setup_context=_no_context)


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def has_kernel(op: str, device: torch.device | str) -> bool:
    """True when ``mmim_ext::<op>`` has a compiled kernel for ``device``'s type."""
    if not _loaded:
        return False
    key = _DISPATCH_KEYS.get(torch.device(device).type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mmim_ext::{op}", key)
