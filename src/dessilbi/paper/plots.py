"""Figures of a run (matplotlib, headless): the solution path, accuracy and density over epochs,
and per-layer density. ``plot_run(run_dir)`` writes each as PNG and SVG and returns the paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["plot_run", "solution_path_figure", "training_figure", "layer_density_figure"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _row_entry(entry: torch.Tensor, n_rows: int) -> torch.Tensor:
    """First entry epoch per row (filter / neuron) from per-unit entry epochs (−1: never)."""
    e = entry.reshape(n_rows, -1).clone()
    e[e < 0] = torch.iinfo(torch.int32).max
    first = e.min(dim=1).values
    first[first == torch.iinfo(torch.int32).max] = -1
    return first


def solution_path_figure(path: dict[str, Any], entry: dict[str, torch.Tensor],
                         max_lines: int = 200) -> Any:
    """‖Γ_g‖ (top) and ‖W_g‖ (bottom) per filter / neuron over epochs, one column per layer,
    coloured by the epoch the unit entered supp(Γ) (grey: never): the inverse scale space."""
    plt = _plt()
    layers = list(path["gamma"])
    epochs = path["epochs"]
    fig, axes = plt.subplots(2, len(layers), figsize=(3.2 * len(layers), 5.5), squeeze=False)
    cmap = plt.get_cmap("viridis")
    last = max(epochs) if epochs else 1
    for j, name in enumerate(layers):
        g = torch.stack(path["gamma"][name], dim=1)  # (units, epochs)
        w = torch.stack(path["weight"][name], dim=1)
        first = _row_entry(entry[name], g.shape[0]) if name in entry else torch.full(
            (g.shape[0],), -1)
        idx = torch.arange(g.shape[0])
        if len(idx) > max_lines:  # keep every entered unit first, then a sample of the rest
            order = torch.argsort((first < 0).int() * 10**9 + first.clamp_min(0), stable=True)
            idx = order[:max_lines]
        for i in idx.tolist():
            color = (0.75, 0.75, 0.75, 0.6) if first[i] < 0 else cmap(float(first[i]) / last)
            axes[0, j].plot(epochs, g[i].numpy(), color=color, lw=0.8)
            axes[1, j].plot(epochs, w[i].numpy(), color=color, lw=0.8)
        axes[0, j].set_title(name, fontsize=8)
        axes[1, j].set_xlabel("epoch")
    axes[0, 0].set_ylabel("‖Γ_g‖")
    axes[1, 0].set_ylabel("‖W_g‖")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(1, last))
    fig.colorbar(sm, ax=axes.ravel().tolist(), label="entry epoch (grey: never)")
    fig.suptitle("Solution path of DessiLBI: units enter the support of Γ one by one")
    return fig


def training_figure(metrics: list[dict[str, Any]]) -> Any:
    """Full / Sparse test accuracy (left axis) and density (right axis) over epochs."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ep = [m["epoch"] for m in metrics]
    ax.plot(ep, [m["full_acc"] for m in metrics], label="Full (W)", marker="o", ms=3)
    if metrics and "sparse_acc" in metrics[0]:
        ax.plot(ep, [m["sparse_acc"] for m in metrics], label="Sparse (W ⊙ 1[Γ≠0])",
                marker="s", ms=3)
        ax2 = ax.twinx()
        ax2.plot(ep, [100 * m["density"] for m in metrics], color="tab:red", ls="--",
                 label="density")
        ax2.set_ylabel("density of supp(Γ) (%)", color="tab:red")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def layer_density_figure(layers: dict[str, dict[str, Any]]) -> Any:
    """Per-layer density of the final Γ support, with the number of weights of each layer."""
    plt = _plt()
    names = [n for n in layers if n != "(all)"]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names) + 2), 4))
    vals = [100 * layers[n]["density"] for n in names]
    bars = ax.bar(range(len(names)), vals)
    for b, n in zip(bars, names):
        ax.annotate(f"{layers[n]['weights']:,}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("density (%)")
    ax.set_title("Per-layer density of supp(Γ) (numbers: weights per layer)")
    fig.tight_layout()
    return fig


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None,
             tensorboard: bool = True) -> list[Path]:
    """Write every figure of a run as PNG and SVG; also log them to the run's TensorBoard."""
    from ..files import load_checkpoint
    from ..training.runs import open_run

    run = open_run(run_dir)
    out = Path(out_dir) if out_dir else run.dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}
    if run.metrics:
        figures["accuracy_density"] = training_figure(run.metrics)
        if run.metrics[-1].get("layers"):
            figures["layer_density"] = layer_density_figure(run.metrics[-1]["layers"])
    if run.files.solution_path.exists() and run.files.masks.exists():
        path = load_checkpoint(run.files.solution_path)
        if path["epochs"]:
            figures["solution_path"] = solution_path_figure(path, run.support_file()["entry"])
    written = []
    for name, fig in figures.items():
        for ext in ("png", "svg"):
            p = out / f"{name}.{ext}"
            fig.savefig(p, dpi=130)
            written.append(p)
    if tensorboard and figures:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(run.files.tensorboard)) as w:
            last = run.metrics[-1]["epoch"] if run.metrics else 0
            for name, fig in figures.items():
                w.add_figure(name, fig, global_step=last)
    _plt().close("all")
    return written
