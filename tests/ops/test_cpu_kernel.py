"""The fused CPU kernel against the float64 oracle, and its numerical edge cases."""
import math

import pytest
import torch

import icd_fast
from allocation_counter import measure_icd_allocations
from helpers import assert_grads_match, assert_rel_close, loss_and_grads, make_inputs, oracle

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
# The loss's rounding error is about eps * kappa in absolute terms whatever its value, so a
# loss near 0 (N = 1) is compared against this floor instead of its own size.
FLOOR = {torch.float64: 1e-4, torch.float32: 1.0}
SIZES_N = [1, 2, 3, 7, 64, 129, 1000]
SIZES_D = [1, 3, 128, 130, 1024]
# exp(theta) below the clamp, exactly at it (the gradient still passes there), and above it.
THETAS = [0.5, math.log(10.0), 3.0]


def fused(*args, **kwargs):
    return icd_fast.icd_loss(*args, backend="cpu", **kwargs)


def test_the_cpu_kernel_was_built():
    info = icd_fast.build_info()
    assert info["extension"], info.get("error")
    assert info["cpu_kernel"]


def compare_with_oracle(n, d, dtype, theta, seed=0, **kwargs):
    z_s, z_t, th = make_inputs(n, d, dtype, log_scale=theta, seed=seed)
    (loss, ce, kl), grads = loss_and_grads(fused, z_s, z_t, th, **kwargs)
    (want_loss, want_ce, want_kl), want_grads = oracle(z_s, z_t, th, **kwargs)
    tol = TOLERANCE[dtype]
    for got, want, name in [(loss, want_loss, "loss"), (ce, want_ce, "ce"), (kl, want_kl, "kl")]:
        assert_rel_close(got, want, tol, f"{name} N={n} D={d}", floor=FLOOR[dtype])
    assert [g.dtype for g in grads] == [dtype, dtype, th.dtype]
    assert_grads_match(grads, want_grads, n, d, tol, f"N={n} D={d} theta={theta}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("d", SIZES_D)
@pytest.mark.parametrize("n", SIZES_N)
def test_matches_oracle(n, d, dtype):
    for theta in THETAS:
        compare_with_oracle(n, d, dtype, theta, seed=n * 31 + d)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
def test_alpha(alpha):
    compare_with_oracle(65, 17, torch.float64, 1.0, alpha=alpha)


def test_log_scale_gradient_is_zero_above_the_clamp_and_passes_at_it():
    z_s, z_t, _ = make_inputs(20, 8, torch.float64)
    above = torch.tensor(math.log(10.0) + 0.1, requires_grad=True)
    (g_above,) = torch.autograd.grad(fused(z_s, z_t, above), above)
    assert g_above.item() == 0.0
    # max_scale equal to exp(theta) itself: the clamp is active but passes the gradient,
    # which must then equal the unclamped gradient.
    at = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    (g_at,) = torch.autograd.grad(fused(z_s, z_t, at, max_scale=math.exp(1.5)), at)
    (g_free,) = torch.autograd.grad(fused(z_s, z_t, at, max_scale=5.0), at)
    assert g_at.item() != 0.0
    assert g_at.item() == pytest.approx(g_free.item(), rel=1e-12)


@pytest.mark.parametrize("scale", [31.9, 32.1, 54.6])
def test_fixed_shift_and_online_maximum_paths(scale):
    # The kernel switches from the fixed shift to the online maximum above a scale of 32.
    compare_with_oracle(300, 16, torch.float64, math.log(scale), max_scale=100.0)
    compare_with_oracle(300, 16, torch.float32, math.log(scale), max_scale=100.0)


def test_large_scale_with_nearly_opposite_features_stays_finite():
    gen = torch.Generator().manual_seed(3)
    z_s = torch.randn(257, 32, generator=gen)
    z_t = -z_s + 1e-3 * torch.randn(257, 32, generator=gen)
    th = torch.tensor(math.log(100.0))
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
        (loss, _, _), grads = loss_and_grads(fused, z_s.to(dtype), z_t.to(dtype), th,
                                             max_scale=100.0)
        (want, _, _), want_grads = oracle(z_s.to(dtype), z_t.to(dtype), th, max_scale=100.0)
        assert torch.isfinite(loss) and loss.item() > 100  # about 2 * kappa
        assert_rel_close(loss, want, tol, "loss")
        for got, ref in zip(grads, want_grads):
            assert_rel_close(got, ref, tol, "grad")


def test_bias_gradient_is_exactly_zero_and_loss_ignores_bias():
    # The bias never reaches the kernel (it cancels in every softmax, DESIGN.md 1), so this
    # checks the API's promise for drop-in use, not the kernel's arithmetic: icd_loss takes a
    # bias, leaves the loss unchanged by it and hands autograd a gradient of exactly +0 (not
    # None), so optimisers that expect a gradient for every parameter keep working.
    z_s, z_t, th = make_inputs(33, 9, torch.float32)
    bias = torch.tensor(0.7, requires_grad=True)
    loss = fused(z_s, z_t, th, bias)
    assert loss.item() == fused(z_s, z_t, th).item()
    (g,) = torch.autograd.grad(loss, bias)
    assert g.item() == 0.0 and not torch.signbit(g)


def test_gradcheck_float64():
    z_s, z_t, _ = make_inputs(9, 5, torch.float64)
    th = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: fused(a, b, c), (z_s, z_t, th))
    # The contrastive and invariance terms separately.
    assert torch.autograd.gradcheck(lambda a, b, c: fused(a, b, c, return_parts=True)[1:],
                                    (z_s, z_t, th))


