"""Checkpoints that survive crashes: atomic writes, the previous one kept, safe loading.

``save_checkpoint(obj, path)`` writes ``path.tmp``, flushes it to disk, moves the current
``path`` to ``path.prev`` and renames the temporary file into place; a crash at any moment leaves
a complete ``path`` or ``path.prev``. ``load_checkpoint`` uses ``torch.load(weights_only=True)``
and turns every failure into :class:`CheckpointError` with the file name.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


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


def rng_state() -> dict[str, Any]:
    """Every random generator's state, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
