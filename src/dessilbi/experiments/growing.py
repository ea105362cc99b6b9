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

__all__ = ["GrowConfig", "grow"]


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


def _architecture(growables: list[Growable]) -> dict[str, int]:
    return {g.name: g.conv.out_channels for g in growables}


def grow(cfg: TrainConfig, gcfg: GrowConfig, progress: Any = None) -> dict[str, Any]:
    """Grow a narrow network with DessiLBI; returns the per-stage log (also in grow.jsonl)."""
    from ..files import save_checkpoint
    from ..sparsity.masks import Mask
    from ..training.engine import _batches, build, epoch_indices, evaluate

    gcfg.validate()
    if cfg.optimizer != "dessilbi":
        raise ValueError("invalid optimizer: growing follows the Γ support, use dessilbi")
    b = build(cfg)
    model, opt, device = b.model, b.optimizer, b.device
    run_dir = Path(cfg.runs_dir) / (cfg.name or gcfg.folder_name(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "grow.jsonl"
    log_path.write_text("")
    example = torch.stack([b.test_set[0][0]]).to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    epoch, stages = 0, []

    def train_epochs(n: int) -> None:
        nonlocal epoch
        for _ in range(n):
            model.train()
            idx = epoch_indices(len(b.train_set), cfg.seed, epoch)
            if cfg.max_train_batches:
                idx = idx[: cfg.max_train_batches * cfg.batch_size]
            for x, y in _batches(b.train_set, idx, cfg.batch_size, 0, False):
                x, y = x.to(device), y.to(device)
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            epoch += 1
            if progress is not None:
                progress(epoch)

    for stage in range(gcfg.max_stages):
        train_epochs(gcfg.grow_every)
        growables = find_growable(model, example)
        fractions = {g.name: selected_fraction(opt, g.conv) for g in growables}
        full = evaluate(model, b.test_set, device)
        mask = Mask.from_optimizer(model, opt)
        with mask.applied(model):
            sparse = evaluate(model, b.test_set, device)
        to_grow = [g for g in growables if fractions[g.name] > gcfg.tau]
        record = {"stage": stage, "epoch": epoch, "architecture": _architecture(growables),
                  "selected_fraction": fractions, "full_acc": full, "sparse_acc": sparse,
                  "density": mask.density(), "params": sum(p.numel() for p in model.parameters()),
                  "grown": {g.name: grown_size(g.conv.out_channels) for g in to_grow}}
        stages.append(record)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("stage %d (epoch %d): full %.2f%%, sparse %.2f%%, growing %s", stage, epoch,
                 full, sparse, record["grown"] or "nothing")
        if not to_grow:
            break
        old_names = {id(p): n for n, p in model.named_parameters()}
        old_opt = opt
        for g in to_grow:
            grow_layer(g, grown_size(g.conv.out_channels), gen)
        # the grown network keeps the ν the run started with (derived from its length)
        ocfg = dataclasses.replace(cfg.optimizer_config(), nu=old_opt.param_groups[0].get("nu"))
        opt = create_optimizer(ocfg, model)
        transfer_state(old_opt, old_names, opt, model)
    train_epochs(gcfg.finetune_epochs)
    final = {"stage": "final", "epoch": epoch,
             "architecture": _architecture(find_growable(model, example)),
             "full_acc": evaluate(model, b.test_set, device),
             "params": sum(p.numel() for p in model.parameters())}
    stages.append(final)
    with open(log_path, "a") as f:
        f.write(json.dumps(final) + "\n")
    torch.save(model, run_dir / "grown_model.pt")
    save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict()},
                    run_dir / "grown_state.pt")
    return {"run": str(run_dir), "stages": stages}
