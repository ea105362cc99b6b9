"""The side effects of a training run, one callback each (hooks: :mod:`.loop`).

Order matters and is the order :func:`dessilbi.training.engine.default_callbacks` lists them:
what changes the weights around a step (the sparsity target, a fixed mask), what measures an
epoch (Sparse model, supports, path), then what writes (metrics, TensorBoard, checkpoint).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.optim import DessiLBI
from ..core.target import SparsityTarget
from ..core.units import unit_density
from ..errors import NonFiniteLossError
from ..files import load_checkpoint, load_with_fallback, save_checkpoint, write_text_atomic
from ..sparsity.masks import (
    EntryTracker,
    Mask,
    PathRecorder,
    applied_masks,
    layer_report,
    named_masks,
    unwrap,
)
from ..structure.prune import prune_model
from .batches import evaluate
from .checkpoint import rng_state, set_rng_state
from .loop import Loop

log = logging.getLogger("dessilbi.training")



class Target:
    """Steps a :class:`SparsityTarget` after every optimizer step; checkpointed."""

    state_key = "target"

    def __init__(self, target: SparsityTarget) -> None:
        self.target = target

    def on_after_optimizer_step(self, loop: Loop) -> None:
        self.target.step()

    def state_dict(self) -> dict[str, Any]:
        return self.target.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target.load_state_dict(state)


class FixedMask:
    """Masked retraining: pruned weights get no gradient and stay exactly zero."""

    def __init__(self, pairs: list[tuple[Tensor, Tensor]]) -> None:
        self.pairs = pairs

    def on_before_optimizer_step(self, loop: Loop) -> None:
        for p, m in self.pairs:
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def on_after_optimizer_step(self, loop: Loop) -> None:
        for p, m in self.pairs:  # weight decay or momentum would move them otherwise
            p.mul_(m)


class NonFiniteGuard:
    """Stops on a NaN / Inf loss, checking every ``every`` steps (the only host sync)."""

    def __init__(self, every: int, checkpoint: Path) -> None:
        self.every, self.checkpoint = every, checkpoint

    def on_batch_end(self, loop: Loop) -> None:
        if loop.batch % self.every and loop.batch != loop.n_batches:
            return
        if loop.sums is not None and bool(loop.sums.nonfinite):
            last = (f"the last good checkpoint is {self.checkpoint}"
                    if self.checkpoint.exists() else "no checkpoint was written before it")
            raise NonFiniteLossError(
                f"loss became NaN/Inf in epoch {loop.epoch + 1} before batch {loop.batch}; "
                f"{last} (try a smaller lr)")


class SparseMetrics:
    """Sparse model accuracy, weight / unit density, pruned MACs and parameters, per-layer
    density and the entry epoch of every unit; writes ``masks.pt`` at the end."""

    state_key = "entry"

    def __init__(self, lbi: DessiLBI, penalties: dict[str, str], example: Tensor) -> None:
        self.lbi, self.penalties, self.example = lbi, penalties, example
        self.entry = EntryTracker()

    def on_epoch_metrics(self, loop: Loop, m: dict[str, Any]) -> None:
        model, b = loop.model, loop.built
        masks = named_masks(model, self.lbi)
        with applied_masks(model, masks):
            m["sparse_acc"] = evaluate(model, b.test_set, b.device, amp_dtype=loop.amp_dtype,
                                       workers=loop.cfg.workers)
        report = layer_report(masks, self.penalties)
        m["density"] = report.pop("(all)")["density"]
        m["unit_density"] = unit_density(masks, self.penalties)
        pruned = prune_model(model, Mask(masks, self.penalties), self.example)
        m["macs_ratio"] = pruned.macs_after / max(pruned.macs_before, 1)
        m["params_ratio"] = pruned.params_after / max(pruned.params_before, 1)
        m["layers"] = report
        self.entry.update(m["epoch"], masks, self.penalties)

    def on_fit_end(self, loop: Loop) -> None:
        if loop.dist.main:
            masks = named_masks(loop.model, self.lbi)
            save_checkpoint({"masks": {k: v.cpu() for k, v in masks.items()},
                             "penalties": self.penalties, "entry": dict(self.entry.entry),
                             "history": self.entry.state_dict(), "epoch": loop.cfg.epochs},
                            loop.files.masks)

    def state_dict(self) -> dict[str, Any]:
        return self.entry.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.entry = EntryTracker(state)


class SolutionPath:
    """‖Γ_g‖ and ‖W_g‖ per unit every ``every`` epochs, in ``path.pt`` (rewound on resume)."""

    def __init__(self, lbi: DessiLBI, every: int) -> None:
        self.lbi, self.every, self.recorder = lbi, every, PathRecorder()

    def on_fit_start(self, loop: Loop) -> None:
        path = loop.files.solution_path
        if loop.epoch == 0 or not path.exists():
            return
        rec = PathRecorder(load_checkpoint(path))
        keep = [i for i, e in enumerate(rec.epochs) if e <= loop.epoch]
        rec.epochs = [rec.epochs[i] for i in keep]
        for store in (rec.gamma, rec.weight):
            for k in store:
                store[k] = [store[k][i] for i in keep]
        self.recorder = rec

    def on_epoch_end(self, loop: Loop, m: dict[str, Any]) -> None:
        if self.every and loop.epoch % self.every == 0:
            self.recorder.record(loop.epoch, loop.model, self.lbi)
        if loop.dist.main:
            save_checkpoint(self.recorder.state_dict(), loop.files.solution_path)


class MetricsFile:
    """One JSON line per epoch in ``metrics.jsonl`` (lines past the checkpoint dropped on
    resume) and one log line."""

    def on_fit_start(self, loop: Loop) -> None:
        path = loop.files.metrics
        if loop.dist.main and path.exists():
            keep = [m for m in loop.files.read_metrics() if m.get("epoch", 0) <= loop.epoch]
            write_text_atomic(path, "".join(json.dumps(m) + "\n" for m in keep))

    def on_epoch_end(self, loop: Loop, m: dict[str, Any]) -> None:
        if not loop.dist.main:
            return
        with open(loop.files.metrics, "a") as f:
            f.write(json.dumps(m) + "\n")
            f.flush()
        log.info(metrics_line(m))


def metrics_line(m: dict[str, Any]) -> str:
    s = f"epoch {m['epoch']}: loss {m['train_loss']:.4f}, full {m['full_acc']:.2f}%"
    if "sparse_acc" in m:
        s += (f", sparse {m['sparse_acc']:.2f}%, density {100 * m['density']:.2f}%, units "
              f"{100 * m['unit_density']:.1f}%, MACs {100 * m['macs_ratio']:.1f}%")
    return s + f", {m['epoch_time']:.1f}s"


class TensorBoard:
    """The per-epoch scalars and per-layer densities in ``tb/``."""

    SCALARS = ("train_loss", "train_acc", "lr", "full_acc", "sparse_acc", "density",
               "unit_density", "macs_ratio", "params_ratio", "epoch_time")

    def __init__(self) -> None:
        self.writer: Any = None

    def on_fit_start(self, loop: Loop) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(loop.files.tensorboard))

    def on_epoch_end(self, loop: Loop, m: dict[str, Any]) -> None:
        for k in self.SCALARS:
            if k in m:
                self.writer.add_scalar(k, m[k], m["epoch"])
        for name, row in m.get("layers", {}).items():
            self.writer.add_scalar(f"density/{name}", row["density"], m["epoch"])
        self.writer.flush()

    def on_fit_end(self, loop: Loop) -> None:
        if self.writer is not None:
            self.writer.close()

    on_exception = lambda self, loop, exc: self.on_fit_end(loop)  # noqa: E731


class ProgressBar:
    """A tqdm bar per epoch (the CLI enables it on a terminal only)."""

    def __init__(self, every: int) -> None:
        self.every, self.bar = every, None

    def on_epoch_start(self, loop: Loop) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=None, initial=loop.batch, leave=False, dynamic_ncols=True,
                        desc=f"epoch {loop.epoch + 1}/{loop.cfg.epochs}")

    def on_batch_end(self, loop: Loop) -> None:
        assert self.bar is not None
        self.bar.total = loop.n_batches
        self.bar.update(1)
        if loop.sums is not None and (loop.batch % self.every == 0
                                      or loop.batch == loop.n_batches):
            s = loop.sums
            post = {"loss": f"{float(s.loss) / max(s.seen, 1):.3f}",
                    "acc": f"{100.0 * float(s.correct) / max(s.seen, 1):.1f}"}
            if "density" in loop.metrics:  # the support as of the last epoch
                post["density"] = f"{100 * loop.metrics['density']:.2f}%"
            self.bar.set_postfix(post)

    def on_epoch_end(self, loop: Loop, m: dict[str, Any]) -> None:
        self.close()

    def close(self, *_: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_exception = close


class Checkpointer:
    """``checkpoint.pt`` after every epoch and on Ctrl-C mid-epoch (never after a NaN loss):
    model, optimizer, scheduler, scaler, RNG states, position, and every stateful callback."""

    def __init__(self, callbacks: list[Any]) -> None:
        self.stateful = [cb for cb in callbacks if hasattr(cb, "state_key")]

    def on_epoch_end(self, loop: Loop, m: dict[str, Any]) -> None:
        self.save(loop)

    def on_exception(self, loop: Loop, exc: BaseException) -> None:
        if not isinstance(exc, KeyboardInterrupt):
            return
        if loop.sums is not None and bool(loop.sums.nonfinite):
            return
        loop.fold()
        self.save(loop)
        log.warning("interrupted: saved %s at epoch %d, batch %d; continue with --resume",
                    loop.files.checkpoint, loop.epoch, loop.batch)

    def save(self, loop: Loop) -> None:
        if not loop.dist.main:
            return
        b = loop.built
        save_checkpoint({
            "format": "dessilbi-checkpoint-v1", "config": loop.cfg.to_dict(),
            "epoch": loop.epoch, "batch": loop.batch, "model": unwrap(loop.model).state_dict(),
            "optimizer": b.optimizer.state_dict(), "scheduler": b.scheduler.state_dict(),
            "scaler": loop.scaler.state_dict() if loop.scaler.is_enabled() else None,
            "rng": rng_state(), "accum": loop.accum,
            **{cb.state_key: cb.state_dict() for cb in self.stateful},
        }, loop.files.checkpoint)

    def restore(self, loop: Loop) -> bool:
        """Load the checkpoint into ``loop`` and the stateful callbacks; False when none."""
        ck = self.load(loop)
        if ck is None:
            return False
        self.apply(loop, ck)
        return True

    def load(self, loop: Loop) -> dict[str, Any] | None:
        """The run's checkpoint (``.prev`` when ``checkpoint.pt`` is missing or unreadable), or
        None when it has none."""
        path = loop.files.checkpoint
        if not path.exists() and not path.with_name(path.name + ".prev").exists():
            return None
        ck, source = load_with_fallback(path, map_location=loop.built.device)
        if source != path:
            log.warning("%s is missing or unreadable: resuming from %s", path, source)
        return ck

    def apply(self, loop: Loop, ck: dict[str, Any]) -> None:
        """Put a loaded checkpoint into ``loop`` and the stateful callbacks."""
        b = loop.built
        unwrap(loop.model).load_state_dict(ck["model"])
        b.optimizer.load_state_dict(ck["optimizer"])
        b.scheduler.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            loop.scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"])
        loop.epoch, loop.batch = int(ck["epoch"]), int(ck["batch"])
        loop.accum = dict(ck.get("accum", loop.accum))
        for cb in self.stateful:
            if ck.get(cb.state_key) is not None:
                cb.load_state_dict(ck[cb.state_key])


def wrap_distributed(model: nn.Module, device: torch.device) -> nn.Module:
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
