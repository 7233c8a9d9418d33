"""The CIFAR "MobileNetV2" of the distillation benchmark (its `mobile_half`): width 0.5,
expansion 6, a stride-2 stem and a stride-1 second group, so that 32x32 inputs end at 2x2,
then a 1x1 convolution to 1280 features. Module names follow the CRD benchmark's definition
(`conv1`, `blocks.<group>.<block>.conv.<i>`, `conv2`, `classifier.0`)."""
from __future__ import annotations

import math

from torch import nn

from .taps import GlobalAvgPool, InputOf, OutputOf


def conv_bn_relu(in_planes: int, planes: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_planes, planes, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(planes), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, expand: int):
        super().__init__()
        hidden = in_planes * expand
        self.use_residual = stride == 1 and in_planes == planes
        self.conv = nn.Sequential(
            nn.Conv2d(in_planes, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, planes, 1, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    # The reference's get_feat_modules(): the final 1x1 convolution conv2 is not among them.
    feature_module_names = ("conv1", "blocks")
    # (expansion, channels at width 1, blocks, stride of the first block): one group each
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1))
    # Groups whose outputs are the reference's stage feature points.
    STAGE_GROUPS = (1, 2, 4, 6)

    def __init__(self, num_classes: int = 100, in_channels: int = 3, width: float = 0.5):
        super().__init__()
        in_planes = int(32 * width)
        self.conv1 = conv_bn_relu(in_channels, in_planes, 3, 2)
        self.blocks = nn.ModuleList()
        for expand, channels, count, stride in self.SETTING:
            planes = int(channels * width)
            group = []
            for b in range(count):
                group.append(InvertedResidual(in_planes, planes, stride if b == 0 else 1, expand))
                in_planes = planes
            self.blocks.append(nn.Sequential(*group))
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = conv_bn_relu(in_planes, last, 1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        self.avgpool = GlobalAvgPool()  # the reference: AvgPool2d(2, ceil_mode=True) at 32x32
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        return self.classifier(self.avgpool(self.conv2(x)))

    def feature_taps(self, preact: bool = False):
        """The stem's activation, the outputs of groups 1, 2, 4 and 6 (linear bottlenecks:
        no ReLU follows them, so `preact` changes nothing), the pooled feature."""
        stages = [OutputOf(self.blocks[g]) for g in self.STAGE_GROUPS]
        return [OutputOf(self.conv1), *stages, InputOf(self.classifier)]


MODELS = {"MobileNetV2": MobileNetV2}
