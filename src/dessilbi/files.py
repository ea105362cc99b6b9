"""Torch files that survive crashes and run no code: atomic writes, the previous one kept,
safe loading.

``save_checkpoint(obj, path)`` writes ``path.tmp``, flushes it to disk, moves the current
``path`` to ``path.prev`` and renames the temporary file into place; a crash at any moment leaves
a complete ``path`` or ``path.prev``. ``load_checkpoint`` uses ``torch.load(weights_only=True)``
and turns every failure into :class:`CheckpointError` with the file name.

A leaf: imports nothing of dessilbi, so every layer may use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or not a dessilbi checkpoint."""


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Atomically write ``obj`` to ``path``, keeping the previous file as ``path.prev``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, path.with_name(path.name + ".prev"))
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain Python only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, wrong magic: all the same to the user
        prev = path.with_name(path.name + ".prev")
        hint = f"; the previous checkpoint {prev} may be intact" if prev.exists() else ""
        raise CheckpointError(f"checkpoint {path} is corrupted or unreadable ({e}){hint}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict")
    return obj
