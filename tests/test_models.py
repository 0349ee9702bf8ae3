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
    x = torch.randn(4, channels, side, side)
    logits = model(x)
    assert logits.shape == (4, 7)
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
