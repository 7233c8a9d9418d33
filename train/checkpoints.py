"""Reading model weights from checkpoint files, safely, in the formats the field publishes.

A checkpoint is data: it is unpickled with `torch.load(weights_only=True)`, which builds
only tensors and plain containers. The one class also allowed is `argparse.Namespace`,
because the CRD benchmark's `<model>_last.pth` pickles its options with it. A file that
needs any other global is refused (`UntrustedCheckpoint`) unless the user opts in with
`--trust-checkpoint` (full unpickling, which can run code the file carries). A file that
does not load is one clear error, and the files this application writes have the digest
they carry checked (train/checkpoint_digest.py).

One function, `extract_state_dict`, finds a model's weights in whatever layout they come:
- this application's `best.pt` ({"student": ...}) and `last.pt` ({"distiller": ...});
- the CRD benchmark (RepDistiller): {"epoch", "model", "accuracy", "optimizer"}
  (`ckpt_epoch_240.pth`, `<model>_best.pth`) and {"opt": Namespace, "model", ...}
  (`<model>_last.pth`);
- mdistiller: `student_*` files ({"model": student weights}) and full ones ({"model":
  the DataParallel distiller's weights, "module.student.*" among "module.teacher.*"...});
- bare state dicts, torchvision's ImageNet weight files among them;
- keys under the wrappers' prefixes: `module.` (DataParallel, DDP), `_orig_mod.`
  (torch.compile), `student.` (a distiller's student among its other modules);
- files saved before batch norm had `num_batches_tracked` (torch < 0.4.1);
- `.safetensors` files (timm's and Hugging Face's weights), which hold tensors only.
"""
from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from .checkpoint_digest import unsealed
from .models import build_model

# Harmless classes a published checkpoint pickles besides tensors and containers.
SAFE_GLOBALS = (argparse.Namespace,)  # the CRD benchmark's options in <model>_last.pth

# Where the model's weights sit in a checkpoint dict, in the order they are looked for:
# this application's best.pt, CRD's and mdistiller's files, this application's last.pt,
# the usual name elsewhere.
CONTAINER_KEYS = ("student", "model", "distiller", "state_dict")

# Prefixes a wrapper puts before every key: DataParallel/DDP, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# A distiller's student among its teacher and loss modules (mdistiller, this application).
STUDENT_PREFIX = "student."

# Batch-norm counter added in torch 0.4.1; files saved before lack it.
BATCH_COUNTER = "num_batches_tracked"

KEYS_SHOWN = 5  # keys named in a mismatch error

SAFETENSORS_SUFFIX = ".safetensors"  # a format of tensors only: nothing to unpickle


class UntrustedCheckpoint(ValueError):
    """A checkpoint whose unpickling needs a global outside the allow-list."""


class CheckpointMismatch(ValueError):
    """A checkpoint's weights do not fit the model they are loaded into."""


def read_checkpoint(path, trust: bool = False, map_location="cpu"):
    """The unpickled content of checkpoint file `path`: with weights_only=True (tensors,
    containers and SAFE_GLOBALS), or, with trust=True, with everything pickle can do. A
    checkpoint this application wrote has its digest checked (and removed)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path, map_location)
    if trust:
        return unsealed(torch.load(path, map_location=map_location, weights_only=False), path)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            content = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found is None:
            raise _unreadable(path, error) from error
        raise UntrustedCheckpoint(
            f"checkpoint {path} needs the Python global {found.group(1)}, which a safe load "
            f"(torch.load weights_only=True) refuses: unpickling it could run code the file "
            f"carries. If you trust the file's source, pass --trust-checkpoint to load it "
            f"with weights_only=False at your own risk.") from None
    except PermissionError as error:
        raise ValueError(f"checkpoint {path} cannot be read: {error.strerror}") from None
    # A truncated, empty or foreign file fails inside the loader in many ways (RuntimeError,
    # EOFError, OSError "Invalid argument", KeyError of a bogus magic number...).
    except Exception as error:  # noqa: BLE001
        raise _unreadable(path, error) from None
    return unsealed(content, path)


def _read_safetensors(path: Path, map_location) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(map_location))
    except SafetensorError as error:
        raise ValueError(f"checkpoint {path} cannot be read: not a safetensors file, or a "
                         f"damaged one ({error})") from error


def _unreadable(path, error: Exception) -> ValueError:
    return ValueError(f"checkpoint {path} cannot be read: not a file torch.save wrote, or a "
                      f"damaged one ({type(error).__name__})")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items())


def _find_weights(obj) -> Dict[str, torch.Tensor]:
    """The first state dict of obj: obj itself, or under the CONTAINER_KEYS, recursively."""
    if isinstance(obj, nn.Module):  # a pickled model (only a trusted load gives one)
        return dict(obj.state_dict())
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in CONTAINER_KEYS:
            if isinstance(obj.get(key), (Mapping, nn.Module)):
                return _find_weights(obj[key])
        raise CheckpointMismatch(
            f"holds no model weights: a dict of keys {sorted(map(str, obj))[:10]}, none of "
            f"them a state dict or one of {list(CONTAINER_KEYS)}")
    raise CheckpointMismatch(f"holds no model weights: a {type(obj).__name__}")


def _strip_prefix(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def _unwrap(state: Dict[str, torch.Tensor], model_keys) -> Dict[str, torch.Tensor]:
    """Removes the wrappers' prefixes (any nesting of DDP, compile and a distiller)."""
    while True:
        wrapper = next((p for p in WRAPPER_PREFIXES
                        if state and all(key.startswith(p) for key in state)), None)
        if wrapper is not None:
            state = _strip_prefix(state, wrapper)
        elif (any(key.startswith(STUDENT_PREFIX) for key in state)
              and not any(key.startswith(STUDENT_PREFIX) for key in model_keys)):
            state = _strip_prefix(state, STUDENT_PREFIX)  # teacher and loss modules dropped
        else:
            return state


