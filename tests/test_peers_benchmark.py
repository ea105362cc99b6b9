"""benchmarks/peers.py: the per-epoch trace of a DessiLBI run ends where the run's row does;
the dense network is trained only for the methods that need it."""

import json
import sys
from pathlib import Path

import pytest
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
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]  # no dense run asked for
    epochs = [json.loads(x) for x in trace.read_text().splitlines()]
    assert row["method"] == "dessilbi" and row["select_at"] == 0.5
    assert row["device"] == "cpu"  # where it trained, in every row (--device; H200 rows too)
    assert row["epoch_time_ratio"] is None  # no dense run to time against
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    # 2 steps an epoch, the selection at step 3 of 6: the mask is fixed during the second epoch
    assert [e["frozen"] for e in epochs] == [False, True, True]
    assert epochs[-1]["pruned"] == row["accuracy"]
    assert epochs[-1]["layer_units"] == row["layer_units"]


def test_a_dense_run_when_asked_for_gives_its_row_and_the_time_ratio(tmp_path, monkeypatch):
    make_mnist(tmp_path, "FashionMNIST", n_train=256, n_test=64)
    out = tmp_path / "rows.jsonl"
    monkeypatch.setattr(sys, "argv", [
        "peers.py", "--model", "lenet5", "--data-dir", str(tmp_path), "--epochs", "1",
        "--methods", "dense", "dessilbi", "--targets", "0.5", "--out", str(out)])
    peers.main()
    dense, row = [json.loads(x) for x in out.read_text().splitlines()]
    assert dense["method"] == "dense" and dense["units"] == 1.0
    assert row["method"] == "dessilbi" and row["epoch_time_ratio"] > 0


def test_tp_reg_trained_once_per_seed_prunes_as_a_run_per_target(tmp_path, monkeypatch):
    """The cached regularised network, pruned at each target, gives the rows that training it
    again for each target gives (the regulariser does not depend on the ratio)."""
    make_mnist(tmp_path, "FashionMNIST", n_train=256, n_test=64)

    def rows(out: Path, *targets: str) -> list[dict]:
        monkeypatch.setattr(sys, "argv", [
            "peers.py", "--model", "lenet5", "--data-dir", str(tmp_path), "--epochs", "1",
            "--methods", "tp-reg", "--targets", *targets, "--out", str(out)])
        peers.main()
        return [json.loads(x) for x in out.read_text().splitlines()]

    once = rows(tmp_path / "once.jsonl", "0.3", "0.7")
    apart = rows(tmp_path / "a.jsonl", "0.3") + rows(tmp_path / "b.jsonl", "0.7")
    keys = ("target", "accuracy", "units", "macs", "layer_units")
    assert [{k: r[k] for k in keys} for r in once] == [{k: r[k] for k in keys} for r in apart]
    assert once[0]["units"] < once[1]["units"]  # each target pruned from the whole network


def test_dessilbi_macs_aims_at_otos_macs_read_from_earlier_rows(tmp_path, monkeypatch):
    make_mnist(tmp_path, "FashionMNIST", n_train=256, n_test=64)
    cell = {"model": "lenet5", "dataset": "fashion-mnist", "seed": 0, "epochs": 1, "lr": 0.05,
            "batch_size": 128, "max_batches": 0, "method": "oto"}
    rows = tmp_path / "oto.jsonl"
    rows.write_text("\n".join(json.dumps({**cell, **extra}) for extra in (
        {"target": 0.5, "macs": 0.42},
        {"target": 0.3, "macs": 0.2},
        {"target": 0.5, "macs": 0.9, "seed": 1},  # another cell
        {"target": 0.5, "macs": 0.8, "method": "dessilbi"})) + "\n")
    aimed = []
    monkeypatch.setattr(peers, "measure", lambda *a: aimed.append(a[9]) or {"method": a[2]})

    def run(*targets: str) -> None:
        monkeypatch.setattr(sys, "argv", [
            "peers.py", "--model", "lenet5", "--data-dir", str(tmp_path), "--epochs", "1",
            "--methods", "dessilbi-macs", "--targets", *targets, "--oto-rows", str(rows),
            "--out", str(tmp_path / "out.jsonl")])
        peers.main()

    run("0.5", "0.3")
    assert aimed == [0.42, 0.2]
    with pytest.raises(SystemExit, match="0 different OTO MACs"):
        run("0.7")
