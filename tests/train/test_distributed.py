"""DDP under torchrun on the gloo backend (CPU): two processes match one process on the same
global batch, and the command line runs under torchrun with rank 0 alone writing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.engine import GlobalBatchSampler

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "distributed" / "fit_worker.py"


def torchrun(*args, procs=2, timeout=300):
    # faulthandler: a worker that aborts prints every thread's stack.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "PYTHONFAULTHANDLER": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={procs}", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_rank_batches_put_together_are_the_one_process_batches():
    one = list(GlobalBatchSampler(50, 12, seed=3, epoch=2))
    ranks = [list(GlobalBatchSampler(50, 12, seed=3, epoch=2, rank=r, world_size=3))
             for r in range(3)]
    assert len(one) == 4 and all(len(r) == 4 for r in ranks)
    for step, batch in enumerate(one):
        assert sum((r[step] for r in ranks), []) == batch
    assert one != list(GlobalBatchSampler(50, 12, seed=3, epoch=3))  # reshuffled per epoch
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        GlobalBatchSampler(50, 10, 0, 0, world_size=3)
    with pytest.raises(ValueError, match="larger than the training set"):
        GlobalBatchSampler(5, 8, 0, 0)


@pytest.mark.slow
@pytest.mark.parametrize("procs,batch_size", [(2, 32), (3, 30)])
def test_gloo_processes_match_one_process_on_the_global_batch(tmp_path, procs, batch_size):
    single, double = tmp_path / "one", tmp_path / "many"
    single.mkdir(), double.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(WORKER), str(single), "icd_kd", str(batch_size)],
                   check=True, env=env, timeout=300)
    done = torchrun(WORKER, double, "icd_kd", batch_size, procs=procs)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-12000:]
    one = torch.load(single / "result.pt", weights_only=False)
    two = torch.load(double / "result.pt", weights_only=False)
    assert len(one["rows"]) == len(two["rows"]) == 4
    for a, b in zip(one["rows"], two["rows"]):
        # The ICD term is the global batch's in both runs: each rank's share of the sharded
        # loss (its own rows against all ranks' rows), averaged over the ranks by the loop.
        for key in ("loss", "ce", "kd", "icd"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
        assert b["test_acc"] == a["test_acc"]
    moved = max((one["student"][k] - one["initial"][k]).abs().max() for k in one["student"])
    apart = max((one["student"][k] - two["student"][k]).abs().max() for k in one["student"])
    assert moved > 1e-2 and apart < 1e-5, (moved, apart)
    assert torch.allclose(one["log_scale"], two["log_scale"], atol=1e-6)
    assert one["log_scale"] != 1.0  # theta trained in both
    # Rank 0 alone wrote the run folder; nothing half-written is left.
    names = sorted(p.name for p in (double / "run").iterdir())
    assert names == ["best.pt", "last.pt", "log.csv", "run.json"]
    assert len((double / "run" / "log.csv").read_text().splitlines()) == 1 + 4
    state = torch.load(double / "run" / "last.pt", weights_only=False)
    assert len(state["rng"]) == procs  # each rank's RNG state, for an exact resume


@pytest.mark.slow
def test_distill_command_runs_under_torchrun(tmp_path):
    from train.cli import main

    common = ["--dataset", "digits", "--epochs", "1", "--batch-size", "64", "--device", "cpu"]
    assert main(["train-teacher", "--model", "resnet8", "--out", str(tmp_path / "t"),
                 *common]) == 0
    done = torchrun("-m", "train", "distill", "--teacher", "resnet8", "--teacher-ckpt",
                    tmp_path / "t" / "best.pt", "--student", "resnet8", "--method", "icd",
                    "--out", tmp_path / "s", *common)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-12000:]
    assert done.stdout.count("icd resnet8: epoch 0") == 1  # printed by rank 0 only
    assert (tmp_path / "s" / "best.pt").exists()


@pytest.mark.slow
def test_crd_memory_banks_stay_identical_across_ranks(tmp_path):
    # The ranks start from different random banks (other seeds); fit broadcasts rank 0's,
    # and every update uses all ranks' samples, with no per-step broadcast.
    done = torchrun(WORKER, tmp_path, "crd")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-12000:]
    rank0, rank1 = (torch.load(tmp_path / f"banks{r}.pt", weights_only=False) for r in (0, 1))
    for name in ("memory_s", "memory_t"):
        assert torch.equal(rank0[name], rank1[name]), name
    assert rank0["rows"][-1]["loss"] < rank0["rows"][0]["loss"]
