"""Parameter groups for :class:`~dessilbi.DessiLBI`, decided from module types.

Convolution weights get the structural ``"group"`` penalty (one group per output filter; transposed
convolutions, whose weights are laid out input-first, are left unpenalised), linear
weights one group per output neuron, so that every unit of the support can be removed from the
network; the classifier (the layer producing the outputs) is left whole, and biases,
normalisation layers and everything else get ``"none"`` (plain SGD-momentum). The paper's
element-wise lasso on linear weights is ``linear_penalty="lasso"``. Weight decay, when asked
for, is applied to conv / linear weights and other parameters but not to biases,
normalisation layers (torch's, and any module whose parameters are all per-channel vectors),
other vectors (layer scales) and what the model lists in ``no_weight_decay()`` (timm's
convention). Nothing else is decided from parameter names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from .penalties import PENALTIES
from .units import CONV_TYPES, LINEAR_TYPES, NORM_TYPES, classifier_of

TRANSPOSED_CONV_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

__all__ = ["lbi_param_groups", "NORM_TYPES", "CONV_TYPES", "LINEAR_TYPES"]

def lbi_param_groups(
    model: nn.Module,
    *,
    conv_penalty: str = "group",
    linear_penalty: str = "group",
    weight_decay: float = 0.0,
    exclude: Iterable[nn.Module | str | type[nn.Module]] = (),
    keep_classifier: bool = True,
    example_inputs: Any = None,
    conv_options: dict[str, Any] | None = None,
    linear_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Build parameter groups for DessiLBI from the module types of ``model``.

    Args:
        model: the network. Lazy modules must be materialised (run one forward first).
        conv_penalty: penalty of convolution weights (``"group"``, ``"lasso"`` or ``"none"``).
        linear_penalty: penalty of linear weights (``"group"``: one group per output neuron,
            ``"lasso"``: element-wise as in the paper's LeNet tables, or ``"none"``).
        weight_decay: weight decay of conv / linear weights and of other non-norm parameters;
            biases and normalisation parameters always get 0.
        exclude: modules (objects, qualified names as in ``named_modules()``, or types) whose
            weights get no penalty, e.g. the classifier: ``exclude=["fc"]``. Excluding a module
            excludes its children.
        keep_classifier: give the classifier no penalty (its outputs are the classes). It is
            found by :func:`dessilbi.core.units.classifier_of`: from a forward pass on
            ``example_inputs`` when given, else the last ``nn.Linear`` of the model.
        example_inputs: an input batch (or tuple of inputs) for finding the classifier.
        conv_options: extra hyper-parameters of the conv group, e.g.
            ``{"lambda_": 0.1, "group_norm": "rms"}`` for the CIFAR settings of the paper.
        linear_options: extra hyper-parameters of the linear group.

    Returns:
        A list of parameter-group dicts (empty groups dropped), each with a ``"name"`` key
        (``"conv"``, ``"linear"``, ``"no_decay"``, ``"other"``) and its ``"penalty"`` and
        ``"weight_decay"``. Parameters shared by several modules appear once.
    """
    for field, value in (("conv_penalty", conv_penalty), ("linear_penalty", linear_penalty)):
        if value not in PENALTIES:
            raise ValueError(f"invalid {field}={value!r}: must be one of {tuple(PENALTIES)}")
    if not weight_decay >= 0.0:
        raise ValueError(f"invalid weight_decay={weight_decay!r}: must be >= 0")

    exclude = list(exclude)
    if keep_classifier:
        head = classifier_of(model, example_inputs)
        if head is not None:
            exclude.append(head)
    excluded = _excluded_modules(model, exclude)
    no_decay = _declared_no_decay(model)
    buckets: dict[str, list[nn.Parameter]] = {"conv": [], "linear": [], "no_decay": [], "other": []}
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            buckets[_bucket_of(module, p, excluded, no_decay)].append(p)

    penalised = {"conv": conv_penalty, "linear": linear_penalty}
    groups: list[dict[str, Any]] = []
    for name, params in buckets.items():
        if not params:
            continue
        group: dict[str, Any] = {"params": params, "name": name}
        if name in penalised:
            group["penalty"] = penalised[name]
            group["weight_decay"] = weight_decay
            group.update((conv_options if name == "conv" else linear_options) or {})
        else:
            group["penalty"] = "none"
            group["weight_decay"] = weight_decay if name == "other" else 0.0
        groups.append(group)
    return groups


def _bucket_of(module: nn.Module, p: nn.Parameter, excluded: set[int],
               no_decay: set[int]) -> str:
    if isinstance(module, NORM_TYPES):  # torch's norms (a LayerNorm's weight may be 2-D)
        return "no_decay"
    is_weight = p is getattr(module, "weight", None)
    if isinstance(module, CONV_TYPES + LINEAR_TYPES) and not is_weight:
        return "no_decay"  # the bias
    if id(module) not in excluded and is_weight and isinstance(module, CONV_TYPES):
        # a transposed convolution stores its weight as (in, out, ...): a group along dim 0
        # would be an input channel, not an output filter, so it is not penalised
        return "other" if isinstance(module, TRANSPOSED_CONV_TYPES) else "conv"
    if id(module) not in excluded and is_weight and isinstance(module, LINEAR_TYPES):
        return "linear"
    # Per-channel vectors applied as a scale or shift take no weight decay, whatever module
    # holds them: the norms of other libraries (timm's RmsNorm, RmsNorm2d, SimpleNorm), layer
    # scales (LayerScale), affine-only layers; so does what the model declares (timm's
    # no_weight_decay(): tokens, position embeddings).
    return "no_decay" if p.ndim <= 1 or id(p) in no_decay else "other"


def _declared_no_decay(model: nn.Module) -> set[int]:
    """Parameters named by ``model.no_weight_decay()`` (timm's convention: a set of parameter
    names or module-name prefixes), as ids."""
    declare = getattr(model, "no_weight_decay", None)
    if not callable(declare):
        return set()
    names = set(declare())
    return {id(p) for n, p in model.named_parameters()
            if n in names or any(n.startswith(f"{k}.") for k in names)}


def _excluded_modules(
    model: nn.Module, exclude: Iterable[nn.Module | str | type[nn.Module]]
) -> set[int]:
    named = dict(model.named_modules())
    roots: list[nn.Module] = []
    for item in exclude:
        if isinstance(item, nn.Module):
            roots.append(item)
        elif isinstance(item, str):
            if item not in named:
                raise ValueError(
                    f"invalid exclude={item!r}: no such module; known: {sorted(named)[:20]}"
                )
            roots.append(named[item])
        elif isinstance(item, type) and issubclass(item, nn.Module):
            roots.extend(m for m in model.modules() if isinstance(m, item))
        else:
            raise ValueError(f"invalid exclude={item!r}: expected a module, a name or a type")
    return {id(m) for root in roots for m in root.modules()}
