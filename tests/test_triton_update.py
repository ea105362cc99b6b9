"""The Triton kernels of ``fused=True`` on CUDA (dessilbi.core.triton_update), checked on CPU
tensors by Triton's interpreter: against the eager bucket update one bucket at a time, and
through the whole optimizer with the CUDA routing forced.

The interpreter must be on before Triton is imported, so the checks run in a child pytest
process with ``TRITON_INTERPRET=1`` (:func:`test_the_kernels_under_the_interpreter`); in the
parent process they are skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from bucket_cases import GATHERS, LAYOUTS, SETTINGS, THRESHOLDS, check_against_eager
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


@interpreted
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("threshold", list(THRESHOLDS), ids=str)
@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_one_kernel_is_the_eager_bucket_update(layout: tuple[str, int], threshold: str,
                                              setting: dict) -> None:
    check_against_eager(triton_update.step_buckets, layout, THRESHOLDS[threshold], setting)


@interpreted
@pytest.mark.parametrize("layout", LAYOUTS[::2], ids=str)
@pytest.mark.parametrize("setting", GATHERS, ids=str)
def test_the_gather_in_the_kernel_is_the_eager_gather(layout: tuple[str, int],
                                                     setting: dict) -> None:
    # sign, mask and weight decay applied in the kernel, W masked after; a tensor taking its
    # first step (``starting``) makes the bucket gather first, as the eager step does
    check_against_eager(triton_update.step_buckets, layout, 1.0, setting)


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