def test_parts_add_up():
    z_s, z_t, th = make_inputs(40, 12, torch.float64)
    loss, ce, kl = fused(z_s, z_t, th, alpha=0.7, return_parts=True)
    assert loss.item() == pytest.approx(ce.item() + 0.7 * kl.item(), rel=1e-14)
    assert kl.item() >= 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs(dtype):
    z_s, z_t, th = make_inputs(130, 64, dtype)
    (loss, _, _), grads = loss_and_grads(fused, z_s, z_t, th)
    (want, _, _), want_grads = oracle(z_s, z_t, th)  # same (rounded) values, in float64
    assert loss.dtype == torch.float32
    assert_rel_close(loss, want, 1e-5, "loss")
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    grad_tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # the gradient is rounded to dtype
    for got, ref in zip(grads, want_grads):
        assert_rel_close(got, ref, grad_tol, "grad")


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(70, 2 * 33, generator=gen, dtype=torch.float64)
    z_s = wide[:, ::2]  # strided columns
    z_t = torch.randn(33, 70, generator=gen, dtype=torch.float64).t()  # transposed
    assert not z_s.is_contiguous() and not z_t.is_contiguous()
    th = torch.tensor(1.2, dtype=torch.float64)
    (loss, _, _), grads = loss_and_grads(fused, z_s, z_t, th)
    (want, _, _), want_grads = oracle(z_s, z_t, th)
    assert_rel_close(loss, want, 1e-12, "loss")
    assert_grads_match(grads, want_grads, 70, 33, 1e-10, "strided inputs")
    assert grads[0].shape == z_s.shape and grads[1].shape == z_t.shape


def test_matches_oracle_above_a_thousand_rows_float64():
    # N = 4097 = 32 full 128-row tiles and a ragged one-row tile, D = 257 odd: every
    # scheduling round of the tile pairs, the diagonal tiles and the ragged edges take part.
    compare_with_oracle(4097, 257, torch.float64, 1.0, seed=11)


def test_repeated_calls_give_the_same_bits():
    z_s, z_t, th = make_inputs(700, 64, torch.float32)
    first_parts, first_grads = loss_and_grads(fused, z_s, z_t, th)
    for _ in range(3):
        parts, grads = loss_and_grads(fused, z_s, z_t, th)
        assert all(torch.equal(a, b) for a, b in zip(parts, first_parts))
        assert all(torch.equal(a, b) for a, b in zip(grads, first_grads))


