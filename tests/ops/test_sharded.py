"""icd_fast.icd_loss_sharded with W = 1, 2, 3, 4 gloo processes against one process on the
concatenated batch: the loss and its parts, the gradients of each rank's rows and of theta,
for the fused CPU row kernels and the blockwise backend, in float64 (to 1e-10) and float32
(to 1e-5), with each rank weighting its returns differently (return_parts)."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import icd_fast
from icd_fast import _ops

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "distributed"))
from sharded_worker import global_inputs, upstream  # noqa: E402

BACKENDS = [pytest.param("cpu", marks=pytest.mark.skipif(not _ops.HAS_CPU_KERNEL,
                                                         reason="CPU kernel not built")),
            "blockwise"]


def plan_cases(world, backend):
    common = {"world": world, "backend": backend, "alpha": 0.5, "max_scale": 10.0,
              "theta": 1.0, "d": 6, "rows": 5, "dtype": torch.float64}
    cases = {
        "plain": {"seed": 1},
        "clamped": {"seed": 2, "theta": math.log(20.0)},        # no gradient for theta
        "online": {"seed": 3, "theta": math.log(50.0), "max_scale": 100.0},  # kappa > 32
        "tiny_row": {"seed": 4, "tiny_row": world * 5 - 2},      # ||z|| below eps
        "alpha0": {"seed": 5, "alpha": 0.0},
        "float32": {"seed": 6, "dtype": torch.float32, "rows": 40, "d": 16},
        "ragged": {"seed": 7, "rows": 70, "d": 9},                # 70 W rows: ragged tiles
    }
    return {name: {**common, **case} for name, case in cases.items()}


def launch(world, plan, tmp_path):
    plan_file = tmp_path / "plan.pt"
    torch.save(plan, plan_file)
    init_file = tmp_path / "init"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS / "distributed")])}
    procs = [subprocess.Popen([sys.executable, str(TESTS / "distributed" / "sharded_worker.py"),
                               str(rank), str(world), str(init_file), str(plan_file),
                               str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-6000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def one_process(case):
    """The oracle: the authors' formulation in float64 on the whole batch, each rank's share
    as the mean of its rows' terms, and the gradient of the weighted sum of all shares."""
    z_s, z_t = (x.double().requires_grad_(True) for x in global_inputs(case))
    theta = torch.tensor(case["theta"], dtype=torch.float64, requires_grad=True)
    logits = icd_fast.reference.icd_logits(z_s, z_t, theta, max_scale=case["max_scale"])
    r = torch.logsumexp(logits, 1)
    log_p = torch.log_softmax(logits, 1)
    log_q = torch.log_softmax(logits, 0).T
    ce_rows = r - logits.diagonal()
    kl_rows = (log_q.exp() * (log_q - log_p)).sum(1)
    rows, shares, objective = case["rows"], [], 0.0
    for rank in range(case["world"]):
        mine = slice(rank * rows, (rank + 1) * rows)
        ce, kl = ce_rows[mine].mean(), kl_rows[mine].mean()
        loss = ce + case["alpha"] * kl
        w_loss, w_ce, w_kl = upstream(rank)
        objective = objective + w_loss * loss + w_ce * ce + w_kl * kl
        shares.append((loss.detach(), ce.detach(), kl.detach()))
    grads = torch.autograd.grad(objective, (z_s, z_t, theta))
    whole = icd_fast.icd_loss_reference(z_s.detach(), z_t.detach(), theta.detach(),
                                        alpha=case["alpha"], max_scale=case["max_scale"])
    return shares, grads, whole


def check(results, cases):
    for name, case in cases.items():
        tol = 1e-10 if case["dtype"] == torch.float64 else 1e-5
        shares, (g_s, g_t, g_theta), whole = one_process(case)
        rows = case["rows"]
        got = [r[name] for r in results]
        for rank, (result, share) in enumerate(zip(got, shares)):
            for key, want in zip(("loss", "ce", "kl"), share):
                assert result[key].item() == pytest.approx(want.item(), rel=tol, abs=tol), (
                    name, rank, key)
            mine = slice(rank * rows, (rank + 1) * rows)
            for key, want in (("grad_z_s", g_s[mine]), ("grad_z_t", g_t[mine])):
                err = (result[key].double() - want).abs().max().item()
                assert err <= tol * max(want.abs().max().item(), 1e-3), (name, rank, key, err)
            assert result["grad_z_s"].dtype == case["dtype"]
            assert result["grad_bias"].item() == 0.0
        # The convention: the mean of the W returns is the loss of the concatenated batch ...
        mean = sum(r["loss"].double() for r in got) / len(got)
        assert mean.item() == pytest.approx(whole.item(), rel=tol, abs=tol), name
        # ... and theta's shares add up to the gradient of the sum of all returns.
        theta_total = sum(r["grad_theta"].double() for r in got)
        if math.exp(case["theta"]) > case["max_scale"]:
            assert theta_total.item() == 0.0 and g_theta.item() == 0.0
        else:
            assert theta_total.item() == pytest.approx(g_theta.item(), rel=tol, abs=tol), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_match_one_process_on_the_concatenated_batch(world, backend, tmp_path):
    cases = plan_cases(world, backend)
    results = launch(world, {"cases": cases, "check_unequal_rows": world == 2}, tmp_path)
    check(results, cases)
    if world == 2:
        for result in results:  # every rank raises the same clear error: no rank hangs
            assert "same number of rows B" in result["unequal_rows_error"]
            assert "rank 0: B=3" in result["unequal_rows_error"]


def test_without_a_process_group_it_is_icd_loss():
    z_s, z_t = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    for backend in ("auto", "blockwise"):
        got = icd_fast.icd_loss_sharded(z_s, z_t, 0.7, backend=backend, return_parts=True)
        want = icd_fast.icd_loss_reference(z_s, z_t, torch.tensor(0.7, dtype=torch.float64),
                                           return_parts=True)
        for a, b in zip(got, want):
            assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_the_reference_has_no_sharded_form():
    with pytest.raises(ValueError, match="no row-range form"):
        icd_fast.distributed.row_range_implementation("reference", torch.device("cpu"))
