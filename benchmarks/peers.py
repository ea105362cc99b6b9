"""Head-to-head: DessiLBI aimed at a unit density vs OTO HESSO and Torch-Pruning.

Every method starts from the same initial weights, sees the same batches in the same order and
follows the same lr schedule (SGD-momentum 0.9, lr ×0.1 at 50 % and 80 % of the epochs); the
score is the test accuracy of the physically pruned network with no fine-tuning after the run,
at the fraction of filters / neurons kept (the classifier is never pruned), with its MACs and
parameters relative to the dense network and the time per epoch relative to SGD-momentum.

Methods: ``dense`` (SGD-momentum), ``dessilbi`` (SparsityTarget, select then train),
``dessilbi-path`` (the pure path, no freezing), ``oto`` (HESSO, ``target_group_sparsity``),
``dessilbi-macs`` (SparsityTarget aimed at the MACs OTO kept at the same target: compute-matched;
OTO runs first in the same call, or its earlier rows are read with ``--oto-rows FILE ...``),
``tp-reg`` (Torch-Pruning GroupNorm-regularised sparse training, pruned at the end),
``tp-mag`` / ``tp-mag-ft`` (magnitude pruning of the dense network, no fine-tune / +2 epochs).

    pip install -e ".[peers]"
    python benchmarks/peers.py --model lenet5 --dataset fashion-mnist --seeds 0 1 \\
        --targets 0.3 0.5 0.7 --out docs/peers/lenet5_fashion-mnist.jsonl

only-train-once 3.0.1 imports ``torch.onnx._globals`` (moved in recent torch) and calls
``.cuda()``; both are shimmed here, around its code, on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peers_report import load
from torch import Tensor, nn

from dessilbi import DessiLBI, lbi_param_groups
from dessilbi.core.target import ALLOCATIONS, SCHEDULES, SCORES, TARGET_PULLS, SparsityTarget
from dessilbi.core.units import classifier_of, coupled_parameters, stem_of
from dessilbi.sparsity.masks import Mask
from dessilbi.structure.cost import MacsModel
from dessilbi.structure.prune import count_cost, prune_model
from dessilbi.training.batches import epoch_indices
from dessilbi.zoo.data import load_dataset
from dessilbi.zoo.models import create_model

log = logging.getLogger("peers")
METHODS = ("dense", "dessilbi", "dessilbi-path", "oto", "dessilbi-macs", "tp-reg", "tp-mag",
           "tp-mag-ft")
# the methods that train the dense network: without one, no time ratio is measured
NEEDS_DENSE = {"dense", "tp-mag", "tp-mag-ft"}


@dataclass(frozen=True)
class Setup:
    model: str
    dataset: str
    data_dir: str
    seed: int
    epochs: int
    lr: float
    batch_size: int
    max_batches: int  # 0 = whole epochs
    allocation: str = "global"  # SparsityTarget's ranking of units across layers
    path_speed: float = 1.0  # SparsityTarget's coupling: time constants by the selection step
    whole_first: bool = False  # SparsityTarget keeps the first layer's units whole
    pull: str = "outside"  # SparsityTarget's pull: only outside supp(Γ); "conv-outside": there
    # on the convolutions, "all" on the linear layers (the former default); "all": the paper's
    select_at: float = 0.3  # SparsityTarget's selection step, as a fraction of the run
    support: str = "shrink"  # SparsityTarget's schedule of the support: shrink (1 → D) or grow
    fade: bool = False  # SparsityTarget fades the units outside supp(Γ) to zero by selection
    start_at: float = 0.0  # SparsityTarget's support schedule starts here (fraction of the run)
    settle: float = 0.0  # SparsityTarget ramps the dropped units down this long after selection
    device: str = "cpu"  # where every method trains (the initial weights are made on the CPU)
    reserve: int = 8  # SparsityTarget: each layer's best units counted first (narrow layers)
    score: str = "initial"  # SparsityTarget: a layer's ‖V_g‖ over its initial / current mean
    width_prior: float = 0.25  # SparsityTarget: scores × (mean layer width / layer width)^this


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data(setup: Setup) -> Data:
    train, test, _ = load_dataset(setup.dataset, setup.data_dir)

    def tensors(ds: Any) -> tuple[Tensor, Tensor]:
        x = ds.images.float().div_(255.0)
        return (x - ds.mean) / ds.std, ds.labels

    return Data(*(t.to(setup.device) for t in (*tensors(train), *tensors(test))))


def batches(setup: Setup, data: Data, epoch: int) -> list[tuple[Tensor, Tensor]]:
    idx = epoch_indices(len(data.y_train), setup.seed, epoch)
    out = [(data.x_train[i], data.y_train[i]) for i in idx.split(setup.batch_size)]
    return out[: setup.max_batches] if setup.max_batches else out


def steps_per_epoch(setup: Setup, data: Data) -> int:
    n = math.ceil(len(data.y_train) / setup.batch_size)
    return min(n, setup.max_batches) if setup.max_batches else n


@torch.no_grad()
def accuracy(model: nn.Module, data: Data) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum())
                  for x, y in zip(data.x_test.split(1000), data.y_test.split(1000)))
    return 100.0 * correct / len(data.y_test)


def layer_units(model: nn.Module, classifier_name: str) -> list[int]:
    """Output filters / neurons of each conv / linear layer but the classifier, in order."""
    return [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear) and n != classifier_name]


def name_of(model: nn.Module, module: nn.Module) -> str:
    """The qualified name of ``module`` in ``model`` ("" if it is not a submodule)."""
    return {id(m): n for n, m in model.named_modules()}.get(id(module), "")


def units(model: nn.Module, classifier_name: str) -> int:
    """Output filters / neurons of every conv / linear layer but the classifier."""
    return sum(layer_units(model, classifier_name))


def train(setup: Setup, data: Data, model: nn.Module, opt: torch.optim.Optimizer,
          after_backward: Callable[[], None] = lambda: None,
          after_step: Callable[[], None] = lambda: None, epochs: int | None = None,
          first_epoch: int = 0, after_epoch: Callable[[int], None] = lambda epoch: None,
          ) -> float:
    """Train with the shared schedule; returns the median epoch time (``after_epoch`` runs
    outside the timed part)."""
    epochs = setup.epochs if epochs is None else epochs
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, [max(1, round(0.5 * epochs)), max(1, round(0.8 * epochs))], 0.1)
    times = []
    for epoch in range(first_epoch, first_epoch + epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in batches(setup, data, epoch):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            after_backward()
            opt.step()
            after_step()
        times.append(time.perf_counter() - t0)
        sched.step()
        after_epoch(epoch)
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------- methods
def fresh(setup: Setup, init: dict[str, Tensor]) -> nn.Module:
    model = create_model(setup.model, 10, 1, 28)
    model.load_state_dict(init)
    return model.to(setup.device)


def sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def run_dense(setup: Setup, data: Data, init: dict[str, Tensor],
              **_: Any) -> tuple[nn.Module, float]:
    model = fresh(setup, init)
    return model, train(setup, data, model, sgd(model, setup.lr))


def run_dessilbi(setup: Setup, data: Data, init: dict[str, Tensor], target: float,
                 freeze: bool = True, macs: float | None = None, trace: Path | None = None,
                 method: str = "dessilbi", **_: Any) -> tuple[nn.Module, float]:
    """Aimed at ``target`` units, or at ``macs`` (a fraction of the dense MACs) when given;
    with ``trace``, a line per epoch there (:func:`trace_epoch`)."""
    model = fresh(setup, init)
    example = data.x_test[:2]
    head = classifier_of(model, example)
    opt = DessiLBI(lbi_param_groups(model, linear_penalty="group", exclude=[head]),
                   lr=setup.lr, momentum=0.9)
    cost = None if macs is None else MacsModel.from_model(model, example,
                                                          opt.penalised_params())
    ctl = SparsityTarget(opt, None if macs is not None else target,
                         setup.epochs * steps_per_epoch(setup, data), macs=macs, cost=cost,
                         freeze=freeze, allocation=setup.allocation,
                         path_speed=setup.path_speed, pull=setup.pull,
                         select_at=setup.select_at, schedule=setup.support,
                         coupled=coupled_parameters(model, example),
                         whole=[stem_of(model, example).weight] if setup.whole_first else (),
                         fade=setup.fade, start_at=setup.start_at, settle=setup.settle,
                         reserve=setup.reserve, score=setup.score,
                         width_prior=setup.width_prior)
    head_name = name_of(model, head)

    def after_epoch(epoch: int) -> None:
        if trace is not None:
            write(trace, {**asdict(setup), "method": method, "target": target,
                          **trace_epoch(model, opt, data, epoch, ctl.frozen, head_name)})

    seconds = train(setup, data, model, opt, after_step=ctl.step, after_epoch=after_epoch)
    pruned = prune_model(model, Mask.from_optimizer(model, opt), example).model
    return pruned, seconds


def trace_epoch(model: nn.Module, opt: DessiLBI, data: Data, epoch: int, frozen: bool,
                head_name: str) -> dict[str, Any]:
    """Where a run stands after ``epoch``: the accuracy of the whole network (``full``) and of
    the network pruned to supp(Γ) (``pruned``), and the units each layer but ``head_name``
    keeps."""
    mask = Mask.from_optimizer(model, opt)
    pruned = prune_model(copy.deepcopy(model), mask, data.x_test[:2]).model
    return {"epoch": epoch, "full": accuracy(model, data), "pruned": accuracy(pruned, data),
            "layer_units": layer_units(pruned, head_name), "frozen": frozen}


def run_oto(setup: Setup, data: Data, init: dict[str, Tensor], target: float,
            **_: Any) -> tuple[nn.Module, float]:
    with oto_shims():
        from only_train_once import OTO

        model = fresh(setup, init)
        oto = OTO(model=model, dummy_input=data.x_test[:1])
        total = setup.epochs * steps_per_epoch(setup, data)
        opt = oto.hesso(variant="sgd", lr=setup.lr, first_momentum=0.9,
                        target_group_sparsity=1.0 - target, start_pruning_step=total // 10,
                        pruning_periods=10, pruning_steps=total * 4 // 10)
        seconds = train(setup, data, model, opt)
        with tempfile.TemporaryDirectory() as tmp:
            oto.construct_subnet(out_dir=tmp)
            # the subnet OTO wrote a moment ago, in this process: a whole pickled module
            pruned = torch.load(oto.compressed_model_path, weights_only=False)
    return pruned, seconds


def _tp_pruner(kind: str, model: nn.Module, example: Tensor, target: float) -> Any:
    import torch_pruning as tp

    head = classifier_of(model, example)
    # per-layer ratios (Torch-Pruning's default): global magnitude ranking across layers of
    # different scales emptied LeNet-5's first convolution (38 % / 30 % at 30 % of units kept)
    common = dict(pruning_ratio=1.0 - target, ignored_layers=[head])
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "reg":
        return tp.pruner.GroupNormPruner(model, example, importance, reg=1e-4, **common)
    return tp.pruner.MagnitudePruner(model, example, importance, **common)


def run_tp_reg(setup: Setup, data: Data, init: dict[str, Tensor], target: float,
               cache: dict[str, Any] | None = None, **_: Any) -> tuple[nn.Module, float]:
    """GroupNorm-regularised training, then one pruning step at ``target``. The regulariser
    pulls on every group whatever the ratio (Torch-Pruning builds its groups without it), so
    the trained network is the same at every target: with ``cache`` (one per seed) it is
    trained once and a copy is pruned per target."""
    cache = {} if cache is None else cache
    if "tp-reg" not in cache:
        model = fresh(setup, init)
        pruner = _tp_pruner("reg", model, data.x_test[:2], target)
        seconds = train(setup, data, model, sgd(model, setup.lr),
                        after_backward=lambda: pruner.regularize(model))
        cache["tp-reg"] = (model, seconds)  # never pruned itself: each target prunes a copy
    trained, seconds = cache["tp-reg"]
    model = copy.deepcopy(trained)
    _tp_pruner("reg", model, data.x_test[:2], target).step()
    return model, seconds


def run_tp_mag(setup: Setup, data: Data, init: dict[str, Tensor], target: float,
               dense: nn.Module, finetune: int = 0, **_: Any) -> tuple[nn.Module, float]:
    model = copy.deepcopy(dense)
    _tp_pruner("mag", model, data.x_test[:2], target).step()
    seconds = 0.0
    if finetune:
        seconds = train(setup, data, model, sgd(model, setup.lr * 0.01), epochs=finetune,
                        first_epoch=setup.epochs)
    return model, seconds


@contextmanager
def oto_shims() -> Any:
    """only-train-once 3.0.1 on torch ≥ 2.9, Python ≥ 3.12 and without CUDA: moved
    TorchScript-exporter internals put back where it looks for them, a stand-in for the removed
    ``imp`` module, and ``.cuda()`` a no-op."""
    from torch.onnx._internal.torchscript_exporter import _globals, utils

    sys.modules.setdefault("torch.onnx._globals", _globals)
    # it imports ``imp`` (gone in Python 3.12) and uses nothing of it
    sys.modules.setdefault("imp", importlib)
    if not hasattr(torch.onnx, "_optimize_graph"):
        torch.onnx._optimize_graph = utils._optimize_graph  # type: ignore[attr-defined]
    real_cuda = torch.Tensor.cuda
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = real_cuda  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- driver
def measure(setup: Setup, data: Data, method: str, target: float, init: dict[str, Tensor],
            dense: nn.Module, dense_cost: tuple[int, int], dense_units: int,
            dense_seconds: float | None, oto_macs: float | None = None,
            trace: Path | None = None, cache: dict[str, Any] | None = None) -> dict[str, Any]:
    base = method.removesuffix("-path").removesuffix("-ft").removesuffix("-macs")
    runner = {"dense": run_dense, "dessilbi": run_dessilbi, "oto": run_oto,
              "tp-reg": run_tp_reg, "tp-mag": run_tp_mag}[base]
    kwargs: dict[str, Any] = {"target": target, "dense": dense, "trace": trace,
                              "method": method, "cache": cache}
    if method == "dessilbi-path":
        kwargs["freeze"] = False
    if method == "dessilbi-macs":  # compute-matched: the MACs OTO kept at this target
        if oto_macs is None:
            raise SystemExit("dessilbi-macs aims at OTO's MACs: run it with --methods oto")
        kwargs["macs"] = oto_macs
    if method == "tp-mag-ft":
        kwargs["finetune"] = 2
    model, seconds = runner(setup, data, init, **kwargs)
    example = data.x_test[:1]
    macs, params = count_cost(model, example)
    name = name_of(model, classifier_of(model, example))
    return {**asdict(setup), "method": method, "target": target,
            "accuracy": accuracy(model, data),
            "units": units(model, name) / dense_units,
            "macs": macs / dense_cost[0], "params": params / dense_cost[1],
            "layer_units": layer_units(model, name),  # where the kept units are
            "epoch_time_ratio": seconds / dense_seconds if seconds and dense_seconds else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-batches", type=int, default=0)
    ap.add_argument("--allocation", default="global", choices=ALLOCATIONS)
    ap.add_argument("--path-speed", type=float, default=1.0,
                    help="SparsityTarget's path speed (the default 1; the tables before it: 10)")
    ap.add_argument("--whole-first", action=argparse.BooleanOptionalAction, default=False,
                    help="SparsityTarget keeps every unit of the first layer")
    ap.add_argument("--pull", default="outside", choices=TARGET_PULLS,
                    help="SparsityTarget's pull: only the units outside supp(Γ) (the default), "
                         "only the convolution filters outside it (conv-outside, the former "
                         "default), or all (the paper's; the rows without a pull field)")
    ap.add_argument("--select-at", type=float, default=0.3,
                    help="SparsityTarget's selection step, as a fraction of the run (the "
                         "former default: 0.5)")
    ap.add_argument("--support", default="shrink", choices=SCHEDULES,
                    help="SparsityTarget's schedule of the support: shrink (1 → D, cubic, the "
                         "default) or grow (0 → D, the rows without a support field)")
    ap.add_argument("--fade", action=argparse.BooleanOptionalAction, default=False,
                    help="SparsityTarget fades the units outside supp(Γ) linearly to zero by "
                         "the selection step")
    ap.add_argument("--start-at", type=float, default=0.0,
                    help="SparsityTarget's support schedule starts at this fraction of the run")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="SparsityTarget ramps the units outside the chosen support down to "
                         "zero over this fraction of the run after the selection")
    ap.add_argument("--reserve", type=int, default=8,
                    help="SparsityTarget counts each layer's best N units first (a narrow "
                         "layer is not cut into a bottleneck; the default 8, 0: the rows "
                         "without a reserve field)")
    ap.add_argument("--score", default="initial", choices=SCORES,
                    help="SparsityTarget's global score: a layer's ‖V_g‖ over its initial "
                         "mean unit norm (the default) or over its current mean ‖V_g‖")
    ap.add_argument("--width-prior", type=float, default=0.25,
                    help="SparsityTarget multiplies a layer's scores by (mean layer width / "
                         "its width)^P (default 0.25; 0: the rows without a width_prior field)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where every method "
                    "trains, from the same initial weights")
    ap.add_argument("--oto-rows", type=Path, nargs="+", default=[],
                    help="JSON lines with OTO's rows: dessilbi-macs aims at the MACs OTO kept "
                         "in the same cell there instead of running OTO again")
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, appended")
    ap.add_argument("--trace", type=Path, help="JSON lines, appended: after every epoch of a "
                    "dessilbi run, the accuracy of the whole and of the pruned network")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("torch_pruning").setLevel(logging.WARNING)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # the dense network is trained only for a method that needs it (its row, the time ratio,
    # magnitude pruning); the costs are the architecture's either way
    needs_dense = bool(NEEDS_DENSE & set(args.methods))
    oto_rows = load(args.oto_rows)  # read once for every seed and target
    for seed in args.seeds:
        setup = Setup(args.model, args.dataset, args.data_dir, seed, args.epochs, args.lr,
                      args.batch_size, args.max_batches, args.allocation, args.path_speed,
                      args.whole_first, args.pull, args.select_at, args.support, args.fade,
                      args.start_at, args.settle, args.device, args.reserve, args.score,
                      args.width_prior)
        data = load_data(setup)
        torch.manual_seed(seed)
        init = copy.deepcopy(create_model(setup.model, 10, 1, 28).state_dict())  # on the CPU
        dense, dense_seconds = (run_dense(setup, data, init) if needs_dense
                                else (fresh(setup, init), None))
        example = data.x_test[:1]
        cost = count_cost(dense, example)
        dense_units = units(dense, name_of(dense, classifier_of(dense, example)))
        if needs_dense:
            write(args.out, {**asdict(setup), "method": "dense", "target": 1.0,
                             "accuracy": accuracy(dense, data), "units": 1.0, "macs": 1.0,
                             "params": 1.0, "epoch_time_ratio": 1.0})
        cache: dict[str, Any] = {}  # what a method trains once per seed for every target
        for target in args.targets:
            oto_macs = oto_macs_in(oto_rows, setup, target) if args.oto_rows else None
            for method in sorted(args.methods, key=METHODS.index):
                if method != "dense":
                    row = measure(setup, data, method, target, init, dense, cost, dense_units,
                                  dense_seconds, oto_macs, args.trace, cache)
                    write(args.out, row)
                    oto_macs = row["macs"] if method == "oto" else oto_macs


def oto_macs_in(rows: list[dict[str, Any]], setup: Setup, target: float) -> float:
    """The MACs OTO kept in the cell of ``setup`` (model, data, seed, budget) at ``target``,
    in earlier ``rows``; the one value all the matching rows agree on."""
    cell = ("model", "dataset", "seed", "epochs", "lr", "batch_size", "max_batches")
    found = {row["macs"] for row in rows if row.get("method") == "oto"
             and row["target"] == target and all(row.get(k) == getattr(setup, k) for k in cell)}
    if len(found) != 1:
        raise SystemExit(f"--oto-rows: {len(found)} different OTO MACs for seed {setup.seed}, "
                         f"target {target} of {setup.model} / {setup.dataset}; need exactly 1")
    return found.pop()


def write(path: Path, row: dict[str, Any]) -> None:
    """Append one result line at once, so an interrupted benchmark keeps what it measured."""
    log.info("%s", {k: row[k] for k in ("method", "target", "epoch", "accuracy", "full",
                                        "pruned", "units", "macs", "epoch_time_ratio")
                    if k in row})
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
