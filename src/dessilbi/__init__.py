"""dessilbi: train deep networks with DessiLBI and read off their sparse structure.

Public API::

    from dessilbi import DessiLBI, lbi_param_groups
    opt = DessiLBI(lbi_param_groups(model, weight_decay=1e-4), lr=0.1, kappa=1.0, nu=100.0)
"""

from .optim import PENALTY_CHOICES, DessiLBI, dessilbi_update, resolve_penalty
from .param_groups import lbi_param_groups
from .prox import group_norms, group_scale, group_soft_threshold, prox, soft_threshold

__version__ = "0.1.0"

__all__ = [
    "DessiLBI",
    "PENALTY_CHOICES",
    "dessilbi_update",
    "group_norms",
    "group_scale",
    "group_soft_threshold",
    "lbi_param_groups",
    "prox",
    "resolve_penalty",
    "soft_threshold",
]
