"""Pair-sharded estimators and regularizers on torch.distributed (gloo, CPU) against the
single-process run on the same global batch.

One spawn of three processes (localhost only) runs every scenario: groups of 2 (ranks 0-1), 3
(the world) and 1 (rank 0 alone) are made inside it, so the interpreter and the extension load
once. Each rank saves what it saw; the tests below compare it with the single-process run made
here. The process group has a timeout and the spawn a deadline, so a bug fails instead of hanging.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mmim_ext
from mmim_ext import MMIMRegularizer, PairwiseMINE, estimate_pairwise_mi
from mmim_ext.estimators.sharding import load_sharded_state_dict, shard_range, sharded_state_dict

from conftest import assert_same

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo not available")

PG_TIMEOUT = datetime.timedelta(seconds=60)  # a collective waiting on a dead or diverged peer fails after this
SPAWN_DEADLINE = 240.0  # seconds for the whole spawn (imports dominate on a loaded 2-core host)
M, C, HIDDEN = 5, 3, 4
REG_CONFIGS = {"all_pairs": {}, "subset": {"max_pairs": 4}}
CALLS = 3
NEG = "shuffle"  # random derangements: every rank must draw the same ones


def _batch(step: int, B: int, m: int = M, classes: int = C):
    """The global batch of training call ``step``: features [B, m] with dependent units, labels [B]."""
    g = torch.Generator().manual_seed(100 + step)
    y = torch.randint(0, classes, (B,), generator=g)
    h = torch.randn(B, m, generator=g)
    h[:, 1] = h[:, 0] + 0.5 * h[:, 1]
    h[:, 3] = h[:, 3] + y.float()
    return h, y


def _rows(B: int, world: int, rank: int) -> slice:
    lo, hi = shard_range(B, world, rank)  # unequal parts when world does not divide B
    return slice(lo, hi)


def _critic_sgd(params):
    # SGD with momentum instead of the critics' Adam: Adam's step m / (sqrt(v) + 1e-8) turns a
    # last-bit difference of a near-zero gradient (the output bias c, whose Donsker-Varadhan
    # gradient vanishes, or a critic unit that is almost dead on the batch) into a sizeable
    # step, so runs that round differently drift apart by up to a learning rate per step, even
    # in one process. SGD keeps rounding differences at rounding size, and its momentum buffers
    # are per-parameter optimizer state that a re-shard must cut like Adam's moments.
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _make_reg(seed: int, group=None, **kw):
    torch.manual_seed(seed)
    extra = {} if group is None else {"process_group": group}
    reg = MMIMRegularizer(M, C, hidden=HIDDEN, negatives=NEG, **kw, **extra)
    reg.critic_optimizer = _critic_sgd(reg.parameters())
    return reg


def _train_reg(reg, steps, B, world=1, rank=0, first=0):
    """``steps`` training calls on the rank's rows; (penalties, terms, feature gradients)."""
    reg.train()
    pens, terms, grads = [], [], []
    for s in range(first, first + steps):
        h, y = _batch(s, B)
        rows = _rows(B, world, rank)
        x = h[rows].clone().requires_grad_(True)
        pen = reg(x, y[rows])
        pen.backward()
        pens.append(float(pen.detach()))
        terms.append(dict(reg.terms))
        grads.append(x.grad.clone())
    return pens, terms, grads


# ---------------------------------------------------------------------------------------------
# The scenarios each rank runs (rank, world = 3); return values are saved per rank.


def _scenario_regularizer(rank, groups, out):
    for world, B in ((2, 11), (3, 11)):
        group = groups[world]
        if group is None:
            continue
        for name, kw in REG_CONFIGS.items():
            # grad_average=False: the features must receive exactly the single-process gradient.
            reg = _make_reg(0, group, grad_average=False, **kw)
            pens, terms, grads = _train_reg(reg, CALLS, B, world, rank)
            ckpt = sharded_state_dict(reg, reg.critic_optimizer)
            res = {"pens": pens, "terms": terms, "grads": grads, "state": reg.state_dict(), "shards": ckpt["shards"],
                   "c4_matrix": reg.c4_critic.matrix(), "c5_matrix": reg.c5_critic.matrix()}
            # grad_average=True (the default): W times that gradient, the same value.
            reg_avg = _make_reg(0, group, critic_steps=0, **kw)  # same critics as the single process: tight
            res["avg_pens"], _, res["avg_grads"] = _train_reg(reg_avg, 1, B, world, rank)
            out[f"reg/{world}/{name}"] = res
            if world == 2 and name == "all_pairs":
                torch.save(ckpt, os.path.join(out["dir"], f"ckpt{rank}.pt"))
                out["ckpt/2"] = ckpt


