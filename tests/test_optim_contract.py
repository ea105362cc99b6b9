"""torch's optimizer contract, checked on DessiLBI the way torch checks its own optimizers
(the generic checks of torch's ``test_optim.py``), over every implementation: the default
(flat buckets on CPU), the per-tensor loop, the multi-tensor (foreach) kernels and the
compiled (fused) step."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from dessilbi import DessiLBI, lbi_param_groups, unwrap_optimizer
from dessilbi.sparsity import Mask

# "default": on the CPU the compiled C kernel (dessilbi.core.cpu_kernel) where a compiler is;
# "eager": the eager bucket step, bit-identical to the per-tensor loop
IMPLEMENTATIONS = {"default": {}, "eager": {"fused": False}, "per-tensor": {"foreach": False},
                   "foreach": {"foreach": True}, "fused": {"fused": True}}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 12), nn.ReLU(),
                         nn.Linear(12, 3))


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


def make_opt(model: nn.Module, impl: str, **kw) -> DessiLBI:
    groups = lbi_param_groups(model, linear_penalty="lasso", keep_classifier=False)
    return DessiLBI(groups, lr=0.05, nu=5.0, lambda_=0.05, **IMPLEMENTATIONS[impl], **kw)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for i in steps:
        x, y = batch(i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], exact: bool = True) -> None:
    for x, y in zip(a, b):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_state_dict_round_trip_into_rebuilt_parameters(impl: str) -> None:
    model = make_model()
    opt = make_opt(model, impl)
    train(model, opt, range(3))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train(model, opt, range(3, 6))
    # rebuilt from scratch, as after a restart
    model2 = make_model(seed=1)
    model2.load_state_dict(saved_model)
    opt2 = make_opt(model2, impl)
    opt2.load_state_dict(saved_opt)
    train(model2, opt2, range(3, 6))
    assert_same(weights(model), weights(model2))
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for name, t in s1[k].items():
            assert torch.equal(t, s2[k][name]), (k, name)


def test_state_dict_is_deterministic_and_survives_deepcopy_and_pickle() -> None:
    model = make_model()
    opt = make_opt(model, "per-tensor")
    train(model, opt, range(2))
    a, b = opt.state_dict(), opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.state_dict()["param_groups"] == a["param_groups"]
    copied = copy.deepcopy(opt)
    for k, st in a["state"].items():
        for name, t in st.items():
            assert torch.equal(t, copied.state_dict()["state"][k][name])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_every_implementation_agrees_with_the_per_tensor_loop(impl: str) -> None:
    ref, other = make_model(), make_model()
    train(ref, make_opt(ref, "per-tensor"), range(5))
    opt = make_opt(other, impl)
    train(other, opt, range(5))
    assert_same(weights(ref), weights(other), exact=impl in ("per-tensor", "eager"))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_steps_under_inference_mode_keep_the_model_trainable(impl: str) -> None:
    """torch's optimizers step under ``torch.inference_mode()``; DessiLBI's buckets moved the
    parameters into an inference-mode arena there, which autograd then refused."""
    ref, other = make_model(), make_model()
    train(ref, make_opt(ref, impl), range(4))
    opt = make_opt(other, impl)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    for i in range(4):
        x, y = batch(i)
        opt.zero_grad()
        nn.functional.cross_entropy(other(x), y).backward()
        with torch.inference_mode():
            opt.step()
    assert not any(p.is_inference() for p in other.parameters())
    assert calls == ["pre", "post"] * 4  # one step each, as outside inference mode
    assert_same(weights(ref), weights(other))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_late_first_gradient_leaves_the_other_buffers_alone(impl: str) -> None:
    """A layer unfrozen at step 3 starts its own momentum; the others keep theirs."""
    model = make_model()
    opt = make_opt(model, impl)
    late = model[3].weight
    late.requires_grad_(False)
    train(model, opt, range(3))
    late.requires_grad_(True)
    ref = make_model()
    ref.load_state_dict(model.state_dict())
    ref_opt = make_opt(ref, "per-tensor")
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # not aliasing its tensors
    for group in ref_opt.param_groups:  # the saved groups carry the implementation flags
        group.update(fused=False, foreach=False)
    train(model, opt, range(3, 4))
    train(ref, ref_opt, range(3, 4))
    ref_bufs = [ref_opt.state[q]["momentum_buffer"] for q in ref.parameters()]
    new_bufs = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    assert_same(new_bufs, ref_bufs, exact=impl in ("per-tensor", "eager"))
    g = late.grad
    torch.testing.assert_close(opt.state[late]["momentum_buffer"], g)  # b ← g at its start


def training_step(model: nn.Module, opt: DessiLBI, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def check_compiled_step_matches_eager(impl: str, device: str = "cpu", steps: int = 3) -> None:
    """A ``torch.compile``-d training step gives the eager step's weights."""
    eager, compiled = make_model().to(device), make_model().to(device)
    opt_e, opt_c = make_opt(eager, impl), make_opt(compiled, impl)
    fast = torch.compile(training_step)
    for i in range(steps):
        x, y = (t.to(device) for t in batch(i))
        training_step(eager, opt_e, x, y)
        fast(compiled, opt_c, x, y)
    for p, q in zip(weights(eager), weights(compiled)):
        torch.testing.assert_close(p, q, rtol=1e-4 if device != "cpu" else 1e-5,
                                   atol=1e-5 if device != "cpu" else 1e-6)


