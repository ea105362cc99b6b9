r"""The global ranking of units across layers, as :class:`~dessilbi.core.target.SparsityTarget`
uses it: scores on a common scale, the width prior, the reserve of narrow layers, and the
thresholds and counts that turn a ranking into a support."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["SCORES", "layer_scores", "width_factors", "threshold_keeping", "top_counts",
           "reserve_within", "units_within_cost"]

SCORES: tuple[str, ...] = ("initial", "mean")


def layer_scores(norms: Tensor, initial_scale: float, score: str) -> Tensor:
    r"""A layer's units on the global ranking's common scale.

    ``"initial"``: ‖V_g‖ / s₀, s₀ the mean unit norm of the layer's initial weights;
    ``"mean"``: ‖V_g‖ / mean_h ‖V_h‖ over the layer's units now (a layer's typical unit scores
    1 whatever its size or the growth of its weights during training; a layer with every
    ‖V_g‖ = 0 scores 0)."""
    if score not in SCORES:
        raise ValueError(f"invalid score={score!r}: choose one of {SCORES}")
    scale = initial_scale if score == "initial" else float(norms.mean())
    return norms / scale if scale > 0 else torch.zeros_like(norms)


def width_factors(widths: Sequence[int], power: float) -> list[float]:
    r"""The factor (w̄ / w_l)^power of each layer's scores, w_l its number of units and w̄ the
    mean over the layers: with ``power`` > 0 a unit of a narrow layer, which carries a larger
    share of its layer's output, ranks above a unit of a wide layer that scores the same on
    the common scale; 0 leaves the scores as they are."""
    mean_width = sum(widths) / len(widths)
    return [(mean_width / w) ** power for w in widths]


def threshold_keeping(norms: Tensor, k: int) -> float:
    """The smallest λ with exactly ``k`` norms > λ (ties aside): the (k+1)-th largest norm."""
    n = norms.numel()
    if k >= n:
        return 0.0
    return float(torch.topk(norms.reshape(-1), k + 1).values[-1])


def top_counts(scores: Tensor, sizes: list[int], k: int) -> list[int]:
    """How many of each layer's units are among the ``k`` best ``scores`` (ties: first listed)."""
    chosen = torch.zeros(scores.numel(), dtype=torch.long, device=scores.device)
    chosen[torch.argsort(scores, descending=True, stable=True)[:k]] = 1
    return [int(c.sum()) for c in chosen.split(sizes)]


def reserve_within(reserve: int, sizes: list[int], fraction: float) -> int:
    """The largest r ≤ ``reserve`` whose units, min(r, n) in a layer of n, take at most half of
    the ``fraction`` of all units: the reserve guards narrow layers without spending the
    ranking's budget (a CIFAR ResNet-56 at 10 % of its 2,032 units would otherwise reserve 8 in
    each of its 55 penalised layers, 440 units of 203)."""
    budget = fraction * sum(sizes) / 2
    for r in range(reserve, 0, -1):
        if sum(min(r, n) for n in sizes) <= budget:
            return r
    return 0


def units_within_cost(scores: Tensor, sizes: list[int],
                       cost: Callable[[list[Tensor]], Tensor], budget: float) -> int:
    """How many units, taken by decreasing score, make the network cost closest to ``budget``
    (``cost`` gives the cost after every prefix of the order at once). The miss is at most half
    the cost of one unit (large for a network of a few filters, such as LeNet-5's 6 and 16)."""
    order = torch.argsort(scores, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return int((cost(list(rank.split(sizes))) - budget).abs().argmin())
