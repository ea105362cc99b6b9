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
from torch import Tensor, nn

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
from ..training.rundir import RunDir

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


class _Growth:
    """The growing run's own state, checkpointed with the loop (``checkpoint.pt["growth"]``):
    the stage records, whether layers still grow, the current widths and the generator that
    draws new filters, so that a resumed run grows exactly as an uninterrupted one."""

    state_key = "growth"

    def __init__(self, model: nn.Module, example: Tensor, seed: int) -> None:
        self.model, self.example = model, example
        self.gen = torch.Generator().manual_seed(seed)
        self.stages: list[dict[str, Any]] = []
        self.growing = True

    def architecture(self) -> dict[str, int]:
        return _architecture(find_growable(self.model, self.example))

    def state_dict(self) -> dict[str, Any]:
        return {"stages": self.stages, "growing": self.growing, "generator": self.gen.get_state(),
                "architecture": self.architecture()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stages, self.growing = list(state["stages"]), bool(state["growing"])
        self.gen.set_state(state["generator"])


def grow(cfg: TrainConfig, gcfg: GrowConfig, progress: Any = None, *, resume: bool = False,
         overwrite: bool = False) -> dict[str, Any]:
    """Grow a narrow network with DessiLBI; returns the per-stage log (also in grow.jsonl).

    Training goes through the same loop as ``dessilbi train`` (schedule, AMP, NaN guard,
    ``checkpoint.pt`` every epoch and on Ctrl-C); the schedule runs over the epochs of every
    stage and the fine-tuning, uninterrupted by growing. ``resume`` continues from the
    checkpoint (bit for bit on CPU) and reads a finished run back.
    """
    from ..training.engine import RunExistsError, run_lock

    gcfg.validate()
    if cfg.optimizer != "dessilbi":
        raise ValueError("invalid optimizer: growing follows the Γ support, use dessilbi")
    cfg = cfg.resolved()[0]
    run_dir = Path(cfg.runs_dir) / (cfg.name or gcfg.folder_name(cfg))
    log_path = run_dir / "grow.jsonl"
    finished = (run_dir / GROWN_FILE).exists()
    if resume and finished:  # read back, never trained again
        stages = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
        return {"run": str(run_dir), "stages": stages}
    checkpoint = RunDir(run_dir).checkpoint
    if (finished or checkpoint.exists()) and not (resume or overwrite):
        raise RunExistsError(f"growing run {run_dir} exists; pass --resume to continue it or "
                             "--overwrite to start again")
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        if overwrite and not resume:
            for path in (run_dir / GROWN_FILE, checkpoint,
                         checkpoint.with_name(checkpoint.name + ".prev"), log_path):
                path.unlink(missing_ok=True)
        return _grow(cfg, gcfg, run_dir, progress, resume)


def _grow(cfg: TrainConfig, gcfg: GrowConfig, run_dir: Path, progress: Any,
          resume: bool) -> dict[str, Any]:
    from ..files import save_checkpoint
    from ..training.build import Dist, build, model_spec
    from ..training.callbacks import Checkpointer, NonFiniteGuard
    from ..training.engine import amp_dtype, grad_scaler
    from ..training.loop import Loop, fit

    b = build(cfg)
    model, device = b.model, b.device
    example = torch.stack([b.test_set[0][0]]).to(device)
    loop = Loop(cfg, b, model, grad_scaler(cfg, b), amp_dtype(cfg, b), Dist(), run_dir)
    growth = _Growth(model, example, cfg.seed)
    checkpointer = Checkpointer([growth])
    callbacks = [NonFiniteGuard(cfg.log_every, loop.files.checkpoint), _Report(progress),
                 checkpointer]
    if resume:
        _restore(cfg, loop, growth, checkpointer)
    while growth.growing and len(growth.stages) < gcfg.max_stages:
        # --epochs is the whole budget: a stage starts only if its fine-tuning still fits
        end = (len(growth.stages) + 1) * gcfg.grow_every
        if end + gcfg.finetune_epochs > cfg.epochs:
            break
        fit(loop, callbacks, until=end)
        record, to_grow = _stage(loop, growth, gcfg.tau)
        growth.stages.append(record)
        growth.growing = bool(to_grow)
        if to_grow:
            loop.built = _grown(cfg, loop.built, to_grow, growth.gen)
        _write_log(run_dir / "grow.jsonl", growth.stages)
        checkpointer.save(loop)  # the grown network and its record, at the stage boundary
    fit(loop, callbacks,
        until=max(cfg.epochs, len(growth.stages) * gcfg.grow_every + gcfg.finetune_epochs))
    final = {"stage": "final", "epoch": loop.epoch, "architecture": growth.architecture(),
             "full_acc": _evaluate(loop)[0],
             "params": sum(p.numel() for p in model.parameters())}
    stages = [*growth.stages, final]
    _write_log(run_dir / "grow.jsonl", stages)
    save_checkpoint({"format": GROWN_FORMAT, "model_spec": model_spec(cfg.net, b.info),
                     "architecture": final["architecture"], "example_shape": list(example.shape),
                     "model": model.state_dict(), "optimizer": loop.built.optimizer.state_dict()},
                    run_dir / GROWN_FILE)
    return {"run": str(run_dir), "stages": stages}


def _evaluate(loop: Any) -> tuple[float, float, Any]:
    """Full accuracy, Sparse accuracy and the Γ-support mask of the loop's model."""
    from ..sparsity.masks import Mask
    from ..training.batches import evaluate

    model, b = loop.model, loop.built
    mask = Mask.from_optimizer(model, b.optimizer)
    full = evaluate(model, b.test_set, b.device)
    with mask.applied(model):
        sparse = evaluate(model, b.test_set, b.device)
    return full, sparse, mask


def _stage(loop: Any, growth: _Growth, tau: float) -> tuple[dict[str, Any], list[Growable]]:
    """The record of a stage boundary and the layers to grow (selected fraction > τ)."""
    opt = loop.built.optimizer
    growables = find_growable(loop.model, growth.example)
    fractions = {g.name: selected_fraction(opt, g.conv) for g in growables}
    full, sparse, mask = _evaluate(loop)
    to_grow = [g for g in growables if fractions[g.name] > tau]
    record = {"stage": len(growth.stages), "epoch": loop.epoch, "lr": opt.param_groups[0]["lr"],
              "architecture": _architecture(growables), "selected_fraction": fractions,
              "full_acc": full, "sparse_acc": sparse, "density": mask.density(),
              "params": sum(p.numel() for p in loop.model.parameters()),
              "grown": {g.name: grown_size(g.conv.out_channels) for g in to_grow}}
    log.info("stage %d (epoch %d): full %.2f%%, sparse %.2f%%, growing %s", record["stage"],
             loop.epoch, full, sparse, record["grown"] or "nothing")
    return record, to_grow


def _write_log(path: Path, stages: list[dict[str, Any]]) -> None:
    from ..files import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(s) + "\n" for s in stages))


