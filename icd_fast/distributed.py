"""The exact ICD loss of a batch split over ranks, each rank computing only its own rows.

Rank r of W holds B rows of the global batch of N = W B and owns those rows *and* the same
columns of the logit matrix. Row i's terms need row i of L (L_ij) and column i (L_ji) against
all N, so every rank gathers the projected features of all ranks once (B x 2D each, in the
input dtype) and forms the statistics r_i, c_i, k_i of its own rows. The backward needs those
statistics of every row and the upstream weights of every rank (both tiny: N x 3 and W x 2
values), after which each rank forms the complete gradients of its own rows: there is no
gradient collective. Compute per rank is 6 B N D multiply-adds (2 forward, 4 backward), memory
O(N D). See docs/scaling.md.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from . import _ops
from ._checks import check_inputs
from ._row_range import SHARDED_BACKENDS, RowRangeICD, all_gather_stacked, row_range_implementation
from .functional import ICDLossParts, icd_loss, with_zero_bias_gradient

def _check_same_rows(z_s: torch.Tensor, group) -> None:
    """Every rank must pass the same (B, D) and dtype, else the gather would fail or hang:
    all ranks see the same table and raise the same error."""
    shape = torch.tensor([z_s.shape[0], z_s.shape[1], _ops.dtype_code(z_s.dtype)],
                         dtype=torch.int64, device=z_s.device)
    table = all_gather_stacked(shape, group).tolist()
    if any(row != table[0] for row in table):
        listing = ", ".join(f"rank {r}: B={b}, D={d}, {_ops.dtype_name(c)}"
                            for r, (b, d, c) in enumerate(table))
        raise ValueError("icd_loss_sharded needs the same number of rows B, feature size D and "
                         f"dtype on every rank, got {listing}")


def icd_loss_sharded(z_s: torch.Tensor, z_t: torch.Tensor, log_scale: Union[torch.Tensor, float],
                     bias: Optional[torch.Tensor] = None, *, alpha: float = 0.5,
                     max_scale: float = 10.0, group=None, backend: str = "auto",
                     return_parts: bool = False):
    r"""This rank's share of the ICD loss of the batch formed by all ranks' rows.

    The global batch is the concatenation, in rank order, of every rank's ``z_s`` and ``z_t``
    (B rows each, B equal on every rank). Each rank computes only the terms of its own rows
    (and the same columns) against all N = W B, so per-rank compute is about 1.5/W of one
    process computing the whole loss, and memory O(N D).

    Convention (as open_clip's ``local_loss`` with ``gather_with_grad``, and Inf-CL): the
    return is the mean of the per-row losses over this rank's rows, so **the mean of the W
    returns equals** ``icd_loss`` **of the concatenated batch**. The backward gives each rank
    the gradient of the **sum of all ranks' returns** with respect to its own ``z_s``, ``z_t``
    (and its share of the gradient of ``log_scale``), so DDP's averaging of parameter gradients
    over ranks yields exactly the single-process gradients. Two mistakes this avoids: gathering
    the other ranks' features without gradient (their rows' terms then never reach this rank's
    inputs, and the gradient is wrong), and every rank computing the whole loss and
    back-propagating it (each gradient counted W times, and W times the work).

    Every rank must call the backward (it exchanges each rank's upstream weights, 2 values per
    rank, so that ranks may weight their returns differently), and ``log_scale`` must be the
    same on every rank (DDP keeps it so).

    Args:
        z_s, z_t: this rank's rows of the projected student and teacher features, (B, D).
        log_scale, bias, alpha, max_scale, return_parts: as for :func:`icd_fast.icd_loss`.
        group: the process group (default: the default group). Without an initialised group,
            or with one rank, this is :func:`icd_fast.icd_loss`.
        backend: ``"auto"`` (the fused row-range kernel where one is built and verified, the
            CPU kernel today; ``"blockwise"`` elsewhere), ``"blockwise"``, ``"cpu"`` or
            ``"cuda"``.

    Returns:
        This rank's share (a scalar), or :class:`icd_fast.ICDLossParts` of its shares.

    Raises:
        ValueError / TypeError for bad arguments, as ``icd_loss`` does, and ValueError on
        every rank when the ranks' B, D or dtype differ.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return icd_loss(z_s, z_t, log_scale, bias, alpha=alpha, max_scale=max_scale,
                        backend=backend, return_parts=return_parts)
    log_scale = _ops.as_log_scale(log_scale, z_s)
    check_inputs(z_s, z_t, log_scale, bias, alpha, max_scale)
    implementation = row_range_implementation(backend, z_s.device)
    _check_same_rows(z_s, group)
    loss, ce, kl = RowRangeICD.apply(z_s, z_t, log_scale, float(alpha), float(max_scale),
                                     group if group is not None else dist.group.WORLD,
                                     implementation)
    loss = with_zero_bias_gradient(loss, bias)
    return ICDLossParts(loss, ce, kl) if return_parts else loss


__all__ = ["SHARDED_BACKENDS", "icd_loss_sharded", "row_range_implementation"]
