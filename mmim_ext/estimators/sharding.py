"""Pair sharding of the per-pair and per-unit critics over ``torch.distributed``.

With ``process_group=group`` an estimator module (:class:`~mmim_ext.PairwiseMINE`,
:class:`~mmim_ext.UnitLabelMINE`) or :class:`~mmim_ext.MMIMRegularizer` keeps only one contiguous
block of its ``total`` items (pairs, or units for ``I(Y; h_i)``), balanced by count
(:func:`shard_range`), with their critics, moving averages and optimizer state. The arithmetic
per item is the single-process arithmetic on the global batch:

* **Batch.** Each rank passes its own part of the data-parallel batch; :func:`gather_batch`
  all-gathers it in rank order (local sizes may differ: they are exchanged first and the parts
  padded to the largest), through ``torch.distributed.nn.functional.all_gather`` when the
  features require grad, so that the backward sums every rank's gradient w.r.t. the global batch
  into each rank's own rows. Widths, dtypes and the presence of labels are exchanged and compared
  before any data moves: a mismatch raises the same ``ValueError`` on every rank instead of a
  hang. A module built with ``gather_batch=False`` takes an already global batch (the same on
  every rank, checked by a checksum), e.g. a regularizer that gathered once for all its terms.
* **Reductions.** A penalty is the all-reduced sum of the ranks' partial sums
  (:func:`reduce_sum`); its gradient is the rank's own partial one, which the all-gather's
  backward sums over ranks, so each rank's features receive exactly the single-process gradient.
  Communication per step: one all-gather of the ``B x m`` features (plus its backward), a few
  scalars; never a per-pair vector. :meth:`Shard.gather` (per-pair vectors, ``[m, m]`` matrices)
  is for evaluation and reporting.
* **Randomness.** Negatives and pair subsets must be identical on every rank: the module's own
  ``torch.Generator`` is set to rank 0's state at construction (:func:`broadcast_generator_`)
  and is advanced by the same calls with the same global batch size on every rank.
* **Checkpoints.** :func:`sharded_state_dict` saves a rank's block with its position and the
  world size; :func:`load_sharded_state_dict` restores on any world size by cutting the new block
  out of the saved blocks by item index (with the optimizer state).

Every collective here runs on the given group; its timeout is the group's
(``init_process_group(timeout=...)``), which bounds how long a rank waits for a peer that died.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Shard", "broadcast_generator_", "gather_batch", "load_sharded_state_dict", "reduce_sum",
           "shard_range", "sharded_state_dict"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def shard_range(total: int, world: int, rank: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s contiguous block of ``total`` items over ``world`` ranks;
    block sizes differ by at most one (the first ``total % world`` ranks hold one more)."""
    base, extra = divmod(total, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def _check_group(owner: str, group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{owner}: argument 'process_group' needs torch.distributed initialized "
                           f"(torch.distributed.init_process_group) before the module is built")
    if group is dist.group.WORLD:
        return group
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{owner}: argument 'process_group' must be None or a torch.distributed "
                        f"ProcessGroup (e.g. torch.distributed.group.WORLD), got {type(group).__name__}")
    return group


def _device_for(group, like: torch.Tensor | None = None) -> torch.device:
    """Where the group's collectives take their tensors (NCCL: the current CUDA device)."""
    if like is not None:
        return like.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_rows(group, t: torch.Tensor) -> torch.Tensor:
    """``[world, *t.shape]``: ``t`` of every rank (equal shapes), without gradient."""
    world = dist.get_world_size(group)
    t = t.contiguous().reshape(-1, *t.shape[1:]) if t.dim() else t.reshape(1)
    out = t.new_empty((world * t.shape[0], *t.shape[1:]))
    # all_gather_single is this torch's name for all_gather_into_tensor (deprecated here).
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, t, group=group)
    return out.view(world, *t.shape)


def _autograd_all_gather(group, t: torch.Tensor):
    # The autograd all-gather of torch.distributed.nn (its backward sums every rank's gradient of
    # this rank's rows: reduce-scatter on nccl, all-to-all on gloo). This torch marks it
    # deprecated in favour of the functional collectives; the warning is silenced here only.
    import torch.distributed.nn.functional as dnn

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        return dnn.all_gather(t, group=group)


