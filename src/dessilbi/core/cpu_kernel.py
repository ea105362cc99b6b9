r"""The update of a flat bucket on the CPU as one pass of compiled C (float32 buckets).

Per row r (a filter / neuron) of a ``group`` bucket, one loop over V_r for its norm and one over
the entries for the rest, with G read where autograd left it (no copy into the bucket):

.. math::
    G_r &\leftarrow σ G_r \odot M_r + δ W_r, \qquad
    B_r \leftarrow m B_r + (1 - \text{dampening}) G_r, \qquad
    s_r = \frac{\max(0, ‖V_r‖ - λ_r)}{‖V_r‖} \\
    D_r &= W_r - κ s_r V_r, \qquad V_r \leftarrow V_r + \frac{α}{ν} D_r, \qquad
    W_r \leftarrow \left(W_r - \frac{ακ}{ν} D_r P_r - ακ B_r\right) \odot M_r

(σ = −1 to maximise, M the fixed mask, δ the weight decay; P_r = 1, or 1[s_r = 0] with
``pull="outside"``; B_r becomes G_r + m B_r in the step with Nesterov, G_r without momentum;
``lasso`` buckets: Γ = κ (V − clamp(V, −λ, λ)) per entry; unpenalised ones: the momentum step).
Every entry of G, B, W and V is read once and B, V, W written once: 7 passes over the bucket,
where the eager bucket step makes about 16 and SGD-foreach 8.

Why C: torch's operations make a pass each, and Inductor's CPU code for this update either
fails to compile (a reduction and a mutation of the same buffer in one graph, torch 2.14) or
makes two passes with a buffer allocated per call (docs/training.md). The source
(``cpu_kernel.c``, about 150 lines, no torch headers) is compiled once per machine by the
system's C compiler in well under a second and kept in ``$DESSILBI_CACHE_DIR`` (default
``~/.cache/dessilbi``) under a name that hashes the source, the compiler and the CPU's
instruction sets, so a cache shared between machines never runs code built for another CPU.
Where no compiler works, :func:`library` is ``None`` and the eager step stays.
``DESSILBI_CPU_KERNEL=0`` turns it off.

The numbers differ from the eager step's in rounding only: the row norm sums in another
order, and ``addcmul`` rounds (κ V) s where this rounds κ (V s). Each row is updated by one
thread, so the result does not depend on the number of threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from itertools import accumulate
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import Tensor

from .arena import bump_versions
from .flat import FlatBucket, gather, start_buffers, write_back
from .transfer import grads_of

__all__ = ["available", "call", "in_place", "library", "rates_of", "step_buckets", "usable"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernel.c")
FLOAT32 = torch.float32
dtype_of = attrgetter("dtype")
PENALTIES = {"none": 0, "group": 1, "lasso": 2}
# a bucket takes one thread per this many entries (up to torch's thread count): a thread started
# for a call competes with torch's OpenMP workers, which spin for a while after each parallel
# region; at 65,536 a 2-core machine ran ResNet-56's step at 1.46-1.88x SGD-foreach's, at
# 2^20 (ResNet-56: one thread, VGG16-BN's largest buckets: two) at 0.71-0.84x (README)
ENTRIES_PER_THREAD = 1 << 20
FLAGS = ["-O3", "-fopenmp-simd", "-ffp-contract=off", "-shared", "-fPIC", "-pthread"]
_F, _I, _P = ctypes.c_float, ctypes.c_int64, ctypes.c_void_p
SIGNATURE = [_P, _P, _I, _I, _P, _P, _P, _P, _P, _F, _F, _F, _F, _F, _F, _F, _F, _F, _F,
             ctypes.c_int, ctypes.c_int, ctypes.c_int, _I]


def available() -> bool:
    """Whether the kernel is built and loaded here (built on the first call)."""
    return library() is not None


def usable(bucket: FlatBucket) -> bool:
    """Whether ``bucket`` can take the kernel: float32 on the CPU, holding its parameters."""
    return (bucket.weights.dtype == torch.float32 and bucket.weights.device.type == "cpu"
            and bucket.adopted and available())


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use and cached on disk; ``None`` where it cannot
    be built (no C compiler) or is turned off."""
    if os.environ.get("DESSILBI_CPU_KERNEL", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") \
        or shutil.which("clang")
    if compiler is None:
        log.info("no C compiler found: the CPU buckets take the eager step")
        return None
    try:
        lib = ctypes.CDLL(str(_built(shlex.split(compiler))))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("the CPU kernel could not be built (%s): the buckets take the eager step", e)
        return None
    lib.dessilbi_step.argtypes = SIGNATURE
    lib.dessilbi_step.restype = None
    return lib


def _built(compiler: list[str]) -> Path:
    """The shared library for this source, compiler and CPU, compiled if not yet cached."""
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), version, " ".join(FLAGS),
                                    platform.machine(), _cpu_features()]).encode()).hexdigest()
    cache = Path(os.environ.get("DESSILBI_CACHE_DIR")
                 or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dessilbi")
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"cpu_kernel_{key[:20]}.so"
    with FileLock(str(target) + ".lock", timeout=120):
        if not target.exists():
            _compile(compiler, target)
    return target


def _compile(compiler: list[str], target: Path) -> None:
    """Compile the source into ``target`` (through a temporary file, so a reader never sees a
    half-written library); with the CPU's own instruction sets where the compiler can."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        for arch in (["-march=native"], []):
            done = subprocess.run([*compiler, *FLAGS, *arch, str(SOURCE), "-o", str(out), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(out, target)
                return
        raise subprocess.SubprocessError((done.stderr.strip().splitlines() or ["failed"])[-1])


def _cpu_features() -> str:
    """The CPU's instruction-set flags (Linux), so that ``-march=native`` code is only ever
    loaded on the CPU it was built for; elsewhere the processor's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def step_buckets(buckets: Sequence[FlatBucket], states: Sequence[Sequence[dict[str, Any]]],
                 masks: Sequence[Sequence[Tensor | None]], lams: Sequence[Tensor | float], *,
                 lr: float, kappa: float, nu: float, group_norm: str, momentum: float,
                 dampening: float, nesterov: bool, weight_decay: float, maximize: bool,
                 pull: str) -> None:
    """One step of a group's float32 CPU buckets (:func:`usable`), one kernel call each, the
    gradients read in place. A tensor's first momentum rows start at zero (b ← g); with
    dampening they start from the gathered gradient, so that bucket copies its gradients in
    and gathers them first (:func:`.flat.gather`), as it does for a gradient that is not
    contiguous float32."""
    lib = library()
    assert lib is not None
    threads = torch.get_num_threads()
    coupled = nu != float("inf")
    rates = rates_of(lr, kappa, nu, momentum, dampening)
    for bucket, tensor_masks, lam in zip(buckets, masks, lams):
        mask = bucket.mask_of(tensor_masks)
        grads: list[Tensor] = list(map(grads_of, bucket.params))
        sign, decay = -1.0 if maximize else 1.0, weight_decay
        starting = momentum != 0.0 and any(bucket.starting)
        if starting and dampening == 0.0:  # new momentum rows start at zero: b ← g
            start_buffers(bucket, None, momentum, dampening)
        elif starting or not in_place(grads):
            bucket.transfer().copy_in()
            gather([bucket], [tensor_masks], momentum=momentum, dampening=dampening,
                   weight_decay=weight_decay, maximize=maximize)
            grads, sign, decay = bucket.grad_views, 1.0, 0.0  # type: ignore[assignment]
        call(lib, bucket, grads, mask, lam, sign, decay, rates, group_norm=group_norm,
             momentum=momentum, coupled=coupled, nesterov=nesterov, pull=pull,
             threads=threads)
    bump_versions([p for b in buckets for p in b.params])
    write_back(buckets, states, [None] * len(buckets), momentum)


