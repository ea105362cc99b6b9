r"""Flat buckets: the default step as a few large operations instead of a few per tensor.

A DessiLBI step on a model of many small tensors (ResNet-56: 170 tensors, most under 40 000
entries) is bound by the cost of launching operations, not by memory: the per-tensor loop runs
about ten operations per tensor, SGD's multi-tensor step three per list. Here the tensors of one
*bucket* (same parameter group, penalty, dtype, device and row length K) keep V and the
momentum buffer in one ``(R, K)`` buffer each, one row per filter / neuron (R rows in all); the
optimizer state holds views into them, so ``state["V"]`` and ``state["momentum_buffer"]`` stay
per-parameter tensors for every reader. The parameters themselves live in the bucket's memory
(:mod:`.arena`: each keeps a storage of its own), so a step copies in the gradients only
(one ``torch._foreach_copy_``) and runs the update of :mod:`.optim` on the whole buffer, with
the filter norms of V as one row reduction (a bucket whose parameters cannot be adopted also
copies the weights in and back):

.. math::
    G &= [g_1; \dots; g_n], \quad W = [w_1; \dots; w_n] \\
    B &\leftarrow m B + (1 - \text{dampening}) G, \quad
    D = W - κ \operatorname{prox}_{λ}(V) \\
    V &\leftarrow V + \frac{α}{ν} D, \quad
    W \leftarrow W - ακ B - \frac{ακ}{ν} D \odot P

(P = 1, or 1[Γ = 0] per unit with ``pull="outside"``.)

Per-tensor thresholds (``state["lambda_"]``, set by :class:`~dessilbi.core.target.SparsityTarget`)
become a column of per-row thresholds, fixed masks a mask of the buffer's shape. A bucket is
rebuilt (the state copied into new buffers) whenever its tensors change: a parameter getting
its first gradient, ``load_state_dict`` replacing the state, a mask set or lifted.

On CUDA the buckets of all groups also update together, one multi-tensor operation per stage
for all of them (:func:`batched_on`, :mod:`.together`), so that a step launches a number of
operations that grows with the number of buckets only through their filter norms and W − Γ.
This is the eager bucket step; the compiled ones replace its update with one pass per bucket
(the CPU's default where a C compiler is: :mod:`.cpu_kernel`; CUDA with ``fused=True``:
:mod:`.triton_update`).

Only tensors this module knows how to lay out take part (:func:`eligible`); the others, and
every tensor of a group that asks for ``foreach`` or ``fused``, take the per-tensor or
multi-tensor path. Large tensors gain nothing (their operations are memory-bound, and the
gathered copies cost memory passes), so a tensor above :data:`MAX_NUMEL` entries stays out,
and so does one alone in its bucket above :data:`SOLO_NUMEL` (:func:`worth_bucketing`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import repeat
from operator import is_
from typing import Any

import torch
from torch import Tensor

from .arena import adopt, adoptable
from .kernels import plain
from .transfer import Transfer

__all__ = ["FlatBucket", "MAX_NUMEL", "MAX_NUMEL_CUDA", "SOLO_NUMEL", "bucket_key", "eligible",
           "batched_on", "flat_step", "gap_of", "gather", "group_shrink", "start_buffers",
           "update_one", "worth_bucketing", "write_back"]

MAX_NUMEL = 1 << 16  # entries (256 KB of float32): above, an operation's memory traffic
# outweighs its launch cost, and the gather copies would only add passes (docs/training.md)
# on CUDA a launch costs as much as a pass over megabytes (4.8 TB/s), so tensors far larger
# than on CPU gain from sharing a bucket's kernels (H200 measurements: docs/cuda.md)
MAX_NUMEL_CUDA = 1 << 22
FLAT_PENALTIES = ("group", "lasso", "none")  # the layouts this module knows
SOLO_NUMEL = 1 << 14  # entries: a bucket of one larger tensor is left to the per-tensor loop


def eligible(p: Tensor, penalty: str, native: bool = False) -> bool:
    """Whether ``p`` can live in a flat bucket: a plain tensor (not a subclass such as FSDP's
    ``DTensor``, whose gradient a buffer cannot gather), dense, contiguous, real, on the CPU or
    a CUDA device, and not too large for that device (:data:`MAX_NUMEL`,
    :data:`MAX_NUMEL_CUDA`), unless it is a float32 CPU tensor whose group takes the compiled
    CPU kernel (``native``: it reads the gradients in place, so a bucket costs no copies)."""
    limit = {"cpu": MAX_NUMEL, "cuda": MAX_NUMEL_CUDA}.get(p.device.type, 0)
    if native and p.device.type == "cpu" and p.dtype == torch.float32:
        limit = p.numel()
    return (plain(p) and penalty in FLAT_PENALTIES
            and p.layout == torch.strided and p.is_contiguous() and p.is_floating_point()
            and 0 < p.numel() <= limit)


def worth_bucketing(params: Sequence[Tensor], native: bool = False) -> bool:
    """Whether the tensors of one bucket are better stepped together than one by one.

    A bucket saves launches only when it holds several tensors; one tensor alone gains nothing
    and pays the gather copies, which outweigh the per-tensor loop's overhead above
    :data:`SOLO_NUMEL` entries (LeNet-3's 100×300 layer: the step of the whole model 0.60 ms
    one by one against 0.71 ms bucketed; ResNet-56 unchanged, docs/training.md). Where the
    buckets update together (:func:`batched_on`: CUDA) a bucket costs one operation more (its
    row norms), fewer than any tensor's step of its own, so every tensor is worth one there
    (operations a Conv-4 step dispatches: 171 with its lone large tensors outside the buckets,
    40 inside). A group that takes the compiled CPU kernel (``native``) reads its gradients in
    place, so a bucket of one tensor costs nothing there either.
    """
    return (len(params) > 1 or params[0].numel() <= SOLO_NUMEL or batched_on(params[0].device)
            or native and params[0].dtype == torch.float32)


def bucket_key(p: Tensor, penalty: str) -> tuple[str, int, torch.dtype, torch.device]:
    """(penalty, row length K, dtype, device): a bucket's tensors are viewed as (rows, K).

    Penalised tensors keep one row per filter / neuron (their unit); unpenalised ones are one
    long row of K = 1 entries each, so that all of them share one bucket.
    """
    k = 1 if penalty == "none" or p.ndim == 0 else p.numel() // p.shape[0]
    return penalty, k, p.dtype, p.device


class FlatBucket:
    """V and the momentum buffer of a bucket's tensors in one ``(R, K)`` buffer each, with the
    gather buffers of the step; the optimizer state holds views into them."""

    def __init__(self, params: Sequence[Tensor], states: Sequence[dict[str, Any]],
                 penalty: str, k: int) -> None:
        p0 = params[0]
        self.params = list(params)
        self.penalty, self.k = penalty, k
        self.rows = [p.numel() // k for p in params]
        n_rows = sum(self.rows)
        like = dict(dtype=p0.dtype, device=p0.device)
        self._grads: Tensor | None = None  # the gathered gradients: made on first use
        self._grad_views: list[Tensor | None] = []
        # the parameters move into the bucket's memory where they can (module docstring)
        arena = adopt(params, k) if all(adoptable(p) for p in params) else None
        self.adopted = arena is not None
        self.weights = arena if arena is not None else torch.empty(n_rows, k, **like)
        self.gap: Tensor | None = None  # W − Γ: the gradient buffer's memory where it is free
        self._transfer: Transfer | None = None
        self.v = self._adopt(states, "V") if penalty != "none" else None
        self.buf = self._adopt(states, "momentum_buffer")
        self.v_views = self._views(self.v)
        self.buf_views = self._views(self.buf)
        self.weight_views = self._views(self.weights)
        self.pointers = [p.data_ptr() for p in params]
        # what the state's momentum buffers are since the first step: "views" / "none"
        self.published = ""
        # a tensor whose buffer was not in the state starts it this step (b ← g)
        self.starting = [st.get("momentum_buffer") is None for st in states]
        for st, view in zip(states, self.v_views):
            if view is not None:
                st["V"] = view
        self._mask_key: tuple[int, ...] | None = None
        self.mask: Tensor | None = None
        self._lambda_key: tuple[float, ...] | None = None
        self.lambdas: Tensor | float = 0.0
        # what a compiled kernel keeps for this bucket (.triton_update, .cpu_kernel)
        self.extras: dict[str, Any] = {}

    @property
    def grads(self) -> Tensor:
        """The gradients gathered into one ``(R, K)`` buffer, made on first use (the
        compiled CPU kernel reads them in place and needs it only in a rare step)."""
        if self._grads is None:
            self._grads = torch.empty_like(self.weights)
            self._grad_views = self._views(self._grads)
        return self._grads

    @property
    def grad_views(self) -> list[Tensor | None]:
        """:attr:`grads`, one view per parameter (made with it)."""
        _ = self.grads
        return self._grad_views

    def _adopt(self, states: Sequence[dict[str, Any]], key: str) -> Tensor:
        """A zero buffer holding the state's existing tensors under ``key``, row by row."""
        out = torch.zeros(sum(self.rows), self.k, dtype=self.params[0].dtype,
                          device=self.params[0].device)
        for rows, st in zip(self._slices(out), states):
            held = st.get(key)
            if held is not None:
                rows.copy_(held.reshape(rows.shape))
        return out

    def _slices(self, flat: Tensor) -> list[Tensor]:
        return list(flat.split(self.rows))

    def _views(self, flat: Tensor | None) -> list[Tensor | None]:
        if flat is None:
            return [None] * len(self.params)
        return [rows.view(p.shape) for rows, p in zip(self._slices(flat), self.params)]

    def holds(self, params: Sequence[Tensor], states: Sequence[dict[str, Any]],
              use_momentum: bool) -> bool:
        """Whether this bucket still is the state of exactly ``params`` (same tensors, same
        order, the state's V and momentum buffers still views into its buffers)."""
        # whole-list comparisons through map (no Python frame per tensor): this runs every
        # step, over every tensor of the bucket, and on CUDA the host's time is the step's
        if len(params) != len(self.params) or not all(map(is_, params, self.params)) or \
                list(map(Tensor.data_ptr, params)) != self.pointers:
            return False
        if self.v is not None and \
                not all(map(is_, map(dict.get, states, repeat("V")), self.v_views)):
            return False
        if not use_momentum:
            return True
        bufs = list(map(dict.get, states, repeat("momentum_buffer")))
        if all(map(is_, bufs, self.buf_views)):
            return True
        return all(b is view or (b is None and start)
                   for b, view, start in zip(bufs, self.buf_views, self.starting))

    def transfer(self) -> Transfer:
        """The copies in and out of this bucket alone (built once)."""
        if self._transfer is None:
            self._transfer = Transfer([self])
        return self._transfer

    def gap_buffer(self) -> Tensor:
        """A buffer for W − Γ when the gradient buffer is still in use (Nesterov, or no
        momentum: the step direction is the gradient itself)."""
        if self.gap is None:
            self.gap = torch.empty_like(self.weights)
        return self.gap

    # ----------------------------------------------------------------- per-step inputs
    def mask_of(self, masks: Sequence[Tensor | None]) -> Tensor | None:
        """The fixed masks as one ``(R, K)`` buffer (kept while the same masks are set)."""
        key = tuple(map(id, masks))
        if key != self._mask_key:
            self._mask_key = key
            self.mask = None
            if any(m is not None for m in masks):
                self.mask = torch.cat([
                    (torch.ones((), dtype=torch.bool, device=p.device) if m is None else m)
                    .expand(p.shape).reshape(-1, self.k) for p, m in zip(self.params, masks)
                ]).to(self.weights.dtype)
        return self.mask

    def lambdas_of(self, values: Sequence[float]) -> Tensor | float:
        """One threshold, or a column of per-row thresholds when the tensors have their own."""
        key = tuple(map(float, values))
        if key != self._lambda_key:
            self._lambda_key = key
            if len(set(key)) == 1:
                self.lambdas = key[0]
            else:
                per_tensor = torch.tensor(key, dtype=self.weights.dtype,
                                          device=self.weights.device)
                counts = torch.tensor(self.rows, device=self.weights.device)
                self.lambdas = per_tensor.repeat_interleave(counts).unsqueeze(1)
        return self.lambdas


