"""Turn a mask into a smaller dense network: filters / neurons physically removed.

Structural coupling (a conv and its BatchNorm, the consumers of a channel, the layers summed by a
residual connection, the first Linear after a flatten) comes from Torch-Pruning's dependency graph,
not from layer names. A channel is removed only when *every* layer that produces it (all
branches of a residual sum) has dropped it, so nothing that the masked network computes is lost.

Equivalence: the pruned network computes exactly what the *channel-masked* network computes:
the mask applied to the weights and, for each removed channel, its bias and the affine
parameters of its normalisation layer set to 0 (:func:`channel_masked`). That differs from the
weight-masked Sparse model only by the constant a dropped filter's bias / BatchNorm shift would
have added.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..sparsity.masks import Mask, unwrap

log = logging.getLogger(__name__)

__all__ = ["PruneResult", "prune_model", "channel_masked", "prunable_channels", "count_cost",
           "full_float32",
           "cpu_latency", "export_onnx", "PruneError"]


@dataclass
class PruneResult:
    """The pruned network and what it saves."""

    model: nn.Module
    removed: dict[str, int]  # module name → output channels / neurons removed
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int


def _out_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


def _dead_units(mask: Mask, model: nn.Module) -> dict[nn.Module, set[int]]:
    """Output channels (rows) whose weights the mask removes entirely, per conv / linear."""
    dead: dict[nn.Module, set[int]] = {}
    modules = dict(model.named_modules())
    for pname, m in mask.masks.items():
        mod_name, _, leaf = pname.rpartition(".")
        module = modules.get(mod_name)
        if leaf != "weight" or not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        rows = m.reshape(m.shape[0], -1)
        dead[module] = {int(i) for i in torch.nonzero(~rows.any(1)).flatten()}
    return dead


def prunable_channels(model: nn.Module, mask: Mask, example: Tensor) -> list[tuple[Any, list[int]]]:
    """``[(pruning group, channel indices)]`` that can be removed without changing the output.

    The last layer (the logits) is never pruned.
    """
    import torch_pruning as tp

    model = unwrap(model)
    dead = _dead_units(mask, model)
    with torch.enable_grad():  # the dependency graph is traced through autograd
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    last = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)][-1]
    out_fns = {tp.prune_conv_out_channels, tp.prune_linear_out_channels}
    plans, seen = [], set()
    for module, idxs in dead.items():
        if module is last or not idxs:
            continue
        fn = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else \
            tp.prune_linear_out_channels
        group = dg.get_pruning_group(module, fn, idxs=sorted(idxs))
        producers = [dep.target.module for dep, _ in group if dep.handler in out_fns]
        if any(p is last for p in producers):
            continue
        key = frozenset(id(p) for p in producers)
        if key in seen:
            continue
        seen.add(key)
        # a channel survives unless every producer of it dropped it (residual sums)
        common = set(idxs)
        for p in producers:
            common &= dead.get(p, set())
        n_out = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        if len(common) >= n_out:  # a layer keeps at least one channel
            common = set(sorted(common)[1:])
        if not common:
            continue
        group = dg.get_pruning_group(module, fn, idxs=sorted(common))
        if dg.check_pruning_group(group):
            plans.append((group, sorted(common)))
    return plans


def channel_masked(model: nn.Module, mask: Mask, example: Tensor) -> nn.Module:
    """A copy with the mask applied and every removable channel zeroed in all coupled layers."""
    import torch_pruning as tp

    m = copy.deepcopy(unwrap(model))
    mask.apply_(m)
    zeroed = (tp.prune_conv_out_channels, tp.prune_linear_out_channels,
              tp.prune_batchnorm_out_channels)
    plans = prunable_channels(m, mask, example)  # traces with autograd: outside no_grad
    with torch.no_grad():
        for group, _ in plans:
            for dep, idxs in group:
                layer = dep.target.module
                if not idxs or dep.handler not in zeroed:
                    continue
                ix = torch.as_tensor(sorted({int(i) for i in idxs}), dtype=torch.long)
                for t in (getattr(layer, "weight", None), getattr(layer, "bias", None)):
                    if t is not None:
                        t[ix] = 0
    return m


def count_cost(model: nn.Module, example: Tensor) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass on ``example``."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(unwrap(model), example)
    return int(macs), int(params)


def prune_model(model: nn.Module, mask: Mask, example: Tensor) -> PruneResult:
    """A smaller dense copy of ``model`` computing what :func:`channel_masked` computes."""
    work = channel_masked(model, mask, example)
    macs0, params0 = count_cost(work, example)
    plans = prunable_channels(work, mask, example)
    expected = _output(work, example)  # the channel-masked network's, before the surgery
    names = {id(m): n for n, m in work.named_modules()}
    removed: dict[str, int] = {}
    for group, idxs in plans:
        root = group[0][0].target.module
        removed[names.get(id(root), "?")] = len(idxs)
        group.prune()
    macs1, params1 = count_cost(work, example)
    _check_same_function(expected, work, example)
    return PruneResult(work, removed, params0, params1, macs0, macs1)


class PruneError(ValueError):
    """The pruned network does not compute what the masked one computes."""


@contextmanager
def full_float32() -> Iterator[None]:
    """Float32 convolutions and matrix products in full precision inside the block, not in
    TF32 (cuDNN's default for convolutions on Ampere and later GPUs, which keeps 10 bits of
    each input's mantissa: two computations of one network then differ by about 1e-3 of the
    output, an H200 run of Conv-4 by 2.5e-3, and no comparison tells a mispruned network
    from rounding)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


@torch.no_grad()
def _output(model: nn.Module, example: Tensor) -> Tensor:
    model.eval()
    with full_float32():
        return model(example)


def _check_same_function(expected: Tensor, pruned: nn.Module, example: Tensor,
                         tol: float = 1e-4) -> None:
    """Refuse a pruned network whose output differs from ``expected``, the channel-masked
    network's (a layout the dependency graph misreads, e.g. channels permuted before a Linear),
    by more than ``tol`` of the output's scale."""
    got = _output(pruned, example)
    diff = float((expected - got).abs().max()) if expected.shape == got.shape else math.inf
    scale = max(1.0, float(expected.abs().max()))
    if not diff <= tol * scale:
        raise PruneError(f"the pruned network differs from the masked one by {diff:.3g} on the "
                         f"example input; this architecture is not pruned correctly, use "
                         f"channel_masked() for it instead")


@torch.no_grad()
def cpu_latency(model: nn.Module, example: Tensor, reps: int = 30) -> float:
    """Median CPU forward time (seconds) of ``model`` on ``example``."""
    model = model.eval()
    for _ in range(3):
        model(example)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(example)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def export_onnx(model: nn.Module, example: Tensor, path: str, atol: float = 1e-4) -> float:
    """Export to ONNX and return the max |difference| of onnxruntime's output vs PyTorch's.

    Raises ``RuntimeError`` when the difference exceeds ``atol``.
    """
    import numpy as np
    import onnxruntime as ort

    model = model.eval()
    torch.onnx.export(model, (example,), path, dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"},
                                                             "logits": {0: "batch"}})
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    batch = torch.cat([example, torch.randn_like(example)])
    got = sess.run(None, {"input": batch.numpy()})[0]
    with torch.no_grad():
        want = model(batch).numpy()
    diff = float(np.abs(got - want).max())
    if diff > atol:
        raise RuntimeError(f"ONNX output differs from PyTorch by {diff:.2e} > {atol}")
    return diff