def test_compiled_training_step_with_conv_layers_matches_eager() -> None:
    for impl in ("default", "per-tensor", "fused"):
        check_compiled_step_matches_eager(impl)


def test_many_fused_optimizers_over_new_shapes_never_crash() -> None:
    for width in range(2, 13):  # 11 optimizers, each with shapes of its own
        torch.manual_seed(width)
        model = nn.Sequential(nn.Conv2d(1, width, 3), nn.Flatten(), nn.Linear(width * 36, 2))
        opt = DessiLBI(lbi_param_groups(model), lr=0.1, nu=5.0, fused=True)
        x = torch.randn(4, 1, 8, 8)
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_hooks_and_schedulers(impl: str) -> None:
    model = make_model()
    opt = make_opt(model, impl)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=4)  # cycles momentum
    for i in range(4):
        train(model, opt, range(i, i + 1))
        sched.step()
    assert calls == ["pre", "post"] * 4
    assert opt.param_groups[0]["momentum"] != 0.9  # the schedule's momentum was used
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(dtype: torch.dtype) -> None:
    model = make_model().to(dtype)
    opt = make_opt(model, "per-tensor")
    x, y = batch(0)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x.to(dtype)), y).backward()
    opt.step()
    for p in opt.penalised_params():
        assert opt.state[p]["V"].dtype == dtype and opt.gamma(p).dtype == dtype


def test_named_parameters_are_accepted_and_kept() -> None:
    model = make_model()
    opt = DessiLBI(model.named_parameters(), lr=0.1, nu=5.0)
    names = [n for n, _ in model.named_parameters()]
    assert opt.param_groups[0]["param_names"] == names
    assert opt.state_dict()["param_groups"][0]["param_names"] == names
    train(model, opt, range(2))
    grouped = DessiLBI([{"params": list(model[0].named_parameters()), "lambda_": 0.5}], lr=0.1)
    assert grouped.param_groups[0]["param_names"] == ["weight", "bias"]


