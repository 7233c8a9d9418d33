"""The row-range operators of the sharded loss, on one process: the fused CPU ops
(torch.ops.icd_fast.icd_forward_rows / icd_backward_rows) and their blockwise PyTorch twin,
looped over ranges that cover the batch, against the float64 formulation of the authors.

The oracle forms the N x N logits in float64 and takes every per-row term from them: the
statistics r, c, k, CE of each row, and the gradient of sum_i (w_ce_i CE_i + w_kl_i k_i)
by autograd, with different weights per range (what ranks with different upstream
gradients produce)."""
import math

import pytest
import torch
import torch.nn.functional as F

from icd_fast import _ops, blockwise
from icd_fast.reference import icd_logits
from helpers import assert_rel_close, make_inputs

FUSED = pytest.param("cpu", marks=pytest.mark.skipif(not _ops.HAS_CPU_KERNEL,
                                                     reason="CPU kernel not built"))


def implementation(name):
    if name == "blockwise":
        return blockwise.forward_rows, blockwise.backward_rows
    return torch.ops.icd_fast.icd_forward_rows, torch.ops.icd_fast.icd_backward_rows


def per_row_terms(z_s, z_t, theta, max_scale):
    """(r, c, k, ce) per row from the float64 logits, differentiable."""
    logits = icd_logits(z_s, z_t, theta, max_scale=max_scale)
    r = torch.logsumexp(logits, 1)
    c = torch.logsumexp(logits, 0)
    log_p = F.log_softmax(logits, 1)
    log_q = F.log_softmax(logits, 0).T
    k = (log_q.exp() * (log_q - log_p)).sum(1)
    return r, c, k, r - logits.diagonal()


def split(n, parts):
    """Row ranges [begin, begin + count) covering n rows, unequal where n is not a multiple."""
    edges = [round(n * p / parts) for p in range(parts + 1)]
    return [(a, b - a) for a, b in zip(edges, edges[1:]) if b > a]


CASES = [  # n, d, theta, max_scale
    (1, 3, 1.0, 10.0),
    (7, 5, 0.5, 10.0),
    (130, 33, 1.0, 10.0),             # a ragged tile of the CPU kernel (128)
    (257, 16, math.log(20.0), 10.0),  # clamped scale: no gradient for theta
    (150, 8, math.log(50.0), 100.0),  # kappa above 32: the online-maximum path
]


@pytest.mark.parametrize("name", [FUSED, "blockwise"])
@pytest.mark.parametrize("n,d,theta,max_scale", CASES)
@pytest.mark.parametrize("parts", [1, 3])
def test_rows_match_the_float64_terms(name, n, d, theta, max_scale, parts):
    forward_rows, backward_rows = implementation(name)
    z_s, z_t, th = make_inputs(n, d, torch.float64, log_scale=theta, seed=n + parts)
    ranges = split(n, parts)
    weights = torch.empty(2, n, dtype=torch.float64)
    for q, (begin, count) in enumerate(ranges):  # each range its own upstream weights
        weights[0, begin:begin + count] = (1.0 + 0.5 * q) / n
        weights[1, begin:begin + count] = (0.5 - 0.7 * q) / n

    r, c, k, ce = per_row_terms(z_s, z_t, th, max_scale)
    objective = (weights[0] * ce + weights[1] * k).sum()
    want = torch.autograd.grad(objective, (z_s, z_t, th))

    stats, unit, norms = [], None, None
    for begin, count in ranges:
        *got, unit, norms = forward_rows(z_s.detach(), z_t.detach(), th.detach(), begin, count,
                                         max_scale)
        stats.append(torch.stack(got))
    stats = torch.cat(stats, dim=1)
    for got, expected, what in zip(stats, (r, c, k, ce), ("r", "c", "k", "ce")):
        assert_rel_close(got, expected, 1e-12, f"{name} {what}", floor=1e-6)

    grads_s, grads_t, grad_theta = [], [], 0.0
    for begin, count in ranges:
        g_s, g_t, g_th = backward_rows(unit, norms, th.detach(), stats[0], stats[1], stats[2],
                                       weights[0].contiguous(), weights[1].contiguous(),
                                       begin, count, max_scale, torch.float64, False)
        assert g_s.shape == (count, d) and g_t.shape == (count, d)
        grads_s.append(g_s)
        grads_t.append(g_t)
        grad_theta = grad_theta + g_th
    assert_rel_close(torch.cat(grads_s), want[0], 1e-11, f"{name} dz_s", floor=1e-4)
    assert_rel_close(torch.cat(grads_t), want[1], 1e-11, f"{name} dz_t", floor=1e-4)
    if math.exp(theta) > max_scale:
        assert grad_theta.item() == 0.0 and want[2].item() == 0.0
    else:
        assert_rel_close(grad_theta, want[2], 1e-11, f"{name} dtheta", floor=1e-4)


@pytest.mark.parametrize("name", [FUSED, "blockwise"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.float16, 2e-3),
                                        (torch.bfloat16, 1e-2)])
