"""benchmarks/peers.py: the per-epoch trace of a DessiLBI run ends where the run's row does."""

import json
import sys
from pathlib import Path

from test_data import make_mnist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers  # noqa: E402


def test_trace_follows_the_run_to_its_row(tmp_path, monkeypatch):
    make_mnist(tmp_path, "FashionMNIST", n_train=256, n_test=64)
    out, trace = tmp_path / "rows.jsonl", tmp_path / "trace.jsonl"
    monkeypatch.setattr(sys, "argv", [
        "peers.py", "--model", "lenet5", "--data-dir", str(tmp_path), "--epochs", "3",
        "--methods", "dessilbi", "--targets", "0.5", "--select-at", "0.5",
        "--out", str(out), "--trace", str(trace)])
    peers.main()
    dense, row = [json.loads(x) for x in out.read_text().splitlines()]
    epochs = [json.loads(x) for x in trace.read_text().splitlines()]
    assert dense["method"] == "dense" and row["select_at"] == 0.5
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    # 2 steps an epoch, the selection at step 3 of 6: the mask is fixed during the second epoch
    assert [e["frozen"] for e in epochs] == [False, True, True]
    assert epochs[-1]["pruned"] == row["accuracy"]
    assert epochs[-1]["layer_units"] == row["layer_units"]