def test_inputs_torch_refuses_are_refused() -> None:
    p = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(TypeError, match="set"):
        DessiLBI({p}, lr=0.1)
    with pytest.raises(TypeError, match="set"):
        DessiLBI([{"params": {p}}], lr=0.1)
    with pytest.raises(ValueError, match="complex"):
        DessiLBI([nn.Parameter(torch.zeros(2, 2, dtype=torch.complex64))], lr=0.1)
    with pytest.raises(ValueError, match="twice"):
        DessiLBI([p, p], lr=0.1)
    opt = DessiLBI([p], lr=0.1)
    with pytest.raises(ValueError, match="more than one"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


def test_add_param_group_keeps_the_callers_dict() -> None:
    a, b = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(3, 2))
    opt = DessiLBI([a], lr=0.1)
    group = {"params": [b], "lr": 0.01}
    opt.add_param_group(group)
    assert opt.param_groups[-1] is group
    group["lr"] = 0.001  # as with torch's optimizers, the caller's dict is the group
    assert opt.param_groups[-1]["lr"] == 0.001


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_maximize_in_a_param_group_is_honoured(impl: str) -> None:
    up, down = make_model(), make_model()
    groups_up = lbi_param_groups(up, linear_penalty="lasso", keep_classifier=False)
    for g in groups_up:
        g["maximize"] = True
    opt_up = DessiLBI(groups_up, lr=0.05, nu=5.0, lambda_=0.05, **IMPLEMENTATIONS[impl])
    opt_down = make_opt(down, impl)
    for i in range(3):
        x, y = batch(i)
        opt_up.zero_grad()
        (-nn.functional.cross_entropy(up(x), y)).backward()
        opt_up.step()
        opt_down.zero_grad()
        nn.functional.cross_entropy(down(x), y).backward()
        opt_down.step()
    assert_same(weights(up), weights(down), exact=impl != "fused")


def test_without_momentum_every_stepped_parameter_has_state() -> None:
    model = make_model()
    opt = DessiLBI(lbi_param_groups(model), lr=0.1, nu=5.0, momentum=0.0)
    train(model, opt, range(1))
    for p in model.parameters():
        assert "momentum_buffer" in opt.state[p] and opt.state[p]["momentum_buffer"] is None
    assert len(opt.state_dict()["state"]) == len(list(model.parameters()))


@pytest.mark.parametrize("impl", ["default", "per-tensor", "foreach"])
def test_no_host_synchronisation_inside_step(monkeypatch: pytest.MonkeyPatch, impl: str) -> None:
    model = make_model()
    opt = make_opt(model, impl)
    train(model, opt, range(1))  # state created
    x, y = batch(1)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("a tensor was read on the host inside step()")

    for name in ("item", "__float__", "__bool__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    opt.step()
    monkeypatch.undo()


class Wrapper:
    """What accelerate and Lightning hand to user code: the optimizer inside another object."""

    def __init__(self, optimizer: torch.optim.Optimizer, attr: str) -> None:
        setattr(self, attr, optimizer)


@pytest.mark.parametrize("attr", ["optimizer", "_optimizer"])
def test_helpers_accept_wrapped_optimizers(attr: str) -> None:
    model = make_model()
    opt = make_opt(model, "per-tensor")
    train(model, opt, range(2))
    wrapped = Wrapper(Wrapper(opt, attr), "optimizer")
    assert unwrap_optimizer(wrapped) is opt
    mask = Mask.from_optimizer(model, wrapped)
    assert set(mask.masks) == set(Mask.from_optimizer(model, opt).masks)
    with pytest.raises(TypeError, match="DessiLBI"):
        unwrap_optimizer(Wrapper(torch.optim.SGD(model.parameters(), lr=0.1), attr))


@pytest.mark.parametrize("impl", ["default", "per-tensor", "foreach"])
def test_dtensor_parameters_step_as_plain_ones(impl: str) -> None:
    """Parameters sharded by FSDP2 or tensor parallelism are ``DTensor``s: they take the
    per-tensor step (no flat bucket, no shared scratch buffer) and give the same numbers."""
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])

        # make_model without its batch norm, whose statistics would stay plain tensors
        def model() -> nn.Module:
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(6 * 4 * 4, 12), nn.ReLU(),
                                 nn.Linear(12, 3))

        plain, sharded = model(), model()
        for module in sharded.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                module.register_parameter(name, nn.Parameter(
                    distribute_tensor(p.detach(), mesh, [Shard(0)])))
        opts = [make_opt(m, impl) for m in (plain, sharded)]
        for i in range(3):
            x, y = batch(i)
            for model, opt in zip((plain, sharded), opts):
                opt.zero_grad()
                out = model(x if model is plain else distribute_tensor(x, mesh, [Replicate()]))
                out = out if model is plain else out.full_tensor()
                nn.functional.cross_entropy(out, y).backward()
                opt.step()
        for p, q in zip(plain.parameters(), sharded.parameters()):
            torch.testing.assert_close(p, q.full_tensor(), rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
