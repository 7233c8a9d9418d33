"""The ICD loss in plain PyTorch, exactly as the authors' code computes it.

This is the oracle of the tests and the fallback backend. It materialises the N x N logit
matrix (and, for the backward, several more N x N buffers), so it is slow and memory-bound
for large batches; use it to check numbers, not to train at scale.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12


def icd_logits(z_s: torch.Tensor, z_t: torch.Tensor, log_scale: torch.Tensor,
               bias: Optional[torch.Tensor] = None, *, max_scale: float = 10.0) -> torch.Tensor:
    """The N x N logit matrix ``L = clamp(exp(log_scale), 0, max_scale) <s_i, t_j> + bias``."""
    s = F.normalize(z_s, dim=1, eps=NORM_EPS)
    t = F.normalize(z_t, dim=1, eps=NORM_EPS)
    scale = log_scale.exp().clamp(0, max_scale).reshape(())
    logits = scale * (s @ t.T)
    if bias is not None:
        logits = logits + bias.reshape(())
    return logits


def icd_loss_reference(z_s: torch.Tensor, z_t: torch.Tensor, log_scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, *, alpha: float = 0.5,
                       max_scale: float = 10.0, return_parts: bool = False):
    """``cross_entropy(L, arange(N)) + alpha * kl_div(log_softmax(L, 1), softmax(L, 0).T)``.

    Arguments are as for :func:`icd_fast.icd_loss` (no checking is done here). fp16 and bf16
    inputs are computed in fp32, like the fused kernels do.
    """
    if z_s.dtype in (torch.float16, torch.bfloat16):
        z_s, z_t = z_s.float(), z_t.float()
    logits = icd_logits(z_s, z_t, log_scale, bias, max_scale=max_scale)
    targets = torch.arange(logits.shape[0], device=logits.device)
    ce = F.cross_entropy(logits, targets)
    kl = F.kl_div(F.log_softmax(logits, dim=1), F.softmax(logits, dim=0).T,
                  reduction="batchmean")
    loss = ce + alpha * kl
    return (loss, ce, kl) if return_parts else loss
