"""Model zoo, feature points and penultimate-feature extraction for any classifier.

`build_model(name, num_classes, in_channels)` knows the CIFAR zoo of the distillation
literature (key- and computation-compatible with the CRD benchmark's definitions, so its
published checkpoints and mdistiller's load), MobileNet V1 for ImageNet, with a `tv_`
prefix torchvision's models, and with a `timm_` prefix any model of timm (timm_models.py). `feature_points` returns a model's stem, stage and pooled
features; `FeatureTap` records the penultimate feature of any model whose last layer is an
nn.Linear, by a forward hook: no model needs to be written for distillation.
"""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from . import cifar_resnet, mobilenet_v1, mobilenetv2, resnet50, shufflenet, vgg, wrn
from .points import (FeatureTap, classifier_layer, feature_modules, feature_points, feature_taps,
                     penultimate_tap)
from .timm_models import PREFIX as TIMM_PREFIX, build_timm_model

__all__ = ["build_model", "model_names", "feature_modules", "feature_points", "feature_taps",
           "FeatureTap", "classifier_layer", "penultimate_tap", "CIFAR_MODELS", "IMAGENET_MODELS"]

CIFAR_MODELS: Dict[str, Callable[..., nn.Module]] = {
    **cifar_resnet.MODELS, **resnet50.MODELS, **wrn.MODELS, **vgg.MODELS, **mobilenetv2.MODELS,
    **shufflenet.MODELS}
IMAGENET_MODELS: Dict[str, Callable[..., nn.Module]] = {**mobilenet_v1.MODELS}
TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2")


def model_names():
    return (sorted(CIFAR_MODELS) + sorted(IMAGENET_MODELS)
            + [f"tv_{n}" for n in TORCHVISION_MODELS])


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    own = CIFAR_MODELS.get(name) or IMAGENET_MODELS.get(name)
    if own is not None:
        return own(num_classes=num_classes, in_channels=in_channels)
    if name.startswith("tv_"):
        import torchvision

        if in_channels != 3:
            raise ValueError(f"torchvision models take 3 input channels, got {in_channels}")
        return torchvision.models.get_model(name[3:], weights=None, num_classes=num_classes)
    if name.startswith(TIMM_PREFIX):
        return build_timm_model(name[len(TIMM_PREFIX):], num_classes, in_channels)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(model_names())}, and "
                     f"{TIMM_PREFIX}<name> for any model of timm")
