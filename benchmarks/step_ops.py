"""Operations one ``step()`` dispatches, and the tensors in their arguments, DessiLBI vs SGD.

On a GPU the step of a small-tensor model is bound by the host: every dispatched operation is
a kernel launch, and a multi-tensor operation costs host time per tensor in its lists. This
counts both (``TorchDispatchMode``) on the parameter shapes of CIFAR ResNet-56 and VGG16-BN,
with no GPU needed: ``--layout cuda`` lays the flat buckets out as on CUDA (buckets updated
together, tensors up to ``flat.MAX_NUMEL_CUDA`` entries) while the tensors stay on the CPU;
``--copies`` keeps the parameters out of the buckets (copied in and out each step), as CUDA
buckets did before they adopted them (docs/cuda.md). Under the counting mode a step compiles
nothing (DessiLBI runs its compiled kernel eager there), so on the CPU layout a model with
tensors too large for a bucket (VGG16-BN) shows the eager per-tensor path's count.

    python benchmarks/step_ops.py [--models resnet56 vgg16_bn] [--layout cuda] [--copies]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dessilbi import DessiLBI, lbi_param_groups
from dessilbi.core import flat, flat_plan
from dessilbi.zoo.models import create_model


class Count(TorchDispatchMode):
    """Aten operations dispatched and the tensors in their arguments (lists counted whole)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.tensors = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        for a in args:
            if isinstance(a, torch.Tensor):
                self.tensors += 1
            elif isinstance(a, (list, tuple)):
                self.tensors += sum(isinstance(t, torch.Tensor) for t in a)
        return func(*args, **(kwargs or {}))


def counted(opt: torch.optim.Optimizer) -> tuple[int, int]:
    for _ in range(2):  # the buckets are built and the state published by then
        opt.step()
    with Count() as c:
        opt.step()
    return c.ops, c.tensors


def row(name: str) -> str:
    torch.manual_seed(0)
    model = create_model(name, 10, 3, 32)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    ops, tensors = counted(DessiLBI(lbi_param_groups(model), lr=1e-4, nu=100.0))
    sgd_ops, sgd_tensors = counted(torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9,
                                                   foreach=True))
    n = sum(1 for _ in model.parameters())
    return f"| {name} | {n} | {ops} | {tensors:,} | {sgd_ops} | {sgd_tensors:,} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet56", "vgg16_bn"])
    ap.add_argument("--layout", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--copies", action="store_true",
                    help="do not let the buckets adopt the parameters")
    args = ap.parse_args()
    if args.layout == "cuda":
        flat.batched_on = flat_plan.batched_on = lambda device: True  # type: ignore[assignment]
        flat.MAX_NUMEL = flat.MAX_NUMEL_CUDA
    if args.copies:
        flat.adoptable = lambda p: False  # type: ignore[assignment]
    print(f"layout {args.layout}, parameters {'copied' if args.copies else 'adopted'}\n")
    print("| model | tensors | DessiLBI operations | tensors in their arguments "
          "| SGD-foreach operations | tensors in their arguments |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        print(row(name))


if __name__ == "__main__":
    main()
