"""Read a run folder written by the engine: configuration, metrics, checkpoint, masks, path.

Everything here only reads; nothing retrains.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..files import CheckpointError, load_checkpoint, load_with_fallback
from ..sparsity.masks import Mask, mask_at
from .config import TrainConfig
from .rundir import RunDir

log = logging.getLogger(__name__)

def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run folder (:meth:`RunDir.read_metrics`)."""
    return RunDir(run_dir).read_metrics()


__all__ = ["Run", "open_run", "pareto_front", "choose_epoch"]


@dataclass
class Run:
    """A finished or interrupted training run on disk."""

    dir: Path
    checkpoint_path: Path
    cfg: TrainConfig
    metrics: list[dict[str, Any]] = field(default_factory=list)
    loaded: dict[str, Any] | None = field(default=None, repr=False)  # what open_run read

    @property
    def files(self) -> RunDir:
        """The run folder's files."""
        return RunDir(self.dir)

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint's contents (read once: open_run has already loaded it)."""
        if self.loaded is None:
            self.loaded = load_checkpoint(self.checkpoint_path)
        return self.loaded

    def build(self, device: str | None = None, data_dir: str | None = None) -> Any:
        """Data, model and optimizer of the run with the checkpoint's state loaded.

        The data is read from ``data_dir`` when given, else from the folder stored in the run's
        configuration, which is logged: a run folder from elsewhere names a folder of its own.
        """
        from .build import build

        cfg = self.cfg
        if device:
            cfg = cfg.replace(device=device)
        if data_dir:
            cfg = cfg.replace(data_dir=data_dir)
        else:
            log.info("reading %s from %s, the run's stored data folder (--data-dir to change)",
                     cfg.dataset, cfg.data_dir)
        b = build(cfg)
        ck = self.checkpoint()
        b.model.load_state_dict(ck["model"])
        # torch's load_state_dict keeps the given state tensors (same device and dtype): a copy,
        # so that stepping the built optimizer never changes the checkpoint read once here
        b.optimizer.load_state_dict(copy.deepcopy(ck["optimizer"]))
        return b

    def support_file(self) -> dict[str, Any]:
        path = self.files.masks
        if not path.exists():
            raise CheckpointError(f"{path} not found: the run has no Γ support (not a finished "
                                  "DessiLBI run?)")
        return load_checkpoint(path)

    def mask(self, epoch: int | None = None) -> Mask:
        """The Γ-support mask at the end of ``epoch`` (default: the last epoch)."""
        sf = self.support_file()
        if epoch is None:
            return Mask(sf["masks"], sf["penalties"])
        last = int(sf.get("epoch", self.cfg.epochs))
        if not 0 <= epoch <= last:
            raise ValueError(f"invalid epoch={epoch}: the run has epochs 1..{last}")
        shapes = {n: m.shape for n, m in sf["masks"].items()}
        history = sf.get("history")
        if history is None:  # older runs: first entries only, so assume no unit ever left
            history = {"entry": sf["entry"], "flips": {
                n: [(int(ep), torch.nonzero(e == ep).flatten().to(torch.int32))
                    for ep in sorted(set(e[e >= 0].tolist()))] for n, e in sf["entry"].items()}}
        return mask_at(history, epoch, shapes, sf["penalties"])


def open_run(path: str | Path) -> Run:
    """Open a run folder (or the checkpoint file inside one)."""
    path = Path(path)
    ck_path = RunDir(path).checkpoint if path.is_dir() else path
    run_dir = ck_path.parent
    prev = ck_path.with_name(ck_path.name + ".prev")
    if not ck_path.is_file() and not (path.is_dir() and prev.is_file()):
        raise CheckpointError(f"{ck_path} not found: expected a run folder or a checkpoint.pt")
    if path.is_dir():  # a run folder: its previous checkpoint stands in for a damaged one
        ck, used = load_with_fallback(ck_path)
        if used != ck_path:
            log.warning("%s is missing or unreadable; using %s (epoch %s)", ck_path, used,
                        ck.get("epoch"))
            ck_path = used
    else:
        ck = load_checkpoint(ck_path)
    if "config" not in ck or "model" not in ck:
        raise CheckpointError(f"{ck_path} is not a dessilbi training checkpoint")
    cfg = TrainConfig.from_stored(ck["config"], source=str(ck_path))
    return Run(run_dir, ck_path, cfg, read_metrics(run_dir), ck)


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Epochs not dominated in (lower density, higher Sparse accuracy), sorted by density."""
    pts = [p for p in points if "density" in p and "sparse_acc" in p]
    front = [p for p in pts if not any(
        (q["density"] <= p["density"] and q["sparse_acc"] >= p["sparse_acc"])
        and (q["density"] < p["density"] or q["sparse_acc"] > p["sparse_acc"]) for q in pts)]
    return sorted(front, key=lambda p: (p["density"], -p["sparse_acc"]))


def choose_epoch(points: list[dict[str, Any]], max_drop: float | None = None,
                 max_density: float | None = None) -> dict[str, Any] | None:
    """The sparsest epoch whose Sparse accuracy is within ``max_drop`` points of the best Full
    accuracy, or the most accurate epoch with density ≤ ``max_density``."""
    pts = [p for p in points if "density" in p and "sparse_acc" in p]
    if not pts:
        return None
    if max_drop is not None:
        best_full = max(p["full_acc"] for p in pts)
        ok = [p for p in pts if p["sparse_acc"] >= best_full - max_drop]
        return min(ok, key=lambda p: (p["density"], -p["sparse_acc"])) if ok else None
    if max_density is not None:
        ok = [p for p in pts if p["density"] <= max_density]
        return max(ok, key=lambda p: (p["sparse_acc"], -p["density"])) if ok else None
    return max(pts, key=lambda p: p["sparse_acc"])
