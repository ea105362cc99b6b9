"""dessilbi: train deep networks with DessiLBI and read off their sparse structure.

Public API::

    from dessilbi import DessiLBI, lbi_param_groups
    opt = DessiLBI(lbi_param_groups(model, weight_decay=1e-4), lr=0.1,
                   total_steps=epochs * len(loader))  # ν = α κ T / 20 (nu_for_steps)

    # or aim it: keep 30 % of the filters / neurons, ν and λ derived from the budget
    target = SparsityTarget(opt, density=0.3, total_steps=epochs * len(loader))
    ...  loss.backward(); opt.step(); target.step()
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.optim import (
        PENALTY_CHOICES,
        DessiLBI,
        dessilbi_update,
        nu_for_steps,
        resolve_penalty,
        unwrap_optimizer,
    )
    from .core.param_groups import lbi_param_groups
    from .core.penalties import Penalty, get_penalty, prox, register_penalty
    from .core.prox import group_norms, group_scale, group_soft_threshold, soft_threshold
    from .core.target import SparsityTarget, support_fraction
    from .core.units import classifier_of, coupled_parameters, stem_of, unit_density

# name → module: the public names are imported on first use (PEP 562), so that importing a
# torch-free part of the package (the command line's parser, a configuration) stays fast
_EXPORTS = {
    **dict.fromkeys(("PENALTY_CHOICES", "DessiLBI", "dessilbi_update", "nu_for_steps",
                     "resolve_penalty", "unwrap_optimizer"), ".core.optim"),
    "lbi_param_groups": ".core.param_groups",
    **dict.fromkeys(("group_norms", "group_scale", "group_soft_threshold", "soft_threshold"),
                    ".core.prox"),
    **dict.fromkeys(("Penalty", "get_penalty", "prox", "register_penalty"), ".core.penalties"),
    **dict.fromkeys(("SparsityTarget", "support_fraction"), ".core.target"),
    **dict.fromkeys(("classifier_of", "coupled_parameters", "stem_of", "unit_density"),
                    ".core.units"),
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dessilbi' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "DessiLBI",
    "Penalty",
    "SparsityTarget",
    "get_penalty",
    "register_penalty",
    "classifier_of",
    "coupled_parameters",
    "stem_of",
    "support_fraction",
    "unit_density",
    "PENALTY_CHOICES",
    "dessilbi_update",
    "group_norms",
    "group_scale",
    "group_soft_threshold",
    "lbi_param_groups",
    "nu_for_steps",
    "prox",
    "resolve_penalty",
    "soft_threshold",
    "unwrap_optimizer",
]
