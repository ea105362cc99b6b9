"""DessiLBI against a naive implementation of ../shared/spec/ALGORITHM.md, and its contract."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from dessilbi import DessiLBI, lbi_param_groups, nu_for_steps


# ---------------------------------------------------------------- naive reference
def naive_prox(v, penalty, lam, group_norm):
    if penalty == "lasso":
        return torch.sign(v) * torch.clamp(v.abs() - lam, min=0.0)
    out = torch.zeros_like(v)
    for r in range(v.shape[0]):
        row = v[r]
        norm = math.sqrt(float((row * row).sum()))
        if group_norm == "rms":
            norm /= math.sqrt(row.numel())
        if norm > 0:
            out[r] = row * max(0.0, 1.0 - lam / norm)
    return out


def naive_unit_is_zero(gamma, penalty):
    """1 where the entry's unit (its row for ``group``, itself for ``lasso``) has Γ = 0."""
    if penalty == "lasso":
        return (gamma == 0).double()
    out = torch.zeros_like(gamma)
    for r in range(gamma.shape[0]):
        out[r] = float(bool((gamma[r] == 0).all()))
    return out


class NaiveDessiLBI:
    """The equations of ALGORITHM.md, literally, one tensor at a time, with Γ stored."""

    def __init__(self, groups, lr, kappa, nu, lam, momentum, dampening, nesterov, pull="all"):
        self.groups = groups
        self.h = dict(lr=lr, kappa=kappa, nu=nu, lam=lam, m=momentum, damp=dampening,
                      nesterov=nesterov, pull=pull)
        self.state = {}

    def step(self):
        h = self.h
        a, k, nu = h["lr"], h["kappa"], h["nu"]
        for group in self.groups:
            pen, wd = group["penalty"], group.get("weight_decay", 0.0)
            lam = group.get("lambda_", h["lam"])
            gnorm = group.get("group_norm", "l2")
            for w in group["params"]:
                if w.grad is None:
                    continue
                st = self.state.setdefault(w, {"V": torch.zeros_like(w), "G": torch.zeros_like(w)})
                g = w.grad + wd * w
                if h["m"] != 0:
                    if "b" not in st:
                        st["b"] = g.clone()
                    else:
                        st["b"] = h["m"] * st["b"] + (1 - h["damp"]) * g
                    d = g + h["m"] * st["b"] if h["nesterov"] else st["b"]
                else:
                    d = g
                W0, V0, G0 = w.detach().clone(), st["V"], st["G"]
                with torch.no_grad():
                    if pen == "none":
                        w.copy_(W0 - a * k * d)
                    else:
                        pull = torch.ones_like(W0)
                        if h["pull"] == "outside":  # units (rows / entries) with Γ = 0
                            pull = naive_unit_is_zero(G0, pen)
                        w.copy_(W0 - a * k * d - (a * k / nu) * (W0 - G0) * pull)
                        st["V"] = V0 - (a / nu) * (G0 - W0)
                        st["G"] = k * naive_prox(st["V"], pen, lam, gnorm)


def small_model():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 8), nn.ReLU(),
        nn.Linear(8, 5),
    ).double()


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 2, 6, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad() if hasattr(opt, "zero_grad") else model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


