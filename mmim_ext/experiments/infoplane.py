"""Information plane of the 12-10-7-5-4-3-2 network (Shwartz-Ziv & Tishby) over many seeds.

The task: all 4096 binary inputs x in {0,1}^12. Each bit is a charge s_i = 2 x_i - 1 at vertex u_i
of a regular icosahedron; the label is 1 when the squared dipole moment ||sum_i s_i u_i||^2 exceeds
a threshold chosen so that about half the inputs are positive. The function is invariant under
every rotation of the sphere that permutes the vertices (spherically symmetric).

Every run (one seed x one setting: activation tanh / relu / relu-tanh, optimizer sgd / gd / adam,
true, random or noisy labels) trains on a seed-dependent 85 % of the inputs and records on all
4096, at log-spaced epochs, I(X;T) and I(T;Y) per layer by binning (two schemes: 30 bins over
[-1, 1] for tanh and over each epoch's own [min, max] for ReLU; fixed-width bins, --bin-width)
and by the KDE upper bound at each --noise-vars. Also per epoch the gradient SNR per layer, at
each recording the last layer against a hard-margin linear SVM on the penultimate features, and
on the final network binned I(X;T) as the bins shrink. Per seed, two probes on other networks:
held-out separability of a wider net's layers, and Lipschitz bounds of residual blocks.

Each run writes run_<setting>_seed<N>.json into --out and is skipped when that file exists, so
an interrupted run resumes with the same command, and two processes (--threads 1 each) can share
one folder (a .lock file claims a run). Afterwards (or with --merge) results.json and the figures
are rebuilt from every run file in the folder; results.json's "compression" gives per activation
and layer the peak-minus-final I(X;T) (bits) as mean and sd over seeds, for the binning scheme
--binning and the KDE upper bound at the largest noise variance.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import torch

from mmim_ext.experiments.cli import positive_int
from mmim_ext.experiments.infoplane_merge import merge, probe_path, run_path
from mmim_ext.experiments.infoplane_train import (ACTIVATIONS, DEFAULT_LR, OPTIMIZERS, WIDTHS, RunConfig, Setting,
                                                  build_net, train_one)
from mmim_ext.experiments.locks import claim, release
from mmim_ext.infoplane import log_schedule
from mmim_ext.ops import kde_fused_available

__all__ = ["add_arguments", "run", "make_task", "build_net", "train_one", "WIDTHS", "ACTIVATIONS", "OPTIMIZERS"]

QUICK = {"epochs": 500, "points": 12, "seeds": 2, "noise_vars": "0.01,0.1", "probe_epochs": 150}
FULL = {"epochs": 8000, "points": 40, "seeds": 10, "noise_vars": "1e-3,1e-2,1e-1", "probe_epochs": 2000}


def _icosahedron() -> torch.Tensor:
    """The 12 unit vertices of a regular icosahedron, ``[12, 3]`` float64."""
    phi = (1.0 + math.sqrt(5.0)) / 2.0
    pts = []
    for a in (-1.0, 1.0):
        for b in (-phi, phi):
            pts += [(0.0, a, b), (a, b, 0.0), (b, 0.0, a)]
    u = torch.tensor(pts, dtype=torch.float64)
    return u / u.norm(dim=1, keepdim=True)


def make_task() -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The 12-bit task: ``(x [4096, 12] float32 in {0,1}, y [4096] int64, info)``.

    ``info`` holds the threshold and the fraction of positive labels. Deterministic.
    """
    x = torch.tensor(list(itertools.product((0.0, 1.0), repeat=12)), dtype=torch.float64)
    f = ((2.0 * x - 1.0) @ _icosahedron()).pow(2).sum(1)  # squared dipole moment, rotation invariant
    vals = torch.unique(f.round(decimals=9))
    # The threshold: the midpoint between two consecutive values that splits closest to half.
    mids = (vals[1:] + vals[:-1]) / 2
    fracs = torch.stack([(f > m).double().mean() for m in mids])
    best = int((fracs - 0.5).abs().argmin())
    thr = float(mids[best])
    y = (f > thr).long()
    return x.float(), y, {"threshold": thr, "positive_fraction": float(y.double().mean()),
                          "function": "||sum_i (2 x_i - 1) u_i||^2 over icosahedron vertices u_i"}


# ---- command line --------------------------------------------------------------------------


def _csv_choices(flag: str, choices):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
        bad = [s for s in items if s not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"{flag} must be a comma-separated subset of {','.join(choices)}, got {text!r}")
        return items
    return parse


