import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dessilbi import (
    DessiLBI,
    SparsityTarget,
    coupled_parameters,
    lbi_param_groups,
    support_fraction,
)
from dessilbi.core.target import group_pull, unit_norms
from dessilbi.core.units import stem_of, unit_counts
from dessilbi.zoo.models import create_model


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def data(n=6, shape=(1, 8, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, *shape, generator=g), torch.randint(0, 10, (16,), generator=g))
            for _ in range(n)]


def setup(model, density, total, example, **kw):
    opt = DessiLBI(lbi_param_groups(model, example_inputs=example), lr=0.05)
    target = SparsityTarget(opt, density, total, coupled=coupled_parameters(model, example), **kw)
    return opt, target


def run(model, opt, target, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        target.step()


@given(st.floats(0.01, 1.0), st.integers(1, 500), st.sampled_from(["grow", "shrink"]),
       st.floats(0.0, 0.99))
def test_support_fraction_reaches_the_target_monotonically(density, select, schedule, start):
    start_step = int(start * select)
    values = [support_fraction(t, select, density, schedule, start_step)
              for t in range(0, select + 3)]
    assert values[select] == pytest.approx(density) and values[-1] == pytest.approx(density)
    pairs = list(zip(values, values[1:]))
    untouched = 0.0 if schedule == "grow" else 1.0  # until the schedule starts
    assert values[:start_step + 1] == pytest.approx([untouched] * (start_step + 1))
    if schedule == "grow":
        assert all(a <= b + 1e-12 for a, b in pairs)
    else:
        assert all(a >= b - 1e-12 for a, b in pairs)


@pytest.mark.parametrize("allocation", ["global", "layer"])
@pytest.mark.parametrize("density", [0.25, 0.5, 0.8])
def test_hits_the_target_and_trains_the_subnetwork(density, allocation):
    model = conv_net()
    batches = data(12)
    opt, target = setup(model, density, 12, batches[0][0][:1], allocation=allocation)
    run(model, opt, target, batches[:6])  # select_at 0.3: the mask is fixed at step 4
    assert target.frozen
    assert target.unit_density() == pytest.approx(density, abs=0.03)
    masks = {p: opt.state[p]["mask"].clone() for p in opt.penalised_params()}
    gammas = {p: opt.gamma(p) for p in opt.penalised_params()}
    run(model, opt, target, batches[6:])
    for p, mask in masks.items():
        assert opt.param_groups[0]["nu"] == math.inf
        assert torch.equal(opt.gamma(p), gammas[p])  # V and Γ stopped
        dropped = ~mask.expand_as(p)
        assert (p[dropped] == 0).all()  # outside the mask: exactly zero
        assert (p[~dropped] != 0).any()  # inside: trained
    bn, conv = model[1], model[0]
    dropped = ~opt.state[conv.weight]["mask"].flatten()
    if dropped.any():  # the bias and the BatchNorm of a dropped filter go with it
        assert (conv.bias[dropped] == 0).all() and (bn.bias[dropped] == 0).all()
    classifier = model[-1].weight
    assert "mask" not in opt.state[classifier]
    assert all(p is not classifier for p in opt.penalised_params())


def test_pure_path_holds_the_target_without_masks():
    model = conv_net()
    batches = data(10)
    opt, target = setup(model, 0.4, 10, batches[0][0][:1], freeze=False)
    run(model, opt, target, batches)
    assert not target.frozen
    assert all("mask" not in opt.state[p] for p in opt.penalised_params())
    assert math.isfinite(opt.param_groups[0]["nu"])
    assert target.unit_density() == pytest.approx(0.4, abs=0.03)


def test_nu_is_derived_from_the_budget():
    model = conv_net()
    opt, target = setup(model, 0.5, 1000, torch.zeros(1, 1, 8, 8), path_speed=2.0)
    assert target.select_step == 300  # the default selection: 30 % of the run
    assert opt.param_groups[0]["nu"] == pytest.approx(0.05 * 1.0 * 300 / 2.0)


@pytest.mark.parametrize("pull", ["outside", "all", None])
def test_the_pull_on_the_penalised_groups(pull):
    """The target sets the optimizer's pull on the groups it steers (None keeps the
    optimizer's); the unpenalised groups keep theirs."""
    model = conv_net()
    opt = DessiLBI(lbi_param_groups(model, example_inputs=torch.zeros(1, 1, 8, 8)), lr=0.05)
    SparsityTarget(opt, 0.5, 10, pull=pull)
    steered = {id(p) for p in opt.penalised_params()}
    for group in opt.param_groups:
        mine = any(id(p) in steered for p in group["params"])
        assert group["pull"] == (pull or "all" if mine else "all")


def test_pull_none_keeps_a_pull_set_per_group():
    """The per-group recipe of docs/peers.md: "outside" on the convolutions only, set through
    lbi_param_groups, survives the target and its steps when the target's pull is None."""
    model = conv_net()
    example = torch.zeros(2, 1, 8, 8)
    opt = DessiLBI(lbi_param_groups(model, example_inputs=example,
                                    conv_options={"pull": "outside"}), lr=0.05)
    target = SparsityTarget(opt, 0.5, 6, pull=None)
    for _ in range(6):
        opt.zero_grad()
        model(example).sum().backward()
        opt.step()
        target.step()
    pulls = {g["name"]: g["pull"] for g in opt.param_groups}
    assert pulls["conv"] == "outside"
    assert pulls["linear"] == "all"


def test_conv_outside_spares_the_filters_and_pulls_the_neurons():
    """pull="conv-outside" sets "outside" on the conv group and "all" on the linear group,
    and trains bit for bit as the per-group recipe of docs/peers.md."""
    example = torch.zeros(2, 1, 8, 8)
    finals, pulls = [], []
    for recipe in ("target", "per-group"):
        model = conv_net()
        conv_options = {"pull": "outside"} if recipe == "per-group" else None
        opt = DessiLBI(lbi_param_groups(model, example_inputs=example,
                                        conv_options=conv_options), lr=0.05)
        target = SparsityTarget(opt, 0.5, 6, pull="conv-outside" if recipe == "target" else None)
        run(model, opt, target, data(6))
        pulls.append({g["name"]: g["pull"] for g in opt.param_groups})
        finals.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert pulls[0] == pulls[1] and pulls[0]["conv"] == "outside" and pulls[0]["linear"] == "all"
    assert torch.equal(finals[0], finals[1])


@pytest.mark.parametrize("pull, linear", [(None, "outside"), ("conv-outside", "all")])
def test_the_pull_spares_the_supported_units(pull, linear):
    """The default pulls only the units outside supp(Γ), filters and neurons alike;
    "conv-outside" spares the filters only."""
    model = conv_net()
    opt = DessiLBI(lbi_param_groups(model, example_inputs=torch.zeros(1, 1, 8, 8)), lr=0.05)
    SparsityTarget(opt, 0.5, 10, **({"pull": pull} if pull else {}))
    assert {g["name"]: g["pull"] for g in opt.param_groups} == \
        {"conv": "outside", "linear": linear, "no_decay": "all", "other": "all"}


def test_group_pull_is_outside_only_on_groups_of_filters():
    filters, rows = torch.zeros(4, 3, 3, 3), torch.zeros(4, 8)
    assert group_pull("conv-outside", [filters, filters]) == "outside"
    assert group_pull("conv-outside", [filters, rows]) == "all"  # a mixed group: the paper's
    assert group_pull("conv-outside", []) == "all"
    assert group_pull("outside", [rows]) == "outside"
    assert group_pull("all", [filters]) == "all"


def test_an_optimizer_state_saved_before_pull_existed_loads_as_the_papers_iteration():
    model = conv_net()
    opt, _ = setup(model, 0.5, 10, torch.zeros(1, 1, 8, 8))
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["pull"]
    opt.load_state_dict(saved)
    assert {g["pull"] for g in opt.param_groups} == {"all"}


@pytest.mark.parametrize("kw", [{}, {"fade": True, "select_at": 0.8},
                                {"select_at": 0.3, "settle": 0.4}])
def test_resume_is_bit_for_bit(kw):
    batches = data(10)
    model = conv_net()
    start = copy.deepcopy(model.state_dict())
    opt, target = setup(model, 0.5, 10, batches[0][0][:1], **kw)
    run(model, opt, target, batches)

    model2 = conv_net()
    model2.load_state_dict(start)
    opt2, target2 = setup(model2, 0.5, 10, batches[0][0][:1], **kw)
    run(model2, opt2, target2, batches[:4])
    saved = copy.deepcopy((model2.state_dict(), opt2.state_dict(), target2.state_dict()))
    model3 = conv_net()
    opt3, target3 = setup(model3, 0.5, 10, batches[0][0][:1], **kw)
    model3.load_state_dict(saved[0])
    opt3.load_state_dict(saved[1])
    target3.load_state_dict(saved[2])
    run(model3, opt3, target3, batches[4:])
    for a, b in zip(model.state_dict().values(), model3.state_dict().values()):
        assert torch.equal(a, b)
    for p, q in zip(opt.penalised_params(), opt3.penalised_params()):
        assert torch.equal(opt.state[p]["V"], opt3.state[q]["V"])
        assert torch.equal(opt.state[p]["mask"], opt3.state[q]["mask"])
        assert opt3.state[q]["mask"].dtype == torch.bool


@pytest.mark.parametrize("update_every", [1, 3])
def test_fade_scales_the_dropped_units_to_zero_by_the_selection(update_every):
    # Naive reference: between two threshold updates t_prev < t, every unit outside supp(Γ)
    # after the update at t (weights and coupled bias) is multiplied by (T_s − t)/(T_s − t_prev).
    model = conv_net()
    batches = data(4)
    opt, target = setup(model, 0.3, 40, batches[0][0][:1], select_at=0.5, fade=True,
                        update_every=update_every)
    run(model, opt, target, batches)  # V ≠ 0: the ranking is not a tie
    conv, t_s = model[0], target.select_step
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    faded_some = False
    for t in range(target.step_count + 1, t_s):
        target.step()  # no optimizer step: only the thresholds and the fade act on W
        if t % update_every:
            assert torch.equal(conv.weight, weight)
            continue
        dropped = ~opt.support(conv.weight).flatten(1).any(1)
        factor = (t_s - t) / (t_s - (t - update_every))
        weight[dropped] *= factor
        bias[dropped] *= factor
        faded_some |= bool(dropped.any())
        torch.testing.assert_close(conv.weight, weight)
        torch.testing.assert_close(conv.bias, bias)
    assert faded_some
    target.step()  # the selection: the units still outside supp(Γ) become exactly zero
    assert target.frozen
    dropped = ~opt.support(conv.weight).flatten(1).any(1)
    assert dropped.any() and (conv.weight[dropped] == 0).all() and (conv.bias[dropped] == 0).all()


def test_settle_ramps_the_dropped_units_down_then_fixes_the_mask():
    # Naive reference: from T_s on, after step t every unit outside the support chosen at T_s
    # (weights and coupled bias) holds (T_e − t) / (T_e − T_s + 1) of what training gives it;
    # here no optimizer step runs after T_s, so that is of its weights at T_s.
    model = conv_net()
    batches = data(4)
    opt, target = setup(model, 0.3, 20, batches[0][0][:1], select_at=0.2, settle=0.3)
    run(model, opt, target, batches)  # T_s = 4: the support is chosen, the ramp starts
    t_s, t_e = target.select_step, target.fix_step
    assert (t_s, t_e) == (4, 10) and not target.frozen
    assert {g["nu"] for g in target._penalised_groups()} == {math.inf}
    conv = model[0]
    kept = opt.support(conv.weight).flatten(1).any(1)
    assert (~kept).any() and kept.any()
    weight0, bias0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    first = (t_e - t_s) / (t_e - t_s + 1)  # the ramp's factor after T_s itself
    weight0[~kept] /= first
    bias0[~kept] /= first
    for t in range(t_s + 1, t_e):
        target.step()
        share = (t_e - t) / (t_e - t_s + 1)
        torch.testing.assert_close(conv.weight[~kept], weight0[~kept] * share)
        torch.testing.assert_close(conv.bias[~kept], bias0[~kept] * share)
        torch.testing.assert_close(conv.weight[kept], weight0[kept])
        assert torch.equal(opt.support(conv.weight).flatten(1).any(1), kept)
    assert not target.frozen
    target.step()
    assert target.frozen and target.unit_density() == pytest.approx(0.3, abs=0.03)
    assert (conv.weight[~kept] == 0).all() and (conv.bias[~kept] == 0).all()
    assert torch.equal(opt.state[conv.weight]["mask"].flatten(1).any(1), kept)


def test_the_schedule_waits_for_start_at_then_reaches_the_target():
    model = conv_net()
    batches = data(10)
    opt, target = setup(model, 0.4, 10, batches[0][0][:1], select_at=0.6, start_at=0.3,
                        update_every=1)
    densities = []
    for batch in batches:
        run(model, opt, target, [batch])
        densities.append(target.unit_density())
    assert densities[:3] == [1.0, 1.0, 1.0]  # steps 1..3 <= T_0 = 3: every unit kept
    assert densities[3] < 1.0
    assert target.frozen and densities[-1] == pytest.approx(0.4, abs=0.03)


def test_without_fade_the_dropped_units_keep_their_weights_until_selection():
    model = conv_net()
    batches = data(4)
    opt, target = setup(model, 0.3, 40, batches[0][0][:1], select_at=0.5)
    run(model, opt, target, batches)
    weight = model[0].weight.detach().clone()
    for _ in range(target.step_count + 1, target.select_step):
        target.step()
    assert torch.equal(model[0].weight, weight)


def test_resnet_with_residual_sums():
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 3, 32)
    example = torch.randn(1, 3, 32, 32)
    opt, target = setup(model, 0.5, 4, example)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
               for _ in range(3)]
    run(model, opt, target, batches)
    assert target.frozen
    assert target.unit_density() == pytest.approx(0.5, abs=0.03)
    coupled = coupled_parameters(model, example)
    # a conv followed by its BatchNorm carries it; the classifier is never penalised
    first = model.conv1 if hasattr(model, "conv1") else next(
        m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert len(coupled[first.weight]) >= 2  # its BatchNorm's weight and bias
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert all(p is not linear.weight for p in opt.penalised_params())


def test_bad_arguments_name_the_field():
    model = conv_net()
    opt = DessiLBI(lbi_param_groups(model), lr=0.1)
    for kw, field in ((dict(density=0.0), "density"), (dict(density=1.5), "density"),
                      (dict(total_steps=0), "total_steps"), (dict(select_at=0), "select_at"),
                      (dict(schedule="x"), "schedule"), (dict(allocation="x"), "allocation"),
                      (dict(pull="x"), "pull"), (dict(start_at=0.3), "start_at"),
                      (dict(start_at=-0.1), "start_at"), (dict(settle=0.9), "settle"),
                      (dict(settle=-0.1), "settle"), (dict(settle=0.1, freeze=False), "settle"),
                      (dict(score="x"), "score")):
        args = {"density": 0.5, "total_steps": 10, **kw}
        with pytest.raises(ValueError, match=field):
            SparsityTarget(opt, **args)
    with pytest.raises(TypeError, match="DessiLBI"):
        SparsityTarget(torch.optim.SGD(model.parameters(), lr=0.1), 0.5, 10)


def test_unit_norms_match_the_prox_threshold():
    v = torch.randn(5, 3, 2, 2)
    assert torch.allclose(unit_norms(v, "group"), v.flatten(1).norm(dim=1))
    assert torch.equal(unit_norms(v, "lasso"), v.abs().flatten())


@pytest.mark.parametrize("name, shape", [("lenet5", (1, 28, 28)), ("resnet20", (3, 32, 32))])
@pytest.mark.parametrize("macs", [0.3, 0.6])
def test_a_macs_target_is_hit_by_the_pruned_network(name, shape, macs):
    from dessilbi.core.units import classifier_of
    from dessilbi.sparsity.masks import Mask
    from dessilbi.structure.cost import MacsModel
    from dessilbi.structure.prune import count_cost, prune_model

    torch.manual_seed(0)
    model = create_model(name, 10, shape[0], shape[1])
    example = torch.randn(1, *shape)
    head = classifier_of(model, example)
    opt = DessiLBI(lbi_param_groups(model, linear_penalty="group", exclude=[head]), lr=0.05)
    cost = MacsModel.from_model(model, example, opt.penalised_params())
    target = SparsityTarget(opt, None, 4, macs=macs, cost=cost,
                            coupled=coupled_parameters(model, example))
    g = torch.Generator().manual_seed(0)
    run(model, opt, target, [(torch.randn(4, *shape, generator=g),
                              torch.randint(0, 10, (4,), generator=g)) for _ in range(3)])
    assert target.frozen
    pruned = prune_model(model, Mask.from_optimizer(model, opt), example).model
    achieved = count_cost(pruned, example)[0] / count_cost(model, example)[0]
    assert achieved == pytest.approx(macs, abs=0.03)


def test_a_macs_target_ranks_by_the_scores_alone():
    # the width prior, like the reserve, guards a units target: a MACs target chooses the same
    # units whatever the prior
    from dessilbi.structure.cost import MacsModel

    example = torch.randn(1, 1, 28, 28)
    batches = data(3, shape=(1, 28, 28))
    kept = {}
    for prior in (0.0, 1.0):
        torch.manual_seed(0)
        model = create_model("lenet5", 10, 1, 28)
        opt = DessiLBI(lbi_param_groups(model, example_inputs=example), lr=0.05)
        cost = MacsModel.from_model(model, example, opt.penalised_params())
        target = SparsityTarget(opt, None, 3, macs=0.4, cost=cost, width_prior=prior)
        run(model, opt, target, batches)
        kept[prior] = [opt.support(p).clone() for p in opt.penalised_params()]
    assert all(torch.equal(a, b) for a, b in zip(kept[0.0], kept[1.0]))


def test_a_macs_target_needs_a_cost_model_and_whole_units():
    model = conv_net()
    example = torch.randn(1, 1, 8, 8)
    grouped = DessiLBI(lbi_param_groups(model, linear_penalty="group"), lr=0.1)
    for kw, words in ((dict(density=None), "exactly one"), (dict(macs=0.5), "exactly one"),
                      (dict(density=None, macs=0.5), "cost model"),
                      (dict(density=None, macs=0.5, cost=lambda f: f.mean(1),
                            allocation="layer"), "allocation")):
        args = {"density": 0.5, "total_steps": 10, **kw}
        with pytest.raises(ValueError, match=words):
            SparsityTarget(grouped, **args)
    lasso = DessiLBI(lbi_param_groups(model, linear_penalty="lasso"), lr=0.1)
    with pytest.raises(ValueError, match="lasso"):
        SparsityTarget(lasso, None, 10, macs=0.5, cost=lambda f: f.mean(1))
    del example


@pytest.mark.parametrize("density", [0.3, 0.6])
def test_a_whole_layer_keeps_every_unit_and_the_target_holds(density):
    model = conv_net()
    batches = data(12)
    example = batches[0][0][:1]
    first = stem_of(model, example).weight
    opt, target = setup(model, density, 12, example, whole=[first], select_at=0.5,
                        schedule="grow")
    run(model, opt, target, batches[:3])  # half-way to selection: about half of its units
    grown = int(opt.support(first).flatten(1).any(1).sum())
    assert 0 < grown < first.shape[0]
    run(model, opt, target, batches[3:6])
    assert target.frozen
    assert bool(opt.state[first]["mask"].all())
    assert target.unit_density() == pytest.approx(density, abs=0.03)


def test_a_macs_target_with_the_first_layer_whole():
    from dessilbi.sparsity.masks import Mask
    from dessilbi.structure.cost import MacsModel
    from dessilbi.structure.prune import count_cost, prune_model

    torch.manual_seed(0)
    model = create_model("lenet5", 10, 1, 28)
    example = torch.randn(1, 1, 28, 28)
    head, first = model.head[-1], stem_of(model, example).weight
    opt = DessiLBI(lbi_param_groups(model, linear_penalty="group", exclude=[head]), lr=0.05)
    target = SparsityTarget(opt, None, 4, macs=0.6, whole=[first],
                            cost=MacsModel.from_model(model, example, opt.penalised_params()))
    g = torch.Generator().manual_seed(0)
    run(model, opt, target, [(torch.randn(4, 1, 28, 28, generator=g),
                              torch.randint(0, 10, (4,), generator=g)) for _ in range(3)])
    assert bool(opt.state[first]["mask"].all())
    pruned = prune_model(model, Mask.from_optimizer(model, opt), example).model
    assert count_cost(pruned, example)[0] / count_cost(model, example)[0] == \
        pytest.approx(0.6, abs=0.05)


def test_whole_layers_must_be_penalised_and_ranked_globally():
    model = conv_net()
    opt = DessiLBI(lbi_param_groups(model), lr=0.1)
    with pytest.raises(ValueError, match="whole"):
        SparsityTarget(opt, 0.5, 10, whole=[model[-1].weight])  # the classifier
    with pytest.raises(ValueError, match="allocation"):
        SparsityTarget(opt, 0.5, 10, whole=[model[0].weight], allocation="layer")


def kept_per_layer(opt):
    return [int(opt.support(p).flatten(1).any(1).sum()) for p in opt.penalised_params()]


def test_a_reserve_keeps_each_layers_best_units_inside_the_target():
    # LeNet-5 at 30 % of its 226 units: the ranking alone leaves its first convolution 2 of 6
    # filters; the reserve of 8 keeps all 6 and 8 or more of every wider layer, the count
    # unchanged
    from dessilbi.zoo.models import create_model

    batches = data(12, shape=(1, 28, 28))
    kept = {}
    for reserve in (0, 8):
        torch.manual_seed(0)
        model = create_model("lenet5", 10, 1, 28)
        opt, target = setup(model, 0.3, 6, batches[0][0][:1], select_at=0.5, reserve=reserve,
                            width_prior=0.0)
        run(model, opt, target, batches[:6])
        assert target.frozen
        kept[reserve] = kept_per_layer(opt)
        assert target.unit_density() == pytest.approx(0.3, abs=0.03)
    assert kept[0][0] < 6
    assert kept[8][0] == 6 and min(kept[8][1:]) >= 8 and sum(kept[8]) == sum(kept[0])


def test_the_mean_score_ranks_a_layer_whose_weights_grew_like_the_others():
    # one layer's V ten times the other's: on the initial scale it takes almost every unit of
    # the target, on the current mean each layer keeps its share of the above-typical units
    model = conv_net()
    kept = {}
    for score in ("initial", "mean"):
        opt, target = setup(copy.deepcopy(model), 0.5, 100, torch.zeros(1, 1, 8, 8),
                            score=score, reserve=0, width_prior=0.0)
        params = opt.penalised_params()
        g = torch.Generator().manual_seed(3)
        for i, p in enumerate(params):
            grow = 10.0 if i == 0 else 1.0
            opt.state[p]["V"] = grow * torch.rand(p.shape, generator=g)
        target._set_thresholds(0.5)
        kept[score] = [unit_counts(opt.support(p), "group")[0] for p in params]
    sizes = [p.shape[0] for p in opt.penalised_params()]
    assert kept["initial"][0] == sizes[0]  # the grown layer whole
    assert sum(kept["initial"]) == sum(kept["mean"])  # the same target
    shares = [k / n for k, n in zip(kept["mean"], sizes)]
    assert max(shares) - min(shares) < 0.5 and 0 < kept["mean"][0] < sizes[0]


def test_a_reserve_is_a_whole_number_of_units():
    opt = DessiLBI(lbi_param_groups(conv_net()), lr=0.1)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="reserve"):
            SparsityTarget(opt, 0.5, 10, reserve=bad)