def gather_batch(owner: str, group, h: torch.Tensor, labels: torch.Tensor | None = None, *,
                 width: int | None = None, replicated: bool = False, name: str = "h"):
    """The global batch: ``(h_global [sum_r B_r, m], labels_global or None)``, the ranks' parts
    in rank order; differentiable w.r.t. ``h`` (the backward hands each rank the summed gradient
    of its own rows).

    Every rank first shares ``(B, m, dtype, labels present, checksum)`` and all compare them, so
    a rank with another width (or ``width`` given and not matched), dtype or labels argument
    makes every rank raise the same ``ValueError``. With ``replicated=True`` every rank must pass
    the same global batch: nothing is gathered and the batches' sizes and checksums must agree.
    """
    if not isinstance(h, torch.Tensor) or h.dim() != 2 or not h.is_floating_point():
        # Still take part in the exchange, so the peers fail with the message instead of waiting.
        bad = torch.full((6,), -1.0, dtype=torch.float64, device=_device_for(group, None))
        _all_gather_rows(group, bad)
        raise TypeError(f"{owner}: argument '{name}' must be a 2-D floating-point tensor [B, m], got "
                        f"{type(h).__name__ if not isinstance(h, torch.Tensor) else f'{h.dtype} {list(h.shape)}'}")
    has_labels = labels is not None
    if replicated:
        check = float(h.detach().double().sum()) + (float(labels.double().sum()) if has_labels else 0.0)
    else:
        check = 0.0
    lab_len = labels.shape[0] if isinstance(labels, torch.Tensor) and labels.dim() == 1 else -2
    meta = torch.tensor([h.shape[0], h.shape[1], _DTYPES.index(h.dtype) if h.dtype in _DTYPES else -1,
                         float(has_labels), check, lab_len if has_labels else -3],
                        dtype=torch.float64, device=h.device)
    table = _all_gather_rows(group, meta).cpu()
    rank = dist.get_rank(group)
    problems = []
    if bool((table[:, 0] < 0).any()):
        problems.append(f"ranks {_ranks(table[:, 0] < 0)} did not pass a 2-D floating-point tensor")
    else:
        widths = table[:, 1].long().tolist()
        if len(set(widths)) > 1 or (width is not None and widths[0] != width):
            want = f"{width}" if width is not None else "the same number of"
            problems.append(f"every rank must pass {want} columns (units); widths by rank: {widths}")
        if len(set(table[:, 2].tolist())) > 1:
            problems.append(f"every rank must pass the same dtype; dtypes by rank: "
                            f"{[str(_DTYPES[int(c)]) if c >= 0 else '?' for c in table[:, 2].tolist()]}")
        if len(set(table[:, 3].tolist())) > 1:
            problems.append(f"either every rank or none passes labels; labels passed by rank: "
                            f"{[bool(x) for x in table[:, 3].tolist()]}")
        elif has_labels and bool((table[:, 5] != table[:, 0]).any()):
            problems.append(f"labels must be [B] int64 with one label per row of '{name}'; "
                            f"(rows, labels) by rank: {list(zip(table[:, 0].long().tolist(), table[:, 5].long().tolist()))}")
        if replicated:
            sizes = table[:, 0].long().tolist()
            sums = table[:, 4]
            tol = 1e-6 * (sums.abs().max() + 1.0)
            if len(set(sizes)) > 1 or float((sums - sums[0]).abs().max()) > float(tol):
                problems.append(f"with gather_batch=False every rank must pass the same global batch; rows by "
                                f"rank: {sizes}, checksums by rank: {[round(x, 6) for x in sums.tolist()]}")
    if problems:
        raise ValueError(f"{owner}: argument '{name}' differs between the ranks of the process group (this is "
                         f"rank {rank}): " + "; ".join(problems))
    if replicated:
        return h, labels
    sizes = table[:, 0].long().tolist()
    if sum(sizes) < 2:
        raise ValueError(f"{owner}: argument '{name}': the global batch needs at least 2 samples, got "
                         f"rows by rank {sizes}")
    most = max(sizes)
    pad = most - h.shape[0]
    hp = torch.nn.functional.pad(h, (0, 0, 0, pad)) if pad else h
    if h.requires_grad and torch.is_grad_enabled():
        parts = _autograd_all_gather(group, hp)
    else:
        parts = _all_gather_rows(group, hp.detach()).unbind(0)
    h_global = torch.cat([p[:n] for p, n in zip(parts, sizes)], 0)
    labels_global = None
    if has_labels:
        lp = torch.nn.functional.pad(labels, (0, pad)) if pad else labels
        lparts = _all_gather_rows(group, lp)
        labels_global = torch.cat([p[:n] for p, n in zip(lparts, sizes)], 0)
    return h_global, labels_global


