"""The README's command lines, as written: every ``dessilbi`` command parses with the real
parser, and the training and run-reading ones run end to end at a tiny budget (synthetic data,
one short epoch) so that a renamed flag or a broken example fails here first."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dessilbi.cli.main import build_parser, main

README = Path(__file__).parents[1] / "README.md"
# appended to commands that train: the same command on synthetic data, one short epoch
TINY = ["--dataset", "synthetic", "--synthetic-size", "96", "1", "28", "10", "--epochs", "1",
        "--max-train-batches", "2", "--batch-size", "32", "--no-progress", "--no-tensorboard"]
TRAINS = ("train", "sweep", "grow")
READS_A_RUN = ("eval", "mask", "path", "plot", "prune", "lottery", "imp")


def readme_commands() -> list[str]:
    """The ``dessilbi`` lines of the README's bash blocks, continuations joined, comments cut;
    ``[a | b]`` takes its first choice, ``[a]`` its content, ``...`` stands for a run's options,
    and ``RUN`` / ``runs/<run>`` for a run folder (``{run}``)."""
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = " \n".join(blocks).replace("\\\n", " ").splitlines()
    out = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line.startswith("dessilbi "):
            continue
        line = re.sub(r"\[([^|\]]*)\|[^\]]*\]", r"\1", line)
        line = re.sub(r"\[([^\]]*)\]", r"\1", line)
        line = line.replace("runs/<run>", "{run}").replace(" RUN", " {run}")
        out.append(line)
    return out


COMMANDS = readme_commands()


def argv_of(command: str, run: str, tiny: list[str]) -> list[str]:
    words = shlex.split(command.format(run=run))[1:]
    if "..." in words:  # `dessilbi train ... --resume`: the options of a run
        i = words.index("...")
        words[i:i + 1] = tiny
    return words


def test_the_readme_has_the_commands_this_file_checks():
    kinds = {shlex.split(c)[1] for c in COMMANDS}
    assert {"train", "eval", "sweep", "mask", "path", "plot", "prune", "lottery", "imp", "grow",
            "reproduce", "report", "bench"} <= kinds
    assert len(COMMANDS) >= 25


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_parses(command):
    build_parser().parse_args(argv_of(command, "runs/x", TINY))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    # 10 epochs (the README reads epochs up to 10 of a run: `mask --epoch 10`), a coupling
    # strong enough for a support whose Sparse model is as good as the Full one (`path`)
    assert main(["train", "--model", "lenet3", *TINY, "--epochs", "10", "--nu", "2",
                 "--lambda", "0.3", "--runs-dir", str(runs), "--name", "base"]) == 0
    return runs / "base"


@pytest.mark.parametrize("command", [c for c in COMMANDS if shlex.split(c)[1] in TRAINS
                                     + READS_A_RUN])
def test_readme_command_runs_at_a_tiny_budget(command, finished_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "example.yaml").write_text(
        (README.parent / "configs" / "example.yaml").read_text())
    argv = argv_of(command, str(finished_run), TINY)
    if argv[0] in TRAINS:
        argv += TINY + ["--runs-dir", str(tmp_path / "runs")]
        if argv[0] == "train" and "--resume" in argv:
            assert main(["train", *argv[1:argv.index("--resume")],
                         "--runs-dir", str(tmp_path / "runs")]) == 0
    if argv[0] in ("lottery", "imp"):
        argv += ["--epochs", "1"]
    assert main(argv) == 0, command
