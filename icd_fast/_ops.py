"""Loads the compiled operator library and registers its fake-tensor and autograd rules.

The ops themselves (schemas and CPU/CUDA kernels) are defined in C++ (csrc/). Importing this
module never fails: when the extension is missing, ``EXTENSION_ERROR`` says why and the
package falls back to the pure-PyTorch reference.
"""
from __future__ import annotations

import json
from typing import Optional

import torch

from ._checks import check_inputs

try:
    from . import _C  # noqa: F401  (loading the library runs its TORCH_LIBRARY registrations)

    EXTENSION_ERROR: Optional[str] = None
except ImportError as error:  # built without the extension, or built against another torch
    EXTENSION_ERROR = f"{type(error).__name__}: {error}"


def _read_build_info() -> dict:
    info = {"extension": False, "cpu_kernel": False, "cuda_kernel": False, "cuda_archs": "",
            "torch_version": None}
    if EXTENSION_ERROR is None:
        info.update(json.loads(torch.ops.icd_fast.build_info()))
        info["extension"] = True
    else:
        info["error"] = EXTENSION_ERROR
    info["runtime_torch_version"] = torch.__version__
    return info


_BUILD_INFO = _read_build_info()
# Plain booleans, so that backend selection traces under torch.compile without a graph break.
HAS_CPU_KERNEL: bool = bool(_BUILD_INFO["cpu_kernel"])
HAS_CUDA_KERNEL: bool = bool(_BUILD_INFO["cuda_kernel"])
# The CUDA kernel has so far run only under the CPU emulation of tests/cuda_emulation (its
# device code, against the float64 oracle), not on a GPU. Until a GPU run of tests/ and
# compute-sanitizer is recorded under bench/results/, backend="auto" does not choose it;
# backend="cuda" uses it explicitly.
CUDA_KERNEL_VERIFIED_ON_GPU: bool = False


def build_info() -> dict:
    """What was compiled into this installation of icd_fast.

    Returns a dict with ``extension`` (the C++ library loaded), ``cpu_kernel``,
    ``cuda_kernel``, ``cuda_archs`` (e.g. ``"8.0;9.0"``), ``torch_version`` (the torch the
    extension was compiled against), ``runtime_torch_version`` and, when the extension could
    not be loaded, ``error``.
    """
    return dict(_BUILD_INFO)


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the loss and of the saved row statistics for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_log_scale(log_scale, like: torch.Tensor) -> torch.Tensor:
    """log_scale as a tensor: a Python number becomes a 0-dim tensor of the statistics dtype on
    ``like``'s device. Anything else that is not a tensor is refused by name."""
    if isinstance(log_scale, torch.Tensor) or not isinstance(like, torch.Tensor):
        return log_scale
    if isinstance(log_scale, bool) or not isinstance(log_scale, (int, float)):
        raise TypeError("log_scale must be a torch.Tensor holding one value or a Python number, "
                        f"got {type(log_scale).__name__}")
    return torch.tensor(float(log_scale), device=like.device,
                        dtype=statistics_dtype(like.dtype))


# Small integer codes of the floating dtypes, for exchanging a dtype between ranks.
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODES.get(dtype, -1)


def dtype_name(code: int) -> str:
    names = {c: str(d).replace("torch.", "") for d, c in _DTYPE_CODES.items()}
    return names.get(code, "a non-floating dtype")


DOUBLE_BACKWARD_MESSAGE = (
    "icd_fast: double backward (differentiating the gradient of icd_loss, e.g. "
    "torch.autograd.grad(..., create_graph=True) followed by another backward) is not "
    "supported by the fused and blockwise backends; use backend='reference' for higher-order "
    "gradients.")


def refuse_double_backward() -> None:
    """Raises when a backward is asked to build a graph (create_graph=True): the kernels'
    gradients are not differentiable, and a graph without them would give silently wrong
    second derivatives, whichever inputs need a gradient."""
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


