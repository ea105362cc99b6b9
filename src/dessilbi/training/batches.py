"""What the loop feeds and measures: the per-epoch sample order, batches, test accuracy."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..zoo.data import TensorImageDataset

__all__ = ["batches", "epoch_indices", "evaluate"]


def epoch_indices(n: int, seed: int, epoch: int, shuffle: bool = True, rank: int = 0,
                  world: int = 1) -> Tensor:
    """The sample order of ``epoch``: a permutation fixed by (seed, epoch), sharded by rank.

    Depending only on (seed, epoch) is what lets a resumed run see the same batches.
    """
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        idx = torch.randperm(n, generator=g)
    else:
        idx = torch.arange(n)
    if world > 1:
        per = n // world  # drop the tail so every rank takes the same number of steps
        idx = idx[: per * world].view(per, world)[:, rank]
    return idx


def batches(dataset: Dataset, indices: Tensor, batch_size: int, workers: int,
             pin: bool) -> Iterator[tuple[Tensor, Tensor]]:
    if isinstance(dataset, TensorImageDataset) and workers == 0:
        # In-memory data: index whole batches at once instead of collating samples.
        mean, std = dataset.mean, dataset.std
        for start in range(0, len(indices), batch_size):
            idx = indices[start:start + batch_size]
            x = dataset.images[idx].float().div_(255.0)
            if dataset.augment is not None:
                x = torch.stack([dataset.augment(xi) for xi in x])
            x, y = (x - mean) / std, dataset.labels[idx]
            if pin:  # page-locked, so the copy to the GPU can be non-blocking
                x, y = x.pin_memory(), y.pin_memory()
            yield x, y
        return
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices.tolist(),
                        num_workers=workers, pin_memory=pin, persistent_workers=False)
    yield from loader


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 512,
             amp_dtype: torch.dtype | None = None, workers: int = 0) -> float:
    """Top-1 accuracy (%) of ``model`` on ``dataset``."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for x, y in batches(dataset, torch.arange(len(dataset)), batch_size, workers,  # type: ignore[arg-type]
                         device.type == "cuda"):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        correct += (out.argmax(1) == y).sum()
        seen += y.numel()
    model.train(was_training)
    return 100.0 * float(correct) / max(seen, 1)