def _scenario_restore(rank, groups, out):
    dist.barrier()  # every rank's checkpoint of the 2-rank run is written
    reg = _make_reg(7, groups[3])  # another seed: only the restore can make it match
    files = [torch.load(os.path.join(out["dir"], f"ckpt{r}.pt")) for r in range(2)]
    load_sharded_state_dict(reg, files, reg.critic_optimizer)
    reg.grad_average = False
    pens, _, grads = _train_reg(reg, 1, 11, 3, rank, first=CALLS)
    out["restore/3"] = {"pens": pens, "grads": grads, "state": reg.state_dict(),
                        "shards": sharded_state_dict(reg)["shards"]}


def _scenario_pairwise(rank, groups, out):
    group = groups[2]
    if group is None:
        return
    B = 9
    torch.manual_seed(1)
    mod = PairwiseMINE(M, hidden=HIDDEN, negatives=NEG, num_classes=C, process_group=group)  # [C, P, K] critics
    opt = _critic_sgd(mod.parameters())
    rows = _rows(B, 2, rank)
    res = {"est": [], "loss": []}
    for s in range(CALLS):
        h, y = _batch(s, B)
        est, loss = mod.critic_loss(h[rows], y[rows])
        opt.zero_grad()
        loss.backward()
        if s == 0:  # the same critics as the single process: their gradients agree to rounding
            res["critic_grads"] = {n: p.grad.clone() for n, p in mod.named_parameters()}
        opt.step()
        res["est"].append(est.detach())
        res["loss"].append(float(loss.detach()))
    h, y = _batch(CALLS, B)
    x = h[rows].clone().requires_grad_(True)
    index = torch.tensor([9, 0, 4, 7, 2])
    est, value = mod.penalty(x, y[rows], index, coef=0.5)
    value.backward()
    res.update(pen_est=est, pen=float(value), grad=x.grad, state=mod.state_dict(), meta=mod.shard.meta(),
               evaluate=mod.evaluate(h[rows], y[rows], negatives="all"), matrix=mod.matrix())
    out["pairwise/2"] = res


def _scenario_estimate(rank, groups, out):
    group = groups[2]
    if group is None:
        return
    h = _batch(50, 160)[0]
    out["estimate/2"] = estimate_pairwise_mi(h, process_group=group, **ESTIMATE_KW)


ESTIMATE_KW = {"negatives": NEG, "hidden": HIDDEN, "batch_size": 64, "max_epochs": 3, "patience": 2, "val_negatives": 16, "seed": 3}


def _scenario_single(rank, groups, out):
    if groups[1] is None:
        return
    # A group of one must behave exactly like no group (same initialization, same results).
    res = {}
    for tag, group in (("group", groups[1]), ("none", None)):
        reg = _make_reg(0, group, max_pairs=4, grad_average=False)
        pens, terms, grads = _train_reg(reg, CALLS, 11)
        res[tag] = {"pens": pens, "grads": grads, "state": reg.state_dict(), "matrix": reg.c4_critic.matrix()}
    out["single/1"] = res


