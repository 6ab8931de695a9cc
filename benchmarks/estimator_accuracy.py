"""Accuracy, intervals and wall time of the one-call MI estimators on cases with known answers.

Each case draws ``--n`` samples per data seed (``--seeds``), runs one one-call estimator
(``estimate_pairwise_mi`` for pairs and conditional pairs, ``estimate_mi`` for 5+5-dimensional
vectors) with ``return_ci=True`` where the installed version has it, and records truth,
estimate, interval, error and seconds. Every result is appended to a JSON file as soon as it is
known, so a run can be stopped and resumed (results already in the file are skipped), and runs
split over processes (each with its own ``--out``) are merged by ``--merge``:

    python benchmarks/estimator_accuracy.py --threads 1 --cases pairwise --out results/acc_a.json
    python benchmarks/estimator_accuracy.py --threads 1 --cases cond,vec --out results/acc_b.json
    python benchmarks/estimator_accuracy.py --merge results/acc_a.json results/acc_b.json

``--vec-kw`` passes keyword arguments to ``estimate_mi`` in the multivariate cases (a former
default, for a before/after comparison); every row records them:

    python benchmarks/estimator_accuracy.py --threads 1 --cases multivariate --vec-kw '{"squares": false}' --out results/before.json

Truths (nats), each case states its own in ``truth_method``:

* Gaussian pair, correlation rho: ``-1/2 log(1 - rho^2)`` (exact).
* Student-t pair (nu = 2, 3; shape correlation 0.5): the closed form of the multivariate t
  (Arellano-Valle, Contreras-Reyes & Genton 2013), ``-1/2 log(1 - rho^2) + 2 g(1) - g(2)`` with
  ``g(d) = log G(nu/2) - log G((nu+d)/2) + (nu+d)/2 (psi((nu+d)/2) - psi(nu/2))`` (exact).
* X-shaped mixture: ``(N(0, [[1, .9], [.9, 1]]) + N(0, [[1, -.9], [-.9, 1]])) / 2``, standard
  normal marginals; ``int p log(p / (phi phi))`` by the midpoint rule on a 1601^2 grid over
  ``[-8, 8]^2`` (2401^2 and ``[-10, 10]^2`` agree to 1e-12).
* Uniform plus noise: ``x ~ U(0, 1)``, ``y = x + 0.2 eps``; ``h(y) - 1/2 log(2 pi e 0.04)`` with
  ``h(y)`` by the midpoint rule on 400,001 points (quadrature error below 1e-6).
* Conditional sign case: two equiprobable classes, correlation +0.8 / -0.8: ``-1/2 log(0.36)``;
  ten classes, correlations -0.9, -0.7, ..., 0.9 and class-dependent means: the mean of
  ``-1/2 log(1 - rho_c^2)`` (exact).
* 5+5 dimensions: coordinate pairs with correlation 0.6, ``5 x -1/2 log(0.64)`` (exact), also
  after invertible maps (``x^3 + x``, ``sinh``, ``exp``; a rotation of each vector in two planes
  by an angle proportional to its norm, a spiral); 5+5 Student-t (nu = 3, identity shape,
  dependence only through the shared scale): ``2 g(5) - g(10)`` (exact).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch

import mmim_ext
from resumable_json import load, run_meta, save

RHO_VEC = 0.6


def gaussian_mi(rho: float) -> float:
    return -0.5 * math.log(1.0 - rho * rho)


def _t_g(d: int, nu: float) -> float:
    return (math.lgamma(nu / 2) - math.lgamma((nu + d) / 2)
            + (nu + d) / 2 * (float(torch.digamma(torch.tensor((nu + d) / 2, dtype=torch.float64)))
                              - float(torch.digamma(torch.tensor(nu / 2, dtype=torch.float64)))))


def t_mi(nu: float, dx: int, dy: int, logdet_ratio: float = 0.0) -> float:
    """I(X;Y) of a multivariate t (nu) whose shape matrix has 1/2 log(det Sx det Sy / det S) = logdet_ratio."""
    return logdet_ratio + _t_g(dx, nu) + _t_g(dy, nu) - _t_g(dx + dy, nu)


def xmix_mi(rho: float = 0.9, half: float = 8.0, n: int = 1601) -> float:
    t = torch.linspace(-half, half, n, dtype=torch.float64)
    d = float(t[1] - t[0])
    a, b = t[:, None], t[None, :]

    def phi2(r):
        return torch.exp(-(a * a - 2 * r * a * b + b * b) / (2 * (1 - r * r))) / (2 * math.pi * math.sqrt(1 - r * r))

    p = 0.5 * phi2(rho) + 0.5 * phi2(-rho)
    q = torch.exp(-(a * a + b * b) / 2) / (2 * math.pi)
    return float((p * torch.log(p / q)).nansum() * d * d)


def uniform_noise_mi(sigma: float = 0.2) -> float:
    y = torch.linspace(-10 * sigma, 1 + 10 * sigma, 400001, dtype=torch.float64)
    d = float(y[1] - y[0])
    nrm = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    p = nrm.cdf(y / sigma) - nrm.cdf((y - 1) / sigma)
    return float(-(p * torch.log(p)).nansum() * d) - 0.5 * math.log(2 * math.pi * math.e * sigma * sigma)


# ---------------------------------------------------------------------------------------------
# data


def _pair(g, n, rho):
    x = torch.randn(n, generator=g, dtype=torch.float64)
    return x, rho * x + math.sqrt(1 - rho * rho) * torch.randn(n, generator=g, dtype=torch.float64)


def _chi2(g, n, nu):
    return torch.randn(n, int(nu), generator=g, dtype=torch.float64).pow(2).sum(1)


def _spiral(v, turns=1.0):
    """Rotate coordinates (0, 1) and (2, 3) by the angle turns * |v|: invertible (|v| is kept)."""
    r = v.norm(dim=1)
    out = v.clone()
    for i, j in ((0, 1), (2, 3)):
        c, s = torch.cos(turns * r), torch.sin(turns * r)
        out[:, i], out[:, j] = c * v[:, i] - s * v[:, j], s * v[:, i] + c * v[:, j]
    return out


def make_case(name: str, n: int, seed: int):
    """(kind, data) with kind "pair" (h [n, 2]), "cond" (h, labels) or "vec" (x, y)."""
    g = torch.Generator().manual_seed(1000 + seed)
    if name.startswith("gauss_"):
        x, y = _pair(g, n, float(name.split("_")[1]))
        return "pair", (torch.stack([x, y], 1),)
    if name in ("t2_pair", "t3_pair"):
        nu = 2 if name == "t2_pair" else 3
        x, y = _pair(g, n, 0.5)
        s = torch.sqrt(_chi2(g, n, nu) / nu)
        return "pair", (torch.stack([x, y], 1) / s[:, None],)
    if name == "xmix_pair":
        x, y = _pair(g, n, 0.9)
        sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        return "pair", (torch.stack([x, sign * y], 1),)
    if name == "unif_noise":
        x = torch.rand(n, generator=g, dtype=torch.float64)
        return "pair", (torch.stack([x, x + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)], 1),)
    if name == "cond_sign":
        lab = torch.randint(0, 2, (n,), generator=g)
        x, y = _pair(g, n, 0.8)
        return "cond", (torch.stack([x, torch.where(lab == 1, y, -y)], 1), lab)
    if name == "cond_10class":
        lab = torch.randint(0, 10, (n,), generator=g)
        rho = (-0.9 + 0.2 * lab).double()
        x = torch.randn(n, generator=g, dtype=torch.float64)
        y = rho * x + torch.sqrt(1 - rho * rho) * torch.randn(n, generator=g, dtype=torch.float64)
        shift = (lab.double() - 4.5) / 2
        return "cond", (torch.stack([x + shift, y - shift], 1), lab)
    if name.startswith("vec_"):
        if name == "vec_t3":
            z = torch.randn(n, 10, generator=g, dtype=torch.float64) / torch.sqrt(_chi2(g, n, 3) / 3)[:, None]
            return "vec", (z[:, :5], z[:, 5:])
        x = torch.randn(n, 5, generator=g, dtype=torch.float64)
        y = RHO_VEC * x + math.sqrt(1 - RHO_VEC ** 2) * torch.randn(n, 5, generator=g, dtype=torch.float64)
        if name == "vec_cubic":
            x, y = x.pow(3) + x, torch.cat([torch.sinh(y[:, :3]), torch.exp(y[:, 3:])], 1)
        elif name == "vec_spiral":
            x, y = _spiral(x), _spiral(y)
        return "vec", (x, y)
    raise KeyError(name)


# (name, group, truth, how the truth is known)
CASES = [(f"gauss_{r}", "pairwise", gaussian_mi(r), "exact: -1/2 log(1 - rho^2)") for r in (0.25, 0.5, 0.75, 0.9)]
CASES += [
    ("t2_pair", "pairwise", t_mi(2, 1, 1, gaussian_mi(0.5)), "exact: bivariate t closed form"),
    ("t3_pair", "pairwise", t_mi(3, 1, 1, gaussian_mi(0.5)), "exact: bivariate t closed form"),
    ("xmix_pair", "pairwise", xmix_mi(), "quadrature, 1601^2 midpoint grid (error < 1e-12)"),
    ("unif_noise", "pairwise", uniform_noise_mi(), "quadrature of h(y), 400,001 points (error < 1e-6)"),
    ("cond_sign", "conditional", gaussian_mi(0.8), "exact: -1/2 log(1 - 0.8^2)"),
    ("cond_10class", "conditional", sum(gaussian_mi(-0.9 + 0.2 * c) for c in range(10)) / 10,
     "exact: mean over classes of -1/2 log(1 - rho_c^2)"),
    ("vec_gauss", "multivariate", 5 * gaussian_mi(RHO_VEC), "exact: 5 x -1/2 log(1 - 0.6^2)"),
    ("vec_t3", "multivariate", t_mi(3, 5, 5), "exact: multivariate t closed form"),
    ("vec_cubic", "multivariate", 5 * gaussian_mi(RHO_VEC), "exact (invertible maps of vec_gauss)"),
    ("vec_spiral", "multivariate", 5 * gaussian_mi(RHO_VEC), "exact (invertible maps of vec_gauss)"),
]
GROUPS = {"pairwise", "conditional", "multivariate"}


def within_target(group: str, est: float, truth: float) -> bool:
    if group == "pairwise":
        return abs(est - truth) <= max(0.02, 0.05 * abs(truth))
    if group == "conditional":
        return abs(est - truth) <= max(0.03, 0.06 * abs(truth))
    return truth / 1.5 <= est <= truth * 1.5


TARGETS = {"pairwise": "|err| <= max(0.02, 5%)", "conditional": "|err| <= max(0.03, 6%)",
           "multivariate": "factor 1.5"}


def run_case(name: str, n: int, seed: int, extra: dict | None = None):
    """(estimate, low, high, seconds, cpu_seconds); low/high are None where the estimator has no
    intervals. ``seconds`` is wall time, ``cpu_seconds`` this process's CPU time (the two agree
    on one thread of an idle core; on a shared core the wall time includes waiting).
    ``extra``: keyword arguments for the estimator of every case of its kind ("vec" cases:
    ``estimate_mi``; the others ``estimate_pairwise_mi``), e.g. a former default."""
    kind, data = make_case(name, n, seed)
    fn = mmim_ext.estimate_mi if kind == "vec" else mmim_ext.estimate_pairwise_mi
    has_ci = "return_ci" in inspect.signature(fn).parameters
    kw = {"seed": 0, **({"return_ci": True} if has_ci else {}), **(extra or {})}
    t0, c0 = time.perf_counter(), time.process_time()
    if kind == "vec":
        out = fn(data[0].float(), data[1].float(), **kw)
    else:
        out = fn(data[0].float(), *(data[1:]), **kw)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    vals = out if has_ci else (out, None, None)
    if kind != "vec":
        vals = tuple(None if v is None else v[0, 1] for v in vals)
    return tuple(None if v is None else float(v) for v in vals) + (secs, cpu)


def _git_commit():
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(mmim_ext.__file__)))
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - the commit is informative only
        return "unknown"


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(rows) -> str:
    """Markdown table, one line per (case, n): mean over the data seeds present."""
    order = [c[0] for c in CASES]
    by = {}
    for r in rows:
        by.setdefault((r["case"], r["n"]), []).append(r)
    lines = ["| case | truth | estimate (mean of seeds) | per seed | 95% intervals | covers | error | target | "
             "within | seconds (median) | CPU seconds (median) |", "|" + "---|" * 11]
    for (case, n), rs in sorted(by.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        rs = sorted(rs, key=lambda r: r["seed"])
        truth, group = rs[0]["truth"], rs[0]["group"]
        est = sum(r["estimate"] for r in rs) / len(rs)
        per = ", ".join(f"{r['estimate']:.3f}" for r in rs)
        if rs[0]["low"] is None:
            ivs, cov = "-", "-"
        else:
            ivs = ", ".join(f"[{r['low']:.3f}, {r['high']:.3f}]" for r in rs)
            cov = f"{sum(r['low'] <= truth <= r['high'] for r in rs)}/{len(rs)}"
        secs = sorted(r["seconds"] for r in rs)[len(rs) // 2]
        cpus = [r["cpu_seconds"] for r in rs if "cpu_seconds" in r]
        cpu = f"{sorted(cpus)[len(cpus) // 2]:.1f}" if len(cpus) == len(rs) else "-"
        ok = "yes" if within_target(group, est, truth) else "NO"
        lines.append(f"| {case} (n={n}, {len(rs)} seeds) | {truth:.3f} | {est:.3f} | {per} | {ivs} | {cov} | "
                     f"{est - truth:+.3f} | {TARGETS[group]} | {ok} | {secs:.1f} | {cpu} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="all", help="comma-separated case names, groups (pairwise, conditional, "
                   "multivariate) or 'all'")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated data seeds")
    p.add_argument("--n", type=int, default=10000, help="samples per data set")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default="results/estimator_accuracy.json", help="JSON file, appended to and resumed from")
    p.add_argument("--merge", nargs="+", default=None, help="only print the table of these JSON files together")
    p.add_argument("--vec-kw", default="{}", help="JSON keyword arguments for estimate_mi (the multivariate cases), "
                   "e.g. '{\"squares\": false}' for the former critic; recorded in every row")
    args = p.parse_args(argv)
    if args.merge:
        rows = [r for path in args.merge for r in load(path)["rows"]]
        print(table(rows))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = args.cases.split(",")
    todo = [c for c in CASES if "all" in wanted or c[0] in wanted or c[1] in wanted]
    unknown = [w for w in wanted if w != "all" and w not in GROUPS and w not in {c[0] for c in CASES}]
    if unknown:
        p.error(f"unknown cases {unknown}; known: {[c[0] for c in CASES]} or groups {sorted(GROUPS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    vec_kw = json.loads(args.vec_kw)
    if not isinstance(vec_kw, dict):
        p.error(f"--vec-kw must be a JSON object, got {args.vec_kw!r}")
    state = load(args.out)
    state["meta"].append({**run_meta(), "torch": torch.__version__, "cpu": _cpu_model(), "commit": _git_commit(),
                          "package": os.path.dirname(mmim_ext.__file__)})
    done = {(r["case"], r["seed"], r["n"]) for r in state["rows"]}
    for name, group, truth, how in todo:
        for seed in seeds:
            if (name, seed, args.n) in done:
                continue
            extra = vec_kw if group == "multivariate" else {}
            est, low, high, secs, cpu = run_case(name, args.n, seed, extra)
            state["rows"].append({"case": name, "group": group, "seed": seed, "n": args.n, "truth": truth,
                                  "truth_method": how, "estimate": est, "low": low, "high": high,
                                  "seconds": secs, "cpu_seconds": cpu, "commit": state["meta"][-1]["commit"],
                                  "kwargs": extra})
            print(f"{name} seed {seed}: truth {truth:.4f} estimate {est:.4f} interval {low} {high} "
                  f"{secs:.1f} s wall, {cpu:.1f} s CPU", flush=True)
            if args.out:
                save(state, args.out)
    print(table(state["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
