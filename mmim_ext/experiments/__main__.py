"""Command line: ``python -m mmim_ext.experiments {table1,infoplane} ...`` (console script ``mmim-ext``)."""

from __future__ import annotations

import argparse
import os
import sys

QUICK_EPOCHS = 8
QUICK_SEEDS = 2
FULL_EPOCHS = 20
FULL_SEEDS = 5


def _csv(kind: str, choices):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"{kind} must be a comma-separated subset of {','.join(choices)}, got {text!r}")
        return items
    return parse


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


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
    from mmim_ext.experiments.table1 import METHODS

    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if "=" in part:
            k, v = part.split("=", 1)
            k = k.strip()
            if k not in METHODS or k == "baseline":
                raise argparse.ArgumentTypeError(f"--reg-weight: unknown method {k!r} (expected one of mmim,c4,c5,c6,rdm)")
        else:
            k, v = "*", part
        try:
            out[k] = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--reg-weight: {v!r} is not a number") from None
    return out


def _add_table1(sub) -> None:
    from mmim_ext.experiments.data import DATASETS
    from mmim_ext.experiments.models import ARCHS
    from mmim_ext.experiments.table1 import METHODS, TUNE_GRID

    p = sub.add_parser(
        "table1", help="MMIM Table 1 protocol: {mlp,cnn} x {baseline,mmim,c4,c5,c6,rdm}",
        description="Train every architecture x method on the same seeds, data order and budget; "
                    "write results.json, results.md and plots to --out and print the table.")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="data set (default: digits; --quick without --dataset uses digits)")
    p.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST IDX files")
    p.add_argument("--seeds", type=_positive_int, default=None,
                   help=f"number of seeds 0..N-1 (default {FULL_SEEDS}; {QUICK_SEEDS} with --quick)")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help=f"passes over the training set per method (default {FULL_EPOCHS}; {QUICK_EPOCHS} with --quick)")
    p.add_argument("--quick", action="store_true", help="small budget for a demo in minutes")
    p.add_argument("--out", default=None, help="output directory (default results/table1_<dataset>)")
    p.add_argument("--archs", type=_csv("--archs", ARCHS), default=ARCHS, help="comma-separated, default mlp,cnn")
    p.add_argument("--methods", type=_csv("--methods", METHODS), default=METHODS,
                   help="comma-separated, default " + ",".join(METHODS))
    p.add_argument("--tune", action="store_true",
                   help="choose every regularizer strength on the validation split first (grid --tune-grid), "
                        "then run the table with the chosen values")
    p.add_argument("--tune-grid", type=_float_list, default=TUNE_GRID, help="strengths tried by --tune")
    p.add_argument("--tune-seeds", type=_positive_int, default=2, help="seeds per strength for --tune")
    p.add_argument("--reg-weight", type=_reg_weights, default=None,
                   help="override strengths, e.g. 'c4=0.1,mmim=1' or one number for all")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=_positive_int, default=128, help="penultimate units m (default 128)")
    p.add_argument("--max-pairs", type=_positive_int, default=1024,
                   help="pairs of units sampled per step for the pairwise terms (default 1024; "
                        "the sum is rescaled to all pairs)")
    p.add_argument("--critic-hidden", type=_positive_int, default=8, help="hidden units of each critic (default 8)")
    p.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                   help="do not train: combine the runs.json of earlier --out directories (e.g. one per "
                        "architecture, run in parallel) into --out")
    p.add_argument("--train-subset", type=_positive_int, default=None,
                   help="use only the first N training samples (smoke tests)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (JSON and Markdown only)")
    p.set_defaults(func=_run_table1)


def _run_table1(args) -> int:
    import torch

    from mmim_ext.experiments.data import load_dataset
    from mmim_ext.experiments.table1 import Table1Config, format_table, format_tune, run_table1, tune

    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = args.dataset or "digits"
    seeds = args.seeds or (QUICK_SEEDS if args.quick else FULL_SEEDS)
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else FULL_EPOCHS)
    out = args.out or os.path.join("results", f"table1_{dataset}" + ("_quick" if args.quick else ""))
    if args.lr <= 0:
        print("error: --lr must be > 0", file=sys.stderr)
        return 2
    if args.merge:
        from mmim_ext.experiments.table1 import merge_runs

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

    overrides: dict[str, dict[str, float]] = {}
    if args.reg_weight:
        for arch in args.archs:
            for m in args.methods:
                if m == "baseline":
                    continue
                if m in args.reg_weight:
                    overrides.setdefault(arch, {})[m] = args.reg_weight[m]
                elif "*" in args.reg_weight:
                    overrides.setdefault(arch, {})[m] = args.reg_weight["*"]
    cfg = Table1Config(dataset=dataset, archs=tuple(args.archs), methods=tuple(args.methods),
                       seeds=tuple(range(seeds)), epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                       width=args.width, reg_weights=overrides, device=args.device,
                       reg_kwargs={"max_pairs": args.max_pairs, "hidden": args.critic_hidden},
                       progress=not args.no_progress)
    try:
        cfg.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"table1: {dataset} {splits.sizes()}, archs {','.join(cfg.archs)}, methods {','.join(cfg.methods)}, "
          f"seeds {list(cfg.seeds)}, {epochs} epochs -> {out}", flush=True)
    if args.tune:
        # Tuning seeds are disjoint from the table's seeds; only validation accuracy is read.
        tuned = tune(splits, cfg, grid=args.tune_grid, seeds=tuple(range(1000, 1000 + args.tune_seeds)),
                     out_dir=out)
        print(format_tune(tuned), flush=True)
        for arch, per in tuned["chosen"].items():
            for m, lam in per.items():
                cfg.reg_weights.setdefault(arch, {}).setdefault(m, lam)
    results = run_table1(splits, cfg, out_dir=out, plots=not args.no_plots)
    print(format_table(results))
    extra = "" if args.no_plots else ", accuracy.png, mi_terms.png"
    print(f"wrote {os.path.join(out, 'results.json')}, results.md{extra} ({results['total_wall_s']:.0f} s)")
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