def _catch(fn):
    try:
        fn()
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _scenario_errors(rank, groups, out):
    group = groups[2]
    if group is None:
        return
    reg = _make_reg(0, group)
    h, y = _batch(0, 8)
    rows = _rows(8, 2, rank)
    width = h[rows] if rank == 0 else torch.randn(4, M + 1)
    msgs = {"width": _catch(lambda: reg(width, y[rows]))}
    mod = PairwiseMINE(M, hidden=HIDDEN, negatives=NEG, process_group=group)
    msgs["labels"] = _catch(lambda: mod.critic_loss(h[rows], y[rows] if rank == 0 else None))
    msgs["dtype"] = _catch(lambda: mod.critic_loss(h[rows].double() if rank == 1 else h[rows]))
    replicated = PairwiseMINE(M, hidden=HIDDEN, process_group=group, gather_batch=False)
    msgs["replicated"] = _catch(lambda: replicated.critic_loss(h if rank == 0 else h[:7]))
    # The group is still usable: every rank left every exchange at the same point.
    pen = reg(h[rows].clone().requires_grad_(True), y[rows])
    msgs["after"] = float(pen)
    out["errors/2"] = msgs


def _scenario_ddp(rank, groups, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    world, B = 3, 12  # equal local batches: the mean cross-entropy over ranks is the global mean
    torch.manual_seed(5)
    net = _Net()
    model = DDP(net)
    reg = _make_reg(0, groups[3])  # grad_average=True: DDP divides the summed gradients by 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rows = _rows(B, world, rank)
    for s in range(2):
        x, y = _ddp_batch(s, B)
        feats, logits = model(x[rows])
        loss = torch.nn.functional.cross_entropy(logits, y[rows]) + 0.5 * reg(feats, y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out["ddp/3"] = {k: v.detach().clone() for k, v in net.state_dict().items()}


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, M), torch.nn.Tanh())
        self.head = torch.nn.Linear(M, C)

    def forward(self, x):
        f = self.body(x)
        return f, self.head(f)


def _ddp_batch(step, B):
    g = torch.Generator().manual_seed(300 + step)
    return torch.randn(B, 6, generator=g), torch.randint(0, C, (B,), generator=g)


SCENARIOS = (_scenario_regularizer, _scenario_restore, _scenario_pairwise, _scenario_estimate, _scenario_single,
             _scenario_errors, _scenario_ddp)


