"""The remaining CIFAR models of the distillation benchmark: ResNet50 (bottleneck blocks,
2048 features), MobileNetV2 (width 0.5, 1280 features), ShuffleV1 (groups 3, 960 features)
and ShuffleV2 (1024 features), each laid out for 32x32 inputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(in_planes, planes, kernel, stride=1, groups=1, relu=True):
    layers = [nn.Conv2d(in_planes, planes, kernel, stride, kernel // 2, groups=groups,
                        bias=False), nn.BatchNorm2d(planes)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ClassifierHead(nn.Module):
    """Global average pooling and the linear classifier (the layer FeatureTap hooks)."""

    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(features, num_classes)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        out = planes * self.expansion
        self.body = nn.Sequential(conv_bn(in_planes, planes, 1), conv_bn(planes, planes, 3, stride),
                                  conv_bn(planes, out, 1, relu=False))
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != out:
            self.shortcut = conv_bn(in_planes, out, 1, stride, relu=False)

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class ResNet50(nn.Module):
    """ResNet-50 layout (3, 4, 6, 3 bottlenecks) with a 3x3 stride-1 stem and no max pool."""

    def __init__(self, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.stem = conv_bn(in_channels, 64, 3)
        stages, in_planes = [], 64
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for b in range(blocks):
                stages.append(Bottleneck(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes * Bottleneck.expansion
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(in_planes, num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class InvertedResidual(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, expand: int):
        super().__init__()
        hidden = in_planes * expand
        self.use_residual = stride == 1 and in_planes == planes
        self.body = nn.Sequential(conv_bn(in_planes, hidden, 1),
                                  conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  conv_bn(hidden, planes, 1, relu=False))

    def forward(self, x):
        out = self.body(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 at width 0.5 (the benchmark's "MobileNetV2"), expansion 6: a stride-2
    stem, then the second stage kept at stride 1 so that 32x32 inputs end at 2x2."""

    # (expansion, channels at width 1, blocks, stride of the first block)
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 100, in_channels: int = 3, width: float = 0.5):
        super().__init__()
        in_planes = int(32 * width)
        layers = [conv_bn(in_channels, in_planes, 3, 2)]
        for expand, channels, blocks, stride in self.SETTING:
            planes = int(channels * width)
            for b in range(blocks):
                layers.append(InvertedResidual(in_planes, planes, stride if b == 0 else 1, expand))
                in_planes = planes
        last = int(1280 * width) if width > 1.0 else 1280
        layers.append(conv_bn(in_planes, last, 1))
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(last, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 conv, channel shuffle, depthwise 3x3, grouped 1x1; a stride-2 block
    concatenates an average-pooled shortcut instead of adding it."""

    def __init__(self, in_planes: int, planes: int, stride: int, groups: int):
        super().__init__()
        self.stride, self.groups = stride, groups
        out = planes - in_planes if stride == 2 else planes
        mid = planes // 4
        first_groups = 1 if in_planes == 24 else groups  # the stem's 24 channels are not grouped
        self.reduce = conv_bn(in_planes, mid, 1, groups=first_groups)
        self.depthwise = conv_bn(mid, mid, 3, stride, groups=mid, relu=False)
        self.expand = conv_bn(mid, out, 1, groups=groups, relu=False)

    def forward(self, x):
        out = self.expand(self.depthwise(channel_shuffle(self.reduce(x), self.groups)))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleV1(nn.Module):
    """ShuffleNet v1, groups 3: stages of 4, 8 and 4 blocks with 240, 480 and 960 channels."""

    def __init__(self, num_classes: int = 100, in_channels: int = 3, groups: int = 3):
        super().__init__()
        self.stem = conv_bn(in_channels, 24, 1)
        blocks, in_planes = [], 24
        for planes, count in ((240, 4), (480, 8), (960, 4)):
            for b in range(count):
                blocks.append(ShuffleV1Block(in_planes, planes, 2 if b == 0 else 1, groups))
                in_planes = planes
        self.stages = nn.Sequential(*blocks)
        self.head = ClassifierHead(in_planes, num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class ShuffleV2Block(nn.Module):
    """Stride 1: half the channels pass through, the other half is transformed. Stride 2:
    both halves see the whole input and downsample (the channel count doubles)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        branch = planes // 2
        branch_in = in_planes if stride == 2 else in_planes // 2
        self.main = nn.Sequential(conv_bn(branch_in, branch, 1),
                                  conv_bn(branch, branch, 3, stride, groups=branch, relu=False),
                                  conv_bn(branch, branch, 1))
        self.side = None
        if stride == 2:
            self.side = nn.Sequential(conv_bn(in_planes, in_planes, 3, 2, groups=in_planes,
                                              relu=False), conv_bn(in_planes, branch, 1))

    def forward(self, x):
        if self.stride == 1:
            keep, change = x.chunk(2, dim=1)
            out = torch.cat([keep, self.main(change)], 1)
        else:
            out = torch.cat([self.side(x), self.main(x)], 1)
        return channel_shuffle(out, 2)


class ShuffleV2(nn.Module):
    """ShuffleNet v2 at 1x: stages of 4, 8 and 4 blocks with 116, 232 and 464 channels, then
    a 1x1 conv to 1024."""

    def __init__(self, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.stem = conv_bn(in_channels, 24, 3)
        blocks, in_planes = [], 24
        for planes, count in ((116, 4), (232, 8), (464, 4)):
            for b in range(count):
                blocks.append(ShuffleV2Block(in_planes, planes, 2 if b == 0 else 1))
                in_planes = planes
        self.stages = nn.Sequential(*blocks)
        self.last = conv_bn(in_planes, 1024, 1)
        self.head = ClassifierHead(1024, num_classes)

    def forward(self, x):
        return self.head(self.last(self.stages(self.stem(x))))


MODELS = {"ResNet50": ResNet50, "MobileNetV2": MobileNetV2, "ShuffleV1": ShuffleV1,
          "ShuffleV2": ShuffleV2}
