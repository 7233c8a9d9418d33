"""The CIFAR ResNets of the distillation literature (resnet8 ... resnet110, resnet8x4,
resnet32x4): a 3x3 stem and three stages of basic blocks, global pooling, one linear layer.
Module names and computation follow the CRD benchmark's definitions, so its published
checkpoints load with `strict=True`."""
from __future__ import annotations

from torch import nn

from .taps import GlobalAvgPool, staged_taps


def conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        # Its own module, not in place, so that a hook can read the pre-activation.
        self.relu_out = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu_out(out + residual)


class CifarResNet(nn.Module):
    """depth = 6 k + 2; widths = (stem, stage 1, stage 2, stage 3)."""

    def __init__(self, depth: int, widths=(16, 16, 32, 64), num_classes: int = 100,
                 in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6k + 2, got {depth}")
        blocks = (depth - 2) // 6
        self.in_planes = widths[0]
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[1], blocks, 1)
        self.layer2 = self._make_layer(widths[2], blocks, 2)
        self.layer3 = self._make_layer(widths[3], blocks, 2)
        self.avgpool = GlobalAvgPool()
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_planes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.in_planes, planes, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x))

    def feature_taps(self, preact: bool = False):
        return staged_taps(self.relu, (self.layer1, self.layer2, self.layer3), self.fc, preact)


def _factory(depth, widths):
    def build(num_classes=100, in_channels=3):
        return CifarResNet(depth, widths, num_classes, in_channels)
    return build


MODELS = {f"resnet{d}": _factory(d, (16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)}
MODELS["resnet8x4"] = _factory(8, (32, 64, 128, 256))
MODELS["resnet32x4"] = _factory(32, (32, 64, 128, 256))
