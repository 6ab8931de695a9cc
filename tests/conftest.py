import pytest
import torch

import mmim_ext


def _devices():
    devs = ["cpu"]
    devs.append(pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")))
    return devs


DEVICES = _devices()

requires_fused = pytest.mark.skipif(not mmim_ext.fused_available("cpu"), reason="compiled extension not built")


def make_inputs(B, m, K, R, *, shared, dtype=torch.float64, device="cpu", pairs=None, scale=1.0,
                seed=0, requires_grad=False):
    """Random pair_stats inputs; `scale` multiplies the critic's output weights (large logits)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, m, generator=g, dtype=torch.float64)
    P = m * (m - 1) // 2 if pairs is None else pairs.shape[0]
    shape = (K,) if shared else (P, K)
    wa, wb, b = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    v = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    c = torch.randn(() if shared else (P,), generator=g, dtype=torch.float64)
    perms = torch.stack([torch.randperm(B, generator=g) for _ in range(R)])
    out = [t.to(device=device, dtype=dtype) for t in (h, wa, wb, b, v, c)]
    if requires_grad:
        for t in out:
            t.requires_grad_(True)
    return (*out, perms.to(device), None if pairs is None else pairs.to(device))
