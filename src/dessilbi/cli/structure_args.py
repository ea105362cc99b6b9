"""The parsers of the structure sub-commands (mask, path, plot, prune, lottery, imp, grow).

Kept apart from their implementations (:mod:`.structure`, which imports torch) so that the
command line parses, and answers ``--help``, without loading torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from importlib import import_module
from typing import Any

from .options import add_config_arguments, count, fraction, nonnegative, positive, positive_int

__all__ = ["register", "command", "data_dir_option"]


def command(name: str, module: str = ".structure") -> Callable[[argparse.Namespace], int]:
    """``name`` of ``module`` (in this package), imported when the sub-command runs."""

    def run(args: argparse.Namespace) -> int:
        return int(getattr(import_module(module, __package__), name)(args) or 0)

    run.__name__ = name
    return run


def data_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="folder of the datasets (default: the one stored in the run)")


def _retrain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", required=True, help="the DessiLBI run folder")
    data_dir_option(p)
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="retraining epochs (default: the run's)")
    p.add_argument("--optimizer", default="sgd-momentum")
    p.add_argument("--lr", type=positive, default=None)
    p.add_argument("--weight-decay", type=nonnegative, default=None)
    p.add_argument("--schedule", default=None)
    p.add_argument("--milestones", type=int, nargs="*", default=None)
    p.add_argument("--seed", type=int, default=None)


def register(sub: Any) -> None:
    m = sub.add_parser("mask", help="per-layer report of a run's Γ support (or an order-based "
                       "mask at a density); save it")
    m.add_argument("run")
    m.add_argument("--epoch", type=int, default=None, help="support at the end of this epoch")
    m.add_argument("--density", type=float, default=None,
                   help="keep this fraction of weights, earliest entries first (ties: ‖W_g‖)")
    m.add_argument("--format", choices=("table", "json", "csv"), default="table")
    m.add_argument("--out", help="save the mask here (.pt)")
    data_dir_option(m)
    m.set_defaults(func=command("cmd_mask"))

    p = sub.add_parser("path", help="(epoch, density, Sparse acc) along the run; Pareto front; "
                       "choose an epoch")
    p.add_argument("run")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--max-drop", type=nonnegative, help="sparsest epoch within this many points of "
                   "the best Full accuracy")
    g.add_argument("--max-density", type=fraction, help="most accurate epoch at this density")
    p.add_argument("--save-mask", help="save the chosen epoch's mask here")
    p.set_defaults(func=command("cmd_path"))

    pl = sub.add_parser("plot", help="solution path, accuracy / density and per-layer density "
                        "figures (PNG + SVG, and TensorBoard)")
    pl.add_argument("run")
    pl.add_argument("--out", default=None, help="folder (default: RUN/plots)")
    pl.add_argument("--no-tensorboard", action="store_true")
    pl.set_defaults(func=command("cmd_plot"))

    pr = sub.add_parser("prune", help="remove masked filters / neurons: a smaller dense model")
    pr.add_argument("run", help="run folder or its checkpoint.pt")
    g = pr.add_mutually_exclusive_group()
    g.add_argument("--epoch", type=int, default=None, help="Γ support of this epoch")
    g.add_argument("--density", type=float, default=None, help="order-based mask at a density")
    pr.add_argument("--out", required=True, help="the pruned model (.pt)")
    pr.add_argument("--onnx", default=None, help="also export ONNX here and check it")
    data_dir_option(pr)
    pr.set_defaults(func=command("cmd_prune"))

    lt = sub.add_parser("lottery", help="retrain the Γ-support ticket of an epoch from the "
                        "initialisation; compare with a random mask, IMP and dense")
    _retrain_options(lt)
    lt.add_argument("--epoch", type=positive_int, required=True)
    lt.add_argument("--imp-rounds", type=count, default=0,
                    help="also run IMP to the ticket's density in this many rounds")
    lt.set_defaults(func=command("cmd_lottery"))

    im = sub.add_parser("imp", help="iterative magnitude pruning with rewinding")
    _retrain_options(im)
    im.add_argument("--density", type=fraction, required=True)
    im.add_argument("--rounds", type=positive_int, default=3)
    im.set_defaults(func=command("cmd_imp"))

    gr = sub.add_parser("grow", help="start a narrow VGG / ResNet and widen the layers whose "
                        "selected fraction exceeds τ (journal version)")
    gr.add_argument("--config", help="YAML or TOML file of training options")
    gr.add_argument("--resume", action="store_true", help="continue the growing run from its "
                    "checkpoint (a finished one is read back)")
    gr.add_argument("--overwrite", action="store_true", help="discard an existing growing run "
                    "and start again")
    gr.add_argument("--tau", type=fraction, default=0.8, help="grow a layer when more than this "
                    "fraction of its filters is in supp(Γ)")
    gr.add_argument("--grow-every", type=positive_int, default=2,
                    help="epochs between growth checks")
    gr.add_argument("--max-stages", type=positive_int, default=10)
    gr.add_argument("--finetune-epochs", type=count, default=5)
    add_config_arguments(gr)
    gr.set_defaults(func=command("cmd_grow"))
