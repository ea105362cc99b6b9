"""The sparse structure found by DessiLBI: masks, per-layer density, entry order, solution path.

A *mask* maps parameter names (as in ``model.named_parameters()``) to boolean tensors of the
parameter's shape. The sparse model is ``W ⊙ mask``; for group-penalised (conv) weights the masks
keep or drop whole output filters.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .optim import DessiLBI

__all__ = [
    "named_masks",
    "applied_masks",
    "layer_report",
    "EntryTracker",
    "PathRecorder",
    "unwrap",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in unwrap(model).named_parameters()}


def named_masks(model: nn.Module, opt: DessiLBI) -> dict[str, Tensor]:
    """{parameter name: support of Γ} for every penalised parameter of ``model``."""
    names = _names(model)
    return {names[id(p)]: m for p, m in opt.masks().items() if id(p) in names}


def named_penalties(model: nn.Module, opt: DessiLBI) -> dict[str, str]:
    names = _names(model)
    return {names[id(p)]: opt.penalty_of(p) for p in opt.penalised_params() if id(p) in names}


@contextmanager
def applied_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Temporarily set ``W ← W ⊙ mask``; the original weights are restored exactly on exit."""
    params = dict(unwrap(model).named_parameters())
    unknown = set(masks) - set(params)
    if unknown:
        raise KeyError(f"masks name parameters the model does not have: {sorted(unknown)[:5]}")
    saved = {n: params[n].detach().clone() for n in masks}
    try:
        with torch.no_grad():
            for n, m in masks.items():
                params[n].mul_(m.to(params[n].device, params[n].dtype))
        yield model
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)


def _units(mask: Tensor, penalty: str) -> Tensor:
    """Per filter / neuron (group) or per weight (lasso) view of a mask, as a flat bool tensor."""
    if penalty == "group" and mask.ndim >= 2:
        return mask.reshape(mask.shape[0], -1).any(dim=1)
    return mask.reshape(-1)


def layer_report(masks: Mapping[str, Tensor],
                 penalties: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per-layer weights, non-zeros, density (= |supp Γ| / |W|) and, for filters, filters kept.

    An ``"(all)"`` entry sums every layer.
    """
    report: dict[str, dict[str, Any]] = {}
    total = nonzero = 0
    for name, m in masks.items():
        n, k = m.numel(), int(m.sum())
        total, nonzero = total + n, nonzero + k
        row: dict[str, Any] = {"weights": n, "nonzero": k, "density": k / n if n else 0.0}
        if penalties and penalties.get(name) == "group" and m.ndim >= 2:
            units = _units(m, "group")
            row["filters"] = units.numel()
            row["filters_kept"] = int(units.sum())
        report[name] = row
    report["(all)"] = {"weights": total, "nonzero": nonzero,
                       "density": nonzero / total if total else 0.0}
    return report


class EntryTracker:
    """The first epoch at which each filter (group) or weight (lasso) entered supp(Γ); −1: never."""

    def __init__(self, state: dict[str, Tensor] | None = None) -> None:
        self.entry: dict[str, Tensor] = dict(state or {})

    def update(self, epoch: int, masks: Mapping[str, Tensor], penalties: Mapping[str, str]) -> None:
        for name, m in masks.items():
            units = _units(m, penalties.get(name, "lasso")).cpu()
            cur = self.entry.get(name)
            if cur is None or cur.shape != units.shape:
                cur = torch.full(units.shape, -1, dtype=torch.int32)
            cur[(cur < 0) & units] = epoch
            self.entry[name] = cur

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.entry)


def _row_norms(t: Tensor) -> Tensor:
    """‖t_g‖ per output filter / neuron (per entry for vectors), as float32 on the CPU."""
    rows = t.reshape(t.shape[0], -1) if t.ndim >= 2 else t.reshape(-1, 1)
    return rows.norm(dim=1).float().cpu()


class PathRecorder:
    """‖Γ_g‖ and ‖W_g‖ per filter / output neuron, recorded over training (the solution path)."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        state = state or {}
        self.epochs: list[int] = list(state.get("epochs", []))
        self.gamma: dict[str, list[Tensor]] = {k: list(v)
                                               for k, v in state.get("gamma", {}).items()}
        self.weight: dict[str, list[Tensor]] = {k: list(v)
                                                for k, v in state.get("weight", {}).items()}

    @torch.no_grad()
    def record(self, epoch: int, model: nn.Module, opt: DessiLBI) -> None:
        names = _names(model)
        self.epochs.append(epoch)
        for p in opt.penalised_params():
            name = names.get(id(p))
            if name is None:
                continue
            g = opt.gamma(p)
            self.gamma.setdefault(name, []).append(_row_norms(g))
            self.weight.setdefault(name, []).append(_row_norms(p.detach()))

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": list(self.epochs), "gamma": {k: list(v) for k, v in self.gamma.items()},
                "weight": {k: list(v) for k, v in self.weight.items()}}