def _float_list(flag: str, lo: float, hi: float, lo_open: bool):
    def parse(text: str) -> tuple[float, ...]:
        try:
            vals = tuple(float(s) for s in text.split(",") if s.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects comma-separated numbers, got {text!r}") from None
        ok = all(math.isfinite(v) and (v > lo if lo_open else v >= lo) and v < hi for v in vals)
        if not vals or not ok:
            raise argparse.ArgumentTypeError(f"{flag} expects numbers in {'(' if lo_open else '['}{lo:g}, {hi:g}), "
                                             f"got {text!r}")
        return tuple(dict.fromkeys(vals))
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m mmim_ext.experiments infoplane``."""
    q, f = QUICK, FULL
    parser.add_argument("--quick", action="store_true",
                        help=f"{q['seeds']} seeds, {q['epochs']} epochs, {q['points']} recordings, noise variances "
                             f"{q['noise_vars']} (minutes on 2 cores)")
    parser.add_argument("--out", default=None, help="output folder (default results/infoplane[_quick])")
    parser.add_argument("--seeds", type=positive_int, default=None,
                        help=f"run seeds 0..N-1 (default {f['seeds']}; {q['seeds']} with --quick)")
    parser.add_argument("--epochs", type=positive_int, default=None, help=f"training epochs (default {f['epochs']})")
    parser.add_argument("--points", type=int, default=None, help=f"log-spaced recording epochs (default {f['points']})")
    parser.add_argument("--activations", type=_csv_choices("--activations", ACTIVATIONS), default=("tanh", "relu"),
                        help="comma-separated subset of " + ",".join(ACTIVATIONS) + " (default tanh,relu; relu-tanh: "
                             "ReLU layers with a tanh last hidden layer)")
    parser.add_argument("--optimizer", type=_csv_choices("--optimizer", OPTIMIZERS), default=("sgd",),
                        help="sgd (fixed learning rate, minibatches), gd (full batch) or adam; a comma-separated "
                             "list runs each (default sgd)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate for every optimizer (default " +
                             ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="minibatch size (gd: for the SNR only)")
    parser.add_argument("--binning", choices=("adaptive", "fixed"), default="adaptive",
                        help="scheme reported as results.json compression[...]['binned'] (both are recorded "
                             "and plotted): adaptive = 30 bins over [-1,1] (tanh) / per-epoch [min,max] (ReLU); "
                             "fixed = bins of --bin-width over a fixed range")
    parser.add_argument("--bin-width", type=float, default=0.07, help="width of the fixed bins (default 0.07, Saxe et al.)")
    parser.add_argument("--noise-vars", type=_float_list("--noise-vars", 0.0, math.inf, True), default=None,
                        help=f"KDE noise variances sigma^2, plotted side by side (default {f['noise_vars']}; "
                             f"{q['noise_vars']} with --quick)")
    parser.add_argument("--random-labels", action="store_true",
                        help="also run every activation x optimizer on randomly permuted labels (control)")
    parser.add_argument("--label-noise", type=_float_list("--label-noise", 0.0, 0.5, False), default=(0.0,),
                        help="fractions of training labels flipped; each value > 0 is one more setting "
                             "(margin vs generalization), e.g. 0,0.1,0.2")
    parser.add_argument("--no-probes", action="store_true",
                        help="skip the per-seed probes (wide-net separability, residual-block Lipschitz bounds)")
    parser.add_argument("--probe-epochs", type=positive_int, default=None,
                        help=f"training epochs of the probe networks (default {f['probe_epochs']}; "
                             f"{q['probe_epochs']} with --quick)")
    parser.add_argument("--train-fraction", type=float, default=0.85)
    parser.add_argument("--eval-subset", type=positive_int, default=None,
                        help="measure the information plane on a fixed random subset of this many of the 4096 "
                             "inputs (KDE costs N^2; I(X;T) is then capped at log2 N; default: all)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch.set_num_threads (use 1 per process when two processes share the folder)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--merge", "--replot", dest="merge", action="store_true",
                        help="do not train: rebuild results.json and the figures from the run files in --out")


def _write_json(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(payload, fh)
    os.replace(tmp, path)  # atomic: a file that exists is complete


def _split(seed: int, n: int, fraction: float):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(fraction * n))
    return perm[:n_train].sort().values, perm[n_train:].sort().values


def _print_summary(payload: dict) -> None:
    cfg = payload["config"]
    for act, layers in payload["compression"].items():
        key = payload["main_regime"][act]
        n = len(payload["settings"][key]["seeds"])
        print(f"  compression {key} ({n} seeds), bits, mean +- sd: " + ", ".join(
            f"{ly} binned[{cfg['binning']}] {c['binned']['mean']:.2f}+-{c['binned']['sd'] or 0:.2f} "
            f"kde {c['kde']['mean']:.2f}+-{c['kde']['sd'] or 0:.2f}" for ly, c in layers.items()))


def run(args) -> int:
    """Run (or resume, or merge) the experiment; returns the exit code (2 on bad arguments)."""
    preset = QUICK if args.quick else FULL
    epochs = args.epochs or preset["epochs"]
    points = args.points if args.points is not None else preset["points"]
    seeds = args.seeds or preset["seeds"]
    noise_vars = args.noise_vars or tuple(float(v) for v in preset["noise_vars"].split(","))
    errors = []
    if points < 2:
        errors.append(f"--points must be >= 2, got {points}")
    if args.lr is not None and not (args.lr > 0):
        errors.append(f"--lr must be > 0, got {args.lr}")
    if not (math.isfinite(args.bin_width) and args.bin_width > 0):
        errors.append(f"--bin-width must be a finite number > 0, got {args.bin_width}")
    if not (0 < args.train_fraction < 1):
        errors.append(f"--train-fraction must lie in (0, 1), got {args.train_fraction}")
    n_train = int(round(args.train_fraction * 4096))
    if 0 < args.train_fraction < 1 and math.ceil(n_train / args.batch_size) < 2:
        errors.append(f"--batch-size {args.batch_size} leaves one minibatch per epoch of {n_train} samples; "
                      "the gradient SNR needs at least 2")
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join("results", "infoplane" + ("_quick" if args.quick else ""))
    x, y, task = make_task()
    if args.merge:
        try:
            payload = merge(out, binning=args.binning, optimizers=args.optimizer, task=task)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        _print_summary(payload)
        print(f"rebuilt {out}/results.json and {len(payload.get('figures', []))} figures")
        return 0
    os.makedirs(out, exist_ok=True)
    lr = {o: (args.lr if args.lr is not None else DEFAULT_LR[o]) for o in OPTIMIZERS}
    cfg = RunConfig(epochs=epochs, points=points, lr=lr, batch_size=args.batch_size, noise_vars=noise_vars,
                    bin_width=float(args.bin_width), train_fraction=args.train_fraction,
                    eval_subset=args.eval_subset if args.eval_subset and args.eval_subset < x.shape[0] else None)
    settings = [Setting(a, o) for o, a in itertools.product(args.optimizer, args.activations)]
    if args.random_labels:
        settings += [Setting(a, o, random_labels=True) for o, a in itertools.product(args.optimizer, args.activations)]
    settings += [Setting(a, o, label_noise=p) for p in args.label_noise if p > 0
                 for o, a in itertools.product(args.optimizer, args.activations)]
    probe_epochs = args.probe_epochs or preset["probe_epochs"]
    print(f"infoplane: 12-bit task, {x.shape[0]} inputs, {task['positive_fraction']:.3f} positive; "
          f"net {'-'.join(map(str, WIDTHS))}; {epochs} epochs, {len(log_schedule(epochs, points))} recordings; "
          f"seeds 0..{seeds - 1}; settings {', '.join(s.key for s in settings)}; KDE sigma^2 "
          f"{','.join(f'{v:g}' for v in noise_vars)} ({'fused' if kde_fused_available('cpu') else 'reference'} "
          f"kernel); {torch.get_num_threads()} threads -> {out}", flush=True)
    done = skipped = 0
    for seed in range(seeds):
        train_idx, test_idx = _split(seed, x.shape[0], args.train_fraction)
        jobs = [(s, run_path(out, s.key, seed)) for s in settings]
        if not args.no_probes:
            jobs.append((None, probe_path(out, seed)))
        for setting, path in jobs:
            if os.path.exists(path):
                with open(path) as fh:
                    old = json.load(fh)
                if setting is not None and old["config"] != cfg.to_json():
                    print(f"error: {path} was run with another config ({old['config']}); use another --out",
                          file=sys.stderr)
                    return 2
                skipped += 1
                continue
            if not claim(path):
                print(f"  {os.path.basename(path)}: another process is on it", flush=True)
                continue
            t0 = time.perf_counter()
            try:
                if setting is None:
                    from mmim_ext.experiments.infoplane_probes import residual_run, separability_run

                    payload = {"seed": seed, "separability": separability_run(x, y, train_idx, test_idx, seed, probe_epochs),
                               "residual": residual_run(x, y, train_idx, test_idx, seed, probe_epochs, points)}
                    msg = (f"probes: wide net test {payload['separability']['test_accuracy']:.4f}, residual net test "
                           f"{payload['residual']['test_accuracy']:.4f}")
                else:
                    # Without a progress bar, a line per recording (long runs write to a log file).
                    payload = train_one(setting, cfg, x, y, train_idx, test_idx, seed, progress=not args.no_progress,
                                        log=args.no_progress)
                    payload["config"] = cfg.to_json()
                    fin = payload["final"]
                    msg = (f"{setting.key}: train {fin['train_accuracy']:.4f}, test {fin['test_accuracy']:.4f}, "
                           f"SVM cosine {fin['cosine']}")
                payload["wall_total_s"] = time.perf_counter() - t0
                _write_json(path, payload)
            finally:
                release(path)
            done += 1
            print(f"  seed {seed} {msg} ({payload['wall_total_s']:.0f} s)", flush=True)
    print(f"ran {done}, found {skipped} finished", flush=True)
    payload = merge(out, binning=args.binning, optimizers=args.optimizer, task=task)
    _print_summary(payload)
    print(f"wrote {out}/results.json and " + ", ".join(payload.get("figures", [])))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
