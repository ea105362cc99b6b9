"""The files of a run folder, named in one place, and the reads every layer shares.

::

    <run>/config.yaml        the resolved configuration (flat keys)
    <run>/metrics.jsonl      one JSON line per epoch
    <run>/summary.json       the final record, written when the run ends
    <run>/init.pt            the initial weights (lottery-ticket rewinding)
    <run>/checkpoint.pt      the latest state (+ checkpoint.pt.prev), written atomically
    <run>/path.pt            ‖Γ_g‖, ‖W_g‖ per filter / neuron over epochs
    <run>/masks.pt           the Γ-support masks and the epochs units entered / left
    <run>/tb/                TensorBoard event files
    <run>/.lock              held while a process trains in the folder

Writers (the engine and its callbacks) and readers (``open_run``, reports, plots, branches)
take the paths from :class:`RunDir`; no other module spells a file name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["RunDir"]


def _file(name: str) -> Any:
    """A property: the path of ``name`` in the run folder."""

    def path(self: RunDir) -> Path:
        return self.path / name

    return property(path, doc=f"``<run>/{name}``")


@dataclass(frozen=True)
class RunDir:
    """A run folder (it need not exist yet)."""

    path: Path

    CONFIG: ClassVar[str] = "config.yaml"
    METRICS: ClassVar[str] = "metrics.jsonl"
    SUMMARY: ClassVar[str] = "summary.json"
    INIT: ClassVar[str] = "init.pt"
    CHECKPOINT: ClassVar[str] = "checkpoint.pt"
    SOLUTION_PATH: ClassVar[str] = "path.pt"
    MASKS: ClassVar[str] = "masks.pt"
    TENSORBOARD: ClassVar[str] = "tb"
    LOCK: ClassVar[str] = ".lock"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    config = _file(CONFIG)
    metrics = _file(METRICS)
    summary = _file(SUMMARY)
    init = _file(INIT)
    checkpoint = _file(CHECKPOINT)
    solution_path = _file(SOLUTION_PATH)
    masks = _file(MASKS)
    tensorboard = _file(TENSORBOARD)
    lock = _file(LOCK)

    def results(self) -> list[Path]:
        """What a run computes (replaced by ``--overwrite``; the config and init stay)."""
        return [self.metrics, self.summary, self.checkpoint,
                self.checkpoint.with_name(self.CHECKPOINT + ".prev"), self.solution_path,
                self.masks]

    def read_metrics(self) -> list[dict[str, Any]]:
        """The per-epoch records ([] when absent). A blank or torn line (a crash while it was
        written) is skipped, and so is a line of undecodable bytes (a damaged file)."""
        if not self.metrics.exists():
            return []
        records = []
        for line in self.metrics.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def read_summary(self) -> dict[str, Any] | None:
        """The final record, or None when the run has not finished (or it is unreadable)."""
        try:
            summary = json.loads(self.summary.read_text())
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) else None
