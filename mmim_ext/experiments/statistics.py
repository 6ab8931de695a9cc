"""Paired statistics of a method against the baseline over seeds.

For seeds ``s = 1..n`` the paired difference is ``d_s = acc(method, s) - acc(baseline, s)``
(same initial weights and batch order, so most seed-to-seed noise cancels). Reported:

* ``mean`` and ``sd`` (sample standard deviation) of ``d``;
* ``ci95``: the t-based 95% confidence interval ``mean ± t_{0.975, n-1} · sd / sqrt(n)``;
* ``p_t``: two-sided paired t-test (one-sample t-test of ``d`` against 0); ``None`` when every
  seed gave the same non-zero difference (zero spread: the t statistic is undefined);
* ``p_wilcoxon``: two-sided Wilcoxon signed-rank test (zero differences dropped, as Wilcoxon's
  original procedure; 1.0 when every difference is zero);
* ``wins`` / ``ties`` / ``losses`` out of ``n``;
* :func:`holm` adjusts a family of p-values (one per method) for multiple comparisons.

The distributions come from SciPy (``scipy.stats``).
"""

from __future__ import annotations

import math

__all__ = ["holm", "paired_stats", "spearman"]


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the Table 1 statistics need SciPy: pip install scipy") from e
    return stats


def paired_stats(diffs) -> dict:
    """Statistics of paired differences ``diffs`` (a sequence of floats, percentage points).

    Returns ``{"n", "mean", "sd", "ci95": [lo, hi], "p_t", "p_wilcoxon", "wins", "ties",
    "losses"}``; with ``n < 2`` the spread, interval and p-values are ``None``.
    """
    d = [float(x) for x in diffs]
    if any(not math.isfinite(x) for x in d):
        raise ValueError(f"paired_stats: argument 'diffs' must be finite numbers, got {d}")
    n = len(d)
    out = {"n": n, "mean": (sum(d) / n) if n else None, "sd": None, "ci95": None, "p_t": None,
           "p_wilcoxon": None, "wins": sum(x > 0 for x in d), "ties": sum(x == 0 for x in d),
           "losses": sum(x < 0 for x in d)}
    if n < 2:
        return out
    stats = _scipy_stats()
    mean = out["mean"]
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    out["sd"] = sd
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    out["ci95"] = [mean - half, mean + half]
    if sd == 0.0:
        # Every seed gave the same difference: the t statistic is 0/0 (p = 1) or undefined.
        out["p_t"] = 1.0 if mean == 0 else None
    else:
        tstat = mean / (sd / math.sqrt(n))
        out["p_t"] = float(2.0 * stats.t.sf(abs(tstat), n - 1))
    nonzero = [x for x in d if x != 0]
    out["p_wilcoxon"] = 1.0 if not nonzero else float(stats.wilcoxon(nonzero).pvalue)
    return out


def holm(pvalues: dict) -> dict:
    """Holm-Bonferroni adjusted p-values for ``{name: p}`` (``None`` entries are left out)."""
    items = sorted(((p, k) for k, p in pvalues.items() if p is not None))
    k = len(items)
    out, running = {}, 0.0
    for rank, (p, name) in enumerate(items):
        running = max(running, min(1.0, (k - rank) * p))
        out[name] = running
    return out


def spearman(x, y) -> dict:
    """Spearman's rank correlation of two equally long sequences: ``{"rho", "p", "n"}``; ``rho``
    and ``p`` are ``None`` with fewer than 3 pairs or when either sequence is constant."""
    x, y = [float(a) for a in x], [float(b) for b in y]
    if len(x) != len(y):
        raise ValueError(f"spearman: arguments 'x' and 'y' must have one length, got {len(x)} and {len(y)}")
    out = {"rho": None, "p": None, "n": len(x)}
    if len(x) >= 3 and len(set(x)) > 1 and len(set(y)) > 1:
        res = _scipy_stats().spearmanr(x, y)
        out["rho"], out["p"] = float(res.statistic), float(res.pvalue)
    return out
