"""The oracle itself: icd_loss_reference against the loss written out term by term."""
import math

import pytest
import torch

import icd_fast
from helpers import make_inputs


def loss_from_definition(z_s, z_t, theta, alpha, max_scale):
    """CE and KL of the ICD loss by explicit loops over the definition, in float64."""
    n = z_s.shape[0]
    s = [row / max(row.norm().item(), 1e-12) for row in z_s.double()]
    t = [row / max(row.norm().item(), 1e-12) for row in z_t.double()]
    kappa = min(math.exp(theta), max_scale)
    logits = [[kappa * float(s[i] @ t[j]) for j in range(n)] for i in range(n)]
    row_lse = [math.log(sum(math.exp(v) for v in logits[i])) for i in range(n)]
    col_lse = [math.log(sum(math.exp(logits[j][i]) for j in range(n))) for i in range(n)]
    ce = sum(row_lse[i] - logits[i][i] for i in range(n)) / n
    kl = 0.0
    for i in range(n):
        for j in range(n):
            log_q = logits[j][i] - col_lse[i]  # teacher i -> students
            log_p = logits[i][j] - row_lse[i]  # student i -> teachers
            kl += math.exp(log_q) * (log_q - log_p)
    kl /= n
    return ce, kl, ce + alpha * kl


@pytest.mark.parametrize("n,d,theta,alpha", [(1, 4, 1.0, 0.5), (5, 3, 0.3, 0.5),
                                             (9, 6, 2.5, 1.7), (6, 2, 4.0, 0.0)])
def test_reference_matches_the_definition(n, d, theta, alpha):
    z_s, z_t, _ = make_inputs(n, d, torch.float64, requires_grad=False, seed=n)
    loss, ce, kl = icd_fast.icd_loss_reference(
        z_s, z_t, torch.tensor(theta, dtype=torch.float64), alpha=alpha, max_scale=10.0,
        return_parts=True)
    want_ce, want_kl, want_loss = loss_from_definition(z_s, z_t, theta, alpha, 10.0)
    assert ce.item() == pytest.approx(want_ce, rel=1e-12, abs=1e-13)
    assert kl.item() == pytest.approx(want_kl, rel=1e-10, abs=1e-13)
    assert loss.item() == pytest.approx(want_loss, rel=1e-12, abs=1e-13)


def test_reference_bias_does_not_change_the_loss():
    z_s, z_t, _ = make_inputs(8, 5, torch.float64, requires_grad=False)
    theta = torch.tensor(1.0, dtype=torch.float64)
    bias = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    with_bias = icd_fast.icd_loss_reference(z_s, z_t, theta, bias)
    without = icd_fast.icd_loss_reference(z_s, z_t, theta)
    assert with_bias.item() == pytest.approx(without.item(), rel=1e-13)
    (grad,) = torch.autograd.grad(with_bias, bias)
    assert abs(grad.item()) < 1e-12
