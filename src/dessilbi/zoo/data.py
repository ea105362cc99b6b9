"""Datasets: ``load_dataset(name, root, ...)`` → train / test datasets and their geometry.

Supported names: ``mnist``, ``fashion-mnist`` (idx files, gzipped or not), ``cifar10``,
``cifar100`` (torchvision's python pickles), ``imagenet`` (``train/`` and ``val/`` class folders),
``digits`` (scikit-learn's bundled 8×8 digits, always available, resized to 28×28) and
``synthetic`` (class templates plus noise, for tests and smoke runs).

Nothing is downloaded unless ``download=True``; a missing dataset raises
:class:`DatasetNotFoundError` saying where it looked and how to get it, and truncated or
corrupted files raise :class:`CorruptDatasetError`.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import CorruptDatasetError, DatasetNotFoundError

log = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "DataInfo",
    "DatasetNotFoundError",
    "CorruptDatasetError",
    "UnsafeDatasetError",
    "TensorImageDataset",
    "load_dataset",
    "read_idx",
    "DEBIAN_FASHION_MNIST",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet", "digits", "synthetic")


@dataclass(frozen=True)
class DataInfo:
    """Geometry of a dataset: what a model needs to know about its inputs."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""


class TensorImageDataset(Dataset):
    """Images held in memory as a uint8 tensor ``(N, C, H, W)`` with int64 labels ``(N,)``.

    ``__getitem__`` returns a float image normalised with ``mean`` / ``std`` (after the optional
    augmentation, which receives and returns a float ``(C, H, W)`` tensor in [0, 1]).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...],
                 std: tuple[float, ...],
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got "
                             f"{tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].float().div_(255.0)
        if self.augment is not None:
            x = self.augment(x)
        return (x - self.mean) / self.std, self.labels[i]


# ----------------------------------------------------------------------------- augmentation
class RandomCropFlip:
    """Pad-and-crop plus horizontal flip, the usual CIFAR augmentation, on a (C, H, W) tensor."""

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        self.padding, self.flip = padding, flip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w = x.shape
        p = self.padding
        if p:
            x = torch.nn.functional.pad(x, (p, p, p, p))
            i, j = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
            x = x[:, i:i + h, j:j + w]
        if self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x


# ----------------------------------------------------------------------------- idx (MNIST)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not, checking its size against its header."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip raises these on truncation
        raise CorruptDatasetError(f"{path}: unreadable or truncated ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise CorruptDatasetError(f"{path}: not an idx file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptDatasetError(f"{path}: truncated header")
    shape = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise CorruptDatasetError(
            f"{path}: expected {expected} bytes for shape {shape}, found {len(data)} (truncated?)"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


_IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for suffix in ("", ".gz"):
            p = d / (stem + suffix)
            if p.is_file():
                return p
    return None


def _download(name: str, fetch: Callable[[], Any]) -> None:
    """Run torchvision's download, turning a network failure into one clear error."""
    try:
        fetch()
    except (OSError, RuntimeError) as e:  # URLError is an OSError; torchvision raises both
        raise DatasetNotFoundError(f"{name}: download failed ({e}); check the network, or put "
                                   f"the files under --data-dir yourself") from e


def _load_mnist_like(name: str, root: Path, train: bool, download: bool) -> tuple[
        torch.Tensor, torch.Tensor, str]:
    folder = "MNIST" if name == "mnist" else "FashionMNIST"
    dirs = [root / folder / "raw", root / folder, root / name, root]
    if name == "fashion-mnist":
        dirs.append(DEBIAN_FASHION_MNIST)
    img_p, lab_p = (_find_idx(dirs, s) for s in _IDX_FILES[train])
    if (img_p is None or lab_p is None) and download:
        from torchvision import datasets

        cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
        _download(name, lambda: cls(str(root), train=train, download=True))
        img_p, lab_p = (_find_idx(dirs, s) for s in _IDX_FILES[train])
    if img_p is None or lab_p is None:
        hint = ("`apt-get install dataset-fashion-mnist`, or " if name == "fashion-mnist" else "")
        raise DatasetNotFoundError(
            f"{name}: {'/'.join(_IDX_FILES[train])}[.gz] not found in "
            f"{', '.join(str(d) for d in dirs)}; get it with {hint}--download (internet needed)"
        )
    images, labels = read_idx(img_p), read_idx(lab_p)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise CorruptDatasetError(f"{img_p}: {images.shape} images for {labels.shape} labels")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64)), str(img_p.parent)


class UnsafeDatasetError(CorruptDatasetError):
    """A dataset file asks to run code when loaded; it is refused, nothing of it runs."""


