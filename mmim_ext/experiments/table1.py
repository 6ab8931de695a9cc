"""The MMIM paper's Table 1 as an experiment that can confirm or refute MMIM.

Pieces (one module each):

* :mod:`~mmim_ext.experiments.protocol`   methods, equal body budgets (the baseline's early
  stopping sets them), the C3 stage after the budget, one run;
* :mod:`~mmim_ext.experiments.runner`     one JSON per run, resumable, shardable over processes;
* :mod:`~mmim_ext.experiments.measure`    information measured on held-out features;
* :mod:`~mmim_ext.experiments.statistics` paired CIs and tests against the baseline;
* :mod:`~mmim_ext.experiments.reporting`  ``results.json``, ``results.md`` and the plots;
* this module: λ search on tuning seeds, the table's summary, the whole run and ``--merge``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace

import torch

from mmim_ext.experiments.measure import MeasureConfig, measure_information
from mmim_ext.experiments.models import ARCHS
from mmim_ext.experiments.protocol import (BODY_OF, METHODS, TUNE_GRID, TUNED_METHODS, WITH_C3, ProtocolConfig)
from mmim_ext.experiments.runner import RunStore, plan_table, plan_tune, run_jobs, wait_for
from mmim_ext.experiments.statistics import holm, paired_stats

__all__ = [
    "DEFAULT_REG_WEIGHTS",
    "METHODS",
    "PAPER_TABLE1",
    "TUNE_GRID",
    "Table1Config",
    "check_equal_budgets",
    "merge_runs",
    "reg_weight_for",
    "run_table1",
    "select_lambdas",
    "summarize",
]

#: The paper's reported Fashion-MNIST test accuracies (%), shown next to our numbers.
PAPER_TABLE1 = {"dataset": "fashion-mnist",
                "mlp": {"baseline": 89.15, "mmim": 90.82}, "cnn": {"baseline": 90.89, "mmim": 92.39}}

#: λ used when no search runs (``--quick``, ``--no-tune``): per dataset and architecture the
#: values the λ search chose (docs/table1.md), else ``default``.
DEFAULT_REG_WEIGHTS: dict[str, dict[str, dict[str, float]]] = {
    "default": {arch: {m: 1e-3 for m in TUNED_METHODS} for arch in ARCHS},
}

#: The held-out measurements summarized per method (keys of :func:`measure_information`).
MI_KEYS = ("pairwise_mi_sum", "pairwise_mi_mean", "cond_pairwise_mi_sum", "cond_pairwise_mi_mean",
           "sum_unit_label_mi", "label_mi")


def reg_weight_for(dataset: str, arch: str, method: str, overrides: dict | None = None) -> float:
    """λ of ``method`` without a search (0.0 for the baseline bodies); ``overrides[arch][method]`` wins."""
    if BODY_OF.get(method) == "baseline":
        return 0.0
    if overrides and arch in overrides and method in overrides[arch]:
        return float(overrides[arch][method])
    table = DEFAULT_REG_WEIGHTS.get(dataset, DEFAULT_REG_WEIGHTS["default"])
    return float(table.get(arch, DEFAULT_REG_WEIGHTS["default"][arch]).get(method, 1e-3))


@dataclass
class Table1Config:
    """One Table 1 experiment (both phases). ``protocol`` is the template of every
    architecture's :class:`ProtocolConfig` (its ``arch`` is replaced); ``tune_max_epochs`` caps
    the tuning runs' budget (shorter than the table's to save time, see docs/table1.md)."""

    dataset: str
    archs: tuple[str, ...] = ARCHS
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = tuple(range(10))
    tune: bool = True
    tune_seeds: tuple[int, ...] = (1000, 1001, 1002)
    grid: tuple[float, ...] = TUNE_GRID
    tune_max_epochs: int | None = None
    protocol: ProtocolConfig = field(default_factory=lambda: ProtocolConfig("digits", "mlp"))
    measure: MeasureConfig | None = field(default_factory=MeasureConfig)
    reg_weights: dict = field(default_factory=dict)  # {arch: {method: λ}}, used when tune=False

    def validate(self) -> None:
        bad = [a for a in self.archs if a not in ARCHS]
        if bad or not self.archs:
            raise ValueError(f"argument 'archs' must be a non-empty subset of {', '.join(ARCHS)}, got {list(self.archs)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"argument 'methods' must be a non-empty subset of {', '.join(METHODS)}, got {list(self.methods)}")
        if "baseline" not in self.methods:
            raise ValueError("argument 'methods' must include 'baseline' (it sets every seed's budget)")
        if not self.seeds:
            raise ValueError("argument 'seeds' must name at least one seed")
        if self.tune:
            if set(self.tune_seeds) & set(self.seeds) or not self.tune_seeds:
                raise ValueError(f"argument 'tune_seeds' must be non-empty and disjoint from the table's seeds, "
                                 f"got {list(self.tune_seeds)} and {list(self.seeds)}")
            if len(self.grid) < 2 or any(not (g > 0 and math.isfinite(g)) for g in self.grid):
                raise ValueError(f"argument 'grid' must hold at least two positive strengths, got {list(self.grid)}")
        self.protocol.validate()

    def protocols(self, phase: str) -> dict[str, ProtocolConfig]:
        cap = self.tune_max_epochs if phase == "tune" and self.tune_max_epochs else self.protocol.max_epochs
        return {a: replace(self.protocol, dataset=self.dataset, arch=a, max_epochs=cap) for a in self.archs}


def select_lambdas(records: list[dict], archs, methods, grid) -> tuple[dict, list[dict]]:
    """Choose λ per (arch, method) from tuning records: the highest mean validation accuracy over
    the tuning seeds (ties: lower mean validation loss, then the smaller λ).

    Returns ``(chosen {arch: {method: λ}}, curves)``; ``curves`` has one row per (arch, method)
    with the validation accuracy and loss per λ (mean, std, per seed), the chosen λ and
    ``lambda_at_grid_edge`` (the choice is the smallest or largest λ tried: the optimum may lie
    outside the grid).
    """
    grid = sorted(float(g) for g in grid)
    chosen: dict[str, dict[str, float]] = {}
    curves = []
    for arch in archs:
        base = [r for r in records if r["arch"] == arch and r["method"] == "baseline"]
        for method in (m for m in methods if m in TUNED_METHODS):
            points = []
            for lam in grid:
                rs = [r for r in records if r["arch"] == arch and r["method"] == method
                      and math.isclose(r["reg_weight"], lam, rel_tol=1e-9)]
                if not rs:
                    continue
                acc = torch.tensor([r["acc_val"] for r in rs], dtype=torch.float64)
                loss = torch.tensor([r["val_loss"] for r in rs], dtype=torch.float64)
                points.append({"reg_weight": lam, "val_acc_mean": float(acc.mean()),
                               "val_acc_std": float(acc.std()) if len(rs) > 1 else 0.0,
                               "val_loss_mean": float(loss.mean()), "val_accs": acc.tolist(),
                               "seeds": [r["seed"] for r in rs]})
            if not points:
                raise ValueError(f"select_lambdas: no tuning runs for {arch}/{method}")
            best = max(points, key=lambda p: (round(p["val_acc_mean"], 9), -p["val_loss_mean"], -p["reg_weight"]))
            chosen.setdefault(arch, {})[method] = best["reg_weight"]
            curves.append({"arch": arch, "method": method, "points": points, "chosen": best["reg_weight"],
                           "lambda_at_grid_edge": best["reg_weight"] in (grid[0], grid[-1]),
                           "baseline_val_acc_mean": (sum(r["acc_val"] for r in base) / len(base)) if base else None})
    return chosen, curves


def check_equal_budgets(records: list[dict]) -> dict:
    """Body epochs per (arch, seed) from the recorded histories (stage-1 records); raises if two
    methods of one seed trained their bodies for different numbers of epochs. Returns
    ``{"arch/seed": epochs}``."""
    seen: dict[tuple, dict] = {}
    for r in records:
        n = sum(1 for h in r["history"] if h.get("stage", 1) == 1)
        if n != r["epochs_used"]:
            raise ValueError(f"{r['arch']}/{r['method']}/seed {r['seed']}: history has {n} body epochs, "
                             f"epochs_used says {r['epochs_used']}")
        seen.setdefault((r["arch"], r["seed"]), {})[r["method"]] = n
    out = {}
    for (arch, seed), per in seen.items():
        if len(set(per.values())) != 1:
            raise ValueError(f"unequal body budgets for {arch}, seed {seed}: {per}")
        out[f"{arch}/{seed}"] = next(iter(per.values()))
    return out


def _mean_std(xs):
    t = torch.tensor([float(x) for x in xs], dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if len(xs) > 1 else 0.0)


def summarize(records: list[dict], *, dataset: str, archs, methods, tuning: dict | None = None) -> dict:
    """The results dict of a table: one row per (arch, method) with accuracies over seeds, the
    paired statistics against the baseline (:func:`paired_stats`, Holm-adjusted ``p_t_holm``
    within an architecture), epochs, λ, the tuning curve's edge flag and the held-out
    measurements (mean over seeds and paired difference to the baseline)."""
    budgets = check_equal_budgets(records)
    rows = []
    edge = {(c["arch"], c["method"]): c["lambda_at_grid_edge"] for c in (tuning or {}).get("curves", [])}
    for arch in archs:
        base = {r["seed"]: r for r in records if r["arch"] == arch and r["method"] == "baseline"}
        arch_rows = []
        for method in methods:
            rs = sorted((r for r in records if r["arch"] == arch and r["method"] == method), key=lambda r: r["seed"])
            if not rs:
                continue
            accs = [r["acc_test"] for r in rs]
            mean, std = _mean_std(accs)
            row = {"arch": arch, "method": method, "seeds": [r["seed"] for r in rs], "accs": accs,
                   "acc_mean": mean, "acc_std": std, "val_accs": [r["acc_val"] for r in rs],
                   "reg_weight": rs[0]["reg_weight"], "lambda_at_grid_edge": edge.get((arch, method)),
                   "epochs_used": [r["epochs_used"] for r in rs], "best_epochs": [r["best_epoch"] for r in rs],
                   "c3_epochs": rs[0]["c3_epochs"], "wall_s": sum(r["wall_s"] for r in rs)}
            if method in WITH_C3:
                row["c3_bound_mean"] = _mean_std([r["c3_bound"] for r in rs])[0]
            paired = [(r, base[r["seed"]]) for r in rs if r["seed"] in base]
            if method != "baseline" and paired:
                st = paired_stats([r["acc_test"] - b["acc_test"] for r, b in paired])
                row.update(diff_vs_baseline_mean=st["mean"], diff_vs_baseline_sd=st["sd"], ci95=st["ci95"],
                           p_t=st["p_t"], p_wilcoxon=st["p_wilcoxon"], wins=st["wins"], ties=st["ties"],
                           losses=st["losses"], n_paired=st["n"])
            if all("mi" in r for r in rs):
                mi = {}
                for k in MI_KEYS:
                    vals = [r["mi"][k] for r in rs]
                    entry = {"mean": _mean_std(vals)[0], "sd": _mean_std(vals)[1], "values": vals}
                    if method != "baseline" and paired and all("mi" in b for _, b in paired):
                        st = paired_stats([r["mi"][k] - b["mi"][k] for r, b in paired])
                        entry.update(diff_vs_baseline_mean=st["mean"], ci95=st["ci95"], p_t=st["p_t"])
                    mi[k] = entry
                row["mi"] = mi
            arch_rows.append(row)
        adj = holm({r["method"]: r.get("p_t") for r in arch_rows if r["method"] != "baseline"})
        for r in arch_rows:
            if r["method"] in adj:
                r["p_t_holm"] = adj[r["method"]]
        rows += arch_rows
    return {"dataset": dataset, "rows": rows, "body_epochs": budgets, "equal_body_budgets": True,
            "tuning": tuning, "paper_reference": PAPER_TABLE1}


def run_table1(splits, cfg: Table1Config, out_dir: str, *, shard=(0, 1), phase: str = "all",
               wait_timeout_s: float | None = None, plots: bool = True, log=print) -> dict | None:
    """Run this shard's part of the experiment, then (when every run exists) write the results.

    ``phase``: ``"tune"``, ``"table"`` or ``"all"``. After its tuning jobs a shard waits for the
    others' before choosing λ. Returns the results dict, or ``None`` if other shards' table runs
    are still missing (the last shard to finish writes the results; ``--merge`` can always).
    """
    from mmim_ext.experiments.reporting import write_outputs

    cfg.validate()
    if phase not in ("all", "tune", "table"):
        raise ValueError(f"argument 'phase' must be 'all', 'tune' or 'table', got {phase!r}")
    store = RunStore(out_dir)
    t0 = time.perf_counter()
    tuning = None
    if cfg.tune:
        tune_jobs = plan_tune(cfg.archs, cfg.tune_seeds, cfg.grid, cfg.methods)
        if phase in ("all", "tune"):
            run_jobs(store, splits, cfg.protocols("tune"), tune_jobs, shard=shard, log=log)
        if phase == "tune":
            return None
        wait_for(store, tune_jobs, timeout_s=wait_timeout_s, log=log)
        tune_recs = [r for r in store.records("tune") if r["arch"] in cfg.archs]
        chosen, curves = select_lambdas(tune_recs, cfg.archs, cfg.methods, cfg.grid)
        tuning = {"seeds": list(cfg.tune_seeds), "grid": list(cfg.grid), "chosen": chosen, "curves": curves,
                  "max_epochs": cfg.protocols("tune")[cfg.archs[0]].max_epochs}
        lambdas = {a: {m: chosen[a].get(m, 0.0) for m in cfg.methods} for a in cfg.archs}
    else:
        lambdas = {a: {m: reg_weight_for(cfg.dataset, a, m, cfg.reg_weights) for m in cfg.methods} for a in cfg.archs}
    table_jobs = plan_table(cfg.archs, cfg.seeds, cfg.methods, lambdas)
    measure = None
    if cfg.measure is not None:
        mcfg = cfg.measure

        def measure(h, y):
            return measure_information(h, y, mcfg)
    run_jobs(store, splits, cfg.protocols("table"), table_jobs, shard=shard, measure=measure, log=log)
    recs = [store.load("table", j.arch, m, j.reg_weight, j.seed) for j in table_jobs for m in j.methods]
    if any(r is None for r in recs):
        log(f"{sum(r is None for r in recs)} table runs of other shards are missing; results not written "
            f"(run --merge {out_dir} when they have finished)")
        return None
    order = tuple(m for m in METHODS if m in cfg.methods)  # the table's row order, as --merge writes it
    results = summarize(recs, dataset=cfg.dataset, archs=cfg.archs, methods=order, tuning=tuning)
    results.update(config=_config_json(cfg), sizes=splits.sizes(), wall_s_this_process=time.perf_counter() - t0,
                   torch=torch.__version__, threads=torch.get_num_threads(),
                   run_wall_s=sum(r["wall_s"] for r in recs))
    write_outputs(results, recs, out_dir, plots=plots)
    return results


def _config_json(cfg: Table1Config) -> dict:
    return {"dataset": cfg.dataset, "archs": list(cfg.archs), "methods": list(cfg.methods), "seeds": list(cfg.seeds),
            "tune": cfg.tune, "tune_seeds": list(cfg.tune_seeds), "grid": list(cfg.grid),
            "tune_max_epochs": cfg.tune_max_epochs, "protocol": cfg.protocol.fingerprint(),
            "measure": cfg.measure.to_dict() if cfg.measure else None, "reg_weights": cfg.reg_weights}


def merge_runs(dirs, out_dir: str | None = None, *, plots: bool = True) -> dict:
    """Combine the per-run files of earlier ``--out`` directories (e.g. one per architecture or
    per machine) into one results dict, written to ``out_dir`` if given.

    Tuning runs choose λ again from all tuning records found; table runs must agree on the data
    set, and a run present twice must be the same run (same settings and accuracy).
    """
    from mmim_ext.experiments.reporting import write_outputs

    table, tune = {}, {}
    for d in dirs:
        store = RunStore(d)
        if not os.path.isdir(os.path.join(d, "runs")):
            raise FileNotFoundError(f"--merge: {os.path.join(d, 'runs')} not found (not a table1 --out directory)")
        for phase, into in (("table", table), ("tune", tune)):
            for r in store.records(phase):
                k = (r["arch"], r["method"], r["reg_weight"], r["seed"])
                if k in into and (into[k]["acc_test"], into[k]["config"]) != (r["acc_test"], r["config"]):
                    raise ValueError(f"--merge: run {k} appears twice with different results")
                into[k] = r
    recs = list(table.values())
    if not recs:
        raise ValueError(f"--merge: no table runs under {list(dirs)}")
    datasets = {r["dataset"] for r in recs}
    if len(datasets) != 1:
        raise ValueError(f"--merge: directories disagree on the data set: {sorted(datasets)}")
    archs = tuple(a for a in ARCHS if any(r["arch"] == a for r in recs))
    methods = tuple(m for m in METHODS if any(r["method"] == m for r in recs))
    # A seed enters the table only once every method of its architecture has run on it, so that
    # every row is paired over the same seeds (an interrupted experiment merges cleanly).
    have = {(r["arch"], r["seed"]): set() for r in recs}
    for r in recs:
        have[(r["arch"], r["seed"])].add(r["method"])
    want = {a: {r["method"] for r in recs if r["arch"] == a} for a in archs}
    incomplete = sorted(k for k, ms in have.items() if ms != want[k[0]])
    recs = [r for r in recs if (r["arch"], r["seed"]) not in set(incomplete)]
    if not recs:
        raise ValueError(f"--merge: no seed has finished every method yet (incomplete: {incomplete})")
    tuning = None
    if tune:
        grid = sorted({r["reg_weight"] for r in tune.values() if r["method"] != "baseline"})
        chosen, curves = select_lambdas(list(tune.values()), archs, [m for m in methods if m in TUNED_METHODS], grid)
        tuning = {"seeds": sorted({r["seed"] for r in tune.values()}), "grid": grid, "chosen": chosen,
                  "curves": curves, "max_epochs": next(iter(tune.values()))["config"]["max_epochs"]}
        for r in recs:
            if r["method"] in TUNED_METHODS and not math.isclose(r["reg_weight"], chosen[r["arch"]][r["method"]]):
                raise ValueError(f"--merge: table run {r['arch']}/{r['method']}/seed {r['seed']} used λ="
                                 f"{r['reg_weight']:g}, the tuning runs choose {chosen[r['arch']][r['method']]:g}")
    results = summarize(recs, dataset=datasets.pop(), archs=archs, methods=methods, tuning=tuning)
    results.update(config={"protocol": recs[0]["config"], "seeds": sorted({r["seed"] for r in recs})},
                   merged_from=[os.path.abspath(d) for d in dirs], run_wall_s=sum(r["wall_s"] for r in recs),
                   incomplete_seeds_left_out=[f"{a}/{s}" for a, s in incomplete],
                   torch=torch.__version__)
    if out_dir:
        write_outputs(results, recs, out_dir, plots=plots)
    return results
