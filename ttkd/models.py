"""Architectures, built by name through one registry.

``build(arch, num_classes, in_channels, image_size=...)`` is the public entry;
``names()`` lists what is registered. A constructor is registered with ``@register``
and takes ``num_classes`` and ``in_channels`` plus optional keywords; keywords passed
as ``None`` are dropped, so ``None`` from a command line means "the model's default".

Every model splits ``forward_features`` (B, C, H, W) -> (B, D) from
``forward_head`` (B, D) -> (B, num_classes), so feature-based KD needs no hooks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from ttkd.errors import TTKDError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(fn: Callable[..., nn.Module], name: str | None = None) -> Callable[..., nn.Module]:
    """Register a constructor under ``name`` (default: its function name); usable as a decorator."""
    _REGISTRY[name or fn.__name__] = fn
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
def cnn(num_classes: int, in_channels: int, image_size: int = 32, width: int = 32,
        dropout: float = 0.0) -> nn.Module:
    """The seed's plain CNN: three conv-BN-ReLU-maxpool blocks (width, 2x, 4x channels),
    then a 128-unit hidden layer with dropout (0 in the seed). Inputs smaller than 32x32 skip the pools
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
        nn.Dropout(dropout), nn.Linear(128, num_classes),
    )
    return Classifier(nn.Sequential(*layers), head)


# --- The CIFAR architecture zoo of the KD literature ---------------------------------------
# All keep a 3x3, stride-1 stem with no early pooling, so 32x32 inputs keep their resolution;
# global average pooling makes them work for any input size from 8x8 up.

def _resnet(block, layers: list[int], num_classes: int, in_channels: int) -> nn.Module:
    from torchvision.models.resnet import ResNet

    net = ResNet(block, layers, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    features = nn.Sequential(net.conv1, net.bn1, net.relu, net.layer1, net.layer2, net.layer3,
                             net.layer4, net.avgpool, nn.Flatten())
    return Classifier(features, net.fc)


@register
def resnet18(num_classes: int, in_channels: int, **_) -> nn.Module:
    """ResNet-18, CIFAR form (torchvision's BasicBlock; 11.17 M parameters for 10 classes)."""
    from torchvision.models.resnet import BasicBlock
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels)


@register
def resnet34(num_classes: int, in_channels: int, **_) -> nn.Module:
    """ResNet-34, CIFAR form (torchvision's BasicBlock)."""
    from torchvision.models.resnet import BasicBlock
    return _resnet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels)


@register
def resnet50(num_classes: int, in_channels: int, **_) -> nn.Module:
    """ResNet-50, CIFAR form (torchvision's Bottleneck; 23.5 M parameters for 10 classes)."""
    from torchvision.models.resnet import Bottleneck
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels)


class _PreActBlock(nn.Module):
    """BN-ReLU-conv twice, plus the identity (or a 1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


def _preresnet(depth: int, num_classes: int, in_channels: int, **_) -> nn.Module:
    """Pre-activation ResNet for CIFAR (He et al., 2016): depth = 6n + 2, widths 16/32/64
    (PreResNet-20: 0.27 M parameters for 10 classes; PreResNet-110: 1.7 M)."""
    n = (depth - 2) // 6
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)]
    cin = 16
    for stage, cout in enumerate((16, 32, 64)):
        for i in range(n):
            layers.append(_PreActBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
            cin = cout
    layers += [nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), nn.Linear(64, num_classes))


for _depth in (20, 32, 44, 56, 110):
    register(functools.partial(_preresnet, _depth), f"preresnet{_depth}")


class _ResNeXtBlock(nn.Module):
    """1x1 reduce, grouped 3x3 (``cardinality`` groups), 1x1 expand, plus a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, cardinality: int, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, groups=cardinality, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


@register
def resnext29(num_classes: int, in_channels: int, cardinality: int = 8, base_width: int = 64,
              **_) -> nn.Module:
    """ResNeXt-29 (Xie et al., 2017), CIFAR form: 3 stages of 3 blocks, cardinality 8,
    64 channels per group in the first stage, outputs 256/512/1024 (8x64d: 34.4 M parameters)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 3, padding=1, bias=False),
                               nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
    cin = 64
    for stage in range(3):
        cout, width = 256 * 2**stage, cardinality * base_width * 2**stage
        for i in range(3):
            layers.append(_ResNeXtBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, cardinality, width))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), nn.Linear(cin, num_classes))


@register
def densenet121(num_classes: int, in_channels: int, **_) -> nn.Module:
    """DenseNet-121 (torchvision's dense blocks), CIFAR form: 3x3 stem, no initial pooling."""
    from torchvision.models import DenseNet

    net = DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64,
                   num_classes=num_classes)
    net.features.conv0 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
    net.features.pool0 = nn.Identity()
    features = nn.Sequential(net.features, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Classifier(features, net.classifier)


class _InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, depthwise 3x3, 1x1 project; the shortcut is the
    identity, or a 1x1 projection at stride 1 when the width changes (the CIFAR form)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = None
        if stride == 1:
            self.shortcut = (nn.Identity() if cin == cout else
                             nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        out = self.body(x)
        return out if self.shortcut is None else out + self.shortcut(x)


@register
def mobilenetv2(num_classes: int, in_channels: int, **_) -> nn.Module:
    """MobileNetV2, CIFAR form: stride-1 stem and second stage (2.3 M parameters for 10 classes)."""
    # (expansion, output channels, blocks, stride of the first block)
    setting = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1)]
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
                               nn.BatchNorm2d(32), nn.ReLU6(inplace=True)]
    cin = 32
    for expand, cout, blocks, stride in setting:
        for i in range(blocks):
            layers.append(_InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
            cin = cout
    layers += [nn.Conv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True),
               nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), nn.Linear(1280, num_classes))


@register
def shufflenetv2(num_classes: int, in_channels: int, **_) -> nn.Module:
    """ShuffleNetV2 1x (torchvision's blocks), CIFAR form: 3x3 stride-1 stem, no max-pool."""
    from torchvision.models import ShuffleNetV2

    net = ShuffleNetV2([4, 8, 4], [24, 116, 232, 464, 1024], num_classes=num_classes)
    net.conv1[0] = nn.Conv2d(in_channels, 24, 3, stride=1, padding=1, bias=False)
    features = nn.Sequential(net.conv1, net.stage2, net.stage3, net.stage4, net.conv5,
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Classifier(features, net.fc)
