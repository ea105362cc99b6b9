"""Damaged run folders: every file of a finished run truncated, zeroed, replaced by garbage or
swapped with another, against every command that reads a run. Each case must end in a correct
result (exit 0, e.g. from a fallback) or one line and exit 2 — never a traceback — and must
leave every other file of the folder as it was."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from dessilbi.cli.main import main

TINY = ["--dataset", "synthetic", "--synthetic-size", "128", "1", "28", "10", "--epochs", "2",
        "--batch-size", "32", "--nu", "0.5", "--lambda", "0.1", "--no-progress",
        "--no-tensorboard"]
FILES = ["checkpoint.pt", "checkpoint.pt.prev", "metrics.jsonl", "summary.json", "config.yaml",
         "masks.pt", "path.pt", "init.pt"]
DAMAGE = ["truncated", "zeroed", "garbage", "swapped"]
COMMANDS = {
    "eval": ["eval", "{run}"],
    "mask": ["mask", "{run}", "--format", "json"],
    "path": ["path", "{run}", "--max-drop", "5"],
    "plot": ["plot", "{run}", "--out", "{tmp}/plots", "--no-tensorboard"],
    "resume": ["train", *TINY, "--runs-dir", "{runs}", "--name", "run", "--resume"],
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    assert main(["train", *TINY, "--runs-dir", str(root), "--name", "run"]) == 0
    return root / "run"


def damage(path: Path, how: str, other: Path) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zeroed":
        path.write_bytes(bytes(len(data)))
    elif how == "garbage":
        path.write_bytes(b"\x80\x02not a file of this kind\n" * 3)
    else:  # swapped with another file of the folder
        path.write_bytes(other.read_bytes())


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
            if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_run_file_is_a_fallback_or_one_line(finished, tmp_path, capsys, name, how):
    runs = tmp_path / "runs"
    run = runs / "run"
    shutil.copytree(finished, run)
    other = run / ("summary.json" if name != "summary.json" else "metrics.jsonl")
    damage(run / name, how, other)
    for command, template in COMMANDS.items():
        before = digests(run)
        argv = [a.format(run=run, tmp=tmp_path, runs=runs) for a in template]
        code = main(argv)
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert code in (0, 2), (command, code, err)
        if code == 2:
            assert len(err) == 1 and err[0].startswith("dessilbi"), (command, err)
        if command != "resume":  # readers never write into the run folder
            assert digests(run) == before, command
        else:  # a resume writes only what it repairs (the config records the new runs_dir)
            after = digests(run)
            changed = {k for k in before if k in after and before[k] != after[k]}
            assert changed <= {name, "config.yaml", "summary.json"}, (command, changed)
            if code == 0:  # and leaves a run every reader can open
                assert main(["eval", str(run)]) == 0, name
                capsys.readouterr()


# ------------------------------------------------------------------ crashes at write boundaries
class Killed(Exception):
    """Stands for the process dying at this point (nothing after it runs)."""


def tiny_config(runs: Path, name: str):
    from dessilbi.training.config import TrainConfig

    return TrainConfig(model="lenet3", dataset="synthetic", synthetic_size=[96, 1, 28, 10],
                       epochs=3, batch_size=32, nu=2.0, lambda_=0.3, runs_dir=str(runs),
                       name=name, progress=False, tensorboard=False,
                       linear_penalty="lasso", keep_classifier=False)


def count_writes(monkeypatch, crash_at: int | None = None, after: bool = False) -> list[str]:
    """Count (and optionally crash at) the renames and links that publish a run's files."""
    import os

    events: list[str] = []
    real = {"replace": os.replace, "link": os.link}

    def wrap(kind: str):
        def op(src, dst, *a, **k):
            events.append(f"{kind} {Path(dst).name}")
            if crash_at is not None and len(events) == crash_at and not after:
                raise Killed(events[-1])
            out = real[kind](src, dst, *a, **k)
            if crash_at is not None and len(events) == crash_at and after:
                raise Killed(events[-1])
            return out
        return op

    monkeypatch.setattr(os, "replace", wrap("replace"))
    monkeypatch.setattr(os, "link", wrap("link"))
    return events


def test_a_crash_at_every_write_boundary_resumes_to_the_same_run(tmp_path, monkeypatch):
    import json

    import torch

    from dessilbi.files import load_checkpoint
    from dessilbi.training.engine import train

    with monkeypatch.context() as m:
        events = count_writes(m)
        train(tiny_config(tmp_path, "reference"))
    reference = load_checkpoint(tmp_path / "reference" / "checkpoint.pt")["model"]
    assert len(events) >= 8, events
    held = 0
    for k in range(1, len(events) + 1):
        for after in (False, True):
            name = f"crash{k}{'after' if after else 'before'}"
            with monkeypatch.context() as m:
                count_writes(m, crash_at=k, after=after)
                with pytest.raises(Killed):
                    train(tiny_config(tmp_path, name))
            summary = train(tiny_config(tmp_path, name), resume=True)
            run = tmp_path / name
            weights = load_checkpoint(run / "checkpoint.pt")["model"]
            assert all(torch.equal(weights[p], reference[p]) for p in reference), (k, after)
            epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text()
                      .splitlines()]
            assert epochs == [1, 2, 3], (events[k - 1], after, epochs)
            assert summary["final"]["epoch"] == 3
            held += 1
    assert held == 2 * len(events)


def test_ctrl_c_at_random_moments_then_resume_is_the_uninterrupted_run(tmp_path):
    """SIGINT from another thread at random times (inside data loading, forward, backward, the
    optimizer step, evaluation, checkpoint writing...), then ``--resume``: the same weights,
    optimizer state and metrics as a run never interrupted."""
    import json
    import random
    import signal
    import threading
    import time

    import torch

    from dessilbi.files import load_checkpoint
    from dessilbi.training.engine import train

    def run_files(run):
        ck = load_checkpoint(run / "checkpoint.pt")
        epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        return ck["model"], ck["optimizer"]["state"], epochs

    train(tiny_config(tmp_path, "reference"))
    durations = []
    for timed in range(2):  # warm runs time what the trials take (the shorter: fsync stalls)
        t0 = time.perf_counter()
        train(tiny_config(tmp_path, f"timed{timed}"))
        durations.append(time.perf_counter() - t0)
    duration = min(durations)
    ref_model, ref_state, ref_epochs = run_files(tmp_path / "reference")
    rng, interrupted = random.Random(0), 0
    for trial in range(16):
        if trial >= 8 and interrupted >= 4:
            break
        name = f"sigint{trial}"
        timer = threading.Timer(rng.uniform(0.05, 0.95) * duration, signal.pthread_kill,
                                (threading.main_thread().ident, signal.SIGINT))
        timer.start()
        try:
            train(tiny_config(tmp_path, name))
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            timer.cancel()
            timer.join()
        summary = train(tiny_config(tmp_path, name), resume=True)
        model, state, epochs = run_files(tmp_path / name)
        assert epochs == ref_epochs and summary["final"]["epoch"] == ref_epochs[-1], trial
        assert all(torch.equal(model[k], ref_model[k]) for k in ref_model), trial
        for i, s in ref_state.items():
            assert all(torch.equal(s[k], state[i][k]) for k in s if torch.is_tensor(s[k])), trial
    assert interrupted >= 4  # most timers land inside the run, not after it
