"""The CRD benchmark's CIFAR zoo as recorded in fixtures/cifar_zoo.json, methods.json and
methods_ofd_wsld.json (see fixtures/README.md), and the deterministic weights those records
were computed with."""
from __future__ import annotations

import json
import math
import os
import zlib
from functools import lru_cache

import torch

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@lru_cache(maxsize=None)
def cifar_zoo() -> dict:
    with open(os.path.join(FIXTURES, "cifar_zoo.json")) as f:
        return json.load(f)


@lru_cache(maxsize=None)
def methods() -> dict:
    with open(os.path.join(FIXTURES, "methods.json")) as f:
        return json.load(f)


@lru_cache(maxsize=None)
def methods_ofd_wsld() -> dict:
    with open(os.path.join(FIXTURES, "methods_ofd_wsld.json")) as f:
        return json.load(f)


def reference_weights(keys_and_shapes) -> dict:
    """Every state-dict entry drawn, in float64, from a generator seeded by its own key."""
    state = {}
    for key, shape in keys_and_shapes:
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        draw = dict(generator=g, dtype=torch.float64)
        if key.endswith("num_batches_tracked"):
            value = torch.tensor(0)
        elif key.endswith("running_var"):
            value = 1 + 0.5 * torch.rand(shape, **draw)
        elif key.endswith("running_mean"):
            value = 0.1 * torch.randn(shape, **draw)
        elif len(shape) == 1 and key.endswith("bias"):
            value = 0.1 * torch.randn(shape, **draw)
        elif len(shape) == 1:
            value = 1 + 0.1 * torch.randn(shape, **draw)
        else:
            value = torch.randn(shape, **draw) / math.sqrt(torch.Size(shape[1:]).numel())
        state[key] = value
    return state


@lru_cache(maxsize=None)
def reference_model(name: str, num_classes: int = 100):
    """build_model(name) in float64 and eval mode, carrying the fixture's weights (one
    shared instance per name: callers must leave it unchanged)."""
    from train.models import build_model

    model = build_model(name, num_classes).double().eval()
    model.load_state_dict(reference_weights(cifar_zoo()[name]["state_dict"]), strict=True)
    return model


def logits_input() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)


def methods_input() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
