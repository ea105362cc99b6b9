"""Sub-commands on the structure a run found: mask, path, plot, prune, lottery, imp."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..sparsity.masks import Mask, format_report
from ..tables import format_table as _table
from ..training.config import TrainConfig
from ..training.runs import choose_epoch, open_run, pareto_front

log = logging.getLogger("dessilbi")

__all__ = ["cmd_mask", "cmd_path", "cmd_plot", "cmd_prune", "cmd_lottery", "cmd_imp",
           "cmd_grow"]


def _select_mask(run: Any, model: torch.nn.Module, epoch: int | None,
                 density: float | None) -> Mask:
    if density is not None:
        sf = run.support_file()
        return Mask.from_entry_order(model, sf["entry"], sf["penalties"], density)
    return run.mask(epoch)


# ----------------------------------------------------------------------------- mask
def cmd_mask(args: argparse.Namespace) -> int:
    run = open_run(args.run)
    if args.density is not None:
        b = run.build(device="cpu", data_dir=args.data_dir)
        mask = _select_mask(run, b.model, None, args.density)
    else:
        mask = run.mask(args.epoch)
    print(format_report(mask.report(), args.format))
    if args.out:
        mask.save(args.out)
        log.info("mask saved to %s", args.out)
    return 0


# ----------------------------------------------------------------------------- path
def cmd_path(args: argparse.Namespace) -> int:
    run = open_run(args.run)
    pts = [m for m in run.metrics if "sparse_acc" in m]
    if not pts:
        raise ValueError(f"{run.dir} has no Sparse accuracies (not a DessiLBI run?)")
    front = {p["epoch"] for p in pareto_front(pts)}
    rows = [["epoch", "density", "Full acc", "Sparse acc", "Pareto"]]
    for p in pts:
        rows.append([str(p["epoch"]), f"{100 * p['density']:.2f}%", f"{p['full_acc']:.2f}",
                     f"{p['sparse_acc']:.2f}", "*" if p["epoch"] in front else ""])
    print(_table(rows))
    pick = choose_epoch(pts, args.max_drop, args.max_density)
    if args.max_drop is not None or args.max_density is not None:
        rule = (f"sparsest within {args.max_drop} points of the best Full accuracy"
                if args.max_drop is not None else f"most accurate at density ≤ {args.max_density}")
        if pick is None:
            print(f"\nno epoch satisfies: {rule}")
            return 1
        print(f"\n{rule}: epoch {pick['epoch']} (density {100 * pick['density']:.2f}%, "
              f"Sparse {pick['sparse_acc']:.2f}%)")
        if args.save_mask:
            run.mask(pick["epoch"]).save(args.save_mask)
            print(f"mask saved to {args.save_mask}")
    return 0


# ----------------------------------------------------------------------------- plot
def cmd_plot(args: argparse.Namespace) -> int:
    from ..paper.plots import plot_run

    for p in plot_run(args.run, args.out, tensorboard=not args.no_tensorboard):
        print(p)
    return 0


# ----------------------------------------------------------------------------- prune
def cmd_prune(args: argparse.Namespace) -> int:
    from ..structure.prune import cpu_latency, export_onnx, prune_model
    from ..training.batches import evaluate
    from ..training.build import model_spec
    from ..training.pruned import save_pruned

    run = open_run(args.run)
    b = run.build(device="cpu", data_dir=args.data_dir)
    model = b.model.eval()
    mask = _select_mask(run, model, args.epoch, args.density)
    x1 = torch.stack([b.test_set[0][0]])
    result = prune_model(model, mask, x1)
    pruned = result.model.eval()
    batch = torch.stack([b.test_set[i][0] for i in range(min(64, len(b.test_set)))])
    lat0, lat1 = cpu_latency(model, batch), cpu_latency(pruned, batch)
    with mask.applied(model):
        sparse = evaluate(model, b.test_set, torch.device("cpu"))
    report = {
        "run": str(run.dir), "mask_density": mask.density(),
        "full_acc": evaluate(model, b.test_set, torch.device("cpu")), "sparse_acc": sparse,
        "pruned_acc": evaluate(pruned, b.test_set, torch.device("cpu")),
        "params_before": result.params_before, "params_after": result.params_after,
        "macs_before": result.macs_before, "macs_after": result.macs_after,
        "latency_before_ms": 1e3 * lat0, "latency_after_ms": 1e3 * lat1,
        "latency_batch": int(batch.shape[0]), "removed_channels": result.removed,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_pruned(out, model_spec(run.cfg.net, b.info), mask, pruned, tuple(x1.shape))
    if args.onnx:
        report["onnx"] = args.onnx
        report["onnx_max_abs_diff"] = export_onnx(pruned, x1, args.onnx)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    rows = [["", "before", "after", "ratio"],
            ["params", f"{result.params_before:,}", f"{result.params_after:,}",
             f"{result.params_after / result.params_before:.3f}"],
            ["MACs", f"{result.macs_before:,}", f"{result.macs_after:,}",
             f"{result.macs_after / max(result.macs_before, 1):.3f}"],
            [f"CPU latency (batch {batch.shape[0]}, ms)", f"{1e3 * lat0:.2f}", f"{1e3 * lat1:.2f}",
             f"{lat1 / lat0:.3f}"]]
    print(_table(rows))
    print(f"\nmask density {100 * mask.density():.2f}%: Full {report['full_acc']:.2f}%, "
          f"Sparse {sparse:.2f}%, pruned {report['pruned_acc']:.2f}%")
    print(f"saved {out} (dessilbi.training.pruned.load_pruned(path)) and "
          f"{out.with_suffix('.json')}")
    if args.onnx:
        print(f"ONNX {args.onnx}: max |onnxruntime − torch| = {report['onnx_max_abs_diff']:.2e}")
    return 0


# ----------------------------------------------------------------------------- tickets
def _ticket_config(run: Any, args: argparse.Namespace) -> TrainConfig:
    from ..experiments.lottery import ticket_config

    return ticket_config(run.cfg, run.dir, optimizer=args.optimizer,
                         epochs=args.epochs or run.cfg.epochs,
                         **{k: getattr(args, k, None) for k in
                            ("lr", "weight_decay", "schedule", "milestones", "seed", "data_dir")})


def cmd_lottery(args: argparse.Namespace) -> int:
    from ..experiments.lottery import lottery

    run = open_run(getattr(args, "from"))
    if not run.files.init.exists():
        raise ValueError(f"{run.dir} has no {run.files.INIT} to rewind to")
    base = _ticket_config(run, args)
    result = lottery(run.dir, run.mask(args.epoch), args.epoch, base, seed=args.seed or 0,
                     imp_rounds=args.imp_rounds)
    labels = {"gamma": f"Γ ticket (epoch {args.epoch})",
              "random": "random (same per-layer density)",
              "imp": f"IMP ({args.imp_rounds} rounds, rewind to init)", "dense": "dense (no mask)"}
    rows = [["method", "density", "best acc", "final acc"]]
    rows += [[labels[r["method"]], f"{100 * r['density']:.2f}%", f"{r['best_acc']:.2f}",
              f"{r['final_acc']:.2f}"] for r in result.records]
    text = _table(rows)
    print(text)
    print(f"results in {result.folder}")
    (result.folder / "lottery.md").write_text(
        f"Retrained with {base.optimizer}, lr {base.lr:g}, {base.epochs} epochs, seed "
        f"{base.seed}, from {base.init_from}\n\n" + text + "\n")
    return 0


def cmd_imp(args: argparse.Namespace) -> int:
    from ..experiments.lottery import best_and_final, branch_dir, imp

    run = open_run(getattr(args, "from"))
    base = _ticket_config(run, args)
    names = list(run.support_file()["masks"]) if run.files.masks.exists() else [
        n for n, p in run.checkpoint()["model"].items() if p.ndim >= 2]
    folder = branch_dir(run.dir, "imp", base, density=args.density, rounds=args.rounds)
    mask, s = imp(base, names, args.density, args.rounds, folder)
    best, final = best_and_final(s)
    print(_table([["rounds", "density", "best acc", "final acc"],
                  [str(args.rounds), f"{100 * mask.density():.2f}%", f"{best:.2f}",
                   f"{final:.2f}"]]))
    mask.save(folder / "imp_final.mask.pt")
    print(f"results in {folder}")
    return 0


# ----------------------------------------------------------------------------- grow
def cmd_grow(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..experiments.growing import GrowConfig, grow
    from ..training.config import load_config_file
    from .options import config_from_args

    file_keys = {str(k).replace("-", "_") for k in load_config_file(args.config)} \
        if args.config else set()
    cfg = config_from_args(args)
    if args.model is None and "model" not in file_keys:  # growing starts narrow: VGG by default
        cfg = cfg.replace(model="vgg16_bn")
    if args.width is None and "width" not in file_keys:
        cfg = cfg.replace(width=0.25)
    gcfg = GrowConfig(tau=args.tau, grow_every=args.grow_every, max_stages=args.max_stages,
                      finetune_epochs=args.finetune_epochs)
    bar = tqdm(desc="grow", unit="epoch", disable=not cfg.progress)
    result = grow(cfg, gcfg, progress=lambda e: bar.update(1), resume=args.resume,
                  overwrite=args.overwrite)
    bar.close()
    rows = [["stage", "epoch", "params", "Full acc", "Sparse acc", "grown layers"]]
    for st in result["stages"]:
        rows.append([str(st["stage"]), str(st["epoch"]), f"{st['params']:,}",
                     f"{st['full_acc']:.2f}", f"{st['sparse_acc']:.2f}" if "sparse_acc" in st
                     else "—", ", ".join(f"{k}→{v}" for k, v in st.get("grown", {}).items())
                     or "—"])
    print(_table(rows))
    first, last = result["stages"][0]["architecture"], result["stages"][-1]["architecture"]
    print("\nwidths: " + ", ".join(f"{k} {first[k]}→{last.get(k, first[k])}" for k in first))
    print(f"run: {result['run']} (grow.jsonl; grown.pt: dessilbi.experiments.growing.load_grown)")
    return 0
