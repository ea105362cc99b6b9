"""Validation of DessiLBI's inputs: hyper-parameters (per group), parameters and gradients,
each failure one ``ValueError`` / ``RuntimeError`` naming the field."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from .penalties import PENALTIES
from .prox import GROUP_NORMS

__all__ = ["PULLS", "check_grad", "check_group", "check_params"]

PULLS: tuple[str, ...] = ("all", "outside")  # the units the coupling pulls W on


def check_group(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the field for every invalid hyper-parameter of ``group``."""

    def bad(field: str, value: Any, why: str) -> ValueError:
        return ValueError(f"invalid {field}={value!r}: {why}")

    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise bad("lr", lr, "a tensor lr must have one element")
        lr = float(lr)
    checks = [
        ("lr", lr, lr >= 0.0 and math.isfinite(lr), "must be a finite number >= 0"),
        ("kappa", group["kappa"], group["kappa"] > 0.0 and math.isfinite(group["kappa"]),
         "must be a finite number > 0"),
        ("nu", group["nu"], group["nu"] > 0.0, "must be > 0 (math.inf disables the coupling)"),
        ("lambda_", group["lambda_"], group["lambda_"] >= 0.0 and math.isfinite(group["lambda_"]),
         "must be a finite number >= 0"),
        ("momentum", group["momentum"], 0.0 <= group["momentum"] < 1.0, "must be in [0, 1)"),
        ("dampening", group["dampening"], 0.0 <= group["dampening"] <= 1.0, "must be in [0, 1]"),
        ("weight_decay", group["weight_decay"],
         group["weight_decay"] >= 0.0 and math.isfinite(group["weight_decay"]),
         "must be a finite number >= 0"),
    ]
    for field, value, ok, why in checks:
        if isinstance(value, bool) or not ok:  # `not ok` also catches NaN comparisons
            raise bad(field, value, why)
    if group["penalty"] != "auto" and group["penalty"] not in PENALTIES:
        raise bad("penalty", group["penalty"], f"must be one of {('auto', *PENALTIES)}")
    if group["group_norm"] not in GROUP_NORMS:
        raise bad("group_norm", group["group_norm"], f"must be one of {GROUP_NORMS}")
    if group["pull"] not in PULLS:
        raise bad("pull", group["pull"], f"must be one of {PULLS}")
    for flag in ("foreach", "fused"):  # None: the optimizer chooses (see DessiLBI)
        if not any(group.get(flag) is ok for ok in (None, True, False)):
            raise bad(flag, group[flag], "must be True, False or None")
    if group["nesterov"] and (group["momentum"] <= 0.0 or group["dampening"] != 0.0):
        raise bad("nesterov", True, "requires momentum > 0 and dampening = 0")


def check_params(params: list[Tensor]) -> None:
    """Raise for a sparse or complex parameter (after torch's own checks)."""
    for p in params:
        if p.is_sparse:
            raise ValueError("invalid params: DessiLBI does not support sparse parameters")
        if p.is_complex():
            raise ValueError("invalid params: DessiLBI does not support complex parameters "
                             "(optimise torch.view_as_real(p) instead)")


def check_grad(grad: Tensor) -> None:
    if grad.is_sparse:
        raise RuntimeError("DessiLBI does not support sparse gradients; use a dense embedding "
                           "(sparse=False) or put that parameter in another optimizer")
