"""backend="blockwise" (tiled plain PyTorch, icd_fast/blockwise.py) against the float64
oracle across shapes, dtypes, strides and scales; what it allocates; and what "auto" picks."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import icd_fast
from icd_fast import blockwise
from helpers import assert_grads_match, assert_rel_close, loss_and_grads, make_inputs, oracle

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3,
             torch.bfloat16: 1e-2}
FLOOR = {torch.float64: 1e-4, torch.float32: 1.0, torch.float16: 1.0, torch.bfloat16: 1.0}


def blockwise_loss(*args, **kwargs):
    return icd_fast.icd_loss(*args, backend="blockwise", **kwargs)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 32 rows, so that small batches already span several ragged tiles."""
    monkeypatch.setattr(blockwise, "DEFAULT_TILE", 32)


def compare(n, d, dtype, theta, seed=0, **kwargs):
    z_s, z_t, th = make_inputs(n, d, dtype, log_scale=theta, seed=seed)
    (loss, ce, kl), grads = loss_and_grads(blockwise_loss, z_s, z_t, th, **kwargs)
    (w_loss, w_ce, w_kl), want_grads = oracle(z_s, z_t, th, **kwargs)
    tol = TOLERANCE[dtype]
    for got, want, name in ((loss, w_loss, "loss"), (ce, w_ce, "ce"), (kl, w_kl, "kl")):
        assert_rel_close(got, want, tol, f"{name} N={n} D={d}", floor=FLOOR[dtype])
    assert [g.dtype for g in grads] == [dtype, dtype, th.dtype]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_grads_match(grads, want_grads, n, d, tol * (10 if dtype in (torch.float16, torch.bfloat16) else 1),
                       f"N={n} D={d} theta={theta}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n,d", [(1, 3), (2, 1), (7, 128), (33, 130), (100, 17)])
def test_matches_oracle(small_tiles, n, d, dtype):
    for theta in (0.5, math.log(10.0), 3.0):  # below, at and above the clamp
        compare(n, d, dtype, theta, seed=n + d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sixteen_bit_inputs_accumulate_in_float32(small_tiles, dtype):
    compare(70, 24, dtype, 1.0)


@pytest.mark.parametrize("scale", [31.9, 32.1, 54.6])
def test_large_scales(small_tiles, scale):
    compare(90, 16, torch.float64, math.log(scale), max_scale=100.0)
    compare(90, 16, torch.float32, math.log(scale), max_scale=100.0)


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_alpha(small_tiles, alpha):
    compare(40, 9, torch.float64, 1.0, alpha=alpha)


def test_strided_inputs(small_tiles):
    base = torch.randn(50, 20, dtype=torch.float64)
    z_s, z_t = base[:, ::2], base.T[:10].T.flip(0)  # a step of 2, and a transposed flip
    th = torch.tensor(0.9, dtype=torch.float64)
    got = blockwise_loss(z_s, z_t, th, return_parts=True)
    want = icd_fast.icd_loss_reference(z_s, z_t, th, return_parts=True)
    for a, b in zip(got, want):
        assert a.item() == pytest.approx(b.item(), rel=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "blockwise"])
@pytest.mark.parametrize("scale", [1e10, 1.3e19, 1e100, 1e300])
def test_float64_loss_stays_finite_at_any_scale(backend, scale):
    # With max_scale raised, every logit gap is about 2 kappa. The vectorised libm exp of the
    # CPU kernel's loops returned garbage below about -9.2e18 (NaN losses from 1.3e19 on).
    z_s, z_t, _ = make_inputs(20, 4, torch.float64, requires_grad=False)
    th = torch.tensor(math.log(scale), dtype=torch.float64)
    got = icd_fast.icd_loss(z_s, z_t, th, max_scale=1e308, backend=backend, return_parts=True)
    assert all(math.isfinite(x.item()) for x in got), got
    # The loss is linear in kappa for such scales (each softmax is one-hot): compare with
    # the loss at 1e10 scaled up, which the reference computes exactly.
    th_ref = torch.tensor(math.log(1e10), dtype=torch.float64)
    base = icd_fast.icd_loss_reference(z_s, z_t, th_ref, max_scale=1e308)
    assert got[0].item() == pytest.approx(base.item() * (scale / 1e10), rel=1e-9)


class LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(x, torch.Tensor) and x.numel() > self.largest:
                self.largest, self.op = x.numel(), func
        return out


def test_no_buffer_of_n_by_n_or_b_by_n_elements(monkeypatch):
    # Every tensor any op returns during forward and backward, with tiles of 64 rows at
    # N = 1024, D = 16: the largest is O(N D) (the unit features, 2 N D) or a tile (64^2).
    monkeypatch.setattr(blockwise, "DEFAULT_TILE", 64)
    n, d = 1024, 16
    z_s, z_t, th = make_inputs(n, d, torch.float32, seed=1)
    with LargestOutput() as seen:
        loss = blockwise_loss(z_s, z_t, th)
        loss.backward()
    assert seen.largest <= max(2 * n * d, 64 * 64), (seen.largest, seen.op)
    # The check sees the reference's N x N logits, so it can fail:
    with LargestOutput() as reference:
        icd_fast.icd_loss(z_s, z_t, th, backend="reference").backward()
    assert reference.largest >= n * n
