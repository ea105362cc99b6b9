"""The documentation's code runs: every ``python`` block of the tutorials, in order."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).parent.parent / "docs"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("page", ["tutorials/loop.md"])
def test_tutorial_runs_as_written(page, capsys):
    blocks = python_blocks(DOCS / page)
    assert len(blocks) >= 4
    namespace: dict = {"__name__": "tutorial"}
    for block in blocks:
        exec(compile(block, f"{page}", "exec"), namespace)  # noqa: S102 (our own page)
    out = capsys.readouterr().out
    assert "Full model:" in out and "Sparse model:" in out and "aimed at 0.50" in out
    kept = float(re.search(r"kept (\d\.\d+)", out).group(1))
    assert abs(kept - 0.5) <= 0.05


def test_lightning_tutorial_runs_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "tutorial"}
    for block in python_blocks(DOCS / "tutorials/lightning.md"):
        exec(compile(block, "tutorials/lightning.md", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    full, sparse, units = map(float, re.search(
        r"Full (\d\.\d+), Sparse (\d\.\d+), units kept (\d\.\d+)", out).groups())
    assert full > 0.8 and abs(sparse - full) < 0.05 and 0 < units < 1
    assert "'net.0.weight'" in out  # the masks came back from the checkpoint
