"""MobileNet V1 (Howard et al. 2017) at width 1.0 for 224x224 ImageNet inputs, the
"MobileNet" student of the ImageNet distillation literature (ResNet-50 -> MobileNet):
a stride-2 3x3 stem and 13 depthwise-separable blocks, 1024 pooled features, 4.2 M
parameters at 1000 classes. Module names are those of the literature's code
(`model.<i>.<j>`, `fc`), so its checkpoints load."""
from __future__ import annotations

from torch import nn

from .taps import InputOf, OutputOf

# (output channels, stride) of the depthwise-separable blocks
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
          (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
STAGE_ENDS = (3, 5, 11, 13)  # blocks after which the resolution halves next: stage outputs


def conv_bn(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(planes), nn.ReLU(inplace=True))


def conv_dw(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_planes, in_planes, 3, stride, 1, groups=in_planes, bias=False),
        nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True),
        nn.Conv2d(in_planes, planes, 1, bias=False), nn.BatchNorm2d(planes),
        nn.ReLU())  # not in place: its input is a pre-activation feature point


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        layers, channels = [conv_bn(in_channels, 32, 2)], 32
        for planes, stride in BLOCKS:
            layers.append(conv_dw(channels, planes, stride))
            channels = planes
        # The reference pools with AvgPool2d(7), the whole 7x7 map of a 224x224 input.
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.model(x).flatten(1))

    def feature_taps(self, preact: bool = False):
        stages = [self.model[i] for i in STAGE_ENDS]
        stage_taps = [InputOf(s[-1]) if preact else OutputOf(s) for s in stages]
        return [OutputOf(self.model[0]), *stage_taps, InputOf(self.fc)]


MODELS = {"mobilenet_v1": MobileNetV1}
