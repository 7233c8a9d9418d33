"""``ICDLoss``: drop-in ``nn.Module`` for the authors' ICD/DCD criterion."""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch import nn

from .distributed import icd_loss_sharded
from .functional import ICDLossParts, icd_loss


class ICDLoss(nn.Module):
    r"""ICD criterion with its two projection heads: ``loss = criterion(f_s, f_t)``.

    ``f_s`` (N, s_dim) and ``f_t`` (N, t_dim) are the penultimate features of the student and
    the teacher (any trailing dimensions are flattened). Each is projected to ``feat_dim`` by
    a linear head, and the result goes to :func:`icd_fast.icd_loss` with the learnable log
    scale theta (``log_scale``) and bias b (``bias``).

    Args:
        s_dim, t_dim: feature sizes of student and teacher.
        feat_dim: size of the shared embedding (128 in the paper).
        alpha: weight of the invariance (KL) term.
        init_log_scale: initial theta (the scale is exp(theta) = e by default).
        init_bias: initial b.
        max_scale: clamp of exp(theta).
        learnable: train theta and b. When False they are fixed buffers.
        temperature: with ``learnable=False``, a fixed temperature T: the scale is 1/T (the
            authors' non-trainable branch multiplies by T instead, which is a bug). The clamp
            is raised to 1/T if needed, since it exists to bound a learned scale.
        backend: passed to :func:`icd_fast.icd_loss`.
        sharded: under an initialised process group with several ranks, each rank passes
            only its own rows and gets its share of the loss of all ranks' rows
            (:func:`icd_fast.icd_loss_sharded`: exact, with DDP's gradient averaging giving
            the single-process gradients). Without a process group it is ``icd_loss``.

    To load a state dict saved from the authors' module, use :meth:`load_authors_state_dict`.
    """

    def __init__(self, s_dim: int, t_dim: int, feat_dim: int = 128, alpha: float = 0.5,
                 init_log_scale: float = 1.0, init_bias: float = 0.0, max_scale: float = 10.0,
                 learnable: bool = True, temperature: Optional[float] = None,
                 backend: str = "auto", sharded: bool = False):
        super().__init__()
        for name, v in (("s_dim", s_dim), ("t_dim", t_dim), ("feat_dim", feat_dim)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if temperature is not None:
            if learnable:
                raise ValueError("temperature fixes the scale; pass learnable=False with it")
            if not temperature > 0:
                raise ValueError(f"temperature must be > 0, got {temperature!r}")
            init_log_scale = -math.log(temperature)
            max_scale = max(max_scale, 1.0 / temperature)
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        self.alpha = alpha
        self.max_scale = max_scale
        self.backend = backend
        self.sharded = sharded
        log_scale = torch.tensor(float(init_log_scale))
        bias = torch.tensor(float(init_bias))
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
            self.bias = nn.Parameter(bias)
        else:
            self.register_buffer("log_scale", log_scale)
            self.register_buffer("bias", bias)

    @property
    def scale(self) -> torch.Tensor:
        """The current logit scale kappa = clamp(exp(theta), 0, max_scale)."""
        return self.log_scale.detach().exp().clamp(0, self.max_scale)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, return_parts: bool = False):
        z_s = self.embed_s(f_s.flatten(1))
        z_t = self.embed_t(f_t.flatten(1))
        loss = icd_loss_sharded if self.sharded else icd_loss
        return loss(z_s, z_t, self.log_scale, self.bias, alpha=self.alpha,
                    max_scale=self.max_scale, backend=self.backend, return_parts=return_parts)

    @staticmethod
    def convert_authors_state_dict(state_dict: Mapping[str, torch.Tensor],
                                   authors_trainable: bool = True) -> dict:
        """Renames the keys of a state dict saved from the authors' module to ours.

        ``embed_s.{weight,bias}`` (or CRD-style ``embed_s.linear.*``; likewise ``embed_t``)
        keep their names; ``params.tau`` becomes ``log_scale`` and ``params.b`` becomes
        ``bias``, reshaped to scalars. Unknown keys raise ``KeyError``.

        With ``authors_trainable=True`` (their default) ``params.tau`` is theta, as here. A
        module saved with ``trainable=False`` multiplies the logits by ``params.tau`` itself
        (e.g. 0.07), so ``log_scale`` becomes ``log(params.tau)`` to reproduce what it
        computed; load it into an ``ICDLoss(learnable=False)`` whose ``max_scale`` is at least
        that value.
        """
        converted = {}
        for key, value in state_dict.items():
            parts = key.split(".")
            if parts[0] in ("embed_s", "embed_t") and parts[-1] in ("weight", "bias") and (
                    len(parts) == 2 or (len(parts) == 3 and parts[1] == "linear")):
                converted[f"{parts[0]}.{parts[-1]}"] = value
            elif key == "params.tau":
                theta = value.reshape(())
                if not authors_trainable and not bool(theta > 0):
                    raise ValueError(
                        "params.tau of a module saved with trainable=False multiplies the "
                        f"logits and must be > 0 to be a scale, got {theta.item()!r}")
                converted["log_scale"] = theta if authors_trainable else theta.log()
            elif key == "params.b":
                converted["bias"] = value.reshape(())
            else:
                raise KeyError(f"unexpected key {key!r} in the authors' state dict")
        return converted

    def load_authors_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                                authors_trainable: bool = True):
        """Loads a state dict saved from the authors' ICD/DCD module (see
        :meth:`convert_authors_state_dict`)."""
        converted = self.convert_authors_state_dict(state_dict, authors_trainable)
        return self.load_state_dict(converted, strict=strict)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, max_scale={self.max_scale}, backend={self.backend!r}, "
                f"sharded={self.sharded}")


__all__ = ["ICDLoss", "ICDLossParts"]
