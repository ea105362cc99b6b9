import pytest
import torch

from dessilbi import DessiLBI, lbi_param_groups
from dessilbi.cli.main import main
from dessilbi.structure.grow import find_growable, grow_layer, grown_size, transfer_state
from dessilbi.zoo.models import create_model


def test_grown_size():
    assert grown_size(16) == 24 and grown_size(100) == 110 and grown_size(200) == 220


def test_growing_preserves_function_old_weights_and_optimizer_state():
    torch.manual_seed(0)
    model = create_model("vgg16_bn", 10, 1, 28, width=0.125)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    opt = DessiLBI(lbi_param_groups(model), lr=0.05, nu=1.0)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    before = model(x).detach()
    growables = find_growable(model, x[:1])
    assert len(growables) == 13  # every conv of a plain chain can grow
    g = growables[1]
    old_w = g.conv.weight.detach().clone()
    old_v = opt.state[g.conv.weight]["V"].clone()
    old_b = opt.state[g.conv.weight]["momentum_buffer"].clone()
    consumer = g.consumers[0]
    old_cv = opt.state[consumer.weight]["V"].clone()
    names = {id(p): n for n, p in model.named_parameters()}
    n = g.conv.out_channels
    grow_layer(g, grown_size(n), torch.Generator().manual_seed(0))
    assert g.conv.out_channels == grown_size(n) == g.norms[0].num_features
    assert consumer.in_channels == grown_size(n)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)  # same function
    assert torch.equal(g.conv.weight[:n], old_w)
    # new filters orthogonal to the old ones
    old_rows = old_w.reshape(n, -1)
    new_rows = g.conv.weight[n:].detach().reshape(grown_size(n) - n, -1)
    assert (new_rows @ old_rows.T).abs().max() < 1e-4
    new_opt = DessiLBI(lbi_param_groups(model), lr=0.05, nu=1.0)
    transfer_state(opt, names, new_opt, model)
    st = new_opt.state[g.conv.weight]
    assert torch.equal(st["V"][:n], old_v) and (st["V"][n:] == 0).all()
    assert torch.equal(st["momentum_buffer"][:n], old_b)
    assert torch.equal(new_opt.state[consumer.weight]["V"][:, :n], old_cv)
    model.train()
    new_opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    new_opt.step()  # the wider optimizer steps with the carried state


def test_resnet_grows_block_inner_convs_only():
    model = create_model("resnet20", 10, 1, 28, width=0.25)
    names = [g.name for g in find_growable(model, torch.randn(1, 1, 28, 28))]
    assert names and all(n.endswith(".conv1") and n.startswith("layer") for n in names)


def test_grow_command(tmp_path, capsys):
    assert main(["grow", "--epochs", "3", "--dataset", "synthetic", "--synthetic-size", "128",
                 "1", "28", "10",
                 "--batch-size", "32", "--nu", "0.5", "--lambda-conv", "0.05", "--model",
                 "resnet20", "--grow-every", "1", "--max-stages", "2", "--finetune-epochs", "1",
                 "--runs-dir", str(tmp_path), "--no-progress", "--name", "g"]) == 0
    out = capsys.readouterr().out
    assert "widths:" in out
    lines = (tmp_path / "g" / "grow.jsonl").read_text().splitlines()
    assert len(lines) >= 2
    import json

    from dessilbi.experiments.growing import load_grown

    torch.load(tmp_path / "g" / "grown.pt", weights_only=True)  # no code can run
    model = load_grown(tmp_path / "g")
    final = json.loads(lines[-1])
    assert sum(p.numel() for p in model.parameters()) == final["params"]
    widths = {n: m.out_channels for n, m in model.named_modules()
              if isinstance(m, torch.nn.Conv2d)}
    assert all(widths[n] == w for n, w in final["architecture"].items())


