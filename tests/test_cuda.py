"""The optimizer and the training loop on a CUDA device (skipped without one): every
implementation agrees with the CPU reference, a compiled training step with conv layers works,
``step`` never synchronises with the host, mixed precision and bf16 parameters train, and a
whole run goes through the engine."""

from __future__ import annotations

import pytest
import torch
from test_optim_contract import (
    IMPLEMENTATIONS,
    batch,
    check_compiled_step_matches_eager,
    make_model,
    make_opt,
    weights,
)
from torch import nn

from dessilbi import DessiLBI, lbi_param_groups
from dessilbi.core.flat import FlatBucket
from dessilbi.training.config import TrainConfig
from dessilbi.training.engine import train as train_run

pytestmark = pytest.mark.cuda


def train_on(model: nn.Module, opt: torch.optim.Optimizer, steps: range, device: str,
             scaler: torch.amp.GradScaler | None = None) -> None:
    for i in steps:
        x, y = (t.to(device) for t in batch(i))
        opt.zero_grad()
        with torch.autocast(device, dtype=torch.float16, enabled=scaler is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_every_implementation_on_cuda_matches_the_cpu_reference(impl: str) -> None:
    cpu, gpu = make_model(), make_model().cuda()
    opt_cpu, opt_gpu = make_opt(cpu, "per-tensor"), make_opt(gpu, impl)
    train_on(cpu, opt_cpu, range(6), "cpu")
    train_on(gpu, opt_gpu, range(6), "cuda")
    for p, q in zip(weights(cpu), weights(gpu)):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-4, atol=1e-5)
    for p, q in zip(opt_cpu.penalised_params(), opt_gpu.penalised_params()):
        assert torch.equal(opt_cpu.support(p), opt_gpu.support(q).cpu())
    buckets = [b for b in opt_gpu.__dict__.get("_flat", {}).values() if isinstance(b, FlatBucket)]
    assert bool(buckets) == (impl in ("default", "eager", "fused"))  # buckets on CUDA too
    assert all(b.adopted for b in buckets)  # and they hold the parameters themselves


def test_adopted_cuda_parameters_are_independent_tensors_that_outlive_the_optimizer() -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    model = make_model().cuda()
    opt = make_opt(model, "default")
    train_on(model, opt, range(3), "cuda")
    buckets = [b for b in opt.__dict__["_flat"].values() if isinstance(b, FlatBucket)]
    assert buckets and all(b.adopted for b in buckets)
    for b in buckets:
        start, end = b.weights.data_ptr(), b.weights.data_ptr() + b.weights.nbytes
        for p in b.params:
            assert start <= p.data_ptr() < end
            assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    restored = safetensors.load(safetensors.save(model.state_dict()))
    assert all(torch.equal(restored[k].cuda(), v) for k, v in state.items())
    del opt, buckets, b
    torch.cuda.empty_cache()
    [torch.randn(256, 256, device="cuda") for _ in range(20)]  # reuse what was freed
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    train_on(model, make_opt(model, "default"), range(2), "cuda")


@pytest.mark.parametrize("impl", ["default", "fused"])
def test_a_compiled_training_step_with_conv_layers_runs_on_cuda(impl: str) -> None:
    check_compiled_step_matches_eager(impl, "cuda", steps=4)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_step_never_synchronises_with_the_host_on_cuda(impl: str) -> None:
    model = make_model().cuda()
    opt = make_opt(model, impl)
    train_on(model, opt, range(2), "cuda")  # state created, compiled kernels warmed up
    x, y = (t.cuda() for t in batch(2))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_gradscaler_skips_a_step_with_an_infinite_gradient() -> None:
    model = make_model().cuda()
    opt = make_opt(model, "default")
    scaler = torch.amp.GradScaler("cuda")
    train_on(model, opt, range(3), "cuda", scaler)
    before = weights(model)
    v_before = [opt.state[p]["V"].clone() for p in opt.penalised_params()]
    x, y = (t.cuda() for t in batch(3))
    opt.zero_grad()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    next(model.parameters()).grad[0].fill_(float("inf"))
    scaler.step(opt)
    scaler.update()
    for p, q in zip(before, weights(model)):
        assert torch.equal(p, q)
    for p, v in zip(opt.penalised_params(), v_before):
        assert torch.equal(opt.state[p]["V"], v)


@pytest.mark.parametrize("fused", [None, True])  # the eager buckets, the Triton kernels
def test_bf16_parameters_train_on_cuda(fused: bool | None) -> None:
    model = make_model().cuda().to(torch.bfloat16)
    opt = DessiLBI(lbi_param_groups(model), lr=0.05, nu=5.0, lambda_=0.05, fused=fused)
    start = weights(model)
    for i in range(3):
        x, y = batch(i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.cuda().bfloat16()), y.cuda()).backward()
        opt.step()
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(start, weights(model)))
    assert all(opt.state[p]["V"].dtype == torch.bfloat16 for p in opt.penalised_params())


@pytest.mark.parametrize("amp", ["none", "fp16", "bf16"])
def test_a_run_trains_on_cuda(tmp_path, amp: str) -> None:
    cfg = TrainConfig(model="lenet3", dataset="synthetic", synthetic_size=[256, 1, 28, 10],
                      epochs=2, batch_size=32, runs_dir=str(tmp_path), progress=False,
                      tensorboard=False, device="cuda", amp=amp, target_density=0.5)
    final = train_run(cfg)["final"]
    assert final["full_acc"] > 0.1 and abs(final["unit_density"] - 0.5) <= 0.05
