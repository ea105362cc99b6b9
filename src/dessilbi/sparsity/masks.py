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

from ..core.optim import DessiLBI, unwrap_optimizer
from ..core.penalties import PENALTIES, get_penalty
from ..core.units import unit_mask

__all__ = [
    "Mask",
    "format_report",
    "named_masks",
    "named_penalties",
    "applied_masks",
    "layer_report",
    "EntryTracker",
    "mask_at",
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
    names, opt = _names(model), unwrap_optimizer(opt)
    return {names[id(p)]: m for p, m in opt.masks().items() if id(p) in names}


def named_penalties(model: nn.Module, opt: DessiLBI) -> dict[str, str]:
    names, opt = _names(model), unwrap_optimizer(opt)
    return {names[id(p)]: opt.penalty_of(p) for p in opt.penalised_params() if id(p) in names}


@contextmanager
def applied_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Temporarily set ``W ← W ⊙ mask``; the original weights are restored exactly on exit."""
    params = dict(unwrap(model).named_parameters())
    _check_fits(masks, params)
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
        units = unit_mask(m, penalties.get(name, "lasso")) if penalties else m.reshape(-1)
        if units.numel() != m.numel():  # units coarser than weights: filters / neurons
            row["filters"] = units.numel()
            row["filters_kept"] = int(units.sum())
        report[name] = row
    report["(all)"] = {"weights": total, "nonzero": nonzero,
                       "density": nonzero / total if total else 0.0}
    return report


class EntryTracker:
    """When each filter (group) or weight (lasso) was in supp(Γ), epoch by epoch.

    ``entry[name]``: the first epoch a unit entered the support (−1: never). The support of every
    recorded epoch is kept as the list of units that flipped (entered or left) at that epoch, so
    :meth:`units_at` rebuilds the mask of any epoch at the cost of the changes only.
    """

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        state = dict(state or {})
        if state and "entry" not in state:  # an older, entry-only state
            state = {"entry": state}
        self.entry: dict[str, Tensor] = dict(state.get("entry", {}))
        self.current: dict[str, Tensor] = dict(state.get("current", {}))
        self.flips: dict[str, list[tuple[int, Tensor]]] = {
            k: [(int(e), i) for e, i in v] for k, v in state.get("flips", {}).items()}

    def update(self, epoch: int, masks: Mapping[str, Tensor], penalties: Mapping[str, str]) -> None:
        for name, m in masks.items():
            units = unit_mask(m, penalties.get(name, "lasso")).cpu()
            cur = self.entry.get(name)
            if cur is None or cur.shape != units.shape:
                cur = torch.full(units.shape, -1, dtype=torch.int32)
                self.current[name] = torch.zeros(units.shape, dtype=torch.bool)
                self.flips[name] = []
            cur[(cur < 0) & units] = epoch
            self.entry[name] = cur
            changed = torch.nonzero(units != self.current[name]).flatten()
            if changed.numel():
                self.flips[name].append((epoch, changed.to(torch.int32)))
            self.current[name] = units.clone()

    def units_at(self, epoch: int) -> dict[str, Tensor]:
        """The support of every layer at the end of ``epoch``, as flat unit masks."""
        out = {}
        for name, cur in self.entry.items():
            units = torch.zeros(cur.shape, dtype=torch.bool)
            for e, idx in self.flips.get(name, []):
                if e > epoch:
                    break
                units[idx.long()] ^= True
            out[name] = units
        return out

    def epochs(self) -> list[int]:
        return sorted({e for v in self.flips.values() for e, _ in v})

    def state_dict(self) -> dict[str, Any]:
        return {"entry": dict(self.entry), "current": dict(self.current),
                "flips": {k: list(v) for k, v in self.flips.items()}}


def mask_at(entry_state: dict[str, Any], epoch: int, shapes: Mapping[str, torch.Size],
            penalties: Mapping[str, str]) -> Mask:
    """The Γ-support :class:`Mask` of ``epoch`` from a saved :class:`EntryTracker` state."""
    units = EntryTracker(entry_state).units_at(epoch)
    return Mask({n: get_penalty(penalties.get(n, "lasso")).expand(u, shapes[n])
                 for n, u in units.items()}, penalties)


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


# ----------------------------------------------------------------------------- Mask
class Mask:
    """A validated mapping ``{parameter name: bool tensor}`` with the unit kind of each entry.

    ``penalties[name]`` is ``"group"`` (whole output filters / neurons are kept or dropped) or
    ``"lasso"`` (single weights). Build one from the Γ support (:meth:`from_optimizer`), from the
    entry order at a target density (:meth:`from_entry_order`), from weight magnitudes
    (:meth:`from_magnitude`) or at random with the same per-layer density (:meth:`random_like`).
    """

    def __init__(self, masks: Mapping[str, Tensor], penalties: Mapping[str, str] | None = None):
        self.masks: dict[str, Tensor] = {}
        self.penalties: dict[str, str] = {}
        for name, m in masks.items():
            if not isinstance(m, Tensor) or m.dtype != torch.bool:
                raise ValueError(f"invalid mask {name!r}: expected a bool tensor, got "
                                 f"{getattr(m, 'dtype', type(m))}")
            pen = (penalties or {}).get(name, "lasso")
            if pen not in PENALTIES or pen == "none":
                raise ValueError(f"invalid penalty {pen!r} for mask {name!r}")
            if not get_penalty(pen).whole_units(m):
                raise ValueError(f"invalid mask {name!r}: a {pen} mask must keep or drop "
                                 "whole filters / neurons")
            self.masks[name] = m.detach().cpu()
            self.penalties[name] = pen

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_optimizer(cls, model: nn.Module, opt: DessiLBI) -> Mask:
        """The support of Γ: ``W ⊙ 1[Γ ≠ 0]`` is the Sparse model of the paper."""
        return cls(named_masks(model, opt), named_penalties(model, opt))

    @classmethod
    def from_entry_order(cls, model: nn.Module, entry: Mapping[str, Tensor],
                         penalties: Mapping[str, str], density: float) -> Mask:
        """Keep the units that entered supp(Γ) first until ``density`` of the weights is kept.

        Units are filters for ``group`` layers and weights for ``lasso`` layers, ranked over all
        layers together by entry epoch (never-entered last), ties broken by larger ‖W_g‖.
        """
        _check_density(density)
        params = dict(unwrap(model).named_parameters())
        keys, sizes, epochs, norms = [], [], [], []
        for name, e in entry.items():
            if name not in params:
                raise KeyError(f"entry names a parameter the model does not have: {name!r}")
            w = params[name].detach().float().cpu()
            unit_norm = get_penalty(penalties.get(name, "lasso")).unit_norms(w)
            unit_size = w.numel() // max(unit_norm.numel(), 1)
            n = e.numel()
            keys.append(torch.full((n,), len(sizes)))
            sizes.append(unit_size)
            never = e.reshape(-1) < 0
            epochs.append(torch.where(never, torch.iinfo(torch.int32).max, e.reshape(-1)).double())
            norms.append(unit_norm.double())
        layer = torch.cat(keys)
        unit_size = torch.tensor(sizes, dtype=torch.float64)[layer]
        ep, nm = torch.cat(epochs), torch.cat(norms)
        order = torch.argsort(nm, descending=True, stable=True)  # secondary key first
        order = order[torch.argsort(ep[order], stable=True)]
        budget = density * float(unit_size.sum())
        cum = torch.cumsum(unit_size[order], 0)
        kept_units = torch.zeros_like(ep, dtype=torch.bool)
        kept_units[order[cum <= budget + 1e-9]] = True
        return cls._from_units(params, entry, penalties, layer, kept_units)

    @classmethod
    def from_magnitude(cls, model: nn.Module, penalties: Mapping[str, str], density: float,
                       scope: str = "layer") -> Mask:
        """Keep the largest units (‖W_g‖ for group, |w| for lasso): per layer or globally."""
        _check_density(density)
        if scope not in ("layer", "global"):
            raise ValueError(f"invalid scope={scope!r}: 'layer' or 'global'")
        params = dict(unwrap(model).named_parameters())
        if scope == "global":
            fake = {n: torch.zeros(get_penalty(p).unit_count(params[n].shape), dtype=torch.int32)
                    for n, p in penalties.items()}
            return cls.from_entry_order(model, fake, penalties, density)
        out = {}
        for name, pen in penalties.items():
            w = params[name].detach().float().cpu()
            units = get_penalty(pen).unit_norms(w)
            k = int(round(density * units.numel()))
            keep = torch.zeros(units.numel(), dtype=torch.bool)
            keep[torch.argsort(units, descending=True, stable=True)[:k]] = True
            out[name] = get_penalty(pen).expand(keep, w.shape)
        return cls(out, penalties)

    @classmethod
    def random_like(cls, other: Mask, seed: int = 0) -> Mask:
        """A random mask with the same number of kept units in every layer."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for name, m in other.masks.items():
            pen = get_penalty(other.penalties[name])
            units = pen.unit_mask(m)
            keep = torch.zeros_like(units)
            keep[torch.randperm(units.numel(), generator=g)[: int(units.sum())]] = True
            out[name] = pen.expand(keep, m.shape)
        return cls(out, other.penalties)

    @classmethod
    def _from_units(cls, params: dict[str, Tensor], entry: Mapping[str, Tensor],
                    penalties: Mapping[str, str], layer: Tensor, kept: Tensor) -> Mask:
        out = {}
        for i, name in enumerate(entry):
            pen = get_penalty(penalties.get(name, "lasso"))
            out[name] = pen.expand(kept[layer == i], params[name].shape)
        return cls(out, {n: penalties.get(n, "lasso") for n in entry})

    # ---------------------------------------------------------------- use
    def density(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / total if total else 0.0

    def report(self) -> dict[str, dict[str, Any]]:
        return layer_report(self.masks, self.penalties)

    def applied(self, model: nn.Module) -> Any:
        """Context manager: ``W ← W ⊙ mask`` inside, original weights restored exactly after."""
        return applied_masks(model, self.masks)

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> nn.Module:
        """Zero the masked weights of ``model`` permanently."""
        params = dict(unwrap(model).named_parameters())
        _check_fits(self.masks, params)
        for n, m in self.masks.items():
            params[n].mul_(m.to(params[n].device, params[n].dtype))
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"format": "dessilbi-mask-v1", "masks": dict(self.masks),
                "penalties": dict(self.penalties)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Mask:
        if "masks" not in state:
            raise ValueError("not a dessilbi mask: no 'masks' entry")
        return cls(state["masks"], state.get("penalties"))

    def save(self, path: Any) -> None:
        from ..files import save_checkpoint

        save_checkpoint(self.state_dict(), path)

    @classmethod
    def load(cls, path: Any) -> Mask:
        from ..files import load_checkpoint

        return cls.from_state_dict(load_checkpoint(path))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Mask) and self.penalties == other.penalties
                and self.masks.keys() == other.masks.keys()
                and all(torch.equal(self.masks[k], other.masks[k]) for k in self.masks))

    __hash__ = None  # type: ignore[assignment]


