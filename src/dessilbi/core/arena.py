r"""Parameters that live in their flat bucket's memory (the CPU default).

A flat bucket (:mod:`.flat`) steps its tensors as one ``(R, K)`` buffer. Copying the weights
into that buffer and back costs two passes over memory a step: on ResNet-56 shapes, 0.9 ms of a
3 ms step, against 1.8 ms for SGD's whole step. Instead the bucket *adopts* its parameters when
it is built: it allocates one arena, copies every parameter into its slice and points the
parameter at it (``p.data = slice``), so the update writes the parameters themselves.

Each parameter keeps a storage of its own (``torch.frombuffer`` over its byte range of the
arena), so whatever reads storages sees independent tensors as before: ``torch.save``,
safetensors (which refuses tensors that share a storage), ``copy.deepcopy``. Only the bucket's
``(R, K)`` tensor spans them all. Writes through it bypass autograd's version counters, so the
step bumps them itself (:func:`bump_versions`): a parameter updated between a forward and its
backward still raises, as under any ``torch.optim`` optimizer.

What changes for the user: a reference to ``p.data`` taken before the first step no longer
follows the parameter after it, as after ``model.to(...)``. Parameters that are views of
another tensor, share their storage, live in shared memory or are not plain CPU tensors are
not adopted (their bucket copies them in and out instead); ``DessiLBI(foreach=False)`` turns
buckets off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from .kernels import plain

__all__ = ["ALIGN", "adoptable", "adopt", "bump_versions"]

ALIGN = 64  # bytes: the arena starts on a cache line, as torch's own allocations do


def adoptable(p: Tensor) -> bool:
    """Whether ``p`` can be moved into an arena: a contiguous CPU leaf tensor (``Tensor`` or
    ``Parameter``, no subclass) that is the only tensor over its whole storage, in private
    memory (a tensor in shared memory, ``model.share_memory()``, is updated by other processes
    too: it stays where they see it)."""
    if not plain(p) or p.device.type != "cpu":
        return False
    if not p.is_leaf or p._base is not None or not p.is_contiguous() or p.is_inference():
        return False
    if p.layout != torch.strided or p.is_pinned() or p.is_shared():
        return False
    return p.storage_offset() == 0 and \
        p.untyped_storage().nbytes() == p.numel() * p.element_size()


def adopt(params: Sequence[Tensor], k: int) -> Tensor:
    """Move ``params`` (one dtype) into one arena, row after row, and return it as an
    ``(R, K)`` tensor: parameter i is rows ``sum(rows[:i])`` to ``sum(rows[:i+1])``, with its
    own storage over them. The values are copied; nothing else about the parameters changes."""
    dtype, size = params[0].dtype, params[0].element_size()
    total = sum(p.numel() for p in params)
    memory = bytearray(total * size + ALIGN)
    base = torch.frombuffer(memory, dtype=torch.uint8, count=1).data_ptr()
    start = (-base) % ALIGN
    flat = torch.frombuffer(memory, dtype=dtype, count=total, offset=start).view(-1, k)
    offset = start
    with torch.no_grad():
        for p in params:
            own = torch.frombuffer(memory, dtype=dtype, count=p.numel(), offset=offset)
            own = own.view(p.shape)
            own.copy_(p)
            p.data = own
            offset += p.numel() * size
    return flat


def bump_versions(params: Sequence[Tensor]) -> None:
    """Tell autograd that ``params`` were written in place (through their arena)."""
    increment_version(params)
