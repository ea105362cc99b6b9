import pytest
import torch

from dessilbi.zoo.models import MODELS, create_model

SMALL = [n for n in MODELS if n not in ("alexnet", "resnet50", "resnet110")]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_forward_on_both_input_kinds(name, channels, size):
    model = create_model(name, num_classes=7, in_channels=channels, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_paper_layer_sizes():
    lenet3 = create_model("lenet3")
    sizes = [m.weight.numel() for m in lenet3.modules() if isinstance(m, torch.nn.Linear)]
    assert sizes == [235_200, 30_000, 1_000]
    r56 = create_model("resnet56", 10, 3, 32)
    convs = [m for m in r56.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len([c for c in convs if c.kernel_size == (3, 3)]) == 55
    vgg = create_model("vgg16_bn", 10, 3, 32)
    assert len([m for m in vgg.modules() if isinstance(m, torch.nn.Conv2d)]) == 13


def test_unknown_model_and_bad_geometry():
    with pytest.raises(ValueError, match="unknown model 'lenet9'"):
        create_model("lenet9")
    with pytest.raises(ValueError, match="invalid num_classes=0"):
        create_model("lenet3", num_classes=0)
