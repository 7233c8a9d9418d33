"""Wide ResNets (wrn_d_k) for 32x32 inputs: pre-activation blocks, a plain 3x3 stem,
batch norm and ReLU after the last stage. Module names follow the CRD benchmark's
definition (`block1.layer.0.bn1`, `convShortcut`, ...)."""
from __future__ import annotations

import math

from torch import nn

from .taps import GlobalAvgPool, InputOf, OutputOf


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        # Not in place: bn1's output is the stage's pre-activation feature point.
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == planes
        self.convShortcut = (None if self.equal_in_out
                             else nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        # A block that changes the width projects the activated input, the others add the
        # raw input.
        shortcut = x if self.equal_in_out else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    def __init__(self, blocks: int, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(in_planes if b == 0 else planes, planes,
                                               stride if b == 0 else 1)
                                     for b in range(blocks)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    # The reference's get_feat_modules(): the final bn1 before the head is not among them.
    feature_module_names = ("conv1", "block1", "block2", "block3")

    def __init__(self, depth: int, widen: int, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"wide ResNet depth must be 6k + 4, got {depth}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(blocks, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(blocks, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(blocks, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()  # not in place: bn1's output is the last pre-activation point
        self.avgpool = GlobalAvgPool()
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.avgpool(self.relu(self.bn1(x))))

    def feature_taps(self, preact: bool = False):
        """The reference points of a pre-activation network: the stem convolution's output,
        each stage's output (the residual sum; with `preact`, that sum after the batch norm
        that the next stage or the head applies before its ReLU), the pooled feature."""
        if preact:
            stages = [OutputOf(self.block2.layer[0].bn1), OutputOf(self.block3.layer[0].bn1),
                      OutputOf(self.bn1)]
        else:
            stages = [OutputOf(self.block1), OutputOf(self.block2), OutputOf(self.block3)]
        return [OutputOf(self.conv1), *stages, InputOf(self.fc)]


def _wrn(depth, widen):
    return lambda num_classes=100, in_channels=3: WideResNet(depth, widen, num_classes, in_channels)


MODELS = {"wrn_16_1": _wrn(16, 1), "wrn_16_2": _wrn(16, 2), "wrn_40_1": _wrn(40, 1),
          "wrn_40_2": _wrn(40, 2)}
