import json
import subprocess
import sys

import pytest

from dessilbi.cli.main import build_parser, main

TINY = ["--model", "lenet3", "--dataset", "synthetic", "--synthetic-size", "128", "1", "28", "10",
        "--epochs", "2", "--batch-size", "32", "--nu", "2", "--lambda", "0.3", "--no-progress",
        "--no-tensorboard"]


def run_cli(tmp_path, *args):
    return main([*args])


def test_train_eval_and_table(tmp_path, capsys):
    assert main(["train", *TINY, "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Full acc" in out and "Sparse acc" in out and "head.0.weight" in out
    run = next(tmp_path.iterdir())
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert result["full_acc"] == pytest.approx(metrics[-1]["full_acc"])
    assert result["sparse_acc"] == pytest.approx(metrics[-1]["sparse_acc"])
    assert result["density"] == pytest.approx(metrics[-1]["density"])


def test_config_file_and_flags(tmp_path, capsys):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text("model: lenet5\nepochs: 1\nnu: 5\n")
    assert main(["train", "--config", str(cfgfile), *TINY[:2], "--dataset", "synthetic",
                 "--synthetic-size", "64", "1", "28", "10", "--no-progress", "--no-tensorboard",
                 "--runs-dir", str(tmp_path / "r"), "--name", "x"]) == 0
    saved = (tmp_path / "r" / "x" / "config.yaml").read_text()
    assert "model: lenet3" in saved and "nu: 5" in saved and "epochs: 1" in saved
    toml = tmp_path / "c.toml"
    toml.write_text('model = "lenet3"\nepochs = 1\ndataset = "synthetic"\nsynthetic_size = '
                    '[64, 1, 28, 10]\nprogress = false\ntensorboard = false\n')
    assert main(["train", "--config", str(toml), "--runs-dir", str(tmp_path / "t")]) == 0


def test_sweep_runs_missing_and_reuses(tmp_path, capsys):
    args = ["sweep", *TINY, "--runs-dir", str(tmp_path), "--grid", "nu=1,5", "--grid",
            "optimizer=dessilbi,sgd-momentum", "--out", str(tmp_path / "s.json")]
    assert main(args) == 0
    records = json.loads((tmp_path / "s.json").read_text())
    assert len(records) == 4 and len({r["run"] for r in records}) == 4
    assert sum(1 for p in tmp_path.iterdir() if p.is_dir()) == 4
    mtimes = {p: (p / "summary.json").stat().st_mtime for p in tmp_path.iterdir() if p.is_dir()}
    assert main(args) == 0  # everything finished: nothing retrained
    assert all((p / "summary.json").stat().st_mtime == t for p, t in mtimes.items())


def test_sweep_twice_on_the_default_dataset(tmp_path, monkeypatch, capsys):
    """The default dataset is resolved before the grid point is named (was: KeyError)."""
    monkeypatch.setattr("dessilbi.zoo.data.DEBIAN_FASHION_MNIST", tmp_path / "none")
    args = ["sweep", "--model", "lenet3", "--epochs", "1", "--max-train-batches", "2",
            "--data-dir", str(tmp_path / "data"), "--no-progress", "--no-tensorboard",
            "--runs-dir", str(tmp_path / "runs"), "--grid", "nu=5", "--out", str(tmp_path / "s")]
    assert main(args) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("digits_lenet3_")
    first = (run / "summary.json").read_text()
    assert main(args) == 0
    assert (run / "summary.json").read_text() == first
    assert json.loads((tmp_path / "s").read_text())[0]["run"] == str(run)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--model", "lenet9"], "invalid model='lenet9'"),
        (["train", "--dataset", "svhn"], "invalid dataset='svhn'"),
        (["train", "--optimizer", "lion"], "invalid optimizer='lion'"),
        (["train", "--lr", "-1"], "invalid lr=-1.0"),
        (["train", "--nu", "0"], "invalid nu=0.0"),
        (["train", "--momentum", "1.5"], "invalid momentum=1.5"),
        (["train", "--config", "/nonexistent/c.yaml"], "cannot read config file"),
        (["train", "--dataset", "mnist", "--data-dir", "/nonexistent"], "not found in"),
        (["eval", "/nonexistent/run"], "not found"),
        (["sweep", "--grid", "bogus=1,2"], "invalid --grid key 'bogus'"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, capsys, argv, message):
    assert main([*argv, "--runs-dir", str(tmp_path)] if argv[0] != "eval" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_bad_config_files(tmp_path, capsys):
    unknown = tmp_path / "u.yaml"
    unknown.write_text("modle: lenet3\n")
    assert main(["train", "--config", str(unknown)]) == 2
    assert "unknown key 'modle'" in capsys.readouterr().err
    broken = tmp_path / "b.yaml"
    broken.write_text("model: [lenet3\n")
    assert main(["train", "--config", str(broken)]) == 2
    assert "cannot parse config file" in capsys.readouterr().err
    corrupt = tmp_path / "ck.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert main(["eval", str(corrupt)]) == 2
    assert "corrupted" in capsys.readouterr().err


def test_argparse_errors_exit_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "dessilbi.cli.main", "train", "--lr", "abc"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--lr" in proc.stderr


def test_shipped_configs_parse():
    from pathlib import Path

    from dessilbi.training.config import TrainConfig, load_config_file

    files = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    assert files
    for f in files:
        TrainConfig.from_dict(load_config_file(f), source=str(f)).validate()


def test_every_train_option_says_what_it_does_and_its_default():
    from dessilbi.cli.main import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        if not action.option_strings or action.dest in ("help", "config", "resume", "overwrite"):
            continue
        flag = action.option_strings[0].lstrip("-")
        assert action.help and action.help.lower() != flag.replace("-", " "), flag
        assert "default" in action.help, flag


BAD_CONFIG_VALUES = [
    ("epochs: 1.5", "invalid epochs=1.5: expected an integer"),
    ("seed: abc", "invalid seed='abc': expected an integer"),
    ("momentum: '0.5'", "invalid momentum='0.5': expected a number"),
    ("nesterov: 'no'", "invalid nesterov='no': expected true or false"),
    ("fused: 'false'", "invalid fused='false': expected true or false"),
    ("milestones: [1, a]", "invalid milestones=[1, 'a']: expected a list of integers"),
    ("log_every: 0", "invalid log_every=0: must be an integer >= 1"),
    ("device: foo", "invalid device='foo'"),
]


@pytest.mark.parametrize("line, message", BAD_CONFIG_VALUES)
def test_a_config_value_of_the_wrong_type_is_one_clean_line(tmp_path, capsys, line, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: digits\nepochs: 1\n{line}\n")
    assert main(["train", "--config", str(cfg), "--runs-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r").exists()  # nothing was trained


@pytest.mark.parametrize("flags, message", [
    (["--log-every", "0"], "invalid log_every=0"),
    (["--device", "foo"], "invalid device='foo'"),
])
def test_bad_flags_are_one_clean_line(tmp_path, capsys, flags, message):
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--runs-dir",
                 str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_help_parsing_and_list_do_not_load_torch():
    import subprocess
    import sys

    code = ("import sys\n"
            "from dessilbi.cli.main import build_parser\n"
            "p = build_parser()\n"
            "for argv in (['train', '--nu', '5'], ['mask', 'RUN'], ['reproduce', 'T7'],\n"
            "             ['grow', '--tau', '0.5']):\n"
            "    p.parse_args(argv)\n"
            "p.format_help()\n"
            "from dessilbi.cli.main import main\n"
            "assert main(['list']) == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eval_of_a_run_without_gamma_says_so(tmp_path, capsys):
    assert main(["train", *TINY, "--optimizer", "sgd-momentum", "--runs-dir", str(tmp_path),
                 "--name", "sgd"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "sgd")]) == 0
    cells = capsys.readouterr().out.splitlines()[-1].split()  # Full, Sparse, density
    assert cells[0].endswith("%") and cells[1:] == ["—", "—"]  # was "nan%" and "0.00%"


def _subcommand_options() -> list[tuple[str, str]]:
    import argparse

    root = build_parser()
    (sub,) = [a for a in root._actions if isinstance(a, argparse._SubParsersAction)]
    return [(name, opt) for name, p in sub.choices.items() for a in p._actions
            for opt in a.option_strings if opt.startswith("--")]


def test_every_option_reaches_the_script_through_torchrun() -> None:
    """torchrun parses its script's arguments too: an option that is a prefix of one of its own
    is swallowed or refused. Only ``--nu`` is (``--numa-binding``); its alias gets through."""
    from torch.distributed.run import get_args_parser

    torchrun = get_args_parser()
    torchrun.exit = lambda *a, **k: (_ for _ in ()).throw(ValueError(a))  # type: ignore[method-assign]
    refused = set()
    for name, opt in _subcommand_options():
        argv = [name, opt, "1"]
        try:
            ns = torchrun.parse_args(["--nproc-per-node", "2", "-m", "dessilbi.cli.main", *argv])
        except ValueError:
            refused.add(opt)
            continue
        assert ns.training_script_args == argv, opt
    assert refused == {"--nu"}
    args = build_parser().parse_args(["train", "--coupling-nu", "7"])
    assert args.nu == 7.0


def test_commands_on_a_run_read_the_data_folder_the_user_names(tmp_path, capsys, caplog):
    """A run folder stores its data folder; eval / mask / prune say when they use it, and
    ``--data-dir`` replaces it."""
    from test_data import make_mnist

    make_mnist(tmp_path / "data", "MNIST", n_train=64, n_test=16)
    assert main(["train", *TINY[:2], "--dataset", "mnist", "--data-dir", str(tmp_path / "data"),
                 *TINY[9:], "--runs-dir", str(tmp_path), "--name", "r"]) == 0
    run = str(tmp_path / "r")
    caplog.set_level("INFO")
    assert main(["eval", run]) == 0
    assert f"from {tmp_path / 'data'}, the run's stored data folder" in caplog.text
    (tmp_path / "empty").mkdir()
    for argv in (["eval", run], ["mask", run, "--density", "0.5"],
                 ["prune", run, "--out", str(tmp_path / "p.pt")]):
        capsys.readouterr()
        assert main([*argv, "--data-dir", str(tmp_path / "empty")]) == 2, argv
        assert str(tmp_path / "empty") in capsys.readouterr().err


def test_train_eval_and_mask_print_the_same_layer_table(tmp_path, capsys):
    assert main(["train", *TINY, "--runs-dir", str(tmp_path), "--name", "r"]) == 0
    trained = capsys.readouterr().out.splitlines()
    assert main(["eval", str(tmp_path / "r")]) == 0
    evaluated = capsys.readouterr().out.splitlines()
    assert main(["mask", str(tmp_path / "r")]) == 0
    masked = capsys.readouterr().out.splitlines()
    def rows(lines):  # cells of the per-layer table (widths may differ with its rows)
        return {line.split()[0]: line.split() for line in lines
                if line.startswith(("layer ", "head."))}

    assert rows(masked)["layer"] == ["layer", "weights", "non-zero", "density", "filters", "kept"]
    assert rows(masked)["head.0.weight"][3].endswith("%")
    assert rows(masked) == rows(trained) == rows(evaluated)


def test_train_aimed_at_a_fraction_of_the_macs(tmp_path, capsys):
    assert main(["train", "--model", "lenet5", "--dataset", "synthetic", "--synthetic-size", "256",
                 "1", "28", "10", "--epochs", "2", "--batch-size", "32", "--lr", "0.05",
                 "--target-macs", "0.4", "--no-progress", "--no-tensorboard",
                 "--runs-dir", str(tmp_path)]) == 0
    (run,) = tmp_path.iterdir()
    assert "_macs0.4_" in run.name
    final = json.loads((run / "summary.json").read_text())["final"]
    assert final["macs_ratio"] == pytest.approx(0.4, abs=0.03)
    assert main(["train", "--target-macs", "0.4", "--target-density", "0.5",
                 "--runs-dir", str(tmp_path)]) == 2
    assert "not both" in capsys.readouterr().err


def test_the_catalog_names_exactly_what_is_registered(capsys):
    from dessilbi import catalog
    from dessilbi.core.optimizers import OPTIMIZERS
    from dessilbi.zoo.data import DATASETS
    from dessilbi.zoo.models import MODELS

    assert set(catalog.MODELS) == set(MODELS)
    assert set(catalog.DATASETS) == set(DATASETS)
    assert set(catalog.OPTIMIZERS) == set(OPTIMIZERS)
    assert all(catalog.MODELS.values()) and all(catalog.OPTIMIZERS.values())
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in [*MODELS, *DATASETS, *OPTIMIZERS])


def test_version_names_dessilbi_and_torch(capsys):
    import torch

    import dessilbi

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == \
        f"dessilbi {dessilbi.__version__} (torch {torch.__version__})"
