"""Multi-process training under torchrun (DDP): process group set-up from the environment,
the rank helpers the loop needs, and gathering rows across ranks.

ICD contrasts every sample of a batch with every other one; under DDP it does so through
icd_fast.icd_loss_sharded, which gathers what it needs itself and computes only this rank's
rows. CRD's memory banks take every rank's samples through `gather`.
"""
from __future__ import annotations

import os
import re
import sys
from datetime import timedelta
from typing import List

import torch
import torch.distributed as dist

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"  # the --device values this application trains on


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "auto") -> torch.device:
    """Joins the process group torchrun describes (WORLD_SIZE > 1): NCCL on GPUs, gloo on
    CPUs. Returns the device this process trains on."""
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise ValueError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N")
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but torch sees no CUDA device")
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    if not use_cuda:
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def shutdown(wait_for_all: bool = True) -> None:
    """Leaves the process group. wait_for_all: first meet every rank at a barrier, so no rank
    tears down its connections while another still uses them (gloo aborts the process
    then); pass False on an error path, where the other ranks may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_all and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def exit_process(status: int) -> None:
    """Ends a process that torchrun started (WORLD_SIZE > 1) right away, after flushing its
    output, skipping the interpreter's finalisation; returns for any other process.

    Now and then (3 of about 60 torchrun launches on a 2-core machine) a gloo worker aborted
    while the interpreter was finalising ("terminate called without an active exception",
    no Python frame left), after its work was done and its process group destroyed: a
    torch-internal thread outliving the interpreter. Skipping finalisation avoids it; every
    file this application writes is complete (flushed and renamed) before this point.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        values = values.clone()
        dist.all_reduce(values)
    return values


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrites tensor on every rank with rank src's values (in place)."""
    if is_distributed():
        dist.broadcast(tensor, src)
    return tensor


def all_gather_objects(obj) -> List:
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenation of x over ranks, without gradient."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def say(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)
