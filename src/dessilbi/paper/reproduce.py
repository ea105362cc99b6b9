"""Regenerate the paper's tables: configs → runs (resumable) → reports read from run folders.

A table config (``dessilbi/paper/tables/<table>.yaml``, shipped with the package) names a
*kind* (how the table is built) and, per
budget (``full``: the paper's scale; ``cpu``: a stated reduction on offline data), the base
training options and the grid of runs::

    table: T2
    title: ...
    kind: sweep_best     # compare | sweep_best | sweep_epochs | layer_density | cost | lottery
    rows: kappa                 # the grid key that makes the rows (sweeps)
    budgets:
      full: {base: {...}, grid: {model: [vgg16_bn, resnet56], kappa: [0.5, 1, 2]}}
      cpu:  {base: {...}, grid: {...}, note: "what differs from the paper"}
    published: {...}            # the paper's numbers, where known

``run_table`` trains what is missing (a finished run is found by its configuration-named
folder); ``report_table`` reads only run folders and writes ``<out>/<table>.md`` and ``.csv``.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..training.config import ConfigError, TrainConfig, load_config_file
from ..training.runs import read_metrics

log = logging.getLogger(__name__)

__all__ = ["TableSpec", "load_table", "find_tables", "expand_runs", "run_table", "report_table",
           "write_index", "KINDS"]

KINDS = ("compare", "sweep_best", "sweep_epochs", "layer_density", "cost", "lottery")
BUDGETS = ("full", "cpu", "mnist")


@dataclass
class TableSpec:
    """One table of the paper and how to regenerate it."""

    table: str
    title: str
    kind: str
    budgets: dict[str, dict[str, Any]]
    rows: str = ""
    epochs_at: list[float] = field(default_factory=list)  # fractions of the schedule (sweep_epochs)
    published: dict[str, Any] = field(default_factory=dict)
    claims: list[str] = field(default_factory=list)
    path: str = ""

    def budget(self, name: str) -> dict[str, Any]:
        if name not in self.budgets:
            raise ConfigError(f"{self.table}: no budget {name!r} (has {', '.join(self.budgets)})")
        return self.budgets[name]


def load_table(path: str | Path) -> TableSpec:
    """Parse and validate a table config (every run configuration is validated too)."""
    data = load_config_file(path)
    known = {"table", "title", "kind", "budgets", "rows", "epochs_at", "published", "claims"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    for k in ("table", "title", "kind", "budgets"):
        if k not in data:
            raise ConfigError(f"{path}: missing key {k!r}")
    spec = TableSpec(**data, path=str(path))
    if spec.kind not in KINDS:
        raise ConfigError(f"{path}: invalid kind={spec.kind!r}; choose one of {', '.join(KINDS)}")
    for name, b in spec.budgets.items():
        if name not in BUDGETS:
            raise ConfigError(f"{path}: unknown budget {name!r}")
        if not isinstance(b.get("base"), dict):
            raise ConfigError(f"{path}: budget {name} needs a 'base' mapping")
        extra = set(b) - {"base", "grid", "note", "lottery", "bench"}
        if extra:
            raise ConfigError(f"{path}: budget {name}: unknown keys {sorted(extra)}")
        for cfg in expand_runs(spec, name):
            _validate_without_files(cfg)
        if spec.rows and spec.rows not in (b.get("grid") or {}):
            raise ConfigError(f"{path}: rows={spec.rows!r} is not a grid key of budget {name}")
    return spec


def _validate_without_files(cfg: TrainConfig) -> None:
    saved = cfg.init_from, cfg.mask
    cfg.init_from = cfg.mask = ""
    try:
        cfg.validate()
    finally:
        cfg.init_from, cfg.mask = saved


def find_tables(root: str | Path) -> dict[str, Path]:
    """{table id: config path} for every ``*.yaml`` under ``root``."""
    out = {}
    for p in sorted(Path(root).glob("*.yaml")):
        out[load_config_file(p).get("table", p.stem)] = p
    return out


# The paper's structure (element-wise lasso on every linear layer, the classifier included) and
# the ν its CPU tables were calibrated with where a table does not set one.
PAPER_STRUCTURE: dict[str, Any] = {"linear_penalty": "lasso", "keep_classifier": False,
                                   "nu": 20.0}


def expand_runs(spec: TableSpec, budget: str, runs_dir: str = "runs/paper",
                overrides: dict[str, Any] | None = None) -> list[TrainConfig]:
    """Every training configuration of the table at ``budget`` (grid expanded)."""
    b = spec.budget(budget)
    grid = b.get("grid") or {}
    keys = list(grid)
    cfgs = []
    for combo in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        d = {**PAPER_STRUCTURE, **b["base"]}
        for k, v in zip(keys, combo):
            if isinstance(v, dict):  # a bundle of settings, e.g. an optimizer with its own lr
                d.update({kk: vv for kk, vv in v.items() if kk != "label"})
            else:
                d[k] = v
        d.update(overrides or {})
        d.setdefault("runs_dir", runs_dir)
        d["runs_dir"] = runs_dir
        d.setdefault("progress", False)
        cfgs.append(TrainConfig.from_dict(d, source=f"{spec.table}/{budget}"))
    return cfgs


def run_table(spec: TableSpec, budget: str, runs_dir: str = "runs/paper",
              overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train every missing run of the table (finished runs are reused, interrupted ones resumed)."""
    from ..training.engine import NonFiniteLossError, train

    summaries: list[dict[str, Any]] = []
    b = spec.budget(budget)
    if spec.kind == "cost":  # no training: a benchmark
        _run_cost(spec, b, runs_dir, overrides)
        return summaries
    for cfg in expand_runs(spec, budget, runs_dir, overrides):
        done = cfg.run_dir() / "summary.json"
        if done.exists():
            summaries.append(json.loads(done.read_text()))
            continue
        t0 = time.perf_counter()
        try:
            s = train(cfg, resume=True)
        except NonFiniteLossError as e:  # a result too: this setting diverges
            log.warning("%s diverged: %s", cfg.run_dir(), e)
            s = {"run": str(cfg.run_dir()), "config": cfg.to_dict(), "final": {},
                 "diverged": str(e)}
        s["wall_time_s"] = time.perf_counter() - t0
        (cfg.run_dir() / "summary.json").write_text(json.dumps(s, indent=2))
        summaries.append(s)
    if spec.kind == "lottery":
        _run_lottery(spec, b, runs_dir, overrides)
    return summaries


