"""Which of a DessiLBI optimizer's tensors take the flat-bucket step, and that step over all
its parameter groups (:mod:`.flat` holds the buckets and their update).

Both work on the optimizer's cache of buckets (``cache``, a dict kept by the optimizer): the
plan of a group is kept while the same tensors have gradients, a bucket while it still holds
exactly its tensors' state.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from itertools import repeat
from operator import is_, is_not
from typing import Any

from torch import Tensor

from . import cpu_kernel
from .checks import check_grad
from .flat import (
    FlatBucket,
    batched_on,
    bucket_key,
    eligible,
    flat_step,
    worth_bucketing,
)
from .together import Part, step_together
from .transfer import Transfer, grads_of
from .triton_update import KernelUnavailable, fused_on
from .triton_update import step_buckets as fused_step

HYPER = ("lr", "kappa", "nu", "group_norm", "momentum", "dampening", "nesterov", "weight_decay",
         "maximize", "pull")  # what a group's step reads

__all__ = ["plan_buckets", "step_buckets"]

log = logging.getLogger(__name__)

Work = list[tuple[int, dict[str, Any], dict[tuple[Any, ...], list[Tensor]]]]


def plan_buckets(cache: dict[Any, Any], index: int, group: dict[str, Any],
                 resolve_penalty: Callable[[str, Tensor], str],
                 ) -> tuple[dict[tuple[Any, ...], list[Tensor]], list[Tensor]]:
    """Group ``index``'s tensors with a gradient split into flat buckets (by
    :func:`.flat.bucket_key`) and the others; kept while the same tensors have gradients (a
    step then only checks which do)."""
    params = group["params"]
    grads = list(map(grads_of, params))
    with_grad = params if all(map(is_not, grads, repeat(None))) \
        else [p for p, g in zip(params, grads) if g is not None]
    # the plan depends on the penalty and on whether the group may take the CPU kernel
    settings = (group["penalty"], group["fused"] is not False)
    held = cache.get(("plan", index))
    if held is not None and held[0] == settings and len(held[1]) == len(with_grad) \
            and all(map(is_, held[1], with_grad)):
        return held[2], held[3]
    buckets: dict[tuple[Any, ...], list[Tensor]] = defaultdict(list)
    others = []
    native = group["fused"] is not False and bool(with_grad) \
        and with_grad[0].device.type == "cpu" and cpu_kernel.available()
    for p in with_grad:
        check_grad(p.grad)  # type: ignore[arg-type]
        pen = resolve_penalty(group["penalty"], p)
        if eligible(p, pen, native) and p.grad.is_contiguous() \
                and p.grad.dtype == p.dtype:  # type: ignore[union-attr]
            buckets[bucket_key(p, pen)].append(p)
        else:
            others.append(p)
    for key in [k for k, ps in buckets.items() if not worth_bucketing(ps, native)]:
        others.extend(buckets.pop(key))
    # a copy: the group's own list may be changed in place before the next step
    cache[("plan", index)] = (settings, list(with_grad), dict(buckets), others)
    return buckets, others


def step_buckets(cache: dict[Any, Any], state: dict[Tensor, dict[str, Any]],
                 param_groups: list[dict[str, Any]], work: Work,
                 ) -> list[list[FlatBucket]] | None:
    """The step of the flat buckets of every group in ``work`` ((index, group, plan)),
    rebuilding a bucket when its tensors or their state changed since the last step. On CUDA
    (:func:`.flat.batched_on`) the buckets of all groups copy their tensors in and out
    together and update together, stage by stage (:mod:`.together`), or, for the groups with
    ``fused=True`` where Triton is, one fused kernel per bucket (:mod:`.triton_update`); on
    the CPU group by group, one call of the compiled kernel per bucket (:mod:`.cpu_kernel`)
    or the eager step bucket after bucket. Returns each group's buckets (by index in
    ``param_groups``) if every bucket took the compiled CPU kernel (the step :mod:`.steady`
    can replay), else ``None``."""
    by_kind: dict[tuple[Any, ...], list[tuple[int, FlatBucket, list[Any]]]] = defaultdict(list)
    used: list[list[FlatBucket]] = [[] for _ in param_groups]
    for index, group, planned in work:
        for key, params in planned.items():
            states = list(map(state.__getitem__, params))
            bucket = cache.get((index, key))
            if bucket is None or not bucket.holds(params, states, group["momentum"] != 0.0):
                bucket = cache[(index, key)] = FlatBucket(params, states, key[0], key[1])
            by_kind[key[2:]].append((index, bucket, states))  # (dtype, device)
            used[index].append(bucket)
    native = True
    for kind, entries in by_kind.items():
        device = kind[1]
        if not batched_on(device):
            for index in dict.fromkeys(i for i, _, _ in entries):
                native &= _step(param_groups[index],
                                [(b, sts) for i, b, sts in entries if i == index])
            continue
        native = False
        transfer = _transfer(cache, kind, [b for _, b, _ in entries])
        transfer.copy_in()
        parts = {index: _part(param_groups[index], [(b, sts) for i, b, sts in entries
                                                    if i == index])
                 for index in dict.fromkeys(i for i, _, _ in entries)}
        fused = [i for i in parts if param_groups[i]["fused"]]
        for index in fused if fused and fused_on(device) else []:
            _fused_step(cache, parts, index)
        if parts:
            step_together(list(parts.values()))
        transfer.copy_out()
    return used if native else None


def _fused_step(cache: dict[Any, Any], parts: dict[int, Part], index: int) -> None:
    """Group ``index``'s buckets by one fused kernel each (:mod:`.triton_update`), taken out of
    ``parts``; where the kernels cannot be compiled, they stay in ``parts`` for the eager
    step, from now on (one warning)."""
    if cache.get("no kernels"):
        return
    part = parts[index]
    try:
        fused_step(part.buckets, part.states, part.masks, part.lams, **part.hp)
    except KernelUnavailable as e:
        cache["no kernels"] = True
        log.warning("fused=True: the Triton kernels could not be compiled here (%s); the "
                    "buckets take the eager step", e)
        return
    del parts[index]


def _transfer(cache: dict[Any, Any], kind: tuple[Any, ...], buckets: list[FlatBucket],
              ) -> Transfer:
    """The copies of ``buckets`` (all of one ``kind``: dtype and device), kept while they are
    the same buckets."""
    held = cache.get(("transfer", kind))
    if held is None or not held.serves(buckets):
        held = cache[("transfer", kind)] = Transfer(buckets)
    return held


def _part(group: dict[str, Any], held: list[tuple[FlatBucket, list[Any]]]) -> Part:
    """``group``'s share of the step: its buckets ``held`` (with their tensors' states), their
    masks and thresholds, and its hyper-parameters (a tensor lr as a float)."""
    states = [sts for _, sts in held]
    lam = repeat(group["lambda_"])
    hp = {k: group[k] for k in HYPER}
    if isinstance(hp["lr"], Tensor):
        hp["lr"] = float(hp["lr"])
    return Part(hp, [b for b, _ in held], states,
                [list(map(dict.get, sts, repeat("mask"))) for sts in states],
                [b.lambdas_of(list(map(dict.get, sts, repeat("lambda_"), lam)))
                 for b, sts in held])


def _step(group: dict[str, Any], held: list[tuple[FlatBucket, list[Any]]]) -> bool:
    """One step of the buckets ``held`` (with their tensors' states) of ``group``: the compiled
    CPU kernel (:mod:`.cpu_kernel`) unless the group has ``fused=False`` or a bucket cannot
    take it, else :func:`.flat.flat_step`, bucket after bucket; whether the kernel took it."""
    part = _part(group, held)
    if group["fused"] is not False and all(map(cpu_kernel.usable, part.buckets)):
        cpu_kernel.step_buckets(part.buckets, part.states, part.masks, part.lams, **part.hp)
        return True
    for bucket, states, masks, lam in zip(part.buckets, part.states, part.masks, part.lams):
        # one bucket a call: its copies are built once (a list of buckets would build them
        # at every step)
        flat_step([bucket], [states], [masks], [lam], **part.hp)
    return False
