"""Sub-commands that regenerate the paper: reproduce, report, bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]

BUDGETS = ("cpu", "mnist", "full")  # the budget names of paper.reproduce, without importing it
DEFAULT_CONFIGS = Path(__file__).resolve().parents[1] / "paper" / "tables"  # package data


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    from ..training.config import ConfigError

    out: dict[str, Any] = {} if args.data_dir is None else {"data_dir": args.data_dir}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"invalid --set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.replace("-", "_")] = yaml.safe_load(v)
    return out


def _tables(args: argparse.Namespace) -> list[Any]:
    from ..paper.reproduce import find_tables, load_table
    from ..training.config import ConfigError

    root = Path(args.configs)
    if not root.is_dir():
        raise ConfigError(f"invalid --configs {root}: not a folder of table configs")
    known = find_tables(root)
    wanted = list(known) if args.table.lower() == "all" else [args.table.upper()]
    missing = [t for t in wanted if t not in known]
    if missing:
        raise ConfigError(f"unknown table {missing[0]!r}; known: {', '.join(known)}")
    specs = [load_table(known[t]) for t in wanted]
    if args.table.lower() != "all":
        return specs  # a table without that budget says so (ConfigError)
    # `all` means every table that has this budget (T6, T8, T9 have no mnist budget)
    return [s for s in specs if args.budget in s.budgets]


def cmd_reproduce(args: argparse.Namespace) -> int:
    from ..paper.report import report_table
    from ..paper.reproduce import run_table

    over = _overrides(args)
    for spec in _tables(args):
        print(f"{spec.table}: running the missing runs of the {args.budget} budget")
        run_table(spec, args.budget, args.runs_dir, over)
        if not args.no_report:
            for p in report_table(spec, args.budget, args.runs_dir, args.out, over):
                print(f"  wrote {p}")
    if not args.no_report:
        from ..paper.report import write_index

        print(f"  wrote {write_index(args.out)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..paper.report import report_table, write_index

    over = _overrides(args)
    written = 0
    for spec in _tables(args):
        files = report_table(spec, args.budget, args.runs_dir, args.out, over)
        if not files:
            print(f"{spec.table} ({args.budget}): no results under {args.runs_dir}; "
                  f"its report is left as it is", file=sys.stderr)
        for p in files:
            print(p)
        written += len(files)
    if not written:
        raise FileNotFoundError(f"no results under {args.runs_dir} for {args.table} "
                                f"({args.budget}); nothing written (train them with "
                                f"`dessilbi reproduce {args.table} --budget {args.budget}`)")
    print(write_index(args.out))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ..experiments.bench import bench_models

    rows = bench_models(args.models, batch_size=args.batch_size, steps=args.steps,
                        device=args.device, image=(args.channels, args.image_size))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| model | batch | device | SGD ms | DessiLBI ms | time ratio | SGD MB | DessiLBI MB | "
          "memory ratio |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch_size']} | {r['device']} | {r['sgd_ms']:.2f} | "
              f"{r['lbi_ms']:.2f} | {r['time_ratio']:.3f} | {r['sgd_mb']:.1f} | "
              f"{r['lbi_mb']:.1f} | {r['memory_ratio']:.3f} |")
    return 0


def register(sub: Any) -> None:
    for name, func, helptext in (
        ("reproduce", cmd_reproduce, "run what is missing for a paper table, then report it"),
        ("report", cmd_report, "write docs/results/<table>_<budget>.md/.csv from run folders"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("table", help="T1 … T10, or all")
        p.add_argument("--budget", choices=BUDGETS, default="cpu",
                       help="cpu: offline data, shortened; mnist: the MNIST tables at their "
                            "stated budget; full: the paper's scale (default: %(default)s)")
        p.add_argument("--data-dir", default=None,
                       help="where the datasets are (the same as --set data_dir=DIR)")
        p.add_argument("--runs-dir", default="runs/paper")
        p.add_argument("--out", default="docs/results")
        p.add_argument("--configs", default=str(DEFAULT_CONFIGS),
                       help="folder of table configs (default: the ones shipped with dessilbi)")
        p.add_argument("--set", action="append", default=[],
                       help="override a training option of every run, e.g. --set epochs=2")
        if name == "reproduce":
            p.add_argument("--no-report", action="store_true")
        p.set_defaults(func=func)
    b = sub.add_parser("bench", help="time per iteration and memory of DessiLBI vs SGD (T6)")
    b.add_argument("--models", nargs="+", default=["lenet3", "lenet5", "resnet20"])
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--device", default="auto")
    b.add_argument("--channels", type=int, default=1)
    b.add_argument("--image-size", type=int, default=28)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)
