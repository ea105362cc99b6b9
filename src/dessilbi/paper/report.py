"""Reports of the paper's tables, read from run folders only (never training).

``report_table`` writes ``<out>/<table>_<budget>.md`` (the table, what the budget changes from
the paper, the paper's numbers beside ours or a sentence saying they are not known, a figure
where one says more) and ``.csv``; ``write_index`` links them all.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..training.config import TrainConfig
from ..training.rundir import RunDir
from ..training.runs import read_metrics
from .reproduce import TableSpec, budget_name, expand_runs, lottery_file

__all__ = ["report_table", "write_index"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- reports
def _diverged(cfg: TrainConfig) -> bool:
    summary = RunDir(cfg.run_dir()).read_summary()
    return summary is not None and "diverged" in summary


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{100 * v:.2f}%" if pct else f"{v:.2f}"
    return str(v)


def _table_md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _grid_label(cfg: TrainConfig, keys: list[str], spec: TableSpec | None = None,
                budget: str = "") -> dict[str, Any]:
    """The grid coordinates of a run (a bundle shows its ``label``)."""
    out = {}
    grid = (spec.budget(budget).get("grid") or {}) if spec else {}
    for k in keys:
        # bundles: the most specific one whose settings this run has
        matches = [v for v in grid.get(k, []) if isinstance(v, dict) and all(
            getattr(cfg, kk) == vv for kk, vv in v.items() if kk != "label")]
        if matches:
            best = max(matches, key=len)
            out[k] = best.get("label", next(iter(best.values())))
        else:
            out[k] = getattr(cfg, k, "")
    return out


def report_table(spec: TableSpec, budget: str, runs_dir: str = "runs/paper",
                 out_dir: str | Path = "docs/results",
                 overrides: dict[str, Any] | None = None) -> list[Path]:
    """Write ``<out>/<table>_<budget>.md`` and ``.csv`` from run folders (never retrains).

    Returns the files written: none when no run of the table has results (an existing report
    is never replaced by a table of missing runs). Options that change what the runs compute
    (``overrides`` other than ``data_dir``) give the report a name of its own,
    ``<table>_<budget>_set-<hash>``, so the configured report is never overwritten.
    """
    b = spec.budget(budget)
    cfgs = expand_runs(spec, budget, runs_dir, overrides)
    keys = list((b.get("grid") or {}).keys())
    header, rows, extra = _build_rows(spec, b, cfgs, keys, runs_dir)
    found = bool(rows) if spec.kind in ("lottery", "cost") else any(
        RunDir(c.run_dir()).metrics.exists() or _diverged(c) for c in cfgs)
    if not found:
        log.warning("%s (%s): no results under %s; nothing written", spec.table, budget, runs_dir)
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{spec.table.lower()}_{budget}{_override_suffix(overrides)}"
    md_path, csv_path = out / f"{stem}.md", out / f"{stem}.csv"
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header] + rows)
    csv_path.write_text(buf.getvalue())
    summaries = [RunDir(c.run_dir()).read_summary() for c in cfgs]
    walls = [s.get("wall_time_s") for s in summaries if s is not None]
    wall = sum(w for w in walls if w)
    first = cfgs[0]
    lines = [
        f"# {spec.table}: {spec.title}",
        "",
        f"Budget **{budget}**: {b.get('note', '')}".rstrip(),
        "",
        f"Data: {first.dataset}; epochs: {first.epochs}"
        f"{f' of {first.max_train_batches} batches' if first.max_train_batches else ''}; "
        f"runs: {len(cfgs)}; training wall time: {wall / 60:.1f} min; hardware: "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads"
        f"{', CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}; "
        f"torch {torch.__version__}.",
        "",
        f"Regenerate: `dessilbi reproduce {spec.table} --budget {budget}{_cli_options(overrides)}`"
        f" (trains what is missing, then writes this report).",
        "",
        _table_md(header, rows),
        "",
    ]
    lines += extra
    fig = _figure(spec, b, cfgs, keys, rows, out / f"{stem}.png")
    if fig is not None:
        lines += ["", f"![{spec.table}]({fig.name})"]
    lines += _published_lines(spec)
    md_path.write_text("\n".join(lines) + "\n")
    return [md_path, csv_path] + ([fig] if fig is not None else [])


def _cli_options(overrides: dict[str, Any] | None) -> str:
    """The reproduce options that give these runs (the data folder as --data-dir DIR)."""
    over = dict(overrides or {})
    out = " --data-dir DIR" if "data_dir" in over else ""
    over.pop("data_dir", None)
    return out + "".join(f" --set {k}={json.dumps(v)}" for k, v in sorted(over.items()))


def _override_suffix(overrides: dict[str, Any] | None) -> str:
    changed = {k: v for k, v in (overrides or {}).items() if k not in ("data_dir", "download")}
    if not changed:
        return ""
    digest = hashlib.sha256(json.dumps(changed, sort_keys=True, default=str).encode())
    return f"_set-{digest.hexdigest()[:8]}"


def _figure(spec: TableSpec, b: dict[str, Any], cfgs: list[TrainConfig], keys: list[str],
            rows: list[list[str]], path: Path) -> Path | None:
    """The table's picture where one says more (see :mod:`.figures`), else None."""
    from . import figures

    runs = [(c, m) for c in cfgs if (m := read_metrics(c.run_dir()))]
    if spec.kind == "lottery" and rows:
        return figures.lottery_figure(rows, path)
    if not runs:
        return None
    if spec.kind == "sweep_epochs":
        name = budget_name(spec, b)
        return figures.sweep_epochs_figure(
            [(", ".join(f"{k}={v}" for k, v in _grid_label(c, keys, spec, name).items()), m)
             for c, m in runs], path)
    if spec.kind == "sweep_best" and spec.rows:
        return figures.sweep_best_figure(
            spec.rows, [(float(getattr(c, spec.rows)), m) for c, m in runs], path)
    if spec.kind == "layer_density":
        pub = _published_layers(spec, runs[-1][1])
        return figures.layer_path_figure(
            runs[-1][1], {k: float(r["sparsity"]) for k, (_, r) in pub.items()}, path)
    return None


