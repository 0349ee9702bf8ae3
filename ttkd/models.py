"""Architectures, built by name through one registry.

``build(arch, num_classes, in_channels, image_size=...)`` is the public entry;
``names()`` lists what is registered. A constructor is registered with ``@register``
and takes ``num_classes`` and ``in_channels`` plus optional keywords; keywords passed
as ``None`` are dropped, so ``None`` from a command line means "the model's default".

Every model splits ``forward_features`` (B, C, H, W) -> (B, D) from
``forward_head`` (B, D) -> (B, num_classes), so feature-based KD needs no hooks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ttkd.errors import TTKDError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a constructor under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def names() -> list[str]:
    """The registered architecture names, sorted."""
    return sorted(_REGISTRY)


def get(arch: str) -> Callable[..., nn.Module]:
    """The constructor registered as ``arch``; an unknown name lists the known ones."""
    if arch not in _REGISTRY:
        raise TTKDError(f"unknown architecture {arch!r}; choose one of: {', '.join(names())}")
    return _REGISTRY[arch]


def build(arch: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    """A freshly initialised ``arch`` for ``num_classes`` classes and ``in_channels`` inputs."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return get(arch)(num_classes=num_classes, in_channels=in_channels, **kwargs)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Classifier(nn.Module):
    """``features`` then ``head``: the split every ttkd model follows."""

    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features = features
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register
def mlp(num_classes: int, in_channels: int, image_size: int = 32, hidden: int = 32) -> nn.Module:
    """One hidden layer of ``hidden`` units on the flattened image: the smallest student."""
    features = nn.Sequential(
        nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU(inplace=True)
    )
    return Classifier(features, nn.Linear(hidden, num_classes))


@register
def cnn(num_classes: int, in_channels: int, image_size: int = 32, width: int = 32) -> nn.Module:
    """The seed's plain CNN: three conv-BN-ReLU-maxpool blocks (width, 2x, 4x channels),
    then a 128-unit hidden layer with dropout. Inputs smaller than 32x32 skip the pools
    that would shrink the map below 1x1, and the map is averaged down to at most 4x4."""
    layers: list[nn.Module] = []
    cin, size = in_channels, image_size
    for cout in (width, 2 * width, 4 * width):
        layers += _conv_bn_relu(cin, cout)
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        cin = cout
    side = min(size, 4)
    layers += [nn.AdaptiveAvgPool2d(side), nn.Flatten()]
    head = nn.Sequential(
        nn.Linear(cin * side * side, 128), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
        nn.Dropout(0.5), nn.Linear(128, num_classes),
    )
    return Classifier(nn.Sequential(*layers), head)
