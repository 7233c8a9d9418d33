"""``icd_loss``: the ICD loss from already-projected features, on the fastest backend."""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Union

import torch

from . import _ops
from ._checks import check_inputs
from ._row_range import BLOCKWISE, RowRangeICD
from .reference import icd_loss_reference

BACKENDS = ("auto", "reference", "blockwise", "cpu", "cuda")


class ICDLossParts(NamedTuple):
    """The loss and its two terms: ``loss = contrastive + alpha * invariance``."""

    loss: torch.Tensor
    contrastive: torch.Tensor  # CE of each student row against its own teacher
    invariance: torch.Tensor  # KL between the teacher->student and student->teacher softmaxes


_warned_fallback: set = set()


def _fused_kernel_for(device_type: str) -> Optional[str]:
    if device_type == "cpu" and _ops.HAS_CPU_KERNEL:
        return "cpu"
    if device_type == "cuda" and _ops.HAS_CUDA_KERNEL:
        return "cuda"
    return None


def _why_auto_skips(device_type: str, kernel: Optional[str]) -> Optional[str]:
    """Why backend="auto" does not use a fused kernel for these tensors, or None."""
    if kernel is None:
        return _ops.EXTENSION_ERROR or f"it was built without a {device_type} kernel"
    if kernel == "cuda" and not _ops.CUDA_KERNEL_VERIFIED_ON_GPU:
        return ("the CUDA kernel has not yet been verified on a GPU; pass backend='cuda' to "
                "use it anyway")
    return None


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("reference", "blockwise"):
        return backend
    kernel = _fused_kernel_for(device.type)
    if backend == "auto":
        why = _why_auto_skips(device.type, kernel)
        if why is None:
            return kernel
        if (device.type, why) not in _warned_fallback:
            _warned_fallback.add((device.type, why))
            warnings.warn(f"icd_fast: using the blockwise PyTorch backend (O(N D) memory, "
                          f"plain PyTorch speed) for {device.type} tensors: {why}.",
                          stacklevel=3)
        return "blockwise"
    if device.type != backend:
        raise ValueError(f"backend={backend!r} needs {backend} tensors, got tensors on {device}")
    if kernel is None:
        why = _ops.EXTENSION_ERROR or f"icd_fast was built without its {backend} kernel"
        raise RuntimeError(f"backend={backend!r} is not available: {why}. "
                           f"See icd_fast.build_info().")
    return kernel


def with_zero_bias_gradient(loss: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The loss with b attached: b cancels in the loss, and this makes its gradient an exact 0
    instead of None (the fused and blockwise backends never see b)."""
    return loss if bias is None else loss + (bias * 0).sum().to(loss.dtype)


def icd_loss(z_s: torch.Tensor, z_t: torch.Tensor, log_scale: Union[torch.Tensor, float],
             bias: Optional[torch.Tensor] = None, *, alpha: float = 0.5,
             max_scale: float = 10.0, backend: str = "auto",
             return_parts: bool = False) -> Union[torch.Tensor, ICDLossParts]:
    r"""Invariant Consistency Distillation loss of projected student and teacher features.

    With :math:`s_i = z_{s,i}/\max(\|z_{s,i}\|, 10^{-12})`, :math:`t_j` likewise,
    :math:`\kappa = \mathrm{clamp}(e^{\theta}, 0, \texttt{max\_scale})` and logits
    :math:`L_{ij} = \kappa \langle s_i, t_j\rangle + b`::

        loss = cross_entropy(L, arange(N))
               + alpha * kl_div(log_softmax(L, 1), softmax(L, 0).T, reduction="batchmean")

    which is the authors' formulation. The fused backends never form the N x N matrix.

    Args:
        z_s: student features after the projection head, shape (N, D), floating point.
        z_t: teacher features after the projection head, shape (N, D), same dtype and device.
        log_scale: theta, the learnable log of the logit scale; a tensor holding one value
            (shape () or (1,)) on the same device, or a Python number for a fixed scale. Its
            gradient is computed (0 where exp(theta) exceeds ``max_scale``).
        bias: optional learnable logit bias b. It cancels in every softmax, so the loss does
            not depend on it and its gradient is exactly 0; accepted for drop-in use.
        alpha: weight of the invariance (KL) term, >= 0.
        max_scale: upper clamp of exp(theta), > 0. Up to 32 the kernels use a fixed
            exponent shift; above, an online maximum, so any scale stays finite.
        backend: ``"auto"`` (the fused kernel for the tensors' device when it was built and
            verified, today the CPU kernel; ``"blockwise"`` everywhere else, with a one-time
            warning, so a GPU gets O(N D) memory), ``"cpu"``, ``"cuda"`` (the fused CUDA
            kernel, float32/float64/float16/bfloat16, not yet verified on a GPU),
            ``"blockwise"`` (tiled plain PyTorch on any device: no N x N buffer) or
            ``"reference"`` (the authors' O(N^2) formulation; supports double backward).
        return_parts: also return the contrastive (CE) and invariance (KL) terms.

    Returns:
        The scalar loss, or :class:`ICDLossParts` ``(loss, contrastive, invariance)``. The
        loss is float64 for float64 inputs and float32 otherwise (fp16/bf16 inputs are
        computed in fp32); gradients come back in the inputs' dtypes.

    Raises:
        ValueError / TypeError naming the argument for a wrong shape, dtype, device or value.
    """
    log_scale = _ops.as_log_scale(log_scale, z_s)
    check_inputs(z_s, z_t, log_scale, bias, alpha, max_scale)
    chosen = _resolve_backend(backend, z_s.device)
    if chosen == "reference":
        loss, ce, kl = icd_loss_reference(z_s, z_t, log_scale, bias, alpha=alpha,
                                          max_scale=max_scale, return_parts=True)
    elif chosen == "blockwise":
        loss, ce, kl = RowRangeICD.apply(z_s, z_t, log_scale, float(alpha), float(max_scale),
                                         None, BLOCKWISE)
        loss = with_zero_bias_gradient(loss, bias)
    else:
        loss, ce, kl = _ops.fused_forward(z_s, z_t, log_scale, float(alpha), float(max_scale))
        loss = with_zero_bias_gradient(loss, bias)
    return ICDLossParts(loss, ce, kl) if return_parts else loss
