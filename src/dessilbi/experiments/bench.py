"""Cost of DessiLBI vs SGD (the paper's Table 6): time per iteration and memory, as ratios.

Time: forward + backward + ``step()`` of each optimizer on its own copy of the model, same
batch, interleaved repetitions in one process, median. Memory, two measures:

* ``accounted``: bytes of weights + gradients + optimizer state + the activations autograd
  saves for the backward pass (counted with ``saved_tensors_hooks``) — exact and repeatable;
* ``cuda``: ``torch.cuda.max_memory_allocated`` over an iteration (activations included), when
  the device is CUDA; ``rss``: the peak resident set of a fresh process that runs the iterations
  (CPU; includes the Python / PyTorch baseline, so ratios are diluted).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

from ..core.optimizers import OptimizerConfig, create_optimizer
from ..zoo.models import create_model

__all__ = ["bench_models", "accounted_bytes"]

PAIR = (("sgd", OptimizerConfig(name="sgd-momentum", lr=0.01)),
        ("lbi", OptimizerConfig(name="dessilbi", lr=0.01, nu=100.0)))


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def accounted_bytes(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                    y: torch.Tensor) -> int:
    """Weights + gradients + optimizer state + saved activations of one iteration, in bytes."""
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    params = list(model.parameters())
    state = [v for s in opt.state.values() for v in s.values()]
    return (_tensor_bytes(params) + _tensor_bytes(p.grad for p in params) + _tensor_bytes(state)
            + sum(saved))


def _setup(name: str, image: tuple[int, int], batch: int, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    c, s = image
    x = torch.randn(batch, c, s, s, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    out = {"x": x, "y": y}
    for key, ocfg in PAIR:
        model = create_model(name, 10, c, s).to(device)
        out[key] = (model, create_optimizer(ocfg, model))
    return out


def _iteration(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _rss_child(name: str, image: tuple[int, int], batch: int, key: str, steps: int) -> float:
    code = (
        "import resource, torch, sys\n"
        "from dessilbi.experiments.bench import _setup, _iteration\n"
        f"s = _setup({name!r}, {tuple(image)!r}, {batch}, torch.device('cpu'))\n"
        f"m, o = s[{key!r}]\n"
        f"for _ in range({steps}): _iteration(m, o, s['x'], s['y'])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def bench_models(models: list[str], batch_size: int = 128, steps: int = 20, device: str = "auto",
                 image: tuple[int, int] = (1, 28), rss: bool = True) -> list[dict[str, Any]]:
    """One result row per model: step times, memory and their DessiLBI / SGD ratios."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    rows = []
    for name in models:
        s = _setup(name, image, batch_size, dev)
        times: dict[str, list[float]] = {"sgd": [], "lbi": []}
        for _ in range(3):
            for key, _ in PAIR:
                _iteration(*s[key], s["x"], s["y"])
        for _ in range(steps):
            for key, _ in PAIR:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                _iteration(*s[key], s["x"], s["y"])
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[key].append(time.perf_counter() - t0)
        mem: dict[str, float] = {}
        kind = "accounted"
        for key, _ in PAIR:
            mem[key] = accounted_bytes(*s[key], s["x"], s["y"]) / 2**20
        if dev.type == "cuda":
            kind = "cuda max allocated"
            for key, _ in PAIR:
                torch.cuda.reset_peak_memory_stats()
                _iteration(*s[key], s["x"], s["y"])
                torch.cuda.synchronize()
                mem[key] = torch.cuda.max_memory_allocated() / 2**20
        sgd_ms = 1e3 * statistics.median(times["sgd"])
        lbi_ms = 1e3 * statistics.median(times["lbi"])
        row = {"model": name, "batch_size": batch_size, "device": str(dev), "sgd_ms": sgd_ms,
               "lbi_ms": lbi_ms, "time_ratio": lbi_ms / sgd_ms, "sgd_mb": mem["sgd"],
               "lbi_mb": mem["lbi"], "memory_ratio": mem["lbi"] / mem["sgd"],
               "memory_kind": kind}
        if rss and dev.type == "cpu":
            r_sgd = _rss_child(name, image, batch_size, "sgd", 3)
            r_lbi = _rss_child(name, image, batch_size, "lbi", 3)
            row.update(rss_sgd_mb=r_sgd, rss_lbi_mb=r_lbi, rss_ratio=r_lbi / r_sgd)
        rows.append(row)
    return rows


def main_json(models: list[str], **kw: Any) -> str:
    return json.dumps(bench_models(models, **kw), indent=2)
