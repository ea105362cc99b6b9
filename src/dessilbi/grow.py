"""Network growing with DessiLBI (the journal version): start narrow, widen what is saturated.

Every few epochs, a convolution whose fraction of filters in supp(Γ) exceeds τ grows from n to
max(n + 8, ⌊1.1 n⌋) filters. The new filters are initialised orthogonally to the existing ones
(scaled to their mean norm); the BatchNorm after it and the inputs of its consumers (the next
convolution, or the Linear after a flatten / pooling) are widened to match, with the consumers'
new input weights at zero, so the network computes exactly the same function right after
growing. W, V and the momentum of every old filter are carried into the wider optimizer. Growing
stops when no layer grows; then the network is fine-tuned.

Which layers can grow, and what must widen with them, comes from Torch-Pruning's dependency
graph: a convolution qualifies when it is the only producer of its output channels (so the
channels of a residual sum do not grow; in a ResNet the inner convolution of each block does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import TrainConfig
from .optim import DessiLBI
from .optimizers import create_optimizer
from .sparsity import unwrap

log = logging.getLogger(__name__)

__all__ = ["Growable", "find_growable", "grow_layer", "transfer_state", "grown_size",
           "GrowConfig", "grow"]


@dataclass
class Growable:
    """A convolution that can widen, with the layers that must widen with it."""

    name: str
    conv: nn.Conv2d
    norms: list[nn.Module] = field(default_factory=list)
    consumers: list[nn.Module] = field(default_factory=list)


def grown_size(n: int) -> int:
    """The new width of a saturated layer: max(n + 8, ⌊1.1 n⌋)."""
    return max(n + 8, math.floor(1.1 * n))


def find_growable(model: nn.Module, example: Tensor) -> list[Growable]:
    """Every convolution that is the sole producer of its channels, with norms and consumers."""
    import torch_pruning as tp

    model = unwrap(model)
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    names = {id(m): n for n, m in model.named_modules()}
    out_fns = {tp.prune_conv_out_channels, tp.prune_linear_out_channels}
    found = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or m.groups != 1:
            continue
        group = dg.get_pruning_group(m, tp.prune_conv_out_channels, idxs=[0])
        producers, norms, consumers, ok = [], [], [], True
        for dep, _ in group:
            layer, fn = dep.target.module, dep.handler
            if fn in out_fns:
                producers.append(layer)
            elif fn == tp.prune_batchnorm_out_channels:
                norms.append(layer)
            elif fn in (tp.prune_conv_in_channels, tp.prune_linear_in_channels):
                consumers.append(layer)
            elif isinstance(layer, nn.Module) and any(True for _ in layer.parameters(False)):
                ok = False  # a coupled layer we do not know how to widen
        if ok and producers == [m] and consumers and id(m) in names:
            found.append(Growable(name, m, norms, consumers))
    return found


def _orthogonal_rows(old: Tensor, extra: int, generator: torch.Generator) -> Tensor:
    """``extra`` random rows orthogonal to the rows of ``old`` (as far as the dimension allows),
    each scaled to the mean norm of the old rows. Shapes: old (n, d) → (extra, d)."""
    n, d = old.shape
    new = torch.randn(extra, d, generator=generator, dtype=torch.float64)
    base = old.double()
    if n < d:
        q, _ = torch.linalg.qr(base.T)  # (d, n) orthonormal basis of the old rows
        new = new - (new @ q) @ q.T
    if extra <= d - min(n, d):  # room left: make the new rows orthonormal among themselves
        q2, _ = torch.linalg.qr(new.T)
        new = q2.T[:extra]
    scale = base.norm(dim=1).mean().clamp_min(1e-3)
    return (new / new.norm(dim=1, keepdim=True).clamp_min(1e-12) * scale).to(old.dtype)


def _pad(t: Tensor, shape: tuple[int, ...], value: float = 0.0) -> Tensor:
    """``t`` zero-padded (or ``value``-padded) at the end of every dimension up to ``shape``."""
    out = torch.full(shape, value, dtype=t.dtype, device=t.device)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


@torch.no_grad()
def grow_layer(g: Growable, new_out: int, generator: torch.Generator) -> None:
    """Widen ``g.conv`` to ``new_out`` filters in place, with its norms and consumers."""
    conv = g.conv
    n = conv.out_channels
    extra = new_out - n
    if extra <= 0:
        return
    w = conv.weight
    rows = _orthogonal_rows(w.detach().reshape(n, -1).cpu(), extra, generator)
    new_w = torch.cat([w.detach(), rows.reshape((extra,) + tuple(w.shape[1:])).to(w.device)])
    conv.weight = nn.Parameter(new_w.contiguous(memory_format=_fmt(w)))
    if conv.bias is not None:
        conv.bias = nn.Parameter(_pad(conv.bias.detach(), (new_out,)))
    conv.out_channels = new_out
    for bn in g.norms:
        bn.weight = nn.Parameter(_pad(bn.weight.detach(), (new_out,), 1.0))
        bn.bias = nn.Parameter(_pad(bn.bias.detach(), (new_out,)))
        bn.running_mean = _pad(bn.running_mean, (new_out,))
        bn.running_var = _pad(bn.running_var, (new_out,), 1.0)
        bn.num_features = new_out
    for c in g.consumers:
        if isinstance(c, nn.Conv2d):
            shape = (c.out_channels, c.in_channels + extra) + tuple(c.weight.shape[2:])
            c.weight = nn.Parameter(_pad(c.weight.detach(), shape).contiguous(
                memory_format=_fmt(c.weight)))
            c.in_channels += extra
        elif isinstance(c, nn.Linear):
            spatial = c.in_features // n  # features per channel after the flatten
            c.weight = nn.Parameter(_pad(c.weight.detach(),
                                         (c.out_features, c.in_features + extra * spatial)))
            c.in_features += extra * spatial


def _fmt(t: Tensor) -> torch.memory_format:
    return torch.channels_last if t.ndim == 4 and t.is_contiguous(
        memory_format=torch.channels_last) and not t.is_contiguous() else torch.contiguous_format


def transfer_state(old: torch.optim.Optimizer, old_names: dict[int, str],
                   new: torch.optim.Optimizer, model: nn.Module) -> None:
    """Copy V and momentum of every parameter (by name) into the wider optimizer, zero-padded."""
    by_name = {old_names[id(p)]: st for p, st in old.state.items() if id(p) in old_names}
    for name, p in unwrap(model).named_parameters():
        st = by_name.get(name)
        if not st:
            continue
        new.state[p] = {k: (_pad(v, tuple(p.shape)) if isinstance(v, Tensor) and v.shape != p.shape
                            and v.ndim == p.ndim else v) for k, v in st.items()}


def selected_fraction(opt: DessiLBI, conv: nn.Conv2d) -> float:
    """Fraction of the filters of ``conv`` that are in supp(Γ)."""
    sup = opt.support(conv.weight)
    return float(sup.reshape(sup.shape[0], -1).any(dim=1).float().mean())


@dataclass
class GrowConfig:
    """Growing schedule on top of a :class:`TrainConfig` (whose ``width`` sets the start)."""

    tau: float = 0.8
    grow_every: int = 2
    max_stages: int = 10
    finetune_epochs: int = 5

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
    from .checkpoint import save_checkpoint
    from .engine import _batches, build, epoch_indices, evaluate
    from .sparsity import Mask

    gcfg.validate()
    if cfg.optimizer != "dessilbi":
        raise ValueError("invalid optimizer: growing follows the Γ support, use dessilbi")
    b = build(cfg)
    model, opt, device = b.model, b.optimizer, b.device
    run_dir = Path(cfg.runs_dir) / (cfg.name or f"grow_{cfg.run_name()}")
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
