"""Reading model weights from checkpoint files."""
from __future__ import annotations

from pathlib import Path

import torch

from .models import build_model


def read_checkpoint(path) -> dict:
    """A model's state dict from a checkpoint of this application (or a bare state dict)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict):
        state = state.get("student", state.get("model", state))
    return state


def load_weights(model, path, name: str) -> None:
    """Loads a checkpoint's model weights; a checkpoint of another architecture is an error
    that says so."""
    try:
        model.load_state_dict(read_checkpoint(path))
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path} does not hold a {name} of this data set "
                         f"(different architecture or number of classes): "
                         f"{str(error).splitlines()[0]}") from error


def load_model(name: str, ckpt, classes: int, channels: int):
    """build_model(name, ...) with the weights of checkpoint ckpt."""
    model = build_model(name, classes, channels)
    load_weights(model, ckpt, name)
    return model
