"""OFD: "A Comprehensive Overhaul of Feature Distillation" (Heo et al., ICCV 2019).

Follows mdistiller's OFD (megvii-research/mdistiller, distillers/OFD.py, its defaults CE 1.0
and feature weight 0.001), which computes the same loss as the authors' code
(clovaai/overhaul-distillation, CIFAR-100/distiller.py: a masked MSE against max(t, m), summed
and divided by the batch size and by 1000 in its training loop):

- points: each stage's output before its final ReLU (`feature_points(..., preact=True)`, stem
  and pooled feature left out), teacher and student lists cut to their common last n;
- margins: per teacher channel, the expectation of the negative part of the pre-ReLU response
  modelled as N(m, s^2) from the batch norm that produces it (s = |weight|, m = bias):
  m - s pdf(m/s) / cdf(-m/s), or -3 s where cdf(-m/s) <= 0.001; rounded to float32 as the
  reference stores them;
- connectors: per stage a 1x1 convolution (student to teacher channels, no bias) then batch
  norm, trained with the student;
- the partial L2 loss per element (t teacher, x connector output, teacher map average-pooled
  to the connector's size): (x - t)^2 where t > 0 or (m < t <= 0 and x > t); (x - m)^2 where
  t <= m and x > m; else 0. Summed over C, H, W, averaged over the batch; stage i of n
  weighted 1 / 2^(n-1-i).

Teacher batch norm: both references train with the teacher in train mode (mdistiller's
`OFD.train()` sets every child to train mode; the official loop calls `t_net.train()`), so the
teacher's points use batch statistics and its running statistics move during distillation.
`teacher_bn="train"` (the default) reproduces that; `teacher_bn="eval"` keeps the teacher in
eval mode like every other method here.

Extension beyond the reference: mdistiller cannot run OFD on MobileNetV2 and ShuffleNet
students (its MobileNetV2 returns no pre-activation points, its ShuffleNets no stage
channels), although the later ICD paper reports those cells. Here the student's points are
whatever `feature_points(preact=True)` returns and the channels are read from an example
batch, so any zoo student works: MobileNetV2's stages end in a linear bottleneck (batch norm,
no ReLU), whose output is taken as its pre-activation point; ShuffleNets give the input of
their last block's final ReLU. Only the teacher needs a known architecture: the batch norms
that set its margins are listed per model type in `TEACHER_MARGIN_NORMS`.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models import feature_points
from ..models.cifar_resnet import CifarResNet
from ..models.mobilenet_v1 import STAGE_ENDS as MOBILENET_V1_STAGE_ENDS, MobileNetV1
from ..models.resnet50 import ResNet50
from ..models.vgg import VGG
from ..models.wrn import WideResNet
from . import Distiller, kd_loss, register
from .feature_methods import example_features


def _last_norm_of_each_stage(stages) -> List[nn.BatchNorm2d]:
    """The last batch norm of each stage's last block (a ResNet block's bn2 or bn3): the
    residual branch's response before the block's final ReLU, as the reference reads it."""
    norms = []
    for stage in stages:
        block_norms = [m for m in stage[-1].children() if isinstance(m, nn.BatchNorm2d)]
        norms.append(block_norms[-1])
    return norms


def _torchvision_resnet_norms(model) -> List[nn.BatchNorm2d]:
    return _last_norm_of_each_stage((model.layer1, model.layer2, model.layer3, model.layer4))


def _torchvision_norm_registry() -> Dict[type, Callable[[nn.Module], List[nn.BatchNorm2d]]]:
    import torchvision

    return {torchvision.models.ResNet: _torchvision_resnet_norms}


# Per teacher architecture: the batch norm behind each stage's pre-ReLU point (the
# reference's get_bn_before_relu()).
TEACHER_MARGIN_NORMS: Dict[type, Callable[[nn.Module], List[nn.BatchNorm2d]]] = {
    CifarResNet: lambda m: _last_norm_of_each_stage((m.layer1, m.layer2, m.layer3)),
    ResNet50: lambda m: _last_norm_of_each_stage((m.layer1, m.layer2, m.layer3, m.layer4)),
    WideResNet: lambda m: [m.block2.layer[0].bn1, m.block3.layer[0].bn1, m.bn1],
    VGG: lambda m: [m.block1[-1], m.block2[-1], m.block3[-1], m.block4[-1]],
    MobileNetV1: lambda m: [m.model[i][-2] for i in MOBILENET_V1_STAGE_ENDS],
}


def teacher_margin_norms(teacher: nn.Module) -> List[nn.BatchNorm2d]:
    if isinstance(teacher, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        teacher = teacher.module
    registry = {**TEACHER_MARGIN_NORMS, **_torchvision_norm_registry()}
    describe = registry.get(type(teacher))
    if describe is None:
        known = ", ".join(sorted(t.__name__ for t in registry))
        raise ValueError(f"OFD takes its margins from the teacher's batch norms before its "
                         f"stage ReLUs; they are not known for a {type(teacher).__name__} "
                         f"teacher (known: {known})")
    return describe(teacher)


def margins_from_batch_norm(norm: nn.BatchNorm2d) -> torch.Tensor:
    """Per channel, E[x | x < 0] of x ~ N(bias, weight^2): m - s pdf(m/s) / cdf(-m/s), or -3 s
    where cdf(-m/s) <= 0.001 (float64, then float32 as the reference stores it)."""
    s = norm.weight.detach().double().abs().cpu()
    m = norm.bias.detach().double().cpu()
    tail = torch.special.ndtr(-m / s)
    density = torch.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi)
    margin = torch.where(tail > 0.001, m - s * density / tail, -3 * s)
    return margin.float()


def overhaul_stage_loss(source: torch.Tensor, target: torch.Tensor,
                        margin: torch.Tensor) -> torch.Tensor:
    """The partial L2 distance of one stage, summed over C, H, W and averaged over the batch;
    `margin` is (C,). Computed in at least fp32 (the sums run over whole feature maps)."""
    dtype = torch.promote_types(source.dtype, torch.float32)
    source, target = source.to(dtype), target.to(dtype)
    margin = margin.to(device=source.device, dtype=dtype).view(1, -1, 1, 1)
    # The teacher's response is kept where positive; at or below zero only its sign matters
    # (anything under the margin counts as the margin), and a student below it is not pushed.
    to_teacher = (target > 0) | ((target > margin) & (source > target))
    to_margin = (target <= margin) & (source > margin)
    squared = ((source - target) ** 2 * to_teacher + (source - margin) ** 2 * to_margin)
    return squared.sum() / source.shape[0]


class OverhaulLoss(nn.Module):
    """Connectors and margins of OFD; `stage_losses(student_points, teacher_points)` gives the
    per-stage values, `forward` their weighted sum (before the loss weight)."""

    def __init__(self, student_channels: List[int], teacher_channels: List[int],
                 margins: List[torch.Tensor], kernel_size: int = 1):
        super().__init__()
        self.connectors = nn.ModuleList(
            self._connector(s, t, kernel_size) for s, t in zip(student_channels, teacher_channels))
        for i, margin in enumerate(margins):
            self.register_buffer(f"margin{i}", margin)

    @staticmethod
    def _connector(s_channels: int, t_channels: int, kernel_size: int) -> nn.Sequential:
        conv = nn.Conv2d(s_channels, t_channels, kernel_size, 1, (kernel_size - 1) // 2,
                         bias=False)
        n = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
        nn.init.normal_(conv.weight, 0, math.sqrt(2.0 / n))
        return nn.Sequential(conv, nn.BatchNorm2d(t_channels))

    @property
    def num_stages(self) -> int:
        return len(self.connectors)

    def margins(self) -> List[torch.Tensor]:
        return [getattr(self, f"margin{i}") for i in range(self.num_stages)]

    def stage_factors(self) -> List[float]:
        n = self.num_stages
        return [1.0 / 2 ** (n - 1 - i) for i in range(n)]

    def stage_losses(self, student_points, teacher_points) -> List[torch.Tensor]:
        losses = []
        for connector, margin, s, t in zip(self.connectors, self.margins(), student_points,
                                           teacher_points):
            x = connector(s)
            target = F.adaptive_avg_pool2d(t, x.shape[-2:]).detach()
            losses.append(overhaul_stage_loss(x, target, margin))
        return losses

    def forward(self, student_points, teacher_points) -> torch.Tensor:
        return sum(f * loss for f, loss in zip(self.stage_factors(),
                                               self.stage_losses(student_points, teacher_points)))


def stage_points(points: List[torch.Tensor], count: Optional[int] = None) -> List[torch.Tensor]:
    """The stage points of a `feature_points` list (stem and pooled feature dropped), the last
    `count` of them."""
    stages = points[1:-1]
    return stages if count is None else stages[len(stages) - count:]


TEACHER_BN_MODES = ("train", "eval")


@register("ofd")
class OFD(Distiller):
    """gamma CE + beta OFD [+ lam KD_T]: gamma 1, beta 0.001 (mdistiller's CE and feature
    weights); the connectors train with the student. See the module's docstring for the
    points, margins and the teacher's batch-norm mode."""

    needs_example_images = True

    def __init__(self, student, teacher, example_images: Optional[torch.Tensor] = None,
                 gamma=1.0, beta=0.001, lam=0.0, temperature=4.0, teacher_bn="train"):
        super().__init__(student, teacher)
        if example_images is None or example_images.dim() != 4:
            raise ValueError(f"method 'ofd' sizes its connectors from example images "
                             f"(N, C, H, W); got "
                             f"{None if example_images is None else tuple(example_images.shape)}")
        if teacher_bn not in TEACHER_BN_MODES:
            raise ValueError(f"teacher_bn must be one of {TEACHER_BN_MODES}, got {teacher_bn!r}")
        self.gamma, self.beta, self.lam, self.temperature = gamma, beta, lam, temperature
        self.teacher_bn = teacher_bn
        s_points = stage_points(example_features(student, example_images, preact=True))
        t_points = stage_points(example_features(teacher, example_images, preact=True))
        norms = teacher_margin_norms(teacher)
        if len(norms) != len(t_points) or any(
                n.num_features != p.shape[1] for n, p in zip(norms, t_points)):
            raise ValueError(f"OFD: the teacher's margin batch norms "
                             f"{[n.num_features for n in norms]} do not match its stage points "
                             f"{[p.shape[1] for p in t_points]}")
        if any(p.dim() != 4 for p in s_points + t_points):
            raise ValueError("OFD needs (N, C, H, W) stage points from both networks")
        self.num_stages = min(len(s_points), len(t_points))
        teacher_stages = t_points[len(t_points) - self.num_stages:]
        self.criterion = OverhaulLoss(
            [p.shape[1] for p in s_points[len(s_points) - self.num_stages:]],
            [p.shape[1] for p in teacher_stages],
            [margins_from_batch_norm(n) for n in norms[len(norms) - self.num_stages:]])

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher_bn == "train":
            self.teacher.train(mode)  # as both references train
        return self

    def stage_losses(self, images):
        """(per-stage OFD losses before their stage factors and weight, student logits,
        teacher logits)."""
        with torch.no_grad():
            t_points, t_logits = feature_points(self.teacher, images, preact=True)
        s_points, logits = feature_points(self.student, images, preact=True)
        losses = self.criterion.stage_losses(stage_points(s_points, self.num_stages),
                                             stage_points(t_points, self.num_stages))
        return losses, logits, t_logits

    def forward(self, images, labels, indices=None):
        stage_values, logits, t_logits = self.stage_losses(images)
        ofd = sum(f * v for f, v in zip(self.criterion.stage_factors(), stage_values))
        losses = {"ce": self.gamma * F.cross_entropy(logits, labels), "ofd": self.beta * ofd}
        if self.lam:
            losses["kd"] = self.lam * kd_loss(logits, t_logits, self.temperature)
        return logits, losses


__all__ = ["OFD", "OverhaulLoss", "TEACHER_MARGIN_NORMS", "margins_from_batch_norm",
           "overhaul_stage_loss", "teacher_margin_norms"]
