"""Merging the per-run JSON files of an information-plane output folder into ``results.json``.

Every run (one seed x one setting) is one file ``run_<setting>_seed<N>.json``; the probes of a seed
are ``probe_seed<N>.json``. :func:`merge` reads whatever is there, summarizes over seeds (mean
and sample standard deviation), adds the paired comparisons between settings
(:mod:`mmim_ext.experiments.infoplane_report`) and writes ``results.json`` and ``results.md``; the
figures are drawn by :mod:`mmim_ext.experiments.infoplane_plots`.
"""

from __future__ import annotations

import glob
import json
import math
import os

from mmim_ext.experiments.infoplane_report import comparisons, format_markdown, margin_vs_accuracy
from mmim_ext.experiments.infoplane_train import FIT_ACCURACY, SVM_FINAL_KEYS, svm_is_current

__all__ = ["ESTIMATORS", "load_runs", "load_probes", "series", "compression", "mean_sd", "final", "unfit_runs",
           "summarize_runs", "merge", "run_path", "probe_path", "estimator_label"]


def run_path(out: str, key: str, seed: int) -> str:
    return os.path.join(out, f"run_{key}_seed{seed}.json")


def probe_path(out: str, seed: int) -> str:
    return os.path.join(out, f"probe_seed{seed}.json")


def ESTIMATORS(noise_vars) -> list[str]:  # noqa: N802 - reads as the list it returns
    """Estimator names of a run: the two binning schemes and the KDE upper bound at each sigma^2."""
    return ["binned_adaptive", "binned_fixed"] + [f"kde_{v:g}" for v in noise_vars]


def estimator_label(est: str, cfg: dict) -> str:
    """What an estimator name means, for plot titles."""
    if est == "binned_adaptive":
        return "binned: 30 bins, tanh [-1,1], ReLU per-epoch [min,max]"
    if est == "binned_fixed":
        return f"binned: fixed width {cfg['bin_width']:g}, tanh [-1,1], ReLU [0,inf)"
    return f"KDE upper bound, sigma^2 = {est[4:]}"


def _point(rec: dict, est: str) -> tuple[float, float]:
    if est.startswith("binned_"):
        b = rec["binnings"][est[7:]]
        return b["i_xt"], b["i_ty"]
    k = rec["kde"][est[4:]]
    return k["i_xt_upper"], k["i_ty_upper"]


def series(run: dict, est: str) -> dict[str, dict]:
    """``{layer: {"epoch": [...], "i_xt": [...], "i_ty": [...]}}`` of one run and estimator (bits)."""
    out: dict[str, dict] = {}
    for r in sorted(run["infoplane"], key=lambda r: r["epoch"]):
        s = out.setdefault(r["layer"], {"epoch": [], "i_xt": [], "i_ty": []})
        xt, ty = _point(r, est)
        s["epoch"].append(r["epoch"])
        s["i_xt"].append(xt)
        s["i_ty"].append(ty)
    return out


def compression(run: dict, est: str) -> dict[str, float]:
    """Per layer: peak ``I(X;T)`` over the recordings minus ``I(X;T)`` at the last one (bits, >= 0)."""
    return {layer: max(s["i_xt"]) - s["i_xt"][-1] for layer, s in series(run, est).items()}


def mean_sd(values) -> dict:
    """``{"mean", "sd", "n"}``; ``sd`` is the sample standard deviation (None for one value)."""
    v = [float(a) for a in values if a is not None and math.isfinite(float(a))]
    if not v:
        return {"mean": None, "sd": None, "n": 0}
    m = sum(v) / len(v)
    sd = math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1)) if len(v) > 1 else None
    return {"mean": m, "sd": sd, "n": len(v)}


