"""The flat-bucket step (core/flat.py), the default on CPU: the same numbers as the per-tensor
loop, bit for bit, whatever changes between steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dessilbi import DessiLBI, lbi_param_groups
from dessilbi.core import cpu_kernel, flat


@pytest.fixture(autouse=True)
def eager_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The eager bucket step (bit-identical to the per-tensor loop), as where no C compiler is:
    the compiled CPU kernel has tests of its own (tests/test_cpu_kernel.py)."""
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)


VARIANTS = [{}, {"nesterov": True}, {"momentum": 0.0}, {"dampening": 0.3},
            {"weight_decay": 1e-3}, {"maximize": True}, {"group_norm": "rms"},
            {"nu": float("inf")}, {"penalty": "lasso"}, {"pull": "outside"}, {"kappa": 1.5},
            {"pull": "outside", "penalty": "lasso", "kappa": 0.7}]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10))


def make_opt(model: nn.Module, variant: dict, **impl) -> DessiLBI:
    kw = {"lr": 0.1, "nu": 2.0, "lambda_": 0.05, **variant, **impl}
    if kw.get("penalty") == "lasso":
        return DessiLBI(list(model.parameters()), **kw)
    return DessiLBI(lbi_param_groups(model), **kw)


def train(model: nn.Module, opt: DessiLBI, steps: int, events: bool = True) -> None:
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if events and i == 2:  # what SparsityTarget does: a threshold and a mask per tensor
            first, second = opt.penalised_params()[:2]
            opt.state[first]["lambda_"] = 0.2
            opt.set_mask(second, torch.rand(second.shape, generator=g) > 0.3)
            bias = model[0].bias  # a mask on an unpenalised tensor (lbi_param_groups)
            opt.set_mask(bias, torch.rand(bias.shape, generator=g) > 0.5)
        if events and i == 4:
            opt.set_mask(second, None)


@pytest.mark.parametrize("variant", VARIANTS, ids=[str(v) or "defaults" for v in VARIANTS])
def test_the_flat_step_is_the_per_tensor_loop_bit_for_bit(variant: dict) -> None:
    ref, new = make_model(), make_model()
    ref_opt, new_opt = make_opt(ref, variant, foreach=False), make_opt(new, variant)
    train(ref, ref_opt, 7)
    train(new, new_opt, 7)
    assert new_opt.__dict__.get("_flat"), "the default did not take the flat step"
    for p, q in zip(ref.parameters(), new.parameters()):
        assert torch.equal(p, q)
        for key, held in ref_opt.state[p].items():
            other = new_opt.state[q][key]
            assert torch.equal(held, other) if isinstance(held, torch.Tensor) else held == other


def test_the_state_is_views_into_the_buckets_and_survives_a_reload() -> None:
    model = make_model()
    opt = make_opt(model, {})
    train(model, opt, 3, events=False)
    conv = model[0].weight
    buckets = [b for b in opt.__dict__["_flat"].values() if isinstance(b, flat.FlatBucket)]
    owner = next(b for b in buckets if any(p is conv for p in b.params))
    assert opt.state[conv]["V"].untyped_storage().data_ptr() == \
        owner.v.untyped_storage().data_ptr()
    # a state loaded from elsewhere is copied into new buckets, then stepped as before
    twin_model = make_model()
    twin_model.load_state_dict(model.state_dict())
    twin = make_opt(twin_model, {})
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a file: no aliasing
    train(model, opt, 2, events=False)
    train(twin_model, twin, 2, events=False)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


def test_a_parameter_given_new_storage_is_followed() -> None:
    model = make_model()
    opt = make_opt(model, {})
    train(model, opt, 2, events=False)
    w = model[0].weight
    w.data = w.data.clone()  # what model.to() / .half() and friends do
    before = w.detach().clone()
    train(model, opt, 1, events=False)
    assert not torch.equal(w, before)  # the step wrote into the new storage