def _restore(cfg: TrainConfig, loop: Any, growth: _Growth, checkpointer: Any) -> None:
    """Widen the network to the checkpoint's architecture, then load the checkpoint."""
    ck = checkpointer.load(loop)
    if ck is None:
        log.info("no checkpoint in %s: starting from scratch", loop.run_dir)
        return
    widths = ck["growth"]["architecture"]
    wider = [g for g in find_growable(loop.model, growth.example)
             if widths.get(g.name, g.conv.out_channels) > g.conv.out_channels]
    for g in wider:  # the new filters are overwritten by the checkpoint's weights
        grow_layer(g, widths[g.name], torch.Generator().manual_seed(0))
    if wider:
        loop.built = _rebuilt_optimizer(cfg, loop.built)
    checkpointer.apply(loop, ck)
    log.info("resumed %s at epoch %d, batch %d (stage %d)", loop.run_dir, loop.epoch,
             loop.batch, len(growth.stages))


def _rebuilt_optimizer(cfg: TrainConfig, b: Any) -> Any:
    """The run's parts with an optimizer and schedule over the (widened) network's parameters;
    the ν the run started with is kept (derived from its length)."""
    from ..training.build import make_scheduler

    old = b.optimizer
    ocfg = dataclasses.replace(cfg.optim, nu=old.param_groups[0].get("nu"))
    opt = create_optimizer(ocfg, b.model)
    for group in opt.param_groups:  # the current lr, not the initial one
        group["lr"] = old.param_groups[0]["lr"]
    sched = make_scheduler(cfg.sched, opt)
    sched.load_state_dict(b.scheduler.state_dict())
    return dataclasses.replace(b, optimizer=opt, scheduler=sched)


def _grown(cfg: TrainConfig, b: Any, to_grow: list[Growable], gen: torch.Generator) -> Any:
    """Widen ``to_grow`` and return the run's parts with an optimizer over the wider network
    (state carried over) and the schedule continuing where it was."""
    model, old = b.model, b.optimizer
    old_names = {id(p): n for n, p in model.named_parameters()}
    for g in to_grow:
        grow_layer(g, grown_size(g.conv.out_channels), gen)
    rebuilt = _rebuilt_optimizer(cfg, b)
    transfer_state(old, old_names, rebuilt.optimizer, model)
    return rebuilt


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
