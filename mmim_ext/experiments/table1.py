"""The MMIM paper's Table 1 protocol: {mlp, cnn} x {baseline, mmim, c4, c5, c6, rdm}.

Protocol (what makes the comparison fair):

* Every method of one architecture starts from the same initial weights for a given seed
  (``torch.manual_seed(seed)`` right before the model is built) and sees the same mini-batch
  order (a ``DataLoader`` whose shuffling generator is seeded with the seed).
* Every method gets the same number of passes over the training data, ``epochs``. MMIM spends
  them in two stages: ``epochs - stage2`` with ``loss + lambda*C1`` and then ``stage2`` (about
  20% of the budget, at least one epoch) training only a Gaussian output layer on frozen features
  with the C3 bound (docs/design.md).
* Regularizer strengths come from :data:`DEFAULT_REG_WEIGHTS`, chosen by :func:`tune` on the
  validation split (carved out of the training set). The test split is used once per run, for
  the reported accuracy.
* Statistics: mean and sample standard deviation over seeds, and the paired difference to the
  baseline (same seeds, same initializations), which removes most seed-to-seed noise.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from mmim_ext.experiments.data import Splits
from mmim_ext.experiments.models import ARCHS, build_model

__all__ = [
    "DEFAULT_REG_WEIGHTS",
    "METHODS",
    "TUNE_GRID",
    "Table1Config",
    "format_table",
    "merge_runs",
    "plot_results",
    "reg_weight_for",
    "run_one",
    "run_table1",
    "tune",
]

METHODS = ("baseline", "mmim", "c4", "c5", "c6", "rdm")
METHOD_LABELS = {"baseline": "Baseline", "mmim": "MMIM (C1 then C3)", "c4": "C4 = I(h)",
                 "c5": "C5 = −I(h\\|Y)", "c6": "C6 = −Σ I(Y;h_i)", "rdm": "RDM (C4 + C5)"}

#: Candidate strengths searched by ``--tune`` (log-spaced; the penalties are in nats).
TUNE_GRID = (1e-4, 1e-3, 1e-2)

#: Regularizer strength per dataset, architecture and method, chosen on the validation split by
#: :func:`tune` (see docs/table1.md for the validation accuracies behind each value). Datasets
#: without their own entry (Fashion-MNIST: no data on the machine that made these) use
#: the "default" entry.
DEFAULT_REG_WEIGHTS: dict[str, dict[str, dict[str, float]]] = {
    "default": {arch: {m: 1e-3 for m in METHODS if m != "baseline"} for arch in ARCHS},
}


def reg_weight_for(dataset: str, arch: str, method: str, overrides: dict | None = None) -> float:
    """The strength used for ``method`` (0.0 for the baseline); ``overrides[arch][method]`` wins."""
    if method == "baseline":
        return 0.0
    if overrides and arch in overrides and method in overrides[arch]:
        return float(overrides[arch][method])
    table = DEFAULT_REG_WEIGHTS.get(dataset, DEFAULT_REG_WEIGHTS["default"])
    return float(table.get(arch, DEFAULT_REG_WEIGHTS["default"][arch])[method])


@dataclass
class Table1Config:
    """Settings of one Table 1 run. ``epochs`` is the per-method budget (passes over train)."""

    dataset: str
    archs: tuple[str, ...] = ARCHS
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    width: int = 128
    stage2_fraction: float = 0.2
    c3_beta: float = 1.0
    c3_prior_std: float = 0.1
    reg_weights: dict = field(default_factory=dict)  # {arch: {method: lambda}} overriding defaults
    # Passed to make_regularizer. Defaults sized for 2 CPU cores: 1,024 of the 8,128 pairs of a
    # 128-unit layer per step (an unbiased estimate of the full pairwise sum; every pair's critic
    # is still updated about every eighth step) and critics with 8 hidden units.
    reg_kwargs: dict = field(default_factory=lambda: {"max_pairs": 1024, "hidden": 8})
    device: str = "cpu"
    progress: bool = True

    def validate(self) -> None:
        bad = [a for a in self.archs if a not in ARCHS]
        if bad or not self.archs:
            raise ValueError(f"argument 'archs' must be a non-empty subset of {', '.join(ARCHS)}, got {list(self.archs)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"argument 'methods' must be a non-empty subset of {', '.join(METHODS)}, got {list(self.methods)}")
        if self.epochs < 1:
            raise ValueError(f"argument 'epochs' must be >= 1, got {self.epochs}")
        if "mmim" in self.methods and self.epochs < 2:
            raise ValueError("argument 'epochs' must be >= 2 when method 'mmim' runs (stage 1 and stage 2 need one each)")
        if not self.seeds:
            raise ValueError("argument 'seeds' must name at least one seed")
        if self.batch_size < 2:
            raise ValueError(f"argument 'batch_size' must be >= 2 (MINE needs pairs of samples), got {self.batch_size}")
        if not 0.0 < self.stage2_fraction < 1.0:
            raise ValueError(f"argument 'stage2_fraction' must be in (0, 1), got {self.stage2_fraction}")

    def stage_epochs(self) -> tuple[int, int]:
        """(stage1, stage2) epochs of MMIM; they add up to ``epochs``."""
        s2 = min(self.epochs - 1, max(1, int(round(self.stage2_fraction * self.epochs))))
        return self.epochs - s2, s2


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def _train_loader(x, y, batch_size: int, seed: int) -> DataLoader:
    # A dedicated generator: the batch order depends on the seed only, not on how much of the
    # global RNG a method's critics consumed, so every method sees the same order.
    gen = torch.Generator().manual_seed(int(seed))
    bs = min(batch_size, len(y))
    # drop_last: a trailing batch of one sample has no pairs to shuffle for MINE.
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, generator=gen, drop_last=True)


def _eval_loader(x, y) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=1024, shuffle=False)


def _clean_history(history) -> list[dict]:
    """Keep the JSON-able scalars of a training history (list of per-epoch dicts)."""
    out = []
    for rec in history or []:
        row = {}
        flat = dict(rec)
        # The helper nests the regularizer's terms ({"terms": {"c4": ..}}); lift them up.
        flat.update(flat.pop("terms", None) or {})
        for k, v in flat.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                row[k] = float(v) if isinstance(v, float) else v
            elif isinstance(v, str):
                row[k] = v
        out.append(row)
    return out


def run_one(splits: Splits, arch: str, method: str, seed: int, cfg: Table1Config, *,
            reg_weight: float | None = None, eval_sets=("val", "test")) -> dict:
    """Train one (arch, method, seed) and return accuracies (percent), wall time and history.

    Returns a dict with ``acc_val``/``acc_test`` (for the requested ``eval_sets``), ``wall_s``
    (training only), ``reg_weight`` and ``history`` (per-epoch dicts from the training helper).
    """
    from mmim_ext.regularizers import make_regularizer
    from mmim_ext.training import accuracy, train_classifier, train_mmim

    if reg_weight is None:
        reg_weight = reg_weight_for(splits.name, arch, method, cfg.reg_weights)
    _seed_everything(seed)
    body, head = build_model(arch, splits.input_shape, splits.num_classes, width=cfg.width)
    body.to(cfg.device)
    head.to(cfg.device)
    loader = _train_loader(splits.x_train, splits.y_train, cfg.batch_size, seed)
    common = dict(lr=cfg.lr, device=cfg.device, progress=cfg.progress)

    t0 = time.perf_counter()
    if method == "baseline":
        history = train_classifier(body, head, loader, epochs=cfg.epochs, **common)
        final_head = head
    else:
        reg = make_regularizer(method, cfg.width, splits.num_classes, **cfg.reg_kwargs)
        reg.to(cfg.device)
        if method == "mmim":
            s1, s2 = cfg.stage_epochs()
            final_head, history = train_mmim(
                body, head, loader, stage1_epochs=s1, stage2_epochs=s2, regularizer=reg,
                reg_weight=reg_weight, beta=cfg.c3_beta, prior_std=cfg.c3_prior_std,
                n_train=len(splits.y_train), **common)
        else:
            history = train_classifier(body, head, loader, epochs=cfg.epochs, regularizer=reg,
                                       reg_weight=reg_weight, **common)
            final_head = head
    wall = time.perf_counter() - t0

    out = {"arch": arch, "method": method, "seed": int(seed), "reg_weight": float(reg_weight),
           "wall_s": wall, "history": _clean_history(history)}
    for part in eval_sets:
        x, y = getattr(splits, f"x_{part}"), getattr(splits, f"y_{part}")
        out[f"acc_{part}"] = float(accuracy(body, final_head, _eval_loader(x, y), device=cfg.device))
    return out


def _mean_std(xs) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std


def _summarize(cfg: Table1Config, runs: list[dict]) -> list[dict]:
    rows = []
    base = {(r["arch"], r["seed"]): r["acc_test"] for r in runs if r["method"] == "baseline"}
    for arch in cfg.archs:
        for method in cfg.methods:
            rs = sorted((r for r in runs if r["arch"] == arch and r["method"] == method), key=lambda r: r["seed"])
            if not rs:
                continue
            accs = [r["acc_test"] for r in rs]
            mean, std = _mean_std(accs)
            row = {"arch": arch, "method": method, "acc_mean": mean, "acc_std": std, "accs": accs,
                   "seeds": [r["seed"] for r in rs], "epochs": cfg.epochs,
                   "wall_s": sum(r["wall_s"] for r in rs), "reg_weight": rs[0]["reg_weight"],
                   "val_accs": [r.get("acc_val") for r in rs]}
            if method == "mmim":
                row["stage_epochs"] = list(cfg.stage_epochs())
            diffs = [r["acc_test"] - base[(arch, r["seed"])] for r in rs if (arch, r["seed"]) in base]
            if method != "baseline" and diffs:
                dm, ds = _mean_std(diffs)
                row["diff_vs_baseline_mean"] = dm
                row["diff_vs_baseline_std"] = ds
                row["wins_vs_baseline"] = sum(d > 0 for d in diffs)
            rows.append(row)
    return rows


def format_table(results: dict) -> str:
    """Markdown table laid out like the paper's Table 1: methods as rows, architectures as columns.

    Each cell: test accuracy mean ± sample std over seeds (%), then the paired difference to the
    baseline (mean ± std over seeds) and the regularizer strength.
    """
    rows = results["rows"]
    archs = [a for a in ARCHS if any(r["arch"] == a for r in rows)]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    by = {(r["arch"], r["method"]): r for r in rows}
    nseeds = sorted({len(r["accs"]) for r in rows})
    ns = "/".join(str(n) for n in nseeds)
    head = "| Method | " + " | ".join(f"{a.upper()} acc. (%) | {a.upper()} Δ vs baseline | {a.upper()} λ" for a in archs) + " |"
    sep = "|---|" + "---:|---:|---:|" * len(archs)
    lines = [f"Test accuracy on {results['dataset']}, mean ± std over {ns} seeds, {results['config']['epochs']} epochs per method "
             "(Δ: paired difference to the baseline with the same seed; wins = seeds where the method beats it).",
             "", head, sep]
    for m in methods:
        cells = []
        for a in archs:
            r = by.get((a, m))
            if r is None:
                cells += ["—", "—", "—"]
                continue
            acc = f"{r['acc_mean']:.2f} ± {r['acc_std']:.2f}"
            if "diff_vs_baseline_mean" in r:
                d = (f"{r['diff_vs_baseline_mean']:+.2f} ± {r['diff_vs_baseline_std']:.2f} "
                     f"({r['wins_vs_baseline']}/{len(r['accs'])} wins)")
            else:
                d = "—"
            lam = "—" if m == "baseline" else f"{r['reg_weight']:g}"
            cells += [acc, d, lam]
        lines.append(f"| {METHOD_LABELS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Per-epoch quantities worth a panel: task loss, the MI terms (nats), the C3 bound, train accuracy.
_PLOTTED_TERMS = ("ce", "c4", "c5", "c6", "c3_bound")


def _history_terms(history: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Numeric per-epoch series of a history, keyed by name; x counts epochs from 1 across stages.

    The record's own "epoch" field is not used: MMIM's stage 2 may restart its count.
    """
    series: dict[str, list[tuple[float, float]]] = {}
    for i, rec in enumerate(history):
        x = i + 1
        for k, v in rec.items():
            if k not in _PLOTTED_TERMS or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            series.setdefault(k, []).append((float(x), float(v)))
    return series


