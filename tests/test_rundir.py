"""The run folder's files (training/rundir.py): named in one place, read the same way by all."""

from __future__ import annotations

import re
from pathlib import Path

from dessilbi.training.rundir import RunDir

SRC = Path(__file__).parents[1] / "src" / "dessilbi"
NAMES = [RunDir.CONFIG, RunDir.METRICS, RunDir.SUMMARY, RunDir.INIT, RunDir.CHECKPOINT,
         RunDir.SOLUTION_PATH, RunDir.MASKS]


def test_no_other_module_spells_a_run_file_name():
    """A file name as a string literal in code (not in a docstring or comment) outside
    rundir.py would be a second owner of the folder's layout."""
    names = "|".join(re.escape(n) for n in NAMES)
    quoted = re.compile(r"""["'](""" + names + r""")["']""")
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "rundir.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if quoted.search(code) and not code.strip().startswith(("\"\"\"", "``")):
                offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_metrics_skip_torn_and_damaged_lines(tmp_path):
    files = RunDir(tmp_path)
    assert files.read_metrics() == []
    files.metrics.write_bytes(b'{"epoch": 1}\n{"epoch": 2, "full\n\xff\xfe\n[1, 2]\n{"epoch": 3}\n')
    assert files.read_metrics() == [{"epoch": 1}, {"epoch": 3}]


def test_a_missing_or_unreadable_summary_is_no_summary(tmp_path):
    files = RunDir(str(tmp_path))  # a str is accepted and kept as a Path
    assert files.path == tmp_path and files.read_summary() is None
    files.summary.write_text("{not json")
    assert files.read_summary() is None
    files.summary.write_text("[1, 2]")
    assert files.read_summary() is None
    files.summary.write_text('{"final": {"epoch": 3}}')
    assert files.read_summary() == {"final": {"epoch": 3}}


def test_results_are_what_overwrite_removes_and_keep_config_and_init(tmp_path):
    files = RunDir(tmp_path)
    results = files.results()
    assert files.metrics in results and files.checkpoint in results
    assert tmp_path / "checkpoint.pt.prev" in results
    assert files.config not in results and files.init not in results
