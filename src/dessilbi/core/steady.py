"""The CPU step replayed: when the last step of a DessiLBI optimizer sent every gradient to the
compiled kernel (:mod:`.cpu_kernel`), the next one checks that nothing it relied on changed and
calls the kernel again, without planning the buckets anew.

Why: on a small network the kernel's work is a few tens of microseconds, and the general step
(plan the groups, find the buckets, sort them by kind, gather each group's hyper-parameters
into dicts) cost about as much again in Python: on LeNet-3 (batch 128, one thread) 68 µs a
step around the kernel, torch's optimizer wrapper included, against 45 µs replayed and 125 µs
for SGD-foreach's whole step (docs/training.md).

A replay holds while, for every parameter group, the group and its list of tensors are the same
objects, the same tensors have gradients (each contiguous float32), ``penalty``, ``fused`` and
``foreach`` are unchanged, and every bucket still holds its tensors' state (the same storage,
V and momentum buffer, :meth:`.flat.FlatBucket.holds`) and is past its first step. Anything else
(a tensor frozen or unfrozen, ``load_state_dict``, a new group, momentum switched on) sends the
step back to the general path, which builds the replay anew. The hyper-parameters, thresholds
(``lambda_``) and masks are read at every step, as the general path reads them, so schedulers
and :class:`~dessilbi.SparsityTarget` act at once. The result is the general path's, bit for
bit: the same calls with the same arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import is_, is_not
from typing import Any

import torch
from torch import Tensor

from . import cpu_kernel
from .arena import bump_versions
from .flat import FlatBucket
from .transfer import grads_of

__all__ = ["SteadyStep"]

SETTINGS = ("penalty", "fused", "foreach")  # what decides a group's plan

Entry = tuple[FlatBucket, list[dict[str, Any]], list[Tensor]]


class SteadyStep:
    """The replay of a step in which each group's tensors with a gradient were all in float32
    CPU buckets that took the kernel (``buckets``: the groups' buckets, in the order of
    ``param_groups``)."""

    def __init__(self, param_groups: Sequence[dict[str, Any]],
                 buckets: Sequence[Sequence[FlatBucket]]) -> None:
        self.groups = list(param_groups)
        self.records = [
            (tuple(map(group.__getitem__, SETTINGS)), list(group["params"]),
             tuple(map(is_not, map(grads_of, group["params"]), repeat(None))), list(held))
            for group, held in zip(param_groups, buckets)]
        self.params = [p for held in buckets for b in held for p in b.params]

    @classmethod
    def after(cls, param_groups: Sequence[dict[str, Any]], state: dict[Tensor, dict[str, Any]],
              buckets: Sequence[Sequence[FlatBucket]]) -> SteadyStep | None:
        """The replay of a step just made in which every bucket took the kernel, or ``None``
        where the next step could not replay it (a gradient the kernel cannot read in place,
        a bucket still to take its first step)."""
        steady = cls(param_groups, buckets)
        return steady if steady._inputs(param_groups, state) is not None else None

    def __call__(self, param_groups: Sequence[dict[str, Any]],
                 state: dict[Tensor, dict[str, Any]]) -> bool:
        """The step, if it still holds; ``False`` (nothing written) if not."""
        inputs = self._inputs(param_groups, state)
        if inputs is None:
            return False
        lib = cpu_kernel.library()
        threads = torch.get_num_threads()
        for group, entries in inputs:
            lr = float(group["lr"])  # a tensor lr as a float
            nu, momentum = group["nu"], group["momentum"]
            rates = cpu_kernel.rates_of(lr, group["kappa"], nu, momentum, group["dampening"])
            sign = -1.0 if group["maximize"] else 1.0
            group_lambda = repeat(group["lambda_"])
            for bucket, states, grads in entries:
                mask = bucket.mask_of(list(map(dict.get, states, repeat("mask"))))
                lam = bucket.lambdas_of(list(map(dict.get, states, repeat("lambda_"),
                                                 group_lambda)))
                cpu_kernel.call(lib, bucket, grads, mask, lam, sign, group["weight_decay"],
                                rates, group_norm=group["group_norm"], momentum=momentum,
                                coupled=nu != float("inf"), nesterov=group["nesterov"],
                                pull=group["pull"], threads=threads)
        bump_versions(self.params)
        return True

    def _inputs(self, param_groups: Sequence[dict[str, Any]],
                state: dict[Tensor, dict[str, Any]],
                ) -> list[tuple[dict[str, Any], list[Entry]]] | None:
        """Each group with its buckets, their tensors' states and gradients, or ``None`` if
        the replay no longer holds."""
        if torch.compiler.is_compiling() or len(param_groups) != len(self.groups) \
                or not all(map(is_, param_groups, self.groups)):
            return None
        out = []
        for group, (settings, params, has_grad, held) in zip(param_groups, self.records):
            now = group["params"]
            if tuple(map(group.__getitem__, SETTINGS)) != settings or len(now) != len(params) \
                    or not all(map(is_, now, params)) \
                    or tuple(map(is_not, map(grads_of, now), repeat(None))) != has_grad:
                return None
            use_momentum = group["momentum"] != 0.0
            published = "views" if use_momentum else "none"
            entries = []
            for bucket in held:
                states = list(map(state.__getitem__, bucket.params))
                grads = list(map(grads_of, bucket.params))
                if bucket.published != published or any(bucket.starting) \
                        or not bucket.holds(bucket.params, states, use_momentum) \
                        or not cpu_kernel.in_place(grads):
                    return None
                entries.append((bucket, states, grads))
            out.append((group, entries))
        return out
