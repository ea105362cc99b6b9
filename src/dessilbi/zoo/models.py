"""The paper's networks in a registry: ``create_model(name, num_classes, in_channels, image_size)``.

Every model accepts 1-channel 28×28 (MNIST-like) and 3-channel 32×32 (CIFAR-like) inputs; the
torchvision ImageNet models swap in a small-image stem below 64 pixels.

* ``lenet3``: fully connected in-300-100-classes.
* ``lenet5``: conv 6-16-120 (5×5), fc 84-classes (the authors' MNIST demo).
* ``conv2`` / ``conv4`` / ``conv6``: Frankle & Carbin's lottery-ticket CNNs, 3×3 convs with a 2×2
  max-pool after each pair, then fc 256-256-classes.
* ``vgg16_bn``: the CIFAR VGG-16 with BatchNorm, one linear classifier.
* ``resnet20`` / ``32`` / ``56`` / ``110``: He et al.'s CIFAR ResNets (16/32/64 channels); a shape
  change in a shortcut uses a 1×1 conv + BN projection (option B), which keeps every channel
  prunable.
* ``alexnet``, ``resnet18``, ``resnet50``: torchvision's ImageNet models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["create_model", "MODELS", "register_model"]

ModelFn = Callable[[int, int, int], nn.Module]
MODELS: dict[str, ModelFn] = {}


def register_model(name: str) -> Callable[[ModelFn], ModelFn]:
    """Decorator registering ``fn(num_classes, in_channels, image_size) -> nn.Module``."""

    def deco(fn: ModelFn) -> ModelFn:
        MODELS[name] = fn
        return fn

    return deco


def create_model(
    name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
    width: float = 1.0,
) -> nn.Module:
    """Build the registered model ``name`` for the given input geometry.

    ``width`` scales the channel counts of ``vgg16_bn`` and the CIFAR ResNets (narrow starts for
    network growing); other models accept only 1.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    for field, value in (("num_classes", num_classes), ("in_channels", in_channels),
                         ("image_size", image_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"invalid {field}={value!r}: must be a positive integer")
    if width != 1.0:
        if not width > 0:
            raise ValueError(f"invalid width={width!r}: must be > 0")
        if name not in WIDTH_MODELS:
            raise ValueError(f"invalid width={width!r}: {name} has a fixed width; "
                             f"{', '.join(sorted(WIDTH_MODELS))} accept one")
        return MODELS[name](num_classes, in_channels, image_size, width=width)  # type: ignore[call-arg]
    return MODELS[name](num_classes, in_channels, image_size)


def _flat_features(features: nn.Module, in_channels: int, image_size: int) -> int:
    with torch.no_grad():
        out = features(torch.zeros(1, in_channels, image_size, image_size))
    return out.flatten(1).shape[1]


class Classifier(nn.Module):
    """``features`` followed by a flatten and ``head``: the layout of the plain CNNs here."""

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


@register_model("lenet3")
def lenet3(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return Classifier(nn.Identity(), _mlp([in_channels * image_size**2, 300, 100, num_classes]))


@register_model("lenet5")
def lenet5(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    features = nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(16, 120, 5), nn.ReLU(inplace=True),
    )
    n = _flat_features(features, in_channels, image_size)
    return Classifier(features, _mlp([n, 84, num_classes]))


def _conv_pairs(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True)]
        c = w
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def _frankle_carbin(widths: list[int]) -> ModelFn:
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        features = _conv_pairs(widths, in_channels)
        n = _flat_features(features, in_channels, image_size)
        return Classifier(features, _mlp([n, 256, 256, num_classes]))

    return build


register_model("conv2")(_frankle_carbin([64, 64]))
register_model("conv4")(_frankle_carbin([64, 64, 128, 128]))
register_model("conv6")(_frankle_carbin([64, 64, 128, 128, 256, 256]))

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


@register_model("vgg16_bn")
def vgg16_bn(num_classes: int, in_channels: int, image_size: int,
             width: float = 1.0) -> nn.Module:
    layers: list[nn.Module] = []
    c = in_channels
    for v in VGG16:
        if v == "M":
            # ceil_mode keeps five pools valid on 28×28 inputs as well as 32×32
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            n = max(1, round(int(v) * width))
            layers += [nn.Conv2d(c, n, 3, padding=1, bias=False), nn.BatchNorm2d(n),
                       nn.ReLU(inplace=True)]
            c = n
    layers.append(nn.AdaptiveAvgPool2d(1))
    return Classifier(nn.Sequential(*layers), nn.Linear(c, num_classes))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity or 1×1-projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al., Sec. 4.2)."""

    def __init__(self, depth: int, num_classes: int, in_channels: int,
                 width: float = 1.0) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"invalid depth={depth}: must be 6n + 2")
        n = (depth - 2) // 6
        widths = [max(1, round(w * width)) for w in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


for _depth in (20, 32, 56, 110):
    register_model(f"resnet{_depth}")(
        lambda k, c, s, d=_depth, width=1.0: CifarResNet(d, k, c, width)  # noqa: ARG005
    )

WIDTH_MODELS = {"vgg16_bn", "resnet20", "resnet32", "resnet56", "resnet110"}


def _small_stem_resnet(model: nn.Module, in_channels: int, image_size: int) -> nn.Module:
    if image_size < 64:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from torchvision.models import resnet18 as tv

    return _small_stem_resnet(tv(num_classes=num_classes), in_channels, image_size)


@register_model("resnet50")
def resnet50(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from torchvision.models import resnet50 as tv

    return _small_stem_resnet(tv(num_classes=num_classes), in_channels, image_size)


@register_model("alexnet")
def alexnet(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from torchvision.models import alexnet as tv

    model = tv(num_classes=num_classes)
    if image_size < 64:
        model.features[0] = nn.Conv2d(in_channels, 64, 3, 1, 1)
    elif in_channels != 3:
        model.features[0] = nn.Conv2d(in_channels, 64, 11, 4, 2)
    return model
