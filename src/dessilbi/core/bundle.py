"""The tensors of one (parameter group, penalty, threshold) that a DessiLBI step updates
together, as the lists the kernels take (:mod:`.update`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["Bundle"]


class Bundle:
    """The tensors of one (group, penalty) pair that take part in a step."""

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.states: list[dict[str, Any]] = []
        self.bufs: list[Tensor | None] = []
        self.vs: list[Tensor | None] = []
        self.grads: list[Tensor] = []

    def add(self, p: Tensor, state: dict[str, Any], mask: Tensor | None = None,
            maximize: bool = False) -> None:
        assert p.grad is not None
        grad = -p.grad if maximize else p.grad
        self.params.append(p)
        self.grads.append(grad if mask is None else grad * mask)
        self.states.append(state)
        self.bufs.append(state.get("momentum_buffer"))
        self.vs.append(state.get("V"))

    def store_buffers(self, momentum: float) -> None:
        """Keep the (possibly new) momentum buffers in the optimizer state (``None`` without
        momentum, so that every parameter that took a step has its state entry)."""
        for st, buf in zip(self.states, self.bufs):
            st["momentum_buffer"] = buf if momentum != 0.0 else None