CONFIGS = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, wd=0.0),
    dict(momentum=0.9, dampening=0.0, nesterov=False, wd=0.0),
    dict(momentum=0.9, dampening=0.0, nesterov=True, wd=1e-3),
    dict(momentum=0.5, dampening=0.3, nesterov=False, wd=1e-2),
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("group_norm", ["l2", "rms"])
def test_matches_naive_equations(foreach, cfg, group_norm):
    model = small_model()
    ref_model = copy.deepcopy(model)
    hp = dict(lr=0.1, kappa=1.5, nu=0.8, lam=0.05, momentum=cfg["momentum"],
              dampening=cfg["dampening"], nesterov=cfg["nesterov"])
    opt = DessiLBI(
        lbi_param_groups(model, weight_decay=cfg["wd"], conv_options={"group_norm": group_norm},
                         linear_penalty="lasso", keep_classifier=False),
        lr=hp["lr"], kappa=hp["kappa"], nu=hp["nu"], lambda_=hp["lam"], momentum=hp["momentum"],
        dampening=hp["dampening"], nesterov=hp["nesterov"], foreach=foreach,
    )
    ref = NaiveDessiLBI(
        lbi_param_groups(ref_model, weight_decay=cfg["wd"], linear_penalty="lasso",
                         keep_classifier=False, conv_options={"group_norm": group_norm}), **hp,
    )
    data = batches(25)
    train(model, opt, data)
    train(ref_model, ref, data)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert (p - q).abs().max() <= 1e-10
    n_support = 0
    for p, q in zip(model.parameters(), ref_model.parameters()):
        if q in ref.state and opt.penalty_of(p) != "none":
            assert (opt.state[p]["V"] - ref.state[q]["V"]).abs().max() <= 1e-10
            gam = opt.gamma(p)
            assert (gam - ref.state[q]["G"]).abs().max() <= 1e-10
            assert torch.equal(opt.support(p), ref.state[q]["G"] != 0)
            n_support += int(opt.support(p).sum())
    # the run must exercise the thresholds: some entries in the support, some not
    total = sum(p.numel() for p in opt.penalised_params())
    assert 0 < n_support < total

@pytest.mark.parametrize("impl", [dict(), dict(foreach=False), dict(foreach=True),
                                  dict(fused=True)])
def test_pull_outside_matches_naive_equations(impl):
    """pull="outside": the coupling pulls W only on the units with Γ = 0, in every
    implementation (default flat buckets, per-tensor loop, foreach, compiled)."""
    hp = dict(lr=0.1, kappa=1.5, nu=0.8, lam=0.05, momentum=0.9, dampening=0.0,
              nesterov=False)
    data = batches(25)
    finals = {}
    for pull in ("outside", "all"):
        model = small_model()
        ref_model = copy.deepcopy(model)
        opt = DessiLBI(lbi_param_groups(model, linear_penalty="lasso", keep_classifier=False),
                       lr=hp["lr"], kappa=hp["kappa"], nu=hp["nu"], lambda_=hp["lam"],
                       momentum=hp["momentum"], pull=pull, **impl)
        ref = NaiveDessiLBI(lbi_param_groups(ref_model, linear_penalty="lasso",
                                             keep_classifier=False), pull=pull, **hp)
        train(model, opt, data)
        train(ref_model, ref, data)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            assert (p - q).abs().max() <= 1e-9
        support = [opt.support(p) for p in opt.penalised_params()]
        assert 0 < sum(int(m.sum()) for m in support) < sum(m.numel() for m in support)
        finals[pull] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (finals["outside"] - finals["all"]).abs().max() > 1e-3  # the option does something


