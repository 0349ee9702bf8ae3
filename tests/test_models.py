import pytest
import torch

from ttkd import models
from ttkd.errors import TTKDError

SHAPES = [(1, 8), (3, 32), (1, 28)]  # (channels, side): digits, CIFAR, MNIST


@pytest.mark.parametrize("arch", models.names())
@pytest.mark.parametrize("channels, side", SHAPES)
def test_every_architecture_trains_on_every_shape(arch, channels, side):
    torch.manual_seed(0)
    model = models.build(arch, num_classes=7, in_channels=channels, image_size=side)
    x = torch.randn(2, channels, side, side)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.equal(model.eval().forward_head(model.forward_features(x)), model(x))


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(TTKDError, match="unknown architecture 'resnet-18'.*cnn.*mlp"):
        models.build("resnet-18", 10, 3)


def test_none_keyword_means_model_default():
    assert models.num_parameters(models.build("mlp", 10, 1, image_size=8, hidden=None)) == \
        models.num_parameters(models.build("mlp", 10, 1, image_size=8))


@pytest.mark.parametrize("arch, millions", [
    ("resnet18", 11.17), ("resnet50", 23.5), ("preresnet20", 0.27), ("preresnet110", 1.7),
    ("mobilenetv2", 2.3),
])
def test_parameter_counts_match_the_usual_cifar_figures(arch, millions):
    count = models.num_parameters(models.build(arch, 10, 3, image_size=32))
    assert count == pytest.approx(millions * 1e6, rel=0.02)


def test_cifar_stem_keeps_32x32_resolution():
    """No early down-sampling: ResNet-18's last stage sees 4x4 maps on 32x32 inputs."""
    net = models.build("resnet18", 10, 3)
    seen = []
    net.features[6].register_forward_hook(lambda m, i, o: seen.append(o.shape))  # layer4
    net(torch.randn(2, 3, 32, 32))
    assert seen[0][-2:] == (4, 4)