def test_rows_in_low_precision(name, dtype, rtol):
    forward_rows, backward_rows = implementation(name)
    n, d = 70, 24
    z_s, z_t, th = make_inputs(n, d, dtype, seed=5)
    r, c, k, ce = per_row_terms(z_s.double(), z_t.double(), th.double(), 10.0)
    *got, unit, norms = forward_rows(z_s.detach(), z_t.detach(), th.detach(), 20, 30, 10.0)
    acc = torch.float32
    assert all(x.dtype == acc for x in got) and unit.dtype == acc
    for x, expected in zip(got, (r, c, k, ce)):
        assert_rel_close(x, expected[20:50], rtol, f"{name} {dtype}", floor=1e-3)
    stats = [x.float().detach() for x in (r, c, k)]
    w = torch.full((n,), 1.0 / n)
    g_s, g_t, _ = backward_rows(unit, norms, th.detach(), *stats, w, w, 20, 30, 10.0, dtype,
                                False)
    assert g_s.dtype == dtype and g_t.dtype == dtype
    objective = ((ce + k) / n).sum()
    want = torch.autograd.grad(objective, (z_s, z_t))
    assert_rel_close(g_s, want[0][20:50], 20 * rtol, f"{name} {dtype} dz_s", floor=1e-9)
    assert_rel_close(g_t, want[1][20:50], 20 * rtol, f"{name} {dtype} dz_t", floor=1e-9)


@pytest.mark.skipif(not _ops.HAS_CPU_KERNEL, reason="CPU kernel not built")
def test_fused_rows_agree_with_blockwise_and_take_strided_inputs():
    n, d = 300, 40
    base = torch.randn(n, 2 * d, dtype=torch.float64)
    z_s, z_t = base[:, :d], base[:, d:]  # strided views, as the gathered features are
    th = torch.tensor(0.8, dtype=torch.float64)
    fused = torch.ops.icd_fast.icd_forward_rows(z_s, z_t, th, 129, 150, 10.0)
    block = blockwise.forward_rows(z_s, z_t, th, 129, 150, 10.0, tile=64)
    for a, b in zip(fused, block):
        assert_rel_close(a, b, 1e-13, "fused vs blockwise")


@pytest.mark.skipif(not _ops.HAS_CPU_KERNEL, reason="CPU kernel not built")
def test_fused_rows_give_the_same_bits_at_any_thread_count():
    z_s, z_t, th = make_inputs(300, 64, torch.float32, seed=2, requires_grad=False)
    n = z_s.shape[0]
    w = torch.full((n,), 1.0 / n)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            *stats, unit, norms = torch.ops.icd_fast.icd_forward_rows(z_s, z_t, th, 0, n, 10.0)
            grads = torch.ops.icd_fast.icd_backward_rows(unit, norms, th, *stats[:3], w, w, 0, 10,
                                                         10.0, torch.float32, False)
            grads = torch.ops.icd_fast.icd_backward_rows(unit, norms, th, *stats[:3], w, w, 40,
                                                         260, 10.0, torch.float32, False)
            results.append([*stats, *grads])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", [FUSED, "blockwise"])
def test_row_range_arguments_are_checked(name):
    forward_rows, backward_rows = implementation(name)
    z_s, z_t, th = make_inputs(10, 4, torch.float32, requires_grad=False)
    for begin, count in ((0, 0), (-1, 3), (8, 3), (0, 11)):
        with pytest.raises(ValueError, match="row"):
            forward_rows(z_s, z_t, th, begin, count, 10.0)
    *stats, unit, norms = forward_rows(z_s, z_t, th, 0, 10, 10.0)
    w = torch.full((10,), 0.1)
    with pytest.raises(ValueError, match="row"):
        backward_rows(unit, norms, th, *stats[:3], w, w, 5, 6, 10.0, torch.float32, False)
    if name != "blockwise":  # the blockwise twin trusts its own caller with the weights
        with pytest.raises(ValueError, match="per-row weights"):
            torch.ops.icd_fast.icd_backward_rows(unit, norms, th, *stats[:3], w[:9], w, 0, 10,
                                                 10.0, torch.float32, False)


@pytest.mark.skipif(not _ops.HAS_CPU_KERNEL, reason="CPU kernel not built")
def test_row_ops_pass_opcheck():
    z_s, z_t, th = make_inputs(20, 6, torch.float32, requires_grad=False)
    torch.library.opcheck(torch.ops.icd_fast.icd_forward_rows, (z_s, z_t, th, 5, 10, 10.0))
    *stats, unit, norms = torch.ops.icd_fast.icd_forward_rows(z_s, z_t, th, 0, 20, 10.0)
    w = torch.full((20,), 0.05)
    torch.library.opcheck(torch.ops.icd_fast.icd_backward_rows,
                          (unit, norms, th, *stats[:3], w, w, 5, 10, 10.0, torch.float32, False))
