"""Command line: ``python -m mmim_ext.experiments {table1,infoplane} ...`` (console script ``mmim-ext``)."""

from __future__ import annotations

import argparse
import os
import sys

from mmim_ext.experiments.cli import positive_int

# --quick: the README's offline smoke job (digits, both architectures, every method, 2 seeds,
# default λ, short budgets); must finish in a few minutes on 2 cores.
QUICK = {"seeds": 2, "max_epochs": 12, "patience": 3, "c3_epochs": 2, "max_pairs": 256}
FULL_SEEDS = 10
FULL_TUNE_SEEDS = 3


def _csv(kind: str, choices):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"{kind} must be a comma-separated subset of {','.join(choices)}, got {text!r}")
        return items
    return parse


def _float_list(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, got {text!r}")
    return vals


def _reg_weights(text: str) -> dict[str, float]:
    """'c4=0.1,mmim=1' -> {'c4': 0.1, 'mmim': 1.0}; a bare number applies to every method."""
    from mmim_ext.experiments.protocol import TUNED_METHODS

    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if "=" in part:
            k, v = part.split("=", 1)
            k = k.strip()
            if k not in TUNED_METHODS:
                raise argparse.ArgumentTypeError(f"--reg-weight: unknown method {k!r} (expected one of {','.join(TUNED_METHODS)})")
        else:
            k, v = "*", part
        try:
            out[k] = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--reg-weight: {v!r} is not a number") from None
    return out


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must be I/N (e.g. 0/2), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def _add_table1(sub) -> None:
    from mmim_ext.experiments.data import DATASETS
    from mmim_ext.experiments.models import ARCHS
    from mmim_ext.experiments.protocol import METHODS, TUNE_GRID

    p = sub.add_parser(
        "table1", help="MMIM Table 1 protocol: {mlp,cnn} x {" + ",".join(METHODS) + "}",
        description="λ search on tuning seeds, then every architecture x method on the table's seeds with equal "
                    "body budgets; one JSON per run under --out/runs (resumable; --shard splits the work over "
                    "processes), then results.json, results.md and plots in --out. See docs/table1.md.")
    p.add_argument("--dataset", choices=DATASETS, default=None, help="data set (default: digits)")
    p.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST IDX files")
    p.add_argument("--seeds", type=positive_int, default=None,
                   help=f"table seeds 0..N-1 (default {FULL_SEEDS}; {QUICK['seeds']} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 seeds, no λ search, short budgets, small measurements (minutes)")
    p.add_argument("--out", default=None, help="output directory (default results/table1_<dataset>)")
    p.add_argument("--archs", type=_csv("--archs", ARCHS), default=ARCHS, help="comma-separated, default mlp,cnn")
    p.add_argument("--methods", type=_csv("--methods", METHODS), default=METHODS,
                   help="comma-separated, default " + ",".join(METHODS))
    p.add_argument("--no-tune", action="store_true", help="no λ search: default λ or --reg-weight")
    p.add_argument("--tune", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old scripts
    p.add_argument("--tune-grid", type=_float_list, default=TUNE_GRID, help="λ grid (default 1e-6..1e-1)")
    p.add_argument("--tune-seeds", type=positive_int, default=FULL_TUNE_SEEDS,
                   help=f"tuning seeds 1000..1000+N-1, disjoint from the table's (default {FULL_TUNE_SEEDS})")
    p.add_argument("--tune-max-epochs", type=positive_int, default=None,
                   help="epoch cap of the tuning runs (default: --max-epochs)")
    p.add_argument("--reg-weight", type=_reg_weights, default=None,
                   help="λ without search, e.g. 'c4=0.1,mmim=1' or one number for all (implies --no-tune)")
    p.add_argument("--max-epochs", type=positive_int, default=None, help="epoch cap of the baseline's early stopping (default 200)")
    p.add_argument("--patience", type=positive_int, default=None, help="early-stopping patience in epochs (default 10)")
    p.add_argument("--c3-epochs", type=positive_int, default=None, help="epochs of the C3 stage (default 10)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=positive_int, default=128, help="penultimate units m (default 128)")
    p.add_argument("--max-pairs", type=positive_int, default=None,
                   help="pairs of units sampled per step for the pairwise terms (default 1024; the sum is "
                        "rescaled to all pairs)")
    p.add_argument("--critic-hidden", type=positive_int, default=8, help="hidden units of each critic (default 8)")
    p.add_argument("--no-measure", action="store_true", help="skip the held-out information measurements")
    p.add_argument("--shard", type=_shard, default=(0, 1),
                   help="I/N: run job I, I+N, ... of the plan (start N processes on one --out)")
    p.add_argument("--phase", choices=("all", "tune", "table"), default="all",
                   help="tune: only the λ search; table: only the table (needs the tuning runs)")
    p.add_argument("--wait-timeout", type=float, default=None,
                   help="seconds to wait for other shards' tuning runs (default: forever)")
    p.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                   help="do not train: combine the per-run files of earlier --out directories into --out")
    p.add_argument("--train-subset", type=positive_int, default=None,
                   help="use only the first N training samples (smoke tests)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--progress", action="store_true", help="per-epoch progress bars")
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (JSON and Markdown only)")
    p.set_defaults(func=_run_table1)


def _run_table1(args) -> int:
    import torch

    from mmim_ext.experiments.data import load_dataset
    from mmim_ext.experiments.measure import MeasureConfig
    from mmim_ext.experiments.protocol import ProtocolConfig
    from mmim_ext.experiments.reporting import format_table
    from mmim_ext.experiments.table1 import Table1Config, merge_runs, run_table1

    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.quick:
        # The quick run's tensors are tiny: a second thread costs more in synchronization than it
        # saves (measured: 818 s CPU with 2 threads vs 202 s with 1 for the same run).
        torch.set_num_threads(1)
    dataset = args.dataset or "digits"
    out = args.out or os.path.join("results", f"table1_{dataset}" + ("_quick" if args.quick else ""))
    if args.lr <= 0:
        print("error: --lr must be > 0", file=sys.stderr)
        return 2
    if args.merge:
        try:
            results = merge_runs(args.merge, out, plots=not args.no_plots)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(format_table(results))
        print(f"wrote {os.path.join(out, 'results.json')} from {len(args.merge)} directories")
        return 0
    try:
        splits = load_dataset(dataset, args.data_dir)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.train_subset:
        splits = splits.subset_train(args.train_subset)
    q = args.quick

    def pick(value, quick_value, full_value):
        return value if value is not None else (quick_value if q else full_value)

    proto = ProtocolConfig(
        dataset, args.archs[0], max_epochs=pick(args.max_epochs, QUICK["max_epochs"], 200),
        patience=pick(args.patience, QUICK["patience"], 10), batch_size=args.batch_size, lr=args.lr,
        width=args.width, c3_epochs=pick(args.c3_epochs, QUICK["c3_epochs"], 10),
        reg_kwargs={"max_pairs": pick(args.max_pairs, QUICK["max_pairs"], 1024), "hidden": args.critic_hidden},
        device=args.device, progress=args.progress)
    measure = None
    if not args.no_measure:
        measure = (MeasureConfig(num_pairs=8, num_units=8, pair_max_epochs=3, pair_patience=1, unit_max_epochs=3,
                                 label_max_epochs=5, patience=1) if q else MeasureConfig())
    overrides: dict[str, dict[str, float]] = {}
    for arch in args.archs:
        for m, lam in (args.reg_weight or {}).items():
            if m != "*":
                overrides.setdefault(arch, {})[m] = lam
        if args.reg_weight and "*" in args.reg_weight:
            for m in args.methods:
                overrides.setdefault(arch, {}).setdefault(m, args.reg_weight["*"])
    tune = not (q or args.no_tune or args.reg_weight)
    cfg = Table1Config(dataset=dataset, archs=tuple(args.archs), methods=tuple(args.methods),
                       seeds=tuple(range(pick(args.seeds, QUICK["seeds"], FULL_SEEDS))), tune=tune,
                       tune_seeds=tuple(range(1000, 1000 + args.tune_seeds)), grid=tuple(args.tune_grid),
                       tune_max_epochs=args.tune_max_epochs, protocol=proto, measure=measure, reg_weights=overrides)
    try:
        cfg.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"table1: {dataset} {splits.sizes()}, archs {','.join(cfg.archs)}, methods {','.join(cfg.methods)}, "
          f"seeds {list(cfg.seeds)}, " + (f"λ search on seeds {list(cfg.tune_seeds)}" if tune else "no λ search")
          + f", shard {args.shard[0]}/{args.shard[1]} -> {out}", flush=True)

    def log(msg):
        print(msg, flush=True)

    results = run_table1(splits, cfg, out, shard=args.shard, phase=args.phase, wait_timeout_s=args.wait_timeout,
                         plots=not args.no_plots, log=log)
    if results is None:
        return 0
    print(format_table(results))
    print(f"wrote {os.path.join(out, 'results.json')} and results.md ({results['wall_s_this_process']:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmim-ext", description="mmim_ext experiments")
    sub = parser.add_subparsers(dest="command", metavar="{table1,infoplane}")
    sub.required = True
    _add_table1(sub)
    sub.add_parser("infoplane", help="information plane and diagnostics (mmim_ext.experiments.infoplane)",
                   add_help=False)
    return parser


def main(argv=None) -> int:
    """Entry point of ``mmim-ext`` and ``python -m mmim_ext.experiments``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "infoplane":
        # Lazy: the infoplane module is optional for table1 and owns its own arguments.
        try:
            from mmim_ext.experiments import infoplane
        except ImportError as e:
            print(f"error: the infoplane subcommand is unavailable ({e})", file=sys.stderr)
            return 2
        p = argparse.ArgumentParser(prog="mmim-ext infoplane", description=(infoplane.__doc__ or "").strip() or None,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        infoplane.add_arguments(p)
        return int(infoplane.run(p.parse_args(argv[1:])) or 0)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
