"""The compiled pair_stats ops' contract on every device, called directly (no Python wrapper).

* Every output has its own storage (``torch.library``'s rule; ``opcheck``'s ``test_schema`` reports
  "Outputs 0 and 1 alias unexpectedly" otherwise), in the cases where gradients are easiest to
  hand out as views of one buffer: a shared critic, and one critic per pair with P = 1.
* A direct call validates what the Python wrapper would: permutation rows, pair indices, finite
  ``h``, with the CPU kernel's messages on every device.
* Parameters and ``h`` with any strides give the same bits as contiguous copies (the CUDA kernels
  read parameters in place through their row strides).

The CPU cases run everywhere the extension is built; the CUDA cases where a GPU exists.
"""

import pytest
import torch

import mmim_ext

from conftest import DEVICES, make_inputs, requires_fused

pytestmark = requires_fused

OPS = ("bwd", "fwd_bwd", "fwd_bwd_mine")


def _need_device(device):
    if device == "cuda" and not mmim_ext.fused_available("cuda"):
        pytest.skip("mmim_ext was built without CUDA kernels")


def _args_of(op, inputs, need=(True, True), gseed=0):
    """``(op overload, arguments)`` of a direct call of mmim_ext::pair_stats_<op> on `inputs`
    (make_inputs' 8 tensors), with upstream gradients drawn from `gseed`."""
    h, wa, wb, b, v, c, perms, pairs = inputs
    if op == "fwd":
        return torch.ops.mmim_ext.pair_stats_fwd.default, (h, wa, wb, b, v, c, perms, pairs)
    P = c.numel() if c.dim() == 1 else (h.shape[1] * (h.shape[1] - 1) // 2 if pairs is None else pairs.shape[0])
    g = torch.Generator().manual_seed(gseed)
    gt, gl = (torch.randn(P, generator=g, dtype=torch.float64).to(h) for _ in range(2))
    if op == "bwd":
        _, lme = torch.ops.mmim_ext.pair_stats_fwd(h, wa, wb, b, v, c, perms, pairs)
        return torch.ops.mmim_ext.pair_stats_bwd.default, (gt, gl, h, wa, wb, b, v, c, perms, pairs, lme, *need)
    if op == "fwd_bwd":
        return torch.ops.mmim_ext.pair_stats_fwd_bwd.default, (gt, gl, h, wa, wb, b, v, c, perms, pairs, *need)
    ema = torch.stack([torch.full((P,), 0.3), torch.zeros(P)], 1).to(h)
    return (torch.ops.mmim_ext.pair_stats_fwd_bwd_mine.default,
            (gt, gl, ema, -2.3, h, wa, wb, b, v, c, perms, pairs, *need))


def _call(op, inputs, need=(True, True)):
    fn, args = _args_of(op, inputs, need)
    return fn(*args)


# (m, shared, pairs): a shared critic, one critic per pair with P = 1 (all pairs of m = 2, and one
# explicit pair), and a per-pair critic with several pairs.
ALIAS_CASES = [
    pytest.param(5, True, None, id="shared"),
    pytest.param(2, False, None, id="per_pair_P1"),
    pytest.param(4, False, torch.tensor([[3, 1]]), id="per_pair_explicit_P1"),
    pytest.param(4, False, None, id="per_pair_P6"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m,shared,pairs", ALIAS_CASES)
@pytest.mark.parametrize("op", OPS)
def test_outputs_have_their_own_storage(op, m, shared, pairs, dtype, device):
    _need_device(device)
    inputs = make_inputs(6, m, 3, 2, shared=shared, pairs=pairs, dtype=dtype, device=device, seed=m)
    for need in ((True, True), (False, True), (True, False)):
        out = _call(op, inputs, need)
        storages = [t.untyped_storage().data_ptr() for t in out if t.numel() > 0]
        assert len(set(storages)) == len(storages), f"{op} {need}: outputs share storage"
        owned = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
        assert not owned & set(storages), f"{op} {need}: an output is an input's storage"
        fn, args = _args_of(op, inputs, need)
        torch.library.opcheck(fn, args, test_utils=("test_schema", "test_faketensor"))


# kind: (input, index, value, the error it must raise); B = 8 samples, m = 5 units, explicit pairs
# for the pairs kinds. REPEAT: row 1 of perms takes its neighbour's value (in range, but twice).
REPEAT = object()
BAD_VALUES = {
    "perms_repeat": ("perms", (1, 0), REPEAT, r"row 1 of 'perms' is not a permutation of 0\.\.7"),
    "perms_too_big": ("perms", (2, 5), 8, r"row 2 of 'perms' is not a permutation"),
    "perms_negative": ("perms", (0, 3), -1, r"row 0 of 'perms' is not a permutation"),
    "pairs_too_big": ("pairs", (1, 0), 5, r"'pairs' holds unit index 5, expected all in \[0, 4\]"),
    "pairs_negative": ("pairs", (2, 1), -3, r"'pairs' holds unit index -3, expected all in \[0, 4\]"),
    "h_nan": ("h", (3, 2), float("nan"), "'h' contains NaN or infinite values"),
    "h_inf": ("h", (0, 4), -float("inf"), "'h' contains NaN or infinite values"),
}


def _bad_inputs(kind, device):
    name, index, value, match = BAD_VALUES[kind]
    pairs = torch.tensor([[0, 4], [2, 1], [3, 3]]) if name == "pairs" else None
    inputs = make_inputs(8, 5, 3, 3, shared=False, pairs=pairs, device=device, seed=4)
    t = inputs[("h", "wa", "wb", "b", "v", "c", "perms", "pairs").index(name)]
    t[index] = t[index[0], index[1] + 1] if value is REPEAT else value
    return inputs, match


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(BAD_VALUES))
@pytest.mark.parametrize("op", ("fwd",) + OPS)
def test_direct_calls_validate_values(op, kind, device):
    _need_device(device)
    inputs, match = _bad_inputs(kind, device)
    if op == "bwd":
        # the backward's lme from good inputs: only the backward's own check can fail
        h, wa, wb, b, v, c, perms, pairs = inputs
        good_h = torch.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0)
        good_perms = torch.stack([torch.randperm(h.shape[0]) for _ in range(perms.shape[0])]).to(device)
        good_pairs = None if pairs is None else pairs.clamp(0, h.shape[1] - 1)
        _, lme = torch.ops.mmim_ext.pair_stats_fwd(good_h, wa, wb, b, v, c, good_perms, good_pairs)
        P = lme.shape[0]
        ones = torch.ones(P, dtype=h.dtype, device=device)
        with pytest.raises(RuntimeError, match=match):
            torch.ops.mmim_ext.pair_stats_bwd(ones, ones, *inputs, lme)
        return
    with pytest.raises(RuntimeError, match=match):
        _call(op, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["wider_rows", "transposed", "every_other_column", "expanded_rows"])
def test_strided_inputs_give_the_same_bits(layout, dtype, device):
    _need_device(device)
    B, m, K, R = 37, 6, 5, 3
    P = m * (m - 1) // 2
    h, wa, wb, b, v, c, perms, _ = make_inputs(B, m, K, R, shared=False, dtype=dtype, device=device, seed=11)
    g = torch.Generator().manual_seed(2)

    def view_of(t):
        """A view with t's values in the layout under test."""
        if layout == "wider_rows":  # row stride 2K, unit stride along K
            big = torch.randn(P, 2 * K, generator=g, dtype=torch.float64).to(t)
            big[:, 1:K + 1] = t
            return big[:, 1:K + 1]
        if layout == "transposed":  # stride (1, P)
            return t.t().contiguous().t()
        if layout == "every_other_column":  # stride along K of 2
            big = torch.randn(P, 2 * K, generator=g, dtype=torch.float64).to(t)
            big[:, ::2] = t
            return big[:, ::2]
        return t[0].expand(P, K)  # row stride 0: every pair has row 0's critic

    params = [view_of(t) for t in (wa, wb, b, v)]
    if layout == "expanded_rows":
        c_view = c[:1].expand(P)
    else:
        c_big = torch.randn(2 * P, generator=g, dtype=torch.float64).to(c)
        c_big[::2] = c
        c_view = c_big[::2]
    h_view = h.t().contiguous().t()  # column-major h
    strided = (h_view, *params, c_view, perms, None)
    dense = tuple(t.contiguous() if t is not None else None for t in strided)
    assert not params[0].is_contiguous() and not c_view.is_contiguous()
    for op in ("fwd",) + OPS:
        got, want = _call(op, strided), _call(op, dense)
        for k, (x, y) in enumerate(zip(got, want)):
            assert x.is_contiguous() and x.shape == y.shape, (op, k)
            assert torch.equal(x, y), f"{op}: output {k} differs between strided and contiguous inputs"
