"""VGG with batch norm (vgg8 ... vgg19) as the CRD benchmark defines it for CIFAR: five
blocks of 3x3 convolutions, no hidden fully connected layers. At 32x32 the fourth max pool
is skipped, so block 4 runs at the same 4x4 resolution as block 3; the reference applies it
for 64x64 inputs (Tiny-ImageNet), and so does this model for inputs of 64 pixels and more."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from .taps import InputOf, OutputOf

VGG_CONFIGS = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}
FOURTH_POOL_FROM = 64  # input height from which block 4 runs at half block 3's resolution


def make_block(widths, in_channels: int) -> nn.Sequential:
    """conv-bn-ReLU per width, without the last ReLU (the network applies it, so the block's
    output is the stage's pre-activation)."""
    layers = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, depth: int, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        config = VGG_CONFIGS[depth]
        inputs = [in_channels] + [widths[-1] for widths in config[:-1]]
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            make_block(widths, channels) for widths, channels in zip(config, inputs))
        self.pool0, self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(2, 2) for _ in range(4))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(config[-1][-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        height = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if height >= FOURTH_POOL_FROM:
            x = self.pool3(x)
        x = F.relu(self.block4(x))
        return self.classifier(self.pool4(x).flatten(1))

    def feature_taps(self, preact: bool = False):
        """Block 0's activation, each later block's output after its ReLU (`preact`: before
        it), the pooled feature."""
        stages = [self.block1, self.block2, self.block3, self.block4]
        stage_taps = [OutputOf(b) if preact else OutputOf(b, then=F.relu) for b in stages]
        return [OutputOf(self.block0, then=F.relu), *stage_taps, InputOf(self.classifier)]


def _vgg(depth):
    return lambda num_classes=100, in_channels=3: VGG(depth, num_classes, in_channels)


MODELS = {f"vgg{d}": _vgg(d) for d in VGG_CONFIGS}
