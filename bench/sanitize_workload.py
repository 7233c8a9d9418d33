"""A small CUDA workload for compute-sanitizer (memcheck, racecheck): the fused forward and
backward over ragged sizes, every dtype, both exponent paths, strided inputs.

    compute-sanitizer --tool memcheck python bench/sanitize_workload.py
"""
import torch

import icd_fast


def main():
    gen = torch.Generator().manual_seed(0)
    for n, d in ((1, 1), (7, 3), (33, 130), (130, 128)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for theta, max_scale in ((1.0, 10.0), (4.0, 100.0)):  # fixed shift, online max
                z_s = torch.randn(n, 2 * d, generator=gen)[:, ::2].to("cuda", dtype)
                z_t = torch.randn(n, d, generator=gen).to("cuda", dtype)
                z_s.requires_grad_(), z_t.requires_grad_()
                th = torch.tensor(theta, device="cuda", requires_grad=True)
                loss = icd_fast.icd_loss(z_s, z_t, th, max_scale=max_scale, backend="cuda")
                loss.backward()
                torch.cuda.synchronize()
                assert torch.isfinite(loss), (n, d, dtype, theta)
    print("sanitize workload done")


if __name__ == "__main__":
    main()
