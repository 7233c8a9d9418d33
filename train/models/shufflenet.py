"""ShuffleNet v1 (groups 3, stages of 240/480/960 channels) and v2 (1x: 116/232/464, then
1024) as the CRD benchmark defines them for CIFAR: a 1x1 stem without downsampling, three
stages that each start at stride 2, so 32x32 inputs end at 4x4. Module names follow the
reference (`conv1`, `layer1.0.conv1`, `linear`, ...)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .taps import GlobalAvgPool, InputOf, OutputOf, Tap, staged_taps


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1, shuffle, depthwise 3x3, grouped 1x1. A stride-2 block concatenates an
    average-pooled shortcut (so its branch makes `planes` minus the input's channels)."""

    def __init__(self, in_planes: int, planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = planes // 4
        first_groups = 1 if in_planes == 24 else groups  # the stem's 24 channels: not grouped
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))
        self.relu_out = nn.ReLU()

    def forward(self, x):
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        joined = torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut
        return self.relu_out(joined)


class ShuffleV1(nn.Module):
    def __init__(self, num_classes: int = 100, in_channels: int = 3, groups: int = 3,
                 widths=(240, 480, 960), blocks=(4, 8, 4)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU(inplace=True)
        self.in_planes = 24
        self.layer1 = self._make_layer(widths[0], blocks[0], groups)
        self.layer2 = self._make_layer(widths[1], blocks[1], groups)
        self.layer3 = self._make_layer(widths[2], blocks[2], groups)
        self.avgpool = GlobalAvgPool()  # the reference: avg_pool2d(4) at 32x32
        self.linear = nn.Linear(widths[2], num_classes)

    def _make_layer(self, planes: int, count: int, groups: int) -> nn.Sequential:
        layers = []
        for b in range(count):
            concatenated = self.in_planes if b == 0 else 0
            layers.append(ShuffleV1Block(self.in_planes, planes - concatenated,
                                         2 if b == 0 else 1, groups))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.avgpool(x))

    def feature_taps(self, preact: bool = False):
        return staged_taps(self.relu, (self.layer1, self.layer2, self.layer3), self.linear,
                           preact)


class ShuffleV2Block(nn.Module):
    """Half the channels pass through, the other half goes through 1x1, depthwise 3x3, 1x1;
    the halves are concatenated and shuffled."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.shuffle = ChannelShuffle(2)
        self.relu_out = nn.ReLU()

    def forward(self, x):
        kept, changed = x.split(x.shape[1] // 2, dim=1)
        out = F.relu(self.bn1(self.conv1(changed)))
        out = self.bn2(self.conv2(out))
        out = self.relu_out(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([kept, out], 1))


class ShuffleV2Down(nn.Module):
    """Stride 2: both branches see the whole input; the channel count becomes `planes`."""

    def __init__(self, in_planes: int, planes: int):
        super().__init__()
        mid = planes // 2
        self.conv1 = nn.Conv2d(in_planes, in_planes, 3, 2, 1, groups=in_planes, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv2 = nn.Conv2d(in_planes, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_planes, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleV2Preactivation(Tap):
    """The pre-activation of a stage's last ShuffleV2 block, as the reference returns it:
    the passed-through half concatenated with the branch before its final ReLU, unshuffled."""

    def __init__(self, block: ShuffleV2Block):
        self.block = block

    def attach(self, deliver):
        kept = {}

        def record_input(module, inputs):
            x = inputs[0]
            kept["half"] = x[:, :x.shape[1] // 2]

        def deliver_joined(module, inputs):
            deliver(torch.cat([kept.pop("half"), inputs[0]], 1))

        return [self.block.register_forward_pre_hook(record_input),
                self.block.relu_out.register_forward_pre_hook(deliver_joined)]


class ShuffleV2(nn.Module):
    # The reference's get_feat_modules(): the final conv2 and bn2 are not among them.
    feature_module_names = ("conv1", "bn1", "layer1", "layer2", "layer3")

    def __init__(self, num_classes: int = 100, in_channels: int = 3,
                 widths=(116, 232, 464, 1024), blocks=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU(inplace=True)
        self.in_planes = 24
        self.layer1 = self._make_layer(widths[0], blocks[0])
        self.layer2 = self._make_layer(widths[1], blocks[1])
        self.layer3 = self._make_layer(widths[2], blocks[2])
        self.conv2 = nn.Conv2d(widths[2], widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.avgpool = GlobalAvgPool()  # the reference: avg_pool2d(4) at 32x32
        self.linear = nn.Linear(widths[3], num_classes)

    def _make_layer(self, planes: int, count: int) -> nn.Sequential:
        """A downsampling block, then `count` blocks (the reference's layout)."""
        layers = [ShuffleV2Down(self.in_planes, planes)]
        layers += [ShuffleV2Block(planes) for _ in range(count)]
        self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(self.avgpool(x))

    def feature_taps(self, preact: bool = False):
        stages = (self.layer1, self.layer2, self.layer3)
        stage_taps = [ShuffleV2Preactivation(s[-1]) if preact else OutputOf(s) for s in stages]
        return [OutputOf(self.relu), *stage_taps, InputOf(self.linear)]


MODELS = {"ShuffleV1": ShuffleV1, "ShuffleV2": ShuffleV2}
