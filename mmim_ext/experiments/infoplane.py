"""Information plane of the 12-10-7-5-4-3-2 network (Shwartz-Ziv & Tishby) with tanh and ReLU.

The task: all 4096 binary inputs x in {0,1}^12. Each bit is a charge s_i = 2 x_i - 1 at vertex u_i
of a regular icosahedron; the label is 1 when the squared dipole moment ||sum_i s_i u_i||^2 exceeds
a threshold chosen so that about half the inputs are positive. The function is invariant under
every rotation of the sphere that permutes the vertices (spherically symmetric).

For each activation the network is trained on a fixed 85 % of the inputs; on a log-spaced
schedule of epochs the recorder measures, on all 4096 inputs, I(X;T) and I(T;Y) per layer by
binning (30 bins; tanh layers over [-1, 1], ReLU layers over their own [min, max], softmax output
over [0, 1]) and by the KDE bounds. Gradient SNR per layer, weight norms and last-layer margins
are tracked too, and a linear-SVM separability probe runs on the penultimate layer at the start
and the end. Writes results.json and infoplane_binned.png, infoplane_kde.png, margins.png,
grad_snr.png to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from collections import OrderedDict

import torch
from torch import nn

from mmim_ext.diagnostics import GradientSNR, margin_quantiles, separability_probe, weight_norms
from mmim_ext.infoplane import InfoPlaneRecorder, log_schedule, plot_infoplane
from mmim_ext.ops import kde_fused_available

__all__ = ["add_arguments", "run", "make_task", "build_net", "train_one", "WIDTHS"]

WIDTHS = (12, 10, 7, 5, 4, 3, 2)
ACTIVATIONS = ("tanh", "relu")
QUICK = {"epochs": 1000, "points": 20}
FULL = {"epochs": 8000, "points": 40}


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


def build_net(activation: str, seed: int) -> tuple[nn.Sequential, dict, dict]:
    """12-10-7-5-4-3-2 MLP; returns ``(model, hidden activation modules, linear layers)``.

    Weights ~ N(0, 1/fan_in), biases 0 (the initialization of Shwartz-Ziv & Tishby and Saxe et al.).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    g = torch.Generator().manual_seed(seed)
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    n_lin = len(WIDTHS) - 1
    for i in range(n_lin):
        lin = nn.Linear(WIDTHS[i], WIDTHS[i + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(WIDTHS[i]))
            lin.bias.zero_()
        mods[f"fc{i + 1}"] = lin
        if i < n_lin - 1:
            mods[f"h{i + 1}"] = nn.Tanh() if activation == "tanh" else nn.ReLU()
    model = nn.Sequential(mods)
    hidden = {f"h{i + 1}": getattr(model, f"h{i + 1}") for i in range(n_lin - 1)}
    linears = {f"fc{i + 1}": getattr(model, f"fc{i + 1}") for i in range(n_lin)}
    return model, hidden, linears


def train_one(activation: str, x, y, train_idx, test_idx, *, epochs: int, points: int, lr: float,
              batch_size: int, noise_var: float, seed: int, progress: bool = True, kde: bool = True) -> dict:
    """Train one network and record everything; returns a JSON-ready dict."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model, hidden, linears = build_net(activation, seed)
    layers = dict(hidden)
    layers["out"] = linears[f"fc{len(WIDTHS) - 1}"]
    if activation == "tanh":
        bin_range = {name: (-1.0, 1.0) for name in hidden}
    else:
        bin_range = {name: None for name in hidden}
    bin_range["out"] = (0.0, 1.0)
    rec = InfoPlaneRecorder(model, layers, x, y, schedule="log", n_epochs=epochs, n_points=points,
                            n_bins=30, bin_range=bin_range, noise_var=noise_var, kde=kde,
                            transforms={"out": lambda z: torch.softmax(z, dim=1)})
    snr = GradientSNR(model, linears)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    xtr, ytr = x[train_idx], y[train_idx]
    head = linears[f"fc{len(WIDTHS) - 1}"]
    gen = torch.Generator().manual_seed(seed + 1)
    history = {"margins": [], "weight_norms": [], "accuracy": []}

    def evaluate(epoch: int):
        model.eval()
        with torch.no_grad():
            logits = model(x)
        model.train()
        pred = logits.argmax(1)
        history["accuracy"].append({
            "epoch": epoch,
            "train": float((pred[train_idx] == y[train_idx]).double().mean()),
            "test": float((pred[test_idx] == y[test_idx]).double().mean()),
        })
        history["margins"].append({"epoch": epoch, **margin_quantiles(logits[train_idx], y[train_idx], head.weight)})
        history["weight_norms"].append({"epoch": epoch, **weight_norms(model, linears)})

    def penultimate(idx):
        store = {}
        h = hidden[f"h{len(WIDTHS) - 2}"].register_forward_hook(lambda m, i, o: store.setdefault("t", o.detach()))
        with torch.no_grad():
            model(x[idx])
        h.remove()
        return store["t"]

    # The net is tiny: a second thread only adds synchronization to every step, while the
    # recordings (N^2 kernel sums) do profit from all threads.
    eval_threads = torch.get_num_threads()

    def measure(epoch: int):
        torch.set_num_threads(eval_threads)
        try:
            rec.record(epoch)
            evaluate(epoch)
        finally:
            torch.set_num_threads(1)

    sep_start = separability_probe(penultimate(train_idx), ytr)
    measure(0)
    t0 = time.perf_counter()
    bar = tqdm(range(1, epochs + 1), desc=f"infoplane {activation}", disable=not progress, leave=False)
    try:
        for epoch in bar:
            order = torch.randperm(xtr.shape[0], generator=gen)
            for start in range(0, xtr.shape[0], batch_size):
                idx = order[start:start + batch_size]
                opt.zero_grad(set_to_none=False)
                loss = loss_fn(model(xtr[idx]), ytr[idx])
                loss.backward()
                snr.step()
                opt.step()
            snr.end_epoch(epoch)
            if rec.scheduled(epoch):
                measure(epoch)
                acc = history["accuracy"][-1]
                bar.set_postfix(train=f"{acc['train']:.3f}", test=f"{acc['test']:.3f}")
    finally:
        torch.set_num_threads(eval_threads)
    wall = time.perf_counter() - t0
    sep_end = separability_probe(penultimate(train_idx), ytr)
    return {
        "activation": activation,
        "infoplane": rec.records,
        "infoplane_config": rec.config(),
        "grad_snr": snr.history,
        "separability": {"start": sep_start, "end": sep_end},
        "wall_s": wall,
        **history,
    }


# ---- plots ---------------------------------------------------------------------------------


def _figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def plot_planes(results: dict, path: str, estimator: str, title: str) -> None:
    fig = _figure(6.0 * len(results), 4.8)
    for k, (act, res) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), k + 1)
        plot_infoplane(res["infoplane"], ax, estimator=estimator, title=f"{act}: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_margins(results: dict, path: str) -> None:
    fig = _figure(12.0, 7.5)
    colors = {"tanh": "tab:blue", "relu": "tab:red"}
    for row, kind in enumerate(("raw", "normalized")):
        ax = fig.add_subplot(2, 2, 2 * row + 1)
        for act, res in results.items():
            ep = [max(m["epoch"], 1) for m in res["margins"]]
            q = {k: [m[kind][k] for m in res["margins"]] for k in ("q05", "q25", "q50", "q75", "q95")}
            c = colors.get(act, None)
            ax.fill_between(ep, q["q05"], q["q95"], color=c, alpha=0.12, lw=0)
            ax.fill_between(ep, q["q25"], q["q75"], color=c, alpha=0.25, lw=0)
            ax.plot(ep, q["q50"], color=c, label=f"{act} median (bands: 25-75 %, 5-95 %)")
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("z_y - max z_k" if kind == "raw" else "min (z_y - z_k) / ||w_y - w_k||")
        ax.set_title(f"last-layer margins ({kind}), training set")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax = fig.add_subplot(2, 2, 2)
    for act, res in results.items():
        ep = [max(a["epoch"], 1) for a in res["accuracy"]]
        ax.plot(ep, [a["train"] for a in res["accuracy"]], color=colors.get(act), label=f"{act} train")
        ax.plot(ep, [a["test"] for a in res["accuracy"]], color=colors.get(act), ls="--", label=f"{act} test")
    ax.set_xscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(2, 2, 4)
    for act, res in results.items():
        for stage, ls in (("start", ":"), ("end", "-")):
            s = res["separability"][stage]
            ax.plot([r["n_components"] for r in s], [r["accuracy"] for r in s], ls, marker="o",
                    color=colors.get(act), label=f"{act} {stage}")
    ax.set_xlabel("principal components of the penultimate layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("linear SVM training accuracy")
    ax.set_title("separability probe")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _log_smooth(epochs, values, width: float = 0.1):
    """Mean of ``values`` over epochs within a factor ``1 +- width`` of each epoch (log-scale window)."""
    import numpy as np

    e = np.asarray(epochs, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(v)])
    lo = np.searchsorted(e, e / (1 + width), side="left")
    hi = np.searchsorted(e, e * (1 + width), side="right")
    return (c[hi] - c[lo]) / (hi - lo)


def plot_grad_snr(results: dict, path: str) -> None:
    import matplotlib

    fig = _figure(6.0 * len(results), 7.5)
    for k, (act, res) in enumerate(results.items()):
        layers = list(dict.fromkeys(r["layer"] for r in res["grad_snr"]))
        cmap = matplotlib.colormaps["viridis"]
        ax = fig.add_subplot(2, len(results), k + 1)
        ax2 = fig.add_subplot(2, len(results), len(results) + k + 1)
        for j, name in enumerate(layers):
            rows = [r for r in res["grad_snr"] if r["layer"] == name]
            ep = [r["epoch"] for r in rows]
            c = cmap(j / max(len(layers) - 1, 1))
            # Per-epoch values are noisy: thin raw curves, plus a +-10 % log-window mean.
            snr_v = [r["snr"] for r in rows]
            ax.plot(ep, snr_v, color=c, lw=0.4, alpha=0.35)
            ax.plot(ep, _log_smooth(ep, snr_v), color=c, lw=1.6, label=name)
            ax2.plot(ep, _log_smooth(ep, [r["mean_norm"] for r in rows]), color=c, lw=1.4, label=f"{name} ||mean||")
            ax2.plot(ep, _log_smooth(ep, [r["std_norm"] for r in rows]), color=c, lw=1.4, ls="--")
        for a in (ax, ax2):
            a.set_xscale("log")
            a.set_yscale("log")
            a.set_xlabel("epoch")
            a.grid(alpha=0.3)
            a.legend(fontsize=6, ncol=2)
        ax.set_ylabel("||mean g|| / ||std g||")
        ax.set_title(f"{act}: gradient SNR per layer")
        ax2.set_ylabel("norm")
        ax2.set_title(f"{act}: ||mean g|| (solid), ||std g|| (dashed), smoothed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _write_figures(results: dict, out: str, noise_var: float) -> list[str]:
    """Draw every figure the results support; returns the file names written."""
    names = ["infoplane_binned.png"]
    plot_planes(results, os.path.join(out, "infoplane_binned.png"), "binned", "binned (30 bins)")
    if all("i_xt_upper" in r for res in results.values() for r in res["infoplane"]):
        names.append("infoplane_kde.png")
        plot_planes(results, os.path.join(out, "infoplane_kde.png"), "kde_upper",
                    f"KDE upper bound (sigma^2={noise_var})")
    plot_margins(results, os.path.join(out, "margins.png"))
    plot_grad_snr(results, os.path.join(out, "grad_snr.png"))
    return names + ["margins.png", "grad_snr.png"]


# ---- command line --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m mmim_ext.experiments infoplane``."""
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['epochs']} epochs and {QUICK['points']} recording points (minutes on 2 cores)")
    parser.add_argument("--out", default=None, help="output directory (default results/infoplane[_quick])")
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {FULL['epochs']})")
    parser.add_argument("--points", type=int, default=None,
                        help=f"log-spaced recording epochs (default {FULL['points']})")
    parser.add_argument("--activations", default=",".join(ACTIVATIONS), help="comma-separated subset of tanh,relu")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--noise-var", type=float, default=0.1, help="KDE noise variance sigma^2")
    parser.add_argument("--no-kde", action="store_true", help="binning only (skip the KDE bounds and their figure)")
    parser.add_argument("--train-fraction", type=float, default=0.85)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the figures from an earlier run's --out/results.json")


