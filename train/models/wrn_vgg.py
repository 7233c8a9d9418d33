"""Wide ResNets (wrn_d_k) and VGG (vgg8 ... vgg19, batch norm) for 32x32 inputs."""
from __future__ import annotations

from torch import nn


class WideBlock(nn.Module):
    """Pre-activation block of a wide ResNet."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"wide ResNet depth must be 6k + 4, got {depth}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
        in_planes = widths[0]
        for stage, planes in enumerate(widths[1:]):
            for b in range(blocks):
                layers.append(WideBlock(in_planes, planes, 2 if (b == 0 and stage > 0) else 1))
                in_planes = planes
        layers += [nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


VGG_CONFIGS = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


class VGG(nn.Module):
    def __init__(self, depth: int, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        layers, channels = [], in_channels
        for stage, widths in enumerate(VGG_CONFIGS[depth]):
            for width in widths:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                channels = width
            # Four 2x poolings take 32x32 to 2x2; the last stage is pooled globally.
            layers.append(nn.MaxPool2d(2) if stage < 4 else nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def _wrn(depth, widen):
    return lambda num_classes=100, in_channels=3: WideResNet(depth, widen, num_classes, in_channels)


def _vgg(depth):
    return lambda num_classes=100, in_channels=3: VGG(depth, num_classes, in_channels)


MODELS = {"wrn_16_1": _wrn(16, 1), "wrn_16_2": _wrn(16, 2), "wrn_40_1": _wrn(40, 1),
          "wrn_40_2": _wrn(40, 2)}
MODELS.update({f"vgg{d}": _vgg(d) for d in VGG_CONFIGS})
