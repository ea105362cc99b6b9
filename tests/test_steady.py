"""The replayed CPU step (dessilbi.core.steady): taken in the steady state, bit for bit the
general path's, and left for the general path whenever something it relied on changed."""

import copy

import pytest
import torch
from torch import nn

from dessilbi import DessiLBI, SparsityTarget, coupled_parameters, lbi_param_groups
from dessilbi.core import cpu_kernel, flat_plan, optim

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler here")


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 36, 20), nn.ReLU(), nn.Linear(20, 10))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 10, (8,), generator=g))
            for _ in range(n)]


def pair(**kw):
    """Two copies of the same model and optimizer (the tests keep the second from replaying:
    its cached replay is dropped before every step)."""
    model = net()
    out = []
    for _ in range(2):
        m = copy.deepcopy(model)
        out.append((m, DessiLBI(lbi_param_groups(m), lr=0.05, momentum=0.9, **kw)))
    return out


def replay_of(opt):
    return opt.__dict__.get("_flat", {}).get("steady")


def drop_replay(opt):
    opt.__dict__.setdefault("_flat", {})["steady"] = None


def backward(model, x, y):
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


def same(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_the_steady_state_replays_without_planning(monkeypatch):
    model = net()
    opt = DessiLBI(lbi_param_groups(model), lr=0.05, momentum=0.9)
    data = batches(4)
    backward(model, *data[0])
    opt.step()  # the general path: plans, builds the buckets and the replay
    assert replay_of(opt) is not None
    planned = []
    monkeypatch.setattr(optim, "plan_buckets", lambda *a: planned.append(a))
    for x, y in data[1:]:
        backward(model, x, y)
        opt.step()
    assert planned == []  # every later step replayed


def same_state(o1, o2):
    for p, q in zip(o1.state.values(), o2.state.values()):
        for key in p:
            if isinstance(p[key], torch.Tensor):
                assert torch.equal(p[key], q[key]), key


def test_bit_for_bit_the_general_path_under_schedules_and_a_target():
    (m1, o1), (m2, o2) = pair()
    scheds = [torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in (o1, o2)]
    x0 = batches(1)[0][0][:1]
    targets = [SparsityTarget(o, 0.5, 12, coupled=coupled_parameters(m, x0))
               for m, o in ((m1, o1), (m2, o2))]
    replays = []

    def between(i, opt):
        if opt is o2:
            drop_replay(opt)  # the general path, every step
        elif replay_of(opt) is not None:
            replays.append(i)
        if i == 5:
            opt.param_groups[0]["weight_decay"] = 1e-3
        if i == 7:
            opt.param_groups[0]["maximize"] = True

    for i, (x, y) in enumerate(batches(12)):
        for m, o, t, s in zip((m1, m2), (o1, o2), targets, scheds):
            backward(m, x, y)
            between(i, o)
            o.step()
            t.step()
            s.step()
    same(m1, m2)
    same_state(o1, o2)
    assert targets[0].frozen and targets[1].frozen  # the masks were fixed on the way
    assert len(replays) >= 8


@pytest.mark.parametrize("change", ["freeze", "unfreeze", "load_state_dict", "add_group",
                                    "eager", "momentum_off", "strided_grad", "set_mask",
                                    "replace_buffer"])
def test_a_change_goes_back_to_the_general_path(change):
    (m1, o1), (m2, o2) = pair()
    data = batches(8)
    head = m1[-1].weight, m2[-1].weight
    extra = [nn.Parameter(torch.ones(3)) for _ in range(2)]

    def apply(i, which):
        model, opt = ((m1, o1), (m2, o2))[which]
        if i != 3:
            return
        if change == "freeze":
            model[-1].weight.grad = None
        elif change == "unfreeze":  # from step 3 a tensor gets its first gradient
            pass
        elif change == "load_state_dict":
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        elif change == "add_group":
            opt.add_param_group({"params": [extra[which]], "penalty": "none"})
        elif change == "eager":
            for group in opt.param_groups:
                group["fused"] = False
        elif change == "momentum_off":
            for group in opt.param_groups:
                group["momentum"] = 0.0
        elif change == "strided_grad":  # not contiguous: copied in, not read in place
            w = model[4].weight
            w.grad = w.grad.t().contiguous().t()
        elif change == "replace_buffer":  # the state changed by hand: the bucket must see it
            state = opt.state[model[4].weight]
            state["momentum_buffer"] = state["momentum_buffer"] * 0.5
        elif change == "set_mask":
            opt.set_mask(model[0].weight, torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
                         .reshape(6, 1, 1, 1))

    for i, (x, y) in enumerate(data):
        for which, (m, o) in enumerate(((m1, o1), (m2, o2))):
            if change == "unfreeze" and i < 3:
                m[-1].weight.requires_grad_(False)
            elif change == "unfreeze":
                m[-1].weight.requires_grad_(True)
            backward(m, x, y)
            if change == "add_group" and i >= 3:
                extra[which].grad = torch.full((3,), 0.5)
            apply(i, which)
            if which == 1:
                drop_replay(o)
            o.step()
    same(m1, m2)
    same_state(o1, o2)
    assert torch.equal(*head)
    # back to replaying once the change is planned in, except off the kernel (fused=False)
    assert (replay_of(o1) is None) == (change == "eager")


def test_a_step_the_kernel_did_not_take_is_not_replayed(monkeypatch):
    # float32 CPU buckets routed as on CUDA (all groups together, eager): whatever the buckets
    # could take, only a step that went through the kernel is replayed
    monkeypatch.setattr(flat_plan, "batched_on", lambda device: True)
    model = net()
    opt = DessiLBI(lbi_param_groups(model), lr=0.05, momentum=0.9)
    for x, y in batches(3):
        backward(model, x, y)
        opt.step()
        assert replay_of(opt) is None
