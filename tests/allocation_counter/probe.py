"""Child process of measure_icd_allocations: python probe.py N D THREADS DTYPE (run under
LD_PRELOAD=counting_malloc.so); prints one JSON line."""
import ctypes
import gc
import json
import sys

import torch

import icd_fast


def main(n: int, d: int, threads: int, dtype_name: str) -> None:
    counter = ctypes.CDLL(None)
    for name in ("counting_malloc_live_bytes", "counting_malloc_peak_bytes"):
        getattr(counter, name).restype = ctypes.c_int64
    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    z_s = torch.randn(n, d, generator=gen, dtype=dtype, requires_grad=True)
    z_t = torch.randn(n, d, generator=gen, dtype=dtype, requires_grad=True)
    theta = torch.tensor(1.0, requires_grad=True)

    def forward():
        return icd_fast.icd_loss(z_s, z_t, theta, backend="cpu")

    for _ in range(2):  # warm-up: thread pools, BLAS buffers, the op's first-call set-up
        forward().backward()
        z_s.grad = z_t.grad = theta.grad = None
    gc.collect()

    start = counter.counting_malloc_live_bytes()
    counter.counting_malloc_reset_peak()
    loss = forward()
    forward_peak = counter.counting_malloc_peak_bytes() - start
    forward_kept = counter.counting_malloc_live_bytes() - start
    loss.backward()
    step_peak = counter.counting_malloc_peak_bytes() - start
    assert torch.isfinite(loss) and z_s.grad is not None
    print(json.dumps({"n": n, "d": d, "threads": torch.get_num_threads(), "dtype": dtype_name,
                      "forward_peak_bytes": forward_peak, "forward_kept_bytes": forward_kept,
                      "step_peak_bytes": step_peak}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