def batched_on(device: torch.device) -> bool:
    """Whether the buckets on ``device`` update together, one multi-tensor operation per stage
    for all of them, or one bucket after another.

    Together on CUDA (:mod:`.together`), where launching an operation costs more than its
    pass over memory: on ResNet-56 a step dispatches 25 operations instead of 96 (H200
    measurements of the bucket by bucket step: docs/cuda.md). One after another on the CPU,
    where a bucket's buffers stay in the cache from one stage to the next: a first version
    that ran the CPU buckets stage by stage measured 1.29–1.43× SGD's step on ResNet-56,
    against 1.20–1.27× bucket by bucket (three alternating runs each).
    """
    return device.type == "cuda"


def flat_step(buckets: Sequence[FlatBucket], states: Sequence[Sequence[dict[str, Any]]],
              masks: Sequence[Sequence[Tensor | None]], lams: Sequence[Tensor | float], *,
              lr: float, kappa: float, nu: float, group_norm: str, momentum: float,
              dampening: float, nesterov: bool, weight_decay: float, maximize: bool,
              pull: str = "all") -> None:
    """One DessiLBI step of every tensor of ``buckets`` (one parameter group's, one dtype and
    device; the formula: the module docstring), bucket after bucket. Per bucket: its tensors'
    states and masks, and its threshold or column of per-row ones
    (:meth:`FlatBucket.lambdas_of`). The copies in and out are one multi-tensor operation for
    all the buckets; the numbers are those of the per-tensor loop. Where buckets update
    together (:func:`batched_on`), :func:`.together.step_together` takes their place.
    """
    transfer = buckets[0].transfer() if len(buckets) == 1 else Transfer(buckets)
    transfer.copy_in()
    held = gather(buckets, masks, momentum=momentum, dampening=dampening,
                  weight_decay=weight_decay, maximize=maximize)
    for bucket, lam in zip(buckets, lams):
        update_one(bucket, lam, lr=lr, kappa=kappa, nu=nu, group_norm=group_norm,
                   momentum=momentum, dampening=dampening, nesterov=nesterov, pull=pull)
    write_back(buckets, states, held, momentum)
    transfer.copy_out()


