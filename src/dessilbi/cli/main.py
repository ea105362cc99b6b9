"""The ``dessilbi`` command line.

    dessilbi train [--config FILE] [--model M --dataset D --optimizer O --kappa K --nu N ...]
    dessilbi eval RUN_DIR|CHECKPOINT
    dessilbi sweep --config FILE --grid nu=20,100 --grid seed=0,1

Every ``train`` option can also be set in a YAML / TOML ``--config`` file (command-line flags
win). Bad input prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import (
    CheckpointError,
    ConfigError,
    CorruptDatasetError,
    DatasetNotFoundError,
    NonFiniteLossError,
    RunExistsError,
    RunLockedError,
)
from ..tables import format_table
from ..training.config import flat_fields
from .options import Parser, add_config_arguments, arg_type, config_from_args
from .structure_args import data_dir_option

__all__ = ["main"]

log = logging.getLogger("dessilbi")

def _print_table(rows: list[list[str]]) -> None:
    print(format_table(rows))


def cmd_train(args: argparse.Namespace) -> int:
    from ..sparsity.masks import format_report
    from ..training.engine import train

    cfg = config_from_args(args)
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    final = summary["final"]
    print(f"\nrun: {summary['run']}   data: {summary['dataset']} ({summary['dataset_source']})")
    if not final:
        print("nothing to do: the run had already finished all its epochs")
        return 0
    def pct(key: str, digits: int = 2) -> str:
        return f"{100 * final[key]:.{digits}f}%" if key in final else "—"

    rows = [["model", "epochs", "Full acc", "Sparse acc", "density", "units kept", "MACs",
             "params"],
            [cfg.model, str(final["epoch"]), f"{final['full_acc']:.2f}%",
             f"{final['sparse_acc']:.2f}%" if "sparse_acc" in final else "—", pct("density"),
             pct("unit_density", 1), pct("macs_ratio", 1), pct("params_ratio", 1)]]
    _print_table(rows)
    if final.get("layers"):
        print()
        print(format_report(final["layers"]))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..core.optim import DessiLBI
    from ..sparsity.masks import (
        applied_masks,
        format_report,
        layer_report,
        named_masks,
        named_penalties,
    )
    from ..training.batches import evaluate
    from ..training.runs import open_run

    run = open_run(args.checkpoint)
    b = run.build(device=args.device, data_dir=args.data_dir)
    full = evaluate(b.model, b.test_set, b.device)
    result: dict[str, Any] = {"checkpoint": str(run.checkpoint_path),
                              "epoch": run.checkpoint().get("epoch"), "full_acc": full}
    if isinstance(b.optimizer, DessiLBI):
        masks = named_masks(b.model, b.optimizer)
        with applied_masks(b.model, masks):
            result["sparse_acc"] = evaluate(b.model, b.test_set, b.device)
        report = layer_report(masks, named_penalties(b.model, b.optimizer))
        result["density"] = report.pop("(all)")["density"]
        result["layers"] = report
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{run.checkpoint_path} (epoch {result['epoch']}, {b.cfg.dataset} test set)")
    # a run without a Γ (SGD, Adam, ...) has no Sparse model: "—", as train's table says
    _print_table([["Full acc", "Sparse acc", "density"],
                  [f"{full:.2f}%",
                   f"{result['sparse_acc']:.2f}%" if "sparse_acc" in result else "—",
                   f"{100 * result['density']:.2f}%" if "density" in result else "—"]])
    if result.get("layers"):
        print()
        print(format_report(result["layers"]))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .. import catalog

    for title, table in (("model", catalog.MODELS), ("dataset", catalog.DATASETS),
                         ("optimizer", catalog.OPTIMIZERS)):
        print(format_table([[title, "what it is"], *table.items()], left=2) + "\n")
    return 0


def _parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    known = {f.key: f for f in flat_fields()}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"invalid --grid {item!r}: expected key=v1,v2,...")
        key, values = item.split("=", 1)
        k = key.replace("-", "_")
        k = "lambda_" if k == "lambda" else k
        if k not in known:
            raise ConfigError(f"invalid --grid key {key!r}: not a training option")
        tp, _ = arg_type(known[k].type)
        conv = tp or (lambda s: s.lower() in ("1", "true", "yes"))
        try:
            grid[k] = [conv(v) for v in values.split(",") if v != ""]
        except ValueError as e:
            raise ConfigError(f"invalid --grid {item!r}: {e}") from e
        if not grid[k]:
            raise ConfigError(f"invalid --grid {item!r}: no values")
    return grid


def cmd_sweep(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..training.engine import train

    grid = _parse_grid(args.grid)
    keys = list(grid)
    combos = list(itertools.product(*grid.values())) or [()]
    rows = [keys + ["Full acc", "Sparse acc", "density", "run"]]
    records = []
    for combo in tqdm(combos, desc="sweep", disable=not sys.stderr.isatty()):
        # each grid point gets its own configuration-named folder
        cfg = config_from_args(args, dict(zip(keys, combo))).replace(name="")
        summary = train(cfg, resume=True)  # a finished grid point is read back
        final = summary["final"]
        records.append({**dict(zip(keys, combo)), **{k: final.get(k) for k in
                        ("full_acc", "sparse_acc", "density")}, "run": summary["run"]})
        rows.append([str(v) for v in combo] + [
            f"{final['full_acc']:.2f}", f"{final['sparse_acc']:.2f}" if "sparse_acc" in final
            else "—", f"{100 * final['density']:.2f}%" if "density" in final else "—",
            Path(summary["run"]).name])
    _print_table(rows)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records, indent=2))
    return 0


# ------------------------------------------------------------------------------- parser
class _Version(argparse.Action):
    """``--version``: imports torch only when asked (``--help`` and parsing never load it)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        import torch

        from .. import __version__

        sys.stdout.write(f"dessilbi {__version__} (torch {torch.__version__})\n")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="dessilbi", description="Train with DessiLBI and read off "
               "the sparse structure it finds.")
    p.add_argument("-V", "--version", action=_Version, nargs=0,
                   help="the versions of dessilbi and torch, then exit")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (also DESSILBI_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model (no options: the README's main job)")
    t.add_argument("--config", help="YAML or TOML file of training options")
    t.add_argument("--resume", action="store_true", help="continue the run from its checkpoint")
    t.add_argument("--overwrite", action="store_true", help="discard an existing run and restart")
    add_config_arguments(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="Full / Sparse accuracy and per-layer density of a checkpoint")
    e.add_argument("checkpoint", help="a run folder or a checkpoint.pt")
    e.add_argument("--device", default=None, help="auto (CUDA when available), cpu, cuda or cuda:N")
    e.add_argument("--json", action="store_true", help="print JSON")
    data_dir_option(e)
    e.set_defaults(func=cmd_eval)

    ls = sub.add_parser("list", help="the models, datasets and optimizers, with what each is")
    ls.set_defaults(func=cmd_list)

    s = sub.add_parser("sweep", help="grid over options; runs what is missing; one table")
    s.add_argument("--config", help="YAML or TOML file of the shared training options")
    s.add_argument("--grid", action="append", default=[],
                   help="key=v1,v2,... (repeatable), e.g. --grid nu=20,100 --grid seed=0,1")
    s.add_argument("--out", help="write the summary as JSON here")
    add_config_arguments(s)
    s.set_defaults(func=cmd_sweep)
    from .paper import register as register_paper
    from .structure_args import register as register_structure

    register_structure(sub)
    register_paper(sub)
    return p


def _one_line(e: BaseException) -> str:
    """An error as one line (OSError: the file and the reason; KeyError: its message)."""
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader went away (`dessilbi list | head`): nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ConfigError, DatasetNotFoundError, CorruptDatasetError, CheckpointError,
            RunExistsError, RunLockedError, ValueError, KeyError, OSError) as e:
        if args.debug or os.environ.get("DESSILBI_DEBUG") == "1":
            raise
        print(f"dessilbi: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"dessilbi: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dessilbi: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
