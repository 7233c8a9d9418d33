"""The digest this application's checkpoints carry, so that a damaged file is an error and
never a silently different model.

The digest is a SHA-256 of the checkpoint's content (every tensor's dtype, shape and bytes,
and every plain value), stored in the checkpoint dict itself under DIGEST_KEY. It is of the
content rather than of the file's bytes, so the file stays an ordinary `torch.save` dict that
any tool reads, and it is checked on the content the load produced: a flipped byte that the
load does not notice changes a value, and then the digest. (A flip the load reads back as
the same content, in a zip header's timestamp say, changes nothing that is used.)
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

DIGEST_KEY = "icd_fast_sha256"


def _feed(digest, obj) -> None:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{tensor.dtype}{tuple(obj.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    elif isinstance(obj, Mapping):
        # Keys in a fixed order: a dict's insertion order is not part of its content.
        keys = sorted(obj, key=lambda key: (type(key).__name__, repr(key)))
        digest.update(f"M{len(keys)};".encode())
        for key in keys:
            _feed(digest, key)
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{type(obj).__name__[0]}{len(obj)};".encode())
        for item in obj:
            _feed(digest, item)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"a checkpoint holds a {type(obj).__name__}, which has no digest "
                        f"(tensors, containers and plain values only)")


def content_digest(obj) -> str:
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def sealed(payload: dict) -> dict:
    """payload with its digest added."""
    return {**payload, DIGEST_KEY: content_digest(payload)}


def unsealed(obj, path):
    """obj (a loaded checkpoint) without its digest, after checking it; obj itself when it
    carries none (a checkpoint another tool wrote)."""
    if not isinstance(obj, dict) or DIGEST_KEY not in obj:
        return obj
    payload = {key: value for key, value in obj.items() if key != DIGEST_KEY}
    if content_digest(payload) != obj[DIGEST_KEY]:
        raise ValueError(f"checkpoint {path} is damaged: its content does not match the "
                         f"digest written with it (a changed byte on disk or in transfer)")
    return payload