def _worker(rank, world, port, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=PG_TIMEOUT)
    try:
        # new_group is collective: every rank creates every group, members get a handle.
        g2 = dist.new_group([0, 1], timeout=PG_TIMEOUT)
        g1 = dist.new_group([0], timeout=PG_TIMEOUT)
        groups = {1: g1 if rank == 0 else None, 2: g2 if rank < 2 else None, 3: dist.group.WORLD}
        out = {"dir": out_dir}
        for scenario in SCENARIOS:
            scenario(rank, groups, out)
            dist.barrier()
        del out["dir"]
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per rank, what the scenarios saw (one spawn of 3 processes for the module)."""
    out_dir = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(_worker, args=(3, _free_port(), str(out_dir)), nprocs=3, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + SPAWN_DEADLINE
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the distributed workers did not finish within {SPAWN_DEADLINE:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(3)]


# Tolerances. The ranks' arithmetic per pair is the single process's, but the kernels vectorize
# over a rank's block instead of all pairs and the penalty is summed in another order, which
# moves the last bits (float32). A wrong block, sign, scale, random draw or a missing term is off
# by far more. estimate_pairwise_mi trains with Adam (see _critic_sgd) and keeps the best
# validation bound per pair: it gets ESTIMATE_TOL.
TIGHT = {"rtol": 1e-5, "atol": 1e-6}
VALUE_TOL = {"rtol": 1e-4, "atol": 1e-5}
PARAM_TOL = {"rtol": 1e-4, "atol": 1e-5}
ESTIMATE_TOL = {"rtol": 1e-3, "atol": 1e-3}


def _grad_tol(ref_grad, trained=True):
    return {"rtol": 1e-4, "atol": (1e-4 if trained else 1e-5) * float(ref_grad.abs().max()) + 1e-9}


def _close(a, b, what, rtol=1e-5, atol=1e-6):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert a.shape == b.shape, f"{what}: shapes {list(a.shape)} vs {list(b.shape)}"
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _check_state(ref_state, state, shards, what):
    """Every tensor of a rank's ``state`` equals the single-process ``ref_state``'s, cut to the
    rank's block where ``shards`` ({module prefix: shard meta}) says it is sharded."""
    assert set(state) == set(ref_state), what
    for name, t in state.items():
        want = ref_state[name]
        if name.rpartition(".")[2] == "_extra_state":
            # Random states must be the same on every rank; the optimizer's moments are blocks
            # (compared exactly in test_restore_without_group).
            assert t.keys() == want.keys(), f"{what}: {name}"
            if "generator" in t:
                assert torch.equal(t["generator"], want["generator"]), f"{what}: {name} generator"
            continue
        for prefix, meta in shards.items():
            rel = name[len(prefix) + 1:] if prefix else name
            if (not prefix or name.startswith(prefix + ".")) and rel in meta["dims"]:
                want = want.narrow(meta["dims"][rel], meta["lo"], meta["hi"] - meta["lo"])
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            # Adam divides by the root of its second moment: float32 rounding of a gradient
            # (summed in another order) moves a parameter by more than the gradient's rounding.
            _close(t, want, f"{what}: {name}", **PARAM_TOL)
        else:
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(want)), f"{what}: {name}"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("config", list(REG_CONFIGS))
def test_regularizer_matches_single_process(runs, world, config):
    B = 11
    ref = _make_reg(0, **REG_CONFIGS[config])
    pens, terms, grads = _train_reg(ref, CALLS, B)
    ref_state = ref.state_dict()
    for rank in range(world):
        got = runs[rank][f"reg/{world}/{config}"]
        assert got["shards"]["c4_critic"]["world_size"] == world
        for s in range(CALLS):
            _close(got["pens"][s], pens[s], f"rank {rank} penalty {s}", **VALUE_TOL)
            for k in terms[s]:
                _close(got["terms"][s][k], terms[s][k], f"rank {rank} term {k} call {s}", **VALUE_TOL)
            _close(got["grads"][s], grads[s][_rows(B, world, rank)], f"rank {rank} feature grad {s}",
                   **_grad_tol(grads[s]))
        _check_state(ref_state, got["state"], got["shards"], f"rank {rank} critics after {CALLS} calls")
        _close(got["c4_matrix"], ref.c4_critic.matrix(), f"rank {rank} c4 matrix", **VALUE_TOL)
        _close(got["c5_matrix"], ref.c5_critic.matrix(), f"rank {rank} c5 matrix", **VALUE_TOL)
    # With DDP's averaging in mind (grad_average=True) the same value and W times the gradient.
    ref1 = _make_reg(0, critic_steps=0, **REG_CONFIGS[config])
    pens1, _, grads1 = _train_reg(ref1, 1, B)
    for rank in range(world):
        got = runs[rank][f"reg/{world}/{config}"]
        _close(got["avg_pens"][0], pens1[0], f"rank {rank} penalty (grad_average)", **TIGHT)
        _close(got["avg_grads"][0], world * grads1[0][_rows(B, world, rank)], f"rank {rank} grad (grad_average)",
               **_grad_tol(world * grads1[0], trained=False))


def test_shards_are_balanced_blocks(runs):
    P = M * (M - 1) // 2
    for world in (2, 3):
        metas = [runs[r][f"reg/{world}/all_pairs"]["shards"] for r in range(world)]
        for part in ("c4_critic", "c5_critic"):
            assert [(m[part]["lo"], m[part]["hi"]) for m in metas] == [shard_range(P, world, r) for r in range(world)]
        assert [(m["c6_critic"]["lo"], m["c6_critic"]["hi"]) for m in metas] == [shard_range(M, world, r) for r in range(world)]
        sizes = [m["c4_critic"]["hi"] - m["c4_critic"]["lo"] for m in metas]
        assert sum(sizes) == P and max(sizes) - min(sizes) <= 1
        for r in range(world):  # the rank holds only its block of the critics
            assert runs[r][f"reg/{world}/all_pairs"]["state"]["c4_critic.wa"].shape == (sizes[r], HIDDEN)


