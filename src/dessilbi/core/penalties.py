r"""Penalties as objects: each owns its proximal map and its notion of a *unit*.

A unit is what the support of Γ keeps or drops as a whole: a single weight for the element-wise
lasso, an output filter (convolution) or output neuron (linear layer) for the group lasso, i.e.
one slice along dim 0. Everything above the optimizer — masks, entry order, per-layer reports,
the sparsity target, pruning — asks the penalty, by name, how to read a tensor as units:

* :meth:`Penalty.prox` — Γ = κ prox_λ(V) (the maths: :mod:`.prox`);
* :meth:`Penalty.unit_norms` — one norm per unit, the one the prox thresholds;
* :meth:`Penalty.unit_mask` / :meth:`Penalty.unit_shaped` — a mask as one bool per unit, and
  back to a mask broadcastable to the tensor.

A new penalty is one subclass registered with :func:`register_penalty`; the optimizer's
per-tensor kernel applies any registered penalty through :meth:`Penalty.prox` (the multi-tensor
and compiled kernels are written for the built-in ``lasso`` and ``group``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .prox import group_norms, group_soft_threshold, soft_threshold

__all__ = ["Penalty", "Lasso", "Group", "NoPenalty", "PENALTIES", "get_penalty",
           "register_penalty", "prox"]


class Penalty:
    """The element-wise view (every weight a unit); subclasses change what a unit is."""

    name: ClassVar[str] = ""

    def prox(self, v: Tensor, lambda_: float, group_norm: str = "l2") -> Tensor:
        raise NotImplementedError

    def unit_norms(self, t: Tensor, group_norm: str = "l2") -> Tensor:
        """The norm the proximal map thresholds, one value per unit (flat)."""
        return t.abs().reshape(-1)

    def unit_mask(self, mask: Tensor) -> Tensor:
        """One bool per unit, flat: a unit is kept when any of its entries is."""
        return mask.reshape(-1)

    def unit_count(self, shape: torch.Size | tuple[int, ...]) -> int:
        """How many units a tensor of ``shape`` has (from :meth:`unit_mask`, on no memory)."""
        return self.unit_mask(torch.empty(shape, dtype=torch.bool, device="meta")).numel()

    def unit_shaped(self, units: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """Per-unit bools as a mask broadcastable to ``shape``."""
        return units.reshape(shape)

    def expand(self, units: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """Per-unit bools as a full bool mask of ``shape``."""
        return self.unit_shaped(units, shape).expand(shape).clone()

    def whole_units(self, mask: Tensor) -> bool:
        """Whether ``mask`` keeps or drops whole units only."""
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Lasso(Penalty):
    r"""Element-wise lasso: :math:`\operatorname{prox}_λ(v) = \operatorname{sign}(v)
    \max(|v| − λ, 0)`; every weight is a unit."""

    name = "lasso"

    def prox(self, v: Tensor, lambda_: float, group_norm: str = "l2") -> Tensor:
        return soft_threshold(v, lambda_)


class Group(Penalty):
    r"""Group lasso, one group per slice along dim 0 (output filter / neuron):
    :math:`\operatorname{prox}_λ(V)_g = V_g \max(0, 1 − λ / \lVert V_g \rVert)`. A vector
    has groups of one entry."""

    name = "group"

    def prox(self, v: Tensor, lambda_: float, group_norm: str = "l2") -> Tensor:
        return group_soft_threshold(v, lambda_, 0, group_norm)  # type: ignore[arg-type]

    def unit_norms(self, t: Tensor, group_norm: str = "l2") -> Tensor:
        return group_norms(t, 0, group_norm)  # type: ignore[arg-type]

    def unit_mask(self, mask: Tensor) -> Tensor:
        return mask.reshape(mask.shape[0], -1).any(dim=1) if mask.ndim >= 2 else mask.reshape(-1)

    def unit_shaped(self, units: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
        if len(shape) < 2:
            return units.reshape(shape)
        return units.reshape((-1,) + (1,) * (len(shape) - 1))

    def whole_units(self, mask: Tensor) -> bool:
        if mask.ndim < 2:
            return True
        rows = mask.reshape(mask.shape[0], -1)
        return torch.equal(rows.any(1), rows.all(1))


class NoPenalty(Penalty):
    """No penalty: Γ = κ V, no threshold (the parameter is trained as by SGD)."""

    name = "none"

    def prox(self, v: Tensor, lambda_: float, group_norm: str = "l2") -> Tensor:
        return v.clone()


PENALTIES: dict[str, Penalty] = {}


def register_penalty(penalty: Penalty) -> Penalty:
    """Make ``penalty`` available by its name (to the optimizer, masks, reports, the CLI)."""
    if not penalty.name or penalty.name == "auto":
        raise ValueError(f"invalid penalty name {penalty.name!r}")
    PENALTIES[penalty.name] = penalty
    return penalty


for _builtin in (Lasso(), Group(), NoPenalty()):
    register_penalty(_builtin)


def get_penalty(penalty: str | Penalty) -> Penalty:
    """The penalty object of a name (an object is returned as it is)."""
    if isinstance(penalty, Penalty):
        return penalty
    try:
        return PENALTIES[penalty]
    except (KeyError, TypeError):
        raise ValueError(f"penalty must be one of {tuple(PENALTIES)}, got {penalty!r}") from None


def prox(v: Tensor, penalty: str | Penalty, lambda_: float, group_norm: str = "l2") -> Tensor:
    """The proximal map of ``penalty`` (groups along dim 0 for ``"group"``)."""
    return get_penalty(penalty).prox(v, lambda_, group_norm)