# ----------------------------------------------------------------------------- lottery / cost
def _lottery_base(cfg: TrainConfig, opts: dict[str, Any]) -> tuple[int, TrainConfig]:
    """The ticket epoch and the retraining configuration of a lottery table's source run."""
    from ..experiments.lottery import ticket_config

    epoch = min(int(opts.get("epoch", max(1, cfg.epochs // 5))), cfg.epochs)
    base = ticket_config(cfg, cfg.run_dir(), optimizer=opts.get("optimizer", "sgd-momentum"),
                         epochs=int(opts.get("epochs", cfg.epochs)), **(opts.get("train") or {}))
    return epoch, base


def _lottery_file(cfg: TrainConfig, opts: dict[str, Any]) -> Path:
    """Where the lottery of ``cfg`` lives (a branch; folders of earlier versions are read too)."""
    from ..experiments.lottery import LOTTERY_FILE, branch_dir

    epoch, base = _lottery_base(cfg, opts)
    rounds = int(opts.get("imp_rounds", 2))
    path = branch_dir(cfg.run_dir(), "tickets", base, epoch=epoch, mask_seed=0,
                      imp=rounds) / LOTTERY_FILE
    legacy = cfg.run_dir() / "tickets" / f"epoch{epoch}" / LOTTERY_FILE
    return path if path.exists() or not legacy.exists() else legacy


def _run_lottery(spec: TableSpec, b: dict[str, Any], runs_dir: str,
                 overrides: dict[str, Any] | None) -> None:
    from ..experiments.lottery import lottery
    from ..training.runs import open_run

    opts = b.get("lottery") or {}
    for cfg in expand_runs(spec, _budget_name(spec, b), runs_dir, overrides):
        run = open_run(cfg.run_dir())
        epoch, base = _lottery_base(cfg, opts)
        lottery(run.dir, run.mask(epoch), epoch, base, seed=0,
                imp_rounds=int(opts.get("imp_rounds", 2)))


def _budget_name(spec: TableSpec, b: dict[str, Any]) -> str:
    return next(k for k, v in spec.budgets.items() if v is b)


def _run_cost(spec: TableSpec, b: dict[str, Any], runs_dir: str,
              overrides: dict[str, Any] | None) -> None:
    from ..experiments.bench import bench_models

    opts = b.get("bench") or {}
    models = opts.get("models", ["lenet3"])
    result = bench_models(models, batch_size=int(opts.get("batch_size", 128)),
                          steps=int(opts.get("steps", 20)), device=opts.get("device", "auto"),
                          image=tuple(opts.get("image", (1, 28))))
    out = Path(runs_dir) / "cost"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{_budget_name(spec, b)}.json").write_text(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------- reports
def _diverged(cfg: TrainConfig) -> bool:
    p = cfg.run_dir() / "summary.json"
    return p.exists() and "diverged" in json.loads(p.read_text())


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
    """Write ``<out>/<table>_<budget>.md`` and ``.csv`` from run folders (never retrains)."""
    b = spec.budget(budget)
    cfgs = expand_runs(spec, budget, runs_dir, overrides)
    keys = list((b.get("grid") or {}).keys())
    header, rows, extra = _build_rows(spec, b, cfgs, keys, runs_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{spec.table.lower()}_{budget}"
    md_path, csv_path = out / f"{stem}.md", out / f"{stem}.csv"
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header] + rows)
    csv_path.write_text(buf.getvalue())
    walls = [json.loads((c.run_dir() / "summary.json").read_text()).get("wall_time_s")
             for c in cfgs if (c.run_dir() / "summary.json").exists()]
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
        f"Regenerate: `dessilbi reproduce {spec.table} --budget {budget}` then "
        f"`dessilbi report {spec.table} --budget {budget}`.",
        "",
        _table_md(header, rows),
        "",
    ]
    lines += extra
    fig = _figure(spec, b, cfgs, keys, header, rows, out / f"{stem}.png")
    if fig is not None:
        lines += ["", f"![{spec.table}]({fig.name})"]
    if spec.published:
        lines += ["", "Published (paper):", "", "```", json.dumps(spec.published, indent=1), "```"]
    md_path.write_text("\n".join(lines) + "\n")
    return [md_path, csv_path] + ([fig] if fig is not None else [])


def _figure(spec: TableSpec, b: dict[str, Any], cfgs: list[TrainConfig], keys: list[str],
            header: list[str], rows: list[list[str]], path: Path) -> Path | None:
    """The table's picture, where one says more: density / Sparse accuracy over epochs for
    sweeps, accuracy per method for lottery tickets."""
    from .plots import _plt

    if spec.kind not in ("sweep_epochs", "lottery") or not rows:
        return None
    plt = _plt()
    if spec.kind == "sweep_epochs":
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for c in cfgs:
            m = read_metrics(c.run_dir())
            if not m:
                continue
            lab = ", ".join(f"{k}={v}" for k, v in _grid_label(c, keys, spec,
                                                                 _budget_name(spec, b)).items())
            ep = [x["epoch"] for x in m]
            a1.plot(ep, [100 * x["density"] for x in m], label=lab)
            a2.plot(ep, [x["sparse_acc"] for x in m], label=lab)
        a1.set(xlabel="epoch", ylabel="density of supp(Γ) (%)", title="sparsity along the path")
        a2.set(xlabel="epoch", ylabel="Sparse test accuracy (%)", title="Sparse model (no FT)")
        a2.legend(fontsize=7)
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [f"{r[2]}\n{r[3]}" for r in rows]
        vals = [float(r[4]) if r[4] != "—" else 0.0 for r in rows]
        ax.bar(range(len(rows)), vals, color="tab:blue")
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_ylabel("best test accuracy (%)")
        lo = min(v for v in vals if v > 0) if any(vals) else 0
        ax.set_ylim(max(0.0, lo - 5), max(vals) + 1 if vals else 1)
        ax.set_title("Retrained from initialisation at the same density")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
                          n_layers: int) -> None:
    """Put the paper's per-layer numbers beside ours, layer by layer in order."""
    pub = list((spec.published.get("layers") or {}).items())
    if not pub or len(pub) != n_layers:
        return
    if "published" not in header[-1]:
        header += ["paper layer", "paper weights", "published sparsity"]
    for row, (name, r) in zip(rows[-n_layers:], pub):
        row += [name, f"{r['weights']:,}", f"{r['sparsity']:.3f}"]


def _build_rows(spec: TableSpec, b: dict[str, Any], cfgs: list[TrainConfig], keys: list[str],
                runs_dir: str) -> tuple[list[str], list[list[str]], list[str]]:
    extra: list[str] = []
    if spec.kind in _PER_RUN:
        cols, make = _PER_RUN[spec.kind]
        header, rows = keys + cols, []
        for c in cfgs:
            m = read_metrics(c.run_dir())
            lab = [str(v) for v in _grid_label(c, keys, spec, _budget_name(spec, b)).values()]
            if _diverged(c):
                rows.append(lab + ["diverged (NaN/Inf loss)"] + ["—"] * (len(cols) - 1))
                continue
            if not m:
                rows.append(lab + ["(missing)"] * len(cols))
                continue
            rows += [lab + r for r in make(m)]
            if spec.kind == "layer_density":
                _add_published_layers(spec, header, rows, len(m[-1]["layers"]))
                extra.append(f"Final: Full {m[-1]['full_acc']:.2f}%, Sparse "
                             f"{m[-1]['sparse_acc']:.2f}%, overall density "
                             f"{100 * m[-1]['density']:.2f}% ({c.model}, {c.epochs} epochs).")
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
            row = [str(v) for v in _grid_label(c, keys, spec, _budget_name(spec, b)).values()]
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
            for f in [p for p in [_lottery_file(c, b.get("lottery") or {})] if p.exists()]:
                data = json.loads(f.read_text())
                for r in data["records"]:
                    m = read_metrics(Path(r["run"]))
                    rows.append([c.model, str(data["epoch"]), r["method"],
                                 _fmt(r["density"], True),
                                 _fmt(max(x["full_acc"] for x in m)) if m else "—",
                                 _fmt(m[-1]["full_acc"]) if m else "—"])
        return header, rows, extra
    # cost
    path = Path(runs_dir) / "cost" / f"{_budget_name(spec, b)}.json"
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
             "Generated by `dessilbi reproduce TABLE --budget cpu|full` and `dessilbi report`; "
             "each file states its data, epochs, hardware, versions and wall time.", ""]
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