def in_place(grads: Sequence[Tensor]) -> bool:
    """Whether the kernel can read ``grads`` where they are: contiguous float32."""
    return all(map(Tensor.is_contiguous, grads)) and all(map(FLOAT32.__eq__,
                                                             map(dtype_of, grads)))


def rates_of(lr: float, kappa: float, nu: float, momentum: float,
             dampening: float) -> tuple[float, ...]:
    """The kernel's rates from a group's hyper-parameters: m, 1 − dampening, α/ν, ακ/ν (0
    when the coupling is released, ν = ∞), ακ and κ."""
    coupled = nu != float("inf")
    return (momentum, 1.0 - dampening, lr / nu if coupled else 0.0,
            lr * kappa / nu if coupled else 0.0, lr * kappa, kappa)


def call(lib: ctypes.CDLL, bucket: FlatBucket, grads: Sequence[Tensor], mask: Tensor | None,
         lam: Tensor | float, sign: float, decay: float, rates: tuple[float, ...], *,
         group_norm: str, momentum: float, coupled: bool, nesterov: bool, pull: str,
         threads: int) -> None:
    """One kernel call: ``bucket``'s step with the gradients ``grads`` (one per tensor,
    contiguous float32), the ``mask`` rows or ``None``, one threshold or a column of them."""
    column = isinstance(lam, Tensor)
    lib.dessilbi_step(
        (ctypes.c_void_p * len(grads))(*map(Tensor.data_ptr, grads)),
        *_buffers(bucket, momentum != 0.0, coupled), _ptr(mask),
        lam.data_ptr() if column else None, 0.0 if column else float(lam),  # type: ignore[union-attr]
        sign, decay, *rates, bucket.k ** -0.5 if group_norm == "rms" else 1.0,
        PENALTIES[bucket.penalty] if coupled else 0, int(nesterov), int(pull == "outside"),
        max(1, min(threads, bucket.weights.numel() // ENTRIES_PER_THREAD)))


def _buffers(bucket: FlatBucket, momentum: bool, coupled: bool) -> tuple[Any, ...]:
    """The arguments of a call that are fixed for a bucket's life (its rows and buffers),
    built once per bucket: the tensors' first rows, their number, K, and B, W, V."""
    key = ("call", momentum, coupled)
    held = bucket.extras.get(key)
    if held is None:
        offsets = list(accumulate(bucket.rows, initial=0))
        held = bucket.extras[key] = (
            (ctypes.c_int64 * len(offsets))(*offsets), len(bucket.rows), bucket.k,
            _ptr(bucket.buf if momentum else None), bucket.weights.data_ptr(),
            _ptr(bucket.v if coupled and bucket.penalty != "none" else None))
    return held


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
