"""A pruned network as a file that runs no code when loaded: the recipe, not the pickled module.

``save_pruned`` stores what rebuilds the network — the model's name and geometry, the mask it
was pruned with, the example input's shape — and the pruned weights, as tensors and plain
values (read with ``torch.load(weights_only=True)``). ``load_pruned`` replays the recipe:
creates the dense model, prunes it with the mask through the same dependency graph, and loads
the weights. A pickled ``nn.Module`` (``torch.save(model)``) would need
``weights_only=False``, which runs whatever code the file names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import CheckpointError, load_checkpoint, save_checkpoint
from ..sparsity.masks import Mask
from ..structure.prune import prune_model
from ..zoo.models import create_model

__all__ = ["save_pruned", "load_pruned", "FORMAT"]

FORMAT = "dessilbi-pruned-v1"


def save_pruned(path: str | Path, model_spec: dict[str, Any], mask: Mask, pruned: nn.Module,
                example_shape: tuple[int, ...]) -> None:
    """Write the recipe and weights of ``pruned``; ``model_spec`` holds the keyword arguments
    of :func:`dessilbi.zoo.models.create_model` that built the dense model."""
    save_checkpoint({"format": FORMAT, "model": dict(model_spec), "mask": mask.state_dict(),
                     "example_shape": list(example_shape),
                     "state_dict": {k: v.detach().cpu() for k, v in pruned.state_dict().items()}},
                    path)


def load_pruned(path: str | Path) -> nn.Module:
    """The pruned network saved by :func:`save_pruned`, rebuilt and with its weights."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a pruned model saved by dessilbi ({FORMAT})")
    dense = create_model(**state["model"])
    example = torch.zeros(state["example_shape"])
    model = prune_model(dense, Mask.from_state_dict(state["mask"]), example).model
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the rebuilt network ({e})") from e
    return model.eval()
