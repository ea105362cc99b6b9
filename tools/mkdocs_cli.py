"""MkDocs hook: the command-line reference (docs/cli.md) generated from the parser itself.

A page holding the marker ``<!-- cli-reference -->`` gets, in its place, the ``--help`` of
``dessilbi`` and of every sub-command, so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

MARKER = "<!-- cli-reference -->"


def _reference() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width: keep it fixed
    from dessilbi.cli.main import build_parser

    parser = build_parser()
    parts = ["## dessilbi", "", "```text", parser.format_help().rstrip(), "```", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        parts += [f"## dessilbi {name}", "", "```text", command.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, _reference())
