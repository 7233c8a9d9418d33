"""The row-range ICD loss in plain PyTorch operations over tiles: no N x N buffer, any device.

The same algorithm as the fused kernels (see docs/algorithm.md), written with tile x tile x D
matrix products: the owner of rows I sweeps the column tiles J, forming ``L_IJ`` and ``L_JI``,
and keeps per-row running sums with a running maximum (so any scale stays finite). Memory is
O(N D) plus a few tile x tile buffers. Statistics and products are fp32 for fp16/bf16 inputs
(fp64 for fp64 inputs).

``forward_rows`` and ``backward_rows`` have exactly the semantics (and argument order) of the
fused ops ``torch.ops.icd_fast.icd_forward_rows`` / ``icd_backward_rows``, so the sharded loss
and ``backend="blockwise"`` run either implementation through one code path.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

NORM_EPS = 1e-12
# Tile edge: a 1024 x 1024 fp32 tile is 4 MiB, and the backward holds about ten of them.
DEFAULT_TILE = 1024


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# exp(theta) and its clamp are taken in float64, as the fused kernels do, so that a theta at
# the clamp (e.g. log(10) rounded to float32) falls on the same side of it everywhere.
def scale_of(log_scale: torch.Tensor, max_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """kappa = clamp(exp(theta), 0, max_scale), as a 0-dim tensor (no host synchronisation)."""
    return log_scale.detach().reshape(()).double().exp().clamp(0, max_scale).to(dtype)


def scale_grad_factor(log_scale: torch.Tensor, max_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """d kappa / d theta: exp(theta), or 0 strictly above the clamp (torch.clamp passes the
    gradient at the bound itself)."""
    e = log_scale.detach().reshape(()).double().exp()
    return torch.where(e > max_scale, torch.zeros_like(e), e).to(dtype)


def normalize(z_s: torch.Tensor, z_t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """unit = [s; t] (2, N, D) and norms = [||z_s||; ||z_t||] (2, N) in the accumulate dtype."""
    acc = accumulate_dtype(z_s.dtype)
    z = torch.stack([z_s.detach().to(acc), z_t.detach().to(acc)])
    norms = torch.linalg.vector_norm(z, dim=2)
    return z / norms.clamp_min(NORM_EPS).unsqueeze(2), norms


def _tiles(begin: int, end: int, tile: int):
    for start in range(begin, end, tile):
        yield start, min(end, start + tile)


def forward_rows(z_s: torch.Tensor, z_t: torch.Tensor, log_scale: torch.Tensor, row_begin: int,
                 row_count: int, max_scale: float, tile: Optional[int] = None):
    """Statistics of rows [row_begin, row_begin + row_count) of the N-row problem of z_s, z_t.

    Returns ``(row_lse, col_lse, row_kl, row_ce, unit, norms)``: r_i, c_i, k_i and
    CE_i = r_i - L_ii for the rows of the range (vectors of length row_count), and the unit
    features (2, N, D) and norms (2, N) of all N rows, which the backward takes.
    """
    _check_range(row_begin, row_count, z_s.shape[0])
    tile = tile or DEFAULT_TILE  # read at call time, so that tests can shrink it
    unit, norms = normalize(z_s, z_t)
    s, t = unit[0], unit[1]
    acc = unit.dtype
    kappa = scale_of(log_scale, max_scale, acc)
    n = s.shape[0]
    stats = []
    for i0, i1 in _tiles(row_begin, row_begin + row_count, tile):
        s_rows, t_rows = s[i0:i1], t[i0:i1]
        lowest = torch.full((i1 - i0,), float("-inf"), dtype=acc, device=s.device)
        row_shift, row_sum = lowest, torch.zeros_like(lowest)
        col_shift, col_sum, kl_sum = lowest, torch.zeros_like(lowest), torch.zeros_like(lowest)
        for j0, j1 in _tiles(0, n, tile):
            l_ij = kappa * (s_rows @ t[j0:j1].T)  # L_ij, i in I, j in J
            l_ji = kappa * (t_rows @ s[j0:j1].T)  # L_ji at the same place
            # Online maxima: the sums taken with an old shift are rescaled when it rises.
            shift = torch.maximum(row_shift, l_ij.amax(1))
            row_sum = row_sum * torch.exp(row_shift - shift) + torch.exp(
                l_ij - shift[:, None]).sum(1)
            row_shift = shift
            shift = torch.maximum(col_shift, l_ji.amax(1))
            rescale = torch.exp(col_shift - shift)
            e = torch.exp(l_ji - shift[:, None])
            col_sum = col_sum * rescale + e.sum(1)
            kl_sum = kl_sum * rescale + (e * (l_ji - l_ij)).sum(1)
            col_shift = shift
        r = row_shift + torch.log(row_sum)
        c = col_shift + torch.log(col_sum)
        diagonal = kappa * (s_rows * t_rows).sum(1)
        stats.append(torch.stack([r, c, kl_sum / col_sum - c + r, r - diagonal]))
    row_lse, col_lse, row_kl, row_ce = torch.cat(stats, dim=1)
    return row_lse, col_lse, row_kl, row_ce, unit, norms


def backward_rows(unit: torch.Tensor, norms: torch.Tensor, log_scale: torch.Tensor,
                  row_lse: torch.Tensor, col_lse: torch.Tensor, row_kl: torch.Tensor,
                  weight_ce: torch.Tensor, weight_kl: torch.Tensor, row_begin: int,
                  row_count: int, max_scale: float, grad_dtype: torch.dtype,
                  allow_tf32: bool = False, tile: Optional[int] = None):
    """Gradients of ``sum_i (weight_ce_i CE_i + weight_kl_i k_i)`` over all N rows with respect
    to the z_s and z_t rows of the range, and the range's share of its gradient by log_scale.

    ``row_lse``, ``col_lse``, ``row_kl``, ``weight_ce`` and ``weight_kl`` hold all N rows.
    With G the gradient by the logits,
    ``G_ij = w_ce_i (P_ij - d_ij) + w_kl_i (P_ij - Q_ij) + w_kl_j Q_ji (h_ji - k_j)``,
    the owner of rows I forms ``dS_I = kappa G_IJ T_J`` and ``dT_I = kappa G_JI^T S_J`` over
    every column tile J: complete gradients of its own rows, nothing for other rows.
    ``allow_tf32`` is the TF32 setting its forward ran under: the backward's products take the
    same one (on a GPU, float32), so that they form the forward's logits.
    """
    matmul = torch.backends.cuda.matmul
    before, matmul.allow_tf32 = matmul.allow_tf32, allow_tf32
    try:
        return _backward_rows(unit, norms, log_scale, row_lse, col_lse, row_kl, weight_ce,
                              weight_kl, row_begin, row_count, max_scale, grad_dtype, tile)
    finally:
        matmul.allow_tf32 = before


def _backward_rows(unit, norms, log_scale, row_lse, col_lse, row_kl, weight_ce, weight_kl,
                   row_begin, row_count, max_scale, grad_dtype, tile):
    n = unit.shape[1]
    _check_range(row_begin, row_count, n)
    tile = tile or DEFAULT_TILE
    s, t = unit[0], unit[1]
    acc = unit.dtype
    kappa = scale_of(log_scale, max_scale, acc)
    stats = torch.stack([row_lse, col_lse, row_kl, weight_ce.to(acc), weight_kl.to(acc)])
    grads_s, grads_t = [], []
    dkappa = torch.zeros((), dtype=acc, device=unit.device)
    for i0, i1 in _tiles(row_begin, row_begin + row_count, tile):
        s_rows, t_rows = s[i0:i1], t[i0:i1]
        r_i, c_i, k_i, wce_i, wkl_i = stats[:, i0:i1, None]
        ds = torch.zeros_like(s_rows)
        dt = torch.zeros_like(t_rows)
        for j0, j1 in _tiles(0, n, tile):
            r_j, c_j, k_j, wce_j, wkl_j = stats[:, None, j0:j1]
            cos_ij = s_rows @ t[j0:j1].T
            l_ij = kappa * cos_ij
            l_ji = kappa * (t_rows @ s[j0:j1].T)
            # Every exponent is <= 0: r and c are log-sum-exps over the very logits.
            p_ij, q_ij = torch.exp(l_ij - r_i), torch.exp(l_ji - c_i)
            q_ji, p_ji = torch.exp(l_ij - c_j), torch.exp(l_ji - r_j)
            on_diagonal = (torch.arange(i0, i1, device=unit.device)[:, None]
                           == torch.arange(j0, j1, device=unit.device)[None, :]).to(acc)
            h_ji = (l_ij - c_j) - (l_ji - r_j)
            h_ij = (l_ji - c_i) - (l_ij - r_i)
            g_ij = wce_i * (p_ij - on_diagonal) + wkl_i * (p_ij - q_ij) + wkl_j * q_ji * (h_ji - k_j)
            g_ji = wce_j * (p_ji - on_diagonal) + wkl_j * (p_ji - q_ji) + wkl_i * q_ij * (h_ij - k_i)
            ds += g_ij @ t[j0:j1]
            dt += g_ji @ s[j0:j1]
            dkappa = dkappa + (g_ij * cos_ij).sum()
        grads_s.append(_normalize_backward(kappa * ds, s_rows, norms[0, i0:i1]))
        grads_t.append(_normalize_backward(kappa * dt, t_rows, norms[1, i0:i1]))
    grad_log_scale = (dkappa * scale_grad_factor(log_scale, max_scale, acc)).reshape(
        log_scale.shape).to(log_scale.dtype)
    return (torch.cat(grads_s).to(grad_dtype), torch.cat(grads_t).to(grad_dtype),
            grad_log_scale)


def _normalize_backward(grad_unit: torch.Tensor, unit: torch.Tensor,
                        norm: torch.Tensor) -> torch.Tensor:
    """Back through unit = z / max(||z||, eps): (dS - s <s, dS>) / ||z||, or dS / eps."""
    dot = (unit * grad_unit).sum(1, keepdim=True)
    small = (norm < NORM_EPS)[:, None]
    return torch.where(small, grad_unit / NORM_EPS,
                       (grad_unit - unit * dot) / norm.clamp_min(NORM_EPS)[:, None])


def _check_range(row_begin: int, row_count: int, n: int) -> None:
    if row_count <= 0:
        raise ValueError(f"row_count must be > 0, got {row_count}")
    if not 0 <= row_begin <= n - row_count:
        raise ValueError(f"the rows [row_begin, row_begin + row_count) = [{row_begin}, "
                         f"{row_begin + row_count}) must lie within the N = {n} rows")
