"""Units of structure found from the model's computation, not from names.

* :func:`classifier_of`: the layer that produces the model's output (the classifier), left whole
  by default so the number of classes never changes.
* :func:`stem_of`: the first conv / linear layer called (it reads the input), whose filters
  are cheap and feed every later layer: ``SparsityTarget(..., whole=[...])`` can keep it whole
  (``dessilbi train --keep-first-layer``).
* :func:`coupled_parameters`: for every conv / linear weight, the tensors indexed by the same
  output units (its bias, the normalisation layer that consumes its output), which go with a
  dropped filter / neuron.
* :func:`unit_density`: the fraction of filters / neurons (or weights, for lasso) kept by masks.

Both graph functions run one forward pass on ``example`` with hooks: a module's output tensor is
matched by identity to the model's output or to a normalisation layer's input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .penalties import get_penalty

CONV_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

__all__ = ["CONV_TYPES", "LINEAR_TYPES", "NORM_TYPES", "classifier_of", "coupled_parameters",
           "stem_of", "unit_density", "unit_counts", "unit_mask"]


def _trace(model: nn.Module, example: Any) -> tuple[list[tuple[nn.Module, Tensor]], Any,
                                                    list[tuple[nn.Module, Tensor]]]:
    """(conv/linear outputs in call order, model output, (norm layer, its input) pairs)."""
    produced: list[tuple[nn.Module, Tensor]] = []
    normed: list[tuple[nn.Module, Tensor]] = []

    def on_out(module: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            produced.append((module, out))

    def on_norm(module: nn.Module, inp: Any) -> None:
        if inp and isinstance(inp[0], Tensor):
            normed.append((module, inp[0]))

    handles = []
    for m in model.modules():
        if isinstance(m, CONV_TYPES + LINEAR_TYPES):
            handles.append(m.register_forward_hook(on_out))
        elif isinstance(m, NORM_TYPES):
            handles.append(m.register_forward_pre_hook(on_norm))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(*example) if isinstance(example, tuple) else model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return produced, out, normed


def classifier_of(model: nn.Module, example: Any = None) -> nn.Module | None:
    """The conv / linear layer whose output is the model's output.

    With ``example`` (an input batch, or a tuple of inputs) the forward pass decides: the layer
    whose output tensor *is* the model's output, else the last conv / linear layer called.
    Without it, the last ``nn.Linear`` registered in the model. ``None`` when there is none.
    """
    if example is None:
        linears = [m for m in model.modules() if isinstance(m, LINEAR_TYPES)]
        return linears[-1] if linears else None
    produced, out, _ = _trace(model, example)
    for module, tensor in reversed(produced):
        if tensor is out:
            return module
    return produced[-1][0] if produced else None


def stem_of(model: nn.Module, example: Any) -> nn.Module | None:
    """The first conv / linear layer called in a forward pass on ``example``: the layer that
    reads the input (``None`` when the model has none)."""
    produced, _, _ = _trace(model, example)
    return produced[0][0] if produced else None


def coupled_parameters(model: nn.Module, example: Any) -> dict[Tensor, list[Tensor]]:
    """``{layer weight: [bias, following norm weight / bias]}`` indexed by the same output units.

    A normalisation layer is coupled to the conv / linear layer whose output it normalises
    directly (conv → BatchNorm); a norm after a residual sum is shared by several producers and
    is left alone.
    """
    produced, _, normed = _trace(model, example)
    producer_of = {id(t): m for m, t in produced}
    coupled: dict[Tensor, list[Tensor]] = {}
    for module, _ in produced:
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight not in coupled:
            bias = getattr(module, "bias", None)
            coupled[weight] = [bias] if isinstance(bias, Tensor) else []
    for norm, inp in normed:
        producer = producer_of.get(id(inp))
        weight = getattr(producer, "weight", None)
        if producer is None or weight is None:
            continue
        coupled[weight].extend(p for p in (getattr(norm, "weight", None),
                                           getattr(norm, "bias", None))
                               if isinstance(p, Tensor) and p.shape[:1] == weight.shape[:1])
    return coupled


def unit_mask(mask: Tensor, penalty: str) -> Tensor:
    """Per-unit view of a mask (filters / neurons for group, weights for lasso), flat bools."""
    return get_penalty(penalty).unit_mask(mask)


def unit_counts(mask: Tensor, penalty: str) -> tuple[int, int]:
    """(units kept, units) of one mask: filters / neurons for ``group``, weights for ``lasso``."""
    units = unit_mask(mask, penalty)
    return int(units.sum()), units.numel()


def unit_density(masks: Mapping[str, Tensor], penalties: Mapping[str, str]) -> float:
    """Fraction of units kept over all masks (0 when there are none)."""
    kept = total = 0
    for name, m in masks.items():
        k, n = unit_counts(m, penalties.get(name, "lasso"))
        kept, total = kept + k, total + n
    return kept / total if total else 0.0
