"""The per-tensor and multi-tensor kernels of one DessiLBI step (the formula: :mod:`.optim`).

``single_tensor`` loops over the tensors; ``multi_tensor`` does the same arithmetic with
``torch._foreach_*`` calls on tensors of one device and dtype (``group_by_device_dtype``).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from .penalties import prox
from .prox import broadcast_to_groups, group_scale


def group_by_device_dtype(params: list[Tensor]) -> list[list[int]]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(p.device, p.dtype)].append(i)
    return list(groups.values())


def plain(t: Tensor) -> bool:
    """Whether ``t`` is a plain tensor or parameter, not a subclass (FSDP's and tensor
    parallelism's ``DTensor``, a quantisation wrapper): only plain tensors share memory with
    the scratch buffers and flat buckets, whose operations would mix the two kinds."""
    return type(t) in (Tensor, torch.nn.Parameter)


def _gap(w: Tensor, v: Tensor, penalty: str, kappa: float, lambda_: float,
         group_norm: str, workspace: Tensor | None = None, idle: bool = False,
         ) -> tuple[Tensor, Tensor | None]:
    """W − Γ = W − κ prox_λ(V) in one kernel after the prox's own (Γ is never materialised),
    written into ``workspace`` (a flat buffer of at least ``w.numel()`` entries) when given;
    with ``idle``, also 1[Γ = 0] per unit (broadcastable to W), else ``None``."""
    out = None
    if workspace is not None and plain(w) and w.is_contiguous() \
            and workspace.numel() >= w.numel() and workspace.dtype == w.dtype \
            and workspace.device == w.device:
        out = workspace[:w.numel()].view(w.shape)
    if penalty == "group":
        scale = broadcast_to_groups(group_scale(v, lambda_, 0, group_norm), v, 0)  # type: ignore[arg-type]
        outside = (scale == 0).to(w.dtype) if idle else None
        return torch.addcmul(w, v, scale, value=-kappa, out=out), outside
    gam = prox(v, penalty, lambda_, group_norm)
    return torch.add(w, gam, alpha=-kappa, out=out), (gam == 0).to(w.dtype) if idle else None


def _prox_all(vs: list[Tensor], penalty: str, lambda_: float, group_norm: str, idle: bool,
              ) -> tuple[list[Tensor], list[Tensor] | None]:
    """prox_λ(V) of every tensor and, with ``idle``, 1[Γ = 0] per unit (as :func:`_gap`)."""
    if penalty != "group":
        gam = [prox(v, penalty, lambda_, group_norm) for v in vs]
        return gam, [(g == 0).to(g.dtype) for g in gam] if idle else None
    scales = [broadcast_to_groups(group_scale(v, lambda_, 0, group_norm), v, 0)  # type: ignore[arg-type]
              for v in vs]
    gam = torch._foreach_mul(vs, scales)
    return gam, [(s == 0).to(s.dtype) for s in scales] if idle else None


def workspace_for(params: list[Tensor], held: dict[tuple[torch.dtype, torch.device], Tensor],
                  ) -> Tensor | None:
    """A flat scratch buffer for W − Γ of the largest of ``params`` (one dtype and device),
    kept in ``held`` between steps: a fresh multi-megabyte tensor per step and tensor costs
    its page faults (measured: addcmul 0.8 ms on a VGG-16 conv instead of 0.2 ms)."""
    if not params:
        return None
    p0 = params[0]
    size = max(p.numel() for p in params)
    key = (p0.dtype, p0.device)
    buf = held.get(key)
    if buf is None or buf.numel() < size:
        buf = held[key] = torch.empty(size, dtype=p0.dtype, device=p0.device)
    return buf


# Entries of a block of rows of a large tensor: its step's six operations then run on data
# that stays in the 1 MB L2 cache instead of streaming the tensor from memory six times
# (measured on VGG16-BN's 512×4608 convs: 1.2-1.5× SGD against 1.4-1.9× unblocked).
ROW_BLOCK = 1 << 18
_ROW_WISE = ("group", "lasso", "none")  # penalties whose units never span two rows


def single_tensor(
    params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None],
    vs: list[Tensor | None], *, penalty: str, lr: float | Tensor, kappa: float, nu: float,
    lambda_: float, group_norm: str, momentum: float, dampening: float, nesterov: bool,
    weight_decay: float, pull: str = "all", workspace: Tensor | None = None,
) -> None:
    compiling = torch.compiler.is_compiling()
    blocked = penalty in _ROW_WISE and not compiling
    h = dict(penalty=penalty, lr=lr, kappa=kappa, nu=nu, lambda_=lambda_, group_norm=group_norm,
             momentum=momentum, dampening=dampening, nesterov=nesterov,
             weight_decay=weight_decay, pull=pull, workspace=None if compiling else workspace)
    for i, (w, g) in enumerate(zip(params, grads)):
        fresh = momentum != 0.0 and bufs[i] is None
        if fresh:  # b ← g on the tensor's first step (written block by block below)
            bufs[i] = torch.empty_like(g, memory_format=torch.preserve_format)
        b, v = bufs[i], vs[i]
        if not blocked or w.ndim == 0 or w.numel() <= ROW_BLOCK or not plain(w):
            _step_rows(w, g, b, v, fresh, **h)
            continue
        rows = max(1, ROW_BLOCK // w[0].numel())
        for r in range(0, w.shape[0], rows):
            block = slice(r, r + rows)
            _step_rows(w[block], g[block], None if b is None else b[block],
                       None if v is None else v[block], fresh, **h)


def _step_rows(w: Tensor, g: Tensor, b: Tensor | None, v: Tensor | None, fresh: bool, *,
               penalty: str, lr: float | Tensor, kappa: float, nu: float, lambda_: float,
               group_norm: str, momentum: float, dampening: float, nesterov: bool,
               weight_decay: float, pull: str, workspace: Tensor | None) -> None:
    """The step of one tensor, or of a block of its rows (``fresh``: b ← g)."""
    step = lr * kappa
    if weight_decay != 0.0:
        g = g.add(w, alpha=weight_decay)
    d = g
    if momentum != 0.0:
        assert b is not None
        if fresh:
            b.copy_(g)
        elif dampening == 0.0:  # b ← g + m b in one pass (as the flat step)
            torch.add(g, b, alpha=momentum, out=b)
        else:
            b.mul_(momentum).add_(g, alpha=1.0 - dampening)
        d = g.add(b, alpha=momentum) if nesterov else b
    if penalty != "none" and nu != math.inf:
        assert v is not None
        # diff = W − Γ with the values before this step; it drives both V and W.
        diff, idle = _gap(w, v, penalty, kappa, lambda_, group_norm, workspace,
                          idle=pull == "outside")
        if torch.compiler.is_compiling():
            # Inductor (torch 2.14, CPU) generates broken code for several in-place updates
            # that read a reduction over one of them (group norms of V); one foreach node
            # holding the updates of V and W compiles.
            pulled = diff if idle is None else diff * idle
            torch._foreach_add_([v, w], [diff * (lr / nu), (d + pulled / nu) * -step])
            return
        v.add_(diff, alpha=lr / nu)
        if idle is None:
            w.add_(diff, alpha=-step / nu)
        else:  # the pull on the units outside supp(Γ) only
            w.addcmul_(diff, idle, value=-step / nu)
    w.add_(d, alpha=-step)


def multi_tensor(
    params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None],
    vs: list[Tensor | None], *, penalty: str, lr: float | Tensor, kappa: float, nu: float,
    lambda_: float, group_norm: str, momentum: float, dampening: float, nesterov: bool,
    weight_decay: float, pull: str = "all",
) -> None:
    step = lr * kappa
    if weight_decay != 0.0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0.0:
        old = [i for i, b in enumerate(bufs) if b is not None]
        if old:
            old_bufs = [bufs[i] for i in old]
            torch._foreach_mul_(old_bufs, momentum)
            torch._foreach_add_(old_bufs, [grads[i] for i in old], alpha=1.0 - dampening)
        for i, b in enumerate(bufs):
            if b is None:
                bufs[i] = torch.clone(grads[i]).detach()
        d = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
    else:
        d = grads
    if penalty != "none" and nu != math.inf:
        gam, idle = _prox_all(vs, penalty, lambda_, group_norm, pull == "outside")
        diff = torch._foreach_sub(params, gam, alpha=kappa)
        torch._foreach_add_(vs, diff, alpha=lr / nu)
        if idle is None:
            torch._foreach_add_(params, diff, alpha=-step / nu)
        else:
            torch._foreach_addcmul_(params, diff, idle, value=-step / nu)
    torch._foreach_add_(params, d, alpha=-step)
