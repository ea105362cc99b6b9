"""The training loop, a screen long; every side effect is a callback (:mod:`.callbacks`).

Callbacks are duck-typed: ``call`` runs a hook on every callback that has it, in order. Hooks:
``on_fit_start``, ``on_epoch_start``, ``on_before_optimizer_step``, ``on_after_optimizer_step``,
``on_batch_end``, ``on_epoch_metrics`` (add measurements), ``on_epoch_end`` (record them),
``on_fit_end`` and ``on_exception``. A callback with ``state_key`` and
``state_dict`` / ``load_state_dict`` is saved in, and restored from, the checkpoint.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import batches as feed
from .build import Built, Dist
from .config import TrainConfig
from .rundir import RunDir

__all__ = ["Loop", "Sums", "call", "fit"]


def call(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    """Run ``hook(*args)`` on every callback that defines it."""
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


@dataclass
class Sums:
    """Running sums of the current stretch of batches, on the device (no host sync a step)."""

    loss: Tensor
    correct: Tensor
    nonfinite: Tensor
    seen: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> Sums:
        return cls(torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device),
                   torch.zeros((), dtype=torch.bool, device=device))

    def add(self, loss: Tensor, out: Tensor, y: Tensor) -> None:
        ld = loss.detach()
        self.nonfinite |= ~torch.isfinite(ld)
        self.loss += ld * y.numel()
        self.correct += (out.detach().argmax(1) == y).sum()
        self.seen += y.numel()


@dataclass
class Loop:
    """Where training stands: ``epoch`` epochs and ``batch`` batches of the next one are done;
    ``accum`` holds the train loss / accuracy sums of those batches (``sums`` the unfolded ones)."""

    cfg: TrainConfig
    built: Built
    model: nn.Module
    scaler: Any
    amp_dtype: torch.dtype | None
    dist: Dist
    run_dir: Path
    epoch: int = 0
    batch: int = 0
    n_batches: int = 0
    accum: dict[str, Any] = field(default_factory=lambda: {"loss": 0.0, "correct": 0, "seen": 0})
    sums: Sums | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    stop_signal: int | None = None  # SIGINT / SIGTERM received; honoured at a step boundary

    @property
    def files(self) -> RunDir:
        """The run folder's files."""
        return RunDir(self.run_dir)

    def fold(self) -> None:
        """Move the device sums into ``accum`` (one host sync)."""
        if self.sums is not None:
            s = self.sums
            self.accum = {"loss": self.accum["loss"] + float(s.loss),
                          "correct": self.accum["correct"] + int(s.correct),
                          "seen": self.accum["seen"] + s.seen}
            self.sums = Sums.zeros(s.loss.device)


def fit(loop: Loop, callbacks: Sequence[Any], until: int | None = None) -> None:
    """Train from ``loop.epoch`` / ``loop.batch`` to epoch ``until`` (default ``cfg.epochs``)."""
    end = loop.cfg.epochs if until is None else until
    call(callbacks, "on_fit_start", loop)
    try:
        with _signals_at_step_boundary(loop):
            _epochs(loop, callbacks, end)
    except BaseException as exc:
        call(callbacks, "on_exception", loop, exc)
        raise
    call(callbacks, "on_fit_end", loop)


def _epochs(loop: Loop, callbacks: Sequence[Any], end: int) -> None:
    while loop.epoch < end:
        t0 = time.perf_counter()
        call(callbacks, "on_epoch_start", loop)
        train_epoch(loop, callbacks)
        lr = loop.built.optimizer.param_groups[0]["lr"]
        loop.built.scheduler.step()
        metrics = epoch_metrics(loop, lr)
        call(callbacks, "on_epoch_metrics", loop, metrics)
        metrics["epoch_time"] = time.perf_counter() - t0
        loop.epoch, loop.batch, loop.metrics = loop.epoch + 1, 0, metrics
        loop.accum = {"loss": 0.0, "correct": 0, "seen": 0}
        call(callbacks, "on_epoch_end", loop, metrics)
        _stop_if_asked(loop)


@contextmanager
def _signals_at_step_boundary(loop: Loop) -> Iterator[None]:
    """SIGINT / SIGTERM stop the run at the next step boundary (the step in flight completes and
    is counted, so the checkpoint written on the way out is consistent); a second one stops at
    once. Only the main thread can install handlers; elsewhere signals act as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if loop.stop_signal is not None:
            raise KeyboardInterrupt
        loop.stop_signal = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _stop_if_asked(loop: Loop) -> None:
    if loop.stop_signal is not None:
        raise KeyboardInterrupt(f"signal {loop.stop_signal}")


def train_epoch(loop: Loop, callbacks: Sequence[Any]) -> None:
    """The remaining batches of epoch ``loop.epoch``: forward, backward, step."""
    cfg, b, d = loop.cfg, loop.built, loop.dist
    per_rank = max(cfg.batch_size // d.world, 1)
    idx = feed.epoch_indices(len(b.train_set), cfg.seed, loop.epoch, True, d.rank, d.world)  # type: ignore[arg-type]
    loop.n_batches = math.ceil(len(idx) / per_rank)
    if cfg.max_train_batches:
        loop.n_batches = min(loop.n_batches, cfg.max_train_batches)
        idx = idx[: loop.n_batches * per_rank]
    if loop.batch == 0:
        loop.accum = {"loss": 0.0, "correct": 0, "seen": 0}
    loop.sums = Sums.zeros(b.device)
    loop.model.train()
    for x, y in feed.batches(b.train_set, idx[loop.batch * per_rank:], per_rank, cfg.workers,
                             b.device.type == "cuda"):
        x, y = x.to(b.device, non_blocking=True), y.to(b.device, non_blocking=True)
        if cfg.channels_last:
            x = x.to(memory_format=torch.channels_last)
        with torch.autocast(b.device.type, dtype=loop.amp_dtype,
                            enabled=loop.amp_dtype is not None):
            out = loop.model(x)
            loss = nn.functional.cross_entropy(out, y)
        b.optimizer.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        call(callbacks, "on_before_optimizer_step", loop)
        loop.scaler.step(b.optimizer)
        loop.scaler.update()
        call(callbacks, "on_after_optimizer_step", loop)
        loop.sums.add(loss, out, y)
        loop.batch += 1
        call(callbacks, "on_batch_end", loop)
        _stop_if_asked(loop)
    loop.fold()


def epoch_metrics(loop: Loop, lr: float) -> dict[str, Any]:
    """Train loss / accuracy of the epoch and the Full model's test accuracy."""
    a, b = loop.accum, loop.built
    return {"epoch": loop.epoch + 1, "train_loss": a["loss"] / max(a["seen"], 1),
            "train_acc": 100.0 * a["correct"] / max(a["seen"], 1), "lr": lr, "epoch_time": 0.0,
            "full_acc": feed.evaluate(loop.model, b.test_set, b.device, amp_dtype=loop.amp_dtype,
                                      workers=loop.cfg.workers)}
