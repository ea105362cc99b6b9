r"""One Triton kernel per flat bucket: the update of :mod:`.flat` with every entry of G, B, W
and V read once and B, V, W written once (``DessiLBI(fused=True)`` on CUDA).

Per row r (a filter / neuron) of a ``group`` bucket, one program computes

.. math::
    B_r &\leftarrow m B_r + (1 - \text{dampening}) G_r, \qquad
    s_r = \frac{\max(0, ‖V_r‖ - λ_r)}{‖V_r‖}, \qquad D_r = W_r - κ s_r V_r \\
    V_r &\leftarrow V_r + \frac{α}{ν} D_r, \qquad
    W_r \leftarrow W_r - \frac{ακ}{ν} D_r P_r - ακ B_r

(P_r = 1, or 1[s_r = 0] with ``pull="outside"``; ‖V_r‖ / √K with ``group_norm="rms"``; B_r
becomes G_r + m B_r in the step with Nesterov, G_r without momentum). A ``lasso`` bucket takes
blocks of entries with Γ = κ (V − clamp(V, −λ, λ)); an unpenalised one the momentum step only.
G is gathered in the kernel as :func:`.flat.gather` does it (−G to maximise, times the fixed
mask, plus the weight decay's δ W), and W kept at zero outside the mask: in the
select-then-train phase of :class:`~dessilbi.SparsityTarget` every bucket has a mask, which the
eager step applies in two operations of three passes each.

Why: the eager step of a bucket is a sequence of operations, each a pass over the bucket's
memory: VGG16-BN's step on an H200 made about 20 passes over the parameter bytes against
SGD-foreach's 8, and took 0.365 ms of GPU time a step against SGD's 0.128 (docs/cuda.md, run 6).
This kernel makes 7 (4 reads, 3 writes; the row norm's second read of V hits the cache), 8
with a mask. The
numbers differ from the eager step's in rounding only (float32 arithmetic in registers,
another summation order for the norms): the tests check them against it on CPU tensors, with
Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is imported). Hyper-parameters
are kernel arguments, not constants, so learning-rate schedules never recompile.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .flat import FlatBucket, gather, write_back

__all__ = ["KernelUnavailable", "Launch", "available", "fused_on", "launch_of", "row_block",
           "step_buckets"]

ENTRY_BLOCK = 1024  # entries per program of the element-wise kernel
MAX_ROW_BLOCK = 4096  # a longer row is swept in blocks of this many entries (twice)


@functools.cache
def available() -> bool:
    """Whether Triton can be imported (it comes with torch's CUDA wheels, not the CPU ones;
    looked up once: the finders' search is not for every step)."""
    return importlib.util.find_spec("triton") is not None


def fused_on(device: torch.device) -> bool:
    """Whether ``fused=True`` steps the buckets on ``device`` with these kernels: on CUDA,
    where Triton is (elsewhere the eager bucket step stays)."""
    return device.type == "cuda" and available()


def row_block(k: int) -> int:
    """The block of a row program: K rounded up to a power of two (at least 16, at most
    :data:`MAX_ROW_BLOCK`), so that a row is one block up to 4,096 entries."""
    return min(max(16, 1 << (k - 1).bit_length()), MAX_ROW_BLOCK)


class KernelUnavailable(RuntimeError):
    """The kernels could not be compiled for this device (:func:`step_buckets` raises it
    before it has changed anything, so the caller can take the eager step instead)."""


class Launch(NamedTuple):
    """One kernel call: the kernel, its grid, and its arguments."""

    kernel: Any
    grid: tuple[int]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def variant(self) -> tuple[Any, ...]:
        """What Triton compiles a binary for, for one bucket: the kernel, the dtypes of its
        tensors and its compile-time constants (the upper-case arguments)."""
        return (self.kernel, *(a.dtype for a in self.args if isinstance(a, Tensor)),
                *sorted((k, v) for k, v in self.kwargs.items() if k.isupper()))


def step_buckets(buckets: Sequence[FlatBucket], states: Sequence[Sequence[dict[str, Any]]],
                 masks: Sequence[Sequence[Tensor | None]], lams: Sequence[Tensor | float], *,
                 weight_decay: float, maximize: bool, **hp: Any) -> None:
    """The step of one group's ``buckets`` (gradients copied in), one kernel per bucket with
    the gather and the masking of W inside it. A bucket in which some tensor takes its first
    step gathers first (:func:`.flat.gather`: its new momentum rows are set from the
    gathered gradient); the kernel then only masks. Every kernel is compiled before anything
    is written: where one cannot be, :class:`KernelUnavailable` leaves the step to the
    caller."""
    calls = []
    for bucket, tensor_masks, lam in zip(buckets, masks, lams):
        starting = hp["momentum"] != 0.0 and any(bucket.starting)
        gathers = {} if starting else dict(weight_decay=weight_decay, maximize=maximize)
        calls.append((bucket, tensor_masks, starting,
                      launch_of(bucket, lam, mask=bucket.mask_of(tensor_masks), **gathers, **hp)))
    for bucket, _, _, launch in calls:
        _compile(bucket, launch)
    for bucket, tensor_masks, starting, launch in calls:
        if starting:
            gather([bucket], [tensor_masks], momentum=hp["momentum"], dampening=hp["dampening"],
                   weight_decay=weight_decay, maximize=maximize)
        launch.kernel[launch.grid](*launch.args, **launch.kwargs)
    write_back(buckets, states, [None] * len(buckets), hp["momentum"])


def _compile(bucket: FlatBucket, launch: Launch) -> None:
    """Compile ``launch``'s kernel variant once per bucket (Triton caches the binary; this
    only spares the check at every step)."""
    compiled = bucket.extras.setdefault("variants", set())
    variant = launch.variant()
    if variant in compiled:
        return
    try:
        launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
    except Exception as e:  # noqa: BLE001 (a compiler's failure, of whatever kind)
        raise KernelUnavailable(f"{type(e).__name__}: {e}") from e
    compiled.add(variant)


def launch_of(bucket: FlatBucket, lam: Tensor | float, *, lr: float, kappa: float,
              nu: float, group_norm: str, momentum: float, dampening: float, nesterov: bool,
              pull: str, mask: Tensor | None = None, weight_decay: float = 0.0,
              maximize: bool = False) -> Launch:
    """The kernel call that updates one bucket (the formula: the module docstring): the
    gradient gathered in the kernel (sign, ``mask``, weight decay) and W masked after."""
    from . import _triton_kernels as ks  # Triton is imported only where it is used

    g, w = bucket.grads, bucket.weights
    coupled = bucket.penalty != "none" and nu != math.inf
    column = isinstance(lam, Tensor)
    rows, k = w.shape
    args = (g, bucket.buf if momentum != 0.0 else g, w, bucket.v if coupled else g,
            g if mask is None else mask, lam if column else g, 0.0 if column else float(lam))
    kwargs: dict[str, Any] = dict(
        momentum=momentum, dampen=1.0 - dampening, decay=weight_decay,
        v_rate=lr / nu if coupled else 0.0, pull_rate=lr * kappa / nu if coupled else 0.0,
        step=lr * kappa, kappa=kappa, SIGNED=maximize, MASKED=mask is not None,
        DECAYED=weight_decay != 0.0, MOMENTUM=momentum != 0.0, DAMPENED=dampening != 0.0,
        NESTEROV=nesterov, LAM_COLUMN=column, OUTSIDE=pull == "outside")
    if coupled and bucket.penalty == "group":
        kwargs.update(norm_scale=1.0 / math.sqrt(k) if group_norm == "rms" else 1.0,
                      tiny=torch.finfo(torch.float32).tiny, BLOCK=row_block(k))
        return Launch(ks.group_rows, (rows,), (*args, k), kwargs)
    n = w.numel()
    kwargs.update(LASSO=coupled, BLOCK=ENTRY_BLOCK)
    return Launch(ks.entries, (triton_cdiv(n, ENTRY_BLOCK),), (*args, k, n), kwargs)


def triton_cdiv(n: int, block: int) -> int:
    """The number of programs that cover ``n`` entries in blocks of ``block``."""
    return -(-n // block)