def load_runs(out: str) -> dict[str, list[dict]]:
    """``{setting key: [run, ...]}`` sorted by seed; every run must share one config."""
    runs: dict[str, list[dict]] = {}
    config = None
    for path in sorted(glob.glob(os.path.join(out, "run_*_seed*.json"))):
        with open(path) as f:
            run = json.load(f)
        if config is None:
            config, first = run["config"], path
        elif run["config"] != config:
            raise ValueError(f"{path} was run with another config than {first}; merge folders of one config only")
        runs.setdefault(run["key"], []).append(run)
    for v in runs.values():
        v.sort(key=lambda r: r["seed"])
    return runs


def load_probes(out: str) -> list[dict]:
    probes = []
    for path in sorted(glob.glob(os.path.join(out, "probe_seed*.json"))):
        with open(path) as f:
            probes.append(json.load(f))
    return sorted(probes, key=lambda p: p["seed"])


def final(run: dict) -> dict:
    """``run["final"]``, with the SVM fields ``None`` unless :func:`svm_is_current` (files written
    before the trainer applied that rule carry an earlier fit's, or a soft-margin fit's, numbers)."""
    f = dict(run["final"])
    if not svm_is_current(run.get("svm") or [], run.get("accuracy") or []):
        f.update({k: None for k in SVM_FINAL_KEYS})
    return f


def unfit_runs(runs: dict[str, list[dict]]) -> list[dict]:
    """True-label runs whose final training accuracy is below ``FIT_ACCURACY``: ``{"key", "seed",
    "train_accuracy"}``. Random-label and label-noise runs are never listed (fitting them is not
    expected)."""
    return [{"key": k, "seed": r["seed"], "train_accuracy": r["final"]["train_accuracy"]}
            for k, rs in sorted(runs.items()) for r in rs
            if not r["setting"]["random_labels"] and r["setting"]["label_noise"] == 0
            and r["final"]["train_accuracy"] < FIT_ACCURACY]


def summarize_runs(runs: list[dict]) -> dict:
    """Per-setting summary over seeds: compression per layer and estimator, final metrics, wall time."""
    cfg = runs[0]["config"]
    ests = ESTIMATORS(cfg["noise_vars"])
    comp = {e: [compression(r, e) for r in runs] for e in ests}
    layers = list(comp[ests[0]][0])
    per_layer = {}
    for layer in layers:
        per_layer[layer] = {e: {**mean_sd([c[layer] for c in comp[e]]), "values": [c[layer] for c in comp[e]]}
                            for e in ests}
    fins = [final(r) for r in runs]
    finals = {k: mean_sd([f[k] for f in fins]) for k in fins[0]}
    return {"setting": runs[0]["setting"], "seeds": [r["seed"] for r in runs], "compression": per_layer,
            "final": finals, "wall_s": mean_sd([r["wall_s"] for r in runs])}


def _main_regime(settings: dict, optimizers) -> dict[str, str]:
    """Per activation, the clean-label setting of the first optimizer in ``optimizers`` that ran."""
    order = list(optimizers) + [o for o in ("sgd", "adam", "gd") if o not in optimizers]
    main = {}
    for key, s in settings.items():
        st = s["setting"]
        if st["random_labels"] or st["label_noise"] > 0:
            continue
        act = st["activation"]
        if act not in main or order.index(st["optimizer"]) < order.index(settings[main[act]]["setting"]["optimizer"]):
            main[act] = key
    return main


