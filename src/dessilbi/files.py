"""Torch files that survive crashes and run no code: atomic writes, the previous one kept,
safe loading.

``save_checkpoint(obj, path)`` writes ``path.tmp``, flushes it to disk, moves the current
``path`` to ``path.prev`` and renames the temporary file into place; a crash at any moment leaves
a complete ``path`` or ``path.prev``. ``load_checkpoint`` uses ``torch.load(weights_only=True)``
and turns every failure into :class:`CheckpointError` with the file name.

A leaf: imports nothing of dessilbi, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from .errors import CheckpointError

__all__ = ["CheckpointError", "load_checkpoint", "load_with_fallback", "save_checkpoint",
           "write_text_atomic"]


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Atomically write ``obj`` to ``path``, keeping the previous file as ``path.prev``.

    At every moment ``path`` is either the previous complete file or the new one (the previous
    one is hard-linked to ``.prev`` before the new one is renamed over it); the temporary names
    are per process, so two writers never share one.
    """
    path = Path(path)
    if path.is_dir():  # never move or replace a user's folder
        raise ValueError(f"invalid output {path}: it is a directory; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _durable_temporary(path, "wb") as (tmp, f):
        torch.save(obj, f)
    if path.exists():
        _replace_with_copy(path, path.with_name(path.name + ".prev"))
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` so that a reader sees the old or the new file, never a part."""
    path = Path(path)
    with _durable_temporary(path, "w") as (tmp, f):
        f.write(text)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def load_with_fallback(path: str | os.PathLike[str], map_location: Any = "cpu",
                       ) -> tuple[dict[str, Any], Path]:
    """Load ``path``, or ``path.prev`` when ``path`` is missing or unreadable (a crash while it
    was replaced); returns the state and the file it came from."""
    path = Path(path)
    try:
        return load_checkpoint(path, map_location), path
    except CheckpointError:
        prev = path.with_name(path.name + ".prev")
        if not prev.is_file():
            raise
        return load_checkpoint(prev, map_location), prev


@contextlib.contextmanager
def _durable_temporary(path: Path, mode: str) -> Iterator[tuple[Path, IO[Any]]]:
    """The per-process temporary file for ``path``, open in ``mode``: flushed to disk when the
    block ends, deleted when it fails (a Ctrl-C included, which it re-raises as such)."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, mode) as f:
            yield tmp, f
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        raise _interrupt_behind(e) from None


def _interrupt_behind(e: BaseException) -> BaseException:
    """The Ctrl-C (or ``SystemExit``) that caused ``e``, else ``e``.

    torch's zip writer calls the file's ``write`` from C++; an interrupt raised inside one leaves
    the writer's position off, and its cleanup then raises ``RuntimeError: unexpected pos`` with
    the interrupt only as ``__context__``. The caller asked to stop, not about zip offsets.
    """
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, (KeyboardInterrupt, SystemExit)):
            return cause
        cause = cause.__context__
    return e


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _replace_with_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` atomically; ``src`` stays in place."""
    tmp = _tmp_name(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)  # no data copied; the old inode lives on under the new name
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(e: Exception) -> str:
    """Why torch.load refused a file, in one line and without torch's advice to load it with
    ``weights_only=False`` (which would run whatever code a crafted file names)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    if not lines or not lines[0].startswith("Weights only load failed"):
        return (lines or [type(e).__name__])[0][:160]
    detail = next((x for x in lines[1:] if not x.startswith(("Please file", "Check the"))), "")
    return f"not a file of tensors and plain values: {detail or 'refused'}"[:160]


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain Python only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, wrong magic: all the same to the user
        prev = path.with_name(path.name + ".prev")
        hint = f"; the previous checkpoint {prev} may be intact" if prev.exists() else ""
        # the first line only: torch appends paragraphs of advice (weights_only=False) that
        # must not be followed for a file someone else wrote
        raise CheckpointError(f"checkpoint {path} is corrupted or unreadable "
                              f"({_reason(e)}){hint}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict")
    return obj
