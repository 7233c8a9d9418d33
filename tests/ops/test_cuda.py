"""The CUDA kernel on a GPU (marker `cuda`; skipped where there is none or it was not built):
the correctness matrix against the float64 oracle, opcheck, torch.compile, repeatability."""
import math
import re

import pytest
import torch

import icd_fast
from helpers import (assert_grads_match, assert_rel_close, loss_and_grads, oracle,
                     row_terms_oracle, weighted_rows_oracle)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not icd_fast.build_info()["cuda_kernel"], reason="CUDA kernel not built"),
]


def on_gpu(n, d, dtype, theta, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z_s = torch.randn(n, d, generator=gen).to("cuda", dtype)
    z_t = torch.randn(n, d, generator=gen).to("cuda", dtype)
    return z_s, z_t, torch.tensor(theta, device="cuda")


def fused(*args, **kwargs):
    return icd_fast.icd_loss(*args, backend="cuda", **kwargs)


@pytest.mark.parametrize("d", [1, 3, 128, 130, 1024, 2048])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 129, 1000])
def test_cuda_matches_oracle(n, d):
    for theta in [0.5, math.log(10.0), 3.0]:
        z_s, z_t, th = on_gpu(n, d, torch.float32, theta, seed=n + d)
        (loss, _, _), grads = loss_and_grads(fused, z_s, z_t, th)
        (want, _, _), w_grads = oracle(z_s.cpu(), z_t.cpu(), th.cpu())
        assert_rel_close(loss.cpu(), want, 1e-5, "loss", floor=1.0)
        assert_grads_match([g.cpu() for g in grads], w_grads, n, d, 1e-5, f"N={n} D={d}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_half_inputs(dtype):
    # Tensor cores where sm_80+ code runs: unit rows and logit gradients rounded to 16 bits.
    z_s, z_t, th = on_gpu(300, 128, dtype, 1.0)
    (loss, _, _), grads = loss_and_grads(fused, z_s, z_t, th)
    (want, _, _), w_grads = oracle(z_s.cpu(), z_t.cpu(), th.cpu())
    assert_rel_close(loss.cpu(), want, 3e-4, "loss")
    for got, ref in zip(grads, w_grads):
        assert_rel_close(got.cpu(), ref, 1e-2, "grad")


def device_code_arch():
    """The virtual arch of the code this build runs on the current GPU, from the build's arch
    list: a cubin of the GPU's major version and no newer minor, else the newest PTX at or
    below the GPU's compute capability (JIT-compiled), e.g. 75 for "7.5+PTX" on an H100."""
    major, minor = torch.cuda.get_device_capability()
    device = 10 * major + minor
    cubins, ptx = [], []
    for entry in re.split(r"[;, ]+", icd_fast.build_info()["cuda_archs"].strip()):
        if not entry:
            continue
        arch = int(round(10 * float(entry.replace("+PTX", "").rstrip("af"))))
        cubins.append(arch)
        if entry.endswith("+PTX"):
            ptx.append(arch)
    same_major = [a for a in cubins if a // 10 == major and a <= device]
    if same_major:
        return max(same_major)
    older_ptx = [a for a in ptx if a <= device]
    assert older_ptx, f"this build holds no code for compute capability {major}.{minor}"
    return max(older_ptx)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_half_inputs_follow_the_compiled_arch(dtype):
    # fp16/bf16 take the tensor cores exactly where this build's code for the GPU was compiled
    # for sm_80 or newer, and otherwise the CUDA cores (the same bits as float32 inputs of
    # the same values) instead of the tensor-core functions' __trap().
    z_s, z_t, th = on_gpu(200, 64, dtype, 1.0)
    loss = fused(z_s, z_t, th)
    as_float32 = fused(z_s.float(), z_t.float(), th)
    if device_code_arch() >= 80:
        assert not torch.equal(loss, as_float32)
    else:
        assert torch.equal(loss, as_float32)
    (want, _, _), _ = oracle(z_s.cpu(), z_t.cpu(), th.cpu())
    assert_rel_close(loss.cpu(), want, 3e-4, "loss")


def test_cuda_float32_takes_tf32_tensor_cores_only_when_torch_allows():
    z_s, z_t, th = on_gpu(300, 128, torch.float32, 1.0)
    assert not torch.backends.cuda.matmul.allow_tf32  # torch's default: exact fp32
    (exact, _, _), _ = loss_and_grads(fused, z_s, z_t, th)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        (loss, _, _), grads = loss_and_grads(fused, z_s, z_t, th)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    (want, _, _), w_grads = oracle(z_s.cpu(), z_t.cpu(), th.cpu())
    assert_rel_close(exact.cpu(), want, 1e-6, "fp32 loss")
    assert_rel_close(loss.cpu(), want, 3e-4, "tf32 loss")
    if device_code_arch() >= 80:
        assert not torch.equal(loss, exact)
    else:  # no tensor-core code in this build for the GPU: TF32 cannot apply
        assert torch.equal(loss, exact)
    for got, ref in zip(grads, w_grads):
        assert_rel_close(got.cpu(), ref, 3e-3, "tf32 grad")


def test_cuda_online_maximum_path():
    z_s, z_t, _ = on_gpu(500, 64, torch.float32, 0.0)
    th = torch.tensor(math.log(60.0), device="cuda")
    (loss, _, _), grads = loss_and_grads(fused, z_s, -z_s + 0.01 * z_t, th, max_scale=100.0)
    (want, _, _), w_grads = oracle(z_s.cpu(), (-z_s + 0.01 * z_t).cpu(), th.cpu(),
                                   max_scale=100.0)
    assert_rel_close(loss.cpu(), want, 1e-5, "loss")
    for got, ref in zip(grads, w_grads):
        assert_rel_close(got.cpu(), ref, 1e-4, "grad")


def test_cuda_float64_gradcheck():
    z_s, z_t, th = (x.double().requires_grad_() for x in on_gpu(37, 9, torch.float32, 1.3))
    assert torch.autograd.gradcheck(lambda a, b, c: fused(a, b, c), (z_s, z_t, th))
    (loss, _, _), grads = loss_and_grads(fused, z_s.detach(), z_t.detach(), th.detach())
    (want, _, _), w_grads = oracle(z_s.cpu(), z_t.cpu(), th.cpu())
    assert loss.dtype == torch.float64
    assert_rel_close(loss.cpu(), want, 1e-10, "loss")
    assert_grads_match([g.cpu() for g in grads], w_grads, 37, 9, 1e-9, "float64")


def test_cuda_repeats_bit_for_bit():
    z_s, z_t, th = on_gpu(3000, 128, torch.float32, 1.0)
    first = loss_and_grads(fused, z_s, z_t, th)
    second = loss_and_grads(fused, z_s, z_t, th)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


def test_cuda_opcheck():
    z_s, z_t, th = on_gpu(50, 40, torch.float32, 1.0)
    torch.library.opcheck(torch.ops.icd_fast.icd_forward.default, (z_s, z_t, th, 0.5, 10.0))


def test_cuda_torch_compile_fullgraph():
    torch._dynamo.reset()
    z_s, z_t, th = on_gpu(256, 64, torch.float32, 1.0)
    compiled = torch.compile(lambda a, b, c: fused(a, b, c), fullgraph=True)
    assert torch.equal(compiled(z_s, z_t, th), fused(z_s, z_t, th))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_launch_counts_at_small_n(dtype):
    # Launches dominate at small N: at most 3 kernels for the forward (normalise, the split
    # column sweep, its merge) and 4 for the backward (memset, operand rows for bf16, the
    # sweep, its merge), counted by the profiler.
    z_s, z_t, th = on_gpu(64, 128, dtype, math.log(10.0))
    z_s.requires_grad_(True)
    fused(z_s, z_t, th).backward()  # warm-up: the first call may load modules
    torch.cuda.synchronize()

    def launches(step):
        activities = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            result = step()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return result, names

    loss, forward_names = launches(lambda: fused(z_s, z_t, th))
    upstream = torch.ones_like(loss)  # made here, so that its fill is not counted below
    _, backward_names = launches(lambda: loss.backward(upstream))
    assert len([n for n in forward_names if "icd_fast" in n]) == 3, forward_names
    ours = [n for n in backward_names
            if "icd_fast" in n or "fill" in n.lower() or "memset" in n.lower()]
    assert 1 <= len(ours) <= 4, backward_names


# The row-range ops of the sharded loss (as tests/ops/test_cuda_emul.py checks them under the
# emulation): N = 1000 in three ranges that do not start on a 32-row tile, plus one row.
ROW_RANGES = [(0, 333), (333, 334), (667, 333)]


@pytest.mark.parametrize("theta,max_scale", [(math.log(10.0), 10.0), (math.log(60.0), 100.0)],
                         ids=["fixed-shift", "online-max"])
@pytest.mark.parametrize("dtype,stat_rtol,grad_rtol", [
    (torch.float64, 1e-10, 1e-9), (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 1e-2), (torch.bfloat16, 2e-2, 3e-2)], ids=str)
def test_cuda_row_ranges_match_whole(dtype, stat_rtol, grad_rtol, theta, max_scale):
    n, d = 1000, 64
    z_s, z_t, _ = on_gpu(n, d, dtype, theta, seed=16)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    th = torch.tensor(theta, device="cuda", dtype=acc)
    ops = torch.ops.icd_fast
    parts = [ops.icd_forward_rows(z_s, z_t, th, begin, count, max_scale)
             for begin, count in ROW_RANGES]
    stats = [torch.cat([p[m] for p in parts]) for m in range(4)]
    want_stats = row_terms_oracle(z_s.cpu(), z_t.cpu(), th.cpu(), max_scale=max_scale)
    for got, want in zip(stats, want_stats):
        assert got.dtype == acc
        assert_rel_close(got.cpu(), want, stat_rtol, f"row statistics {dtype}", floor=1.0)
    # The whole problem's op: the same sums, associated differently where the column sweep
    # is split differently (the split count follows the number of row tiles).
    whole = ops.icd_forward(z_s, z_t, th, 0.5, max_scale)
    for got, want in zip(stats[:3], whole[3:6]):
        assert_rel_close(got.cpu(), want.cpu(), 1e-12 if dtype == torch.float64 else 1e-5,
                         "row ops against icd_forward", floor=1.0)
    unit, norms = parts[0][4], parts[0][5]
    weight_ce = torch.empty(n, dtype=torch.float64)
    weight_kl = torch.empty(n, dtype=torch.float64)
    for b, (begin, count) in enumerate(ROW_RANGES):
        weight_ce[begin:begin + count] = (1.0 + 0.5 * b) / n
        weight_kl[begin:begin + count] = (0.25 - 0.6 * b) / n
    w_ce, w_kl = (w.to("cuda", acc) for w in (weight_ce, weight_kl))
    r, c, k = stats[:3]
    grads = [ops.icd_backward_rows(unit, norms, th, r, c, k, w_ce, w_kl, begin, count,
                                   max_scale, dtype, False) for begin, count in ROW_RANGES]
    got = [torch.cat([g[0] for g in grads]).cpu(), torch.cat([g[1] for g in grads]).cpu(),
           sum(g[2] for g in grads).cpu()]
    want = weighted_rows_oracle(z_s.cpu(), z_t.cpu(), th.cpu(), weight_ce, weight_kl,
                                max_scale=max_scale)
    assert_grads_match(got, want, n, d, grad_rtol, f"row ranges {dtype}")
    one = ops.icd_backward_rows(unit, norms, th, r, c, k, w_ce, w_kl, 500, 1, max_scale, dtype,
                                False)
    for m in range(2):
        assert_rel_close(one[m].cpu(), want[m][500:501], grad_rtol, "one-row range",
                         floor=want[m].abs().max().item())


def test_cuda_backward_takes_the_forwards_tf32_choice():
    # A TF32 context around the forward alone: the backward must still form the forward's
    # (TF32) logits, giving the same gradients as a run with TF32 on throughout.
    z_s, z_t, th = on_gpu(300, 128, torch.float32, 1.0)
    leaves = [x.clone().requires_grad_(True) for x in (z_s, z_t, th)]
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        _, throughout = loss_and_grads(fused, z_s, z_t, th)
        loss = fused(*leaves)
        torch.backends.cuda.matmul.allow_tf32 = False
        switched = torch.autograd.grad(loss, leaves)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    for a, b in zip(switched, throughout):
        assert torch.equal(a, b)
