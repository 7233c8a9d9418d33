"""timm's models by name: `timm_<name>` is `timm.create_model(<name>)`, any name timm knows.

They are built untrained (`pretrained=False`: weights come from a checkpoint file, read by
train.checkpoints like any other) with timm's default `drop_rate` of 0, so nothing stands
between the pooled feature and the classifier: the penultimate feature the distillers tap,
the classifier's input, is exactly what timm's `forward_head(x, pre_logits=True)` returns.
Models that timm pins to one input size (ViTs and their kin) are built with
`dynamic_img_size=True`, so that they take the data set's images (32x32 on CIFAR).

Feature points for the feature-based methods are the modules timm's `features_only`
interface reads (`model.feature_info`: the stem and each stage), then the pooled feature.
Models whose points are not feature maps (a ViT's blocks give token sequences) and the
pre-activation points that AB reads are refused with a message saying so.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from .taps import InputOf, OutputOf, Tap

PREFIX = "timm_"


def _timm():
    try:
        import timm
    except ImportError as error:
        raise ValueError("timm_<name> models need timm: pip install timm (it is part of the "
                         "[train] extra)") from error
    return timm


def build_timm_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """timm's model `name` (without the timm_ prefix), untrained, for num_classes classes
    and in_channels input channels."""
    timm = _timm()
    architecture = name.split(".", 1)[0]  # timm's names may carry a weight tag: name.tag
    if not timm.is_model(architecture):
        raise ValueError(f"unknown model {PREFIX + name!r}: timm {timm.__version__} has no model "
                         f"{architecture!r} (timm.list_models() lists them)")
    options = dict(pretrained=False, num_classes=num_classes, in_chans=in_channels)
    if timm.models.get_pretrained_cfg_value(architecture, "fixed_input_size"):
        options["dynamic_img_size"] = True
    return timm.create_model(name, **options)


def is_timm_model(model: nn.Module) -> bool:
    """A model with timm's classifier interface (get_classifier, forward_head)."""
    return (callable(getattr(model, "get_classifier", None))
            and callable(getattr(model, "forward_head", None)))


def timm_classifier(model: nn.Module) -> nn.Linear:
    """The layer timm calls the model's classifier; its input is forward_head's pre-logits."""
    classifier = model.get_classifier()
    if not isinstance(classifier, nn.Linear):
        raise ValueError(f"timm model {type(model).__name__}'s classifier is a "
                         f"{type(classifier).__name__}, not an nn.Linear, so its penultimate "
                         f"feature cannot be tapped (a model built with num_classes=0, or one "
                         f"with a convolutional or two-headed classifier)")
    return classifier


def _feature_map(model_name: str, point: str):
    def check(value: torch.Tensor) -> torch.Tensor:
        if value.dim() != 4:
            raise ValueError(
                f"timm model {model_name}: feature point {point!r} gives a tensor of shape "
                f"{tuple(value.shape)}, not a feature map (N, C, H, W); the feature-based "
                f"methods need a convolutional network (kd, icd, icd_kd and crd work with "
                f"any timm model)")
        return value
    return check


def timm_feature_taps(model: nn.Module, preact: bool = False) -> List[Tap]:
    """The points of timm's features_only interface (model.feature_info: stem and stages),
    then the classifier's input."""
    name = type(model).__name__
    if preact:
        raise ValueError(f"timm model {name}: the pre-activation stage outputs that AB reads "
                         f"are not defined for timm models")
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"timm model {name} declares no feature_info (timm's features_only "
                         f"points), so the feature-based methods cannot read it")
    points = [entry["module"] for entry in info]
    taps: List[Tap] = [OutputOf(model.get_submodule(p), then=_feature_map(name, p))
                       for p in points]
    return [*taps, InputOf(timm_classifier(model))]