def test_large_and_channels_last_tensors_take_the_per_tensor_step() -> None:
    big = torch.zeros(flat.MAX_NUMEL + 1)
    conv = torch.zeros(4, 3, 3, 3).to(memory_format=torch.channels_last)
    assert not flat.eligible(big, "none")
    assert not flat.eligible(conv, "group")
    assert flat.eligible(torch.zeros(4, 3, 3, 3), "group")
    model = make_model().to(memory_format=torch.channels_last)
    ref = make_model().to(memory_format=torch.channels_last)
    opt, ref_opt = make_opt(model, {}), make_opt(ref, {}, foreach=False)
    train(model, opt, 3)
    train(ref, ref_opt, 3)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_the_gradient_buffer_holds_w_minus_gamma_unless_it_is_the_step_direction() -> None:
    for variant, separate in (({}, False), ({"nesterov": True}, True), ({"momentum": 0.0}, True)):
        model = make_model()
        opt = make_opt(model, variant)
        train(model, opt, 2, events=False)
        buckets = [b for b in opt.__dict__["_flat"].values()
                   if isinstance(b, flat.FlatBucket) and b.penalty != "none"]
        assert buckets and all((b.gap is not None) == separate for b in buckets), variant


def test_a_lone_large_tensor_skips_the_bucket_and_steps_the_same() -> None:
    assert flat.worth_bucketing([torch.zeros(flat.SOLO_NUMEL)])
    assert not flat.worth_bucketing([torch.zeros(flat.SOLO_NUMEL + 1)])
    assert flat.worth_bucketing([torch.zeros(flat.SOLO_NUMEL + 1)] * 2)
    # where buckets update together (CUDA) a lone tensor costs one operation more: worth it
    assert flat.worth_bucketing([torch.zeros(flat.SOLO_NUMEL + 1, device="meta")]) is False
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flat, "batched_on", lambda device: True)
        assert flat.worth_bucketing([torch.zeros(flat.SOLO_NUMEL + 1)])

    def mlp() -> nn.Module:  # 100×200 = 20,000 entries, the only tensor with rows of 200
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 200), nn.ReLU(),
                             nn.Linear(200, 100), nn.ReLU(), nn.Linear(100, 10))

    model, ref = mlp(), mlp()
    opt, ref_opt = make_opt(model, {}), make_opt(ref, {}, foreach=False)
    train(model, opt, 5, events=False)
    train(ref, ref_opt, 5, events=False)
    bucketed = {id(p) for b in opt.__dict__["_flat"].values()
                if isinstance(b, flat.FlatBucket) for p in b.params}
    assert id(model[3].weight) not in bucketed and id(model[1].bias) in bucketed
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("variant", VARIANTS, ids=[str(v) or "defaults" for v in VARIANTS])
def test_the_batched_step_is_the_per_tensor_loop_bit_for_bit(
        monkeypatch: pytest.MonkeyPatch, variant: dict) -> None:
    # CUDA's form of the bucket step (multi-tensor operations across buckets), forced on the CPU
    from dessilbi.core import flat_plan

    monkeypatch.setattr(flat_plan, "batched_on", lambda device: True)
    test_the_flat_step_is_the_per_tensor_loop_bit_for_bit(variant)


GROUP_SETTINGS = [{"lr": 0.05}, {"momentum": 0.5, "dampening": 0.2}, {"nesterov": True},
                  {"lr": 0.2, "kappa": 2.0, "momentum": 0.0}]


