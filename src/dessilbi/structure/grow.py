"""Growing a layer (the surgery of the journal version's network growing; the schedule that
decides when and what to grow is :mod:`dessilbi.experiments.growing`).

A convolution grows from n to max(n + 8, ⌊1.1 n⌋) filters. The new filters are initialised
orthogonally to the existing ones
(scaled to their mean norm); the BatchNorm after it and the inputs of its consumers (the next
convolution, or the Linear after a flatten / pooling) are widened to match, with the consumers'
new input weights at zero, so the network computes exactly the same function right after
growing. W, V and the momentum of every old filter are carried into the wider optimizer.

Which layers can grow, and what must widen with them, comes from Torch-Pruning's dependency
graph: a convolution qualifies when it is the only producer of its output channels (so the
channels of a residual sum do not grow; in a ResNet the inner convolution of each block does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..core.optim import DessiLBI
from ..sparsity.masks import unwrap

__all__ = ["Growable", "find_growable", "grow_layer", "transfer_state", "grown_size",
           "selected_fraction"]


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


