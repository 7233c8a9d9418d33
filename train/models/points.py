"""Feature points of any zoo model, and the penultimate feature of any classifier.

`feature_points(model, images, preact)` returns the points the distillation methods read
(stem, each stage, pooled feature) together with the logits, from one forward pass with
temporary hooks. Zoo models describe their points with a `feature_taps(preact)` method;
torchvision's ResNets and MobileNetV2 are described here.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from .taps import InputOf, OutputOf, Tap
from .timm_models import is_timm_model, timm_classifier, timm_feature_taps


def _torchvision_resnet_taps(model, preact: bool) -> List[Tap]:
    stages = (model.layer1, model.layer2, model.layer3, model.layer4)
    # A torchvision block calls its ReLU in place two or three times; the last call is the
    # block's final activation, so the last recorded (cloned) input is the pre-activation.
    stage_taps = [InputOf(s[-1].relu, clone=True) if preact else OutputOf(s) for s in stages]
    return [OutputOf(model.relu), *stage_taps, InputOf(model.fc)]


# Blocks of torchvision's MobileNetV2 that end the reference's stages (the groups of 24, 32,
# 96 and 320 channels, as in the CIFAR MobileNetV2); its blocks end without a ReLU.
TORCHVISION_MOBILENET_V2_STAGE_ENDS = (3, 6, 13, 17)


def _torchvision_mobilenet_v2_taps(model, preact: bool) -> List[Tap]:
    stages = [OutputOf(model.features[i]) for i in TORCHVISION_MOBILENET_V2_STAGE_ENDS]
    # The classifier is (Dropout, Linear): its input is the pooled feature before dropout.
    return [OutputOf(model.features[0]), *stages, InputOf(model.classifier)]


def _torchvision_taps() -> Dict[type, Callable[[nn.Module, bool], List[Tap]]]:
    import torchvision

    return {torchvision.models.ResNet: _torchvision_resnet_taps,
            torchvision.models.MobileNetV2: _torchvision_mobilenet_v2_taps}


def feature_taps(model: nn.Module, preact: bool = False) -> List[Tap]:
    """Where `model`'s feature points are: stem, stages, pooled feature. A DataParallel or
    DistributedDataParallel wrapper is looked through (its forward still runs the hooks)."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    if hasattr(model, "feature_taps"):
        return model.feature_taps(preact)
    if is_timm_model(model):
        return timm_feature_taps(model, preact)
    describe = _torchvision_taps().get(type(model))
    if describe is None:
        raise ValueError(f"no feature points are known for {type(model).__name__}; zoo models, "
                         f"torchvision's ResNet and MobileNetV2 and timm's convolutional "
                         f"networks have them")
    return describe(model, preact)


def feature_points(model: nn.Module, images: torch.Tensor, preact: bool = False
                   ) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """(features, logits) of one forward pass of `images`: the stem's output after its ReLU,
    each stage's output after its ReLU (with `preact`, before the stage's final ReLU, as AB
    reads them), and the pooled penultimate feature (the classifier's input). Gradients flow
    through the features. Where a reference network places a point differently (a wide
    ResNet's pre-activation stages, VGG's block 0), the point is the reference's."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"feature_points expects images of shape (N, C, H, W), got {shape}")
    taps = feature_taps(model, preact)
    values: List[torch.Tensor | None] = [None] * len(taps)
    handles = []

    def deliver_to(slot):
        def deliver(value):
            values[slot] = value
        return deliver

    try:
        for slot, tap in enumerate(taps):
            handles += tap.attach(deliver_to(slot))
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    missing = [slot for slot, value in enumerate(values) if value is None]
    if missing:
        raise RuntimeError(f"{type(model).__name__}: feature points {missing} were not reached "
                           f"by the forward pass")
    return values, logits


def feature_modules(model: nn.Module) -> List[nn.Module]:
    """The student modules that a two-stage method's initialisation stage trains: what the
    CRD benchmark's get_feat_modules() lists for the architecture. A model names them in
    `feature_module_names` where the reference leaves out more than the classifier (a WRN's
    final bn1, MobileNetV2's and ShuffleV2's last convolution); otherwise they are its
    top-level modules other than the one holding the classifier."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    names = getattr(model, "feature_module_names", None)
    if names is not None:
        return [getattr(model, name) for name in names]
    head = classifier_layer(model)
    return [child for child in model.children()
            if not any(m is head for m in child.modules())]


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The model's final nn.Linear (the last one registered), whatever it is called; for a
    timm model, the layer timm names its classifier."""
    if is_timm_model(model):
        return timm_classifier(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to tap")
    return linears[-1]


def penultimate_tap(model: nn.Module) -> InputOf:
    """The classifier's input, taken before the dropout layers that directly precede the
    classifier in its Sequential (torchvision's MobileNets, EfficientNets, VGG): the feature
    itself, not a noisy copy of it."""
    linear = classifier_layer(model)
    for parent in model.modules():
        if isinstance(parent, nn.Sequential) and any(m is linear for m in parent):
            children = list(parent)
            first = next(i for i, m in enumerate(children) if m is linear)
            while first > 0 and isinstance(children[first - 1], nn.Dropout):
                first -= 1
            # An in-place dropout (EfficientNet's, MobileNetV3's) would overwrite the
            # recorded feature after the hook: keep a copy.
            overwritten = any(getattr(m, "inplace", False) for m in children[first:]
                              if isinstance(m, nn.Dropout))
            return InputOf(children[first], clone=overwritten)
    return InputOf(linear)


class FeatureTap:
    """Records the penultimate feature of a model on every forward: `tap.features`."""

    def __init__(self, model: nn.Module):
        self.layer = classifier_layer(model)
        self.features: torch.Tensor | None = None
        self._handles = penultimate_tap(model).attach(self._record)

    def _record(self, features):
        self.features = features

    @property
    def dim(self) -> int:
        return self.layer.in_features

    def remove(self):
        for handle in self._handles:
            handle.remove()
