import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from dessilbi.files import load_checkpoint
from dessilbi.training import batches as feed
from dessilbi.training.batches import epoch_indices
from dessilbi.training.config import TrainConfig
from dessilbi.training.engine import NonFiniteLossError, RunExistsError, train


def cfg(tmp_path, **kw):
    base = dict(model="lenet3", dataset="synthetic", synthetic_size=[256, 1, 28, 10], epochs=4,
                batch_size=32, nu=2.0, lambda_=0.3, runs_dir=str(tmp_path), progress=False,
                tensorboard=False, linear_penalty="lasso", keep_classifier=False)
    base.update(kw)
    return TrainConfig(**base)


def weights(run_dir):
    return load_checkpoint(run_dir / "checkpoint.pt")["model"]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_of_a_finished_run_reads_it_back(tmp_path):
    c = cfg(tmp_path, epochs=1)
    summary = train(c)
    files = {f.name: f.read_bytes() for f in c.run_dir().iterdir() if f.is_file()}
    assert summary["final"]
    assert train(c, resume=True) == summary
    assert {f.name: f.read_bytes() for f in c.run_dir().iterdir() if f.is_file()} == files


def test_resume_drops_a_torn_metrics_line(tmp_path):
    ref = cfg(tmp_path / "ref", epochs=2)
    train(ref)
    c = cfg(tmp_path / "c", epochs=1)
    train(c)
    with open(c.run_dir() / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')  # killed while writing epoch 2's line
    train(cfg(tmp_path / "c", epochs=2, name=c.run_name()), resume=True)
    lines = (c.run_dir() / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    assert_same(weights(ref.run_dir()), weights(c.run_dir()))


def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path, capsys):
    from filelock import FileLock

    from dessilbi.cli.main import main

    c = cfg(tmp_path, epochs=1)
    c.run_dir().mkdir(parents=True)
    with FileLock(c.run_dir() / ".lock"):  # another process is training there
        code = main(["train", "--model", "lenet3", "--dataset", "synthetic",
                     "--synthetic-size", "256", "1", "28", "10", "--epochs", "1",
                     "--batch-size", "32", "--nu", "2", "--lambda", "0.3",
                     "--linear-penalty", "lasso", "--no-keep-classifier", "--no-progress",
                     "--no-tensorboard", "--runs-dir", str(tmp_path)])
    assert code == 2
    assert "being trained by another process" in capsys.readouterr().err
    assert not (c.run_dir() / "metrics.jsonl").exists()
    train(c)  # free again
    assert not list(c.run_dir().glob(".*.tmp"))  # no temporary file left behind


def test_an_unreadable_checkpoint_falls_back_to_prev(tmp_path):
    ref = cfg(tmp_path / "ref", epochs=3)
    train(ref)
    c = cfg(tmp_path / "c", epochs=2)
    train(c)  # checkpoint.pt = epoch 2, checkpoint.pt.prev = epoch 1
    (c.run_dir() / "summary.json").unlink()
    (c.run_dir() / "checkpoint.pt").write_bytes(b"torn")
    train(cfg(tmp_path / "c", epochs=3, name=c.run_name()), resume=True)
    lines = (c.run_dir() / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    assert_same(weights(ref.run_dir()), weights(c.run_dir()))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_a_step_stops_at_the_step_boundary(tmp_path, monkeypatch, signum):
    """The step in flight completes and is counted: resuming never applies a batch twice."""
    from dessilbi import DessiLBI

    full = cfg(tmp_path / "full", epochs=2)
    train(full)
    c = cfg(tmp_path / "c", epochs=2)
    real, calls = DessiLBI.step, {"n": 0}

    def step_then_signal(self, closure=None):
        out = real(self, closure)
        calls["n"] += 1
        if calls["n"] == 11:  # epoch 2 (8 batches an epoch), inside the optimizer step
            signal.raise_signal(signum)
        return out

    monkeypatch.setattr(DessiLBI, "step", step_then_signal)
    with pytest.raises(KeyboardInterrupt):
        train(c)
    ck = load_checkpoint(c.run_dir() / "checkpoint.pt")
    assert (ck["epoch"], ck["batch"]) == (1, 3)
    monkeypatch.setattr(DessiLBI, "step", real)
    train(c, resume=True)
    assert_same(weights(full.run_dir()), weights(c.run_dir()))


def test_the_nu_chosen_for_the_run_is_reported(tmp_path):
    from dessilbi import nu_for_steps

    auto = train(cfg(tmp_path, epochs=2, nu=None, name="auto"))
    assert auto["nu"] == pytest.approx(nu_for_steps(0.1, 2 * 8))  # 256 samples, batch 32
    assert train(cfg(tmp_path, epochs=1, name="fixed"))["nu"] == 2.0
    assert train(cfg(tmp_path, epochs=1, optimizer="sgd-momentum", name="sgd"))["nu"] is None


def test_the_default_dataset_choice_is_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("dessilbi.zoo.data.DEBIAN_FASHION_MNIST", tmp_path / "none")
    with caplog.at_level("INFO", logger="dessilbi.training"):
        train(cfg(tmp_path, dataset="default", data_dir=str(tmp_path), epochs=1,
                  max_train_batches=1))
    assert "using scikit-learn's bundled 8×8 digits" in caplog.text


def test_the_config_is_never_mutated(tmp_path):
    c = cfg(tmp_path, dataset="default", data_dir=str(tmp_path), epochs=1,
            max_train_batches=1)
    before = c.to_dict()
    summary = train(c)
    assert c.to_dict() == before
    assert summary["run"] == str(c.resolved()[0].run_dir())


def test_end_to_end_run_folder(tmp_path):
    c = cfg(tmp_path, tensorboard=True)
    summary = train(c)
    run = c.run_dir()
    for f in ("config.yaml", "metrics.jsonl", "init.pt", "checkpoint.pt", "path.pt", "masks.pt",
              "summary.json"):
        assert (run / f).exists(), f
    assert any((run / "tb").iterdir())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4]
    last = lines[-1]
    for k in ("train_loss", "lr", "full_acc", "sparse_acc", "density", "layers"):
        assert k in last
    assert 0 < last["density"] < 1
    assert summary["final"]["full_acc"] == last["full_acc"]
    masks = load_checkpoint(run / "masks.pt")
    assert set(masks["masks"]) == set(last["layers"])
    entry = torch.cat([e.flatten() for e in masks["entry"].values()])
    assert entry.max() <= 4 and (entry == -1).any() and (entry >= 1).any()
    path = load_checkpoint(run / "path.pt")
    assert path["epochs"] == [1, 2, 3, 4]
    assert len(path["gamma"]["head.4.weight"]) == 4
    # the initial weights are kept for lottery tickets
    init = load_checkpoint(run / "init.pt")["model"]
    assert not torch.equal(init["head.0.weight"], weights(run)["head.0.weight"])
    with pytest.raises(RunExistsError):
        train(c)


def test_sparse_evaluation_restores_weights(tmp_path):
    c = cfg(tmp_path, epochs=2)
    train(c)
    ck = load_checkpoint(c.run_dir() / "checkpoint.pt")
    # the checkpoint written after the Sparse evaluation holds the unmasked W
    masks = load_checkpoint(c.run_dir() / "masks.pt")["masks"]
    w = ck["model"]["head.0.weight"]
    assert (w[~masks["head.0.weight"]] != 0).any()


def test_resume_equals_uninterrupted(tmp_path):
    a = cfg(tmp_path / "a", epochs=4)
    train(a)
    b = cfg(tmp_path / "b", epochs=2)
    train(b)
    b4 = cfg(tmp_path / "b", epochs=4, name=b.run_name())
    train(b4, resume=True)
    assert_same(weights(a.run_dir()), weights(b4.run_dir()))
    metrics = (b4.run_dir() / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in metrics] == [1, 2, 3, 4]


def test_ctrl_c_mid_epoch_then_resume(tmp_path, monkeypatch):
    full = cfg(tmp_path / "full", epochs=3)
    train(full)
    c = cfg(tmp_path / "int", epochs=3)
    real = feed.batches
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            calls["n"] += 1
            if calls["n"] == 13:  # in the middle of epoch 2
                raise KeyboardInterrupt
            yield batch
            del i

    monkeypatch.setattr(feed, "batches", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(c)
    ck = load_checkpoint(c.run_dir() / "checkpoint.pt")
    assert (ck["epoch"], ck["batch"]) == (1, 2)  # 8 train + 2 eval calls in epoch 1
    monkeypatch.setattr(feed, "batches", real)
    train(c, resume=True)
    assert_same(weights(full.run_dir()), weights(c.run_dir()))


def test_kill_9_then_resume(tmp_path):
    ref = cfg(tmp_path / "ref", epochs=6, synthetic_size=[2048, 1, 28, 10])
    train(ref)
    c = cfg(tmp_path / "k", epochs=6, synthetic_size=[2048, 1, 28, 10])
    args = [sys.executable, "-m", "dessilbi.cli.main", "train", "--model", "lenet3", "--dataset",
            "synthetic", "--synthetic-size", "2048", "1", "28", "10", "--epochs", "6",
            "--batch-size", "32", "--nu", "2.0", "--lambda", "0.3", "--runs-dir",
            str(tmp_path / "k"), "--no-progress", "--no-tensorboard", "--linear-penalty",
            "lasso", "--no-keep-classifier"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ck = c.run_dir() / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ck.exists() and load_checkpoint(ck)["epoch"] >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(ck)["epoch"] < 6, "the run finished before it could be killed"
    train(c, resume=True)
    assert_same(weights(ref.run_dir()), weights(c.run_dir()))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    good = cfg(tmp_path, epochs=1, name="run")
    train(good)
    real = feed.batches

    def poisoned(*args, **kwargs):
        for x, y in real(*args, **kwargs):
            yield torch.full_like(x, float("nan")), y

    monkeypatch.setattr(feed, "batches", poisoned)
    with pytest.raises(NonFiniteLossError, match="NaN/Inf"):
        train(cfg(tmp_path, epochs=3, name="run"), resume=True)
    ck = load_checkpoint(good.run_dir() / "checkpoint.pt")
    assert ck["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    # diverging in the first epoch: there is no checkpoint to point at, and it says so
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written"):
        train(cfg(tmp_path, epochs=1, name="fresh"))


def test_schedules_and_baseline(tmp_path):
    c = cfg(tmp_path, epochs=3, schedule="multistep", milestones=[1, 2], optimizer="sgd-momentum")
    train(c)
    lrs = [json.loads(x)["lr"] for x in (c.run_dir() / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.1, 0.01, 0.001])
    assert "sparse_acc" not in json.loads((c.run_dir() / "summary.json").read_text())["final"]


def test_epoch_indices_shard_the_global_order():
    full = epoch_indices(64, seed=3, epoch=2)
    r0 = epoch_indices(64, 3, 2, rank=0, world=2)
    r1 = epoch_indices(64, 3, 2, rank=1, world=2)
    # global batch k of 16 = rank 0's and rank 1's batch k of 8
    for k in range(4):
        assert set(full[16 * k:16 * k + 16].tolist()) == set(
            r0[8 * k:8 * k + 8].tolist() + r1[8 * k:8 * k + 8].tolist())
    assert not torch.equal(full, epoch_indices(64, 3, 3))


def _ddp_worker(rank, world, port, runs_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    c = TrainConfig(model="lenet3", dataset="synthetic", synthetic_size=[256, 1, 28, 10],
                    epochs=2, batch_size=32, nu=2.0, lambda_=0.3, runs_dir=runs_dir,
                    progress=False, tensorboard=False, device="cpu", linear_penalty="lasso",
                    keep_classifier=False)
    train(c)
    import torch.distributed as dist

    dist.destroy_process_group()


def test_ddp_gloo_two_processes_match_one(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp")), nprocs=2, join=True)
    single = cfg(tmp_path / "one", epochs=2, device="cpu")
    train(single)
    ddp_run = tmp_path / "ddp" / single.run_name()
    a, b = weights(single.run_dir()), weights(ddp_run)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_rewinding_restores_initial_weights_exactly(tmp_path):
    from dessilbi.sparsity.masks import Mask
    from dessilbi.training.build import build

    src = cfg(tmp_path / "src", epochs=1)
    train(src)
    init = load_checkpoint(src.run_dir() / "init.pt")["model"]
    mask = Mask({"head.0.weight": torch.rand(init["head.0.weight"].shape) < 0.3})
    mask.save(tmp_path / "m.pt")
    b = build(cfg(tmp_path / "t", init_from=str(src.run_dir() / "init.pt"),
                  mask=str(tmp_path / "m.pt"), optimizer="sgd-momentum"))
    state = b.model.state_dict()
    for k, v in init.items():
        want = v * mask.masks[k] if k in mask.masks else v
        assert torch.equal(state[k], want), k


def test_target_density_is_hit_and_reported(tmp_path):
    c = cfg(tmp_path, model="lenet5", target_density=0.5, linear_penalty="group",
            keep_classifier=True, epochs=2, tensorboard=True)
    summary = train(c)
    lines = [json.loads(x) for x in (c.run_dir() / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        for k in ("unit_density", "macs_ratio", "params_ratio"):
            assert 0 < m[k] <= 1, k
    final = summary["final"]
    assert abs(final["unit_density"] - 0.5) <= 0.03
    assert final["macs_ratio"] < 1 and final["params_ratio"] < 1
    assert final["sparse_acc"] == final["full_acc"]  # the subnetwork is the trained network
    assert "head.2.weight" not in final["layers"]  # the classifier is left whole


@pytest.mark.parametrize("keep", [True, False])
def test_the_first_layer_is_kept_whole_unless_asked_not_to(tmp_path, keep):
    from dessilbi.training.build import build

    b = build(cfg(tmp_path, model="lenet5", target_density=0.5, linear_penalty="group",
                  keep_classifier=True, keep_first_layer=keep))
    first = b.model.features[0].weight
    assert [p is first for p, w in zip(b.target.params, b.target.whole) if w] == \
        ([True] if keep else [])


@pytest.mark.parametrize("pull", ["outside", "all", "conv-outside"])
def test_the_targets_pull_reaches_the_optimizer(tmp_path, pull):
    from dessilbi.training.build import build

    b = build(cfg(tmp_path, model="lenet5", target_density=0.5, linear_penalty="group",
                  keep_classifier=True, pull=pull))
    penalised = {id(p) for p in b.optimizer.penalised_params()}
    pulls = {g["name"]: g["pull"] for g in b.optimizer.param_groups
             if any(id(p) in penalised for p in g["params"])}
    conv = "outside" if pull == "conv-outside" else pull
    assert pulls == {"conv": conv, "linear": "all" if pull == "conv-outside" else pull}


@pytest.mark.parametrize("support", ["grow", "shrink"])
def test_the_support_schedule_reaches_the_target(tmp_path, support):
    from dessilbi.training.build import build

    b = build(cfg(tmp_path, model="lenet5", target_density=0.5, linear_penalty="group",
                  keep_classifier=True, support=support))
    assert b.target.schedule == support
    assert b.target.target_now() == (0.0 if support == "grow" else 1.0)  # before any step


def test_the_support_schedule_starts_at_start_at(tmp_path):
    from dessilbi.training.build import build

    b = build(cfg(tmp_path, model="lenet5", target_density=0.5, linear_penalty="group",
                  keep_classifier=True, start_at=0.2))
    assert b.target.start_step == round(0.2 * b.total_steps) > 0
    b.target.step_count = b.target.start_step
    assert b.target.target_now() == 1.0  # the shrinking support has not started yet


def test_the_reserve_reaches_sparsity_target(tmp_path):
    from dessilbi.training.build import build

    b = build(cfg(tmp_path, model="lenet5", target_density=0.5, linear_penalty="group",
                  keep_classifier=True, reserve=6))
    assert b.target.reserve == 6


def test_the_score_reaches_sparsity_target(tmp_path):
    from dessilbi.training.build import build

    b = build(cfg(tmp_path, model="lenet5", target_density=0.5, linear_penalty="group",
                  keep_classifier=True, score="mean"))
    assert b.target.score == "mean"


def test_the_width_prior_reaches_sparsity_target(tmp_path):
    from dessilbi.training.build import build

    b = build(cfg(tmp_path, model="lenet5", target_density=0.5, linear_penalty="group",
                  keep_classifier=True, width_prior=0.25))
    assert b.target.width_prior == 0.25


def test_target_resume_equals_uninterrupted(tmp_path, monkeypatch):
    kw = dict(model="lenet5", target_density=0.4, linear_penalty="group", keep_classifier=True,
              epochs=3)
    whole = cfg(tmp_path / "a", **kw)
    train(whole)
    c = cfg(tmp_path / "b", **kw)
    real = feed.batches
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        for batch in real(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 15:  # epoch 2, after the mask was fixed (step 12 of 24)
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(feed, "batches", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(c)
    monkeypatch.setattr(feed, "batches", real)
    train(c, resume=True)
    assert_same(weights(whole.run_dir()), weights(c.run_dir()))
    a = load_checkpoint(whole.run_dir() / "checkpoint.pt")["optimizer"]["state"]
    b = load_checkpoint(c.run_dir() / "checkpoint.pt")["optimizer"]["state"]
    for k in a:
        for name in a[k]:
            if isinstance(a[k][name], torch.Tensor):
                assert torch.equal(a[k][name], b[k][name]), name


def test_a_run_reads_its_checkpoint_once_and_building_never_changes_it(tmp_path, monkeypatch):
    from dessilbi.training import runs
    from dessilbi.training.runs import open_run

    c = cfg(tmp_path, epochs=1)
    train(c)
    loads = []
    real = runs.load_checkpoint
    monkeypatch.setattr(runs, "load_checkpoint", lambda *a, **k: loads.append(a) or real(*a, **k))
    run = open_run(c.run_dir())
    b = run.build(device="cpu")
    assert run.checkpoint()["epoch"] == 1 and loads == []  # open_run's read serves them all
    saved = {k: {n: t.clone() for n, t in st.items() if torch.is_tensor(t)}
             for k, st in run.checkpoint()["optimizer"]["state"].items()}
    for p in b.model.parameters():
        p.grad = torch.ones_like(p)
    b.optimizer.step()
    state = run.checkpoint()["optimizer"]["state"]
    assert all(torch.equal(t, state[k][n]) for k, st in saved.items() for n, t in st.items())
