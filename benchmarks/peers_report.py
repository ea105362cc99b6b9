"""Tables and the accuracy-vs-MACs figure of docs/peers.md from benchmarks/peers.py results.

    python benchmarks/peers_report.py docs/peers/*.jsonl --figure docs/peers/accuracy_vs_macs.png

Prints one markdown table per (model, dataset): per target, the mean over seeds of the pruned
accuracy (no fine-tune), the achieved fraction of units kept and the MACs ratio of each method.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

ORDER = ("dessilbi", "dessilbi-path", "oto", "dessilbi-macs", "tp-reg", "tp-mag", "tp-mag-ft")


def load(paths: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(line) for p in paths for line in p.read_text().splitlines() if line]


def table(rows: list[dict[str, Any]]) -> str:
    cells: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["method"], r["target"])].append(r)
    dense = [r["accuracy"] for r in rows if r["method"] == "dense"]
    methods = [m for m in ORDER if any(k[0] == m for k in cells)]
    targets = sorted({t for m, t in cells if m != "dense"})
    seeds = sorted({r["seed"] for r in rows})
    out = [f"Dense SGD-momentum: {statistics.mean(dense):.2f} % (seeds {seeds}).", "",
           "| units kept (target) | " + " | ".join(methods) + " |",
           "|---" * (len(methods) + 1) + "|"]
    for t in targets:
        line = []
        best = max(statistics.mean(r["accuracy"] for r in cells[(m, t)])
                   for m in methods if cells.get((m, t)))
        for m in methods:
            got = cells.get((m, t))
            if not got:
                line.append("—")
                continue
            acc = statistics.mean(r["accuracy"] for r in got)
            units = statistics.mean(r["units"] for r in got)
            macs = statistics.mean(r["macs"] for r in got)
            text = f"{acc:.2f} ({units:.2f} u, {macs:.2f} M, n={len(got)})"
            line.append(f"**{text}**" if acc == best else text)
        out.append(f"| {t:.2f} | " + " | ".join(line) + " |")
    return "\n".join(out)


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["dataset"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (model, dataset) in zip(axes[0], groups):
        sel = [r for r in rows if (r["model"], r["dataset"]) == (model, dataset)]
        for m in ORDER:
            pts = sorted((r["macs"], r["accuracy"]) for r in sel if r["method"] == m)
            if pts:
                ax.plot(*zip(*pts), "o", label=m, alpha=0.8)
        dense = [r["accuracy"] for r in sel if r["method"] == "dense"]
        ax.axhline(statistics.mean(dense), color="grey", ls="--", label="dense")
        ax.set(title=f"{model} / {dataset}", xlabel="MACs of the pruned model / dense",
               ylabel="test accuracy, no fine-tune (%)", ylim=(max(0, min(
                   r["accuracy"] for r in sel) - 2), 100))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--figure", type=Path)
    args = ap.parse_args()
    rows = load(args.results)
    for model, dataset in sorted({(r["model"], r["dataset"]) for r in rows}):
        print(f"### {model} on {dataset}\n")
        print(table([r for r in rows if (r["model"], r["dataset"]) == (model, dataset)]) + "\n")
    if args.figure:
        figure(rows, args.figure)


if __name__ == "__main__":
    main()
