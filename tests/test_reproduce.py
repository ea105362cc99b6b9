import csv
from pathlib import Path

import pytest

from dessilbi.cli.main import main
from dessilbi.paper.reproduce import KINDS, expand_runs, find_tables, load_table
from dessilbi.training.config import ConfigError

CONFIGS = Path(__file__).parent.parent / "src" / "dessilbi" / "paper" / "tables"

EXPECTED_COLUMNS = {
    "compare": ["best acc", "final acc", "Sparse acc (final)", "density (final)"],
    "sweep_best": ["best Full acc", "best Sparse acc", "final density"],
    "sweep_epochs": ["sparsity @1", "Sparse acc @1"],
    "layer_density": ["layer", "weights", "sparsity (density of supp Γ)", "filters kept"],
    "cost": ["SGD step (ms)", "DessiLBI step (ms)", "time ratio", "memory ratio"],
    "lottery": ["ticket epoch", "method", "density", "best acc", "final acc"],
}


def test_every_table_has_a_valid_config():
    tables = find_tables(CONFIGS)
    assert set(tables) == {f"T{i}" for i in range(1, 11)}
    for path in tables.values():
        spec = load_table(path)
        assert spec.kind in KINDS and {"full", "cpu"} <= set(spec.budgets)
        for budget in spec.budgets:
            assert expand_runs(spec, budget)
            assert spec.budget(budget).get("note")


