"""The registered ops: opcheck, torch.compile without graph breaks, backend selection."""
import re
import warnings

import pytest
import torch

import icd_fast
from icd_fast import _ops, functional
from helpers import make_inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck_forward(dtype):
    z_s, z_t, th = make_inputs(37, 10, dtype)
    torch.library.opcheck(torch.ops.icd_fast.icd_forward.default, (z_s, z_t, th, 0.5, 10.0))


def test_opcheck_backward():
    z_s, z_t, th = make_inputs(21, 6, torch.float32, requires_grad=False)
    out = torch.ops.icd_fast.icd_forward(z_s, z_t, th, 0.5, 10.0)
    g = torch.tensor(1.0)
    torch.library.opcheck(torch.ops.icd_fast.icd_backward.default,
                          (g, g * 0.5, g * 2.0, out[6], out[7], th, out[3], out[4], out[5], 0.5,
                           10.0, torch.float32, False),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    z_s, z_t, th = make_inputs(150, 24, torch.float32)

    def step(a, b, c):
        return icd_fast.icd_loss(a, b, c, backend="cpu", return_parts=True)

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    eager_leaves = [x.detach().clone().requires_grad_() for x in (z_s, z_t, th)]
    compiled_leaves = [x.detach().clone().requires_grad_() for x in (z_s, z_t, th)]
    eager_parts = step(*eager_leaves)
    compiled_parts = compiled(*compiled_leaves)
    for a, b in zip(eager_parts, compiled_parts):
        assert torch.equal(a, b)
    (eager_parts.loss + eager_parts.invariance).backward()
    (compiled_parts.loss + compiled_parts.invariance).backward()
    for a, b in zip(eager_leaves, compiled_leaves):
        assert torch.equal(a.grad, b.grad)


def test_auto_picks_the_cpu_kernel(monkeypatch):
    z_s, z_t, th = make_inputs(10, 4, torch.float32)
    calls = []
    real = _ops.fused_forward
    monkeypatch.setattr(_ops, "fused_forward", lambda *a: calls.append(1) or real(*a))
    icd_fast.icd_loss(z_s, z_t, th)
    assert calls == [1]


def test_auto_falls_back_to_blockwise_and_says_so_once(monkeypatch):
    monkeypatch.setattr(_ops, "HAS_CPU_KERNEL", False)
    monkeypatch.setattr(functional, "_warned_fallback", set())
    z_s, z_t, th = make_inputs(10, 4, torch.float64)
    with pytest.warns(UserWarning, match="blockwise .* for cpu tensors: .*built without"):
        loss = icd_fast.icd_loss(z_s, z_t, th)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        icd_fast.icd_loss(z_s, z_t, th)
    assert loss.item() == pytest.approx(icd_fast.icd_loss_reference(z_s, z_t, th).item())
    with pytest.raises(RuntimeError, match="not available"):
        icd_fast.icd_loss(z_s, z_t, th, backend="cpu")


def test_build_info_reports_what_was_built():
    info = icd_fast.build_info()
    assert info["cpu_kernel"] is True
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda_kernel"], bool)
    archs = [a for a in re.split(r"[;\s]+", info["cuda_archs"]) if a]
    if info["cuda_kernel"]:
        # The TORCH_CUDA_ARCH_LIST the kernels were compiled for, e.g. "8.0;9.0" or "7.5+PTX".
        assert archs, "a CUDA build must name the architectures it compiled for"
        for arch in archs:
            assert re.fullmatch(r"\d+\.\d+[af]?(\+PTX)?", arch), f"not an architecture: {arch!r}"
    else:
        assert archs == [], f"a CPU-only build names CUDA architectures: {info['cuda_archs']!r}"


def test_python_number_log_scale_is_a_fixed_scale():
    z_s, z_t, _ = make_inputs(12, 5, torch.float64, requires_grad=False)
    got = icd_fast.icd_loss(z_s, z_t, 1.3)
    want = icd_fast.icd_loss_reference(z_s, z_t, torch.tensor(1.3, dtype=torch.float64))
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


def test_auto_leaves_the_unverified_cuda_kernel_to_explicit_use(monkeypatch):
    monkeypatch.setattr(_ops, "CUDA_KERNEL_VERIFIED_ON_GPU", False)
    assert "not yet been verified" in functional._why_auto_skips("cuda", "cuda")
    assert functional._resolve_backend("auto", torch.device("cuda")) == "blockwise"
    assert functional._resolve_backend("auto", torch.device("meta")) == "blockwise"
    monkeypatch.setattr(_ops, "CUDA_KERNEL_VERIFIED_ON_GPU", True)
    assert functional._why_auto_skips("cuda", "cuda") is None
    assert functional._why_auto_skips("cpu", "cpu") is None
    assert "without a xpu kernel" in functional._why_auto_skips("xpu", None)


def test_backward_is_handed_the_forwards_tf32_setting(monkeypatch):
    # The CUDA backward must take the TF32 choice of its forward (the CPU kernel ignores the
    # argument): the autograd rule saves torch's setting at forward time and passes it on,
    # whatever the setting is when the backward runs.
    handed = []
    real_backward = torch.ops.icd_fast.icd_backward

    def spy(*args):
        handed.append(args[-1])
        return real_backward(*args)

    monkeypatch.setattr(torch.ops.icd_fast, "icd_backward", spy)
    z_s, z_t, th = make_inputs(9, 4, torch.float32)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for at_forward in (True, False):
            torch.backends.cuda.matmul.allow_tf32 = at_forward
            loss = icd_fast.icd_loss(z_s, z_t, th, backend="cpu")
            torch.backends.cuda.matmul.allow_tf32 = not at_forward
            loss.backward()
            assert handed[-1] is at_forward
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert len(handed) == 2
