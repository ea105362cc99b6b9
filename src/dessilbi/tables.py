"""Plain-text tables for the command line and reports."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table"]


def format_table(rows: Sequence[Sequence[object]], left: int = 1) -> str:
    """Aligned columns (the first ``left`` to the left, numbers to the right) with a rule under
    the header row."""
    text = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(text[0]))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))).rstrip() for r in text]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