def test_bad_table_configs_are_rejected(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("table: TX\ntitle: x\nkind: nope\nbudgets: {cpu: {base: {}}}\n")
    with pytest.raises(ConfigError, match="invalid kind"):
        load_table(bad)
    bad.write_text("table: TX\ntitle: x\nkind: compare\nbudgets: {cpu: {base: {nu: -1}}}\n")
    with pytest.raises(ConfigError, match="invalid nu"):
        load_table(bad)
    bad.write_text("table: TX\ntitle: x\nkind: compare\nbudgets: {cpu: {base: {modle: x}}}\n")
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        load_table(bad)


def test_reproduce_and_report_every_table_at_a_tiny_budget(tmp_path, capsys):
    tiny = ["--set", "dataset=synthetic", "--set", "synthetic_size=[64,1,28,10]", "--set",
            "epochs=2", "--set", "batch_size=32", "--set", "tensorboard=false"]
    runs, out = tmp_path / "runs", tmp_path / "results"
    assert main(["reproduce", "all", "--budget", "cpu", "--runs-dir", str(runs), "--out",
                 str(out), "--configs", str(CONFIGS), *tiny]) == 0
    for table, path in find_tables(CONFIGS).items():
        spec = load_table(path)
        # --set options make their own report, never the configured one
        assert not (out / f"{table.lower()}_cpu.md").exists()
        md, = out.glob(f"{table.lower()}_cpu_set-*.md")
        rows = list(csv.reader(md.with_suffix(".csv").open()))
        assert md.exists() and len(rows) >= 2, table
        for col in EXPECTED_COLUMNS[spec.kind]:
            assert col in rows[0], (table, col)
        text = md.read_text()
        assert "Budget **cpu**" in text and "torch" in text and "dessilbi reproduce" in text
    # report alone reads the run folders and rewrites the same files, without training
    before = {p: p.stat().st_mtime for p in runs.rglob("summary.json")}
    assert main(["report", "T2", "--budget", "cpu", "--runs-dir", str(runs), "--out",
                 str(out), "--configs", str(CONFIGS), *tiny]) == 0
    assert before == {p: p.stat().st_mtime for p in runs.rglob("summary.json")}
    assert "t2_cpu_set-" in (out / "README.md").read_text()
    assert main(["report", "T99", "--configs", str(CONFIGS)]) == 2


def test_a_diverging_run_is_reported_not_fatal(tmp_path, monkeypatch):
    from dessilbi.training import batches as feed

    cfgfile = tmp_path / "t.yaml"
    cfgfile.write_text(
        "table: TX\ntitle: x\nkind: sweep_best\nrows: lr\nbudgets:\n  cpu:\n    note: n\n"
        "    base: {model: lenet3, dataset: synthetic, synthetic_size: [64, 1, 28, 10], "
        "epochs: 1, batch_size: 32, tensorboard: false}\n    grid: {lr: [0.1, 0.05]}\n")
    real = feed.batches

    def poisoned(dataset, indices, batch_size, workers, pin):
        for x, y in real(dataset, indices, batch_size, workers, pin):
            yield (x * float("nan") if batch_size == 32 else x), y

    monkeypatch.setattr(feed, "batches", poisoned)
    spec = load_table(cfgfile)
    from dessilbi.paper.report import report_table
    from dessilbi.paper.reproduce import run_table

    run_table(spec, "cpu", str(tmp_path / "runs"))
    md, csv_path = report_table(spec, "cpu", str(tmp_path / "runs"), tmp_path / "out")[:2]
    assert md.read_text().count("diverged (NaN/Inf loss)") == 2


def test_table_configs_ship_in_the_wheel(tmp_path):
    """A plain `pip install .` carries the table configs that reproduce / report read."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(root)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("dessilbi-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    assert {f"dessilbi/paper/tables/t{i}.yaml" for i in range(1, 11)} <= shipped
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    listed = subprocess.run(
        [sys.executable, "-c", "from dessilbi.cli.paper import DEFAULT_CONFIGS as d; "
         "print(d); print(sorted(p.name for p in d.glob('*.yaml')))"],
        check=True, capture_output=True, text=True, env={"PYTHONPATH": str(site)}, cwd=tmp_path)
    where, names = listed.stdout.splitlines()
    assert where.startswith(str(site)) and "t10.yaml" in names


def test_report_without_runs_keeps_the_existing_report(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    kept = out / "t7_cpu.md"
    kept.write_text("the committed report\n")
    assert main(["report", "T7", "--budget", "cpu", "--runs-dir", str(tmp_path / "none"),
                 "--out", str(out)]) == 2
    assert kept.read_text() == "the committed report\n"
    assert not (out / "t7_cpu.csv").exists()


def test_t7_mnist_report_puts_the_published_layers_beside_ours(tmp_path):
    from test_data import make_mnist

    make_mnist(tmp_path / "data", "MNIST", n_train=64, n_test=32, compress=True)
    runs, out = tmp_path / "runs", tmp_path / "results"
    assert main(["reproduce", "T7", "--budget", "mnist", "--data-dir", str(tmp_path / "data"),
                 "--runs-dir", str(runs), "--out", str(out), "--set", "epochs=3",
                 "--set", "tensorboard=false"]) == 0
    md, = out.glob("t7_mnist_set-*.md")
    text = md.read_text()
    header = next(csv.reader(md.with_suffix(".csv").open()))
    assert header[-3:] == ["paper layer", "paper weights", "published sparsity"]
    assert "| FC1 | 235,200 | 0.049 |" in text and "| FC3 | 1,000 | 0.398 |" in text
    assert "the path " in text and "**Verdict:**" in text
    assert "```" not in text  # no raw JSON
    assert "--data-dir DIR --set epochs=3" in text
    assert md.with_suffix(".png").exists()


def test_reports_say_when_the_paper_published_nothing(tmp_path):
    from dessilbi.paper.report import _published_lines

    spec = load_table(CONFIGS / "t2.yaml")
    spec.published = {}
    line = " ".join(_published_lines(spec))
    assert "not in the material" in line


RESULTS = Path(__file__).parent.parent / "docs" / "results"


@pytest.mark.parametrize(("budget", "tables"), [
    ("mnist", (1, 2, 3, 4, 5, 7, 10)),
    ("cpu", (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)),
])
def test_committed_runs_rewrite_their_reports_without_training(tmp_path, budget, tables):
    """The records of the runs behind docs/results are committed (docs/results/runs/BUDGET):
    `report all` must find them (the mnist ones were named by an earlier release, a hash of
    every field that existed then) and give the committed tables, byte for byte; the tables
    without that budget are left out, not an error."""
    assert main(["report", "all", "--budget", budget, "--runs-dir",
                 str(RESULTS / "runs" / budget), "--out", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.glob("*.csv"))
    assert written == sorted(f"t{n}_{budget}.csv" for n in tables)
    for name in written:
        assert (tmp_path / name).read_text() == (RESULTS / name).read_text(), name
