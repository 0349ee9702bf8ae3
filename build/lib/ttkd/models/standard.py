"""Networks built from torchvision's blocks, in CIFAR form: a 3x3 stride-1 stem and no
early pooling, so 32x32 inputs keep their resolution; global average pooling makes them
work for any input from 8x8 up."""

from __future__ import annotations

from torch import nn

from ttkd.models.base import Classifier, register


def _resnet(block, layers: list[int], num_classes: int, in_channels: int) -> nn.Module:
    from torchvision.models.resnet import ResNet

    net = ResNet(block, layers, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    features = nn.Sequential(net.conv1, net.bn1, net.relu, net.layer1, net.layer2, net.layer3,
                             net.layer4, net.avgpool, nn.Flatten())
    return Classifier(features, net.fc, stage_ends=[3, 4, 5, 6])


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


@register
def densenet121(num_classes: int, in_channels: int, **_) -> nn.Module:
    """DenseNet-121 (torchvision's dense blocks), CIFAR form: 3x3 stem, no initial pooling.
    One stage: the last dense block's map, after its ReLU."""
    from torchvision.models import DenseNet

    net = DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64,
                   num_classes=num_classes)
    net.features.conv0 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
    net.features.pool0 = nn.Identity()
    features = nn.Sequential(net.features, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Classifier(features, net.classifier, stage_ends=[1])


@register
def shufflenetv2(num_classes: int, in_channels: int, **_) -> nn.Module:
    """ShuffleNetV2 1x (torchvision's blocks), CIFAR form: 3x3 stride-1 stem, no max-pool."""
    from torchvision.models import ShuffleNetV2

    net = ShuffleNetV2([4, 8, 4], [24, 116, 232, 464, 1024], num_classes=num_classes)
    net.conv1[0] = nn.Conv2d(in_channels, 24, 3, stride=1, padding=1, bias=False)
    features = nn.Sequential(net.conv1, net.stage2, net.stage3, net.stage4, net.conv5,
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Classifier(features, net.fc, stage_ends=[1, 2, 4])
