r"""The MACs of a network as a function of which units its penalised layers keep.

For a convolution or linear layer :math:`l` with :math:`M_l` multiply-accumulates in the dense
network, keeping the fraction :math:`f_l` of its output channels and receiving the fraction
:math:`g_l` of its input channels costs :math:`M_l\, f_l\, g_l`:

.. math::
    \operatorname{macs} = \frac{\sum_l M_l\, f_l\, g_l}{\sum_l M_l}.

Units are taken in one global order (:class:`dessilbi.SparsityTarget`'s ranking), and
:class:`MacsModel` gives the cost of *every prefix* of that order at once. A channel that several
layers produce (summed by a residual connection) survives while any of them keeps it, so it is
alive from the first position at which one of its producers' units is taken; a channel set with a
producer that is not penalised (the network's input, an excluded layer) is always whole. Which
layers produce which channels comes from Torch-Pruning's dependency graph, not from names (a
convolution after pooling, the first Linear after a flatten, residual sums), as in :mod:`.prune`.
Only convolutions and linear layers are counted: normalisation, activations and pooling are a
small fraction of the MACs of the networks here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..core.units import CONV_TYPES
from ..sparsity.masks import unwrap

__all__ = ["MacsModel"]


class MacsModel:
    """``macs(ranks)``: the MACs fraction of the network after each prefix of a global order of
    the penalised layers' units (``ranks[i][u]``: the position of unit ``u`` of ``params[i]``)."""

    def __init__(self, layer_macs: Sequence[int], outputs: Sequence[Sequence[int] | None],
                 inputs: Sequence[Sequence[int] | None]) -> None:
        # per layer: the penalised layers producing its output / input channels (None: a
        # producer is not penalised, so every channel stays)
        self.layer_macs = torch.tensor([float(m) for m in layer_macs], dtype=torch.float64)
        self.outputs, self.inputs = list(outputs), list(inputs)

    @classmethod
    def from_model(cls, model: nn.Module, example: Tensor, params: Sequence[Tensor]) -> MacsModel:
        """The cost model of ``model`` whose penalised weights are ``params`` (in that order)."""
        model = unwrap(model)
        macs = _layer_macs(model, example)
        index = {id(p): i for i, p in enumerate(params)}
        channels = _channel_sets(model, example)

        def columns(producers: list[nn.Module]) -> list[int] | None:
            cols = [index.get(id(getattr(p, "weight", None))) for p in producers]
            return None if not cols or None in cols else cols  # type: ignore[return-value]

        layers = list(macs)
        outputs = [columns(channels.get((m, "out"), [m])) for m in layers]
        inputs = [columns(channels.get((m, "in"), [])) for m in layers]
        return cls([macs[m] for m in layers], outputs, inputs)

    def __call__(self, ranks: Sequence[Tensor]) -> Tensor:
        """MACs fraction after taking 0, 1, …, N units (N = all units of ``ranks``)."""
        n = sum(r.numel() for r in ranks)
        alive: dict[tuple[int, ...], Tensor] = {}

        def kept(cols: Sequence[int] | None) -> Tensor | float:
            if not cols:
                return 1.0
            key = tuple(cols)
            if key not in alive:  # a channel lives from its first producer's unit on
                first = torch.stack([ranks[i] for i in cols]).amin(0)
                taken = torch.bincount(first, minlength=n).cumsum(0).to(torch.float64)
                alive[key] = torch.cat([taken.new_zeros(1), taken[:n]]) / first.numel()
            return alive[key]

        total = torch.zeros(n + 1, dtype=torch.float64)
        for m, out, ins in zip(self.layer_macs, self.outputs, self.inputs):
            total += m * kept(out) * kept(ins)
        return total / self.layer_macs.sum()


def _layer_macs(model: nn.Module, example: Tensor) -> dict[nn.Module, int]:
    """Dense MACs of every convolution / linear layer, from one forward pass (in call order)."""
    macs: dict[nn.Module, int] = {}

    def count(module: nn.Module, inputs: Any, out: Tensor) -> None:
        per_sample = out.numel() // max(out.shape[0], 1)
        if isinstance(module, CONV_TYPES):
            k = int(torch.tensor(module.kernel_size).prod())
            fan_in = module.in_channels // module.groups * k  # type: ignore[operator]
        else:
            fan_in = module.in_features  # type: ignore[assignment]
        macs[module] = macs.get(module, 0) + per_sample * int(fan_in)

    handles = [m.register_forward_hook(count) for m in model.modules()
               if isinstance(m, CONV_TYPES + (nn.Linear,))]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return macs


def _channel_sets(model: nn.Module, example: Tensor) -> dict[tuple[nn.Module, str],
                                                                list[nn.Module]]:
    """{(layer, "out" | "in"): the convolutions / linear layers producing those channels}."""
    import torch_pruning as tp

    with torch.enable_grad():  # the dependency graph is traced through autograd
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example[:1])
    out_fns = {tp.prune_conv_out_channels, tp.prune_linear_out_channels}
    in_fns = {tp.prune_conv_in_channels, tp.prune_linear_in_channels}
    sets: dict[tuple[nn.Module, str], list[nn.Module]] = {}
    for layer in model.modules():
        if not isinstance(layer, nn.Conv2d | nn.Linear):
            continue
        fn = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else \
            tp.prune_linear_out_channels
        group = dg.get_pruning_group(layer, fn, idxs=[0])
        producers = [d.target.module for d, _ in group if d.handler in out_fns]
        for dep, _ in group:
            side = "out" if dep.handler in out_fns else "in" if dep.handler in in_fns else None
            if side is not None:
                known = sets.setdefault((dep.target.module, side), [])
                known.extend(p for p in producers if p not in known)
    return sets
