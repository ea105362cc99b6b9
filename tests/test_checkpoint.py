import random

import numpy as np
import pytest
import torch

from dessilbi.files import CheckpointError, load_checkpoint, save_checkpoint
from dessilbi.training.checkpoint import rng_state, set_rng_state


def test_atomic_save_keeps_previous(tmp_path):
    p = tmp_path / "ck.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, p)
    save_checkpoint({"step": 2, "w": torch.zeros(3)}, p)
    assert load_checkpoint(p)["step"] == 2
    assert load_checkpoint(tmp_path / "ck.pt.prev")["step"] == 1
    assert not (tmp_path / "ck.pt.tmp").exists()


def test_corrupted_and_missing_checkpoints_are_clear(tmp_path):
    p = tmp_path / "ck.pt"
    save_checkpoint({"w": torch.randn(100)}, p)
    save_checkpoint({"w": torch.randn(100)}, p)
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="corrupted.*may be intact"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    p = tmp_path / "rng.pt"
    save_checkpoint({"rng": rng_state()}, p)
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(load_checkpoint(p)["rng"])
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_a_directory_is_never_replaced(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="is a directory"):
        save_checkpoint({"a": torch.zeros(1)}, folder)
    assert (folder / "mine.txt").read_text() == "keep"
    assert not (tmp_path / "out.prev").exists()


def test_the_previous_file_is_kept_and_no_temporary_left(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"v": torch.tensor(1)}, path)
    save_checkpoint({"v": torch.tensor(2)}, path)
    assert int(load_checkpoint(path)["v"]) == 2
    assert int(load_checkpoint(tmp_path / "c.pt.prev")["v"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt.prev"]


def test_ctrl_c_inside_a_write_is_a_keyboard_interrupt_and_the_old_file_stays(tmp_path,
                                                                               monkeypatch):
    """torch's zip writer turns an interrupt raised inside ``write`` into ``RuntimeError:
    unexpected pos``; the save reports the interrupt, keeps the previous file and leaves no
    temporary behind."""
    import dessilbi.files as files

    path = tmp_path / "c.pt"
    save_checkpoint({"x": torch.zeros(3)}, path)
    real_save = torch.save

    class InterruptedFile:  # the third write is hit by Ctrl-C
        def __init__(self, f):
            self.f, self.calls = f, 0

        def write(self, data):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    monkeypatch.setattr(files.torch, "save", lambda obj, f: real_save(obj, InterruptedFile(f)))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"x": torch.ones(1000), "y": torch.ones(500)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["x"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_an_interrupted_text_write_keeps_the_old_text(tmp_path, monkeypatch):
    import dessilbi.files as files

    path = tmp_path / "metrics.jsonl"
    files.write_text_atomic(path, "old\n")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        files.write_text_atomic(path, "new\n" * 1000)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
