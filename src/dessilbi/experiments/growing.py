"""Network growing with DessiLBI (the journal version): start narrow, widen what is saturated.

Every ``grow_every`` epochs, each convolution whose fraction of filters in supp(Γ) exceeds τ grows
(:mod:`dessilbi.structure.grow` does the surgery, keeping the function computed); growing stops
when no layer grows, then the network is fine-tuned.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.optimizers import create_optimizer
from ..structure.grow import (
    Growable,
    find_growable,
    grow_layer,
    grown_size,
    selected_fraction,
    transfer_state,
)
from ..training.config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["GrowConfig", "grow", "load_grown", "GROWN_FILE"]


@dataclass
class GrowConfig:
    """Growing schedule on top of a :class:`TrainConfig` (whose ``width`` sets the start)."""

    tau: float = 0.8
    grow_every: int = 2
    max_stages: int = 10
    finetune_epochs: int = 5

    def folder_name(self, cfg: TrainConfig) -> str:
        """Every growing option and the training run's name: two schedules never share."""
        return (f"grow_tau{self.tau:g}_every{self.grow_every}_stages{self.max_stages}"
                f"_ft{self.finetune_epochs}_{cfg.resolved()[0].run_name()}")

    def validate(self) -> GrowConfig:
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"invalid tau={self.tau!r}: must be in (0, 1]")
        for f in ("grow_every", "max_stages"):
            if getattr(self, f) < 1:
                raise ValueError(f"invalid {f}={getattr(self, f)!r}: must be >= 1")
        if self.finetune_epochs < 0:
            raise ValueError(f"invalid finetune_epochs={self.finetune_epochs!r}: must be >= 0")
        return self


GROWN_FILE = "grown.pt"
GROWN_FORMAT = "dessilbi-grown-v1"


def _architecture(growables: list[Growable]) -> dict[str, int]:
    return {g.name: g.conv.out_channels for g in growables}