class _ArraysOnly(pickle.Unpickler):
    """Unpickles what a CIFAR batch holds (dicts, lists, bytes, numbers, numpy arrays) and
    refuses every other global, so a crafted file cannot run code (pickle.load would call any
    function the file names)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise UnsafeDatasetError(f"refused to load {module}.{name}: a CIFAR batch holds "
                                     f"arrays only; this file would run code")
        return super().find_class(module, name)


def _load_cifar(name: str, root: Path, train: bool, download: bool) -> tuple[
        torch.Tensor, torch.Tensor, str]:
    base = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    folder = root / base
    if not folder.is_dir() and download:
        from torchvision import datasets

        cls10 = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        _download(name, lambda: cls10(str(root), train=train, download=True))
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"{name}: folder {folder} not found; pass --data-dir pointing at the folder that "
            f"holds {base}/, or --download (internet needed)"
        )
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        key = b"labels"
    else:
        files, key = (["train"] if train else ["test"]), b"fine_labels"
    xs, ys = [], []
    for fname in files:
        path = folder / fname
        if not path.is_file():
            raise DatasetNotFoundError(f"{name}: {path} missing")
        try:
            with open(path, "rb") as f:
                batch = _ArraysOnly(f, encoding="bytes").load()
            if not isinstance(batch, dict):
                raise CorruptDatasetError(f"{path}: not a CIFAR batch (a {type(batch).__name__})")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(batch[key], dtype=np.int64)
        except (CorruptDatasetError, UnsafeDatasetError):
            raise
        except Exception as e:  # truncated pickles raise many different errors
            raise CorruptDatasetError(f"{path}: unreadable or truncated ({e})") from e
        if data.shape[0] != labels.shape[0]:
            raise CorruptDatasetError(
                f"{path}: {data.shape[0]} images for {labels.shape[0]} labels")
        xs.append(data)
        ys.append(labels)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), str(folder)


def _load_digits(train: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = len(y) // 5
    idx = perm[n_test:] if train else perm[:n_test]
    return x[idx], y[idx], "scikit-learn load_digits (8×8, resized to 28×28)"


def _synthetic(train: bool, n: int, channels: int, size: int, classes: int, seed: int) -> tuple[
        torch.Tensor, torch.Tensor, str]:
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(classes, channels, size, size, generator=g)
    g.manual_seed(seed + (1 if train else 2))
    y = torch.randint(0, classes, (n,), generator=g)
    x = 0.6 * templates[y] + 0.4 * torch.rand(n, channels, size, size, generator=g)
    return (x * 255).round().to(torch.uint8), y, f"synthetic (seed {seed})"


def load_dataset(
    name: str,
    root: str | os.PathLike[str] = "data",
    *,
    download: bool = False,
    augment: bool = True,
    synthetic_size: tuple[int, int, int, int] = (512, 1, 28, 10),
    seed: int = 0,
) -> tuple[Dataset, Dataset, DataInfo]:
    """Load ``name`` from ``root``; returns ``(train, test, info)``.

    ``augment`` enables the usual training augmentation (random crop + flip for CIFAR and
    ImageNet; none for the MNIST family and digits). ``synthetic_size`` is
    ``(n_train, channels, image_size, classes)`` for ``synthetic``.
    """
    root = Path(root)
    if name in ("mnist", "fashion-mnist"):
        (xtr, ytr, src), (xte, yte, _) = (_load_mnist_like(name, root, t, download)
                                           for t in (True, False))
        mean, std = ((0.1307,), (0.3081,)) if name == "mnist" else ((0.2860,), (0.3530,))
        info = DataInfo(name, 10, 1, 28, mean, std, src)
        return (TensorImageDataset(xtr, ytr, mean, std), TensorImageDataset(xte, yte, mean, std),
                info)
    if name in ("cifar10", "cifar100"):
        (xtr, ytr, src), (xte, yte, _) = (_load_cifar(name, root, t, download)
                                           for t in (True, False))
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        info = DataInfo(name, 10 if name == "cifar10" else 100, 3, 32, mean, std, src)
        aug = RandomCropFlip() if augment else None
        return (TensorImageDataset(xtr, ytr, mean, std, aug),
                TensorImageDataset(xte, yte, mean, std), info)
    if name == "digits":
        (xtr, ytr, src), (xte, yte, _) = (_load_digits(t) for t in (True, False))
        mean, std = (0.5,), (0.5,)
        info = DataInfo(name, 10, 1, 28, mean, std, src)
        return (TensorImageDataset(xtr, ytr, mean, std), TensorImageDataset(xte, yte, mean, std),
                info)
    if name == "synthetic":
        n, c, s, k = synthetic_size
        (xtr, ytr, src), (xte, yte, _) = (_synthetic(t, n if t else max(n // 4, k), c, s, k, seed)
                                           for t in (True, False))
        mean, std = (0.5,) * c, (0.25,) * c
        info = DataInfo(name, k, c, s, mean, std, src)
        return (TensorImageDataset(xtr, ytr, mean, std), TensorImageDataset(xte, yte, mean, std),
                info)
    if name == "imagenet":
        return _load_imagenet(root, augment)
    raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def _load_imagenet(root: Path, augment: bool) -> tuple[Dataset, Dataset, DataInfo]:
    from torchvision import datasets, transforms

    tr, va = root / "train", root / "val"
    if not tr.is_dir() or not va.is_dir():
        raise DatasetNotFoundError(
            f"imagenet: expected class folders in {tr} and {va} (ImageNet-2012 train/val, "
            "one sub-folder per class); ImageNet cannot be downloaded automatically"
        )
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    norm = transforms.Normalize(mean, std)
    train_tf = transforms.Compose(
        ([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()] if augment
         else [transforms.Resize(256), transforms.CenterCrop(224)])
        + [transforms.ToTensor(), norm])
    val_tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                 transforms.ToTensor(), norm])
    train = datasets.ImageFolder(str(tr), train_tf)
    val = datasets.ImageFolder(str(va), val_tf)
    info = DataInfo("imagenet", len(train.classes), 3, 224, mean, std, str(root))
    return train, val, info
