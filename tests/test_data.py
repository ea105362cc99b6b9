import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from dessilbi.zoo.data import (
    CorruptDatasetError,
    DatasetNotFoundError,
    load_dataset,
    read_idx,
)


def write_idx(path, array, compress=False):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape)
    data = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_mnist(root, folder, n_train=20, n_test=10, compress=False):
    rng = np.random.default_rng(0)
    raw = root / folder / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), compress)
    return raw


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
@pytest.mark.parametrize("compress", [False, True])
def test_mnist_family_from_idx_files(tmp_path, name, folder, compress):
    make_mnist(tmp_path, folder, compress=compress)
    train, test, info = load_dataset(name, tmp_path)
    assert (len(train), len(test)) == (20, 10)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 28)
    x, y = train[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= int(y) < 10


def test_truncated_idx_is_a_clear_error(tmp_path):
    raw = make_mnist(tmp_path, "MNIST")
    p = raw / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CorruptDatasetError, match="truncated"):
        load_dataset("mnist", tmp_path)
    gz = tmp_path / "bad.gz"
    gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"ab")[:-6])
    with pytest.raises(CorruptDatasetError):
        read_idx(gz)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(CorruptDatasetError, match="magic"):
        read_idx(bad)


def test_missing_dataset_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("mnist", tmp_path)
    assert str(tmp_path) in str(e.value) and "--download" in str(e.value)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="train"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("svhn", tmp_path)


def make_cifar10(root, n=8):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def test_cifar10_pickles_and_augmentation(tmp_path):
    make_cifar10(tmp_path)
    train, test, info = load_dataset("cifar10", tmp_path)
    assert (len(train), len(test)) == (40, 8)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 3, 32)
    x, _ = train[0]
    assert x.shape == (3, 32, 32)
    assert train.augment is not None and test.augment is None


def test_cifar100_and_truncated_pickle(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("train", "test"):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8),
                         b"fine_labels": rng.integers(0, 100, 6).tolist()}, f)
    _, _, info = load_dataset("cifar100", tmp_path)
    assert info.num_classes == 100
    p = folder / "train"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CorruptDatasetError, match="truncated"):
        load_dataset("cifar100", tmp_path)


def test_imagenet_folders(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            Image.new("RGB", (40, 30), (10, 20, 30)).save(d / "0.png")
    train, val, info = load_dataset("imagenet", tmp_path)
    assert info.num_classes == 2 and len(train) == 2
    assert val[0][0].shape == (3, 224, 224)


def test_digits_and_synthetic_always_available():
    train, test, info = load_dataset("digits")
    assert len(train) + len(test) == 1797 and info.image_size == 28
    train, test, info = load_dataset("synthetic", synthetic_size=(64, 3, 32, 5))
    assert len(train) == 64 and info.num_classes == 5 and train[0][0].shape == (3, 32, 32)


class RunsCode:
    """What a crafted dataset file holds: unpickling it calls a function of the file's choice."""

    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('code ran')",))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path, monkeypatch, protocol):
    from dessilbi.zoo.data import UnsafeDatasetError

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("train", "test"):  # real arrays load, whatever the pickle protocol
        (folder / name).write_bytes(pickle.dumps(
            {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
             b"fine_labels": [1, 2, 3, 4]}, protocol=protocol))
    train, _, _ = load_dataset("cifar100", tmp_path)
    assert len(train) == 4
    (folder / "train").write_bytes(pickle.dumps({b"data": RunsCode(), b"fine_labels": []},
                                                protocol=protocol))
    with pytest.raises(UnsafeDatasetError, match="exec"):
        load_dataset("cifar100", tmp_path)
    assert not (tmp_path / "PWNED").exists()



def test_a_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    import urllib.error

    from torchvision import datasets

    def offline(*_a, **_k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(datasets, "MNIST", offline)
    with pytest.raises(DatasetNotFoundError, match="download failed"):
        load_dataset("mnist", tmp_path, download=True)