def test_pull_outside_leaves_the_support_to_sgd():
    """One step with pull="outside": a filter in supp(Γ) moves as SGD-momentum would, one
    outside it also decays by (ακ/ν) W."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4))
    opt = DessiLBI([{"params": [w], "penalty": "group"}], lr=0.1, nu=2.0, lambda_=0.0,
                   momentum=0.0, pull="outside", foreach=False)
    opt.state[w]["V"] = torch.tensor([[1.0] * 4, [0.0] * 4, [0.2] * 4])
    opt.state[w]["lambda_"] = 1.0  # row 0 (norm 2) is in the support, rows 1, 2 are not
    w.grad = torch.randn(3, 4)
    before = w.detach().clone()
    opt.step()
    sgd = before - 0.1 * w.grad
    assert torch.equal(w.detach()[0], sgd[0])
    torch.testing.assert_close(w.detach()[1:], sgd[1:] - (0.1 / 2.0) * before[1:])


def test_foreach_equals_single_tensor():
    models = [small_model().float() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [DessiLBI(lbi_param_groups(m, weight_decay=1e-4), lr=0.1, nu=0.5, lambda_=0.05,
                     nesterov=True, foreach=fe) for m, fe in zip(models, (False, True))]
    data = [(x.float(), y) for x, y in batches(20)]
    for m, o in zip(models, opts):
        train(m, o, data)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("nesterov", [False, True])
def test_nu_infinity_is_sgd_with_lr_times_kappa(nesterov):
    model = small_model()
    ref_model = copy.deepcopy(model)
    lr, kappa = 0.05, 2.0
    opt = DessiLBI(lbi_param_groups(model, weight_decay=1e-3), lr=lr, kappa=kappa, nu=math.inf,
                   momentum=0.9, nesterov=nesterov)
    sgd = torch.optim.SGD(
        [{**g, "params": g["params"]} for g in lbi_param_groups(ref_model, weight_decay=1e-3)],
        lr=lr * kappa, momentum=0.9, nesterov=nesterov,
    )
    data = batches(20)
    train(model, opt, data)
    train(ref_model, sgd, data)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert opt.density() == 0.0  # V never moves, so Γ stays 0


def test_first_step_sets_v_to_scaled_initial_weights():
    model = small_model()
    w0 = {p: p.detach().clone() for p in model.parameters()}
    lr, nu = 0.1, 50.0
    opt = DessiLBI(lbi_param_groups(model), lr=lr, nu=nu, lambda_=1.0)
    train(model, opt, batches(1))
    for p in opt.penalised_params():
        torch.testing.assert_close(opt.state[p]["V"], (lr / nu) * w0[p], rtol=0, atol=1e-15)
        assert not opt.gamma(p).any()  # (lr/ν)·|W₀| is far below λ = 1
        assert not opt.support(p).any()
    assert opt.density() == 0.0


def test_state_dict_round_trip_is_bit_exact():
    data = batches(15)
    model = small_model()
    opt = DessiLBI(lbi_param_groups(model, weight_decay=1e-4), lr=0.1, nu=0.5, lambda_=0.05)
    train(model, opt, data[:5])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = small_model()
    resumed.load_state_dict(ckpt["model"])
    opt2 = DessiLBI(lbi_param_groups(resumed, weight_decay=1e-4), lr=0.1, nu=0.5, lambda_=0.05)
    opt2.load_state_dict(ckpt["opt"])
    train(model, opt, data[5:])
    train(resumed, opt2, data[5:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(opt.penalised_params(), opt2.penalised_params()):
        assert torch.equal(opt.state[p]["V"], opt2.state[q]["V"])
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])


def test_closure_loss_is_returned():
    model = small_model()
    opt = DessiLBI(model.parameters(), lr=0.1)
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0


def test_parameters_without_grad_are_untouched():
    model = small_model()
    frozen = model[0].weight
    before = frozen.detach().clone()
    opt = DessiLBI(lbi_param_groups(model), lr=0.1)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    frozen.grad = None
    opt.step()
    assert torch.equal(frozen, before)
    assert frozen not in opt.state or not opt.state[frozen]
    assert not opt.gamma(frozen).any()


def test_sparse_gradient_error_is_clear():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = DessiLBI(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_channels_last_matches_contiguous():
    model = small_model().float()
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    data = [(x.float(), y) for x, y in batches(10)]
    for m in (model, cl):
        opt = DessiLBI(lbi_param_groups(m), lr=0.1, nu=0.5, lambda_=0.05)
        train(m, opt, [(x.to(memory_format=torch.channels_last) if m is cl else x, y)
                       for x, y in data])
        if m is cl:
            v = opt.state[m[0].weight]["V"]
            assert v.is_contiguous(memory_format=torch.channels_last)
    for p, q in zip(model.parameters(), cl.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_grad_scaler_step_and_overflow_skip():
    model = small_model().float()
    ref = copy.deepcopy(model)
    data = [(x.float(), y) for x, y in batches(5)]
    opt = DessiLBI(lbi_param_groups(model), lr=0.1, nu=0.5, lambda_=0.05)
    opt_ref = DessiLBI(lbi_param_groups(ref), lr=0.1, nu=0.5, lambda_=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for x, y in data:
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    train(ref, opt_ref, data)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # an inf gradient makes the scaler skip the step: nothing moves
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(data[0][0]), data[0][1])).backward()
    model[0].weight.grad[0, 0, 0, 0] = float("inf")
    scaler.step(opt)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_gamma_support_masks_and_density():
    model = small_model()
    opt = DessiLBI(lbi_param_groups(model), lr=0.1, nu=0.3, lambda_=0.05)
    train(model, opt, batches(20))
    masks = opt.masks()
    assert set(masks) == set(opt.penalised_params())
    conv_w = model[0].weight
    m = masks[conv_w]
    assert m.dtype == torch.bool and m.shape == conv_w.shape
    # group penalty: whole filters in or out
    per_filter = m.flatten(1)
    assert torch.all(per_filter.all(dim=1) | (~per_filter).any(dim=1) & ~per_filter.any(dim=1))
    dens = opt.densities()
    total = sum(x.numel() for x in masks.values())
    expected = sum(dens[p] * p.numel() for p in masks) / total
    assert opt.density() == pytest.approx(expected)
    # Γ ≠ 0 is counted, negative entries included
    lin = model[6].weight
    assert torch.equal(opt.support(lin), opt.gamma(lin) != 0)
    assert (opt.gamma(lin) < 0).any()
    with pytest.raises(ValueError, match="penalty 'none'"):
        opt.gamma(model[0].bias)
    with pytest.raises(ValueError, match="not managed"):
        opt.gamma(nn.Parameter(torch.zeros(1)))


def test_auto_penalty_from_dimensions():
    model = small_model()
    opt = DessiLBI(model.parameters(), lr=0.1)
    assert opt.penalty_of(model[0].weight) == "group"
    assert opt.penalty_of(model[6].weight) == "group"  # one group per neuron: removable
    assert opt.penalty_of(model[0].bias) == "none"


def test_nu_chosen_from_the_number_of_steps():
    model = small_model()
    assert DessiLBI(model.parameters(), lr=0.1).defaults["nu"] == 100.0  # length unknown
    opt = DessiLBI(model.parameters(), lr=0.1, kappa=2.0, total_steps=4690)
    assert opt.defaults["nu"] == pytest.approx(0.1 * 2.0 * 4690 / 20)
    assert nu_for_steps(0.05, 1000, path_speed=10) == pytest.approx(5.0)
    assert nu_for_steps(0.1, 5000) == pytest.approx(0.1 * 5000 / 20)
    assert nu_for_steps(0.1, 5) == 5.0  # the floor: units can still enter
    assert nu_for_steps(0.01, 1000) == 5.0
    explicit = DessiLBI(model.parameters(), lr=0.1, nu=7.0, total_steps=4690)
    assert explicit.defaults["nu"] == 7.0  # an explicit ν wins
    with pytest.raises(ValueError, match="total_steps"):
        DessiLBI(model.parameters(), lr=0.1, total_steps=0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(lr=-0.1), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(kappa=0.0), "kappa"),
        (dict(kappa=-1.0), "kappa"),
        (dict(nu=0.0), "nu"),
        (dict(nu=-5.0), "nu"),
        (dict(lambda_=-1.0), "lambda_"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(dampening=2.0), "dampening"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(momentum=0.0, nesterov=True), "nesterov"),
        (dict(penalty="l1"), "penalty"),
        (dict(group_norm="linf"), "group_norm"),
        (dict(pull="inside"), "pull"),
        (dict(fused="yes"), "fused"),
        (dict(foreach=1), "foreach"),
    ],
)
def test_validation_names_field_and_value(kwargs, field):
    model = small_model()
    with pytest.raises(ValueError, match=f"invalid {field}="):
        DessiLBI(model.parameters(), **kwargs)
    # the same checks apply per group
    with pytest.raises(ValueError, match=f"invalid {field}="):
        DessiLBI([{"params": list(model.parameters()), **kwargs}])


def test_parameter_in_two_groups_is_rejected():
    model = small_model()
    p = list(model.parameters())
    with pytest.raises(ValueError, match="more than one parameter group"):
        DessiLBI([{"params": p[:3]}, {"params": p[2:]}])


@pytest.mark.cuda
def test_cuda_matches_cpu():
    model = small_model().float()
    gpu = copy.deepcopy(model).cuda()
    data = [(x.float(), y) for x, y in batches(10)]
    for m, dev in ((model, "cpu"), (gpu, "cuda")):
        opt = DessiLBI(lbi_param_groups(m), lr=0.1, nu=0.5, lambda_=0.05)
        train(m, opt, [(x.to(dev), y.to(dev)) for x, y in data])
    for p, q in zip(model.parameters(), gpu.parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_compiled_path_matches_foreach(nesterov):
    models = [small_model().float() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    kw = dict(lr=0.1, nu=0.5, lambda_=0.05, nesterov=nesterov, dampening=0.0)
    opts = [
        DessiLBI(lbi_param_groups(models[0], weight_decay=1e-3,
                                  conv_options={"group_norm": "rms"}), foreach=True, **kw),
        DessiLBI(lbi_param_groups(models[1], weight_decay=1e-3,
                                  conv_options={"group_norm": "rms"}), fused=True, **kw),
    ]
    data = [(x.float(), y) for x, y in batches(12)]
    for m, o in zip(models, opts):
        train(m, o, data)
        o.param_groups[0]["lr"] = 0.05  # a schedule change must not break the compiled path
        train(m, o, data[:3])
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(opts[0].penalised_params(), opts[1].penalised_params()):
        torch.testing.assert_close(opts[0].state[p]["V"], opts[1].state[q]["V"],
                                   rtol=1e-5, atol=1e-6)
        assert torch.equal(opts[0].support(p), opts[1].support(q))


def test_fused_none_compiles_the_large_tensors_of_a_large_model_only(monkeypatch, caplog):
    from dessilbi.core import cpu_kernel, flat
    from dessilbi.core import optim as optim_module

    data = [(x.float(), y) for x, y in batches(4)]
    monkeypatch.setattr(flat, "MAX_NUMEL", 100)  # the larger tensors skip the buckets
    # where the compiled CPU kernel is, large tensors take it in buckets: here it is not
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)

    def run(**kw) -> tuple[DessiLBI, torch.nn.Module]:
        torch.manual_seed(0)
        model = small_model().float()
        opt = DessiLBI(lbi_param_groups(model), lr=0.1, nu=0.5, lambda_=0.05, **kw)
        train(model, opt, data)
        return opt, model

    eager, ref = run()  # the default on a small model: nothing compiled
    assert "_compiled" not in eager.__dict__
    monkeypatch.setattr(optim_module, "AUTO_COMPILE_NUMEL", 500)  # the model is large now
    with caplog.at_level("INFO", logger="dessilbi.core._fused"):
        auto, model = run()
    assert "compiling the update of" in caplog.text  # the slow first step is explained
    assert auto.__dict__["_compiled"]["update"].compiled is not None
    assert "buckets" not in auto.__dict__["_compiled"]  # the small tensors stay eager
    for p, q in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    for kw in ({"fused": False}, {"foreach": False}, {"foreach": True}):
        assert "_compiled" not in run(**kw)[0].__dict__, kw


def test_a_compiled_step_under_a_dispatch_mode_runs_eager_for_that_step(monkeypatch):
    """FlopCounterMode (or CommDebugMode, an operation counter) around a training step: Dynamo
    cannot trace under a user's TorchDispatchMode, so that step runs eager and the next ones
    compile as before (it raised a RuntimeError)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dessilbi.core import cpu_kernel, flat

    monkeypatch.setattr(flat, "MAX_NUMEL", 100)  # the larger tensors take the compiled kernel
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)  # not the C one

    models = [small_model().float() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    data = [(x.float(), y) for x, y in batches(3)]
    opts = [DessiLBI(lbi_param_groups(m), lr=0.1, nu=0.5, lambda_=0.05, fused=fused)
            for m, fused in zip(models, (False, True))]
    for m, o in zip(models, opts):
        with FlopCounterMode(display=False):
            train(m, o, data[:1])
        train(m, o, data[1:])
    assert opts[1].__dict__["_compiled"]["update"].compiled is not None
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
