r"""Parameters that live in their flat bucket's memory (the default on CPU and CUDA).

A flat bucket (:mod:`.flat`) steps its tensors as one ``(R, K)`` buffer. Copying the weights
into that buffer and back costs two passes over memory a step: on ResNet-56 shapes, 0.9 ms of a
3 ms step on the CPU, against 1.8 ms for SGD's whole step; on CUDA two multi-tensor copies over
every parameter, each launching about as much as one of SGD's three multi-tensor operations.
Instead the bucket *adopts* its parameters when it is built: it allocates one arena, copies
every parameter into its slice and points the parameter at it (``p.data = slice``), so the
update writes the parameters themselves.

Each parameter keeps a storage of its own, so whatever reads storages sees independent tensors
as before: ``torch.save``, safetensors (which refuses tensors that share a storage),
``copy.deepcopy``. Only the bucket's ``(R, K)`` tensor spans them all. The storage is made by a
DLPack round trip of the parameter's slice (``from_dlpack(to_dlpack(slice))``): torch wraps the
slice's memory in a new storage of exactly its size, whose deleter holds the slice, so the
arena lives as long as any parameter in it, on any device torch exchanges by DLPack. Writes
through the ``(R, K)`` tensor bypass autograd's version counters, so the step bumps them itself
(:func:`bump_versions`): a parameter updated between a forward and its backward still raises,
as under any ``torch.optim`` optimizer.

What changes for the user: a reference to ``p.data`` taken before the first step no longer
follows the parameter after it, as after ``model.to(...)``. Parameters that are views of
another tensor, share their storage, live in shared memory or are not plain CPU or CUDA tensors are
not adopted (their bucket copies them in and out instead); ``DessiLBI(foreach=False)`` turns
buckets off. On CUDA an adopted parameter's memory is not a block of the caching allocator of
its own: ``record_stream`` skips it, and it cannot be sent to another process by CUDA IPC
(``torch.multiprocessing``); copy such a model (``copy.deepcopy``) first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from .kernels import plain

__all__ = ["DEVICES", "DTYPES", "adoptable", "adopt", "own_storage", "bump_versions"]

DEVICES = ("cpu", "cuda")  # devices whose tensors torch exports and imports by DLPack
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # and their dtypes


def adoptable(p: Tensor) -> bool:
    """Whether ``p`` can be moved into an arena: a contiguous CPU or CUDA leaf tensor
    (``Tensor`` or ``Parameter``, no subclass) that is the only tensor over its whole storage,
    in private memory (a tensor in shared memory, ``model.share_memory()``, is updated by other
    processes too: it stays where they see it)."""
    if not plain(p) or p.device.type not in DEVICES or p.dtype not in DTYPES:
        return False
    if not p.is_leaf or p._base is not None or not p.is_contiguous() or p.is_inference():
        return False
    if p.layout != torch.strided:
        return False
    # CUDA storages always call themselves shared (they can be sent to other processes)
    if p.device.type == "cpu" and (p.is_pinned() or p.is_shared()):
        return False
    return p.storage_offset() == 0 and \
        p.untyped_storage().nbytes() == p.numel() * p.element_size()


def adopt(params: Sequence[Tensor], k: int) -> Tensor | None:
    """Move ``params`` (one dtype and device) into one arena, row after row, and return it as
    an ``(R, K)`` tensor: parameter i is rows ``sum(rows[:i])`` to ``sum(rows[:i+1])``, with its
    own storage over them. The values are copied; nothing else about the parameters changes.
    ``None``, with every parameter left as it was, where the device's tensors cannot be
    wrapped by DLPack (the bucket then copies them in and out)."""
    flat = torch.empty(sum(p.numel() for p in params) // k, k, dtype=params[0].dtype,
                       device=params[0].device)
    try:  # every storage first, so that a failure leaves no parameter moved
        owns = [own_storage(rows.view(p.shape))
                for p, rows in zip(params, flat.split([p.numel() // k for p in params]))]
    except (RuntimeError, BufferError, TypeError):
        return None
    with torch.no_grad():
        for p, own in zip(params, owns):
            own.copy_(p)
            p.data = own
    return flat


def own_storage(view: Tensor) -> Tensor:
    """``view`` (contiguous) as a tensor over a storage of its own that keeps ``view``'s
    memory alive: the DLPack round trip wraps that memory in a new storage."""
    from torch.utils.dlpack import from_dlpack, to_dlpack

    own = from_dlpack(to_dlpack(view))
    if own.data_ptr() != view.data_ptr() or own.untyped_storage().nbytes() != view.nbytes:
        raise RuntimeError("DLPack did not give a storage of its own over the view's memory")
    return own


def bump_versions(params: Sequence[Tensor]) -> None:
    """Tell autograd that ``params`` were written in place (through their arena)."""
    increment_version(params)
