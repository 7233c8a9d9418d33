"""Property-based checks of the fused CPU kernel against the float64 oracle."""
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import icd_fast
from helpers import assert_rel_close, loss_and_grads, oracle


def fused(*args, **kwargs):
    return icd_fast.icd_loss(*args, backend="cpu", **kwargs)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 300))
    d = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    z_s = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z_t = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if draw(st.booleans()) and n > 1:  # duplicated rows
        z_s[n // 2] = z_s[0]
        z_t[-1] = z_t[0]
    if draw(st.booleans()):  # a zero row
        z_s[draw(st.integers(0, n - 1))] = 0.0
    if draw(st.booleans()):  # huge or tiny norms on a few rows
        rows = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3))
        z_t[rows] *= draw(st.sampled_from([1e-30, 1e-8, 1e8, 1e150]))
    max_scale = draw(st.sampled_from([10.0, 100.0]))
    theta = draw(st.floats(-3.0, math.log(max_scale) + 1.0))
    alpha = draw(st.floats(0.0, 3.0))
    return z_s, z_t, torch.tensor(theta, dtype=torch.float64), alpha, max_scale


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_fused_matches_oracle_float64(problem):
    z_s, z_t, th, alpha, max_scale = problem
    (loss, ce, kl), grads = loss_and_grads(fused, z_s, z_t, th, alpha=alpha, max_scale=max_scale)
    (w_loss, w_ce, w_kl), w_grads = oracle(z_s, z_t, th, alpha=alpha, max_scale=max_scale)
    for got, want in [(loss, w_loss), (ce, w_ce), (kl, w_kl)]:
        assert_rel_close(got, want, 1e-9, "loss", floor=1e-4)
    for got, want, name in zip(grads, w_grads, ["z_s", "z_t", "theta"]):
        # Rows scaled by 1e150 have gradients ~1e-150: compare each row on its own scale.
        if name != "theta":
            scale = (z_s if name == "z_s" else z_t).norm(dim=1, keepdim=True).clamp_min(1e-12)
            got, want = got * scale, want * scale
        assert_rel_close(got, want, 1e-8, f"grad {name}", floor=1e-4)


@settings(max_examples=25, deadline=None)
@given(problems())
def test_fused_float32_is_close(problem):
    z_s, z_t, th, alpha, max_scale = problem
    assume(z_t.abs().max() <= 1e30)  # beyond float32's range otherwise
    z_s, z_t = z_s.float(), z_t.float()
    (loss, _, _), _ = loss_and_grads(fused, z_s, z_t, th.float(), alpha=alpha,
                                     max_scale=max_scale)
    (want, _, _), _ = oracle(z_s, z_t, th.float(), alpha=alpha, max_scale=max_scale)
    assert_rel_close(loss, want, 1e-5, "loss", floor=max_scale / 10)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 80), st.integers(1, 16), st.floats(0.0, 2.0))
def test_loss_is_invariant_to_row_scaling(n, d, log_scale):
    gen = torch.Generator().manual_seed(n * 100 + d)
    z_s = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z_t = torch.randn(n, d, generator=gen, dtype=torch.float64)
    th = torch.tensor(log_scale, dtype=torch.float64)
    base = fused(z_s, z_t, th).item()
    scales = torch.rand(n, 1, generator=gen, dtype=torch.float64) * 10 + 0.1
    assert fused(z_s * scales, z_t, th).item() == pytest.approx(base, rel=1e-12, abs=1e-12)