def forward_allow_tf32() -> bool:
    """The TF32 setting a fused forward runs under (the CUDA kernel reads the same flag when
    it is called), saved by the autograd rules and handed to the backward op: the backward
    must form the same logits as its forward even where the setting changed in between."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


if EXTENSION_ERROR is None:

    @torch.library.register_fake("icd_fast::icd_forward")
    def _icd_forward_fake(z_s, z_t, log_scale, alpha, max_scale):
        check_inputs(z_s, z_t, log_scale, None, alpha, max_scale)
        acc = statistics_dtype(z_s.dtype)
        n = z_s.shape[0]
        scalars = [z_s.new_empty((), dtype=acc) for _ in range(3)]
        stats = [z_s.new_empty((n,), dtype=acc) for _ in range(3)]
        unit = z_s.new_empty((2, n, z_s.shape[1]), dtype=acc)
        norms = z_s.new_empty((2, n), dtype=acc)
        return (*scalars, *stats, unit, norms)

    @torch.library.register_fake("icd_fast::icd_backward")
    def _icd_backward_fake(grad_loss, grad_ce, grad_kl, unit, norms, log_scale, row_lse,
                           col_lse, row_kl, alpha, max_scale, grad_dtype, allow_tf32):
        if unit.dim() != 3 or unit.shape[0] != 2:
            raise ValueError(f"unit must be the (2, N, D) unit features saved by icd_forward, "
                             f"got shape {tuple(unit.shape)}")
        return (
            unit.new_empty(unit.shape[1:], dtype=grad_dtype),
            unit.new_empty(unit.shape[1:], dtype=grad_dtype),
            log_scale.new_empty(log_scale.shape),
        )

    @torch.library.register_fake("icd_fast::icd_forward_rows")
    def _icd_forward_rows_fake(z_s, z_t, log_scale, row_begin, row_count, max_scale):
        check_inputs(z_s, z_t, log_scale, None, 0.0, max_scale)
        acc = statistics_dtype(z_s.dtype)
        n = z_s.shape[0]
        stats = [z_s.new_empty((row_count,), dtype=acc) for _ in range(4)]
        return (*stats, z_s.new_empty((2, n, z_s.shape[1]), dtype=acc),
                z_s.new_empty((2, n), dtype=acc))

    @torch.library.register_fake("icd_fast::icd_backward_rows")
    def _icd_backward_rows_fake(unit, norms, log_scale, row_lse, col_lse, row_kl, weight_ce,
                                weight_kl, row_begin, row_count, max_scale, grad_dtype,
                                allow_tf32):
        return (unit.new_empty((row_count, unit.shape[2]), dtype=grad_dtype),
                unit.new_empty((row_count, unit.shape[2]), dtype=grad_dtype),
                log_scale.new_empty(log_scale.shape))

    def _backward(ctx, grad_loss, grad_ce, grad_kl):
        """Gradients for (z_s, z_t, log_scale) from the tensors the forward saved."""
        refuse_double_backward()
        log_scale, row_lse, col_lse, row_kl, unit, norms = ctx.saved_tensors
        return torch.ops.icd_fast.icd_backward(
            grad_loss, grad_ce, grad_kl, unit, norms, log_scale, row_lse, col_lse, row_kl,
            ctx.alpha, ctx.max_scale, ctx.grad_dtype, ctx.allow_tf32)

    def _forward_setup_context(ctx, inputs, output):
        z_s, z_t, log_scale, alpha, max_scale = inputs
        # The unit features replace z_s and z_t: the backward needs no normalisation again.
        ctx.save_for_backward(log_scale, *output[3:])
        ctx.grad_dtype = z_s.dtype
        ctx.alpha = alpha
        ctx.max_scale = max_scale
        ctx.allow_tf32 = forward_allow_tf32()

    def _forward_backward(ctx, grad_loss, grad_ce, grad_kl, *_grad_saved):
        # The row statistics are internal outputs, returned only to be saved for the backward.
        return (*_backward(ctx, grad_loss, grad_ce, grad_kl), None, None)

    # The autograd rule of the op itself: used by torch.compile, opcheck and direct op calls.
    torch.library.register_autograd(
        "icd_fast::icd_forward", _forward_backward, setup_context=_forward_setup_context)

    class _FusedICD(torch.autograd.Function):
        """The same rule as a plain autograd.Function: eager calls skip the generic wrapper
        of register_autograd (measured at about a fifth of the whole loss at N = 64)."""

        @staticmethod
        def forward(ctx, z_s, z_t, log_scale, alpha, max_scale):
            output = torch.ops.icd_fast.icd_forward(z_s, z_t, log_scale, alpha, max_scale)
            _forward_setup_context(ctx, (z_s, z_t, log_scale, alpha, max_scale), output)
            # Unused outputs then pass None upstream instead of freshly allocated zeros.
            ctx.set_materialize_grads(False)
            return output[:3]  # the statistics are saved, not returned: fewer autograd outputs

        @staticmethod
        def backward(ctx, grad_loss, grad_ce, grad_kl):
            return (*_backward(ctx, grad_loss, grad_ce, grad_kl), None, None)

    def _no_double_backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)

    torch.library.register_autograd(
        "icd_fast::icd_backward", _no_double_backward,
        setup_context=lambda ctx, inputs, output: None)


def fused_forward(z_s, z_t, log_scale, alpha: float, max_scale: float):
    """icd_forward with autograd: (loss, ce, kl)."""
    if torch.compiler.is_compiling():
        return torch.ops.icd_fast.icd_forward(z_s, z_t, log_scale, alpha, max_scale)[:3]
    return _FusedICD.apply(z_s, z_t, log_scale, alpha, max_scale)
