"""Figures of the paper's tables, drawn from the runs a report reads (matplotlib, headless).

One function per table kind where a picture says more than the table: sparsity and Sparse
accuracy along the epochs (``sweep_epochs``), best Full / Sparse accuracy against the swept
value (``sweep_best``), per-layer density along the path beside the published values
(``layer_density``), accuracy per method (``lottery``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .plots import _plt

__all__ = ["sweep_epochs_figure", "sweep_best_figure", "layer_path_figure", "lottery_figure"]

Metrics = list[dict[str, Any]]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def sweep_epochs_figure(runs: Sequence[tuple[str, Metrics]], path: Path) -> Path:
    """Density of supp(Γ) and Sparse accuracy over epochs, one curve per run (label, metrics)."""
    fig, (a1, a2) = _plt().subplots(1, 2, figsize=(10, 4))
    for label, m in runs:
        ep = [x["epoch"] for x in m]
        a1.plot(ep, [100 * x["density"] for x in m], label=label)
        a2.plot(ep, [x["sparse_acc"] for x in m], label=label)
    a1.set(xlabel="epoch", ylabel="density of supp(Γ) (%)", title="sparsity along the path")
    a2.set(xlabel="epoch", ylabel="Sparse test accuracy (%)", title="Sparse model (no FT)")
    a2.legend(fontsize=7)
    return _save(fig, path)


def sweep_best_figure(key: str, runs: Sequence[tuple[float, Metrics]], path: Path) -> Path:
    """Best Full and Sparse accuracy and final density against the swept value ``key``."""
    runs = sorted(runs)
    xs = [x for x, _ in runs]
    fig, (a1, a2) = _plt().subplots(1, 2, figsize=(10, 4))
    a1.plot(xs, [max(e["full_acc"] for e in m) for _, m in runs], "o-", label="Full (W)")
    a1.plot(xs, [max(e.get("sparse_acc", 0.0) for e in m) for _, m in runs], "s--",
            label="Sparse (W ⊙ 1[Γ≠0])")
    a1.set(xlabel=key, ylabel="best test accuracy (%)", title=f"accuracy per {key}")
    a1.legend(fontsize=8)
    a2.plot(xs, [100 * m[-1]["density"] for _, m in runs], "o-", color="tab:green")
    a2.set(xlabel=key, ylabel="final density of supp(Γ) (%)", title=f"sparsity per {key}")
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
        a1.set_xscale("log")
        a2.set_xscale("log")
    return _save(fig, path)


def layer_path_figure(m: Metrics, published: dict[str, float], path: Path) -> Path:
    """Density of each layer's Γ support over epochs; the published values as dashed lines
    (``published`` maps our layer name to the paper's density)."""
    fig, ax = _plt().subplots(figsize=(6.5, 4))
    ep = [x["epoch"] for x in m]
    for i, name in enumerate(m[-1]["layers"]):
        color = f"C{i}"
        ax.plot(ep, [x["layers"][name]["density"] for x in m], color=color, label=name)
        if name in published:
            ax.axhline(published[name], color=color, ls="--", lw=1,
                       label=f"{name}: published {published[name]:.3f}")
    ax.set(xlabel="epoch", ylabel="density of supp(Γ)", title="per-layer density along the path")
    if any(x["layers"][n]["density"] > 0 for x in m for n in x["layers"]):
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    return _save(fig, path)


def lottery_figure(rows: Sequence[Sequence[str]], path: Path) -> Path:
    """Best accuracy per (method, density) row of a lottery table."""
    fig, ax = _plt().subplots(figsize=(6, 4))
    labels = [f"{r[2]}\n{r[3]}" for r in rows]
    vals = [float(r[4]) if r[4] != "—" else 0.0 for r in rows]
    ax.bar(range(len(rows)), vals, color="tab:blue")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("best test accuracy (%)")
    lo = min(v for v in vals if v > 0) if any(vals) else 0
    ax.set_ylim(max(0.0, lo - 5), max(vals) + 1 if vals else 1)
    ax.set_title("Retrained from initialisation at the same density")
    return _save(fig, path)
