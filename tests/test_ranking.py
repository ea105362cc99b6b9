import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dessilbi.core.ranking import layer_scores, reserve_within, width_factors


# norms of 0 (units that never moved) or of a size V reaches; not subnormals, which a factor
# of 1/2 rounds to 0
@given(st.lists(st.just(0.0) | st.floats(1e-6, 1e3), min_size=1, max_size=20),
       st.floats(1e-3, 1e3))
def test_layer_scores_put_a_layer_on_the_common_scale(values, factor):
    norms = torch.tensor(values, dtype=torch.float64)
    assert torch.equal(layer_scores(norms, 2.0, "initial"), norms / 2.0)
    mean = layer_scores(norms, 2.0, "mean")
    if norms.sum() == 0:  # no unit has moved yet: every score 0, not NaN
        assert torch.equal(mean, torch.zeros_like(norms))
        return
    assert float(mean.mean()) == pytest.approx(1.0)
    # the same layer grown or shrunk by any factor scores the same: only the shape counts
    assert torch.allclose(layer_scores(norms * factor, 2.0, "mean"), mean)
    with pytest.raises(ValueError, match="score"):
        layer_scores(norms, 2.0, "median")


@given(st.lists(st.integers(1, 4096), min_size=1, max_size=12), st.floats(0.0, 2.0))
def test_width_factors_rank_narrow_layers_up(widths, power):
    factors = width_factors(widths, power)
    mean_width = sum(widths) / len(widths)
    for w, f in zip(widths, factors):
        assert f == pytest.approx((mean_width / w) ** power)
    # the narrower layer never gets the smaller factor, and power 0 changes nothing
    order = sorted(range(len(widths)), key=lambda i: widths[i])
    assert all(factors[i] >= factors[j] * (1 - 1e-12) for i, j in zip(order, order[1:]))
    assert width_factors(widths, 0.0) == [1.0] * len(widths)


def test_the_reserves_take_at_most_half_the_units_kept():
    resnet56 = [16] * 19 + [32] * 18 + [64] * 18  # its 55 penalised layers, 2,032 units
    assert reserve_within(8, resnet56, 0.1) == 1  # 55 of the 203 units kept, not 440
    assert reserve_within(8, resnet56, 0.5) == 8
    lenet5 = [6, 16, 120, 84]
    assert reserve_within(8, lenet5, 0.3) == 8  # 30 units of 68: not binding
    assert reserve_within(8, lenet5, 0.1) == 2 and reserve_within(0, lenet5, 1.0) == 0
