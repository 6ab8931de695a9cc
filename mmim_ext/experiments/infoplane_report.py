"""Paired comparisons between the settings of an information-plane study, and ``results.md``.

Compression (peak minus final ``I(X;T)``, bits) is ``>= 0`` by construction, so "the mean is above
zero" is no evidence of compression: seed noise alone makes it positive. What the study can test
is a difference between two settings run on the same seeds (same split, initialization seed and
batch order), and above all the difference to the random-label control. :func:`comparisons`
forms those paired differences per layer and estimator; :func:`format_markdown` renders the
merged summary and the comparisons as the tables ``results.md`` holds.
"""

from __future__ import annotations

from mmim_ext.experiments.statistics import paired_stats, spearman

__all__ = ["contrasts", "comparisons", "margin_vs_accuracy", "format_markdown"]

_EST_LABELS = {"binned_adaptive": "adaptive bins", "binned_fixed": "fixed bins"}


def _est_label(est: str) -> str:
    return _EST_LABELS.get(est, f"KDE σ²={est[4:]}" if est.startswith("kde_") else est)


def _key(act: str, opt: str, random_labels: bool = False) -> str:
    return f"{act}_{opt}" + ("_random" if random_labels else "")


def contrasts(settings: dict) -> list[dict]:
    """The setting pairs to compare, among those present: ``{"name", "a", "b"}`` (difference a - b).

    * ``labels``: true labels minus random labels, per activation and optimizer;
    * ``activation``: tanh minus ReLU, and relu-tanh minus ReLU, per optimizer (true labels);
    * ``optimizer``: Adam minus SGD and GD minus SGD, per activation (true labels).
    """
    clean = {(s["setting"]["activation"], s["setting"]["optimizer"]) for s in settings.values()
             if not s["setting"]["random_labels"] and s["setting"]["label_noise"] == 0}
    acts = sorted({a for a, _ in clean})
    opts = sorted({o for _, o in clean})
    out = []
    for act, opt in sorted(clean):
        if _key(act, opt, True) in settings:
            out.append({"name": "labels", "a": _key(act, opt), "b": _key(act, opt, True)})
    for opt in opts:
        for act in ("tanh", "relu-tanh"):
            if (act, opt) in clean and ("relu", opt) in clean:
                out.append({"name": "activation", "a": _key(act, opt), "b": _key("relu", opt)})
    for act in acts:
        for opt in ("adam", "gd"):
            if (act, opt) in clean and (act, "sgd") in clean:
                out.append({"name": "optimizer", "a": _key(act, opt), "b": _key(act, "sgd")})
    return out


def _paired(sa: dict, sb: dict, layer: str, est_a: str, est_b: str, drop_a=(), drop_b=()) -> dict | None:
    va = dict(zip(sa["seeds"], sa["compression"][layer][est_a]["values"]))
    vb = dict(zip(sb["seeds"], sb["compression"][layer][est_b]["values"]))
    seeds = sorted((set(va) - set(drop_a)) & (set(vb) - set(drop_b)))
    if not seeds:
        return None
    return {**paired_stats([va[s] - vb[s] for s in seeds]), "seeds": seeds,
            "mean_a": sum(va[s] for s in seeds) / len(seeds), "mean_b": sum(vb[s] for s in seeds) / len(seeds)}


def comparisons(settings: dict, exclude=frozenset()) -> list[dict]:
    """Paired differences of compression over the seeds two settings share.

    ``exclude``: ``(setting key, seed)`` pairs left out (a seed left out of either setting of a
    pair is left out of that pair).

    One row per contrast (:func:`contrasts`), layer and estimator, plus, within every true-label
    setting, adaptive minus fixed bins (``name == "binning"``, same runs). Each row has the fields
    of :func:`~mmim_ext.experiments.statistics.paired_stats` (mean, sd, 95% t-interval, p-values,
    wins/ties/losses, in bits) and ``mean_a``, ``mean_b``, ``seeds``.
    """
    drop: dict = {}
    for key, seed in exclude:
        drop.setdefault(key, set()).add(seed)
    rows = []
    for c in contrasts(settings):
        sa, sb = settings[c["a"]], settings[c["b"]]
        da, db = drop.get(c["a"], ()), drop.get(c["b"], ())
        for layer in sa["compression"]:
            if layer not in sb["compression"]:
                continue
            for est in sa["compression"][layer]:
                if est in sb["compression"][layer]:
                    r = _paired(sa, sb, layer, est, est, da, db)
                    if r is not None:
                        rows.append({**c, "layer": layer, "estimator": est, **r})
    for key, s in settings.items():
        if s["setting"]["random_labels"] or s["setting"]["label_noise"] > 0:
            continue
        for layer, per in s["compression"].items():
            if "binned_adaptive" in per and "binned_fixed" in per:
                r = _paired(s, s, layer, "binned_adaptive", "binned_fixed", drop.get(key, ()), drop.get(key, ()))
                if r is not None:
                    rows.append({"name": "binning", "a": key, "b": key, "layer": layer,
                                 "estimator": "binned_adaptive - binned_fixed", **r})
    return rows


def margin_vs_accuracy(runs: dict, exclude=frozenset()) -> dict:
    """Per setting, Spearman's rank correlation across seeds between the final median normalized
    margin and the (clean-label) test accuracy: ``{key: {"rho", "p", "n"}}`` (``None`` below 3
    seeds or with a constant column); runs whose ``(key, seed)`` is in ``exclude`` are left out."""
    out = {}
    for key, rs in sorted(runs.items()):
        pairs = [(r["final"]["margin_median"], r["final"]["test_accuracy_clean"]) for r in rs
                 if r["final"].get("margin_median") is not None and (key, r["seed"]) not in exclude]
        out[key] = spearman([m for m, _ in pairs], [a for _, a in pairs])
    return out


