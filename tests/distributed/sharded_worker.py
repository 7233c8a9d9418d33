"""One rank of tests/ops/test_sharded.py: joins a gloo group through a file, runs every case of
the plan on its own rows with icd_fast.icd_loss_sharded and saves what it got."""
import sys

import torch
import torch.distributed as dist

import icd_fast


def global_inputs(case):
    """The global batch (N = W B rows), the same on every rank and in the test."""
    gen = torch.Generator().manual_seed(case["seed"])
    n, d = case["world"] * case["rows"], case["d"]
    z_s = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z_t = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if case.get("tiny_row") is not None:
        z_s[case["tiny_row"]] *= 1e-14  # below the normalisation floor eps = 1e-12
    return z_s.to(case["dtype"]), z_t.to(case["dtype"])


def upstream(rank):
    """Each rank weights its returns differently: (loss, contrastive, invariance)."""
    return 1.0 + 0.5 * rank, 0.25 * rank, -0.5 + 0.3 * rank


def run_case(case, rank):
    z_s, z_t = global_inputs(case)
    rows = case["rows"]
    mine = slice(rank * rows, (rank + 1) * rows)
    z_s = z_s[mine].clone().requires_grad_(True)
    z_t = z_t[mine].clone().requires_grad_(True)
    theta_dtype = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    theta = torch.tensor(case["theta"], dtype=theta_dtype, requires_grad=True)
    bias = torch.tensor(0.3, dtype=theta_dtype, requires_grad=True)
    loss, ce, kl = icd_fast.icd_loss_sharded(z_s, z_t, theta, bias, alpha=case["alpha"],
                                             max_scale=case["max_scale"],
                                             backend=case["backend"], return_parts=True)
    w_loss, w_ce, w_kl = upstream(rank)
    (w_loss * loss + w_ce * ce + w_kl * kl).backward()
    return {"loss": loss.detach(), "ce": ce.detach(), "kl": kl.detach(),
            "grad_z_s": z_s.grad, "grad_z_t": z_t.grad, "grad_theta": theta.grad,
            "grad_bias": bias.grad}


def unequal_rows_error(rank):
    z = torch.randn(3 + rank, 4)
    try:
        icd_fast.icd_loss_sharded(z, z, 1.0)
    except ValueError as error:
        return str(error)
    return None


def main(rank, world, init_file, plan_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    plan = torch.load(plan_file, weights_only=False)
    results = {name: run_case(case, rank) for name, case in plan["cases"].items()}
    if plan.get("check_unequal_rows"):
        results["unequal_rows_error"] = unequal_rows_error(rank)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6])
