"""A ``torch.compile``-d DessiLBI update: every tensor read and written once per step.

The eager multi-tensor path makes about eight passes over memory per step (momentum, prox,
W − Γ, V, W); SGD makes three. Compiled, the whole element-wise update of a tensor becomes one
loop reading g, b, W, V and writing b, W, V. Group penalties need the per-filter norms of V first;
they are computed by a second compiled function (a reduction followed by mutation of the same
buffer in one graph trips an Inductor code-generation bug on CPU in torch 2.14).

Hyper-parameters enter as 0-d tensors on the parameters' device, so a learning-rate schedule does
not trigger recompilation; structural choices (penalty, momentum on/off, Nesterov, weight decay
on/off, group norm) are compile-time constants.
"""

from __future__ import annotations

import logging
import math
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .kernels import group_by_device_dtype

log = logging.getLogger(__name__)


def _group_scales(vs: list[Tensor], lam: Tensor, kappa: Tensor, rms: bool) -> list[Tensor]:
    """κ · max(0, 1 − λ / ‖V_g‖) per output filter, shaped to broadcast against V."""
    out = []
    for v in vs:
        dims = tuple(range(1, v.ndim))
        norms = torch.linalg.vector_norm(v, dim=dims, keepdim=True) if dims else v.abs()
        if rms and dims:
            norms = norms / math.sqrt(v[0].numel())
        tiny = torch.finfo(v.dtype).tiny
        out.append((norms - lam).clamp_min(0.0) / norms.clamp_min(tiny) * kappa)
    return out


def _update(
    params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], vs: list[Tensor],
    scales: list[Tensor], h: dict[str, Tensor], penalty: str, use_momentum: bool,
    nesterov: bool, use_wd: bool, pull_outside: bool,
) -> None:
    lr, kappa, nu_inv, lam = h["lr"], h["kappa"], h["nu_inv"], h["lam"]
    for i, (w, g) in enumerate(zip(params, grads)):
        if use_wd:
            g = g + h["wd"] * w
        if use_momentum:
            b = bufs[i]
            nb = h["buf_keep"] * b + h["grad_coef"] * g
            b.copy_(nb)
            d = g + h["momentum"] * nb if nesterov else nb
        else:
            d = g
        if penalty == "none":
            w.copy_(w - lr * kappa * d)
            continue
        v = vs[i]
        if penalty == "lasso":
            clipped = torch.clamp(v, min=-lam, max=lam)
            gam = (v - clipped) * kappa
        else:
            gam = v * scales[i]
        diff = w - gam
        pulled = diff
        if pull_outside:  # 1[Γ = 0]: |V| ≤ λ per entry (lasso), a zero shrink per filter (group)
            pulled = diff * ((v == clipped) if penalty == "lasso" else (scales[i] == 0))
        v.copy_(v + diff * (lr * nu_inv))
        w.copy_(w - lr * kappa * (d + pulled * nu_inv))


def _update_many(items: list[tuple[Any, ...]]) -> None:
    """Every bundle's update in one compiled graph (one call, one guard check per step)."""
    for item in items:
        _update(*item)


def _scales_many(items: list[tuple[list[Tensor], Tensor, Tensor, bool]]) -> list[list[Tensor]]:
    return [_group_scales(*item) for item in items]


class _ScalarCache:
    """0-d hyper-parameter tensors by (device, dtype, values), the most recent few kept.

    ``torch.full`` on the device avoids a host-to-device copy (and its synchronisation); keying by
    the values lets groups with different settings share the cache without re-filling every step.
    """

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self.held: OrderedDict[tuple[Any, ...], dict[str, Tensor]] = OrderedDict()

    def get(self, device: torch.device, dtype: torch.dtype,
            values: dict[str, float]) -> dict[str, Tensor]:
        key = (device, dtype, tuple(sorted(values.items())))
        if key in self.held:
            self.held.move_to_end(key)
            return self.held[key]
        tensors = {k: torch.full((), v, device=device, dtype=dtype) for k, v in values.items()}
        self.held[key] = tensors
        if len(self.held) > self.size:
            self.held.popitem(last=False)
        return tensors


def _prepare(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None],
             vs: list[Tensor | None], scalars: _ScalarCache, penalty: str, lr: float | Tensor,
             kappa: float, nu: float, lambda_: float, group_norm: str, momentum: float,
             dampening: float, nesterov: bool, weight_decay: float, pull: str = "all",
             ) -> list[tuple[tuple[Any, ...], tuple[Any, ...] | None]]:
    """(update arguments, filter-norm arguments or None) per (device, dtype, first step) of
    one bundle.

    Missing momentum buffers are created in ``bufs``; b ← g on a tensor's first step is taken as
    b ← 0·b + 1·g, so the graph is the same on every step. Tensors on their first step form a
    call of their own: a parameter whose first gradient arrives late must not reset the buffers
    of the others.
    """
    lr_value = float(lr) if isinstance(lr, Tensor) else lr
    use_momentum = momentum != 0.0
    out = []
    for same in group_by_device_dtype(params):
        device, dtype = params[same[0]].device, params[same[0]].dtype
        starting = [use_momentum and bufs[i] is None for i in same]
        new = [i for i, s in zip(same, starting) if s]
        old = [i for i, s in zip(same, starting) if not s]
        for idx, first in ((new, True), (old, False)):
            if not idx:
                continue
            out.append(_prepare_part(idx, first, params, grads, bufs, vs, scalars.get(
                device, dtype, dict(
                    lr=lr_value, kappa=kappa, nu_inv=0.0 if math.isinf(nu) else 1.0 / nu,
                    lam=lambda_, wd=weight_decay, momentum=momentum,
                    buf_keep=0.0 if first else momentum,
                    grad_coef=1.0 if first else 1.0 - dampening)),
                penalty, use_momentum, nesterov, weight_decay != 0.0, group_norm,
                pull == "outside"))
    return out


