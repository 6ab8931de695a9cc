"""``results.json``, ``results.md`` and the plots of a Table 1 experiment."""

from __future__ import annotations

import json
import math
import os

import numpy as np

from mmim_ext.experiments.models import ARCHS
from mmim_ext.experiments.protocol import METHOD_LABELS, METHODS

__all__ = ["format_measurements", "format_table", "format_tuning", "log_x_axis", "plot_results", "write_outputs"]

_MI_LABELS = {"pairwise_mi_sum": "Σ I(h_i;h_j)", "cond_pairwise_mi_sum": "Σ I(h_i;h_j\\|Y)",
              "sum_unit_label_mi": "Σ I(Y;h_i)", "label_mi": "I(Y;h)"}


def _f(x, fmt="{:+.2f}"):
    return "—" if x is None else fmt.format(x)


def _p(p):
    return "—" if p is None else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def format_table(results: dict) -> str:
    """Markdown: one table per architecture, methods as rows: test accuracy (mean ± std over
    seeds), paired Δ to the baseline with its 95% CI, p-values (t, Holm-adjusted t, Wilcoxon),
    wins/ties/losses, λ (``edge`` when the search chose an end of the grid), body epochs."""
    rows = results["rows"]
    lines = []
    for arch in [a for a in ARCHS if any(r["arch"] == a for r in rows)]:
        rs = [r for r in rows if r["arch"] == arch]
        n = sorted({len(r["accs"]) for r in rs})
        lines += [f"**{results['dataset']} / {arch}**: test accuracy (%), mean ± std over "
                  f"{'/'.join(map(str, n))} seeds; Δ = paired difference to the baseline (same seed), 95% t-interval.",
                  "", "| Method | Acc. (%) | Δ vs baseline [95% CI] | p (t) | p (t, Holm) | p (Wilcoxon) | W/T/L | λ | "
                  "body epochs (median) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            if "diff_vs_baseline_mean" in r and r.get("ci95"):
                d = f"{r['diff_vs_baseline_mean']:+.2f} [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]"
            elif "diff_vs_baseline_mean" in r:
                d = f"{r['diff_vs_baseline_mean']:+.2f}"
            else:
                d = "—"
            wtl = f"{r['wins']}/{r['ties']}/{r['losses']}" if "wins" in r else "—"
            lam = "—" if r["method"] in ("baseline", "baseline+c3") else f"{r['reg_weight']:g}"
            if r.get("lambda_at_grid_edge"):
                lam += " (edge)"
            lines.append(f"| {METHOD_LABELS[r['method']]} | {r['acc_mean']:.2f} ± {r['acc_std']:.2f} | {d} | "
                         f"{_p(r.get('p_t'))} | {_p(r.get('p_t_holm'))} | {_p(r.get('p_wilcoxon'))} | {wtl} | {lam} | "
                         f"{int(np.median(r['epochs_used']))}" + (f" + {r['c3_epochs']} C3" if r["c3_epochs"] else "")
                         + " |")
        lines.append("")
    ref = results.get("paper_reference")
    if ref:
        lines.append(f"Paper (for reference, {ref['dataset']}): MLP {ref['mlp']['baseline']} → {ref['mlp']['mmim']}, "
                     f"CNN {ref['cnn']['baseline']} → {ref['cnn']['mmim']} (baseline → MMIM).")
    return "\n".join(lines) + "\n"


def format_measurements(results: dict) -> str:
    """Markdown: held-out information per method (mean over seeds, nats) and its paired
    difference to the baseline with a 95% CI."""
    lines = []
    for arch in [a for a in ARCHS if any(r["arch"] == a and "mi" in r for r in results["rows"])]:
        rs = [r for r in results["rows"] if r["arch"] == arch and "mi" in r]
        lines += [f"**{arch}**: held-out measurements (nats; mean over seeds; Δ vs baseline [95% CI]).", "",
                  "| Method | " + " | ".join(_MI_LABELS.values()) + " |", "|---|" + "---:|" * len(_MI_LABELS)]
        for r in rs:
            cells = []
            for k in _MI_LABELS:
                e = r["mi"][k]
                c = f"{e['mean']:.3g}"
                if e.get("ci95"):
                    c += f" (Δ {e['diff_vs_baseline_mean']:+.3g} [{e['ci95'][0]:+.3g}, {e['ci95'][1]:+.3g}])"
                cells.append(c)
            lines.append(f"| {METHOD_LABELS[r['method']]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n" if lines else ""


def format_tuning(tuning: dict | None) -> str:
    """Markdown: validation accuracy (mean ± std over the tuning seeds) per λ; chosen λ in bold."""
    if not tuning:
        return ""
    grid = tuning["grid"]
    lines = [f"Validation accuracy (%) per λ, mean ± std over tuning seeds {tuning['seeds']} (epoch cap "
             f"{tuning['max_epochs']}); chosen λ in bold, `edge` = chosen at an end of the grid.", "",
             "| Arch | Method | " + " | ".join(f"λ={g:g}" for g in grid) + " | edge |", "|---|---|" + "---:|" * (len(grid) + 1)]
    for c in tuning["curves"]:
        by = {p["reg_weight"]: p for p in c["points"]}
        cells = []
        for g in grid:
            p = by.get(g)
            s = "—" if p is None else f"{p['val_acc_mean']:.2f} ± {p['val_acc_std']:.2f}"
            cells.append(f"**{s}**" if g == c["chosen"] else s)
        lines.append(f"| {c['arch']} | {c['method']} | " + " | ".join(cells) + f" | {'yes' if c['lambda_at_grid_edge'] else 'no'} |")
    base = {c["arch"]: c["baseline_val_acc_mean"] for c in tuning["curves"]}
    lines += [""] + [f"Baseline validation accuracy ({a}): {v:.2f}" for a, v in base.items() if v is not None]
    return "\n".join(lines) + "\n"


def log_x_axis(ax) -> None:
    """Log-scale the x axis of a panel whose data are drawn, with readable tick labels.

    Matplotlib labels the minor ticks (2x10^2, 3x10^2, ...) of a range under a few decades, and
    those labels overlap: only the decades are labelled, and 1, 2 and 5 times each decade (as
    plain numbers) when the data span under two decades.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    if lo > 0 and math.log10(hi / lo) < 2:
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _log_x_panel(ax, xlabel: str, ylabel: str, title: str) -> None:
    """The finish of a panel over a log-scaled x axis (λ, measured MI): labels, legend, grid."""
    log_x_axis(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)


def _save(plt, fig, path: str, *, left: float = 0.1, bottom: float = 0.12) -> str:
    """Write one row of per-architecture panels to ``path`` (PNG, 90 dpi), close it, return ``path``."""
    fig.subplots_adjust(left=left, right=0.98, bottom=bottom, top=0.9, wspace=0.25)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_results(results: dict, records: list[dict], out_dir: str) -> list[str]:
    """``paired_diffs.png`` (Δ vs baseline per method with 95% CIs, seeds as dots),
    ``tuning.png`` (validation accuracy vs λ per method) and ``acc_vs_redundancy.png``
    (test accuracy vs held-out Σ I(h_i;h_j), one dot per run). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = results["rows"]
    archs = [a for a in ARCHS if any(r["arch"] == a for r in rows)]
    fig, axes = plt.subplots(1, len(archs), figsize=(7 * len(archs), 4.5), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        rs = [r for r in rows if r["arch"] == arch and "diff_vs_baseline_mean" in r]
        base = {s: a for r in rows if r["arch"] == arch and r["method"] == "baseline" for s, a in zip(r["seeds"], r["accs"])}
        for i, r in enumerate(rs):
            d = [a - base[s] for s, a in zip(r["seeds"], r["accs"]) if s in base]
            ax.scatter(np.full(len(d), i) + np.linspace(-0.15, 0.15, len(d)), d, s=10, color="0.5", zorder=2)
            if r.get("ci95"):
                lo, hi = r["ci95"]
                ax.errorbar([i], [r["diff_vs_baseline_mean"]], yerr=[[r["diff_vs_baseline_mean"] - lo], [hi - r["diff_vs_baseline_mean"]]],
                            fmt="o", color="C3", capsize=5, zorder=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(rs)), [r["method"] for r in rs], rotation=30, ha="right")
        ax.set_ylabel("test acc. − baseline (points)")
        ax.set_title(f"{results['dataset']} / {arch}: paired Δ, 95% CI (dots = seeds)")
        ax.grid(axis="y", alpha=0.3)
    # wider bottom margin: the methods' names stand rotated under the axis
    paths.append(_save(plt, fig, os.path.join(out_dir, "paired_diffs.png"), left=0.11, bottom=0.22))

    tuning = results.get("tuning")
    if tuning:
        fig, axes = plt.subplots(1, len(archs), figsize=(7 * len(archs), 4.5), squeeze=False)
        for ax, arch in zip(axes[0], archs):
            for k, c in enumerate(c for c in tuning["curves"] if c["arch"] == arch):
                pts = c["points"]
                ax.errorbar([p["reg_weight"] for p in pts], [p["val_acc_mean"] for p in pts],
                            yerr=[p["val_acc_std"] for p in pts], marker="o", ms=3, capsize=2, label=c["method"], color=f"C{k}")
            b = next((c["baseline_val_acc_mean"] for c in tuning["curves"] if c["arch"] == arch), None)
            if b is not None:
                ax.axhline(b, color="k", ls="--", lw=1, label="baseline")
            _log_x_panel(ax, "λ", "validation accuracy (%)",
                         f"{arch}: λ search (mean ± std over seeds {tuning['seeds']})")
        paths.append(_save(plt, fig, os.path.join(out_dir, "tuning.png")))

    with_mi = [r for r in records if "mi" in r]
    if with_mi:
        fig, axes = plt.subplots(1, len(archs), figsize=(7 * len(archs), 4.5), squeeze=False)
        for ax, arch in zip(axes[0], archs):
            for k, m in enumerate(METHODS):
                rs = [r for r in with_mi if r["arch"] == arch and r["method"] == m]
                if rs:
                    ax.scatter([r["mi"]["pairwise_mi_sum"] for r in rs], [r["acc_test"] for r in rs], s=14,
                               label=m, color="k" if m == "baseline" else f"C{k % 10}", marker="x" if "c3" in m or m == "mmim" else "o")
            _log_x_panel(ax, "held-out Σ_{i<j} I(h_i;h_j) (nats, estimated)", "test accuracy (%)",
                         f"{results['dataset']} / {arch}: accuracy vs measured redundancy (one dot per run)")
        paths.append(_save(plt, fig, os.path.join(out_dir, "acc_vs_redundancy.png")))
    return paths


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_outputs(results: dict, records: list[dict], out_dir: str, *, plots: bool = True) -> list[str]:
    """Write ``results.json``, ``results.md`` and (if ``plots``) the PNGs; returns the PNG paths.
    The per-run records (with histories) stay in ``out_dir/runs``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(_json_safe(results), f, indent=1)
    pngs = plot_results(results, records, out_dir) if plots else []
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(f"# Table 1 protocol on {results['dataset']}\n\n")
        f.write(format_table(results) + "\n")
        f.write(format_measurements(results) + "\n")
        f.write(format_tuning(results.get("tuning")) + "\n")
        if results.get("incomplete_seeds_left_out"):
            f.write("Seeds left out (not every method had finished): "
                    + ", ".join(results["incomplete_seeds_left_out"]) + ".\n")
        if pngs:
            f.write("Plots: " + ", ".join(os.path.basename(p) for p in pngs) + ".\n")
    return pngs
