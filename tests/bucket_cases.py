"""Cases shared by the tests of the compiled bucket updates (tests/test_triton_update.py,
tests/test_cpu_kernel.py): a bucket and its twin, the settings to try, and the check of a
compiled step against the eager one of dessilbi.core.flat."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from dessilbi.core import flat

LAYOUTS = [("group", 27), ("group", 5000), ("lasso", 9), ("none", 1)]  # 5000: two row blocks
# the per-row thresholds of 30 leave the second tensor's rows outside supp(Γ)
THRESHOLDS = {"one": 1.0, "per row": torch.tensor([[0.5]] * 4 + [[30.0]] * 3)}
SETTINGS = [{}, {"nesterov": True}, {"momentum": 0.0}, {"dampening": 0.3},
            {"group_norm": "rms"}, {"nu": float("inf")}, {"pull": "outside"},
            {"pull": "outside", "kappa": 1.5}]
GATHERS = [{"weight_decay": 0.01}, {"maximize": True}, {"mask": True},
           {"mask": True, "weight_decay": 0.01, "maximize": True, "pull": "outside"},
           {"mask": True, "starting": True}, {"mask": True, "dampening": 0.3, "starting": True}]
HP = dict(lr=0.1, kappa=1.0, nu=3.0, group_norm="l2", momentum=0.9, dampening=0.0,
          nesterov=False, pull="all", weight_decay=0.0, maximize=False)

Step = Callable[..., None]  # (buckets, states, masks, lams, **hyper-parameters)


def bucket_pair(penalty: str, k: int) -> tuple[flat.FlatBucket, flat.FlatBucket]:
    """Two identical buckets of two tensors (the second with a larger V), their gradients in
    the bucket's buffer and in each parameter's ``.grad``."""
    gen = torch.Generator().manual_seed(k)
    params = [torch.nn.Parameter(torch.randn(4, k, generator=gen)),
              torch.nn.Parameter(torch.randn(3, k, generator=gen))]
    states = [{"momentum_buffer": torch.randn(p.shape, generator=gen),
               "V": scale * torch.randn(p.shape, generator=gen)}
              for p, scale in zip(params, (0.5, 3.0))]
    if penalty == "none":
        for state in states:
            del state["V"]
    eager = flat.FlatBucket(params, states, penalty, k)
    eager.grads.copy_(torch.randn(eager.grads.shape, generator=gen))
    twin = copy.deepcopy(eager)
    for bucket in (eager, twin):
        for p, g in zip(bucket.params, bucket.grad_views):
            p.grad = g.clone()
    return eager, twin


def check_against_eager(step: Step, layout: tuple[str, int], lam: torch.Tensor | float,
                        setting: dict[str, Any], tol: float = 1e-6) -> None:
    """One step of a bucket by ``step`` against the eager gather, update and write-back;
    ``setting`` may also ask for masks (``mask``) and a tensor's first step (``starting``)."""
    eager, compiled = bucket_pair(*layout)
    hp = HP | setting
    mask, starting = hp.pop("mask", False), hp.pop("starting", False)
    decay, maximize = hp.pop("weight_decay"), hp.pop("maximize")
    gen = torch.Generator().manual_seed(5)
    masks = [[torch.rand(p.shape, generator=gen) > 0.4 if mask else None for p in eager.params]]
    for bucket in (eager, compiled):
        bucket.starting = [starting, False]
    held = flat.gather([eager], masks, momentum=hp["momentum"], dampening=hp["dampening"],
                       weight_decay=decay, maximize=maximize)
    flat.update_one(eager, lam, **hp)
    flat.write_back([eager], [[{}, {}]], held, hp["momentum"])
    step([compiled], [[{}, {}]], masks, [lam], weight_decay=decay, maximize=maximize, **hp)
    for name in ("weights", "buf", "v"):
        want, got = getattr(eager, name), getattr(compiled, name)
        if want is not None and (name != "buf" or hp["momentum"] != 0.0):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=name)
    if mask:
        assert torch.equal(compiled.weights == 0, held[0] == 0)
    assert compiled.starting == [False, False]
