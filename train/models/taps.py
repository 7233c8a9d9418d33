"""Feature points inside a network, taken by temporary forward hooks.

A model describes where its points are (`feature_taps(preact)`: a list of taps); the hooks
exist only while `train.models.feature_points` runs, so an ordinary forward pays nothing.
A tap delivers the value every time its module runs; the last delivery wins, which is what a
module that a block calls several times (torchvision's shared ReLU) needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

Deliver = Callable[[torch.Tensor], None]


class Tap:
    def attach(self, deliver: Deliver) -> list:
        """Registers hooks that pass the point's value to `deliver`; returns their handles."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class OutputOf(Tap):
    """The output of `module`, optionally transformed by `then` (e.g. the ReLU a network
    applies functionally right after it)."""
    module: nn.Module
    then: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def attach(self, deliver):
        then = self.then or (lambda x: x)
        return [self.module.register_forward_hook(lambda m, i, out: deliver(then(out)))]


@dataclass(frozen=True, eq=False)
class InputOf(Tap):
    """The first input of `module`: the classifier's input is the pooled feature, a final
    ReLU's input is the pre-activation. `clone` keeps the value when the module is an
    in-place ReLU that would overwrite it."""
    module: nn.Module
    clone: bool = False

    def attach(self, deliver):
        def record(module, inputs):
            deliver(inputs[0].clone() if self.clone else inputs[0])
        return [self.module.register_forward_pre_hook(record)]


def staged_taps(stem_activation: nn.Module, stages: Sequence[nn.Sequential],
                classifier: nn.Module, preact: bool) -> List[Tap]:
    """Points of a network whose stages end in blocks with a `relu_out` module (the block's
    final activation): the stem's activation, each stage's output (with `preact`, the input
    of its last block's `relu_out`), and the classifier's input."""
    stage_taps = [InputOf(stage[-1].relu_out) if preact else OutputOf(stage) for stage in stages]
    return [OutputOf(stem_activation), *stage_taps, InputOf(classifier)]


class GlobalAvgPool(nn.Module):
    """Average over the whole map, flattened to (N, C). The reference networks pool 32x32
    inputs with a fixed window equal to the final map (e.g. AvgPool2d(8)); a window of the
    map's own size is the same operation there and also works at other input sizes."""

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, x.shape[-2:]).flatten(1)
