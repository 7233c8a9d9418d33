"""The CIFAR ResNets of the distillation literature (resnet8 ... resnet110, resnet8x4,
resnet32x4): three stages of basic blocks on 32x32 inputs, global pooling, one linear layer."""
from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """depth = 6 k + 2 basic-block layers; widths (stem, stage1, stage2, stage3)."""

    def __init__(self, depth: int, widths=(16, 16, 32, 64), num_classes: int = 100,
                 in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6k + 2, got {depth}")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, in_planes = [], widths[0]
        for stage, planes in enumerate(widths[1:]):
            layers = []
            for b in range(blocks):
                layers.append(BasicBlock(in_planes, planes, 2 if (b == 0 and stage > 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.pool(self.stages(self.stem(x))).flatten(1)
        return self.fc(x)


def _factory(depth, widths):
    def build(num_classes=100, in_channels=3):
        return CifarResNet(depth, widths, num_classes, in_channels)
    return build


MODELS = {f"resnet{d}": _factory(d, (16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)}
MODELS["resnet8x4"] = _factory(8, (32, 64, 128, 256))
MODELS["resnet32x4"] = _factory(32, (32, 64, 128, 256))