def update_one(bucket: FlatBucket, lam: Tensor | float, *, lr: float, kappa: float, nu: float,
               group_norm: str, momentum: float, dampening: float, nesterov: bool,
               pull: str) -> None:
    """The update of one bucket whose gradient is gathered, a few operations on its buffers."""
    g, w = bucket.grads, bucket.weights
    d = g
    if momentum != 0.0:
        if dampening == 0.0:  # b ← g + m b in one pass
            torch.add(g, bucket.buf, alpha=momentum, out=bucket.buf)
        else:
            bucket.buf.mul_(momentum).add_(g, alpha=1.0 - dampening)
        d = g.add_(bucket.buf, alpha=momentum) if nesterov else bucket.buf
    step = lr * kappa
    if bucket.penalty != "none" and nu != math.inf:
        gap, idle = gap_of(bucket, lam, kappa, group_norm,
                           out=g if d is not g else bucket.gap_buffer(), idle=pull == "outside")
        bucket.v.add_(gap, alpha=lr / nu)  # type: ignore[union-attr]
        if idle is None:
            w.add_(gap, alpha=-step / nu)
        else:  # the pull on the units outside supp(Γ) only
            w.addcmul_(gap, idle, value=-step / nu)
    w.add_(d, alpha=-step)


def gather(buckets: Sequence[FlatBucket], masks: Sequence[Sequence[Tensor | None]], *,
           momentum: float, dampening: float, weight_decay: float,
           maximize: bool) -> list[Tensor | None]:
    """Apply sign, mask and weight decay to the copied-in gradients and prepare the first-step
    momentum rows; returns each bucket's mask."""
    gs = [b.grads for b in buckets]
    if maximize:
        torch._foreach_neg_(gs)
    held = [b.mask_of(m) for b, m in zip(buckets, masks)]
    for g, mask in zip(gs, held):
        if mask is not None:
            g.mul_(mask)
    if weight_decay != 0.0:
        torch._foreach_add_(gs, [b.weights for b in buckets], alpha=weight_decay)
    for b in buckets:
        if momentum != 0.0 and any(b.starting):
            start_buffers(b, b.grads, momentum, dampening)
    return held


