"""The Triton kernels of ``fused=True`` on CUDA (dessilbi.core.triton_update), checked on CPU
tensors by Triton's interpreter: against the eager bucket update one bucket at a time, and
through the whole optimizer with the CUDA routing forced.

The interpreter must be on before Triton is imported, so the checks run in a child pytest
process with ``TRITON_INTERPRET=1`` (:func:`test_the_kernels_under_the_interpreter`); in the
parent process they are skipped.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_flat import VARIANTS, make_model, make_opt, train

from dessilbi import DessiLBI, lbi_param_groups
from dessilbi.core import flat, flat_plan, triton_update

pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="run by the interpreter's child process")


@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
def test_the_kernels_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" in done.stdout  # the checks did run


@given(st.integers(1, 1 << 16))
def test_a_row_is_one_block_up_to_the_limit(k: int) -> None:
    block = triton_update.row_block(k)
    assert block & (block - 1) == 0 and block >= 16
    assert block >= k if k <= triton_update.MAX_ROW_BLOCK else block == triton_update.MAX_ROW_BLOCK


def test_the_kernels_are_used_on_cuda_only() -> None:
    assert not triton_update.fused_on(torch.device("cpu"))
    assert triton_update.fused_on(torch.device("cuda")) == triton_update.available()


def bucket_pair(penalty: str, k: int) -> tuple[flat.FlatBucket, flat.FlatBucket]:
    """Two identical buckets of two tensors (the second with a larger V), gradients in."""
    gen = torch.Generator().manual_seed(k)
    params = [torch.nn.Parameter(torch.randn(4, k, generator=gen)),
              torch.nn.Parameter(torch.randn(3, k, generator=gen))]
    states = [{"momentum_buffer": torch.randn(p.shape, generator=gen),
               "V": scale * torch.randn(p.shape, generator=gen)}
              for p, scale in zip(params, (0.5, 3.0))]
    if penalty == "none":
        for state in states:
            del state["V"]
    eager = flat.FlatBucket(params, states, penalty, k)
    eager.grads.copy_(torch.randn(eager.grads.shape, generator=gen))
    return eager, copy.deepcopy(eager)


THRESHOLDS = {"one": 1.0, "per row": torch.tensor([[0.5]] * 4 + [[30.0]] * 3)}
SETTINGS = [{}, {"nesterov": True}, {"momentum": 0.0}, {"dampening": 0.3},
            {"group_norm": "rms"}, {"nu": float("inf")}, {"pull": "outside"},
            {"pull": "outside", "kappa": 1.5}]


@interpreted
@pytest.mark.parametrize("layout", [("group", 27), ("group", 5000), ("lasso", 9), ("none", 1)],
                         ids=str)
@pytest.mark.parametrize("threshold", list(THRESHOLDS), ids=str)
@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_one_kernel_is_the_eager_bucket_update(layout: tuple[str, int], threshold: str,
                                              setting: dict) -> None:
    # K = 5000 sweeps its rows in two blocks; the per-row thresholds of 30 leave the second
    # tensor's rows outside supp(Γ), so the outside pull has rows of each kind
    eager, fused = bucket_pair(*layout)
    hp = dict(lr=0.1, kappa=1.0, nu=3.0, group_norm="l2", momentum=0.9, dampening=0.0,
              nesterov=False, pull="all") | setting
    lam = THRESHOLDS[threshold]
    flat.update_one(eager, lam, **hp)
    triton_update.update_bucket(fused, lam, **hp)
    for name in ("weights", "buf", "v"):
        want, got = getattr(eager, name), getattr(fused, name)
        if want is not None and (name != "buf" or hp["momentum"] != 0.0):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)


GATHERS = [{"weight_decay": 0.01}, {"maximize": True}, {"mask": True},
           {"mask": True, "weight_decay": 0.01, "maximize": True, "pull": "outside"},
           {"mask": True, "dampening": 0.3, "starting": True}]


@interpreted
@pytest.mark.parametrize("layout", [("group", 27), ("lasso", 9), ("none", 1)], ids=str)
@pytest.mark.parametrize("setting", GATHERS, ids=str)
def test_the_gather_in_the_kernel_is_the_eager_gather(layout: tuple[str, int],
                                                     setting: dict) -> None:
    # sign, mask and weight decay applied in the kernel, W masked after; a tensor taking its
    # first step (``starting``) makes the bucket gather first, as the eager step does
    eager, fused = bucket_pair(*layout)
    hp = dict(lr=0.1, kappa=1.0, nu=3.0, group_norm="l2", momentum=0.9, dampening=0.0,
              nesterov=False, pull="all") | setting
    mask, starting = hp.pop("mask", False), hp.pop("starting", False)
    decay, maximize = hp.pop("weight_decay", 0.0), hp.pop("maximize", False)
    gen = torch.Generator().manual_seed(5)
    masks = [[torch.rand(p.shape, generator=gen) > 0.4 if mask else None for p in eager.params]]
    for bucket in (eager, fused):
        bucket.starting = [starting, False]
    held = flat.gather([eager], masks, momentum=0.9, dampening=hp["dampening"],
                       weight_decay=decay, maximize=maximize)
    flat.update_one(eager, 1.0, **hp)
    flat.write_back([eager], [[{}, {}]], held, 0.9)
    triton_update.step_buckets([fused], [[{}, {}]], masks, [1.0], weight_decay=decay,
                               maximize=maximize, **hp)
    for name in ("weights", "buf", "v"):
        want, got = getattr(eager, name), getattr(fused, name)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)
    if mask:
        assert torch.equal(fused.weights == 0, held[0] == 0)
    assert fused.starting == [False, False]


@interpreted
@pytest.mark.parametrize("variant", VARIANTS, ids=[str(v) or "defaults" for v in VARIANTS])
def test_fused_steps_the_buckets_as_the_default_does(monkeypatch: pytest.MonkeyPatch,
                                                     variant: dict) -> None:
    # the CUDA routing forced on the CPU: the buckets of a fused group take the kernels (the
    # interpreter runs them); thresholds and masks set and lifted on the way (``train``)
    monkeypatch.setattr(flat_plan, "batched_on", lambda device: True)
    monkeypatch.setattr(flat_plan, "fused_on", lambda device: True)
    launched = []
    monkeypatch.setattr(flat_plan, "fused_step", lambda buckets, *args, **hp: launched.append(
        buckets) or triton_update.step_buckets(buckets, *args, **hp))
    ref, new = make_model(), make_model()
    ref_opt, new_opt = make_opt(ref, variant), make_opt(new, variant, fused=True)
    train(ref, ref_opt, 5)
    train(new, new_opt, 5)
    assert launched, "the fused group did not take the kernels"
    for p, q in zip(ref.parameters(), new.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5)
        assert torch.equal(q == 0, p == 0)  # the same support and masks
    assert torch.equal(torch.cat([m.flatten() for m in ref_opt.masks().values()]),
                       torch.cat([m.flatten() for m in new_opt.masks().values()]))


@interpreted
def test_groups_that_are_not_fused_keep_the_eager_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flat_plan, "batched_on", lambda device: True)
    monkeypatch.setattr(flat_plan, "fused_on", lambda device: True)
    launched: list[flat.FlatBucket] = []
    monkeypatch.setattr(flat_plan, "fused_step",
                        lambda buckets, *args, **hp: launched.extend(buckets))
    model = make_model()
    groups = lbi_param_groups(model)
    groups[0]["fused"] = True
    opt = DessiLBI(groups, lr=0.1, nu=2.0)
    train(model, opt, 2, events=False)
    fused = {id(p) for p in groups[0]["params"]}
    assert launched and all(id(p) in fused for b in launched for p in b.params)


@interpreted
def test_a_kernel_that_cannot_compile_leaves_the_step_to_the_eager_path(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # the second bucket's kernel fails to compile: nothing may have been written by then, the
    # step is the eager one, and the kernels are not tried again
    from triton.runtime.interpreter import InterpretedFunction

    compiled = []

    def warmup(self, *args, grid, **kwargs):
        compiled.append(self)
        if len(compiled) == 2:
            raise RuntimeError("no binary for this device")

    monkeypatch.setattr(InterpretedFunction, "warmup", warmup)
    monkeypatch.setattr(flat_plan, "batched_on", lambda device: True)
    monkeypatch.setattr(flat_plan, "fused_on", lambda device: True)
    ref, new = make_model(), make_model()
    ref_opt, new_opt = make_opt(ref, {}), make_opt(new, {}, fused=True)
    with caplog.at_level("WARNING", logger="dessilbi.core.flat_plan"):
        train(ref, ref_opt, 3)
        train(new, new_opt, 3)
    assert len(compiled) == 2  # tried once, then left alone
    assert sum("could not be compiled" in r.message for r in caplog.records) == 1
    for p, q in zip(ref.parameters(), new.parameters()):
        assert torch.equal(p, q)  # bit for bit: the eager step all along


@interpreted
def test_each_kernel_variant_is_compiled_once_per_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    from triton.runtime.interpreter import InterpretedFunction

    compiled: list[tuple] = []
    monkeypatch.setattr(InterpretedFunction, "warmup",
                        lambda self, *args, grid, **kw: compiled.append(kw["MASKED"]))
    monkeypatch.setattr(flat_plan, "batched_on", lambda device: True)
    monkeypatch.setattr(flat_plan, "fused_on", lambda device: True)
    model = make_model()
    opt = make_opt(model, {}, fused=True)
    train(model, opt, 2, events=False)
    buckets = [b for b in opt.__dict__["_flat"].values() if isinstance(b, flat.FlatBucket)]
    assert compiled == [False] * len(buckets)
    train(model, opt, 4)  # a mask is set on the third step: its bucket needs a new variant
    assert compiled.count(True) >= 1 and compiled.count(False) == len(buckets)
