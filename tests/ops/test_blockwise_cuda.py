"""The blockwise backend and the sharded loss's row ranges on a GPU (marker `cuda`; skipped
where there is none): what backend="auto" gives CUDA tensors until the fused CUDA kernel is
verified, so the first GPU session checks it against the float64 oracle (run by
bench/gpu_session.sh's quick stage beside test_cuda.py)."""
import math

import pytest
import torch

import icd_fast
from icd_fast import _ops, blockwise
from helpers import assert_grads_match, assert_rel_close, loss_and_grads, oracle

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2,
             torch.float16: 2e-3}


def inputs(n, d, dtype, theta, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z_s = torch.randn(n, d, generator=gen).to("cuda", dtype)
    z_t = torch.randn(n, d, generator=gen).to("cuda", dtype)
    return z_s, z_t, torch.tensor(theta, device="cuda",
                                  dtype=torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("n,d,theta,max_scale", [(1, 3, 1.0, 10.0), (129, 130, 1.0, 10.0),
                                                 (1500, 64, math.log(20.0), 10.0),
                                                 (300, 16, math.log(50.0), 100.0)])
def test_blockwise_on_the_gpu_matches_the_oracle(monkeypatch, dtype, n, d, theta, max_scale):
    monkeypatch.setattr(blockwise, "DEFAULT_TILE", 256)  # several ragged tiles
    z_s, z_t, th = inputs(n, d, dtype, theta, seed=n)
    parts, grads = loss_and_grads(icd_fast.icd_loss, z_s, z_t, th, backend="blockwise",
                                  max_scale=max_scale)
    want, want_grads = oracle(z_s.cpu(), z_t.cpu(), th.cpu(), max_scale=max_scale)
    tol = TOLERANCE[dtype]
    for got, expected in zip(parts, want):
        assert got.device.type == "cuda"
        assert_rel_close(got.cpu(), expected, tol, f"N={n} {dtype}", floor=1.0)
    assert_grads_match([g.cpu() for g in grads], want_grads, n, d,
                       tol * (10 if dtype in (torch.float16, torch.bfloat16) else 1),
                       f"N={n} D={d} {dtype}")


def test_auto_on_cuda_is_blockwise_until_the_kernel_is_verified():
    z_s, z_t, th = inputs(200, 32, torch.float32, 1.0)
    if _ops.CUDA_KERNEL_VERIFIED_ON_GPU:
        pytest.skip("the CUDA kernel is verified: auto takes it")
    with pytest.warns(UserWarning, match="blockwise"):
        got = icd_fast.icd_loss(z_s, z_t, th)
    want = icd_fast.icd_loss(z_s, z_t, th, backend="blockwise")
    assert torch.equal(got, want)


def test_blockwise_peak_memory_is_o_n_d():
    n, d = 16384, 128
    z_s, z_t, th = inputs(n, d, torch.float32, 1.0)
    z_s.requires_grad_(True)
    z_t.requires_grad_(True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    icd_fast.icd_loss(z_s, z_t, th, backend="blockwise").backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # The unit rows and gradients (a few N D) and about ten 1024 x 1024 tiles; one N x N fp32
    # buffer alone would be 1 GiB.
    assert peak < 12 * n * d * 4 + 12 * 1024 * 1024 * 4, peak
    assert peak < n * n * 4 / 8
