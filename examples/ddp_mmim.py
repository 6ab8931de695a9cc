"""Data-parallel MMIM training with pair-sharded critics (DistributedDataParallel + torch.distributed).

Launch (CPU, gloo; on GPUs the backend is nccl and each rank uses its own device):

    torchrun --nproc-per-node 2 examples/ddp_mmim.py
    torchrun --nproc-per-node 3 examples/ddp_mmim.py --resume      # re-shards the 2-rank checkpoint

The pattern:

* The model (body -> features [B, m] -> head) is wrapped in ``DistributedDataParallel``; each rank
  sees its part of every batch (``DistributedSampler``) and DDP averages the gradients.
* The regularizer sits beside it, NOT inside DDP: ``MMIMRegularizer(m, k,
  process_group=group)`` keeps on each rank a contiguous block of the pairwise critics (C4, C5)
  and of the per-unit critics (C6), gathers the features of the global batch with gradient, steps
  only its own critics with its own optimizer, and returns the penalty summed over ranks (the
  same value on every rank). Its gradient into each rank's features is scaled by the world size
  (``grad_average=True``) so that after DDP's averaging the model moves as a single process on the
  global batch would.
* The regularizer's collectives run on their own group, apart from DDP's gradient buckets.
* Checkpoints: rank 0 writes the model; every rank writes its block of critics with Adam's state
  and the world size (``critics-rank{r}-of{W}.pt``). ``--resume`` on any number of ranks cuts
  each rank's new block out of the saved blocks by pair index
  (``mmim_ext.estimators.sharding.load_sharded_state_dict``).

Data: scikit-learn's 8x8 digits (offline), standardized, 80/20 split.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import re
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from mmim_ext import MMIMRegularizer
from mmim_ext.estimators.sharding import load_sharded_state_dict, sharded_state_dict


class Net(nn.Module):
    """MLP 64 -> 128 -> m (ReLU) -> 10; returns ``(features, logits)`` so DDP wraps both parts."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, width), nn.ReLU())
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        f = self.body(x)
        return f, self.head(f)


