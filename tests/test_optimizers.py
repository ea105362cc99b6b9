import math

import pytest
import torch
from torch import nn

from dessilbi import DessiLBI
from dessilbi.core.optimizers import OPTIMIZERS, AdaBound, OptimizerConfig, create_optimizer


def model():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_builds_and_steps(name):
    m = model()
    opt = create_optimizer(OptimizerConfig(name=name, lr=0.01, weight_decay=1e-4), m)
    before = [p.detach().clone() for p in m.parameters()]
    m(torch.randn(4, 1, 4, 4)).sum().backward()
    opt.step()
    assert any(not torch.equal(p, b) for p, b in zip(m.parameters(), before))
    if name == "dessilbi":
        assert isinstance(opt, DessiLBI)
    else:
        # biases and the BatchNorm get no weight decay
        for g in opt.param_groups:
            if any(p is m[1].weight for p in g["params"]):
                assert g["weight_decay"] == 0.0


def test_named_variants():
    m = model()
    assert create_optimizer(OptimizerConfig(name="nesterov"), m).param_groups[0]["nesterov"]
    assert create_optimizer(OptimizerConfig(name="amsgrad"), m).param_groups[0]["amsgrad"]
    wd = create_optimizer(OptimizerConfig(name="sgd-momentum-wd"), m)
    assert max(g["weight_decay"] for g in wd.param_groups) == 1e-4
    with pytest.raises(ValueError, match="unknown optimizer"):
        create_optimizer(OptimizerConfig(name="lion"), m)


def test_adabound_matches_its_paper_update():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, dtype=torch.float64))
    ref = w.detach().clone()
    lr, final_lr, gamma, b1, b2, eps = 1e-2, 0.1, 1e-3, 0.9, 0.999, 1e-8
    opt = AdaBound([w], lr=lr, final_lr=final_lr, gamma=gamma, eps=eps)
    m = torch.zeros_like(ref)
    v = torch.zeros_like(ref)
    for t in range(1, 31):
        g = torch.randn(5, dtype=torch.float64)
        w.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        eta = lr * math.sqrt(1 - b2**t) / (1 - b1**t) / (v.sqrt() + eps)
        lower = final_lr * (1 - 1 / (gamma * t + 1))
        upper = final_lr * (1 + 1 / (gamma * t))
        ref = ref - eta.clamp(lower, upper) * m
        torch.testing.assert_close(w.detach(), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="invalid gamma"):
        AdaBound([w], gamma=2.0)


def test_the_fused_flag_forces_compilation_and_its_absence_leaves_the_choice_to_dessilbi():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    chosen = create_optimizer(OptimizerConfig(name="dessilbi"), model)
    forced = create_optimizer(OptimizerConfig(name="dessilbi", fused=True), model)
    assert chosen.defaults["fused"] is None and forced.defaults["fused"] is True
