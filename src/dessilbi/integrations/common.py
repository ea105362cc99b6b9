"""What the framework callbacks report, independent of any framework."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..core.optim import unwrap_optimizer
from ..core.units import unit_density
from ..sparsity.masks import Mask

__all__ = ["structure_metrics", "sparse_accuracy", "find_dessilbi", "Batch"]

Batch = Any  # (inputs, targets), or a mapping with the inputs and "labels"


def find_dessilbi(optimizers: Iterable[Any]) -> Any:
    """The first DessiLBI among a framework's (possibly wrapped) optimizers, else None."""
    for opt in optimizers:
        try:
            return unwrap_optimizer(opt)
        except TypeError:
            continue
    return None


def structure_metrics(model: nn.Module, optimizer: Any) -> dict[str, float]:
    """density (fraction of penalised weights in supp Γ) and unit_density (filters / neurons)."""
    mask = Mask.from_optimizer(model, optimizer)
    return {"density": unwrap_optimizer(optimizer).density(),
            "unit_density": unit_density(mask.masks, mask.penalties)}


def _split(batch: Batch) -> tuple[Any, Tensor]:
    if isinstance(batch, dict):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"]
    return batch[0], batch[1]


def _logits(model: nn.Module, inputs: Any) -> Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, dict):  # a dict or a transformers ModelOutput
        return out["logits"]
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def sparse_accuracy(model: nn.Module, optimizer: Any, batches: Iterable[Batch],
                    device: torch.device | str | None = None,
                    logits: Callable[[nn.Module, Any], Tensor] = _logits) -> float:
    """Accuracy of the Sparse model ``W ⊙ 1[Γ ≠ 0]`` on ``batches`` (classification: the
    argmax of the logits against the targets); the weights are restored exactly afterwards."""
    mask = Mask.from_optimizer(model, optimizer)
    device = device or next(model.parameters()).device
    was_training = model.training
    correct = total = 0
    model.eval()
    try:
        with mask.applied(model):
            for batch in batches:
                inputs, target = _split(batch)
                if isinstance(inputs, dict):
                    inputs = {k: v.to(device) for k, v in inputs.items()}
                else:
                    inputs = inputs.to(device)
                pred = logits(model, inputs).argmax(-1)
                correct += int((pred == target.to(device)).sum())
                total += target.numel()
    finally:
        model.train(was_training)
    return correct / total if total else float("nan")