class _Report:
    """Tells the caller (a progress bar) after every epoch."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress

    def on_epoch_end(self, loop: Any, metrics: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress(loop.epoch)


def grow(cfg: TrainConfig, gcfg: GrowConfig, progress: Any = None) -> dict[str, Any]:
    """Grow a narrow network with DessiLBI; returns the per-stage log (also in grow.jsonl).

    Training goes through the same loop as ``dessilbi train`` (schedule, AMP, NaN guard); the
    schedule runs over the epochs of every stage and the fine-tuning, uninterrupted by growing.
    """
    from ..files import save_checkpoint
    from ..sparsity.masks import Mask
    from ..training.batches import evaluate
    from ..training.build import Dist, build, model_spec
    from ..training.callbacks import NonFiniteGuard
    from ..training.engine import amp_dtype, grad_scaler
    from ..training.loop import Loop, fit

    gcfg.validate()
    if cfg.optimizer != "dessilbi":
        raise ValueError("invalid optimizer: growing follows the Γ support, use dessilbi")
    cfg = cfg.resolved()[0]
    b = build(cfg)
    model, device = b.model, b.device
    run_dir = Path(cfg.runs_dir) / (cfg.name or gcfg.folder_name(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "grow.jsonl"
    log_path.write_text("")
    example = torch.stack([b.test_set[0][0]]).to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    loop = Loop(cfg, b, model, grad_scaler(cfg, b), amp_dtype(cfg, b), Dist(), run_dir)
    # no checkpoint.pt in a growing run: the NaN message says none was written
    callbacks = [NonFiniteGuard(cfg.log_every, run_dir / "checkpoint.pt"), _Report(progress)]
    stages = []

    for stage in range(gcfg.max_stages):
        # --epochs is the whole budget: a stage starts only if its fine-tuning still fits
        if loop.epoch + gcfg.grow_every + gcfg.finetune_epochs > cfg.epochs:
            break
        fit(loop, callbacks, until=loop.epoch + gcfg.grow_every)
        opt = loop.built.optimizer
        growables = find_growable(model, example)
        fractions = {g.name: selected_fraction(opt, g.conv) for g in growables}
        full = evaluate(model, b.test_set, device)
        mask = Mask.from_optimizer(model, opt)
        with mask.applied(model):
            sparse = evaluate(model, b.test_set, device)
        to_grow = [g for g in growables if fractions[g.name] > gcfg.tau]
        record = {"stage": stage, "epoch": loop.epoch, "lr": opt.param_groups[0]["lr"],
                  "architecture": _architecture(growables),
                  "selected_fraction": fractions, "full_acc": full, "sparse_acc": sparse,
                  "density": mask.density(), "params": sum(p.numel() for p in model.parameters()),
                  "grown": {g.name: grown_size(g.conv.out_channels) for g in to_grow}}
        stages.append(record)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("stage %d (epoch %d): full %.2f%%, sparse %.2f%%, growing %s", stage,
                 loop.epoch, full, sparse, record["grown"] or "nothing")
        if not to_grow:
            break
        loop.built = _grown(cfg, loop.built, to_grow, gen)
    fit(loop, callbacks, until=max(cfg.epochs, loop.epoch + gcfg.finetune_epochs))
    final = {"stage": "final", "epoch": loop.epoch,
             "architecture": _architecture(find_growable(model, example)),
             "full_acc": evaluate(model, b.test_set, device),
             "params": sum(p.numel() for p in model.parameters())}
    stages.append(final)
    with open(log_path, "a") as f:
        f.write(json.dumps(final) + "\n")
    save_checkpoint({"format": GROWN_FORMAT, "model_spec": model_spec(cfg, b.info), "architecture":
                     final["architecture"], "example_shape": list(example.shape),
                     "model": model.state_dict(), "optimizer": loop.built.optimizer.state_dict()},
                    run_dir / GROWN_FILE)
    return {"run": str(run_dir), "stages": stages}


def _grown(cfg: TrainConfig, b: Any, to_grow: list[Growable], gen: torch.Generator) -> Any:
    """Widen ``to_grow`` and return the run's parts with an optimizer over the wider network
    (state carried over) and the schedule continuing where it was."""
    from ..training.build import make_scheduler

    model, old = b.model, b.optimizer
    old_names = {id(p): n for n, p in model.named_parameters()}
    for g in to_grow:
        grow_layer(g, grown_size(g.conv.out_channels), gen)
    # the grown network keeps the ν the run started with (derived from its length)
    ocfg = dataclasses.replace(cfg.optimizer_config(), nu=old.param_groups[0].get("nu"))
    opt = create_optimizer(ocfg, model)
    transfer_state(old, old_names, opt, model)
    for group in opt.param_groups:  # the current lr, not the initial one
        group["lr"] = old.param_groups[0]["lr"]
    sched = make_scheduler(cfg, opt)
    sched.load_state_dict(b.scheduler.state_dict())
    return dataclasses.replace(b, optimizer=opt, scheduler=sched)


def load_grown(path: str | Path) -> nn.Module:
    """The grown network of a growing run (its folder or its ``grown.pt``), rebuilt from the
    recipe — the dense model at its starting width, each growable layer widened to its final
    width — and loaded with the trained weights; the file holds tensors and values only."""
    from ..files import CheckpointError, load_checkpoint
    from ..zoo.models import create_model

    path = Path(path)
    state = load_checkpoint(path / GROWN_FILE if path.is_dir() else path)
    if not isinstance(state, dict) or state.get("format") != GROWN_FORMAT:
        raise CheckpointError(f"{path}: not a grown model saved by dessilbi ({GROWN_FORMAT})")
    model = create_model(**state["model_spec"])
    gen = torch.Generator().manual_seed(0)  # the new filters are overwritten by the weights
    for g in find_growable(model, torch.zeros(state["example_shape"])):
        if state["architecture"].get(g.name, g.conv.out_channels) > g.conv.out_channels:
            grow_layer(g, state["architecture"][g.name], gen)
    model.load_state_dict(state["model"])
    return model.eval()