def _named(keys: List[str]) -> str:
    more = f" and {len(keys) - KEYS_SHOWN} more" if len(keys) > KEYS_SHOWN else ""
    return ", ".join(keys[:KEYS_SHOWN]) + more


def extract_state_dict(obj, model: nn.Module, name: Optional[str] = None
                       ) -> Dict[str, torch.Tensor]:
    """The weights for `model` in a checkpoint's content `obj` (read_checkpoint's result),
    keyed as model.state_dict() is. Only the key set is checked here (shapes are checked by
    load_state, so a template of another class count can read a checkpoint's keys)."""
    name = name or type(model).__name__
    expected = model.state_dict()
    state = _unwrap(_find_weights(obj), expected.keys())
    for key, buffer in expected.items():
        if key.rsplit(".", 1)[-1] == BATCH_COUNTER and key not in state:
            state[key] = torch.zeros_like(buffer)  # a pre-0.4.1 file: no batch counted yet
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        parts = ([f"missing keys {_named(missing)}"] if missing else []) + (
            [f"unexpected keys {_named(unexpected)}"] if unexpected else [])
        raise CheckpointMismatch(f"does not hold a {name} (different architecture): "
                                 + "; ".join(parts))
    return state


def load_state(model: nn.Module, state: Dict[str, torch.Tensor], name: Optional[str] = None
               ) -> None:
    """model.load_state_dict(state), strictly, after a shape check that names the layers
    whose shapes differ (another number of classes, width or input channels)."""
    name = name or type(model).__name__
    expected = model.state_dict()
    wrong = [f"{key} {tuple(state[key].shape)} instead of {tuple(value.shape)}"
             for key, value in expected.items()
             if key in state and state[key].shape != value.shape]
    if wrong:
        raise CheckpointMismatch(f"does not hold a {name} of this data set (other number of "
                                 f"classes, width or input channels): {_named(wrong)}")
    model.load_state_dict(state, strict=True)


@contextmanager
def naming_the_file(path):
    """Mismatch errors raised inside name the checkpoint file."""
    try:
        yield
    except CheckpointMismatch as error:
        raise CheckpointMismatch(f"checkpoint {path} {error}") from None


def read_state_dict(path, model: nn.Module, trust: bool = False,
                    name: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """extract_state_dict of checkpoint file `path` for model (not loaded into it)."""
    with naming_the_file(path):
        return extract_state_dict(read_checkpoint(path, trust), model, name)


def load_model_weights(model: nn.Module, path, trust: bool = False,
                       name: Optional[str] = None) -> None:
    """Loads the weights of checkpoint file `path` (any format above) into model."""
    state = read_state_dict(path, model, trust, name)
    with naming_the_file(path):
        load_state(model, state, name)


def load_model(name: str, ckpt, classes: int, channels: int, trust: bool = False):
    """build_model(name, ...) with the weights of checkpoint ckpt."""
    model = build_model(name, classes, channels)
    load_model_weights(model, ckpt, trust, name)
    return model
