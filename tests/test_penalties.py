"""A new penalty is one class: registered, it trains, aims and reports through the same code."""

import pytest
import torch
from torch import nn

from dessilbi import DessiLBI, SparsityTarget, lbi_param_groups
from dessilbi.core.penalties import PENALTIES, Group, Lasso, Penalty, get_penalty, register_penalty
from dessilbi.core.units import unit_counts
from dessilbi.sparsity.masks import Mask


class InputChannels(Penalty):
    """Group lasso over input channels (dim 1): a unit is everything that reads one channel."""

    name = "input_channels"

    def _norms(self, t):
        return t.transpose(0, 1).reshape(t.shape[1], -1).norm(dim=1)

    def prox(self, v, lambda_, group_norm="l2"):
        norms = self._norms(v)
        scale = (norms - lambda_).clamp_min(0) / norms.clamp_min(1e-30)
        return v * scale.reshape(1, -1, *([1] * (v.ndim - 2)))

    def unit_norms(self, t, group_norm="l2"):
        return self._norms(t)

    def unit_mask(self, mask):
        return mask.transpose(0, 1).reshape(mask.shape[1], -1).any(dim=1)

    def unit_shaped(self, units, shape):
        return units.reshape(1, -1, *([1] * (len(shape) - 2)))

    def whole_units(self, mask):
        cols = mask.transpose(0, 1).reshape(mask.shape[1], -1)
        return torch.equal(cols.any(1), cols.all(1))


@pytest.fixture
def input_channels():
    penalty = register_penalty(InputChannels())
    yield penalty
    PENALTIES.pop(penalty.name)


def test_builtin_penalties_by_name():
    assert isinstance(get_penalty("lasso"), Lasso) and isinstance(get_penalty("group"), Group)
    w = torch.randn(4, 3, 2, 2)
    assert torch.allclose(get_penalty("group").unit_norms(w), w.flatten(1).norm(dim=1))
    mask = torch.zeros(4, 3, 2, 2, dtype=torch.bool)
    mask[1] = True
    assert get_penalty("group").unit_mask(mask).tolist() == [False, True, False, False]
    assert torch.equal(get_penalty("group").expand(get_penalty("group").unit_mask(mask),
                                                   mask.shape), mask)
    with pytest.raises(ValueError, match="penalty must be one of"):
        get_penalty("ridge")


def test_unit_counts_follow_each_penalty_s_unit(input_channels):
    shape = (4, 3, 2, 2)
    assert [get_penalty(p).unit_count(shape) for p in ("lasso", "group", "input_channels")] \
        == [48, 4, 3]


def test_a_registered_penalty_trains_aims_and_reports(input_channels):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    example = torch.randn(2, 3, 8, 8)
    groups = lbi_param_groups(model, conv_penalty="input_channels", linear_penalty="none",
                              example_inputs=example)
    opt = DessiLBI(groups, lr=0.05)
    target = SparsityTarget(opt, 0.5, 6)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        target.step()
    conv = model[2].weight
    kept, total = unit_counts(opt.support(conv), "input_channels")
    assert total == 8 and 0 < kept < 8  # units are the 8 input channels of the second conv
    assert (conv[:, ~opt.state[conv]["mask"].flatten()] == 0).all()  # fixed: whole channels
    mask = Mask.from_optimizer(model, opt)
    report = mask.report()
    assert report["2.weight"]["filters"] == 8 and report["2.weight"]["filters_kept"] == kept
    assert target.unit_density() == pytest.approx(0.5, abs=0.1)
