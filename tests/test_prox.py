import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dessilbi.core.penalties import prox
from dessilbi.core.prox import (
    group_norms,
    group_scale,
    group_soft_threshold,
    soft_threshold,
)

# magnitudes far from underflow, where a computed norm of a non-zero group is non-zero
floats = st.one_of(st.just(0.0), st.floats(1e-6, 10), st.floats(-10, -1e-6))
lams = st.floats(0, 5, allow_nan=False, width=64)


def t(a):
    return torch.as_tensor(a, dtype=torch.float64)


@settings(max_examples=200, deadline=None)
@given(arrays("float64", st.integers(1, 30), elements=floats), lams)
def test_soft_threshold_properties(a, lam):
    v = t(a)
    out = soft_threshold(v, lam)
    # zero iff |v| <= λ
    assert torch.equal(out == 0, v.abs() <= lam)
    # sign kept, magnitude shrunk by exactly λ above the threshold
    above = v.abs() > lam
    assert torch.equal(torch.sign(out[above]), torch.sign(v[above]))
    torch.testing.assert_close(out[above].abs(), v[above].abs() - lam, rtol=0, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(
    arrays("float64", st.integers(1, 20), elements=floats),
    arrays("float64", st.integers(1, 20), elements=floats),
    lams,
)
def test_soft_threshold_non_expansive(a, b, lam):
    n = min(len(a), len(b))
    x, y = t(a[:n]), t(b[:n])
    gap = (soft_threshold(x, lam) - soft_threshold(y, lam)).abs().max()
    assert gap <= (x - y).abs().max() + 1e-12


group_arrays = st.tuples(st.integers(1, 6), st.integers(1, 6)).flatmap(
    lambda s: arrays("float64", s, elements=floats)
)


@settings(max_examples=200, deadline=None)
@given(group_arrays, lams, st.sampled_from(["l2", "rms"]))
def test_group_soft_threshold_properties(a, lam, norm):
    v = t(a)
    out = group_soft_threshold(v, lam, dim=0, group_norm=norm)
    n = v[0].numel()
    norms = v.norm(dim=1) / (math.sqrt(n) if norm == "rms" else 1.0)
    out_norms = out.norm(dim=1) / (math.sqrt(n) if norm == "rms" else 1.0)
    zero_rows = (out == 0).all(dim=1)
    # a group is zero iff its norm is <= λ
    assert torch.equal(zero_rows, norms <= lam)
    alive = ~zero_rows
    # direction kept (same sign everywhere), norm shrunk by exactly λ
    assert torch.all(torch.sign(out[alive]) == torch.sign(v[alive]))
    torch.testing.assert_close(out_norms[alive], norms[alive] - lam, rtol=1e-9, atol=1e-9)
    assert not torch.isnan(out).any()


@settings(max_examples=100, deadline=None)
@given(group_arrays, lams, st.sampled_from(["l2", "rms"]), st.integers(0, 2**31 - 1))
def test_group_soft_threshold_non_expansive(a, lam, norm, seed):
    x = t(a)
    y = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    px = group_soft_threshold(x, lam, group_norm=norm)
    py = group_soft_threshold(y, lam, group_norm=norm)
    assert (px - py).norm() <= (x - y).norm() + 1e-9


def test_zero_group_stays_zero_without_nan():
    v = torch.zeros(3, 4, 2, 2)
    v[1] = 5.0
    for lam in (0.0, 1.0):
        out = group_soft_threshold(v, lam)
        assert torch.isfinite(out).all()
        assert (out[0] == 0).all() and (out[2] == 0).all()
    assert (group_scale(torch.zeros(2, 3), 0.5) == 0).all()


def test_group_dim_and_channels_last():
    v = torch.randn(5, 3, 3, 3).to(memory_format=torch.channels_last)
    out = group_soft_threshold(v, 1.0)
    ref = group_soft_threshold(v.contiguous(), 1.0)
    torch.testing.assert_close(out, ref)
    # grouping along dim 1 equals grouping the transposed tensor along dim 0
    w = torch.randn(4, 6)
    torch.testing.assert_close(
        group_soft_threshold(w, 0.7, dim=1), group_soft_threshold(w.t(), 0.7, dim=0).t()
    )
    assert group_norms(w, dim=1).shape == (6,)


def test_rms_equals_scaled_l2_threshold():
    v = torch.randn(6, 8, dtype=torch.float64)
    lam = 0.3
    rms = group_soft_threshold(v, lam, group_norm="rms")
    # selection rule: rms norm > λ  <=>  l2 norm > λ √n
    keep = v.norm(dim=1) > lam * math.sqrt(8)
    assert torch.equal((rms != 0).any(dim=1), keep)


def test_prox_dispatch_and_errors():
    v = torch.randn(3, 4)
    torch.testing.assert_close(prox(v, "lasso", 0.5), soft_threshold(v, 0.5))
    torch.testing.assert_close(prox(v, "group", 0.5), group_soft_threshold(v, 0.5))
    torch.testing.assert_close(prox(v, "none", 0.5), v)
    with pytest.raises(ValueError, match="penalty"):
        prox(v, "l1", 0.5)
    with pytest.raises(ValueError, match="lambda_"):
        soft_threshold(v, -1.0)
    with pytest.raises(ValueError, match="group_norm"):
        group_norms(v, group_norm="max")
