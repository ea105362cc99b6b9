"""Which of a DessiLBI optimizer's tensors take the flat-bucket step, and that step over all
its parameter groups (:mod:`.flat` holds the buckets and their update).

Both work on the optimizer's cache of buckets (``cache``, a dict kept by the optimizer): the
plan of a group is kept while the same tensors have gradients, a bucket while it still holds
exactly its tensors' state.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from operator import is_
from typing import Any

from torch import Tensor

from .checks import check_grad
from .flat import (
    FlatBucket,
    batched_on,
    bucket_key,
    copy_in,
    copy_out,
    eligible,
    flat_step,
    worth_bucketing,
)

__all__ = ["plan_buckets", "step_buckets"]

Work = list[tuple[int, dict[str, Any], dict[tuple[Any, ...], list[Tensor]]]]


def plan_buckets(cache: dict[Any, Any], index: int, group: dict[str, Any],
                 resolve_penalty: Callable[[str, Tensor], str],
                 ) -> tuple[dict[tuple[Any, ...], list[Tensor]], list[Tensor]]:
    """Group ``index``'s tensors with a gradient split into flat buckets (by
    :func:`.flat.bucket_key`) and the others; kept while the same tensors have gradients (a
    step then only checks which do)."""
    with_grad = [p for p in group["params"] if p.grad is not None]
    held = cache.get(("plan", index))
    if held is not None and held[0] == group["penalty"] and len(held[1]) == len(with_grad) \
            and all(map(is_, held[1], with_grad)):
        return held[2], held[3]
    buckets: dict[tuple[Any, ...], list[Tensor]] = defaultdict(list)
    others = []
    for p in with_grad:
        check_grad(p.grad)  # type: ignore[arg-type]
        pen = resolve_penalty(group["penalty"], p)
        if eligible(p, pen) and p.grad.is_contiguous() \
                and p.grad.dtype == p.dtype:  # type: ignore[union-attr]
            buckets[bucket_key(p, pen)].append(p)
        else:
            others.append(p)
    for key in [k for k, ps in buckets.items() if not worth_bucketing(ps)]:
        others.extend(buckets.pop(key))
    cache[("plan", index)] = (group["penalty"], with_grad, dict(buckets), others)
    return buckets, others


def step_buckets(cache: dict[Any, Any], state: dict[Tensor, dict[str, Any]],
                 param_groups: list[dict[str, Any]], work: Work) -> None:
    """The step of the flat buckets of every group in ``work`` ((index, group, plan)),
    rebuilding a bucket when its tensors or their state changed since the last step. On CUDA
    (:func:`.flat.batched_on`) the buckets of all groups copy their tensors in and out
    together and each group's buckets update together; on the CPU bucket after bucket."""
    by_kind: dict[tuple[Any, ...], list[tuple[int, FlatBucket, list[Any]]]] = defaultdict(list)
    for index, group, planned in work:
        for key, params in planned.items():
            states = [state[p] for p in params]
            bucket = cache.get((index, key))
            if bucket is None or not bucket.holds(params, states, group["momentum"] != 0.0):
                bucket = cache[(index, key)] = FlatBucket(params, states, key[0], key[1])
            by_kind[key[2:]].append((index, bucket, states))  # (dtype, device)
    for (_, device), entries in by_kind.items():
        if not batched_on(device):
            for index, bucket, states in entries:
                _step(param_groups[index], [(bucket, states)], False)
            continue
        buckets = [b for _, b, _ in entries]
        copy_in(buckets)
        for index in dict.fromkeys(i for i, _, _ in entries):
            _step(param_groups[index], [(b, sts) for i, b, sts in entries if i == index],
                  True, copies=False)
        copy_out(buckets)


def _step(group: dict[str, Any], held: list[tuple[FlatBucket, list[Any]]], batched: bool,
          copies: bool = True) -> None:
    """One :func:`.flat.flat_step` over the buckets ``held`` (with their tensors' states) of
    ``group``."""
    states = [sts for _, sts in held]
    lr = group["lr"]
    flat_step(
        [b for b, _ in held], states,
        [[st.get("mask") for st in sts] for sts in states],  # type: ignore[misc]
        [b.lambdas_of([st.get("lambda_", group["lambda_"]) for st in sts]) for b, sts in held],
        lr=float(lr) if isinstance(lr, Tensor) else lr, kappa=group["kappa"], nu=group["nu"],
        group_norm=group["group_norm"], momentum=group["momentum"],
        dampening=group["dampening"], nesterov=group["nesterov"],
        weight_decay=group["weight_decay"], maximize=group["maximize"], pull=group["pull"],
        batched=batched, copies=copies)