def test_the_stem_is_the_first_layer_called_not_the_first_registered():
    class Late(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 3)
            self.stem = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.head(self.stem(x).flatten(1)[:, :8])

    model = Late()
    assert stem_of(model, torch.zeros(1, 1, 5, 5)) is model.stem
    assert stem_of(nn.Sequential(nn.ReLU()), torch.zeros(1, 3)) is None


def test_a_width_prior_moves_units_to_the_narrow_layers():
    # every unit of the 12-, 16- and 32-wide layers scores alike on the common scale: without
    # the prior the count spreads by width, with it the narrow layers keep more, the count
    # unchanged
    model = conv_net()
    kept = {}
    for prior in (0.0, 0.5):
        opt, target = setup(copy.deepcopy(model), 0.5, 100, torch.zeros(1, 1, 8, 8),
                            reserve=0, width_prior=prior)
        g = torch.Generator().manual_seed(5)
        for p, s in zip(opt.penalised_params(), target.scales):
            rows = 1.0 + 0.01 * torch.rand(p.shape[0], generator=g)
            v = torch.randn(p.shape, generator=g)
            opt.state[p]["V"] = v / unit_norms(v, "group").view(-1, *[1] * (v.dim() - 1)) \
                * (s * rows).view(-1, *[1] * (v.dim() - 1))
        target._set_thresholds(0.5)
        kept[prior] = [unit_counts(opt.support(p), "group")[0] for p in opt.penalised_params()]
    assert sum(kept[0.0]) == sum(kept[0.5])
    assert kept[0.5][0] > kept[0.0][0] and kept[0.5][-1] < kept[0.0][-1]


def test_a_width_prior_is_a_number_of_zero_or_more():
    opt = DessiLBI(lbi_param_groups(conv_net()), lr=0.1)
    for bad in (-0.5, math.inf, True, "0.25"):
        with pytest.raises(ValueError, match="width_prior"):
            SparsityTarget(opt, 0.5, 10, width_prior=bad)
