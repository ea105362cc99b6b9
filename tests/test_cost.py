import pytest
import torch

from dessilbi import DessiLBI, lbi_param_groups
from dessilbi.core.units import classifier_of
from dessilbi.sparsity.masks import Mask
from dessilbi.structure.cost import MacsModel
from dessilbi.structure.prune import count_cost, prune_model
from dessilbi.zoo.models import create_model


def penalised(model, example):
    head = classifier_of(model, example)
    opt = DessiLBI(lbi_param_groups(model, linear_penalty="group", exclude=[head]), lr=0.1)
    return opt.penalised_params()


def random_ranks(params, generator):
    """Each unit's position in one random global order."""
    sizes = [p.shape[0] for p in params]
    order = torch.randperm(sum(sizes), generator=generator)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return list(rank.split(sizes))


def prefix_mask(model, params, ranks, k):
    """The units among the first ``k`` of the order (a layer keeps at least one)."""
    names = {id(p): n for n, p in model.named_parameters()}
    masks = {}
    for p, r in zip(params, ranks):
        keep = r < k
        keep[r.argmin()] = True
        masks[names[id(p)]] = keep.reshape(-1, *([1] * (p.ndim - 1))).expand(p.shape).clone()
    return Mask(masks, {n: "group" for n in masks})


@pytest.mark.parametrize("name, shape", [
    ("lenet5", (1, 28, 28)), ("conv4", (1, 28, 28)), ("vgg16_bn", (3, 32, 32)),
    ("resnet20", (3, 32, 32))])
def test_the_cost_of_a_prefix_is_the_pruned_networks_macs(name, shape):
    """Within 0.015 of what the pruned network counts (pooling and activations are not in the
    model), residual sums included: a summed channel lives while any producer keeps it."""
    torch.manual_seed(0)
    model = create_model(name, 10, shape[0], shape[1]).eval()
    example = torch.randn(1, *shape)
    params = penalised(model, example)
    cost = MacsModel.from_model(model, example, params)
    dense = count_cost(model, example)[0]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        ranks = random_ranks(params, g)
        n = sum(r.numel() for r in ranks)
        k = int(torch.randint(n // 10, n, (1,), generator=g))
        pruned = prune_model(model, prefix_mask(model, params, ranks, k), example).model
        real = count_cost(pruned, example)[0] / dense
        assert float(cost(ranks)[k]) == pytest.approx(real, abs=0.015)


def test_every_prefix_at_once_and_monotone():
    model = create_model("resnet20", 10, 3, 32)
    example = torch.randn(1, 3, 32, 32)
    params = penalised(model, example)
    ranks = random_ranks(params, torch.Generator().manual_seed(0))
    values = MacsModel.from_model(model, example, params)(ranks)
    assert values.shape == (sum(r.numel() for r in ranks) + 1,)
    assert values[-1] == pytest.approx(1.0) and values[0] < 0.05  # the stem sees every pixel
    assert bool((values[1:] >= values[:-1]).all())