def run(args) -> int:
    """Run the experiment; returns the exit code (2 on bad arguments)."""
    import sys

    acts = tuple(a.strip() for a in args.activations.split(",") if a.strip())
    bad = [a for a in acts if a not in ACTIVATIONS]
    preset = QUICK if args.quick else FULL
    epochs = args.epochs if args.epochs is not None else preset["epochs"]
    points = args.points if args.points is not None else preset["points"]
    errors = []
    if not acts or bad:
        errors.append(f"--activations must be a comma-separated subset of {','.join(ACTIVATIONS)}, got {args.activations!r}")
    if epochs < 1:
        errors.append(f"--epochs must be >= 1, got {epochs}")
    if points < 2:
        errors.append(f"--points must be >= 2, got {points}")
    if not (args.lr > 0):
        errors.append(f"--lr must be > 0, got {args.lr}")
    if args.batch_size < 1:
        errors.append(f"--batch-size must be >= 1, got {args.batch_size}")
    if not (args.noise_var > 0):
        errors.append(f"--noise-var must be > 0, got {args.noise_var}")
    if not (0 < args.train_fraction < 1):
        errors.append(f"--train-fraction must lie in (0, 1), got {args.train_fraction}")
    n_train = int(round(args.train_fraction * 4096))
    if args.batch_size >= 1 and 0 < args.train_fraction < 1 and math.ceil(n_train / args.batch_size) < 2:
        errors.append(f"--batch-size {args.batch_size} leaves one minibatch per epoch of {n_train} samples; "
                      "the gradient SNR needs at least 2")
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join("results", "infoplane" + ("_quick" if args.quick else ""))
    if args.replot:
        path = os.path.join(out, "results.json")
        if not os.path.exists(path):
            print(f"error: --replot needs {path}", file=sys.stderr)
            return 2
        with open(path) as f:
            payload = json.load(f)
        _write_figures(payload["results"], out, payload["config"]["noise_var"])
        print(f"redrew the figures in {out}")
        return 0
    os.makedirs(out, exist_ok=True)

    x, y, task = make_task()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(args.seed))
    n_train = int(round(args.train_fraction * x.shape[0]))
    train_idx, test_idx = perm[:n_train].sort().values, perm[n_train:].sort().values
    print(f"infoplane: 12-bit task, {x.shape[0]} inputs, {task['positive_fraction']:.3f} positive; "
          f"net {'-'.join(map(str, WIDTHS))}; {epochs} epochs, {len(log_schedule(epochs, points))} recordings; "
          f"KDE kernel {'fused' if kde_fused_available('cpu') else 'reference'} -> {out}", flush=True)
    results = {}
    for act in acts:
        res = train_one(act, x, y, train_idx, test_idx, epochs=epochs, points=points, lr=args.lr,
                        batch_size=args.batch_size, noise_var=args.noise_var, seed=args.seed,
                        progress=not args.no_progress, kde=not args.no_kde)
        results[act] = res
        acc = res["accuracy"][-1]
        print(f"  {act}: train {acc['train']:.4f}, test {acc['test']:.4f} after {epochs} epochs "
              f"({res['wall_s']:.0f} s)", flush=True)

    payload = {
        "task": task,
        "config": {"widths": list(WIDTHS), "epochs": epochs, "points": points, "lr": args.lr,
                   "batch_size": args.batch_size, "noise_var": args.noise_var, "seed": args.seed,
                   "train_fraction": args.train_fraction, "n_train": n_train, "optimizer": "Adam",
                   "kde": not args.no_kde,
                   "kde_backend": "fused" if kde_fused_available("cpu") else "reference", "units": "bits"},
        "results": results,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(payload, f, indent=1)
    written = _write_figures(results, out, args.noise_var)
    for act, res in results.items():
        last = {r["layer"]: r for r in res["infoplane"] if r["epoch"] == epochs}
        first = {r["layer"]: r for r in res["infoplane"] if r["epoch"] == 0}
        peak = {}
        for r in res["infoplane"]:
            peak[r["layer"]] = max(peak.get(r["layer"], 0.0), r["i_xt_bin"])
        print(f"  {act} binned I(X;T) first -> peak -> last (bits): " + ", ".join(
            f"{k} {first[k]['i_xt_bin']:.2f}->{peak[k]:.2f}->{last[k]['i_xt_bin']:.2f}" for k in last))
    print(f"wrote {out}/results.json, " + ", ".join(written))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
