"""Proximal maps of the DessiLBI penalties, as pure functions.

Γ = κ · prox_λ(V) turns the inverse-scale-space variable V into the sparse variable Γ.
Two penalties are provided:

* element-wise lasso, ``soft_threshold``::

      prox_λ(v) = sign(v) · max(|v| − λ, 0)

* group lasso with one group per slice along ``dim`` (per output filter of a convolution,
  per output neuron of a linear layer), ``group_soft_threshold``::

      prox_λ(V)_g = V_g · max(0, 1 − λ / ‖V_g‖₂)          (group_norm="l2")
      prox_λ(V)_g = V_g · max(0, 1 − λ / (‖V_g‖₂ / √n_g))  (group_norm="rms")

  where n_g is the number of entries of a group. A zero group stays exactly zero (no NaN).

The penalties that use them, with their notion of a unit, are objects in :mod:`.penalties`
(``prox(v, penalty, λ)`` dispatches there). All functions accept tensors of any memory format
(channels_last included) and never synchronise with the device.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

GroupNorm = Literal["l2", "rms"]
GROUP_NORMS: tuple[str, ...] = ("l2", "rms")


def soft_threshold(v: torch.Tensor, lambda_: float) -> torch.Tensor:
    """Element-wise soft thresholding ``sign(v) · max(|v| − λ, 0)``.

    Args:
        v: tensor of any shape.
        lambda_: threshold λ ≥ 0.

    Returns:
        A new tensor of ``v``'s shape; entries with ``|v| ≤ λ`` are exactly zero.
    """
    _check_lambda(lambda_)
    return F.softshrink(v, lambda_)


def group_norms(v: torch.Tensor, dim: int = 0, group_norm: GroupNorm = "l2") -> torch.Tensor:
    """Norm of every group of ``v``, one group per index along ``dim``.

    Returns a tensor of shape ``(v.shape[dim],)``: ‖V_g‖₂, or ‖V_g‖₂ / √n_g for ``"rms"``.
    A 0-d or 1-d ``v`` has groups of a single entry each.
    """
    if group_norm not in GROUP_NORMS:
        raise ValueError(f"group_norm must be one of {GROUP_NORMS}, got {group_norm!r}")
    if v.ndim <= 1:
        return v.abs().reshape(-1)
    dim = dim % v.ndim
    other = tuple(d for d in range(v.ndim) if d != dim)
    norms = torch.linalg.vector_norm(v, dim=other)
    if group_norm == "rms":
        n = math.prod(v.shape[d] for d in other)
        norms = norms / math.sqrt(n)
    return norms


def group_scale(
    v: torch.Tensor, lambda_: float, dim: int = 0, group_norm: GroupNorm = "l2"
) -> torch.Tensor:
    """Shrink factor ``max(0, 1 − λ / ‖V_g‖)`` of every group, shape ``(v.shape[dim],)``.

    Groups whose norm is ≤ λ get exactly 0; a zero group gets 0 when λ > 0 (no division by 0).
    """
    _check_lambda(lambda_)
    norms = group_norms(v, dim, group_norm)
    # (‖V_g‖ − λ)₊ / ‖V_g‖ rather than 1 − λ / ‖V_g‖: exactly 0 at ‖V_g‖ = λ (scalar / tensor
    # goes through a rounded reciprocal), and 0 / tiny = 0 for a zero group instead of NaN.
    tiny = torch.finfo(norms.dtype).tiny if norms.is_floating_point() else 1e-38
    return (norms - lambda_).clamp_min_(0.0).div_(norms.clamp_min(tiny))


def broadcast_to_groups(scale: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    if v.ndim == 0:
        return scale.reshape(())
    shape = [1] * v.ndim
    shape[dim % v.ndim] = -1
    return scale.reshape(shape)


def group_soft_threshold(
    v: torch.Tensor, lambda_: float, dim: int = 0, group_norm: GroupNorm = "l2"
) -> torch.Tensor:
    """Group soft thresholding, one group per index along ``dim``.

    Args:
        v: tensor, e.g. a conv weight of shape ``(C_out, C_in, k_h, k_w)`` (``dim=0`` groups
            per output filter) or a linear weight ``(out, in)`` (per output neuron).
        lambda_: threshold λ ≥ 0.
        dim: the group dimension.
        group_norm: ``"l2"`` thresholds ‖V_g‖₂, ``"rms"`` thresholds ‖V_g‖₂ / √n_g.

    Returns:
        A new tensor of ``v``'s shape and memory format where each group g is scaled by
        ``max(0, 1 − λ / norm_g)``; a group with norm ≤ λ is exactly zero.
    """
    scale = group_scale(v, lambda_, dim, group_norm)
    return v * broadcast_to_groups(scale, v, dim)


def _check_lambda(lambda_: float) -> None:
    if not lambda_ >= 0.0:  # also rejects NaN
        raise ValueError(f"lambda_ must be >= 0, got {lambda_!r}")
