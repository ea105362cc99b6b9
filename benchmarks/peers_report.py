"""Tables and the accuracy-vs-MACs figure of docs/peers.md from benchmarks/peers.py results.

    python benchmarks/peers_report.py docs/peers/*.jsonl --figure docs/peers/accuracy_vs_macs.png

Prints one markdown table per (model, dataset): per target, the mean over seeds of the pruned
accuracy (no fine-tune), the achieved fraction of units kept and the MACs ratio of each method
(DessiLBI: of each setting of its target, never averaged together).
With ``--cells``, one table of every (model, dataset, target, seed) instead, a column per method
and per setting of DessiLBI's target (support, pull, selection), and their means. With
``--standing``, one line per (model, dataset, target): DessiLBI against the best peer on the
means over seeds, then DessiLBI against each peer over the seed cells both have.
``--dessilbi SETTING`` keeps, of DessiLBI's rows, only those of that setting (the column name the
tables print; the pure path and the MACs-aimed rows are left out too), for every output and the
figure.
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


def ordered(columns: set[str]) -> list[str]:
    """Columns as the tables show them: by method (``ORDER``), then by setting."""
    return sorted(columns, key=lambda c: (ORDER.index(c.split()[0]), c))


def table(rows: list[dict[str, Any]]) -> str:
    """Per target, the mean over seeds of each column (a method, or a setting of DessiLBI's
    target, as in :func:`cells_table`), the best in bold; the last line: each column's mean over
    the targets it has, and how many."""
    cells: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["method"] != "dense":
            cells[(setting(r), r["target"])].append(r)
    dense = [r["accuracy"] for r in rows if r["method"] == "dense"]
    columns = ordered({c for c, _ in cells})
    targets = sorted({t for _, t in cells})
    seeds = sorted({r["seed"] for r in rows})
    out = [f"Dense SGD-momentum: {statistics.mean(dense):.2f} % (seeds {seeds})." if dense
           else f"Seeds {seeds}; no dense run in these rows.", "",
           "| units kept (target) | " + " | ".join(columns) + " |",
           "|---" * (len(columns) + 1) + "|"]
    means: dict[str, list[float]] = defaultdict(list)
    for t in targets:
        accs = {c: statistics.mean(r["accuracy"] for r in cells[(c, t)])
                for c in columns if cells.get((c, t))}
        best = max(accs.values())
        line = []
        for c in columns:
            if c not in accs:
                line.append("—")
                continue
            got = cells[(c, t)]
            means[c].append(accs[c])
            units = statistics.mean(r["units"] for r in got)
            macs = statistics.mean(r["macs"] for r in got)
            text = f"{accs[c]:.2f} ({units:.2f} u, {macs:.2f} M, n={len(got)})"
            line.append(f"**{text}**" if accs[c] == best else text)
        out.append(f"| {t:.2f} | " + " | ".join(line) + " |")
    out.append("| mean (targets) | " + " | ".join(
        f"{statistics.mean(means[c]):.2f} ({len(means[c])})" for c in columns) + " |")
    return "\n".join(out)


AIMED = ("dessilbi", "dessilbi-macs")  # DessiLBI with SparsityTarget: a column per setting


def setting(row: dict[str, Any]) -> str:
    """The column of a row: its method, for DessiLBI aimed by SparsityTarget (at units or at
    MACs) with the target's settings (the keys a row lacks were not options yet: their values
    then)."""
    if row["method"] not in AIMED:
        return row["method"]
    parts = [f"{row['method']} {row.get('support', 'grow')}", row.get("pull", "all"),
             str(row.get("select_at", 0.5))]
    if row.get("path_speed") != 1.0:
        parts.append(f"path speed {row.get('path_speed', 10.0):g}")
    if row.get("whole_first"):
        parts.append("first layer whole")
    if row.get("allocation", "global") != "global":
        parts.append(row["allocation"])
    if row.get("start_at"):
        parts.append(f"from {row['start_at']:g}")
    if row.get("fade"):
        parts.append("fade")
    if row.get("settle"):
        parts.append(f"settle {row['settle']:g}")
    if row.get("reserve"):
        parts.append(f"reserve {row['reserve']}")
    if row.get("score", "initial") != "initial":
        parts.append(f"score {row['score']}")
    if row.get("width_prior"):
        parts.append(f"width prior {row['width_prior']:g}")
    if row.get("ranking"):  # an allocation given by hand or another ranking, as screened
        parts.append(row["ranking"])
    return " / ".join(parts)


def cells_table(rows: list[dict[str, Any]]) -> str:
    """Accuracy (MACs kept) per cell and column, the best of a cell in bold; the last line: each
    column's mean over the cells it has, and how many."""
    got: dict[tuple[Any, ...], dict[str, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list))
    for r in rows:
        if r["method"] != "dense":
            got[(r["model"], r["dataset"], r["target"], r["seed"])][setting(r)].append(r)
    columns = ordered({c for cell in got.values() for c in cell})
    out = ["| model, data, units, seed | " + " | ".join(columns) + " |",
           "|---" * (len(columns) + 1) + "|"]
    scores: dict[str, list[float]] = defaultdict(list)
    for key in sorted(got):
        means = {c: statistics.mean(r["accuracy"] for r in rs) for c, rs in got[key].items()}
        line = []
        for c in columns:
            if c not in means:
                line.append("—")
                continue
            scores[c].append(means[c])
            macs = statistics.mean(r["macs"] for r in got[key][c])
            text = f"{means[c]:.2f} ({macs:.3f})"
            line.append(f"**{text}**" if means[c] == max(means.values()) else text)
        out.append(f"| {key[0]}, {key[1]}, {key[2]:.2f}, {key[3]} | " + " | ".join(line) + " |")
    out.append("| mean (cells) | " + " | ".join(
        f"{statistics.mean(scores[c]):.2f} ({len(scores[c])})" for c in columns) + " |")
    return "\n".join(out)


