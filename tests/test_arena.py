"""Parameters adopted into their flat bucket's memory (core/arena.py): the step writes them in
place, and to everything else they stay independent tensors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from dessilbi import DessiLBI, lbi_param_groups
from dessilbi.core import arena, flat


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10))


def loss_of(model: nn.Module, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    return nn.functional.cross_entropy(model(x), y)


def stepped(model: nn.Module, steps: int = 2, **kw) -> DessiLBI:
    opt = DessiLBI(lbi_param_groups(model), lr=0.1, nu=2.0, lambda_=0.05, **kw)
    for i in range(steps):
        opt.zero_grad()
        loss_of(model, i).backward()
        opt.step()
    return opt


def buckets(opt: DessiLBI) -> list[flat.FlatBucket]:
    return [b for b in opt.__dict__.get("_flat", {}).values() if isinstance(b, flat.FlatBucket)]


def test_a_bucket_adopts_its_parameters_which_keep_storages_of_their_own() -> None:
    model = make_model()
    opt = stepped(model)
    held = buckets(opt)
    assert held and all(b.adopted for b in held)
    for b in held:
        start, end = b.weights.data_ptr(), b.weights.data_ptr() + b.weights.nbytes
        for p in b.params:  # inside the bucket's memory, over a storage of exactly its size
            assert start <= p.data_ptr() < end
            assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
    pointers = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(pointers)) == len(pointers)


def test_an_adopted_parameter_keeps_its_arena_alive() -> None:
    """The bucket (and its ``(R, K)`` tensor) may die with the optimizer while the model
    lives on: each parameter's storage holds the arena's memory."""
    model = make_model()
    opt = stepped(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    del opt
    for _ in range(3):  # memory freed and reused would show up as changed values
        [torch.randn(64, 64) for _ in range(50)]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    stepped(model)  # and a new optimizer adopts them again


def test_a_failed_adoption_moves_no_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    params = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(2, 4))]
    pointers = [p.data_ptr() for p in params]
    wrap = arena.own_storage

    def second_refused(view: torch.Tensor) -> torch.Tensor:
        if view.shape[0] == 2:
            raise BufferError("no DLPack on this device")
        return wrap(view)

    monkeypatch.setattr(arena, "own_storage", second_refused)
    assert arena.adopt(params, 4) is None
    assert [p.data_ptr() for p in params] == pointers
    monkeypatch.setattr(arena, "own_storage", wrap)
    held = arena.adopt(params, 4)
    assert held is not None and params[1].data_ptr() == held[3].data_ptr()


def test_parameters_dlpack_cannot_wrap_are_copied_in_and_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(view: torch.Tensor) -> torch.Tensor:
        raise BufferError("no DLPack on this device")

    monkeypatch.setattr(arena, "own_storage", refuse)
    model, ref = make_model(), make_model()
    pointers = [p.data_ptr() for p in model.parameters()]
    held = buckets(stepped(model, 3))
    stepped(ref, 3, foreach=False)
    assert held and not any(b.adopted for b in held)
    assert [p.data_ptr() for p in model.parameters()] == pointers
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_adopted_parameters_save_load_and_copy_as_independent_tensors() -> None:
    model = make_model()
    stepped(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    # a state dict of tensors sharing a storage is refused by safetensors: these do not
    safetensors = pytest.importorskip("safetensors.torch")
    restored = safetensors.load(safetensors.save(model.state_dict()))
    assert all(torch.equal(restored[k], v) for k, v in model.state_dict().items())
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].weight.add_(1.0)
    assert not torch.equal(twin[0].weight, model[0].weight)


def test_a_parameter_updated_between_forward_and_backward_still_raises() -> None:
    model, ref = make_model(), make_model()
    for net, kw in ((model, {}), (ref, {"foreach": False})):
        opt = stepped(net, **kw)
        loss = loss_of(net)
        opt.step()  # the weights the graph saved change under it
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    assert all(b.adopted for b in buckets(stepped(make_model())))


def test_views_and_shared_storages_are_copied_in_and_out_instead() -> None:
    base = torch.randn(2, 6, 3)
    assert not arena.adoptable(nn.Parameter(base[0]))  # a view of another tensor
    assert not arena.adoptable(torch.randn(4, 4)[:, :2])
    assert not arena.adoptable(torch.randn(4, 4, device="meta"))
    assert arena.adoptable(nn.Parameter(torch.randn(4, 4)))
    assert not arena.adoptable(nn.Parameter(torch.randn(4, 4)).share_memory_())
    assert not arena.adoptable(nn.Parameter(torch.randn(4, 4).to(torch.float8_e4m3fn),
                                            requires_grad=False))

    class Tied(nn.Module):  # two parameters over one storage stay tied
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            data = torch.randn(2, 6, 3)
            self.a = nn.Parameter(data[0])
            self.b = nn.Parameter(data[1])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.a.T + x @ self.b.T

    model, ref = Tied(), Tied()
    x = torch.randn(5, 3)
    opts = []
    for net, kw in ((model, {}), (ref, {"foreach": False})):
        opts.append(DessiLBI(list(net.parameters()), lr=0.1, nu=2.0, lambda_=0.05, **kw))
        for _ in range(3):
            opts[-1].zero_grad()
            net(x).square().mean().backward()
            opts[-1].step()
    held = buckets(opts[0])
    assert held and not any(b.adopted for b in held)
    assert model.a.data_ptr() + model.a.nbytes == model.b.data_ptr()
    assert torch.equal(model.a, ref.a) and torch.equal(model.b, ref.b)


def test_parameters_in_shared_memory_stay_there() -> None:
    """Hogwild training: every process steps the same shared parameters."""
    model = make_model().share_memory()
    pointers = [p.data_ptr() for p in model.parameters()]
    opt = stepped(model, 3)
    held = buckets(opt)
    assert held and not any(b.adopted for b in held)
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert all(p.is_shared() for p in model.parameters())
