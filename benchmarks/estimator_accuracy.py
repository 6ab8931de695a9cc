"""Accuracy and wall time of the one-call MI estimators on synthetic cases with known answers.

Every case of issue 5 at full size: bivariate Gaussians over correlations (10,000 samples), a
correlated block among independent units, conditional cases, the total correlation of a Gaussian
vector and of a Gaussian mixture, I(X;Y) between 5+5-dimensional vectors under invertible
elementwise nonlinear transforms, and I(Y;h_i) of a two-class mixture. Truths are closed forms or
quadrature (Monte Carlo for a mixture's joint entropy). Prints a table, writes JSON.

    python benchmarks/estimator_accuracy.py --threads 2 --json benchmarks/out/estimator_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
from tqdm import tqdm

import mmim_ext


def gaussian_mi(rho: float) -> float:
    return -0.5 * math.log(1.0 - rho * rho)


def _log_mixture(x, means, std=1.0):
    """log density of the equal-weight mixture of N(mean_c, std^2 I) at the rows of x."""
    d = x.shape[1]
    lp = (-0.5 * ((x[:, None, :] - means[None]) / std).pow(2).sum(-1)
          - d * (0.5 * math.log(2 * math.pi) + math.log(std)))
    return torch.logsumexp(lp, 1) - math.log(means.shape[0])


def _entropy_1d(means_1d, std=1.0):
    t = torch.linspace(-40, 40, 80001, dtype=torch.float64)[:, None]
    lp = _log_mixture(t, means_1d[:, None].double(), std)
    return -(lp.exp() * lp).sum().item() * (t[1, 0] - t[0, 0]).item()


def mixture_total_correlation(means, n_mc=400_000, seed=0):
    """sum_i H(h_i) - H(h) for h = means[Y] + N(0, I), Y uniform (nats)."""
    means = means.double()
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, means.shape[0], (n_mc,), generator=g)
    x = means[c] + torch.randn(n_mc, means.shape[1], generator=g, dtype=torch.float64)
    h_joint = -_log_mixture(x, means).mean().item()
    return sum(_entropy_1d(means[:, i]) for i in range(means.shape[1])) - h_joint


def label_mi(mu):
    """I(Y; h) for Y uniform on {0, 1}, h = +-mu + N(0, 1) (nats)."""
    return _entropy_1d(torch.tensor([-mu, mu])) - _entropy_1d(torch.tensor([0.0]))


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def cases(n_pair: int):
    """(name, truth, criterion, run) where run() -> estimate (float)."""
    out = []

    # 1. Bivariate Gaussians, three data sets each for the two strongest correlations. The name
    #    carries the sample's own plug-in MI, -1/2 log(1 - r^2) with the sample correlation r:
    #    how far this data set alone sits from the truth.
    for rho in (0.25, 0.5, 0.75, 0.9):
        for seed in ((0, 1, 2) if rho >= 0.75 else (0,)):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(n_pair, generator=g)
            y = rho * x + math.sqrt(1 - rho * rho) * torch.randn(n_pair, generator=g)
            r = float(torch.corrcoef(torch.stack([x, y]))[0, 1])

            def run(h=torch.stack([x, y], 1)):
                return float(mmim_ext.estimate_pairwise_mi(h, seed=0)[0, 1])
            out.append((f"pairwise Gaussian rho={rho} (n={n_pair}, data seed {seed}, plug-in {gaussian_mi(r):.3f})",
                        gaussian_mi(rho), "abs 0.05", run))

    # 2. A block of correlated units among independent ones: every pair in the block has
    #    correlation 0.6 (shared latent), the others 0.
    def run_block():
        g = torch.Generator().manual_seed(1)
        n, m = 5000, 8
        z = torch.randn(n, 1, generator=g)
        h = torch.randn(n, m, generator=g)
        h[:, :3] = math.sqrt(0.6) * z + math.sqrt(0.4) * h[:, :3]
        mat = mmim_ext.estimate_pairwise_mi(h, seed=0)
        block = mat[:3, :3][~torch.eye(3, dtype=torch.bool)].mean().item()
        mask = torch.ones(m, m, dtype=torch.bool)
        mask[:3, :3] = False
        mask.fill_diagonal_(False)
        return block, mat[mask].abs().max().item()
    out.append(("block of 3 (rho=0.6) among 8 units: mean in-block pair", gaussian_mi(0.6), "abs 0.05",
                lambda: run_block()[0]))
    out.append(("block of 3 among 8 units: max |pair| outside the block", 0.0, "abs 0.05",
                lambda: run_block()[1]))

    # 3. Conditional cases: (a) two units that share only the class signal, (b) two units that
    #    share a class-independent latent (conditional = unconditional).
    def class_only(conditional):
        g = torch.Generator().manual_seed(2)
        n = 6000
        y = torch.randint(0, 4, (n,), generator=g)
        mu = torch.tensor([-1.5, -0.5, 0.5, 1.5])[y]
        h = mu[:, None] + torch.randn(n, 2, generator=g)
        return float(mmim_ext.estimate_pairwise_mi(h, y if conditional else None, seed=0)[0, 1])
    out.append(("class-only dependence, I(h1;h2|Y)", 0.0, "abs 0.05", lambda: class_only(True)))

    def latent(conditional):
        g = torch.Generator().manual_seed(3)
        n = 6000
        y = torch.randint(0, 4, (n,), generator=g)
        z = torch.randn(n, 1, generator=g)
        h = 0.8 * z + 0.6 * torch.randn(n, 2, generator=g)  # correlation 0.64
        return float(mmim_ext.estimate_pairwise_mi(h, y if conditional else None, seed=0)[0, 1])
    out.append(("class-independent latent, I(h1;h2|Y)", gaussian_mi(0.64), "abs 0.05", lambda: latent(True)))
    out.append(("class-independent latent, I(h1;h2)", gaussian_mi(0.64), "abs 0.05", lambda: latent(False)))

    # 4. Total correlation of a Gaussian vector and of a mixture (conditional TC of the mixture: 0).
    R = torch.tensor([[1.0, 0.6, 0.3, 0.0, 0.1], [0.6, 1.0, 0.5, 0.2, 0.0], [0.3, 0.5, 1.0, 0.4, 0.2],
                      [0.0, 0.2, 0.4, 1.0, 0.5], [0.1, 0.0, 0.2, 0.5, 1.0]])

    def run_tc():
        g = torch.Generator().manual_seed(4)
        h = torch.randn(10000, 5, generator=g) @ torch.linalg.cholesky(R).T
        return mmim_ext.estimate_total_correlation(h, seed=0)
    out.append(("total correlation, Gaussian d=5", -0.5 * float(torch.logdet(R)), "rel 0.2", run_tc))

    means = torch.tensor([[0.0, 0.0, 0.0], [1.5, 1.5, 1.5], [-1.5, 1.5, -1.5]])

    def mixture(conditional):
        g = torch.Generator().manual_seed(5)
        n = 6000
        y = torch.randint(0, 3, (n,), generator=g)
        h = means[y] + torch.randn(n, 3, generator=g)
        return mmim_ext.estimate_total_correlation(h, y if conditional else None, seed=0)
    out.append(("total correlation, 3-class mixture d=3", mixture_total_correlation(means), "rel 0.2",
                lambda: mixture(False)))
    out.append(("conditional total correlation, same mixture", 0.0, "abs 0.05", lambda: mixture(True)))

    # 5. I(X;Y), 5+5 dimensions, coordinate pairs with correlation 0.8, then invertible
    #    elementwise transforms (MI unchanged): x -> x^3 + x, y -> sinh(y), y -> exp(y).
    def vec(transform):
        g = torch.Generator().manual_seed(6)
        n, d, r = 10000, 5, 0.8
        x = torch.randn(n, d, generator=g)
        y = r * x + math.sqrt(1 - r * r) * torch.randn(n, d, generator=g)
        if transform:
            x, y = x.pow(3) + x, torch.cat([torch.sinh(y[:, :3]), torch.exp(y[:, 3:])], 1)
        return mmim_ext.estimate_mi(x, y, seed=0)
    out.append(("I(X;Y) 5+5 dims, Gaussian", 5 * gaussian_mi(0.8), "factor 1.5", lambda: vec(False)))
    out.append(("I(X;Y) 5+5 dims, x^3+x / sinh / exp", 5 * gaussian_mi(0.8), "factor 1.5", lambda: vec(True)))

    # 6. I(Y; h_i) of a two-class mixture, through the vector estimator with a one-hot label.
    for mu in (0.5, 1.5):
        def run_label(mu=mu):
            g = torch.Generator().manual_seed(7)
            n = 8000
            y = torch.randint(0, 2, (n,), generator=g)
            h = (2 * y - 1).float() * mu + torch.randn(n, generator=g)
            return mmim_ext.estimate_mi(torch.nn.functional.one_hot(y, 2).float(), h, seed=0)
        out.append((f"I(Y;h), h = +-{mu} + N(0,1)", label_mi(mu), "abs 0.05", run_label))
    return out


def passes(criterion: str, est: float, truth: float) -> bool:
    kind, val = criterion.split()
    val = float(val)
    if kind == "abs":
        return abs(est - truth) <= val
    if kind == "rel":
        return abs(est - truth) <= val * abs(truth)
    if kind == "factor":
        return truth / val <= est <= truth * val
    raise ValueError(criterion)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--n-pair", type=int, default=10000, help="samples of the bivariate Gaussian cases")
    p.add_argument("--only", default=None, help="run only cases whose name contains this string")
    p.add_argument("--json", default=None, help="output JSON path")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    todo = [c for c in cases(args.n_pair) if args.only is None or args.only in c[0]]
    rows = []
    for name, truth, crit, run in tqdm(todo, disable=args.no_progress, desc="cases"):
        est, secs = _timed(run)
        rows.append({"case": name, "truth_nats": truth, "estimate_nats": float(est), "criterion": crit,
                     "pass": passes(crit, float(est), truth), "seconds": secs})
    w = max(len(r["case"]) for r in rows)
    print(f"{'case':<{w}}  {'truth':>7}  {'estimate':>8}  {'error':>7}  {'criterion':<10} {'ok':<4} {'seconds':>7}")
    for r in rows:
        print(f"{r['case']:<{w}}  {r['truth_nats']:7.3f}  {r['estimate_nats']:8.3f}  "
              f"{r['estimate_nats'] - r['truth_nats']:+7.3f}  {r['criterion']:<10} {'yes' if r['pass'] else 'NO':<4} "
              f"{r['seconds']:7.1f}")
    meta = {"command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "load_average_start": os.getloadavg(), "extension": mmim_ext.extension_loaded()}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        print(f"# JSON: {args.json}")
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
