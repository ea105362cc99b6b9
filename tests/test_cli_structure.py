import json

import pytest
import torch

from dessilbi.cli.main import main
from dessilbi.files import load_checkpoint
from dessilbi.sparsity.masks import Mask
from dessilbi.training.runs import choose_epoch, open_run, pareto_front

TINY = ["--dataset", "synthetic", "--synthetic-size", "256", "1", "28", "10", "--epochs", "4",
        "--batch-size", "32", "--nu", "0.5", "--lambda", "0.1", "--no-progress", "--no-tensorboard"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", "--model", "lenet5", *TINY, "--runs-dir", str(root), "--name", "r",
                 "--lambda-conv", "0.3"]) == 0
    return root / "r"


def test_mask_command_formats_and_save(run_dir, tmp_path, capsys):
    assert main(["mask", str(run_dir), "--format", "json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    last = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert rep["(all)"]["density"] == pytest.approx(last["density"])
    assert main(["mask", str(run_dir), "--density", "0.1", "--format", "csv", "--out",
                 str(tmp_path / "m.pt")]) == 0
    assert capsys.readouterr().out.startswith("layer,weights")
    assert Mask.load(tmp_path / "m.pt").density() == pytest.approx(0.1, abs=0.01)


def test_mask_at_epoch_matches_logged_density(run_dir):
    run = open_run(run_dir)
    for m in run.metrics:
        assert run.mask(m["epoch"]).density() == pytest.approx(m["density"])
    with pytest.raises(ValueError, match="invalid epoch"):
        run.mask(99)


def test_path_pareto_and_choice(run_dir, tmp_path, capsys):
    assert main(["path", str(run_dir), "--max-drop", "100", "--save-mask",
                 str(tmp_path / "c.pt")]) == 0
    out = capsys.readouterr().out
    assert "Pareto" in out and "epoch" in out and (tmp_path / "c.pt").exists()
    pts = [{"epoch": 1, "density": 0.1, "full_acc": 90, "sparse_acc": 50},
           {"epoch": 2, "density": 0.2, "full_acc": 91, "sparse_acc": 89},
           {"epoch": 3, "density": 0.3, "full_acc": 91, "sparse_acc": 88},
           {"epoch": 4, "density": 0.4, "full_acc": 92, "sparse_acc": 91.5}]
    assert [p["epoch"] for p in pareto_front(pts)] == [1, 2, 4]
    assert choose_epoch(pts, max_drop=3)["epoch"] == 2
    assert choose_epoch(pts, max_density=0.35)["epoch"] == 2
    assert choose_epoch(pts, max_drop=0.1) is None


def test_plot_writes_png_and_svg(run_dir, tmp_path):
    assert main(["plot", str(run_dir), "--out", str(tmp_path)]) == 0
    for name in ("solution_path", "accuracy_density", "layer_density"):
        for ext in ("png", "svg"):
            assert (tmp_path / f"{name}.{ext}").stat().st_size > 1000


def test_prune_command_with_onnx(run_dir, tmp_path, capsys):
    out = tmp_path / "p.pt"
    assert main(["prune", str(run_dir), "--density", "0.3", "--out", str(out), "--onnx",
                 str(tmp_path / "p.onnx")]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["params_after"] < report["params_before"]
    assert report["macs_after"] < report["macs_before"]
    assert report["onnx_max_abs_diff"] < 1e-4
    from dessilbi.training.pruned import load_pruned

    torch.load(out, weights_only=True)  # plain tensors and values: no code can run
    model = load_pruned(out)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    from dessilbi.training.runs import open_run

    b = open_run(run_dir).build(device="cpu")
    from dessilbi.training.batches import evaluate

    assert evaluate(model, b.test_set, torch.device("cpu")) == pytest.approx(
        report["pruned_acc"])  # the rebuilt network is the pruned one


def test_lottery_with_imp_and_random(run_dir, capsys):
    assert main(["lottery", "--from", str(run_dir), "--epoch", "2", "--epochs", "2",
                 "--imp-rounds", "2"]) == 0
    out = capsys.readouterr().out
    for label in ("Γ ticket", "random", "IMP", "dense"):
        assert label in out
    (folder,) = (run_dir / "tickets").glob("epoch2_*")
    assert folder.name.startswith("epoch2_mask_seed0_imp2_sgd-momentum_lr")
    records = json.loads((folder / "lottery.json").read_text())["records"]
    by = {r["method"]: r for r in records}
    assert by["random"]["density"] == pytest.approx(by["gamma"]["density"])
    assert by["imp"]["density"] == pytest.approx(by["gamma"]["density"], rel=0.05)
    # the ticket retraining rewinds to init.pt and keeps pruned weights exactly zero
    ticket_run = folder / "gamma"
    w = load_checkpoint(ticket_run / "checkpoint.pt")["model"]
    mask = Mask.load(folder / "gamma.mask.pt")
    for n, m in mask.masks.items():
        assert (w[n][~m] == 0).all()
    init = load_checkpoint(run_dir / "init.pt")["model"]
    cfg = open_run(ticket_run).cfg
    assert cfg.init_from == str(run_dir / "init.pt") and cfg.optimizer == "sgd-momentum"
    # kept weights were trained from the initialisation
    assert any(not torch.equal(init[n][m], w[n][m]) for n, m in mask.masks.items() if m.any())


def test_lottery_branches_carry_their_settings(run_dir, capsys):
    """Two lotteries with another lr or mask seed never read each other's retrains."""
    base = ["lottery", "--from", str(run_dir), "--epoch", "1", "--epochs", "1"]
    tickets = run_dir / "tickets"
    before = set(tickets.iterdir()) if tickets.exists() else set()
    assert main([*base, "--lr", "0.1"]) == 0
    assert main([*base, "--lr", "0.001"]) == 0
    assert main([*base, "--lr", "0.001", "--seed", "3"]) == 0
    folders = sorted(set(tickets.iterdir()) - before)
    assert len(folders) == 3
    lrs = {open_run(f / "gamma").cfg.lr for f in folders}
    assert lrs == {0.1, 0.001}
    notes = [(f / "lottery.md").read_text() for f in folders]
    assert sum("lr 0.001" in n for n in notes) == 2 and sum("lr 0.1," in n for n in notes) == 1
    records = [json.loads((f / "lottery.json").read_text())["records"] for f in folders]
    runs = {r["run"] for rec in records for r in rec}
    assert len(runs) == 3 * 3  # gamma, random, dense in each branch: nothing shared


BAD_STRUCTURE_INPUTS = [
    (["imp", "--from", "{run}", "--density", "2"], "--density: invalid value '2'"),
    (["imp", "--from", "{run}", "--density", "0.5", "--rounds", "0"],
     "--rounds: invalid value '0'"),
    (["imp", "--from", "{run}"], "required: --density"),
    (["path", "{run}", "--max-drop", "-1"], "--max-drop: invalid value '-1'"),
    (["path", "{run}", "--max-density", "1.5"], "--max-density: invalid value '1.5'"),
    (["lottery", "--from", "{run}", "--epoch", "0"], "--epoch: invalid value '0'"),
    (["lottery", "--from", "{run}", "--epoch", "99"], "invalid epoch=99"),
    (["lottery", "--from", "{run}", "--epoch", "1", "--lr", "-1"], "--lr: invalid value '-1'"),
    (["mask", "{run}", "--density", "2"], "invalid density=2.0"),
    (["mask", "{run}", "--out", "{tmp}"], "it is a directory"),
    (["prune", "{run}", "--density", "0.5", "--out", "{tmp}"], "it is a directory"),
    (["grow", "--tau", "2"], "--tau: invalid value '2'"),
    (["grow", "--grow-every", "0"], "--grow-every: invalid value '0'"),
    (["eval", "{tmp}/nothing"], "not found"),
    (["train", "--dataset", "digits", "--runs-dir", "/dev/null/x"], "Not a directory"),
    (["train", "--nosuch", "1"], "unrecognized arguments"),
]


@pytest.mark.parametrize("argv, message", BAD_STRUCTURE_INPUTS)
def test_every_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capsys, argv, message):
    before = sorted(p.name for p in run_dir.rglob("*"))
    argv = [a.format(run=run_dir, tmp=tmp_path) for a in argv]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # nothing written


def exit_code(argv: list[str]) -> int:
    """main's return code, or argparse's exit code for a bad command line."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


class RunsCode:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('code ran')",))


@pytest.mark.parametrize("command", [["eval", "{f}"], ["mask", "{f}"], ["plot", "{f}"],
                                     ["prune", "{f}", "--out", "p.pt"],
                                     ["train", "--dataset", "digits", "--mask", "{f}"],
                                     ["train", "--dataset", "digits", "--init-from", "{f}"]])
def test_a_crafted_file_never_runs_code(tmp_path, monkeypatch, capsys, command):
    import pickle

    monkeypatch.chdir(tmp_path)
    crafted = tmp_path / "checkpoint.pt"
    crafted.write_bytes(pickle.dumps({"model": RunsCode()}))
    argv = [a.format(f=crafted) for a in command] + (
        ["--runs-dir", str(tmp_path / "r"), "--epochs", "1"] if command[0] == "train" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a file of tensors" in err[0], err
    assert not (tmp_path / "PWNED").exists()