def test_every_growing_option_names_the_folder():
    from dessilbi.experiments.growing import GrowConfig
    from dessilbi.training.config import TrainConfig

    cfg = TrainConfig(dataset="synthetic")
    names = {GrowConfig(tau=t, grow_every=e, max_stages=m, finetune_epochs=f).folder_name(cfg)
             for t in (0.1, 0.8) for e in (1, 2) for m in (3, 10) for f in (0, 5)}
    assert len(names) == 16


def test_growing_follows_the_schedule(tmp_path):
    """Growing trains through the shared loop: the lr schedule runs across stages."""
    from dessilbi.experiments.growing import GrowConfig, grow
    from dessilbi.training.config import TrainConfig

    cfg = TrainConfig(model="conv2", dataset="synthetic", synthetic_size=[64, 1, 28, 10],
                      batch_size=32, nu=0.5, lambda_conv=0.01, lr=0.05, schedule="multistep",
                      milestones=[1, 2], runs_dir=str(tmp_path), progress=False,
                      tensorboard=False, epochs=4)
    out = grow(cfg, GrowConfig(tau=1e-6, grow_every=1, max_stages=3, finetune_epochs=1))
    lrs = [s["lr"] for s in out["stages"] if s["stage"] != "final"]
    assert lrs == pytest.approx([0.005, 0.0005, 0.0005][: len(lrs)])
    assert len(lrs) >= 2 and out["stages"][-1]["epoch"] == len(lrs) + 1
    assert out["stages"][-1]["epoch"] == cfg.epochs  # --epochs is the whole budget (was ignored)


def test_an_interrupted_growing_run_resumes_to_the_uninterrupted_one(tmp_path, monkeypatch):
    """Ctrl-C after the first growth, then ``resume``: the same stages, widths and weights;
    resuming the finished run reads it back; without resume or overwrite it is refused."""
    from dessilbi.experiments.growing import GrowConfig, grow, load_grown
    from dessilbi.training import batches as feed
    from dessilbi.training.config import TrainConfig
    from dessilbi.training.engine import RunExistsError

    def cfg(name):
        return TrainConfig(model="conv2", dataset="synthetic", synthetic_size=[64, 1, 28, 10],
                           batch_size=16, nu=0.5, lambda_conv=0.01, lr=0.05, epochs=4,
                           runs_dir=str(tmp_path), name=name, progress=False, tensorboard=False)

    gcfg = GrowConfig(tau=1e-6, grow_every=1, max_stages=2, finetune_epochs=1)
    ref = grow(cfg("ref"), gcfg)
    assert any(s.get("grown") for s in ref["stages"])
    import dessilbi.experiments.growing as growing

    real, real_grown, calls = feed.batches, growing._grown, {"grown": 0, "after": 0}

    def grown(*args, **kwargs):
        calls["grown"] += 1
        return real_grown(*args, **kwargs)

    def interrupting(*args, **kwargs):
        for batch in real(*args, **kwargs):
            calls["after"] += calls["grown"] > 0
            if calls["after"] == 2:  # the second batch after the first growth
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(growing, "_grown", grown)
    monkeypatch.setattr(feed, "batches", interrupting)
    with pytest.raises(KeyboardInterrupt):
        grow(cfg("cut"), gcfg)
    monkeypatch.setattr(feed, "batches", real)
    from dessilbi.files import load_checkpoint

    saved = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert len(saved["growth"]["stages"]) == 1 and saved["batch"] > 0  # mid-epoch, grown once
    assert saved["growth"]["architecture"] != ref["stages"][0]["architecture"]
    with pytest.raises(RunExistsError):
        grow(cfg("cut"), gcfg)
    out = grow(cfg("cut"), gcfg, resume=True)
    assert out["stages"] == ref["stages"]
    a, b = load_grown(tmp_path / "ref"), load_grown(tmp_path / "cut")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert (tmp_path / "cut" / "grow.jsonl").read_text() == \
        (tmp_path / "ref" / "grow.jsonl").read_text()
    assert grow(cfg("cut"), gcfg, resume=True)["stages"] == out["stages"]
