"""The CIFAR-100 zoo of the KD literature, as the public RepDistiller / mdistiller code
defines it (the pairs of every KD paper's table: resnet32x4 -> resnet8x4, wrn_40_2 ->
wrn_16_2, resnet56 -> resnet20, vgg13 -> vgg8).

- ``resnetN`` (N = 6n + 2): post-activation BasicBlocks (conv-BN-ReLU-conv-BN, add, ReLU),
  a 3x3 stem, three stages at strides 1, 2, 2; widths 16/16/32/64 (stem/stages), or
  32/64/128/256 for the ``x4`` forms.
- ``wrn_D_K``: Wide ResNet (Zagoruyko & Komodakis, 2016): pre-activation blocks,
  n = (D - 4) / 6 per stage, widths 16K/32K/64K after a 16-channel stem.
- ``vggN``: VGG with BN, five blocks of 3x3 convolutions (64/128/256/512/512 channels,
  conv biases kept) with 2x2 max-pools between the first four, global average pooling
  and one linear layer.

Stages are the three stage outputs (ResNet, WRN) or the five blocks (VGG).
"""

from __future__ import annotations

import functools

from torch import nn

from ttkd.models.base import Classifier, register
from ttkd.models.preact import preact_resnet


class _BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the identity (or a 1x1 conv-BN projection), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return (self.body(x) + self.shortcut(x)).relu()


def _init(net: nn.Module) -> nn.Module:
    """He initialisation (fan-out) of every convolution, as the reference code does."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def cifar_resnet(depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int,
                 **_) -> nn.Module:
    n = (depth - 2) // 6
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    cin, ends = widths[0], []
    for stage, cout in enumerate(widths[1:]):
        for i in range(n):
            layers.append(_BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
            cin = cout
        ends.append(len(layers) - 1)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return _init(Classifier(nn.Sequential(*layers), nn.Linear(cin, num_classes), ends))


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register(functools.partial(cifar_resnet, _depth, (16, 16, 32, 64)), f"resnet{_depth}")
for _depth in (8, 32):
    register(functools.partial(cifar_resnet, _depth, (32, 64, 128, 256)), f"resnet{_depth}x4")


def wide_resnet(depth: int, widen: int, num_classes: int, in_channels: int, **_) -> nn.Module:
    return _init(preact_resnet((depth - 4) // 6, (16 * widen, 32 * widen, 64 * widen),
                               num_classes, in_channels))


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    register(functools.partial(wide_resnet, _depth, _widen), f"wrn_{_depth}_{_widen}")


_VGG = {8: [[64], [128], [256], [512], [512]],
        11: [[64], [128], [256, 256], [512, 512], [512, 512]],
        13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]}


def vgg(depth: int, num_classes: int, in_channels: int, image_size: int = 32, **_) -> nn.Module:
    layers: list[nn.Module] = []
    cin, size, ends = in_channels, image_size, []
    for block, widths in enumerate(_VGG[depth]):
        for cout in widths:
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        ends.append(len(layers) - 1)
        # pools after blocks 0-2 always, after block 3 only for 64x64 inputs (as the reference),
        # and never below a 1x1 map
        if (block < 3 or (block == 3 and image_size >= 64)) and size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    net = _init(Classifier(nn.Sequential(*layers), nn.Linear(cin, num_classes), ends))
    nn.init.normal_(net.head.weight, 0, 0.01)
    nn.init.zeros_(net.head.bias)
    return net


for _depth in _VGG:
    register(functools.partial(vgg, _depth), f"vgg{_depth}")
