"""Lottery tickets from a DessiLBI run: retrain supp(Γ) at some epoch from the initialisation,
beside a random mask of the same per-layer density, iterative magnitude pruning (IMP, Frankle &
Carbin, rewinding to the initialisation) and the dense network.

Every experiment on a finished run is a *branch*: a folder under the run whose name carries every
option of the experiment (ticket epoch, retraining optimizer, lr, epochs, seed, IMP rounds) and a
hash of the retraining configuration, so two experiments with different settings never share
results, and the same experiment run twice reuses them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..files import load_checkpoint, write_text_atomic
from ..sparsity.masks import Mask
from ..training.config import TrainConfig
from ..training.rundir import RunDir
from ..training.runs import read_metrics

__all__ = ["LotteryResult", "best_and_final", "branch_dir", "imp", "lottery", "retrain",
           "ticket_config"]

LOTTERY_FILE = "lottery.json"


def ticket_config(source: TrainConfig, source_dir: Path, **changes: Any) -> TrainConfig:
    """The retraining configuration: the source run's, rewound to its ``init.pt``, with
    ``changes`` (optimizer, lr, epochs, schedule, seed, …; ``None`` values keep the source's)."""
    d = source.to_dict()
    d.update(init_from=str(RunDir(source_dir).init), mask="", name="", fused=False,
             target_density=None, target_macs=None)
    d.update({k: v for k, v in changes.items() if v is not None})
    return TrainConfig.from_dict(d)


def branch_dir(parent: Path, kind: str, base: TrainConfig, **options: Any) -> Path:
    """``parent/kind/<options>_<hash>``: the folder of one experiment on a run."""
    readable = "_".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}"
                        for k, v in options.items())
    ident = json.dumps({"base": base.config_hash(), **options}, sort_keys=True)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:8]
    name = f"{readable}_{base.optimizer}_lr{base.lr:g}_e{base.epochs}_s{base.seed}_{digest}"
    return parent / kind / name


def retrain(base: TrainConfig, name: str, mask: Mask | None, folder: Path) -> dict[str, Any]:
    """Train ``base`` with the weights outside ``mask`` held at zero, in ``folder/name``;
    a finished retrain is read back instead of trained again."""
    from ..training.engine import train

    cfg = base.replace(name=name, runs_dir=str(folder))
    if mask is not None:
        path = folder / f"{name}.mask.pt"
        if not path.exists():
            mask.save(path)
        cfg = cfg.replace(mask=str(path))
    return train(cfg, resume=True)  # a finished retrain is read back


def imp(base: TrainConfig, names: list[str], target: float, rounds: int, folder: Path,
        prefix: str = "imp") -> tuple[Mask, dict[str, Any]]:
    """Iterative magnitude pruning: ``rounds`` retrains, each keeping ``target^(1/rounds)`` of
    the surviving weights of every tensor in ``names`` (largest magnitudes), rewound to init."""
    keep = target ** (1.0 / rounds)
    state = load_checkpoint(base.init_from)
    state = state.get("model", state)
    shapes = {n: state[n].shape for n in names}
    current = Mask({n: torch.ones(shapes[n], dtype=torch.bool) for n in names})
    summary = retrain(base, f"{prefix}_r0", None, folder)
    for r in range(1, rounds + 1):
        trained = load_checkpoint(RunDir(Path(summary["run"])).checkpoint)["model"]
        current = Mask({n: _keep_largest(trained[n], current.masks[n], keep) for n in names})
        summary = retrain(base, f"{prefix}_r{r}", current, folder)
    return current, summary


def _keep_largest(weight: torch.Tensor, mask: torch.Tensor, keep: float) -> torch.Tensor:
    w = weight.abs().float().flatten()
    m = mask.flatten()
    k = max(1, int(round(keep * int(m.sum()))))
    scores = torch.where(m, w, torch.full_like(w, -1.0))
    kept = torch.zeros_like(m)
    kept[torch.argsort(scores, descending=True, stable=True)[:k]] = True
    return kept.reshape(weight.shape)


def best_and_final(summary: dict[str, Any]) -> tuple[float, float]:
    """Best and last Full accuracy of a finished run."""
    metrics = read_metrics(Path(summary["run"]))
    return max(m["full_acc"] for m in metrics), metrics[-1]["full_acc"]


@dataclass(frozen=True)
class LotteryResult:
    folder: Path
    records: list[dict[str, Any]]


def lottery(source_dir: Path, ticket: Mask, epoch: int, base: TrainConfig, seed: int = 0,
            imp_rounds: int = 0) -> LotteryResult:
    """Retrain the Γ ticket of ``epoch``, a random mask of the same per-layer density (``seed``),
    IMP (``imp_rounds`` > 0) and the dense network from ``base``; results in a branch folder."""
    folder = branch_dir(source_dir, "tickets", base, epoch=epoch, mask_seed=seed,
                        imp=imp_rounds)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for method, mask in (("gamma", ticket), ("random", Mask.random_like(ticket, seed=seed))):
        records.append(_record(method, mask.density(), retrain(base, method, mask, folder)))
    if imp_rounds:
        mask, s = imp(base, list(ticket.masks), ticket.density(), imp_rounds, folder)
        records.append({**_record("imp", mask.density(), s), "rounds": imp_rounds})
    records.append(_record("dense", 1.0, retrain(base, "dense", None, folder)))
    # atomic: a reproduction takes the file's presence for a finished branch
    write_text_atomic(folder / LOTTERY_FILE, json.dumps(
        {"epoch": epoch, "source": str(source_dir), "seed": seed, "imp_rounds": imp_rounds,
         "retrain": base.to_dict(), "records": records}, indent=2))
    return LotteryResult(folder, records)


def _record(method: str, density: float, summary: dict[str, Any]) -> dict[str, Any]:
    best, final = best_and_final(summary)
    return {"method": method, "density": density, "best_acc": best, "final_acc": final,
            "run": summary["run"]}
