"""Per-rank memory, time and communication of a pair-sharded regularizer's training call.

For each world size W this spawns W processes (gloo on 127.0.0.1, one thread each), builds
``make_regularizer(TERMS, m, 10, process_group=WORLD)`` (the same critics as one process, each
rank keeping its block), and times training calls on a global batch of ``B`` samples split over
the ranks: gather the features, ``critic_steps`` critic updates of the rank's block, the
penalty, and its backward into the rank's features (as a DDP training step runs it; the model
itself is left out). Reported per rank:

* ``critic_MB``: bytes of the rank's critic parameters, their gradients, Adam's two moments and
  the moving averages (the state that sharding divides);
* ``peak_rss_MB``: the process's peak resident memory (includes torch, the extension, and the
  construction of the whole critic set before it is cut to the block);
* ``call_s``: median wall time of a training call, and ``cpu_s``: the CPU time the rank's process
  spent in it (all its threads, gloo's included). On a shared machine with fewer cores than
  busy processes the wall time measures the scheduler; the CPU time is the rank's work.
  ``work_pairs`` is the number of pairs the rank holds;
* ``sent_MB``: bytes this rank wrote to its sockets during one call (``/proc/self/io`` wchar:
  the gloo traffic on the wire), against the derived ``2 (W-1) (B/W) m 4`` bytes of the features'
  all-gather and its backward.

    OMP_NUM_THREADS=1 python benchmarks/distributed_scaling.py --m 2048 --worlds 1 2 4 --json results/dist.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _wchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return -1


def _worker(rank, world, port, args, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=args.timeout))
    from mmim_ext import make_regularizer
    from mmim_ext.estimators.sharding import shard_range

    torch.manual_seed(0)
    t0 = time.perf_counter()
    reg = make_regularizer(args.terms, args.m, 10, hidden=args.hidden, process_group=dist.group.WORLD)
    build_s = time.perf_counter() - t0
    reg.train()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(args.batch, args.m, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    rows = slice(*shard_range(args.batch, world, rank))
    times, cpus, sent = [], [], []
    for i in range(args.warmup + args.calls):
        x = h[rows].clone().requires_grad_(True)
        dist.barrier()
        w0, c0, t0 = _wchar(), time.process_time(), time.perf_counter()
        pen = reg(x, y[rows])
        pen.backward()
        t1, c1, w1 = time.perf_counter(), time.process_time(), _wchar()
        if i >= args.warmup:
            times.append(t1 - t0)
            cpus.append(c1 - c0)
            sent.append(w1 - w0)
    critic = sum(p.numel() * p.element_size() * 2 for p in reg.parameters())  # values and gradients
    critic += sum(b.numel() * b.element_size() for b in reg.buffers())
    for st in reg.critic_optimizer.state.values():
        critic += sum(t.numel() * t.element_size() for t in st.values() if isinstance(t, torch.Tensor))
    pairs = reg.c4_critic.shard.size if reg.c4_critic is not None else 0
    res = {"world": world, "rank": rank, "m": args.m, "batch": args.batch, "hidden": args.hidden, "terms": args.terms,
           "work_pairs": pairs, "critic_MB": critic / 2**20,
           "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "build_s": build_s, "call_s": statistics.median(times), "call_s_all": times,
           "cpu_s": statistics.median(cpus), "cpu_s_all": cpus,
           "sent_MB": statistics.median(sent) / 2**20,
           "derived_MB": 2 * (world - 1) * (rows.stop - rows.start) * args.m * 4 / 2**20,
           "loadavg": os.getloadavg()}
    with open(os.path.join(out_dir, f"w{world}r{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--batch", type=int, default=256, help="global batch")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--terms", default="c4", help="make_regularizer name: c4 (one pairwise critic set), rdm, mmim")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for world in args.worlds:
            mp.start_processes(_worker, args=(world, _free_port(), args, out_dir), nprocs=world, join=True,
                               start_method="spawn")
            for r in range(world):
                with open(os.path.join(out_dir, f"w{world}r{r}.json")) as f:
                    rows.append(json.load(f))
    print(f"m={args.m} ({args.m * (args.m - 1) // 2} pairs), K={args.hidden}, global batch {args.batch}, "
          f"terms {args.terms}, gloo on 127.0.0.1, 1 thread per rank, {os.cpu_count()} cores")
    print(f"{'W':>2} {'rank':>4} {'pairs/rank':>10} {'critic MB':>9} {'peak RSS MB':>11} {'call s':>7} {'CPU s':>6} "
          f"{'sent MB':>8} {'derived MB':>10} {'load':>5}")
    for r in rows:
        print(f"{r['world']:>2} {r['rank']:>4} {r['work_pairs']:>10} {r['critic_MB']:>9.1f} {r['peak_rss_MB']:>11.0f} "
              f"{r['call_s']:>7.2f} {r['cpu_s']:>6.2f} {r['sent_MB']:>8.3f} {r['derived_MB']:>10.3f} {r['loadavg'][0]:>5.1f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