def test_groups_with_their_own_hyper_parameters_update_together_bit_for_bit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the stages shared by the groups whose settings agree on them (momentum, the W step) must
    # still give each group its own numbers
    from dessilbi.core import flat_plan

    monkeypatch.setattr(flat_plan, "batched_on", lambda device: True)
    models = [make_model(), make_model()]
    opts = []
    for model, impl in zip(models, ({"foreach": False}, {})):
        groups = lbi_param_groups(model)
        assert len(groups) == len(GROUP_SETTINGS)
        for group, settings in zip(groups, GROUP_SETTINGS):
            group.update(settings)
        opts.append(DessiLBI(groups, lr=0.1, nu=2.0, lambda_=0.05, **impl))
    for model, opt in zip(models, opts):
        train(model, opt, 6)
    assert opts[1].__dict__.get("_flat"), "the default did not take the flat step"
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)
        for key, held in opts[0].state[p].items():
            if isinstance(held, torch.Tensor):
                assert torch.equal(held, opts[1].state[q][key]), key


class CountOps(TorchDispatchMode):
    """The aten operations dispatched (each at least one kernel launch on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(depth: int, **impl) -> tuple[int, int]:
    """(operations of a step, flat buckets) of a convolutional model of ``depth`` layers whose
    input widths all differ, so that each layer has a bucket of its own."""
    torch.manual_seed(0)
    widths = [3] + [4 + i for i in range(depth)]
    layers = [m for c_in, c_out in zip(widths, widths[1:])
              for m in (nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU())]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(widths[-1] * 8 * 8, 10))
    opt = DessiLBI(lbi_param_groups(model), lr=0.1, nu=2.0, **impl)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    for step in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step < 2:
            opt.step()
    with CountOps() as counted:
        opt.step()
    buckets = [b for b in opt.__dict__.get("_flat", {}).values() if isinstance(b, flat.FlatBucket)]
    return counted.count, len(buckets)


def test_a_step_launches_one_operation_per_bucket_and_a_few_for_all(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from dessilbi.core import flat_plan

    monkeypatch.setattr(flat_plan, "batched_on", lambda device: True)
    monkeypatch.setattr(flat, "batched_on", lambda device: True)
    (shallow, few), (deep, many) = ops_per_step(2), ops_per_step(10)
    assert many >= few + 8  # a bucket per layer
    # per bucket its filter norms (a row reduction) and W − V·shrink, whose column broadcasts
    # over the rows: a multi-tensor addcmul would launch one kernel per tensor all the same
    assert deep - shallow == 2 * (many - few)
    assert shallow <= 25
    # the multi-tensor path makes a few operations per tensor
    assert ops_per_step(10, foreach=True)[0] > 2 * deep


class Tagged(torch.Tensor):
    """A tensor subclass, as FSDP's DTensor or a quantisation wrapper would be."""


def test_tensor_subclasses_stay_out_of_the_buckets() -> None:
    plain, tagged = make_model(), make_model()
    for module in tagged.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(p.detach().as_subclass(Tagged)))
    opts = [make_opt(m, {}) for m in (plain, tagged)]
    train(plain, opts[0], 4)
    train(tagged, opts[1], 4)
    held = [b for b in opts[1].__dict__.get("_flat", {}).values() if isinstance(b, flat.FlatBucket)]
    assert not held
    for p, q in zip(plain.parameters(), tagged.parameters()):
        torch.testing.assert_close(p, q.as_subclass(torch.Tensor), rtol=1e-6, atol=1e-7)


def test_a_lone_large_tensor_takes_a_bucket_where_buckets_update_together(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from dessilbi.core import flat_plan

    monkeypatch.setattr(flat_plan, "batched_on", lambda device: True)
    monkeypatch.setattr(flat, "batched_on", lambda device: True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 200), nn.ReLU(),
                          nn.Linear(200, 100), nn.ReLU(), nn.Linear(100, 10))
    ref = copy.deepcopy(model)
    opt, ref_opt = make_opt(model, {}), make_opt(ref, {}, foreach=False)
    train(model, opt, 5, events=False)
    train(ref, ref_opt, 5, events=False)
    bucketed = {id(p) for b in opt.__dict__["_flat"].values()
                if isinstance(b, flat.FlatBucket) for p in b.params}
    assert {id(p) for p in model.parameters()} == bucketed
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
