"""Row ranges of the ICD loss: the autograd rule shared by the sharded loss and
``backend="blockwise"``, and the choice of the row-range kernels.

A rank (or the single process) owns rows [begin, begin + B) of the N-row problem and the same
columns; see icd_fast/distributed.py for the algorithm and the gradient convention.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import _ops, blockwise

SHARDED_BACKENDS = ("auto", "blockwise", "cpu", "cuda")


class RowRangeImplementation:
    """forward_rows / backward_rows of one backend (the fused ops or blockwise.py); both have
    the signatures of ``torch.ops.icd_fast.icd_forward_rows`` / ``icd_backward_rows``."""

    def __init__(self, name: str, forward_rows, backward_rows):
        self.name, self.forward_rows, self.backward_rows = name, forward_rows, backward_rows


BLOCKWISE = RowRangeImplementation("blockwise", blockwise.forward_rows, blockwise.backward_rows)


def _fused(name: str) -> RowRangeImplementation:
    return RowRangeImplementation(name, torch.ops.icd_fast.icd_forward_rows,
                                  torch.ops.icd_fast.icd_backward_rows)


def row_range_implementation(backend: str, device: torch.device) -> RowRangeImplementation:
    """The row-range kernels ``backend`` means for tensors on ``device``: "auto" takes the
    fused kernel of the device where one is built and verified (today: the CPU kernel), and
    the blockwise PyTorch implementation everywhere else (CUDA included)."""
    if backend not in SHARDED_BACKENDS:
        raise ValueError(f"backend must be one of {SHARDED_BACKENDS} for the sharded loss, got "
                         f"{backend!r} (the O(N^2) reference has no row-range form)")
    if backend == "blockwise":
        return BLOCKWISE
    if backend == "auto":
        if device.type == "cpu" and _ops.HAS_CPU_KERNEL:
            return _fused("cpu")
        if device.type == "cuda" and _ops.HAS_CUDA_KERNEL and _ops.CUDA_KERNEL_VERIFIED_ON_GPU:
            return _fused("cuda")
        return BLOCKWISE
    if device.type != backend:
        raise ValueError(f"backend={backend!r} needs {backend} tensors, got tensors on {device}")
    built = _ops.HAS_CPU_KERNEL if backend == "cpu" else _ops.HAS_CUDA_KERNEL
    if not built:
        why = _ops.EXTENSION_ERROR or f"icd_fast was built without its {backend} kernel"
        raise RuntimeError(f"backend={backend!r} is not available: {why}. "
                           f"See icd_fast.build_info().")
    return _fused(backend)


def all_gather_stacked(x: torch.Tensor, group) -> torch.Tensor:
    """The ranks' x (equal shapes) stacked in rank order along a new first dimension."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


class RowRangeICD(torch.autograd.Function):
    """This rank's share of the loss of the gathered batch, and its rows' gradients.

    With group=None it is the single-process loss over all rows (``backend="blockwise"``).
    """

    @staticmethod
    def forward(ctx, z_s, z_t, log_scale, alpha, max_scale, group, implementation):
        rows, d = z_s.shape
        world = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        if world > 1:
            gathered = all_gather_stacked(torch.cat([z_s.detach(), z_t.detach()], dim=1), group)
            gathered = gathered.reshape(world * rows, 2 * d)
            all_s, all_t = gathered[:, :d], gathered[:, d:]
        else:
            all_s, all_t = z_s.detach(), z_t.detach()
        begin = rank * rows
        row_lse, col_lse, row_kl, row_ce, unit, norms = implementation.forward_rows(
            all_s, all_t, log_scale.detach(), begin, rows, max_scale)
        if world > 1:
            stats = all_gather_stacked(torch.stack([row_lse, col_lse, row_kl]), group)  # (W, 3, B)
            row_lse, col_lse, row_kl = stats.transpose(0, 1).reshape(3, world * rows)
        # The means in float64: one rounding instead of B accumulated ones.
        ce = (row_ce.sum(dtype=torch.float64) / rows).to(row_ce.dtype)
        kl = (row_kl[begin:begin + rows].sum(dtype=torch.float64) / rows).to(row_kl.dtype)
        ctx.save_for_backward(log_scale, unit, norms, row_lse, col_lse, row_kl)
        ctx.alpha, ctx.max_scale, ctx.group, ctx.world = alpha, max_scale, group, world
        ctx.begin, ctx.rows, ctx.grad_dtype = begin, rows, z_s.dtype
        ctx.implementation = implementation
        ctx.allow_tf32 = _ops.forward_allow_tf32()  # the backward forms the same logits
        ctx.set_materialize_grads(False)
        return ce + alpha * kl, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_kl):
        _ops.refuse_double_backward()
        log_scale, unit, norms, row_lse, col_lse, row_kl = ctx.saved_tensors
        acc = unit.dtype
        zero = torch.zeros((), dtype=acc, device=unit.device)

        def value(g):
            return zero if g is None else g.detach().to(acc).reshape(())

        # This rank's return is (1/B) sum_{i in its rows} (CE_i + alpha k_i): its rows carry
        # the weights of its upstream gradients, divided by B.
        g_loss = value(grad_loss)
        weights = torch.stack([g_loss + value(grad_ce),
                               ctx.alpha * g_loss + value(grad_kl)]) / ctx.rows
        if ctx.world > 1:
            weights = all_gather_stacked(weights, ctx.group)  # (W, 2): each rank's own
        else:
            weights = weights[None]
        weight_ce, weight_kl = weights.repeat_interleave(ctx.rows, dim=0).T.contiguous()
        grad_z_s, grad_z_t, grad_log_scale = ctx.implementation.backward_rows(
            unit, norms, log_scale.detach(), row_lse, col_lse, row_kl, weight_ce, weight_kl,
            ctx.begin, ctx.rows, ctx.max_scale, ctx.grad_dtype, ctx.allow_tf32)
        return grad_z_s, grad_z_t, grad_log_scale, None, None, None, None
