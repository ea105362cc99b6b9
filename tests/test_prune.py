import copy

import pytest
import torch
from torch import nn

from dessilbi import DessiLBI, lbi_param_groups
from dessilbi.sparsity.masks import Mask
from dessilbi.structure.prune import channel_masked, cpu_latency, export_onnx, prune_model
from dessilbi.zoo.models import create_model


def randomise_bn(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model.eval()


def penalties(model):
    return {n: ("group" if p.ndim == 4 else "lasso") for n, p in model.named_parameters()
            if p.ndim >= 2}


@pytest.mark.parametrize("name", ["lenet5", "conv4", "vgg16_bn", "resnet20"])
@pytest.mark.parametrize("kind", ["random", "gamma"])
def test_masked_equals_pruned(name, kind):
    torch.manual_seed(0)
    model = randomise_bn(create_model(name, 10, 1, 28))
    x = torch.randn(3, 1, 28, 28)
    if kind == "random":
        mask = Mask.random_like(Mask.from_magnitude(model, penalties(model), 0.5), seed=1)
    else:  # a real Γ support after a few DessiLBI steps
        opt = DessiLBI(lbi_param_groups(model, conv_options={"lambda_": 0.5},
                                        linear_options={"lambda_": 0.02}),
                       lr=0.05, nu=0.2, lambda_=1.0)
        model.train()
        for _ in range(4):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2])).backward()
            opt.step()
        model.eval()
        mask = Mask.from_optimizer(model, opt)
    res = prune_model(model, mask, x)
    ref = channel_masked(model, mask, x).eval()
    with torch.no_grad():
        torch.testing.assert_close(res.model.eval()(x), ref(x), rtol=0, atol=1e-5)
    assert res.params_after <= res.params_before and res.macs_after <= res.macs_before
    if kind == "random":
        assert res.params_after < res.params_before and res.removed


def test_residual_channels_pruned_only_when_all_branches_drop_them():
    torch.manual_seed(0)
    model = randomise_bn(create_model("resnet20", 10, 1, 28))
    x = torch.randn(2, 1, 28, 28)
    pens = penalties(model)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()
             if n in pens}
    # drop filter 3 of one block's second conv only: the residual sum keeps channel 3 alive
    masks["layer1.0.conv2.weight"][3] = False
    res = prune_model(model, Mask(masks, pens), x)
    assert res.model.layer1[0].conv2.out_channels == 16
    # drop it in every producer of that residual stream: now it goes
    for n in list(masks):
        if n == "conv1.weight" or (n.startswith("layer1.") and n.endswith("conv2.weight")):
            masks[n][3] = False
    res = prune_model(model, Mask(masks, pens), x)
    assert res.model.layer1[0].conv2.out_channels == 15
    with torch.no_grad():
        ref = channel_masked(model, Mask(masks, pens), x).eval()
        torch.testing.assert_close(res.model(x), ref(x), rtol=0, atol=1e-5)


def test_pruned_model_saves_loads_and_exports(tmp_path):
    torch.manual_seed(0)
    model = create_model("conv4", 10, 1, 28).eval()
    x = torch.randn(1, 1, 28, 28)
    mask = Mask.from_magnitude(model, penalties(model), 0.4)
    res = prune_model(model, mask, x)
    torch.save(res.model, tmp_path / "pruned.pt")
    loaded = torch.load(tmp_path / "pruned.pt", weights_only=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), res.model(x))
    diff = export_onnx(res.model, x, str(tmp_path / "pruned.onnx"))
    assert diff < 1e-4
    assert cpu_latency(res.model, x, reps=3) > 0
    assert copy.deepcopy(res.model) is not None



class ChannelsLast(nn.Module):
    """Permutes the channels to the last axis before its Linear: a layout the dependency graph
    reads as channel-major."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).permute(0, 2, 3, 1).flatten(1))


def test_a_network_pruned_wrongly_is_refused():
    from dessilbi.sparsity import Mask
    from dessilbi.structure.prune import PruneError, prune_model

    torch.manual_seed(0)
    model = ChannelsLast()
    keep = torch.tensor([True, False, True, True]).reshape(4, 1, 1, 1).expand(4, 1, 3, 3)
    mask = Mask({"conv.weight": keep.clone()}, {"conv.weight": "group"})
    with pytest.raises(PruneError, match="differs from the masked one"):
        prune_model(model, mask, torch.randn(2, 1, 6, 6))


class RecordsPrecision(nn.Module):
    """A network that notes whether TF32 was allowed at each forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.tf32: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.tf32.append((torch.backends.cudnn.allow_tf32,
                          torch.backends.cuda.matmul.allow_tf32))
        return self.fc(self.conv(x).flatten(1))


def test_the_pruned_network_is_checked_in_full_float32_and_the_flags_come_back(monkeypatch):
    # on a GPU cuDNN's TF32 convolutions made the check refuse a correctly pruned Conv-4
    # (2.5e-3 apart on an H200); the check's forward passes must run without TF32
    from dessilbi.sparsity import Mask

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    torch.manual_seed(0)
    model = RecordsPrecision()
    keep = torch.tensor([True, False, True, True]).reshape(4, 1, 1, 1).expand(4, 1, 3, 3)
    result = prune_model(model, Mask({"conv.weight": keep.clone()}, {"conv.weight": "group"}),
                         torch.randn(2, 1, 6, 6))
    # prune_model works on a copy: its passes are the returned network's; the two of the
    # check (before the surgery and after) without TF32, the cost counts as the user set it
    assert result.model.tf32.count((False, False)) == 2
    assert (True, True) in result.model.tf32
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32

