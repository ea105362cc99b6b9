"""The compiled C update of the CPU buckets (dessilbi.core.cpu_kernel): against the eager bucket
update bucket by bucket and through the whole optimizer, independent of the thread count,
built once and cached, and left alone where no compiler works."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from bucket_cases import (
    GATHERS,
    HP,
    LAYOUTS,
    SETTINGS,
    THRESHOLDS,
    bucket_pair,
    check_against_eager,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_flat import VARIANTS, make_model, make_opt, train
from torch import nn

from dessilbi import DessiLBI, lbi_param_groups
from dessilbi.core import cpu_kernel, flat

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler here")
real_step = cpu_kernel.step_buckets


@pytest.fixture
def fresh_build(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """The kernel built anew into an empty cache (the loaded one is restored after)."""
    monkeypatch.setenv("DESSILBI_CACHE_DIR", str(tmp_path))
    cpu_kernel.library.cache_clear()
    yield tmp_path
    cpu_kernel.library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("threshold", list(THRESHOLDS), ids=str)
@pytest.mark.parametrize("setting", SETTINGS + GATHERS, ids=str)
def test_one_call_is_the_eager_bucket_step(layout: tuple[str, int], threshold: str,
                                           setting: dict) -> None:
    check_against_eager(cpu_kernel.step_buckets, layout, THRESHOLDS[threshold], setting)


@needs_kernel
@pytest.mark.parametrize("variant", VARIANTS, ids=[str(v) or "defaults" for v in VARIANTS])
def test_the_default_step_is_the_per_tensor_loop(monkeypatch: pytest.MonkeyPatch,
                                                 variant: dict) -> None:
    # thresholds and masks set and lifted on the way (``train``); the same zeros, the same
    # support, the weights within rounding
    calls = []
    monkeypatch.setattr(cpu_kernel, "step_buckets", lambda *args, **kw: calls.append(1) or
                        real_step(*args, **kw))
    ref, new = make_model(), make_model()
    ref_opt, new_opt = make_opt(ref, variant, foreach=False), make_opt(new, variant)
    train(ref, ref_opt, 7)
    train(new, new_opt, 7)
    assert calls, "the default did not take the kernel"
    for p, q in zip(ref.parameters(), new.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        assert torch.equal(q == 0, p == 0)
    for p, q in zip(ref_opt.penalised_params(), new_opt.penalised_params()):
        assert torch.equal(ref_opt.support(p), new_opt.support(q))


@needs_kernel
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_the_result_does_not_depend_on_the_number_of_threads(
        monkeypatch: pytest.MonkeyPatch, layout: tuple[str, int]) -> None:
    monkeypatch.setattr(cpu_kernel, "ENTRIES_PER_THREAD", 4)  # split even these small buckets
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            bucket = bucket_pair(*layout)[1]
            torch.set_num_threads(n)
            cpu_kernel.step_buckets([bucket], [[{}, {}]], [[None, None]], [0.7], **HP)
            results.append((bucket.weights, bucket.buf, bucket.v))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(a is b or torch.equal(a, b) for a, b in zip(results[0], other))


@needs_kernel
def test_a_large_layer_takes_a_bucket_and_fused_false_keeps_it_out() -> None:
    # LeNet-3's 300 x 784 layer: above the eager buckets' limit, the kernel reads its gradient
    # in place, so it joins a bucket of its own
    def bucketed(**kw) -> set[int]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 10))
        opt = DessiLBI(lbi_param_groups(model), lr=0.1, nu=5.0, **kw)
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        held = {id(p) for b in opt.__dict__["_flat"].values()
                if isinstance(b, flat.FlatBucket) for p in b.params}
        return {i for i, p in enumerate(model.parameters()) if id(p) in held}

    assert 0 in bucketed()  # the 300 x 784 weight is the model's first parameter
    assert 0 not in bucketed(fused=False)


@needs_kernel
def test_setting_fused_false_on_a_group_plans_its_buckets_again() -> None:
    # the plan is kept while the same tensors have gradients, and while the group's choice of
    # kernel is the same: fused=False set between steps takes the large layer out
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 10))
    opt = DessiLBI(lbi_param_groups(model), lr=0.1, nu=5.0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))

    def step_and_bucketed() -> bool:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        planned = [opt.__dict__["_flat"][("plan", i)][2] for i in range(len(opt.param_groups))]
        return any(model[1].weight is p for plan in planned for ps in plan.values() for p in ps)

    assert step_and_bucketed()
    for group in opt.param_groups:
        group["fused"] = False
    assert not step_and_bucketed()


@needs_kernel
def test_the_gradients_are_read_in_place_with_no_buffer_for_them() -> None:
    # the bucket's gather buffer (1x the parameters' bytes) is never made: the first step's
    # new momentum rows start at zero, and the gradients are contiguous float32
    model = make_model()
    opt = make_opt(model, {})
    train(model, opt, 3, events=False)
    buckets = [b for b in opt.__dict__["_flat"].values() if isinstance(b, flat.FlatBucket)]
    assert buckets and all(b._grads is None for b in buckets)


@needs_kernel
def test_a_gradient_that_is_not_contiguous_is_copied_in_first() -> None:
    ref, new = make_model(), make_model()
    ref_opt, new_opt = make_opt(ref, {}, foreach=False), make_opt(new, {})
    g = torch.Generator().manual_seed(3)
    for step_index in range(3):
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        for model, opt in ((ref, ref_opt), (new, new_opt)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if step_index == 2:  # the same values in a transposed layout
                weight = model[5].weight
                weight.grad = weight.grad.t().contiguous().t()
            opt.step()
    for p, q in zip(ref.parameters(), new.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_the_kernel_is_built_once_into_the_cache(fresh_build) -> None:
    assert cpu_kernel.library() is not None
    built = list(fresh_build.glob("cpu_kernel_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    cpu_kernel.library.cache_clear()  # a new process, as it were
    assert cpu_kernel.library() is not None
    assert built[0].stat().st_mtime_ns == stamp


def test_without_a_compiler_the_eager_step_stays(fresh_build, monkeypatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert cpu_kernel.library() is None and not cpu_kernel.available()
    ref, new = make_model(), make_model()
    ref_opt, new_opt = make_opt(ref, {}, foreach=False), make_opt(new, {})
    train(ref, ref_opt, 5)
    train(new, new_opt, 5)
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), new.parameters()))


def test_a_compiler_that_fails_leaves_the_eager_step(fresh_build, monkeypatch, caplog) -> None:
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level("WARNING", logger="dessilbi.core.cpu_kernel"):
        assert cpu_kernel.library() is None
    assert "could not be built" in caplog.text


def test_the_kernel_can_be_turned_off(fresh_build, monkeypatch) -> None:
    monkeypatch.setenv("DESSILBI_CPU_KERNEL", "0")
    assert cpu_kernel.library() is None
    assert not list(fresh_build.iterdir())


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(penalty=st.sampled_from(["group", "lasso", "none"]), k=st.integers(1, 70),
       rows=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       momentum=st.sampled_from([0.0, 0.9]), dampening=st.sampled_from([0.0, 0.3]),
       nesterov=st.booleans(), outside=st.booleans(), rms=st.booleans(),
       per_row=st.booleans(), masked=st.booleans(), decay=st.sampled_from([0.0, 0.01]),
       maximize=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_any_bucket_steps_as_the_eager_step(penalty, k, rows, momentum, dampening, nesterov,
                                            outside, rms, per_row, masked, decay, maximize,
                                            seed) -> None:
    # shapes, thresholds and settings drawn at random; the rows split over threads unevenly
    if nesterov and (momentum == 0.0 or dampening != 0.0):
        return  # torch's rule: Nesterov needs momentum and no dampening
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(r, k, generator=gen)) for r in rows]
    states = [{"momentum_buffer": torch.randn(r, k, generator=gen),
               "V": torch.randn(r, k, generator=gen) * 2} for r in rows]
    if penalty == "none":
        for state in states:
            del state["V"]
    eager = flat.FlatBucket(params, states, penalty, k)
    native = copy.deepcopy(eager)
    for bucket in (eager, native):
        for p in bucket.params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1))
    eager.transfer().copy_in()
    lam = (torch.rand(sum(rows), 1, generator=gen) * 2) if per_row else 1.0
    masks = [[torch.rand(p.shape, generator=gen) > 0.3 if masked else None
              for p in eager.params]]
    hp = dict(lr=0.1, kappa=1.3, nu=2.0, group_norm="rms" if rms else "l2", momentum=momentum,
              dampening=dampening, nesterov=nesterov, pull="outside" if outside else "all")
    held = flat.gather([eager], masks, momentum=momentum, dampening=dampening,
                       weight_decay=decay, maximize=maximize)
    flat.update_one(eager, lam, **hp)
    flat.write_back([eager], [[{} for _ in rows]], held, momentum)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_kernel, "ENTRIES_PER_THREAD", 1)
        cpu_kernel.step_buckets([native], [[{} for _ in rows]], masks, [lam],
                                weight_decay=decay, maximize=maximize, **hp)
    for name in ("weights", "buf", "v"):
        want, got = getattr(eager, name), getattr(native, name)
        if want is not None and (name != "buf" or momentum != 0.0):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


@needs_kernel
def test_a_damaged_cached_library_leaves_the_eager_step(fresh_build, caplog) -> None:
    # built but not loaded (a loaded library's file must not be rewritten under it), damaged
    built = cpu_kernel._built(["cc"])
    built.write_bytes(b"not a shared library")
    with caplog.at_level("WARNING", logger="dessilbi.core.cpu_kernel"):
        assert cpu_kernel.library() is None
    assert "could not be built" in caplog.text