def test_thread_count_does_not_change_the_bits():
    # Each row meets its tile pairs in the same order whatever the thread count (the rounds
    # of the schedule run one after another), so 1, 2 and 3 threads agree bit for bit.
    z_s, z_t, th = make_inputs(600, 32, torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            parts, grads = loss_and_grads(fused, z_s, z_t, th)
            results.append(parts + grads)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_zero_rows_follow_the_eps_rule():
    z_s, z_t, th = make_inputs(12, 6, torch.float64)
    z_s = z_s.detach().clone()
    z_s[3] = 0.0
    z_t = z_t.detach().clone()
    z_t[5] = 1e-14  # norm below eps: divided by eps, not by its norm
    (loss, _, _), grads = loss_and_grads(fused, z_s, z_t, th)
    (want, _, _), want_grads = oracle(z_s, z_t, th)
    assert_rel_close(loss, want, 1e-10)
    for got, ref in zip(grads, want_grads):
        assert_rel_close(got, ref, 1e-10)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_inputs_give_nan_loss(bad):
    z_s, z_t, th = make_inputs(50, 8, torch.float32)
    z_s = z_s.detach().clone()
    z_s[7, 2] = bad
    loss = fused(z_s, z_t, th)
    assert torch.isnan(loss)
    nan_theta = torch.tensor(float("nan"))
    assert torch.isnan(fused(z_s.detach().nan_to_num(0.0), z_t, nan_theta))


@pytest.mark.parametrize("backend", ["cpu", "blockwise"])
@pytest.mark.parametrize("theta_needs_grad", [True, False])
def test_double_backward_raises_whenever_a_graph_is_created(backend, theta_needs_grad):
    # Whatever needs a gradient: with a fixed theta the gradient's graph would silently miss
    # the loss's second derivatives (a gradient penalty then trains on a wrong gradient).
    z_s, z_t, th = make_inputs(6, 4, torch.float64)
    th.requires_grad_(theta_needs_grad)
    loss = icd_fast.icd_loss(z_s, z_t, th, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, z_s, create_graph=True)
    loss = icd_fast.icd_loss(z_s, z_t, th, backend=backend)
    (g,) = torch.autograd.grad(loss, z_s)  # a first-order gradient still works
    assert torch.isfinite(g).all()


def test_gradient_penalty_through_a_fixed_scale_module_is_refused_not_wrong():
    # The case of the report: ICDLoss(learnable=False) with a gradient penalty.
    torch.manual_seed(0)
    criterion = icd_fast.ICDLoss(8, 8, 4, learnable=False, temperature=0.5)
    x = torch.randn(10, 8, requires_grad=True)
    loss = criterion(x, torch.randn(10, 8))
    with pytest.raises(RuntimeError, match="backend='reference'"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("threads", [2, 32])
def test_extra_memory_is_a_few_n_by_d_whatever_the_thread_count(threads):
    # Every byte allocated during one forward and backward, counted by a malloc wrapper in a
    # child process (32 threads run fine on 2 cores). What must exist: the unit features saved
    # for the backward (2 N D) and the two gradients (2 N D), plus a few tiles per busy worker.
    # A private N x D gradient per worker (the old design) costs 2 N D more per thread.
    n, d = 4096, 256
    measured = measure_icd_allocations(n, d, threads, "float32")
    assert measured["threads"] == threads
    n_by_d = n * d * 4
    assert measured["forward_kept_bytes"] >= 2 * n_by_d  # the counter sees torch's tensors
    assert measured["forward_peak_bytes"] <= 3 * n_by_d, measured
    assert measured["step_peak_bytes"] <= 6 * n_by_d, measured
    assert measured["step_peak_bytes"] < n * n * 4, measured  # not even one N x N buffer
