"""The training engine: (model, optimizer, data, schedule) → a run folder that is never lost.

After every epoch it measures the test accuracy of the Full model (W) and of the Sparse model
(W ⊙ 1[Γ ≠ 0], restored exactly afterwards), the train loss, lr, overall and per-layer density and
the epoch at which each filter / weight first entered the support, and writes them into the run
folder (``runs/<name>/``: the files are listed in :mod:`.rundir`).

``train`` builds the run, assembles the callbacks (:mod:`.callbacks`) and runs the loop
(:mod:`.loop`). ``--resume`` continues bit-for-bit on CPU: model, optimizer (V, momentum),
scheduler, RNG states, data order (a per-epoch permutation derived from the seed) and every
stateful callback are restored, mid-epoch too after Ctrl-C. A NaN / Inf loss raises
:class:`NonFiniteLossError` and leaves the last good checkpoint.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from filelock import FileLock, Timeout

from ..core.optim import DessiLBI
from ..errors import NonFiniteLossError, RunExistsError, RunLockedError
from ..files import save_checkpoint, write_text_atomic
from ..sparsity.masks import named_penalties, unwrap
from . import callbacks as cb
from .build import Built, Dist, build, fixed_mask
from .config import TrainConfig
from .loop import Loop, fit
from .rundir import RunDir

log = logging.getLogger("dessilbi.training")

__all__ = ["NonFiniteLossError", "RunExistsError", "RunLockedError", "default_callbacks",
           "run_lock", "finished_summary", "train"]
DDP_TIMEOUT_MINUTES = 10  # a collective waiting longer means a rank has stopped


def finished_summary(run_dir: Path, epochs: int) -> dict[str, Any] | None:
    """The summary of a run that has trained ``epochs`` epochs (or more), or None: absent,
    partial, unreadable, or shorter (resuming it with more epochs extends it)."""
    summary = RunDir(run_dir).read_summary()
    if summary is None or not summary.get("final"):
        return None
    done = summary["final"].get("epoch", summary.get("config", {}).get("epochs", 0))
    return summary if isinstance(done, int) and done >= epochs else None


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train ``cfg``; returns the run summary (also in ``summary.json``)."""
    d = Dist.from_env()
    if d.world > 1 and not dist.is_initialized():
        # a rank that stops (crash, Ctrl-C) makes the others fail after the timeout instead of
        # blocking in a collective forever
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(minutes=DDP_TIMEOUT_MINUTES))
    cfg, dataset_note = cfg.validate().resolved()
    run_dir = cfg.run_dir()
    if resume and (done := finished_summary(run_dir, cfg.epochs)) is not None:
        return done  # a finished run is read back, never rewritten
    if not d.main:
        return _train(cfg, d, run_dir, resume, overwrite)
    if dataset_note:
        log.info(dataset_note)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        return _train(cfg, d, run_dir, resume, overwrite)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock: one trainer per folder (a second would interleave metrics
    and checkpoints); another process holding it is a :class:`RunLockedError`."""
    path = RunDir(run_dir).lock
    lock = FileLock(path, blocking=False)
    try:
        lock.acquire()
    except Timeout as e:
        raise RunLockedError(f"run {run_dir} is being trained by another process (lock "
                             f"{path}); wait for it or choose another --name") from e
    try:
        yield
    finally:
        lock.release()


def _train(cfg: TrainConfig, d: Dist, run_dir: Path, resume: bool,
           overwrite: bool) -> dict[str, Any]:
    b = build(cfg, d)
    nu = path_nu(b)  # before any step: SparsityTarget releases ν to ∞ at selection
    if d.main:
        _prepare_run_dir(cfg, b, run_dir, resume, overwrite)
    if nu is not None and cfg.nu is None and d.main:
        log.info("ν = %.4g, from the run's %d steps (nu_for_steps: α κ T / 20)", nu,
                 b.total_steps)
    loop = Loop(cfg, b, b.model, grad_scaler(cfg, b), amp_dtype(cfg, b), d, run_dir)
    callbacks = default_callbacks(loop)
    checkpointer = next(c for c in callbacks if isinstance(c, cb.Checkpointer))
    if resume and checkpointer.restore(loop):
        log.info("resumed %s at epoch %d, batch %d", run_dir, loop.epoch, loop.batch)
    elif resume and d.main:
        log.info("no checkpoint in %s: starting from scratch", run_dir)
    if d.world > 1:
        loop.model = cb.wrap_distributed(loop.model, b.device)
    fit(loop, callbacks)
    # nothing left to train (a crash after the last checkpoint, before summary.json): the
    # final record is the run's last line of metrics
    last = loop.metrics or next(iter(loop.files.read_metrics()[-1:]), {})
    summary = {**_summary(cfg, b, last, run_dir), "nu": nu}
    if d.main:
        write_text_atomic(loop.files.summary, json.dumps(summary, indent=2))
    return summary


def default_callbacks(loop: Loop) -> list[Any]:
    """The side effects of a ``dessilbi train`` run, in the order they run."""
    cfg, b, main = loop.cfg, loop.built, loop.dist.main
    lbi = b.optimizer if isinstance(b.optimizer, DessiLBI) else None
    out: list[Any] = []
    if b.target is not None:
        out.append(cb.Target(b.target))
    if cfg.mask:
        out.append(cb.FixedMask(fixed_mask(cfg, b.model)))
    out.append(cb.NonFiniteGuard(cfg.log_every, loop.files.checkpoint))
    if cfg.progress and main and sys.stderr.isatty():
        out.append(cb.ProgressBar(cfg.log_every))
    if lbi is not None:
        out.append(cb.SparseMetrics(lbi, named_penalties(b.model, lbi), b.example))
        out.append(cb.SolutionPath(lbi, cfg.path_every))
    out.append(cb.MetricsFile())
    if cfg.tensorboard and main:
        out.append(cb.TensorBoard())
    out.append(cb.Checkpointer(out))
    return out


def _prepare_run_dir(cfg: TrainConfig, b: Built, run_dir: Path, resume: bool,
                     overwrite: bool) -> None:
    """Refuse to clobber a run, clear it for ``overwrite``, write the config and init weights."""
    files = RunDir(run_dir)
    if files.summary.exists() and not resume and not overwrite:
        raise RunExistsError(f"run {run_dir} already finished; pass --resume to reuse it or "
                             "--overwrite to train it again")
    if files.checkpoint.exists() and not resume and not overwrite:
        raise RunExistsError(f"run {run_dir} has a checkpoint; pass --resume to continue it or "
                             "--overwrite to start again")
    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:
        for path in files.results():
            path.unlink(missing_ok=True)
    import yaml

    write_text_atomic(files.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if not files.init.exists():
        save_checkpoint({"model": unwrap(b.model).state_dict()}, files.init)


def amp_dtype(cfg: TrainConfig, b: Built) -> torch.dtype | None:
    if cfg.amp == "bf16":
        return torch.bfloat16
    if cfg.amp == "fp16" and b.device.type == "cuda":
        return torch.float16
    if cfg.amp == "fp16":
        log.warning("fp16 AMP needs CUDA; training in fp32")
    return None


def grad_scaler(cfg: TrainConfig, b: Built) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(b.device.type,
                                enabled=cfg.amp == "fp16" and b.device.type == "cuda")


def path_nu(b: Built) -> float | None:
    """The ν the path starts with (largest over the penalised groups); None without DessiLBI."""
    if not isinstance(b.optimizer, DessiLBI):
        return None
    nus = [g["nu"] for g in b.optimizer.param_groups if g.get("penalty", "auto") != "none"]
    return float(max(nus)) if nus else None


def _summary(cfg: TrainConfig, b: Built, last: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    return {
        "run": str(run_dir),
        "config": cfg.to_dict(),
        "dataset": cfg.dataset,
        "dataset_source": b.info.source,
        "epochs": cfg.epochs,
        "final": last,
        "torch": torch.__version__,
        "device": str(b.device),
    }
