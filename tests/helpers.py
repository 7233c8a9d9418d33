"""Shared test helpers: inputs, the float64 oracle, and norm-wise relative comparison."""
from __future__ import annotations

import torch

import icd_fast


def make_inputs(n, d, dtype=torch.float32, log_scale=1.0, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    z_s = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    z_t = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    theta = torch.tensor(float(log_scale),
                         dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    for x in (z_s, z_t, theta):
        x.requires_grad_(requires_grad)
    return z_s, z_t, theta


def loss_and_grads(fn, z_s, z_t, theta, **kwargs):
    """Runs fn (an icd_loss-like callable) forward and backward on fresh leaves."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (z_s, z_t, theta)]
    parts = fn(*leaves, return_parts=True, **kwargs)
    grads = torch.autograd.grad(parts[0], leaves)
    return [p.detach() for p in parts], list(grads)


def oracle(z_s, z_t, theta, **kwargs):
    """The official formulation in float64 on the same input values."""
    return loss_and_grads(icd_fast.icd_loss_reference, z_s.double(), z_t.double(),
                          theta.double(), **kwargs)


def assert_rel_close(actual, expected, rtol, what="", floor=1e-8):
    """max|actual - expected| <= rtol * max(max|expected|, floor), compared in float64."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(expected.abs().max().item(), floor)
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:.1e} * {scale:.3e}"


def assert_grads_match(grads, want_grads, n, d, rtol, what=""):
    """Feature and log-scale gradients against the oracle's, norm-wise relative. Where the
    exact gradient is 0 — everything at N = 1 (the loss is 0 for any input), the features'
    at D = 1 (a 1-D row normalises to +-1 whatever its value) — both sides hold only
    rounding noise, which is checked in absolute terms instead."""
    for got, want, name in zip(grads, want_grads, ["z_s", "z_t", "log_scale"]):
        if n == 1 or (d == 1 and name != "log_scale"):
            noise = 1e3 * torch.finfo(got.dtype).eps
            assert got.abs().max().item() <= noise, f"{what} grad {name}: should be ~0"
            continue
        assert_rel_close(got, want, rtol, f"{what} grad {name}", floor=1e-12)


def printed_table(text: str, name: str) -> dict:
    """The Markdown table titled `name` in the printout of `results`: first cell -> the
    row's cells (the header row under "method")."""
    rows, inside = {}, False
    for line in text.splitlines():
        if line and not line.startswith("|"):
            inside = line.startswith(name + " ")
        elif inside and line.startswith("| "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def row_terms_oracle(z_s, z_t, theta, max_scale=10.0):
    """The per-row terms of the loss in float64, straight from the N x N logits: r_i, c_i,
    k_i and CE_i = r_i - L_ii (the loss is mean(CE) + alpha mean(k)). Differentiable."""
    s = torch.nn.functional.normalize(z_s.double(), dim=1)
    t = torch.nn.functional.normalize(z_t.double(), dim=1)
    kappa = torch.clamp(theta.double().exp(), 0, max_scale)
    logits = kappa * s @ t.T
    log_p = torch.log_softmax(logits, dim=1)    # log P_ij
    log_q = torch.log_softmax(logits.T, dim=1)  # log Q_ij = log softmax_j(L_ji)
    r = torch.logsumexp(logits, dim=1)
    c = torch.logsumexp(logits, dim=0)
    k = (log_q.exp() * (log_q - log_p)).sum(dim=1)
    ce = -torch.diagonal(log_p)
    return r, c, k, ce


def weighted_rows_oracle(z_s, z_t, theta, weight_ce, weight_kl, max_scale=10.0):
    """float64 gradients of sum_i (weight_ce_i CE_i + weight_kl_i k_i) w.r.t. z_s, z_t, theta."""
    leaves = [x.detach().double().requires_grad_() for x in (z_s, z_t, theta)]
    _, _, k, ce = row_terms_oracle(*leaves, max_scale=max_scale)
    total = (weight_ce.double() * ce).sum() + (weight_kl.double() * k).sum()
    return torch.autograd.grad(total, leaves)