def write_back(buckets: Sequence[FlatBucket], states: Sequence[Sequence[dict[str, Any]]],
               masks: Sequence[Tensor | None], momentum: float) -> None:
    """Keep masked entries of the updated weights at zero and, after a bucket's first step,
    put its momentum rows into the optimizer state."""
    for b, mask in zip(buckets, masks):
        if mask is not None:
            b.weights.mul_(mask)
    published = "views" if momentum != 0.0 else "none"
    for b, sts in zip(buckets, states):
        if b.published != published:  # after the first step, and if momentum is switched
            for st, view in zip(sts, b.buf_views):
                st["momentum_buffer"] = view if momentum != 0.0 else None
            b.published = published
        if any(b.starting):
            b.starting = [False] * len(b.params)


def start_buffers(bucket: FlatBucket, g: Tensor | None, momentum: float,
                  dampening: float) -> None:
    """b ← g on a tensor's first step: m·b + (1 − d)·g gives g when its rows start at
    d·g / m (zero without dampening, when ``g`` is not read). ``g`` is the gathered gradient
    (sign, mask and weight decay applied, as the per-tensor step's b ← g)."""
    gathered = repeat(None) if dampening == 0.0 else g.split(bucket.rows)  # type: ignore[union-attr]
    for start, rows, starting in zip(bucket.buf.split(bucket.rows),  # type: ignore[union-attr]
                                     gathered, bucket.starting):
        if starting:
            if rows is None:
                start.zero_()
            else:
                start.copy_(rows).mul_(dampening / momentum)


