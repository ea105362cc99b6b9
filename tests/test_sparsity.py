import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dessilbi import DessiLBI, lbi_param_groups
from dessilbi.sparsity.masks import (
    EntryTracker,
    Mask,
    applied_masks,
    format_report,
    layer_report,
)
from dessilbi.zoo.models import create_model


def trained_lenet5(steps=30):
    torch.manual_seed(0)
    m = create_model("lenet5")
    opt = DessiLBI(lbi_param_groups(m, linear_options={"lambda_": 0.03}, linear_penalty="lasso",
                                    keep_classifier=False), lr=0.1, nu=0.5,
                   lambda_=1.0)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m, opt


def test_mask_from_optimizer_counts_negative_entries():
    m, opt = trained_lenet5()
    mask = Mask.from_optimizer(m, opt)
    assert set(mask.masks) == {"features.0.weight", "features.3.weight", "features.6.weight",
                               "head.0.weight", "head.2.weight"}
    assert mask.penalties["features.0.weight"] == "group"
    lin = m.head[2].weight
    assert torch.equal(mask.masks["head.2.weight"], opt.gamma(lin) != 0)
    assert 0 < mask.density() < 1
    assert (opt.gamma(lin)[mask.masks["head.2.weight"]] < 0).any()


def test_apply_and_restore_exactly():
    m, opt = trained_lenet5()
    mask = Mask.from_optimizer(m, opt)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with mask.applied(m):
        w = m.head[2].weight
        assert (w[~mask.masks["head.2.weight"]] == 0).all()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(KeyError), applied_masks(m, {"nope.weight": torch.ones(1, dtype=bool)}):
        pass


def test_save_load_round_trip(tmp_path):
    m, opt = trained_lenet5()
    mask = Mask.from_optimizer(m, opt)
    mask.save(tmp_path / "mask.pt")
    assert Mask.load(tmp_path / "mask.pt") == mask


def test_validation():
    with pytest.raises(ValueError, match="bool tensor"):
        Mask({"w": torch.ones(3)})
    half = torch.ones(2, 3, dtype=torch.bool)
    half[0, 1] = False
    with pytest.raises(ValueError, match="whole filters"):
        Mask({"w": half}, {"w": "group"})


@settings(max_examples=25, deadline=None)
@given(st.floats(0.0, 1.0))
def test_entry_order_hits_requested_density(density):
    m, opt = trained_lenet5(steps=5)
    pens = {n: ("group" if p.ndim == 4 else "lasso") for n, p in m.named_parameters()
            if p.ndim >= 2}
    g = torch.Generator().manual_seed(1)
    entry = {n: torch.randint(-1, 5, (p.shape[0] if pens[n] == "group" else p.numel(),),
                              generator=g, dtype=torch.int32)
             for n, p in m.named_parameters() if n in pens}
    mask = Mask.from_entry_order(m, entry, pens, density)
    total = sum(x.numel() for x in mask.masks.values())
    largest_unit = max(p[0].numel() for n, p in m.named_parameters() if pens.get(n) == "group")
    # at most the requested density, and short of it by less than one unit
    assert mask.density() <= density + 1e-9
    assert density * total - mask.density() * total < largest_unit + 1


def test_entry_order_keeps_earliest_first():
    m, _ = trained_lenet5(steps=1)
    pens = {"head.2.weight": "lasso"}
    e = torch.full((m.head[2].weight.numel(),), -1, dtype=torch.int32)
    e[:10] = 3
    e[10:20] = 1
    mask = Mask.from_entry_order(m, {"head.2.weight": e}, pens, 10 / e.numel())
    kept = mask.masks["head.2.weight"].reshape(-1)
    assert kept[10:20].all() and not kept[:10].any() and int(kept.sum()) == 10


def test_magnitude_and_random_masks():
    m, _ = trained_lenet5(steps=1)
    pens = {n: ("group" if p.ndim == 4 else "lasso") for n, p in m.named_parameters()
            if p.ndim >= 2}
    mag = Mask.from_magnitude(m, pens, 0.3)
    for name, r in mag.report().items():
        if name != "(all)":
            assert r["density"] == pytest.approx(0.3, abs=0.1)
    w = m.head[0].weight.detach().abs().reshape(-1)
    kept = mag.masks["head.0.weight"].reshape(-1)
    assert w[kept].min() >= w[~kept].max()
    rnd = Mask.random_like(mag, seed=3)
    for name in mag.masks:
        assert int(rnd.masks[name].sum()) == int(mag.masks[name].sum())
    assert rnd != mag
    glob = Mask.from_magnitude(m, pens, 0.3, scope="global")
    assert glob.density() <= 0.3


def test_report_formats():
    masks = {"conv.weight": torch.tensor([[True, True], [False, False]]),
             "fc.weight": torch.tensor([True, False, False, True])}
    rep = layer_report(masks, {"conv.weight": "group"})
    assert rep["conv.weight"]["filters_kept"] == 1 and rep["(all)"]["density"] == 0.5
    assert "filters_kept" in format_report(rep, "csv").splitlines()[0]
    assert '"density": 0.5' in format_report(rep, "json")
    assert "conv.weight" in format_report(rep, "table")


def test_entry_tracker_first_epoch_and_masks_at_epoch():
    tr = EntryTracker()
    pens = {"w": "lasso"}
    tr.update(1, {"w": torch.tensor([True, False, False])}, pens)
    tr.update(2, {"w": torch.tensor([True, True, False])}, pens)
    tr.update(3, {"w": torch.tensor([False, True, False])}, pens)
    assert tr.entry["w"].tolist() == [1, 2, -1]
    assert tr.units_at(1)["w"].tolist() == [True, False, False]
    assert tr.units_at(3)["w"].tolist() == [False, True, False]
    again = EntryTracker(tr.state_dict())
    assert again.units_at(2)["w"].tolist() == [True, True, False]



def test_a_mask_of_another_shape_is_refused():
    import torch
    from torch import nn

    from dessilbi.sparsity import Mask

    model = nn.Sequential(nn.Linear(100, 10))
    mask = Mask({"0.weight": torch.ones(1, 100, dtype=torch.bool)}, {"0.weight": "lasso"})
    with pytest.raises(ValueError, match="another model"):
        mask.apply_(model)
    with pytest.raises(ValueError, match="another model"), mask.applied(model):
        pass