def _published_layers(spec: TableSpec, m: list[dict[str, Any]]
                      ) -> dict[str, tuple[str, dict[str, Any]]]:
    """{our layer name: (the paper's layer name, its published record)}, matched in order when
    the paper lists as many layers as the run has."""
    pub = list((spec.published.get("layers") or {}).items())
    ours = list(m[-1]["layers"]) if m else []
    if not pub or len(pub) != len(ours):
        return {}
    return dict(zip(ours, pub))


def _layer_path_lines(spec: TableSpec, m: list[dict[str, Any]]) -> list[str]:
    """Where along the solution path each layer has the published density, and a verdict."""
    pub = _published_layers(spec, m)
    if not pub:
        return []
    lines = ["", "Along the solution path (density of each layer per epoch, `metrics.jsonl`):", ""]
    close = []
    for name, (pname, record) in pub.items():
        value = float(record["sparsity"])
        path = [(x["epoch"], x["layers"][name]["density"]) for x in m]
        final = path[-1][1]
        close.append(abs(final - value) <= 0.1 * value)
        reached = next((e for e, d in path if d >= value), None)
        top_epoch, top = max(path, key=lambda e: e[1])
        where = (f"reaches it at epoch {reached} of {path[-1][0]}" if reached is not None else
                 f"stays below it (at most {top:.3f}, epoch {top_epoch})")
        lines.append(f"- {pname} ({name}): published {value:.3f}; ours {final:.3f} at the end; "
                     f"the path {where}.")
    finals = [m[-1]["layers"][n]["density"] for n in pub]
    order = [float(r["sparsity"]) for _, r in pub.values()]
    same_order = sorted(range(len(finals)), key=finals.__getitem__) == sorted(
        range(len(order)), key=order.__getitem__)
    verdict = ("every layer within 10 % of the published density" if all(close) else
               f"{sum(close)} of {len(close)} layers within 10 % of the published density")
    lines += ["", f"**Verdict:** {verdict}; the ordering of the layers by density "
                  f"{'matches' if same_order else 'differs from'} the paper's."]
    return lines