def _ms(d: dict | None, fmt: str = "{:.2f}") -> str:
    if not d or d.get("mean") is None:
        return "—"
    return fmt.format(d["mean"]) + ("" if d.get("sd") is None else " ± " + fmt.format(d["sd"]))


def _diff(r: dict) -> str:
    if r.get("ci95") is None:
        return f"{r['mean']:+.2f}"
    lo, hi = r["ci95"]
    return f"{r['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}] {r['wins']}/{r['n']}"


def _comparison_table(rows: list[dict], shown: tuple) -> list[str]:
    lines = ["| contrast | a | b | layer | " + " | ".join(_est_label(e) for e in shown) + " |",
             "|---|---|---|---|" + "---:|" * len(shown)]
    groups: dict = {}
    for r in rows:
        if r["name"] != "binning":
            groups.setdefault((r["name"], r["a"], r["b"], r["layer"]), {})[r["estimator"]] = r
    for (name, a, b, layer), by_est in groups.items():
        lines.append(f"| {name} | {a} | {b} | {layer} | "
                     + " | ".join(_diff(by_est[e]) if e in by_est else "—" for e in shown) + " |")
    return lines


def format_markdown(payload: dict) -> str:
    """``results.md``: per setting, compression per layer and estimator (mean ± sd over seeds), the
    final metrics, and the paired comparisons with their 95% intervals (fixed bins, the KDE bound
    at ``payload["config"]["kde_noise_var"]``, adaptive bins)."""
    settings = payload["settings"]
    # the comparison tables show fixed bins, the KDE bound at the largest noise variance, adaptive bins
    kde = payload["config"].get("kde_noise_var")
    shown = ("binned_fixed",) + ((f"kde_{kde:g}",) if kde is not None else ()) + ("binned_adaptive",)
    lines = [f"Information-plane study, {len(payload['config'].get('seeds', []))} seeds; all information in bits. "
             "Compression = peak I(X;T) over the recordings minus I(X;T) at the last epoch, per seed.", ""]
    if settings:
        ests = list(next(iter(settings.values()))["compression"]["h1"])
        lines += ["### Compression per setting (mean ± sd over seeds)", "",
                  "| setting | seeds | layer | " + " | ".join(_est_label(e) for e in ests) + " |",
                  "|---|---:|---|" + "---:|" * len(ests)]
        for key, s in settings.items():
            for layer, per in s["compression"].items():
                lines.append(f"| {key} | {len(s['seeds'])} | {layer} | " + " | ".join(_ms(per[e]) for e in ests) + " |")
        lines += ["", "### Final metrics (mean ± sd over seeds)", "",
                  "| setting | train acc | test acc (clean labels) | median normalized margin | min normalized margin "
                  "| SVM margin | cos(w_y − w_k, SVM normal) | SVM converged | wall s / run |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, s in settings.items():
            f = s["final"]
            lines.append(f"| {key} | {_ms(f['train_accuracy'], '{:.4f}')} | {_ms(f['test_accuracy_clean'], '{:.4f}')} | "
                         f"{_ms(f['margin_median'])} | {_ms(f['margin_min'])} | {_ms(f['svm_margin'])} | "
                         f"{_ms(f['cosine'], '{:.3f}')} | {_ms(f['converged'])} | {_ms(s['wall_s'], '{:.0f}')} |")
    rows = payload.get("comparisons") or []
    if rows:
        lines += ["", "### Paired differences of compression (a − b, same seeds)", "",
                  "Δ [95% t-interval] w/n: mean paired difference in bits, its interval, and in how many of the n "
                  "seeds a compressed more than b.", ""]
        lines += _comparison_table(rows, shown)
        lines += ["", "Adaptive minus fixed bins, same runs:", "", "| setting | layer | Δ [95% t-interval] w/n |",
                  "|---|---|---:|"]
        lines += [f"| {r['a']} | {r['layer']} | {_diff(r)} |" for r in rows if r["name"] == "binning"]
    unfit = payload.get("unfit_runs") or []
    if unfit:
        keys = {u["key"] for u in unfit}
        lines += ["", "### Without the true-label runs that did not fit their training set", "",
                  "Left out (final training accuracy below the fit threshold): "
                  + ", ".join(f"{u['key']} seed {u['seed']} ({u['train_accuracy']:.3f})" for u in unfit)
                  + ". The contrasts that involve them, on the remaining seeds:", ""]
        lines += _comparison_table([r for r in payload.get("comparisons_fitted_only") or []
                                    if r["name"] != "binning" and (r["a"] in keys or r["b"] in keys)], shown)
    mva = payload.get("margin_vs_test_accuracy") or {}
    fit = payload.get("margin_vs_test_accuracy_fitted_only") or {}
    if mva:
        lines += ["", "### Median normalized margin vs test accuracy across seeds (Spearman)", "",
                  "| setting | n | rho | p | n (fitted runs) | rho | p |", "|---|---:|---:|---:|---:|---:|---:|"]

        def cells(m):
            if not m:
                return "— | — | —"
            rho = "—" if m["rho"] is None else f"{m['rho']:+.2f}"
            return f"{m['n']} | {rho} | " + ("—" if m["p"] is None else f"{m['p']:.3f}")
        for key, m in mva.items():
            lines.append(f"| {key} | {cells(m)} | {cells(fit.get(key))} |")
    return "\n".join(lines) + "\n"