def _check_fits(masks: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
    """Every mask names a parameter of the model and has exactly its shape (a mask of another
    model must not broadcast silently)."""
    unknown = set(masks) - set(params)
    if unknown:
        raise KeyError(f"masks name parameters the model does not have: {sorted(unknown)[:5]}")
    for n, m in masks.items():
        if tuple(m.shape) != tuple(params[n].shape):
            raise ValueError(f"invalid mask for {n}: shape {tuple(m.shape)}, the parameter has "
                             f"{tuple(params[n].shape)} (a mask of another model?)")


def _check_density(density: float) -> None:
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"invalid density={density!r}: must be in [0, 1]")


LAYER_COLUMNS = ["layer", "weights", "non-zero", "density", "filters kept"]


def layer_rows(report: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """The rows of a per-layer report as every command and report prints them: counts with
    thousands separators, density in percent, units kept as ``kept/total``."""
    return [[name, f"{r['weights']:,}", f"{r['nonzero']:,}", f"{100 * r['density']:.2f}%",
             f"{r['filters_kept']}/{r['filters']}" if "filters" in r else ""]
            for name, r in report.items()]


def format_report(report: Mapping[str, Mapping[str, Any]], fmt: str = "table") -> str:
    """A per-layer report as an aligned text table (:func:`layer_rows`), JSON or CSV."""
    import csv
    import io
    import json

    if fmt == "json":
        return json.dumps(report, indent=2)
    if fmt == "csv":  # raw numbers, for spreadsheets
        cols = ["layer", "weights", "nonzero", "density", "filters", "filters_kept"]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        w.writerows([[name, r["weights"], r["nonzero"], f"{r['density']:.4f}",
                      r.get("filters", ""), r.get("filters_kept", "")]
                     for name, r in report.items()])
        return buf.getvalue()
    if fmt != "table":
        raise ValueError(f"invalid format {fmt!r}: table, json or csv")
    from ..tables import format_table

    return format_table([LAYER_COLUMNS, *layer_rows(report)])