def plot_results(results: dict, runs: list[dict], out_dir: str) -> list[str]:
    """Write ``accuracy.png`` (per-method test accuracy, seeds as dots) and ``mi_terms.png``
    (every logged term of the first seed's run over epochs, one panel per term). Returns paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = results["rows"]
    archs = [a for a in ARCHS if any(r["arch"] == a for r in rows)]
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4.2), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        rs = [r for r in rows if r["arch"] == arch]
        xs = np.arange(len(rs))
        means = [r["acc_mean"] for r in rs]
        ax.bar(xs, means, yerr=[r["acc_std"] for r in rs], color=["0.6"] + ["C0"] * (len(rs) - 1),
               alpha=0.6, capsize=4)
        for x, r in zip(xs, rs):
            ax.scatter(np.full(len(r["accs"]), x) + np.linspace(-0.15, 0.15, len(r["accs"])), r["accs"],
                       color="k", s=12, zorder=3)
        lo = min(min(r["accs"]) for r in rs)
        hi = max(max(r["accs"]) for r in rs)
        pad = max(0.5, 0.15 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(xs, [r["method"] for r in rs])
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{results['dataset']} / {arch}: mean ± std, dots = seeds")
        ax.grid(axis="y", alpha=0.3)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.9, wspace=0.25)
    p = os.path.join(out_dir, "accuracy.png")
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths.append(p)

    # Terms over training: first seed of each (arch, method); one panel per term name.
    first_seed = min(r["seed"] for r in runs)
    sel = [r for r in runs if r["seed"] == first_seed]
    present = {k for r in sel for k in _history_terms(r["history"])}
    names = [k for k in _PLOTTED_TERMS if k in present]
    if names:
        ncol = min(5, len(names))
        nrow_per = math.ceil(len(names) / ncol)
        fig, axes = plt.subplots(nrow_per * len(archs), ncol, figsize=(4.2 * ncol, 3.0 * nrow_per * len(archs)),
                                 squeeze=False)
        for ai, arch in enumerate(archs):
            for ni, name in enumerate(names):
                ax = axes[ai * nrow_per + ni // ncol][ni % ncol]
                for mi, method in enumerate(METHODS):
                    for r in sel:
                        if r["arch"] == arch and r["method"] == method:
                            s = _history_terms(r["history"]).get(name)
                            if s:
                                ax.plot([a for a, _ in s], [b for _, b in s], marker=".", label=method,
                                        color="0.4" if method == "baseline" else f"C{mi}")
                ax.set_title(f"{arch}: {name}", fontsize=9)
                ax.set_xlabel("epoch", fontsize=8)
                ax.tick_params(labelsize=7)
                if ax.lines:
                    ax.legend(fontsize=6)
            for ni in range(len(names), nrow_per * ncol):
                axes[ai * nrow_per + ni // ncol][ni % ncol].axis("off")
        fig.suptitle(f"{results['dataset']}: batch-mean terms per epoch (seed {first_seed}; nats)")
        # Fixed margins: tight_layout costs seconds per figure on a busy 2-core machine.
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.1, top=0.88, wspace=0.3, hspace=0.45)
        p = os.path.join(out_dir, "mi_terms.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=True, dynamic_ncols=True)


def run_table1(splits: Splits, cfg: Table1Config, out_dir: str | None = None, *, plots: bool = True) -> dict:
    """Run every (arch, method, seed) of ``cfg`` and return the results dict.

    When ``out_dir`` is given, writes ``results.json``, ``results.md``, ``runs.json`` (per-run
    histories) and the plots there. Results: ``{"dataset", "config", "rows": [{"arch", "method",
    "acc_mean", "acc_std", "accs", "seeds", "epochs", "wall_s", ...}], "total_wall_s"}``.
    """
    cfg.validate()
    runs = []
    t0 = time.perf_counter()
    jobs = [(a, m, s) for a in cfg.archs for s in cfg.seeds for m in cfg.methods]
    with _progress(len(jobs), f"table1 {splits.name}", cfg.progress) as bar:
        for arch, method, seed in jobs:
            bar.set_postfix_str(f"{arch}/{method}/seed {seed}")
            runs.append(run_one(splits, arch, method, seed, cfg))
            bar.update(1)
    results = {"dataset": splits.name, "sizes": splits.sizes(), "config": _config_json(cfg),
               "rows": _summarize(cfg, runs), "total_wall_s": time.perf_counter() - t0,
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    if out_dir:
        write_outputs(results, runs, out_dir, plots=plots)
    return results


def _config_json(cfg: Table1Config) -> dict:
    d = asdict(cfg)
    d["archs"], d["methods"], d["seeds"] = list(cfg.archs), list(cfg.methods), list(cfg.seeds)
    d["stage_epochs_mmim"] = list(cfg.stage_epochs()) if cfg.epochs >= 2 else None
    return d


def write_outputs(results: dict, runs: list[dict], out_dir: str, *, plots: bool = True) -> list[str]:
    """Write results.json, runs.json, results.md and (if ``plots``) the PNGs; returns the PNG paths."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "runs.json"), "w") as f:
        json.dump(runs, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(f"# Table 1 protocol on {results['dataset']}\n\n")
        f.write(format_table(results))
        f.write(f"\nTotal wall time {results['total_wall_s']:.0f} s (torch {results['torch']}, "
                f"{results['threads']} threads)." + (" Plots: accuracy.png, mi_terms.png.\n" if plots else "\n"))
    return plot_results(results, runs, out_dir) if plots else []


def merge_runs(dirs, out_dir: str | None = None, *, plots: bool = True) -> dict:
    """Combine earlier run directories (their ``runs.json`` and ``results.json``) into one table.

    The directories must hold the same data set and epochs, e.g. one run per architecture started
    in parallel. Writes the merged outputs to ``out_dir`` if given and returns the results dict.
    """
    runs, metas = [], []
    for d in dirs:
        for name in ("runs.json", "results.json"):
            if not os.path.isfile(os.path.join(d, name)):
                raise FileNotFoundError(f"--merge: {os.path.join(d, name)} not found (not a finished table1 --out directory)")
        with open(os.path.join(d, "runs.json")) as f:
            runs += json.load(f)
        with open(os.path.join(d, "results.json")) as f:
            metas.append(json.load(f))
    for key in ("dataset",):
        vals = {m[key] for m in metas}
        if len(vals) != 1:
            raise ValueError(f"--merge: directories disagree on {key}: {sorted(vals)}")
    if len({m["config"]["epochs"] for m in metas}) != 1:
        raise ValueError("--merge: directories disagree on epochs")
    seen = set()
    for r in runs:
        k = (r["arch"], r["method"], r["seed"])
        if k in seen:
            raise ValueError(f"--merge: run {k} appears twice")
        seen.add(k)
    conf = dict(metas[0]["config"])
    conf["archs"] = [a for a in ARCHS if any(r["arch"] == a for r in runs)]
    conf["methods"] = [m for m in METHODS if any(r["method"] == m for r in runs)]
    conf["seeds"] = sorted({r["seed"] for r in runs})
    cfg = Table1Config(dataset=metas[0]["dataset"], archs=tuple(conf["archs"]), methods=tuple(conf["methods"]),
                       seeds=tuple(conf["seeds"]), epochs=conf["epochs"])
    results = {"dataset": metas[0]["dataset"], "sizes": metas[0].get("sizes"), "config": conf,
               "rows": _summarize(cfg, runs), "total_wall_s": sum(m["total_wall_s"] for m in metas),
               "torch": metas[0].get("torch"), "threads": metas[0].get("threads"),
               "merged_from": [os.path.abspath(d) for d in dirs]}
    if out_dir:
        write_outputs(results, runs, out_dir, plots=plots)
    return results


def tune(splits: Splits, cfg: Table1Config, grid=TUNE_GRID, seeds=(100, 101), out_dir: str | None = None) -> dict:
    """Choose each method's strength on the validation split (never the test split).

    For every architecture and regularized method, trains with each ``lambda`` in ``grid`` for
    each of ``seeds`` (disjoint from the table's seeds by default) and keeps the value with the
    best mean validation accuracy (ties -> the smaller ``lambda``). Returns
    ``{"dataset", "grid", "seeds", "chosen": {arch: {method: lambda}}, "scores": [...]}`` and
    writes ``tune.json`` / ``tune.md`` to ``out_dir`` if given.
    """
    cfg.validate()
    grid = [float(g) for g in grid]
    if not grid or any(not (g >= 0.0 and math.isfinite(g)) for g in grid):
        raise ValueError(f"argument 'grid' must be non-negative finite strengths, got {grid}")
    methods = [m for m in cfg.methods if m != "baseline"]
    jobs = [(a, m, lam, s) for a in cfg.archs for m in methods for lam in grid for s in seeds]
    jobs += [(a, "baseline", 0.0, s) for a in cfg.archs for s in seeds]
    scores: dict[tuple, list] = {}
    t0 = time.perf_counter()
    with _progress(len(jobs), f"tune {splits.name}", cfg.progress) as bar:
        for arch, method, lam, seed in jobs:
            bar.set_postfix_str(f"{arch}/{method}/λ={lam:g}/seed {seed}")
            r = run_one(splits, arch, method, seed, cfg, reg_weight=lam, eval_sets=("val",))
            scores.setdefault((arch, method, lam), []).append(r["acc_val"])
            bar.update(1)
    chosen: dict[str, dict[str, float]] = {}
    table = []
    for (arch, method, lam), accs in scores.items():
        mean, std = _mean_std(accs)
        table.append({"arch": arch, "method": method, "reg_weight": lam, "val_acc_mean": mean,
                      "val_acc_std": std, "val_accs": accs})
    for arch in cfg.archs:
        for method in methods:
            cand = [t for t in table if t["arch"] == arch and t["method"] == method]
            best = max(cand, key=lambda t: (round(t["val_acc_mean"], 6), -t["reg_weight"]))
            chosen.setdefault(arch, {})[method] = best["reg_weight"]
    out = {"dataset": splits.name, "grid": grid, "seeds": list(seeds), "epochs": cfg.epochs,
           "chosen": chosen, "scores": table, "wall_s": time.perf_counter() - t0}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "tune.json"), "w") as f:
            json.dump(out, f, indent=1)
        with open(os.path.join(out_dir, "tune.md"), "w") as f:
            f.write(format_tune(out))
    return out


def format_tune(tuned: dict) -> str:
    """Markdown: validation accuracy (mean ± std over the tuning seeds) per strength."""
    grid = tuned["grid"]
    lines = [f"Validation accuracy (%) on {tuned['dataset']}, mean ± std over seeds {tuned['seeds']}, "
             f"{tuned['epochs']} epochs; chosen λ in bold.", "",
             "| Arch | Method | " + " | ".join(f"λ={g:g}" for g in grid) + " |",
             "|---|---|" + "---:|" * len(grid)]
    for t in tuned["scores"]:
        if t["method"] == "baseline":
            lines.append(f"| {t['arch']} | baseline | {t['val_acc_mean']:.2f} ± {t['val_acc_std']:.2f} (no λ) |"
                         + " |" * (len(grid) - 1))
    by = {(t["arch"], t["method"], t["reg_weight"]): t for t in tuned["scores"]}
    for arch, per in tuned["chosen"].items():
        for method, lam in per.items():
            cells = []
            for g in grid:
                t = by[(arch, method, g)]
                c = f"{t['val_acc_mean']:.2f} ± {t['val_acc_std']:.2f}"
                cells.append(f"**{c}**" if g == lam else c)
            lines.append(f"| {arch} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
