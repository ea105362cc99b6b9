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
folder); :mod:`.report` reads only run folders and writes ``<out>/<table>_<budget>.md``.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import write_text_atomic
from ..training.config import ConfigError, TrainConfig, load_config_file
from ..training.rundir import RunDir

log = logging.getLogger(__name__)

__all__ = ["TableSpec", "load_table", "find_tables", "expand_runs", "run_table", "lottery_file",
           "budget_name", "KINDS", "BUDGETS"]

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
    cfg.replace(init_from="", mask="").validate()


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
        files = RunDir(cfg.run_dir())
        done = files.read_summary()
        if done is not None:
            summaries.append(done)
            continue
        t0 = time.perf_counter()
        try:
            s = train(cfg, resume=True)
        except NonFiniteLossError as e:  # a result too: this setting diverges
            log.warning("%s diverged: %s", cfg.run_dir(), e)
            s = {"run": str(cfg.run_dir()), "config": cfg.to_dict(), "final": {},
                 "diverged": str(e)}
        s["wall_time_s"] = time.perf_counter() - t0
        from ..files import write_text_atomic

        write_text_atomic(files.summary, json.dumps(s, indent=2))
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


def lottery_file(cfg: TrainConfig, opts: dict[str, Any]) -> Path:
    """Where the lottery of ``cfg`` lives (a branch; folders of earlier versions are read too)."""
    from ..experiments.lottery import LOTTERY_FILE, branch_dir

    epoch, base = _lottery_base(cfg, opts)
    rounds = int(opts.get("imp_rounds", 2))
    path = branch_dir(cfg.run_dir(), "tickets", base, epoch=epoch, mask_seed=0,
                      imp=rounds) / LOTTERY_FILE
    if path.exists():
        return path
    # the same branch named by an earlier release (its hash covered the source's path):
    # the readable part of the name carries every option of the branch
    prefix = path.parent.name.rsplit("_", 1)[0]
    same = sorted(path.parent.parent.glob(f"{prefix}_*/{LOTTERY_FILE}"))
    legacy = cfg.run_dir() / "tickets" / f"epoch{epoch}" / LOTTERY_FILE
    return same[0] if len(same) == 1 else legacy if legacy.exists() else path


def _run_lottery(spec: TableSpec, b: dict[str, Any], runs_dir: str,
                 overrides: dict[str, Any] | None) -> None:
    from ..experiments.lottery import lottery
    from ..training.runs import open_run

    opts = b.get("lottery") or {}
    for cfg in expand_runs(spec, budget_name(spec, b), runs_dir, overrides):
        run = open_run(cfg.run_dir())
        epoch, base = _lottery_base(cfg, opts)
        lottery(run.dir, run.mask(epoch), epoch, base, seed=0,
                imp_rounds=int(opts.get("imp_rounds", 2)))


def budget_name(spec: TableSpec, b: dict[str, Any]) -> str:
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
    write_text_atomic(out / f"{budget_name(spec, b)}.json", json.dumps(result, indent=2))
