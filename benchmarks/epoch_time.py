"""Epoch-time ratio of DessiLBI vs SGD-momentum on the same model, data and batches.

Both optimizers train their own copy of the model in one process, alternating epoch by epoch, so
machine noise hits both alike; prints the median epoch time of each and the ratio.

    python benchmarks/epoch_time.py [--model lenet3] [--dataset default] [--epochs 5]
    python benchmarks/epoch_time.py --model lenet5 --lr 0.05 --epochs 6 --target-density 0.3
    python benchmarks/epoch_time.py --model lenet5 --lr 0.05 --target-density 0.3 --pull all
    python benchmarks/epoch_time.py --model conv4 --lr 0.02 --target-density 0.3 --max-batches 60

``--max-batches N`` times the first N batches of each epoch. The target still plans its
selection over whole epochs, so a short run times the coupled phase only (the dearer one: after
the selection the coupling is released and the step is SGD-momentum's with a mask).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from dessilbi.core.target import TARGET_PULLS
from dessilbi.training.batches import batches as _batches
from dessilbi.training.batches import epoch_indices
from dessilbi.training.build import build
from dessilbi.training.config import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lenet3")
    ap.add_argument("--dataset", default="default")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--nu", type=float, default=20.0)
    ap.add_argument("--fused", action="store_true")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--target-density", type=float, default=None,
                    help="steer DessiLBI with SparsityTarget (select then train)")
    ap.add_argument("--pull", default="outside", choices=TARGET_PULLS,
                    help="with --target-density: the units the coupling pulls W on "
                         "(default: the target's default)")
    ap.add_argument("--data-dir", default="data", help="where the dataset's files are")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--max-batches", type=int, default=0,
                    help="time the first N batches of each epoch (0: whole epochs)")
    args = ap.parse_args()
    runs = {}
    for opt in ("sgd-momentum", "dessilbi"):
        lbi = opt == "dessilbi"
        cfg = TrainConfig(model=args.model, dataset=args.dataset, optimizer=opt, nu=args.nu,
                          batch_size=args.batch_size, fused=args.fused and lbi, lr=args.lr,
                          epochs=args.epochs, target_density=args.target_density if lbi else None,
                          pull=args.pull, data_dir=args.data_dir, device=args.device)
        runs[opt] = build(cfg)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for epoch in range(args.epochs):
        for name, b in runs.items():
            idx = epoch_indices(len(b.train_set), 0, epoch)
            if args.max_batches:
                idx = idx[:args.max_batches * args.batch_size]
            b.model.train()
            t0 = time.perf_counter()
            for x, y in _batches(b.train_set, idx, args.batch_size, 0, b.device.type == "cuda"):
                x, y = x.to(b.device, non_blocking=True), y.to(b.device, non_blocking=True)
                loss = nn.functional.cross_entropy(b.model(x), y)
                b.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                b.optimizer.step()
                if b.target is not None:
                    b.target.step()
            if b.device.type == "cuda":
                torch.cuda.synchronize(b.device)
            times[name].append(time.perf_counter() - t0)
    sgd, lbi = (statistics.median(times[k]) for k in ("sgd-momentum", "dessilbi"))
    part = f" of {args.max_batches} batches" if args.max_batches else ""
    print(f"{args.model} on {runs['dessilbi'].cfg.dataset}, batch {args.batch_size}, "
          f"{args.epochs} alternating epochs{part}, torch {torch.__version__}, "
          f"{runs['dessilbi'].device}, {torch.get_num_threads()} threads")
    print(f"SGD-momentum median epoch {sgd:.3f} s; DessiLBI {lbi:.3f} s; ratio {lbi / sgd:.3f}")


if __name__ == "__main__":
    main()