def standing(rows: list[dict[str, Any]]) -> str:
    """Per (model, dataset, target), DessiLBI's mean accuracy over seeds (MACs kept) against the
    best peer's (every method but DessiLBI's and the dense network), and the mean difference over
    the seeds both have; then, per peer, both means over the (model, dataset, target, seed)
    cells both have. The rows hold one setting of DessiLBI (``--dessilbi``), never several."""
    settings = sorted({setting(r) for r in rows if r["method"] == "dessilbi"})
    if len(settings) > 1:
        raise ValueError("the standing compares one setting of DessiLBI; choose one with "
                         "--dessilbi: " + "; ".join(settings))
    by_cell: dict[tuple[Any, ...], dict[str, float]] = defaultdict(dict)
    macs: dict[tuple[Any, ...], dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r["method"] not in ("dense", "dessilbi-path", "dessilbi-macs"):
            key = (r["model"], r["dataset"], r["target"], r["seed"])
            by_cell[key][r["method"]] = r["accuracy"]
            macs[key][r["method"]] = r["macs"]
    out = ["| model, data, units | DessiLBI | best peer | difference (seeds both have) |",
           "|---|---|---|---|"]
    for group in sorted({k[:3] for k in by_cell}):
        seeds = [k for k in by_cell if k[:3] == group]
        means = {m: (statistics.mean(by_cell[k][m] for k in seeds if m in by_cell[k]),
                     statistics.mean(macs[k][m] for k in seeds if m in by_cell[k]),
                     sum(m in by_cell[k] for k in seeds))
                 for m in {m for k in seeds for m in by_cell[k]}}
        if "dessilbi" not in means or len(means) < 2:
            continue
        ours = means.pop("dessilbi")
        peer = max(means, key=lambda m: means[m][0])
        paired = [by_cell[k]["dessilbi"] - by_cell[k][peer] for k in seeds
                  if {"dessilbi", peer} <= by_cell[k].keys()]
        out.append(f"| {group[0]}, {group[1]}, {group[2]:.2f} | {ours[0]:.2f} ({ours[1]:.3f}, "
                   f"n={ours[2]}) | {peer} {means[peer][0]:.2f} ({means[peer][1]:.3f}, "
                   f"n={means[peer][2]}) | {statistics.mean(paired):+.2f} (n={len(paired)}) |")
    for peer in sorted({m for cell in by_cell.values() for m in cell} - {"dessilbi"}):
        both = [c for c in by_cell.values() if "dessilbi" in c and peer in c]
        if not both:
            continue
        ahead = sum(c["dessilbi"] >= c[peer] for c in both)
        near = sum(c["dessilbi"] >= c[peer] - 0.3 for c in both)
        out.append(f"\nOver the {len(both)} cells with {peer}: DessiLBI "
                   f"{statistics.mean(c['dessilbi'] for c in both):.2f}, {peer} "
                   f"{statistics.mean(c[peer] for c in both):.2f}; at or above it in {ahead}, "
                   f"within 0.3 points in {near}, worst "
                   f"{min(c['dessilbi'] - c[peer] for c in both):+.2f}.")
    return "\n".join(out)


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against MACs, a column per (model, dataset): every run a small point, each
    method's mean over seeds per target a large one, joined; the second row zooms on the top
    3 points of accuracy, where the methods that lead differ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["dataset"]) for r in rows})
    fig, axes = plt.subplots(2, len(groups), figsize=(5 * len(groups), 7.5), squeeze=False)
    for column, (model, dataset) in enumerate(groups):
        sel = [r for r in rows if (r["model"], r["dataset"]) == (model, dataset)]
        top = max(r["accuracy"] for r in sel)
        for row, ax in enumerate(axes[:, column]):
            _plot_methods(ax, sel)
            low = top - 3 if row else max(0, min(r["accuracy"] for r in sel) - 2)
            ax.set(title=f"{model} / {dataset}" + (" (top 3 points)" if row else ""),
                   xlabel="MACs of the pruned model / dense",
                   ylabel="test accuracy, no fine-tune (%)", ylim=(low, top + 0.5))
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_methods(ax: Any, rows: list[dict[str, Any]]) -> None:
    for method in (m for m in ORDER if any(r["method"] == m for r in rows)):
        color = f"C{ORDER.index(method)}"  # one colour per method in every panel
        mine = [r for r in rows if r["method"] == method]
        ax.plot([r["macs"] for r in mine], [r["accuracy"] for r in mine], ".", color=color,
                alpha=0.4)
        means = [(statistics.mean(r["macs"] for r in mine if r["target"] == t),
                  statistics.mean(r["accuracy"] for r in mine if r["target"] == t))
                 for t in sorted({r["target"] for r in mine})]
        ax.plot(*zip(*means), "o-", color=color, label=method)
    dense = [r["accuracy"] for r in rows if r["method"] == "dense"]
    if dense:
        ax.axhline(statistics.mean(dense), color="grey", ls="--", label="dense")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--figure", type=Path)
    ap.add_argument("--cells", action="store_true", help="one line per cell and seed")
    ap.add_argument("--standing", action="store_true", help="DessiLBI against the best peer")
    ap.add_argument("--dessilbi", metavar="SETTING",
                    help="of DessiLBI's rows keep only this setting's (a table's column name; "
                         "the rows aimed at MACs with the same settings stay too)")
    args = ap.parse_args()
    rows = [r for r in load(args.results) if "method" in r and "epoch" not in r]  # no traces
    if args.dessilbi:  # the DessiLBI rows of this setting, aimed at units or at MACs
        chosen = args.dessilbi.split(" ", 1)[1:]
        rows = [r for r in rows if not r["method"].startswith("dessilbi")
                or (r["method"] in AIMED and setting(r).split(" ", 1)[1:] == chosen)]
    if args.cells or args.standing:
        try:
            print(cells_table(rows) if args.cells else standing(rows))
        except ValueError as err:
            ap.error(str(err))
        return
    for model, dataset in sorted({(r["model"], r["dataset"]) for r in rows}):
        print(f"### {model} on {dataset}\n")
        print(table([r for r in rows if (r["model"], r["dataset"]) == (model, dataset)]) + "\n")
    if args.figure:
        figure(rows, args.figure)


if __name__ == "__main__":
    main()