def digits(seed: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(y) // 5
    mean, std = x[n_test:].mean(0), x[n_test:].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    return TensorDataset(x[n_test:], y[n_test:]), TensorDataset(x[:n_test], y[:n_test])


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--width", type=int, default=64, help="m, units of the regularized layer")
    p.add_argument("--batch-size", type=int, default=60, help="global batch (split over the ranks)")
    p.add_argument("--lam", type=float, default=0.1, help="weight of the MMIM penalty")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-dir", default="runs/ddp_mmim")
    p.add_argument("--resume", action="store_true", help="restore model and critics from --ckpt-dir first")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a collective waits for a peer")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    # A timeout turns a dead or diverged peer into an error instead of a hang.
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:  # torchrun sets 1 for several processes per node
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    reg_group = dist.new_group(backend=backend)  # the regularizer's collectives, apart from DDP's

    torch.manual_seed(args.seed)  # the same model and critics on every rank (each keeps its block)
    train, test = digits(args.seed)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the world size {world} "
                         f"(equal parts keep DDP's mean of per-rank means equal to the global mean)")
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(train, batch_size=args.batch_size // world, sampler=sampler, drop_last=True)
    net = Net(args.width).to(device)
    model = DDP(net, device_ids=[device.index] if cuda else None)
    reg = MMIMRegularizer(args.width, 10, process_group=reg_group, critic_lr=1e-3).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sh = reg.c4_critic.shard
    log(f"world {world} ({backend}); m={args.width}: {sh.total} pairs, rank 0 holds pairs [{sh.lo}, {sh.hi}) "
        f"and units [{reg.c6_critic.shard.lo}, {reg.c6_critic.shard.hi}) of C6")

    # A fixed check batch: the C4 critics' held-out bound on it must survive save and restore on
    # any world size (deterministic negatives: evaluate's seeded shifts).
    x_chk = test.tensors[0][:128].to(device)

    def check_value():
        # The regularizer's critics take the global batch (it gathers for them): every rank
        # passes the same features here; evaluate returns every pair's bound on every rank.
        with torch.no_grad():
            feats = net.body(x_chk)
        return float(reg.c4_critic.evaluate(feats, negatives="shift", num_negatives=16).sum())

    os.makedirs(args.ckpt_dir, exist_ok=True)
    if args.resume:
        files = sorted(glob.glob(os.path.join(args.ckpt_dir, "critics-rank*-of*.pt")))
        if not files:
            raise SystemExit(f"--resume: no critics-rank*-of*.pt in {args.ckpt_dir}")
        ckpts = [torch.load(f, map_location=device) for f in files]
        old_world = ckpts[0]["world_size"]
        if len(ckpts) != old_world or any(c["world_size"] != old_world for c in ckpts):
            raise SystemExit(f"--resume: {args.ckpt_dir} mixes checkpoints of different runs")
        saved = torch.load(os.path.join(args.ckpt_dir, "model.pt"), map_location=device)
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        load_sharded_state_dict(reg, ckpts, reg.critic_optimizer)
        log(f"restored: critics saved by {old_world} rank(s), re-sharded by pair index onto {world}; "
            f"check bound (sum over pairs, nats): saved {saved['check']:.6f}, restored {check_value():.6f}")

    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)
        net.train()
        reg.train()
        sums = torch.zeros(4, dtype=torch.float64)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            feats, logits = model(x)
            ce = F.cross_entropy(logits, y)
            pen = reg(feats, y)  # collective: every rank calls it with its own part of the batch
            loss = ce + args.lam * pen
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += torch.tensor([float(ce.detach()) * len(y), float(pen.detach()) * len(y),
                                  float((logits.argmax(1) == y).sum()), len(y)], dtype=torch.float64)
        dist.all_reduce(sums)  # ce is per rank (the penalty the same on every rank): sums for the report
        ce_m, pen_m, acc, n = sums[0] / sums[3], sums[1] / sums[3], 100 * sums[2] / sums[3], int(sums[3])
        terms = ", ".join(f"{k}={v:+.3f}" for k, v in reg.terms.items())
        log(f"epoch {epoch}: ce {ce_m:.4f}, penalty {pen_m:+.4f} nats (last batch: {terms}), "
            f"train acc {acc:.1f}% on {n} samples, {time.perf_counter() - start:.1f}s")

    net.eval()
    with torch.no_grad():
        xt, yt = (t.to(device) for t in test.tensors)
        acc = 100 * float((net(xt)[1].argmax(1) == yt).float().mean())
    mi = reg.c4_critic.matrix()  # collective: the whole [m, m] matrix on every rank
    top = torch.topk(mi.triu(1).flatten(), 3)
    pairs = [(int(i) // args.width, int(i) % args.width, float(v)) for v, i in zip(top.values, top.indices)]
    log(f"test acc {acc:.2f}%; most dependent unit pairs (last batch's C4 bounds, nats): "
        + ", ".join(f"({i},{j}) {v:.3f}" for i, j, v in pairs))

    check = check_value()
    for f in glob.glob(os.path.join(args.ckpt_dir, "critics-rank*-of*.pt")):
        m = re.search(r"-of(\d+)\.pt$", f)
        if rank == 0 and m and int(m.group(1)) != world:
            os.remove(f)  # a previous run's blocks on another world size
    dist.barrier()
    torch.save({"world_size": world, "rank": rank, **sharded_state_dict(reg, reg.critic_optimizer)},
               os.path.join(args.ckpt_dir, f"critics-rank{rank}-of{world}.pt"))
    if rank == 0:
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "check": check},
                   os.path.join(args.ckpt_dir, "model.pt"))
    dist.barrier()
    log(f"saved {args.ckpt_dir}: model.pt and {world} critic blocks; check bound {check:.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