def _prepare_part(idx: list[int], first: bool, params: list[Tensor], grads: list[Tensor],
                  bufs: list[Tensor | None], vs: list[Tensor | None], h: dict[str, Tensor],
                  penalty: str, use_momentum: bool, nesterov: bool, use_wd: bool,
                  group_norm: str, pull_outside: bool,
                  ) -> tuple[tuple[Any, ...], tuple[Any, ...] | None]:
    if first:
        for i in idx:
            bufs[i] = torch.zeros_like(params[i], memory_format=torch.preserve_format)
    v_ = [vs[i] for i in idx] if penalty != "none" else []
    update = ([params[i] for i in idx], [grads[i] for i in idx],
              [bufs[i] for i in idx] if use_momentum else [], v_, h, penalty,
              use_momentum, nesterov, use_wd, pull_outside)
    norms = (v_, h["lam"], h["kappa"], group_norm == "rms") if penalty == "group" else None
    return update, norms


def fused_step(bundles: list[dict[str, Any]], cache: dict[str, Any]) -> None:
    """Compiled DessiLBI step over several bundles (param groups × penalties) at once.

    Each bundle holds ``params, grads, bufs, vs`` and the hyper-parameters of
    :func:`dessilbi.core.update.dessilbi_update`; ``bufs`` is completed in place.
    """
    if "update" not in cache:
        # the first step of this optimizer compiles: say why it takes seconds, once
        log.info("DessiLBI: compiling the update of %d tensors with torch.compile (the first "
                 "step takes seconds; fused=False keeps the eager step)",
                 sum(len(b["params"]) for b in bundles))
        cache["update"] = _Compiled(_update_many)
        cache["scales"] = _Compiled(_scales_many)
        cache["scalars"] = _ScalarCache()
    prepared = [item for b in bundles for item in _prepare(scalars=cache["scalars"], **b)]
    norm_args = [n for _, n in prepared if n is not None]
    scales = iter(cache["scales"](norm_args) if norm_args else [])
    items = []
    for (params, grads, bufs, vs, h, penalty, use_m, nesterov, use_wd, outside), n in prepared:
        items.append((params, grads, bufs, vs, next(scales) if n is not None else [], h,
                      penalty, use_m, nesterov, use_wd, outside))
    cache["update"](items)


def _compile_errors() -> tuple[type[BaseException], ...]:
    from torch._dynamo import exc  # imported on failure only: dynamo is slow to import

    return exc.TorchDynamoException, exc.FailOnRecompileLimitHit


class _Compiled:
    """``torch.compile(fn, fullgraph=True)`` that falls back to ``fn`` itself, with one warning,
    when compilation fails (no compiler for the platform, a recompilation limit, a compiler bug).

    Dynamo keeps its compiled variants on the function's code object and limits their number
    per code object; every instance compiles a copy of the code, so that one optimizer's shapes
    do not use up the budget of the next (before, the 9th optimizer over new shapes in a process
    crashed with ``FailOnRecompileLimitHit``).
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.eager = fn
        own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                 fn.__defaults__, fn.__closure__)
        self.compiled: Callable[..., Any] | None = torch.compile(own, fullgraph=True)

    def __call__(self, *args: Any) -> Any:
        # Dynamo refuses to trace under a user's TorchDispatchMode (FlopCounterMode,
        # CommDebugMode, an operation counter) and raises a plain RuntimeError: eager then,
        # for this call only
        if self.compiled is not None and _get_current_dispatch_mode() is None:
            try:
                return self.compiled(*args)
            except _compile_errors() as e:  # raised while compiling, before a tensor is written
                log.warning("DessiLBI fused step: torch.compile failed (%s: %s); using the "
                            "eager update from now on", type(e).__name__, str(e)[:200])
                self.compiled = None
        return self.eager(*args)


def fused_update(
    params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None],
    vs: list[Tensor | None], *, cache: dict[str, Any] | None, **hp: Any,
) -> None:
    """Compiled DessiLBI step on one bundle; same contract as
    :func:`dessilbi.core.update.dessilbi_update`."""
    fused_step([dict(params=params, grads=grads, bufs=bufs, vs=vs, **hp)],
               {} if cache is None else cache)
