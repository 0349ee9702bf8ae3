"""The two small networks of the embedded default: an MLP and the seed's plain CNN."""

from __future__ import annotations

from torch import nn

from ttkd.models.base import Classifier, register


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register
def mlp(num_classes: int, in_channels: int, image_size: int = 32, hidden: int = 32) -> nn.Module:
    """One hidden layer of ``hidden`` units on the flattened image: the smallest student.
    Its one stage is the hidden layer, ``(B, hidden, 1, 1)``: no spatial maps."""
    features = nn.Sequential(
        nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU(inplace=True)
    )
    return Classifier(features, nn.Linear(hidden, num_classes), stage_ends=[2])


@register
def cnn(num_classes: int, in_channels: int, image_size: int = 32, width: int = 32,
        dropout: float = 0.0) -> nn.Module:
    """The seed's plain CNN: three conv-BN-ReLU-maxpool blocks (width, 2x, 4x channels),
    then a 128-unit hidden layer with dropout (0 in the seed). Inputs smaller than 32x32 skip the pools
    that would shrink the map below 1x1, and the map is averaged down to at most 4x4.
    Stages: the three blocks' outputs."""
    layers: list[nn.Module] = []
    ends = []
    cin, size = in_channels, image_size
    for cout in (width, 2 * width, 4 * width):
        layers += conv_bn_relu(cin, cout)
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        ends.append(len(layers) - 1)
        cin = cout
    side = min(size, 4)
    layers += [nn.AdaptiveAvgPool2d(side), nn.Flatten()]
    head = nn.Sequential(
        nn.Linear(cin * side * side, 128), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
        nn.Dropout(dropout), nn.Linear(128, num_classes),
    )
    return Classifier(nn.Sequential(*layers), head, ends)
