"""benchmarks/peers_report.py: the per-cell table names each setting of DessiLBI's target."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers_report  # noqa: E402


def row(method, seed, accuracy, **settings):
    return {"model": "conv4", "dataset": "fashion-mnist", "target": 0.5, "seed": seed,
            "method": method, "accuracy": accuracy, "macs": 0.25, "path_speed": 1.0,
            **settings}


def test_a_row_lacking_a_setting_reads_as_the_value_it_had_then():
    assert peers_report.setting(row("oto", 0, 90.0)) == "oto"
    assert peers_report.setting({**row("dessilbi", 0, 90.0), "path_speed": 10.0}) == \
        "dessilbi grow / all / 0.5 / path speed 10"
    assert peers_report.setting(row("dessilbi", 0, 90.0, support="shrink", pull="outside",
                                    select_at=0.3, whole_first=True)) == \
        "dessilbi shrink / outside / 0.3 / first layer whole"
    assert peers_report.setting(row("dessilbi", 0, 90.0, support="shrink", pull="outside",
                                    select_at=0.3, start_at=0.1, fade=True)) == \
        "dessilbi shrink / outside / 0.3 / from 0.1 / fade"
    assert peers_report.setting(row("dessilbi", 0, 90.0, support="shrink", pull="outside",
                                    select_at=0.3, start_at=0.0, fade=False)) == \
        "dessilbi shrink / outside / 0.3"
    assert peers_report.setting(row("dessilbi", 0, 90.0, support="shrink", pull="outside",
                                    select_at=0.3, score="mean")) == \
        "dessilbi shrink / outside / 0.3 / score mean"
    assert peers_report.setting(row("dessilbi", 0, 90.0, support="shrink", pull="outside",
                                    select_at=0.3, width_prior=0.25)) == \
        "dessilbi shrink / outside / 0.3 / width prior 0.25"
    assert peers_report.setting(row("dessilbi", 0, 90.0, support="shrink", pull="outside",
                                    select_at=0.3, settle=0.1)) == \
        "dessilbi shrink / outside / 0.3 / settle 0.1"
    assert peers_report.setting(row("dessilbi", 0, 90.0, support="shrink", pull="outside",
                                    select_at=0.3, ranking="hand:[1,2]")) == \
        "dessilbi shrink / outside / 0.3 / hand:[1,2]"


def test_cells_one_line_per_seed_and_a_column_per_setting():
    rows = [row("dessilbi", 0, 91.0, support="shrink", pull="outside", select_at=0.3),
            row("dessilbi", 1, 92.0, support="shrink", pull="outside", select_at=0.3),
            row("dessilbi", 0, 90.0, pull="conv-outside"), row("oto", 0, 91.5),
            row("oto", 1, 91.0), row("dense", 0, 93.0)]
    lines = peers_report.cells_table(rows).splitlines()
    assert lines[0] == ("| model, data, units, seed | dessilbi grow / conv-outside / 0.5 | "
                        "dessilbi shrink / outside / 0.3 | oto |")
    assert lines[2] == ("| conv4, fashion-mnist, 0.50, 0 | 90.00 (0.250) | 91.00 (0.250) | "
                        "**91.50 (0.250)** |")
    assert lines[3] == "| conv4, fashion-mnist, 0.50, 1 | — | **92.00 (0.250)** | 91.00 (0.250) |"
    assert lines[4] == "| mean (cells) | 90.00 (1) | 91.50 (2) | 91.25 (2) |"


def test_table_averages_seeds_per_setting_never_across_settings():
    rows = [{**r, "units": 0.5} for r in (
        row("dessilbi", 0, 91.0, support="shrink", pull="outside", select_at=0.3),
        row("dessilbi", 1, 92.0, support="shrink", pull="outside", select_at=0.3),
        row("dessilbi", 0, 80.0, pull="conv-outside"), row("oto", 0, 91.0),
        row("oto", 1, 91.0))]
    lines = peers_report.table(rows).splitlines()
    assert lines[0] == "Seeds [0, 1]; no dense run in these rows."
    assert lines[2] == ("| units kept (target) | dessilbi grow / conv-outside / 0.5 | "
                        "dessilbi shrink / outside / 0.3 | oto |")
    assert lines[4] == ("| 0.50 | 80.00 (0.50 u, 0.25 M, n=1) | "
                        "**91.50 (0.50 u, 0.25 M, n=2)** | 91.00 (0.50 u, 0.25 M, n=2) |")
    assert lines[5] == "| mean (targets) | 80.00 (1) | 91.50 (1) | 91.00 (1) |"
    with_dense = peers_report.table(rows + [{**row("dense", 0, 93.0), "units": 1.0}])
    assert with_dense.splitlines()[0] == "Dense SGD-momentum: 93.00 % (seeds [0, 1])."


def test_standing_compares_with_the_best_peer_on_the_seeds_both_have():
    ours = {"support": "shrink", "pull": "outside", "select_at": 0.3}
    rows = [row("dessilbi", 0, 91.0, **ours), row("dessilbi", 1, 92.0, **ours),
            row("oto", 0, 91.5), row("oto", 1, 91.7), row("oto", 2, 95.0),
            row("tp-reg", 0, 80.0), row("dense", 0, 93.0), row("dessilbi-path", 0, 99.0)]
    lines = peers_report.standing(rows).splitlines()
    # OTO's mean is over its three seeds; the difference only over the two DessiLBI has.
    assert lines[2] == ("| conv4, fashion-mnist, 0.50 | 91.50 (0.250, n=2) | "
                        "oto 92.73 (0.250, n=3) | -0.10 (n=2) |")
    assert lines[4] == ("Over the 2 cells with oto: DessiLBI 91.50, oto 91.60; at or above it "
                        "in 1, within 0.3 points in 1, worst -0.50.")
    assert lines[6].startswith("Over the 1 cells with tp-reg: DessiLBI 91.00, tp-reg 80.00")
    assert len(lines) == 7  # neither the dense network nor the pure path counts as a peer


def test_standing_refuses_two_settings_of_dessilbi():
    rows = [row("dessilbi", 0, 91.0, support="shrink", pull="outside", select_at=0.3),
            row("dessilbi", 0, 80.0, pull="conv-outside"), row("oto", 0, 91.5)]
    with pytest.raises(ValueError, match="--dessilbi: dessilbi grow / conv-outside / 0.5; "
                                         "dessilbi shrink / outside / 0.3"):
        peers_report.standing(rows)


def cells_keeping(setting, rows, tmp_path, monkeypatch, capsys):
    """The lines ``peers_report --cells --dessilbi setting`` prints for ``rows``."""
    import json

    results = tmp_path / "rows.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(sys, "argv", ["peers_report", str(results), "--cells",
                                      "--dessilbi", setting])
    peers_report.main()
    return capsys.readouterr().out.splitlines()


def test_the_dessilbi_option_keeps_one_setting_and_every_peer(tmp_path, monkeypatch, capsys):
    rows = [row("dessilbi", 0, 91.0, support="shrink", pull="outside", select_at=0.3),
            row("dessilbi", 0, 80.0, pull="conv-outside"), row("dessilbi-path", 0, 70.0),
            row("oto", 0, 91.5)]
    lines = cells_keeping("dessilbi shrink / outside / 0.3", rows, tmp_path, monkeypatch, capsys)
    assert lines[0] == "| model, data, units, seed | dessilbi shrink / outside / 0.3 | oto |"
    assert lines[2] == "| conv4, fashion-mnist, 0.50, 0 | 91.00 (0.250) | **91.50 (0.250)** |"


def test_the_figure_has_a_column_per_model_and_data_and_a_zoomed_row(tmp_path):
    import matplotlib.image

    rows = [{**row(m, seed, acc), "units": 0.5} for m, seed, acc in (
        ("dessilbi", 0, 91.0), ("dessilbi", 1, 92.0), ("oto", 0, 91.5), ("tp-reg", 0, 40.0))]
    rows.append({**rows[0], "model": "lenet5"})
    path = tmp_path / "figure.png"
    peers_report.figure(rows, path)
    height, width = matplotlib.image.imread(path).shape[:2]
    assert (height, width) == (900, 1200)  # two rows of 7.5 in, two columns of 5 in, 120 dpi


def test_the_dessilbi_option_keeps_the_rows_aimed_at_macs_with_the_same_settings(
        tmp_path, monkeypatch, capsys):
    same = dict(support="shrink", pull="outside", select_at=0.3)
    rows = [row("dessilbi", 0, 91.0, **same), row("dessilbi-macs", 0, 91.2, **same),
            row("dessilbi-macs", 0, 60.0, pull="conv-outside"), row("oto", 0, 91.5)]
    assert peers_report.setting(rows[1]) == "dessilbi-macs shrink / outside / 0.3"
    lines = cells_keeping("dessilbi shrink / outside / 0.3", rows, tmp_path, monkeypatch, capsys)
    assert lines[0] == ("| model, data, units, seed | dessilbi shrink / outside / 0.3 | oto | "
                        "dessilbi-macs shrink / outside / 0.3 |")
    assert lines[2].endswith("| 91.00 (0.250) | **91.50 (0.250)** | 91.20 (0.250) |")