def _published_lines(spec: TableSpec) -> list[str]:
    """The paper's numbers in words: the per-layer values are columns of the table already."""
    pub = spec.published or {}
    if pub.get("layers"):
        return ["", f"Published values: the paper's Table {spec.table[1:]} "
                    f"({pub.get('data', 'its data')}), in the *published* columns above."]
    note = pub.get("note")
    text = ("The paper's numbers for this table are not in the material this project has "
            "(its caption only), so no published column is shown.")
    return ["", f"Published: {text}" + (f" The caption says: {note}" if note else "")]


def _compare_row(m: list[dict[str, Any]]) -> list[list[str]]:
    return [[_fmt(max(x["full_acc"] for x in m)), _fmt(m[-1]["full_acc"]),
             _fmt(m[-1].get("sparse_acc")), _fmt(m[-1].get("density"), True)]]


def _sweep_best_row(m: list[dict[str, Any]]) -> list[list[str]]:
    return [[_fmt(max(x["full_acc"] for x in m)), _fmt(max(x.get("sparse_acc", 0.0) for x in m)),
             _fmt(m[-1].get("density"), True)]]


def _layer_rows(m: list[dict[str, Any]]) -> list[list[str]]:
    return [[name, f"{r['weights']:,}", f"{r['density']:.3f}",
             f"{r['filters_kept']}/{r['filters']}" if "filters" in r else ""]
            for name, r in m[-1]["layers"].items()]


# kind → (columns, rows of one run from its metrics): the tables with one block per run
_PER_RUN: dict[str, tuple[list[str], Callable[[list[dict[str, Any]]], list[list[str]]]]] = {
    "compare": (["best acc", "final acc", "Sparse acc (final)", "density (final)"],
                _compare_row),
    "sweep_best": (["best Full acc", "best Sparse acc", "final density"], _sweep_best_row),
    "layer_density": (["layer", "weights", "sparsity (density of supp Γ)", "filters kept"],
                      _layer_rows),
}


def _add_published_layers(spec: TableSpec, header: list[str], rows: list[list[str]],
                          m: list[dict[str, Any]]) -> None:
    """Put the paper's per-layer numbers beside ours (the run's last rows), layer by layer."""
    pub = _published_layers(spec, m)
    if not pub:
        return
    if "published" not in header[-1]:
        header += ["paper layer", "paper weights", "published sparsity"]
    for row, (pname, r) in zip(rows[-len(pub):], pub.values()):
        row += [pname, f"{r['weights']:,}", f"{r['sparsity']:.3f}"]


