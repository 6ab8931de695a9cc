"""Figures of the information-plane study, drawn from the per-run files and the merged summary.

Every plane shows the mean over seeds per layer (points coloured by epoch, log scale) with
+-1 sd crosses; every curve over epochs shows the mean with a +-1 sd band. Titles name the
estimator and the binning scheme; all information is in bits.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np

from mmim_ext.experiments.infoplane_merge import ESTIMATORS, estimator_label, series, unfit_runs
from mmim_ext.experiments.reporting import log_x_axis

__all__ = ["write_figures"]

_LAYER_CMAP = "viridis"


def _figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _mean_series(runs: list[dict], est: str) -> dict[str, dict]:
    """Per layer: epochs and mean / sd over seeds of ``i_xt`` and ``i_ty``."""
    per = [series(r, est) for r in runs]
    out = {}
    for layer in per[0]:
        xt = np.array([p[layer]["i_xt"] for p in per])
        ty = np.array([p[layer]["i_ty"] for p in per])
        sd = (lambda a: a.std(axis=0, ddof=1)) if len(per) > 1 else (lambda a: np.zeros(a.shape[1]))
        out[layer] = {"epoch": per[0][layer]["epoch"], "xt": xt.mean(0), "ty": ty.mean(0), "xt_sd": sd(xt),
                      "ty_sd": sd(ty)}
    return out


def _plane(ax, runs, est, title):
    from matplotlib.colors import LogNorm

    ms = _mean_series(runs, est)
    e_max = max(max(s["epoch"]) for s in ms.values())
    norm = LogNorm(vmin=1, vmax=max(e_max, 2))
    sc = None
    for layer, s in ms.items():
        ep = np.maximum(np.array(s["epoch"]), 1)
        ax.errorbar(s["xt"], s["ty"], xerr=s["xt_sd"], yerr=s["ty_sd"], fmt="none", ecolor="0.75", lw=0.6, zorder=0)
        ax.plot(s["xt"], s["ty"], color="0.55", lw=0.8, zorder=1)
        sc = ax.scatter(s["xt"], s["ty"], c=ep, cmap="viridis", norm=norm, s=16, edgecolors="none", zorder=2)
        ax.annotate(layer, (s["xt"][-1], s["ty"][-1]), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("I(X;T) [bits]")
    ax.set_ylabel("I(T;Y) [bits]")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.figure.colorbar(sc, ax=ax, label="epoch")


def _band(ax, x, mean, sd, color, label, **kw):
    ax.plot(x, mean, color=color, label=label, **kw)
    ax.fill_between(x, mean - sd, mean + sd, color=color, alpha=0.18, lw=0)


def _ixt_epochs(ax, runs, est, title):
    import matplotlib

    ms = _mean_series(runs, est)
    cmap = matplotlib.colormaps[_LAYER_CMAP]
    for j, (layer, s) in enumerate(ms.items()):
        _band(ax, np.maximum(np.array(s["epoch"]), 1), s["xt"], s["xt_sd"], cmap(j / max(len(ms) - 1, 1)), layer)
    log_x_axis(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel("I(X;T) [bits]")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)


def _groups(runs: dict) -> dict[str, dict[str, list]]:
    """Clean-label and random-label settings grouped by regime: ``{"sgd": {"tanh": runs}, "sgd_random": ...}``."""
    out: dict[str, dict[str, list]] = {}
    for key, rs in runs.items():
        st = rs[0]["setting"]
        if st["label_noise"] > 0:
            continue
        g = st["optimizer"] + ("_random" if st["random_labels"] else "")
        out.setdefault(g, {})[st["activation"]] = rs
    return out


def _n(rs):
    """"10 seeds", and for true labels how many of them ended without fitting the training set
    (their collapse pulls the means)."""
    text = f"{len(rs)} seed{'s' if len(rs) != 1 else ''}"
    unfit = len(unfit_runs({"": rs}))
    return text + (f", {unfit} not fitted at the end" if unfit else "")


def _planes_figures(runs, cfg, out) -> list[str]:
    names = []
    ests = ESTIMATORS(cfg["noise_vars"])
    primary = ["binned_adaptive", "binned_fixed", f"kde_{max(cfg['noise_vars']):g}"]
    for group, acts in sorted(_groups(runs).items()):
        for kind, draw in (("planes", _plane), ("ixt_epochs", _ixt_epochs)):
            fig = _figure(5.2 * len(acts), 4.0 * len(primary))
            for i, est in enumerate(primary):
                for j, (act, rs) in enumerate(sorted(acts.items())):
                    ax = fig.add_subplot(len(primary), len(acts), i * len(acts) + j + 1)
                    draw(ax, rs, est, f"{act}, {group} ({_n(rs)})\n{estimator_label(est, cfg)}")
            fig.tight_layout()
            names.append(f"{kind}_{group}.png")
            fig.savefig(os.path.join(out, names[-1]), dpi=100)
        kdes = [e for e in ests if e.startswith("kde_")]
        fig = _figure(5.2 * len(kdes), 4.0 * len(acts))
        for i, (act, rs) in enumerate(sorted(acts.items())):
            for j, est in enumerate(kdes):
                ax = fig.add_subplot(len(acts), len(kdes), i * len(kdes) + j + 1)
                _plane(ax, rs, est, f"{act}, {group} ({_n(rs)})\n{estimator_label(est, cfg)}")
        fig.tight_layout()
        names.append(f"kde_noise_{group}.png")
        fig.savefig(os.path.join(out, names[-1]), dpi=100)
    return names


def _compression_figure(payload, cfg, out) -> str:
    settings = {k: s for k, s in payload["settings"].items() if s["setting"]["label_noise"] == 0}
    ests = ESTIMATORS(cfg["noise_vars"])
    fig = _figure(4.6 * len(ests), 4.2)
    keys = sorted(settings)
    for i, est in enumerate(ests):
        ax = fig.add_subplot(1, len(ests), i + 1)
        layers = list(settings[keys[0]]["compression"]) if keys else []
        width = 0.8 / max(len(keys), 1)
        for j, key in enumerate(keys):
            comp = settings[key]["compression"]
            m = [comp[ly][est]["mean"] for ly in layers]
            sd = [comp[ly][est]["sd"] or 0.0 for ly in layers]
            ax.bar(np.arange(len(layers)) + (j - (len(keys) - 1) / 2) * width, m, width, yerr=sd, capsize=2,
                   label=f"{key} (n={len(settings[key]['seeds'])})")
        ax.set_xticks(np.arange(len(layers)), layers)
        ax.set_ylabel("compression: peak - final I(X;T) [bits]")
        ax.set_title(estimator_label(est, cfg), fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compression.png"), dpi=100)
    return "compression.png"


def _convergence_figure(runs, payload, out) -> str:
    import matplotlib

    main = payload["main_regime"]
    fig = _figure(5.2 * max(len(main), 1), 4.2)
    cmap = matplotlib.colormaps[_LAYER_CMAP]
    for i, (act, key) in enumerate(sorted(main.items())):
        run = runs[key][0]
        ax = fig.add_subplot(1, len(main), i + 1)
        rows = run["bin_convergence"]
        for j, row in enumerate(rows):
            ax.plot(row["bin_width"], row["i_xt"], marker="o", ms=3, color=cmap(j / max(len(rows) - 1, 1)),
                    label=row["layer"])
        ax.axhline(math.log2(run["infoplane_config"]["n_samples"]), color="k", lw=0.7, ls="--", label="log2 N")
        log_x_axis(ax)
        ax.set_xlabel("bin width (fixed-width bins)")
        ax.set_ylabel("binned I(X;T) [bits]")
        ax.set_title(f"{key}, seed {run['seed']}, final network: I(X;T) as bins shrink", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bin_convergence.png"), dpi=100)
    return "bin_convergence.png"


def _snr_figure(runs, out) -> str:
    import matplotlib

    groups = {g: a for g, a in _groups(runs).items() if not g.endswith("_random")}
    acts = sorted({a for g in groups.values() for a in g})
    fig = _figure(5.2 * len(acts), 4.0 * len(groups))
    cmap = matplotlib.colormaps[_LAYER_CMAP]
    for i, (group, per) in enumerate(sorted(groups.items())):
        for j, act in enumerate(acts):
            if act not in per:
                continue
            ax = fig.add_subplot(len(groups), len(acts), i * len(acts) + j + 1)
            rs = per[act]
            layers = list(dict.fromkeys(r["layer"] for r in rs[0]["grad_snr"]))
            for k, layer in enumerate(layers):
                ep = np.array([r["epoch"] for r in rs[0]["grad_snr"] if r["layer"] == layer])
                v = np.array([[r["snr"] for r in run["grad_snr"] if r["layer"] == layer] for run in rs], dtype=float)
                # A dead layer (every gradient zero) has no SNR (0/0, stored as inf or nan): such
                # seeds are left out of that point's mean rather than blanking the curve.
                v[~np.isfinite(v)] = np.nan
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    m = np.nanmean(v, 0)
                    sd = np.nan_to_num(np.nanstd(v, 0, ddof=1)) if len(rs) > 1 else 0 * ep
                _band(ax, ep, m, sd, cmap(k / max(len(layers) - 1, 1)), layer)
            log_x_axis(ax)
            ax.set_yscale("log")
            ax.set_xlabel("epoch")
            ax.set_ylabel("||mean g|| / ||std g|| (minibatches of an epoch)")
            ax.set_title(f"{act}, {group} ({_n(rs)}): gradient SNR per layer\n(mean over the seeds where the "
                         "layer's gradient is not identically zero)", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "grad_snr.png"), dpi=100)
    return "grad_snr.png"


def _svm_figure(runs, out) -> str:
    import matplotlib

    fig = _figure(17.0, 4.4)
    ax1, ax2, ax3 = (fig.add_subplot(1, 3, k) for k in (1, 2, 3))
    clean = {k: rs for k, rs in runs.items() if not rs[0]["setting"]["random_labels"]
             and rs[0]["setting"]["label_noise"] == 0}
    colors = matplotlib.colormaps["tab10"]
    for c, (key, rs) in enumerate(sorted(clean.items())):
        epochs = [a["epoch"] for a in rs[0]["accuracy"]]  # every recording; the SVM starts later
        ep = np.maximum(np.array(epochs), 1)
        for ax, field, ls in ((ax1, "cosine", "-"), (ax2, "net_margin", "-"), (ax2, "svm_margin", "--")):
            # Recordings without an SVM fit, or where libsvm hit its iteration cap, are NaN.
            v = np.full((len(rs), len(epochs)), np.nan)
            for i, r in enumerate(rs):
                for h in r["svm"]:
                    if h.get("converged", True):
                        v[i, epochs.index(h["epoch"])] = h[field]
            lab = f"{key} ({_n(rs)})" if field != "svm_margin" else None
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
                m, sd = np.nanmean(v, 0), (np.nanstd(v, 0, ddof=1) if len(rs) > 1 else 0 * ep)
            _band(ax, ep, m, np.nan_to_num(sd), colors(c % 10), lab, ls=ls, marker="o", ms=3)
    ax1.set_ylabel("cos(w_y - w_k, SVM normal)")
    ax1.set_title("last layer vs hard-margin linear SVM on the penultimate features\n(from the first recording "
                  "with >= 99 % training accuracy; non-converged fits left out)", fontsize=8)
    ax2.set_ylabel("min normalized margin (feature units)")
    ax2.set_yscale("symlog", linthresh=1e-2)
    ax2.set_title("network (solid) vs SVM (dashed) minimum margin, training set", fontsize=8)
    for ax in (ax1, ax2):
        if not any(np.isfinite(line.get_ydata()).any() for line in ax.get_lines()):
            ax.text(0.5, 0.5, "no SVM fit: no recording with >= 99 % training accuracy", ha="center",
                    transform=ax.transAxes, fontsize=8)
            continue
        log_x_axis(ax)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    noises = sorted({rs[0]["setting"]["label_noise"] for rs in runs.values() if not rs[0]["setting"]["random_labels"]})
    # colour: activation and optimizer; marker: label-noise level
    # (the same colours as the curves: the true-label setting keys "<activation>_<optimizer>", sorted)
    nets = sorted({f"{rs[0]['setting']['activation']}_{rs[0]['setting']['optimizer']}" for rs in runs.values()})
    markers = ("o", "s", "^", "D", "v", "P")
    for key, rs in sorted(runs.items()):
        st = rs[0]["setting"]
        if st["random_labels"]:
            continue
        col = colors(nets.index(f"{st['activation']}_{st['optimizer']}") % 10)
        ax3.scatter([r["final"]["margin_median"] for r in rs], [r["final"]["test_accuracy_clean"] for r in rs],
                    color=col, marker=markers[noises.index(st["label_noise"]) % len(markers)], s=22, alpha=0.8,
                    label=f"{st['activation']} {st['optimizer']}, label noise {st['label_noise']:g}")
    ax3.set_xlabel("median normalized training margin (feature units)")
    ax3.set_ylabel("test accuracy (clean labels)")
    ax3.set_title("margin vs generalization across seeds and label noise", fontsize=8)
    ax3.grid(alpha=0.3)
    ax3.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "svm_margin.png"), dpi=100)
    return "svm_margin.png"


def _probe_figures(payload, out) -> list[str]:
    pr = payload["probes"]
    names = []
    sep = pr.get("separability_test_accuracy")
    if sep:
        layers = list(sep["end"])
        fig = _figure(5.0 * len(layers), 4.0)
        for i, layer in enumerate(layers):
            ax = fig.add_subplot(1, len(layers), i + 1)
            for clf, color in (("linear_svm", "tab:blue"), ("knn", "tab:red")):
                for stage, ls in (("start", ":"), ("end", "-")):
                    d = sep[stage][layer][clf]
                    ks = sorted(d, key=int)
                    m = np.array([d[k]["mean"] for k in ks])
                    sd = np.array([d[k]["sd"] or 0.0 for k in ks])
                    _band(ax, [int(k) for k in ks], m, sd, color, f"{clf} ({'init' if stage == 'start' else 'trained'})",
                          ls=ls, marker="o", ms=3)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("principal components kept (fitted on the training split)")
            ax.set_ylabel("held-out accuracy")
            ax.set_title(f"{layer} ({pr['separability_config']['layers'][layer]}) of "
                         f"{'-'.join(map(str, pr['separability_config']['widths']))} tanh, {len(pr['seeds'])} seeds",
                         fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "separability.png"), dpi=100)
        names.append("separability.png")
    res = pr.get("residual")
    if res:
        fig = _figure(5.6 * len(res), 4.2)
        for i, (block, rows) in enumerate(sorted(res.items())):
            ax = fig.add_subplot(1, len(res), i + 1)
            ep = np.maximum(np.array([r["epoch"] for r in rows]), 1)
            for field, color, label in (("lipschitz_bound", "tab:red", "Lip(F) bound (product of spectral norms)"),
                                        ("jacobian_max", "tab:orange", "max over inputs of ||J_F(x)||"),
                                        ("ratio_max", "tab:blue", "max over inputs of ||F(x)|| / ||x||"),
                                        ("ratio_q50", "tab:cyan", "median ||F(x)|| / ||x||")):
                m = np.array([r[field]["mean"] for r in rows])
                sd = np.array([r[field]["sd"] or 0.0 for r in rows])
                _band(ax, ep, m, sd, color, label)
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            log_x_axis(ax)
            ax.set_yscale("log")
            ax.set_xlabel("epoch")
            ax.set_ylabel("ratio / Lipschitz constant")
            ax.set_title(f"residual block {block} ({len(pr['seeds'])} seeds): certified invertible while the "
                         "red curve is below 1", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "residual.png"), dpi=100)
        names.append("residual.png")
    return names


def write_figures(runs: dict, probes: list, payload: dict, out: str) -> list[str]:
    """Draw every figure the merged results support into ``out``; returns the file names."""
    names = []
    if runs:
        cfg = payload["config"]
        names += _planes_figures(runs, cfg, out)
        names.append(_compression_figure(payload, cfg, out))
        if payload["main_regime"]:
            names.append(_convergence_figure(runs, payload, out))
        names.append(_snr_figure(runs, out))
        names.append(_svm_figure(runs, out))
    if probes:
        names += _probe_figures(payload, out)
    return names
