"""Networks with blocks of their own: pre-activation ResNets, ResNeXt-29 and MobileNetV2,
in CIFAR form (3x3 stride-1 stem, no early pooling)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from ttkd.models.base import Classifier, register


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


def preact_resnet(blocks: int, widths: tuple[int, int, int], num_classes: int, in_channels: int,
                  stem: int = 16) -> nn.Module:
    """A 16-channel 3x3 stem, three stages of ``blocks`` pre-activation blocks of
    ``widths`` channels (strides 1, 2, 2), a final BN-ReLU, global average pooling and a
    linear head. Stages: the last block of the first two widths, then the final BN-ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)]
    cin = stem
    ends = []
    for stage, cout in enumerate(widths):
        for i in range(blocks):
            layers.append(_PreActBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
            cin = cout
        ends.append(len(layers) - 1)
    layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    ends[-1] = len(layers) - 3
    return Classifier(nn.Sequential(*layers), nn.Linear(cin, num_classes), ends)


def _preresnet(depth: int, num_classes: int, in_channels: int, **_) -> nn.Module:
    """Pre-activation ResNet for CIFAR (He et al., 2016): depth = 6n + 2, widths 16/32/64
    (PreResNet-20: 0.27 M parameters for 10 classes; PreResNet-110: 1.7 M)."""
    return preact_resnet((depth - 2) // 6, (16, 32, 64), num_classes, in_channels)


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
    ends = []
    for stage in range(3):
        cout, width = 256 * 2**stage, cardinality * base_width * 2**stage
        for i in range(3):
            layers.append(_ResNeXtBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, cardinality, width))
            cin = cout
        ends.append(len(layers) - 1)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), nn.Linear(cin, num_classes), ends)


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
    """MobileNetV2, CIFAR form: stride-1 stem and second stage (2.3 M parameters for 10 classes).
    Stages: the last block before each down-sampling, then the final 1x1 conv's ReLU6."""
    # (expansion, output channels, blocks, stride of the first block)
    setting = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1)]
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
                               nn.BatchNorm2d(32), nn.ReLU6(inplace=True)]
    cin = 32
    ends = []
    for expand, cout, blocks, stride in setting:
        if stride == 2:
            ends.append(len(layers) - 1)
        for i in range(blocks):
            layers.append(_InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
            cin = cout
    layers += [nn.Conv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True),
               nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    ends.append(len(layers) - 3)
    return Classifier(nn.Sequential(*layers), nn.Linear(1280, num_classes), ends)