def _ranks(mask: torch.Tensor) -> list[int]:
    return [i for i, x in enumerate(mask.tolist()) if x]


def reduce_sum(group, value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of the 0-d ``value``, whose gradient is the rank's own ``value``'s
    (the peers' terms enter as constants: their gradients reach the shared inputs through the
    all-gather's backward on their ranks)."""
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return value + (total - value.detach())


def broadcast_generator_(group, generator: torch.Generator) -> torch.Generator:
    """Set ``generator`` (CPU) to rank 0's state on every rank of the group; returns it."""
    state = generator.get_state()
    dev = _device_for(group)
    buf = state.to(dev)
    dist.broadcast(buf, src=dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0, group=group)
    generator.set_state(buf.cpu())
    return generator


class Shard:
    """One rank's block ``[lo, hi)`` of a module's ``total`` items and the module's tensors that
    are cut along the item dimension.

    Attributes: ``group``, ``world``, ``rank``, ``total``, ``lo``, ``hi``, ``gather_batch``
    (whether the module gathers the batch itself), ``dims`` (``{state_dict name: item dim}`` of
    the module's sharded tensors, names relative to the module).
    """

    def __init__(self, owner: str, group, total: int, *, gather_batch: bool = True, what: str = "pairs"):
        self.owner = owner
        self.group = _check_group(owner, group)
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if total < self.world:
            raise ValueError(f"{owner}: {total} {what} cannot be split over the {self.world} ranks of "
                             f"'process_group' (every rank must own at least one)")
        self.total = int(total)
        self.lo, self.hi = shard_range(self.total, self.world, self.rank)
        self.gather_batch = bool(gather_batch)
        self.what = what
        self.dims: dict[str, int] = {}

    @property
    def size(self) -> int:
        return self.hi - self.lo

    def __deepcopy__(self, memo):
        return self  # a process group cannot be copied; a copied module shares the rank's block

    def __repr__(self) -> str:
        return f"Shard(rank={self.rank}/{self.world}, items=[{self.lo}, {self.hi}) of {self.total})"

    def cut_(self, module: nn.Module, dims: dict[str, int]) -> None:
        """Replace each named parameter or buffer of ``module`` (``{name: dim}``, names as in its
        ``state_dict``, a full-size ``total`` along ``dim``) by this rank's block (a copy)."""
        for name, dim in dims.items():
            prefix, _, leaf = name.rpartition(".")
            owner = module.get_submodule(prefix) if prefix else module
            t = getattr(owner, leaf)
            dim = dim % t.dim()
            if t.shape[dim] != self.total:
                raise RuntimeError(f"{self.owner}: tensor {name!r} has {t.shape[dim]} along dim {dim}, "
                                   f"expected {self.total}")
            block = t.detach().narrow(dim, self.lo, self.size).clone()
            if isinstance(t, nn.Parameter):
                owner._parameters[leaf] = nn.Parameter(block, requires_grad=t.requires_grad)
            else:
                owner._buffers[leaf] = block
            self.dims[name] = dim

    def batch(self, h: torch.Tensor, labels: torch.Tensor | None, *, width: int | None, name: str = "h",
              method: str = "forward"):
        """:func:`gather_batch` on this module's group (or the checks alone with ``gather_batch=False``)."""
        return gather_batch(f"{self.owner}.{method}", self.group, h, labels, width=width,
                            replicated=not self.gather_batch, name=name)

    def local_index(self, method: str, index: torch.Tensor | None):
        """Positions within this rank's block of the global item indices ``index`` ([S] int64;
        ``None``: every item), in the order given; may be empty."""
        if index is None:
            return None
        if not isinstance(index, torch.Tensor) or index.dtype != torch.int64 or index.dim() != 1:
            raise ValueError(f"{self.owner}.{method}: argument 'pair_index' must be a 1-D int64 tensor")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.total):
            raise ValueError(f"{self.owner}.{method}: argument 'pair_index' must hold values in "
                             f"[0, {self.total - 1}]")
        mine = (index >= self.lo) & (index < self.hi)
        return index[mine] - self.lo

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's block of a per-item tensor (item dim 0), concatenated: ``[total, ...]``."""
        most = shard_range(self.total, self.world, 0)[1]
        pad = most - local.shape[0]
        lp = torch.cat([local, local.new_zeros((pad, *local.shape[1:]))]) if pad else local
        parts = _all_gather_rows(self.group, lp)
        return torch.cat([parts[r, : shard_range(self.total, self.world, r)[1] - shard_range(self.total, self.world, r)[0]]
                          for r in range(self.world)], 0)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on some rank (collective): for decisions every rank must take
        together, such as stopping a training loop whose evaluation is itself collective."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """:func:`reduce_sum` on this module's group."""
        return reduce_sum(self.group, value)

    def run(self, method, h, labels=None, pair_index=None, *, out: str, width: int | None, **kw):
        """Call the module's entry point ``method`` (bound) on the global batch and this rank's
        part of ``pair_index``; ``out`` says how the result leaves the rank:

        ``"local"``    the result as it is, e.g. ``(local estimates, local loss)``: the rank's
                       own critics' loss, nothing reduced (each rank steps its own critics);
        ``"penalty"``  ``(local estimates, value)`` with ``value`` summed over ranks
                       (:func:`reduce_sum`);
        ``"gather"``   the per-item result of every rank, ``[total]``.

        The entry point sees ``self.inside`` set and runs its single-process code on the block.
        """
        name = method.__name__
        h, labels = self.batch(h, labels, width=width, method=name)
        if self.what == "units":  # a per-unit module sees its own columns (units are independent)
            h = h[:, self.lo:self.hi]
        if pair_index is not None:
            pair_index = self.local_index(name, pair_index)
        args = (h, labels) if pair_index is None else (h, labels, pair_index)
        module = method.__self__
        if pair_index is not None and pair_index.numel() == 0:
            # None of the selected items lives here: an empty result that still takes part in
            # the reductions and keeps the gathered batch in the graph (its backward is a
            # collective every rank must join).
            est = h.new_zeros((0,))
            if getattr(module, "generator", None) is not None and hasattr(module, "_groups"):
                # Draw the negatives the call would have drawn, so that this rank's generator
                # stays in step with the ranks that own selected pairs.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    module._groups(h, labels, f"{self.owner}.{name}")
            if out == "local":
                return est, sum(p.sum() * 0 for p in module.parameters())
            return est, self.sum(h.sum() * 0)
        self.inside = True
        try:
            result = method(*args, **kw)
        finally:
            self.inside = False
        if out == "local":
            return result
        if out == "penalty":
            est, value = result
            return est, self.sum(value)
        return self.gather(result)

    inside = False

    def meta(self) -> dict:
        return {"world_size": self.world, "rank": self.rank, "total": self.total, "lo": self.lo, "hi": self.hi,
                "dims": dict(self.dims)}


def _shards(module: nn.Module) -> dict[str, Shard]:
    return {prefix: m.shard for prefix, m in module.named_modules() if isinstance(getattr(m, "shard", None), Shard)}


def sharded_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """This rank's checkpoint of a module with sharded parts: ``{"module": state_dict,
    "optimizer": state_dict or None, "shards": {module prefix: {world_size, rank, total, lo, hi,
    dims}}}``. Save one per rank (``torch.save``); :func:`load_sharded_state_dict` restores them on
    any world size."""
    return {"module": module.state_dict(), "optimizer": None if optimizer is None else optimizer.state_dict(),
            "shards": {p: s.meta() for p, s in _shards(module).items()}}


def _cut(name: str, dim: int, lo: int, hi: int, pieces) -> torch.Tensor:
    """Items ``[lo, hi)`` along ``dim`` from ``pieces`` = [(saved lo, saved hi, tensor)]."""
    parts = []
    for slo, shi, t in sorted(pieces, key=lambda x: x[0]):
        a, b = max(lo, slo), min(hi, shi)
        if a < b:
            parts.append(t.narrow(dim, a - slo, b - a))
    got = sum(p.shape[dim] for p in parts)
    if got != hi - lo:
        raise ValueError(f"load_sharded_state_dict: the checkpoints cover {got} of the items [{lo}, {hi}) "
                         f"that tensor {name!r} needs on this rank; pass every rank's checkpoint")
    return torch.cat(parts, dim)


def load_sharded_state_dict(module: nn.Module, checkpoints, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Restore ``module`` (and ``optimizer``) from checkpoints written by :func:`sharded_state_dict`
    on any number of ranks: the blocks are cut by item index to this rank's block, so a run saved
    on 4 ranks restores on 2, 3 or 1 (a module without ``process_group``). ``checkpoints``: the
    list of saved dicts (all ranks', or at least those covering this rank's block); the
    unsharded tensors and random states are taken from the first. An optimizer state kept in a
    module's extra state (:class:`mmim_ext.MMIMRegularizer`'s ``critic_optimizer``) is cut the
    same way as ``optimizer``'s.
    """
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("load_sharded_state_dict: argument 'checkpoints' is empty")
    saved_meta = [c.get("shards", {}) for c in checkpoints]
    here = _shards(module)
    names = set()
    for meta in saved_meta:
        for prefix, m in meta.items():
            names |= {(f"{prefix}.{n}" if prefix else n, prefix, d) for n, d in m["dims"].items()}
    target = module.state_dict()
    state = dict(checkpoints[0]["module"])
    cuts = {}  # state_dict name -> (dim, new lo, new hi, saved ranges)
    for name, prefix, dim in names:
        if name not in target:
            raise ValueError(f"load_sharded_state_dict: the checkpoint's sharded tensor {name!r} is not in the module")
        total = saved_meta[0][prefix]["total"]
        if prefix in here:
            sh = here[prefix]
            if sh.total != total:
                raise ValueError(f"load_sharded_state_dict: module part {prefix!r} has {sh.total} items, "
                                 f"the checkpoint {total}")
            lo, hi = sh.lo, sh.hi
        else:  # restored without a process group: the whole
            lo, hi = 0, total
        ranges = [(m[prefix]["lo"], m[prefix]["hi"]) for m in saved_meta]
        state[name] = _cut(name, dim, lo, hi, _unique([(*r, c["module"][name]) for r, c in zip(ranges, checkpoints)]))
        cuts[name] = (dim, lo, hi, ranges)
    for key, extra in state.items():
        if key.rpartition(".")[2] == "_extra_state" and isinstance(extra, dict) and "critic_optimizer" in extra:
            prefix = key.rpartition(".")[0]
            owner = module.get_submodule(prefix) if prefix else module
            saved = [c["module"][key]["critic_optimizer"] for c in checkpoints]
            pnames = {id(p): (f"{prefix}.{n}" if prefix else n) for n, p in owner.named_parameters()}
            order = [pnames.get(id(p)) for g in owner.critic_optimizer.param_groups for p in g["params"]]
            state[key] = {**extra, "critic_optimizer": _cut_optimizer(saved, order, cuts, checkpoints)}
    module.load_state_dict(state)
    if optimizer is None:
        return
    saved = [c.get("optimizer") for c in checkpoints]
    if any(o is None for o in saved):
        raise ValueError("load_sharded_state_dict: argument 'optimizer' given but a checkpoint has no optimizer state")
    pnames = {id(p): n for n, p in module.named_parameters()}
    order = [pnames.get(id(p)) for g in optimizer.param_groups for p in g["params"]]
    optimizer.load_state_dict(_cut_optimizer(saved, order, cuts, checkpoints))


def _cut_optimizer(saved: list[dict], order: list, cuts: dict, checkpoints: list[dict]) -> dict:
    """An optimizer state dict for this rank from the saved ones: per-parameter state tensors
    shaped like their parameter (Adam's moments) cut as the parameter; the rest (step) copied."""
    out = dict(saved[0])
    out["state"] = {}
    for i, name in enumerate(order):
        entries = [o["state"].get(i) for o in saved]
        if entries[0] is None:
            continue
        if name not in cuts:
            out["state"][i] = entries[0]
            continue
        dim, lo, hi, ranges = cuts[name]
        shape = checkpoints[0]["module"][name].shape
        new = {}
        for key, val in entries[0].items():
            if isinstance(val, torch.Tensor) and val.shape == shape:
                new[key] = _cut(f"{name} ({key})", dim, lo, hi, _unique([(*r, e[key]) for r, e in zip(ranges, entries)]))
            else:
                new[key] = val
        out["state"][i] = new
    return out


def _unique(pieces):
    seen, out = set(), []
    for lo, hi, t in pieces:
        if (lo, hi) not in seen:
            seen.add((lo, hi))
            out.append((lo, hi, t))
    return out
