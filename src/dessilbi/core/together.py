r"""The flat buckets of several parameter groups updated together (the CUDA form of the step).

On CUDA a step's time is the host's: launching an operation costs more than its pass over the
memory of a bucket (an H200 step of ResNet-56's shapes moves 0.1 ms of data in 1 ms). So the
buckets of every group on one device and dtype update stage by stage, each stage one
multi-tensor operation for all the buckets whose hyper-parameters agree on it:

1. gather, group by group: sign, fixed masks, weight decay (:func:`.flat.gather`);
2. the momentum :math:`B \leftarrow m B + (1 - d) G`, for all the groups with the same
   (m, d, Nesterov);
3. the coupling, group by group (λ, κ, ν and the pull are a group's): the filter norms of V (a
   row reduction per bucket), :math:`D = W - κ \operatorname{prox}_λ(V)`,
   :math:`V \leftarrow V + \frac{α}{ν} D`, :math:`W \leftarrow W - \frac{ακ}{ν} D \odot P`;
4. :math:`W \leftarrow W - ακ B`, for all the groups with the same ακ;
5. write back, group by group (:func:`.flat.write_back`).

Each bucket's operations keep the order of the per-tensor loop, so the numbers are its numbers
bit for bit; only the launches are shared. With :func:`.flat_plan.step_buckets` copying all the
gradients in with one operation, a step of the CIFAR ResNet-56 dispatches 25 operations (27
with each group's stages of its own), SGD-foreach 5.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .flat import FlatBucket, gap_of, gather, write_back

__all__ = ["Part", "group_shrinks", "step_together"]


class Part(NamedTuple):
    """One parameter group's share of a step: its hyper-parameters (``lr`` a float), its
    buckets, and per bucket its tensors' states, their masks and the bucket's threshold (a
    float, or a column of per-row ones: :meth:`.flat.FlatBucket.lambdas_of`)."""

    hp: dict[str, Any]
    buckets: list[FlatBucket]
    states: list[list[dict[str, Any]]]
    masks: list[list[Tensor | None]]
    lams: list[Tensor | float]


def step_together(parts: Sequence[Part]) -> None:
    """One DessiLBI step of the buckets of ``parts`` (one device and dtype; their gradients
    already copied in), stage by stage (module docstring)."""
    held = [gather(p.buckets, p.masks, momentum=p.hp["momentum"], dampening=p.hp["dampening"],
                   weight_decay=p.hp["weight_decay"], maximize=p.hp["maximize"]) for p in parts]
    directions: list[list[Tensor]] = [[] for _ in parts]
    for (momentum, dampening, nesterov), which in _agreeing(
            parts, lambda hp: (hp["momentum"], hp["dampening"], hp["nesterov"])).items():
        ds = iter(_momentum([b for i in which for b in parts[i].buckets],
                            momentum, dampening, nesterov))
        for i in which:
            directions[i] = [next(ds) for _ in parts[i].buckets]
    for part, ds in zip(parts, directions):
        _couple(part, ds)
    for step, which in _agreeing(parts, lambda hp: hp["lr"] * hp["kappa"]).items():
        torch._foreach_add_([b.weights for i in which for b in parts[i].buckets],
                            [d for i in which for d in directions[i]], alpha=-step)
    for part, masks in zip(parts, held):
        write_back(part.buckets, part.states, masks, part.hp["momentum"])


def _agreeing(parts: Sequence[Part], key: Any) -> dict[Hashable, list[int]]:
    """The indices of ``parts``, by the value of ``key`` on their hyper-parameters."""
    out: dict[Hashable, list[int]] = defaultdict(list)
    for i, part in enumerate(parts):
        out[key(part.hp)].append(i)
    return out


def _couple(part: Part, ds: list[Tensor]) -> None:
    """The coupling of a group's penalised buckets: V ← V + α/ν D and the pull
    W ← W − ακ/ν D ⊙ P, with D = W − κ prox_λ(V) written where the step direction is not."""
    hp, buckets = part.hp, part.buckets
    if hp["nu"] == math.inf:
        return
    coupled = [i for i, b in enumerate(buckets) if b.penalty != "none"]
    if not coupled:
        return
    outs = [buckets[i].grads if ds[i] is not buckets[i].grads else buckets[i].gap_buffer()
            for i in coupled]
    gaps, idles = _gaps([buckets[i] for i in coupled], [part.lams[i] for i in coupled],
                        hp["kappa"], hp["group_norm"], outs, hp["pull"] == "outside")
    step = hp["lr"] * hp["kappa"]
    torch._foreach_add_([buckets[i].v for i in coupled], gaps,  # type: ignore[misc]
                        alpha=hp["lr"] / hp["nu"])
    ws = [buckets[i].weights for i in coupled]
    if idles is None:
        torch._foreach_add_(ws, gaps, alpha=-step / hp["nu"])
    else:  # the pull on the units outside supp(Γ) only
        torch._foreach_addcmul_(ws, gaps, idles, value=-step / hp["nu"])


def _momentum(buckets: Sequence[FlatBucket], momentum: float, dampening: float,
              nesterov: bool) -> list[Tensor]:
    """B ← m B + (1 − dampening) G of all the buckets; returns the step direction D per
    bucket (B, G + m B with Nesterov, G without momentum), which may be the gradient buffer."""
    gs = [b.grads for b in buckets]
    if momentum == 0.0:
        return gs
    bufs: list[Tensor] = [b.buf for b in buckets]  # type: ignore[misc]
    if dampening != 0.0:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, gs, alpha=1.0 - dampening)
    elif not nesterov:  # G ← G + m B, the new buffer, then B ← G: two launches
        torch._foreach_add_(gs, bufs, alpha=momentum)
        torch._foreach_copy_(bufs, gs)
    else:
        for g, b in zip(gs, bufs):  # b ← g + m b in one pass
            torch.add(g, b, alpha=momentum, out=b)
    if nesterov:
        torch._foreach_add_(gs, bufs, alpha=momentum)
        return gs
    return bufs


def group_shrinks(vs: Sequence[Tensor], lams: Sequence[Tensor | float],
                  group_norm: str) -> list[Tensor]:
    """:func:`.flat.group_shrink` of several buffers: a row reduction each, then one multi-tensor
    operation per stage for all of them."""
    norms = [torch.linalg.vector_norm(v, dim=1, keepdim=True) for v in vs]
    if group_norm == "rms":
        torch._foreach_div_(norms, [math.sqrt(v.shape[1]) for v in vs])
    if all(isinstance(lam, Tensor) for lam in lams):
        shrinks = torch._foreach_sub(norms, list(lams))  # type: ignore[arg-type]
    elif any(isinstance(lam, Tensor) for lam in lams):
        shrinks = [n - lam for n, lam in zip(norms, lams)]
    else:
        shrinks = torch._foreach_sub(norms, [float(lam) for lam in lams])  # type: ignore[arg-type]
    torch._foreach_clamp_min_(shrinks, 0.0)
    tiny = [torch.finfo(n.dtype).tiny for n in norms]
    torch._foreach_div_(shrinks, torch._foreach_clamp_min(norms, tiny))
    return shrinks


def _gaps(buckets: Sequence[FlatBucket], lams: Sequence[Tensor | float], kappa: float,
          group_norm: str, outs: Sequence[Tensor], idle: bool,
          ) -> tuple[list[Tensor], list[Tensor] | None]:
    """:func:`.flat.gap_of` of all ``buckets``: the group shrink factors as one multi-tensor
    operation per stage, then W − V·shrink into ``outs`` bucket by bucket (the shrink column
    broadcasts over a row, which a multi-tensor ``addcmul`` only does one tensor at a time
    anyway; W copied into ``outs`` first would cost a launch and two passes more), the lasso
    ones each."""
    grouped = [i for i, b in enumerate(buckets) if b.penalty == "group"]
    shrinks = dict(zip(grouped, group_shrinks(
        [buckets[i].v for i in grouped], [lams[i] for i in grouped],  # type: ignore[misc]
        group_norm))) if grouped else {}
    for i in grouped:
        torch.addcmul(buckets[i].weights, buckets[i].v, shrinks[i],  # type: ignore[arg-type]
                      value=-kappa, out=outs[i])
    outside = dict(zip(grouped, _zeros([shrinks[i] for i in grouped]))) \
        if idle and grouped else {}
    idles: list[Tensor] = []
    for i, (b, lam, out) in enumerate(zip(buckets, lams, outs)):
        if b.penalty == "group":
            if idle:
                idles.append(outside[i])
            continue
        _, lasso_outside = gap_of(b, lam, kappa, group_norm, out, idle)
        if lasso_outside is not None:
            idles.append(lasso_outside)
    return list(outs), idles if idle else None


def _zeros(shrinks: list[Tensor]) -> list[Tensor]:
    """1[s = 0] of every (non-negative) shrink factor, as 1 − sign(s): three multi-tensor
    operations for all the buckets instead of two per bucket (``s == 0`` and its cast)."""
    ones = torch._foreach_sign(shrinks)
    torch._foreach_neg_(ones)
    torch._foreach_add_(ones, 1.0)
    return ones
