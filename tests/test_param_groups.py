import pytest
import torch
from torch import nn

from dessilbi import DessiLBI, lbi_param_groups


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, bias=False), nn.GroupNorm(2, 8))
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)
        self.head = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(1))  # a layer scale: a vector, no weight decay
        self.table = nn.Parameter(torch.ones(3, 2))  # a free parameter of an unknown kind


def by_name(groups):
    return {g["name"]: g for g in groups}


def ids(params):
    return {id(p) for p in params}


def test_groups_from_module_types():
    net = Net()
    groups = by_name(lbi_param_groups(net, weight_decay=1e-4, linear_penalty="lasso",
                                      keep_classifier=False))
    assert ids(groups["conv"]["params"]) == ids([net.conv.weight, net.body[0].weight])
    assert groups["conv"]["penalty"] == "group" and groups["conv"]["weight_decay"] == 1e-4
    assert ids(groups["linear"]["params"]) == ids([net.fc.weight, net.head.weight])
    assert groups["linear"]["penalty"] == "lasso"
    no_decay = [net.conv.bias, net.bn.weight, net.bn.bias, net.body[1].weight, net.body[1].bias,
                net.ln.weight, net.ln.bias, net.fc.bias, net.head.bias, net.scale]
    assert ids(groups["no_decay"]["params"]) == ids(no_decay)
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["no_decay"]["penalty"] == "none"
    assert ids(groups["other"]["params"]) == ids([net.table])
    assert groups["other"]["weight_decay"] == 1e-4
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(net.parameters()))


def test_names_do_not_matter():
    # a BatchNorm called "conv" and a conv called "bn": types decide, not names
    net = nn.Module()
    net.bn = nn.Conv2d(1, 2, 3)
    net.conv = nn.BatchNorm2d(2)
    groups = by_name(lbi_param_groups(net))
    assert ids(groups["conv"]["params"]) == ids([net.bn.weight])
    assert id(net.conv.weight) in ids(groups["no_decay"]["params"])


@pytest.mark.parametrize("how", ["name", "module", "type"])
def test_exclude(how):
    net = Net()
    item = {"name": "head", "module": net.head, "type": None}[how]
    if how == "type":
        groups = by_name(lbi_param_groups(net, exclude=[nn.Conv2d]))
        assert "conv" not in groups
        assert id(net.conv.weight) in ids(groups["other"]["params"])
        return
    groups = by_name(lbi_param_groups(net, exclude=[item], keep_classifier=False))
    assert ids(groups["linear"]["params"]) == ids([net.fc.weight])
    assert id(net.head.weight) in ids(groups["other"]["params"])


def test_exclude_parent_excludes_children():
    net = Net()
    groups = by_name(lbi_param_groups(net, exclude=["body"]))
    assert ids(groups["conv"]["params"]) == ids([net.conv.weight])


def test_options_penalties_and_errors():
    net = Net()
    groups = by_name(lbi_param_groups(
        net, conv_penalty="lasso", linear_penalty="group",
        conv_options={"lambda_": 0.1, "group_norm": "rms"},
    ))
    assert groups["conv"]["penalty"] == "lasso" and groups["conv"]["lambda_"] == 0.1
    assert groups["linear"]["penalty"] == "group"
    with pytest.raises(ValueError, match="invalid conv_penalty="):
        lbi_param_groups(net, conv_penalty="auto")
    with pytest.raises(ValueError, match="invalid exclude='nope'"):
        lbi_param_groups(net, exclude=["nope"])
    with pytest.raises(ValueError, match="invalid weight_decay="):
        lbi_param_groups(net, weight_decay=-1.0)


def test_shared_parameters_appear_once_and_work_with_optimizer():
    net = Net()
    net.tied = net.fc  # the same module twice
    groups = lbi_param_groups(net)
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))
    opt = DessiLBI(groups, lr=0.1)
    assert opt.penalty_of(net.fc.weight) == "group"
    assert opt.penalty_of(net.bn.weight) == "none"


def test_default_structure_removes_neurons_and_keeps_the_classifier():
    net = Net()
    groups = by_name(lbi_param_groups(net))
    assert groups["linear"]["penalty"] == "group"
    assert ids(groups["linear"]["params"]) == ids([net.fc.weight])
    assert id(net.head.weight) in ids(groups["other"]["params"])


class Shuffled(nn.Module):
    """The classifier is registered first but called last: only the forward pass tells."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(6, 3)
        self.hidden = nn.Linear(4, 6)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))


def test_classifier_found_from_the_forward_pass():
    net = Shuffled()
    groups = by_name(lbi_param_groups(net, example_inputs=torch.zeros(2, 4)))
    assert ids(groups["linear"]["params"]) == ids([net.hidden.weight])
    assert id(net.out.weight) in ids(groups["other"]["params"])


class RmsNorm(nn.Module):
    """Like timm's RmsNorm: a normalisation layer that is not a subclass of torch's."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Tokens(nn.Module):
    """A ViT-like model: a class token and position embeddings declared by no_weight_decay()."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.embed = nn.Linear(4, 8)
        self.norm = RmsNorm(8)
        self.gamma = nn.Parameter(torch.ones(8))  # a LayerScale of its own
        self.mix = nn.Parameter(torch.ones(8, 8))
        self.head = nn.Linear(8, 2)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.embed(x)], 1)
        t = self.norm(t + self.pos_embed) * self.gamma @ self.mix
        return self.head(t[:, 0])


def test_norms_layer_scales_and_declared_parameters_get_no_weight_decay() -> None:
    net = Tokens()
    groups = {g["name"]: g for g in lbi_param_groups(net, weight_decay=0.05)}
    no_decay = ids(groups["no_decay"]["params"])
    for p in (net.cls_token, net.pos_embed, net.norm.weight, net.gamma, net.embed.bias):
        assert id(p) in no_decay
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert ids(groups["other"]["params"]) == ids([net.mix, net.head.weight])  # + classifier
    assert groups["other"]["weight_decay"] == 0.05
    assert id(net.embed.weight) in ids(groups["linear"]["params"])



def test_transposed_convolutions_are_not_grouped_by_input_channel():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ConvTranspose2d(4, 6, 3), nn.Flatten(),
                        nn.LazyLinear(2))
    net(torch.zeros(1, 1, 8, 8))
    groups = {g["name"]: g for g in lbi_param_groups(net)}
    assert ids(groups["conv"]["params"]) == ids([net[0].weight])
    assert id(net[1].weight) in ids(groups["other"]["params"])  # (in, out, k, k): not penalised