def test_restore_on_another_world_size(runs):
    # Saved by 2 ranks after 3 calls, restored on 3 ranks: the 4th call matches the single process.
    ref = _make_reg(0)
    _train_reg(ref, CALLS, 11)
    pens, _, grads = _train_reg(ref, 1, 11, first=CALLS)
    for rank in range(3):
        got = runs[rank]["restore/3"]
        assert got["shards"]["c4_critic"]["world_size"] == 3
        _close(got["pens"][0], pens[0], f"rank {rank} penalty after restore", **VALUE_TOL)
        _close(got["grads"][0], grads[0][_rows(11, 3, rank)], f"rank {rank} grad after restore", **_grad_tol(grads[0]))
        _check_state(ref.state_dict(), got["state"], got["shards"], f"rank {rank} restored and trained")


def test_restore_without_group(runs):
    # The 2-rank checkpoint restored into a module built without a group: the two blocks, joined
    # exactly (a re-shard only moves data), parameters, buffers and the optimizer's state alike.
    ckpts = [runs[r]["ckpt/2"] for r in range(2)]
    reg = _make_reg(7)
    load_sharded_state_dict(reg, ckpts, reg.critic_optimizer)
    state = reg.state_dict()
    joined = set()
    for prefix, meta in ckpts[0]["shards"].items():
        for rel, dim in meta["dims"].items():
            name = f"{prefix}.{rel}"
            assert torch.equal(state[name], torch.cat([c["module"][name] for c in ckpts], dim)), name
            joined.add(name)
    assert {"c4_critic.wa", "c5_critic._ema.log_acc", "c6_critic.emb", "c4_critic.pairs"} <= joined
    for name in set(state) - joined:
        if name.rpartition(".")[2] == "_extra_state":
            continue  # random states (checked below through the next call) and the optimizer
        assert torch.equal(state[name], ckpts[0]["module"][name]), name
    dims = {f"{prefix}.{rel}": d for prefix, meta in ckpts[0]["shards"].items() for rel, d in meta["dims"].items()}
    names = [n for n, _ in reg.named_parameters()]
    # The optimizer's state, passed explicitly and kept in the regularizer's own state_dict.
    for saved_of, got in ((lambda c: c["optimizer"], reg.critic_optimizer.state_dict()),
                          (lambda c: c["module"]["_extra_state"]["critic_optimizer"], state["_extra_state"]["critic_optimizer"])):
        assert set(got["state"]) == set(range(len(names)))
        for i, name in enumerate(names):
            assert set(got["state"][i]) == {"momentum_buffer"}
            for key, val in got["state"][i].items():
                parts = [saved_of(c)["state"][i][key] for c in ckpts]
                assert torch.equal(val, torch.cat(parts, dims[name])), (name, key)
    # and it trains on as the single process does
    ref = _make_reg(0)
    _train_reg(ref, CALLS, 11)
    _check_state(ref.state_dict(), state, {}, "restored without a group")
    _close(_train_reg(reg, 1, 11, first=CALLS)[0][0], _train_reg(ref, 1, 11, first=CALLS)[0][0], "next penalty",
           **VALUE_TOL)


def test_pairwise_mine_matches_single_process(runs):
    B = 9
    torch.manual_seed(1)
    ref = PairwiseMINE(M, hidden=HIDDEN, negatives=NEG, num_classes=C)
    opt = _critic_sgd(ref.parameters())
    ests = []
    for s in range(CALLS):
        h, y = _batch(s, B)
        est, loss = ref.critic_loss(h, y)
        opt.zero_grad()
        loss.backward()
        if s == 0:
            critic_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        opt.step()
        ests.append(est.detach())
    h, y = _batch(CALLS, B)
    x = h.clone().requires_grad_(True)
    index = torch.tensor([9, 0, 4, 7, 2])
    pen_est, value = ref.penalty(x, y, index, coef=0.5)
    value.backward()
    evaluate = ref.evaluate(h, y, negatives="all")
    for rank in range(2):
        got = runs[rank]["pairwise/2"]
        meta = got["meta"]
        lo, hi = meta["lo"], meta["hi"]
        for n, g in critic_grads.items():
            block = g.narrow(meta["dims"][n], lo, hi - lo)  # the pair dim of [C, P, K] is 1
            _close(got["critic_grads"][n], block, f"rank {rank} critic gradient {n}", **TIGHT)
        _close(got["est"][0], ests[0][lo:hi], f"rank {rank} estimates 0", **TIGHT)
        for s in range(1, CALLS):
            _close(got["est"][s], ests[s][lo:hi], f"rank {rank} estimates {s}", **VALUE_TOL)
        _check_state(ref.state_dict(), got["state"], {"": meta}, f"rank {rank} critics")
        mine = (index >= lo) & (index < hi)
        _close(got["pen_est"], pen_est[mine], f"rank {rank} penalty estimates (pair_index)", **VALUE_TOL)
        _close(got["pen"], float(value.detach()), f"rank {rank} penalty", **VALUE_TOL)
        _close(got["grad"], x.grad[_rows(B, 2, rank)], f"rank {rank} feature grad", **_grad_tol(x.grad))
        _close(got["evaluate"], evaluate, f"rank {rank} evaluate (every pair)", **VALUE_TOL)
        _close(got["matrix"], ref.matrix(), f"rank {rank} matrix", **VALUE_TOL)


