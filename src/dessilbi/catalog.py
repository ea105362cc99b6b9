"""What can be named on the command line: every model, dataset and optimizer with a line saying
what it is.

The registries that build them (:data:`dessilbi.zoo.models.MODELS`,
:data:`dessilbi.zoo.data.DATASETS`, :data:`dessilbi.core.optimizers.OPTIMIZERS`) import torch;
this table does not, so that ``dessilbi --help`` and ``dessilbi list`` answer at once. A test
keeps the two in step: a name registered without a line here (or the reverse) fails it.
"""

from __future__ import annotations

__all__ = ["MODELS", "DATASETS", "OPTIMIZERS", "names"]

MODELS: dict[str, str] = {
    "lenet3": "fully connected in-300-100-classes (the paper's LeNet-3 tables)",
    "lenet5": "conv 6-16-120 (5x5), fc 84-classes (the authors' MNIST demo)",
    "conv2": "Frankle & Carbin's Conv-2: two 3x3 convs (64), fc 256-256-classes",
    "conv4": "Frankle & Carbin's Conv-4: 3x3 convs 64-64-128-128, fc 256-256-classes",
    "conv6": "Frankle & Carbin's Conv-6: 3x3 convs 64-64-128-128-256-256, fc 256-256-classes",
    "vgg16_bn": "CIFAR VGG-16 with BatchNorm, one linear classifier (--width scales it)",
    "resnet20": "He et al.'s CIFAR ResNet-20 (16/32/64 channels; --width scales it)",
    "resnet32": "CIFAR ResNet-32",
    "resnet56": "CIFAR ResNet-56",
    "resnet110": "CIFAR ResNet-110",
    "resnet18": "torchvision's ImageNet ResNet-18",
    "resnet50": "torchvision's ImageNet ResNet-50",
    "alexnet": "torchvision's ImageNet AlexNet",
}

DATASETS: dict[str, str] = {
    "mnist": "MNIST idx files (gzipped or not) in --data-dir",
    "fashion-mnist": "Fashion-MNIST idx files in --data-dir or /usr/share/datasets/fashion-mnist",
    "cifar10": "CIFAR-10 python batches in --data-dir (read without running code)",
    "cifar100": "CIFAR-100 python batches in --data-dir",
    "imagenet": "ImageNet train/val class folders in --data-dir",
    "digits": "scikit-learn's 8x8 digits, always there (upscaled to 28x28)",
    "synthetic": "random images with --synthetic-size samples, channels, size, classes",
}

OPTIMIZERS: dict[str, str] = {
    "dessilbi": "DessiLBI: SGD on W coupled to a sparse Γ on an inverse-scale-space path",
    "sgd": "plain SGD",
    "sgd-momentum": "SGD with momentum",
    "sgd-momentum-wd": "SGD with momentum and weight decay (1e-4 unless --weight-decay)",
    "nesterov": "SGD with Nesterov momentum",
    "adam": "Adam",
    "adamw": "AdamW (decoupled weight decay)",
    "adagrad": "Adagrad",
    "amsgrad": "Adam with the AMSGrad maximum",
    "radam": "RAdam",
    "adabound": "AdaBound (Adam bounded towards SGD)",
}


def names(table: dict[str, str]) -> str:
    """The names of a table, comma separated, for a help line."""
    return ", ".join(table)
