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
    maps, embedding = model.forward_stages(x)
    assert maps and all(m.dim() == 4 and m.shape[0] == 2 for m in maps)
    assert torch.equal(embedding, model.forward_features(x))
    sides = [m.shape[-1] for m in maps]
    assert sides == sorted(sides, reverse=True)  # shallow to deep: resolution never grows


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


@pytest.mark.parametrize("arch, millions", [  # at 100 classes, as the KD literature counts them
    ("resnet8x4", 1.23), ("resnet32x4", 7.43), ("resnet20", 0.28), ("resnet56", 0.86),
    ("wrn_16_2", 0.70), ("wrn_40_2", 2.26), ("vgg8", 3.96), ("vgg13", 9.46),
])
def test_the_kd_literature_zoo_has_its_published_sizes(arch, millions):
    count = models.num_parameters(models.build(arch, 100, 3, image_size=32))
    assert count == pytest.approx(millions * 1e6, rel=0.01)


def test_stage_maps_of_a_cifar_resnet_are_its_three_stage_outputs():
    maps, embedding = models.build("resnet32x4", 100, 3).forward_stages(torch.randn(2, 3, 32, 32))
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    assert embedding.shape == (2, 256)