def _build_rows(spec: TableSpec, b: dict[str, Any], cfgs: list[TrainConfig], keys: list[str],
                runs_dir: str) -> tuple[list[str], list[list[str]], list[str]]:
    extra: list[str] = []
    if spec.kind in _PER_RUN:
        cols, make = _PER_RUN[spec.kind]
        header, rows = keys + cols, []
        for c in cfgs:
            m = read_metrics(c.run_dir())
            lab = [str(v) for v in _grid_label(c, keys, spec, budget_name(spec, b)).values()]
            if _diverged(c):
                rows.append(lab + ["diverged (NaN/Inf loss)"] + ["—"] * (len(cols) - 1))
                continue
            if not m:
                rows.append(lab + ["(missing)"] * len(cols))
                continue
            rows += [lab + r for r in make(m)]
            if spec.kind == "layer_density":
                _add_published_layers(spec, header, rows, m)
                extra.append(f"Final: Full {m[-1]['full_acc']:.2f}%, Sparse "
                             f"{m[-1]['sparse_acc']:.2f}%, overall density "
                             f"{100 * m[-1]['density']:.2f}% ({c.model}, {c.epochs} epochs).")
                extra += _layer_path_lines(spec, m)
        return header, rows, extra
    if spec.kind == "sweep_epochs":
        header, rows = keys[:], []
        first = True
        for c in cfgs:
            m = {x["epoch"]: x for x in read_metrics(c.run_dir())}
            picks = sorted({max(1, round(f * c.epochs)) for f in spec.epochs_at})
            if first:
                for e in picks:
                    header += [f"sparsity @{e}", f"Sparse acc @{e}"]
                first = False
            row = [str(v) for v in _grid_label(c, keys, spec, budget_name(spec, b)).values()]
            if _diverged(c):
                row[-1] += " (diverged)"
            for e in picks:
                row += [_fmt(m[e]["density"], True) if e in m else "—",
                        _fmt(m[e]["sparse_acc"]) if e in m else "—"]
            rows.append(row)
        return header, rows, extra
    if spec.kind == "lottery":
        header = ["source run", "ticket epoch", "method", "density", "best acc", "final acc"]
        rows = []
        for c in cfgs:
            for f in [p for p in [lottery_file(c, b.get("lottery") or {})] if p.exists()]:
                data = json.loads(f.read_text())
                for r in data["records"]:
                    # a retrain lives beside lottery.json (also in a moved or committed copy)
                    m = read_metrics(f.parent / Path(r["run"]).name)
                    rows.append([c.model, str(data["epoch"]), r["method"],
                                 _fmt(r["density"], True),
                                 _fmt(max(x["full_acc"] for x in m)) if m else "—",
                                 _fmt(m[-1]["full_acc"]) if m else "—"])
        return header, rows, extra
    # cost
    path = Path(runs_dir) / "cost" / f"{budget_name(spec, b)}.json"
    header = ["model", "batch", "device", "SGD step (ms)", "DessiLBI step (ms)", "time ratio",
              "SGD memory (MB)", "DessiLBI memory (MB)", "memory ratio", "memory measure",
              "peak RSS SGD / DessiLBI (MB)"]
    rows = []
    if path.exists():
        for r in json.loads(path.read_text()):
            rss = f"{r['rss_sgd_mb']:.0f} / {r['rss_lbi_mb']:.0f}" if "rss_sgd_mb" in r else "—"
            rows.append([r["model"], str(r["batch_size"]), r["device"], f"{r['sgd_ms']:.2f}",
                         f"{r['lbi_ms']:.2f}", f"{r['time_ratio']:.3f}", f"{r['sgd_mb']:.1f}",
                         f"{r['lbi_mb']:.1f}", f"{r['memory_ratio']:.3f}", r["memory_kind"], rss])
    return header, rows, extra


def write_index(out_dir: str | Path = "docs/results") -> Path:
    """``<out>/README.md``: a link to every table report and figure found in ``out``."""
    out = Path(out_dir)
    lines = ["# Results", "",
             "Generated by `dessilbi reproduce TABLE --budget cpu|mnist|full` and "
             "`dessilbi report`; each file states its data, epochs, hardware, versions and wall "
             "time.", ""]
    if (out / "runs").is_dir():
        lines += ["The records of the runs behind the reports (`metrics.jsonl`, `summary.json`, "
                  "`config.yaml`; no checkpoints) are in `docs/results/runs/`: e.g. "
                  "`dessilbi report T7 --budget mnist --runs-dir docs/results/runs/mnist` "
                  "rewrites a report from them without training.", ""]
    if (out / "claims.md").exists():
        lines += ["What the numbers say about the paper's claims: [claims.md](claims.md).", ""]
    lines += ["| table | budget | report | data | figure |", "|---|---|---|---|---|"]

    def key(p: Path) -> tuple[int, str]:
        t = p.stem.split("_")[0][1:]
        return (int(t) if t.isdigit() else 99, p.stem)

    for md in sorted(out.glob("t*_*.md"), key=key):
        title = md.read_text().splitlines()[0].lstrip("# ")
        png = md.with_suffix(".png")
        lines.append(f"| {title} | {md.stem.split('_', 1)[1]} | [{md.name}]({md.name}) | "
                     f"[{md.stem}.csv]({md.stem}.csv) | "
                     f"{f'[{png.name}]({png.name})' if png.exists() else ''} |")
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