def _probe_summary(probes: list[dict]) -> dict:
    if not probes:
        return {}
    sep: dict = {}
    for p in probes:
        for stage, layers in p["separability"]["stages"].items():
            for layer, clfs in layers.items():
                for clf, rows in clfs.items():
                    for r in rows:
                        sep.setdefault(stage, {}).setdefault(layer, {}).setdefault(clf, {}).setdefault(
                            r["n_components"], []).append(r["test_accuracy"])
    sep = {st: {ly: {c: {str(k): mean_sd(v) for k, v in ks.items()} for c, ks in cl.items()} for ly, cl in lys.items()}
           for st, lys in sep.items()}
    res: dict = {}
    for p in probes:
        for h in p["residual"]["history"]:
            d = res.setdefault(h["block"], {}).setdefault(h["epoch"], {"lip": [], "jac": [], "ratio_max": [],
                                                                          "ratio_q50": [], "certified": []})
            d["lip"].append(h["lipschitz_bound"])
            d["jac"].append(h["jacobian_max"])
            d["ratio_max"].append(h["ratio"]["max"])
            d["ratio_q50"].append(h["ratio"]["q50"])
            d["certified"].append(h["certified"])
    residual = {b: [{"epoch": e, "lipschitz_bound": mean_sd(d["lip"]), "jacobian_max": mean_sd(d["jac"]),
                     "ratio_max": mean_sd(d["ratio_max"]), "ratio_q50": mean_sd(d["ratio_q50"]),
                     "certified_fraction": sum(d["certified"]) / len(d["certified"])}
                    for e, d in sorted(eps.items())] for b, eps in res.items()}
    return {"seeds": [p["seed"] for p in probes], "separability_test_accuracy": sep,
            "separability_net_test_accuracy": mean_sd([p["separability"]["test_accuracy"] for p in probes]),
            "separability_config": {k: probes[0]["separability"][k] for k in ("widths", "epochs", "layers", "activation")},
            "residual": residual, "residual_test_accuracy": mean_sd([p["residual"]["test_accuracy"] for p in probes]),
            "residual_architecture": probes[0]["residual"]["architecture"],
            "residual_epochs": probes[0]["residual"]["epochs"]}


def merge(out: str, *, binning: str = "adaptive", optimizers=("sgd",), task: dict | None = None,
          plots: bool = True) -> dict:
    """Rebuild ``out/results.json``, ``out/results.md`` (and the figures) from the run files in ``out``; returns the payload.

    ``binning`` picks the scheme reported as ``compression[act][layer]["binned"]``; ``"kde"`` there
    is the KDE upper bound at the largest noise variance. Both schemes and every noise variance
    are under ``settings[key]["compression"]``.
    """
    runs = load_runs(out)
    probes = load_probes(out)
    if not runs and not probes:
        raise FileNotFoundError(f"no run_*.json or probe_*.json files in {out}")
    settings = {k: summarize_runs(v) for k, v in sorted(runs.items())}
    cfg = next(iter(runs.values()))[0]["config"] if runs else {}
    kde_var = max(cfg["noise_vars"]) if runs else None
    main = _main_regime(settings, optimizers)
    unfit = unfit_runs(runs)
    dropped = {(u["key"], u["seed"]) for u in unfit}
    comp = {}
    for act, key in main.items():
        comp[act] = {}
        for layer, per in settings[key]["compression"].items():
            comp[act][layer] = {"binned": {k: per[f"binned_{binning}"][k] for k in ("mean", "sd", "n")},
                                "kde": {k: per[f"kde_{kde_var:g}"][k] for k in ("mean", "sd", "n")}}
    payload = {
        "units": "bits",
        "task": task,
        "config": {**cfg, "binning": binning,
                   "binning_scheme": estimator_label(f"binned_{binning}", cfg) if runs else None,
                   "kde_noise_var": kde_var, "kde_bound": "upper (KL) pairwise-distance bound",
                   "compression_definition": "peak I(X;T) over the recordings minus I(X;T) at the last epoch, "
                                             "per seed; mean and sample sd over seeds",
                   "seeds": sorted({r["seed"] for v in runs.values() for r in v})},
        "compression": comp,
        "main_regime": main,
        "settings": settings,
        "probes": _probe_summary(probes),
        "comparisons": comparisons(settings),
        "unfit_runs": unfit,
        "comparisons_fitted_only": comparisons(settings, exclude=dropped),
        "margin_vs_test_accuracy": margin_vs_accuracy(runs),
        "margin_vs_test_accuracy_fitted_only": margin_vs_accuracy(runs, exclude=dropped),
    }
    if plots:
        from mmim_ext.experiments.infoplane_plots import write_figures

        payload["figures"] = write_figures(runs, probes, payload, out)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(format_markdown(payload))
    return payload
