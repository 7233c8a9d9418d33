"""Model zoo and penultimate-feature extraction for any classifier.

`build_model(name, num_classes)` knows the CIFAR zoo of the distillation literature (this
package) and, with a `tv_` prefix or for ImageNet names, torchvision's models.
`FeatureTap` takes the penultimate features of any model whose last layer is an nn.Linear
(the input of that layer), by a forward hook: no model needs to be written for distillation.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

from . import cifar_mobile, cifar_resnet, wrn_vgg

CIFAR_MODELS: Dict[str, Callable[..., nn.Module]] = {**cifar_resnet.MODELS, **wrn_vgg.MODELS,
                                                     **cifar_mobile.MODELS}
TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2")


def model_names():
    return sorted(CIFAR_MODELS) + [f"tv_{n}" for n in TORCHVISION_MODELS]


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    if name in CIFAR_MODELS:
        return CIFAR_MODELS[name](num_classes=num_classes, in_channels=in_channels)
    if name.startswith("tv_"):
        import torchvision

        if in_channels != 3:
            raise ValueError(f"torchvision models take 3 input channels, got {in_channels}")
        return torchvision.models.get_model(name[3:], weights=None, num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(model_names())}")


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The model's final nn.Linear (the last one registered), whatever it is called."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to tap")
    return linears[-1]


class FeatureTap:
    """Records the input of a model's classifier on every forward: `tap.features`."""

    def __init__(self, model: nn.Module):
        self.layer = classifier_layer(model)
        self.features: torch.Tensor | None = None
        self._handle = self.layer.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        self.features = inputs[0]

    @property
    def dim(self) -> int:
        return self.layer.in_features

    def remove(self):
        self._handle.remove()