def group_shrink(v: Tensor, lam: Tensor | float, group_norm: str) -> Tensor:
    """max(0, 1 − λ / ‖V_r‖) of every row r of ``v``, as a column (the group prox of V is this
    column times V), computed as :func:`.prox.group_scale` does."""
    norms = torch.linalg.vector_norm(v, dim=1, keepdim=True)
    if group_norm == "rms":
        norms = norms / math.sqrt(v.shape[1])
    tiny = torch.finfo(norms.dtype).tiny
    return (norms - lam).clamp_min_(0.0).div_(norms.clamp_min(tiny))


def gap_of(bucket: FlatBucket, lam: Tensor | float, kappa: float, group_norm: str,
           out: Tensor, idle: bool = False) -> tuple[Tensor, Tensor | None]:
    """D = W − κ prox_λ(V) into ``out`` (Γ is never materialised) and, with ``idle``,
    1[Γ = 0] per row (``group``) or entry (``lasso``)."""
    v, w = bucket.v, bucket.weights
    assert v is not None
    if bucket.penalty == "group":
        shrink = group_shrink(v, lam, group_norm)
        outside = (shrink == 0).to(w.dtype) if idle else None
        # W − κ (V·shrink), rounded as the per-tensor loop rounds it
        return torch.addcmul(w, v, shrink, value=-kappa, out=out), outside
    # lasso: W − κ (V − clamp(V, −λ, λ)) = W + κ (clamp(V, −λ, λ) − V), rounded as the
    # per-tensor loop's W − κ Γ (negating a difference or a product is exact)
    outside = (v.abs() <= lam).to(w.dtype) if idle else None
    torch.clamp(v, min=-lam, max=lam, out=out)  # type: ignore[arg-type]
    return torch.add(w, out.sub_(v), alpha=kappa, out=out), outside
