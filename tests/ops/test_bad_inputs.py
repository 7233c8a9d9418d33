"""Bad input raises an exception that names the problem, through the Python API and through
the raw op (whose C++ checks guard direct torch.ops calls)."""
import pytest
import torch

import icd_fast

GOOD = dict(z_s=torch.randn(8, 4), z_t=torch.randn(8, 4), log_scale=torch.tensor(1.0))

CASES = [
    # (override, exception, message fragment)
    (dict(z_s=torch.randn(8)), ValueError, "z_s must be a 2-D"),
    (dict(z_t=torch.randn(2, 8, 4)), ValueError, "z_t must be a 2-D"),
    (dict(z_t=torch.randn(9, 4)), ValueError, "same number of rows"),
    (dict(z_t=torch.randn(8, 5)), ValueError, "same feature size"),
    (dict(z_s=torch.randn(0, 4), z_t=torch.randn(0, 4)), ValueError, "batch is empty"),
    (dict(z_s=torch.randn(8, 0), z_t=torch.randn(8, 0)), ValueError, "feature size D is 0"),
    (dict(z_s=torch.ones(8, 4, dtype=torch.int64), z_t=torch.ones(8, 4, dtype=torch.int64)),
     TypeError, "floating-point"),
    (dict(z_t=torch.randn(8, 4, dtype=torch.float64)), TypeError, "same dtype"),
    (dict(log_scale=torch.tensor([1.0, 2.0])), ValueError, "log_scale must hold exactly one"),
    (dict(log_scale=torch.ones(1, 1)), ValueError, "log_scale must hold exactly one"),
    (dict(log_scale=torch.tensor(1)), TypeError, "log_scale must be a floating-point"),
    (dict(z_t=torch.randn(8, 4, device="meta")), ValueError, "same device"),
]


@pytest.mark.parametrize("override,exc,message", CASES)
@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
def test_python_api_rejects(override, exc, message, backend):
    args = {**GOOD, **override}
    with pytest.raises(exc, match=message):
        icd_fast.icd_loss(args["z_s"], args["z_t"], args["log_scale"], backend=backend)


@pytest.mark.parametrize("override,exc,message", CASES)
def test_raw_op_rejects(override, exc, message):
    args = {**GOOD, **override}
    with pytest.raises(exc, match=message):
        torch.ops.icd_fast.icd_forward(args["z_s"], args["z_t"], args["log_scale"], 0.5, 10.0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(alpha=-0.1), "alpha must be a finite number >= 0"),
    (dict(alpha=float("nan")), "alpha must be a finite number >= 0"),
    (dict(max_scale=0.0), "max_scale must be"),
    (dict(max_scale=-3.0), "max_scale must be"),
    (dict(backend="tpu"), "backend must be one of"),
    (dict(backend="cuda"), "needs cuda tensors"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        icd_fast.icd_loss(GOOD["z_s"], GOOD["z_t"], GOOD["log_scale"], **kwargs)


@pytest.mark.parametrize("alpha,max_scale,message", [(-1.0, 10.0, "alpha"), (0.5, 0.0, "max_scale")])
def test_raw_op_rejects_bad_options(alpha, max_scale, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.icd_fast.icd_forward(GOOD["z_s"], GOOD["z_t"], GOOD["log_scale"], alpha,
                                       max_scale)


def test_raw_backward_rejects_mismatched_statistics():
    out = torch.ops.icd_fast.icd_forward(GOOD["z_s"], GOOD["z_t"], GOOD["log_scale"], 0.5, 10.0)
    g = torch.tensor(1.0)
    r, c, k, unit, norms = out[3:]
    with pytest.raises(ValueError, match="saved row statistics"):
        torch.ops.icd_fast.icd_backward(g, g, g, unit, norms, GOOD["log_scale"], r[:5], c, k,
                                        0.5, 10.0, torch.float32, False)
    with pytest.raises(ValueError, match=r"unit must be the \(2, N, D\)"):
        torch.ops.icd_fast.icd_backward(g, g, g, unit[0], norms, GOOD["log_scale"], r, c, k,
                                        0.5, 10.0, torch.float32, False)
    with pytest.raises(ValueError, match="norms must be"):
        torch.ops.icd_fast.icd_backward(g, g, g, unit, norms[:, :3], GOOD["log_scale"], r, c,
                                        k, 0.5, 10.0, torch.float32, False)


def test_bias_must_be_a_scalar():
    with pytest.raises(ValueError, match="bias"):
        icd_fast.icd_loss(GOOD["z_s"], GOOD["z_t"], GOOD["log_scale"], torch.zeros(3))


def test_non_tensor_features():
    with pytest.raises(TypeError, match="z_s must be a torch.Tensor"):
        icd_fast.icd_loss([[1.0]], GOOD["z_t"], GOOD["log_scale"])


@pytest.mark.parametrize("log_scale", [None, "1.0", [1.0], True])
def test_log_scale_of_another_type_is_named(log_scale):
    with pytest.raises(TypeError, match="log_scale must be a torch.Tensor .* or a Python number"):
        icd_fast.icd_loss(GOOD["z_s"], GOOD["z_t"], log_scale)