def test_estimate_pairwise_mi_matches_single_process(runs):
    want = estimate_pairwise_mi(_batch(50, 160)[0], **ESTIMATE_KW)
    for rank in range(2):
        _close(runs[rank]["estimate/2"], want, f"rank {rank} estimate_pairwise_mi", **ESTIMATE_TOL)


def test_group_of_one_is_no_group(runs):
    got = runs[0]["single/1"]
    a, b = got["group"], got["none"]
    assert a["pens"] == b["pens"]
    for ga, gb in zip(a["grads"], b["grads"]):
        assert torch.equal(ga, gb)
    assert set(a["state"]) == set(b["state"])
    for k in a["state"]:
        assert_same(a["state"][k], b["state"][k], k)  # random and optimizer states: bitwise too
    assert torch.equal(a["matrix"], b["matrix"])


def test_mismatched_ranks_fail_on_every_rank(runs):
    for rank in range(2):
        msgs = runs[rank]["errors/2"]
        assert msgs["width"] and "widths by rank: [5, 6]" in msgs["width"] and "features" in msgs["width"], msgs
        assert msgs["labels"] and "labels passed by rank: [True, False]" in msgs["labels"], msgs
        assert msgs["dtype"] and "same dtype" in msgs["dtype"], msgs
        assert msgs["replicated"] and "gather_batch=False" in msgs["replicated"], msgs
        assert msgs["after"] == runs[0]["errors/2"]["after"]  # the group kept working afterwards


def test_ddp_model_with_sharded_regularizer_trains_like_single_process(runs):
    B = 12
    torch.manual_seed(5)
    net = _Net()
    reg = _make_reg(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for s in range(2):
        x, y = _ddp_batch(s, B)
        feats, logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits, y) + 0.5 * reg(feats, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for rank in range(3):
        for k, v in net.state_dict().items():
            _close(runs[rank]["ddp/3"][k], v, f"rank {rank} model {k}", **VALUE_TOL)


def test_shard_range_is_a_balanced_partition():
    for total in (1, 2, 7, 10, 2_096_128):
        for world in range(1, min(total, 9) + 1):
            blocks = [shard_range(total, world, r) for r in range(world)]
            assert blocks[0][0] == 0 and blocks[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            sizes = [hi - lo for lo, hi in blocks]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_process_group_needs_initialized_distributed():
    if dist.is_initialized():
        pytest.skip("this process has a process group")
    with pytest.raises(RuntimeError, match="process_group.*init_process_group"):
        PairwiseMINE(M, process_group=object())
    with pytest.raises(RuntimeError, match="process_group.*init_process_group"):
        MMIMRegularizer(M, C, process_group=object())


def test_bad_sharding_arguments():
    with pytest.raises(ValueError, match="mode='pairwise'"):
        MMIMRegularizer(M, C, mode="total", process_group=object())
    with pytest.raises(ValueError, match="seed.*process_group"):
        estimate_pairwise_mi(_batch(50, 160)[0], seed=None, process_group=object())
    with pytest.raises(ValueError, match="checkpoints"):
        load_sharded_state_dict(_make_reg(0), [])
