"""A small workload for compute-sanitizer (memcheck, racecheck, initcheck, synccheck): the
fused forward and backward over ragged sizes, fp32, fp64, fp16, bf16 and fp32 on the TF32
tensor cores, both exponent paths (the fixed shift and the online maximum), and inputs in
every layout the launchers meet, each created on the device as it is (strided, transposed,
misaligned by one element), so that the non-contiguous paths are the ones sanitized.

    compute-sanitizer --tool memcheck python bench/sanitize_workload.py

The caching allocator is switched off (PYTORCH_NO_CUDA_MEMORY_CACHING=1, set below before
torch is imported): inside its large segments memcheck cannot see a small out-of-bounds
access. Where the build has the row-range operators (torch.ops.icd_fast.icd_forward_rows,
icd_backward_rows) they run too, on row ranges of the same problems; the last line says
whether they were there. `--device cpu` runs the same cases on the CPU kernel (a smoke test
of this script where there is no GPU).
"""
import argparse
import itertools
import os

if __name__ == "__main__":  # run as the workload; importing it (the tests) changes nothing
    os.environ["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"

import torch  # noqa: E402

import icd_fast  # noqa: E402

SIZES = ((1, 1), (7, 3), (33, 130), (130, 128))
# (name, dtype, TF32 allowed): fp32 with TF32 takes the tensor cores where sm_80+ code runs.
PRECISIONS = (("float32", torch.float32, False), ("float64", torch.float64, False),
              ("float16", torch.float16, False), ("bfloat16", torch.bfloat16, False),
              ("tf32", torch.float32, True))
# (log_scale, max_scale): kappa = e under the fixed shift; kappa = e^4 > 32 takes the online max.
SCALES = ((1.0, 10.0), (4.0, 100.0))


def strided(n, d, dtype, device, gen):
    """Every other column of a (n, 2d) tensor: row stride 2d, column stride 2."""
    return torch.randn(n, 2 * d, generator=gen, device=device, dtype=dtype)[:, ::2]


def transposed(n, d, dtype, device, gen):
    """Column-major: the transpose of a contiguous (d, n) tensor."""
    return torch.randn(d, n, generator=gen, device=device, dtype=dtype).t()


def misaligned(n, d, dtype, device, gen):
    """Contiguous rows starting one element past the allocation: no 16-byte alignment."""
    return torch.randn(n * d + 1, generator=gen, device=device, dtype=dtype)[1:].view(n, d)


def contiguous(n, d, dtype, device, gen):
    return torch.randn(n, d, generator=gen, device=device, dtype=dtype)


LAYOUTS = {"strided": strided, "transposed": transposed, "misaligned": misaligned,
           "contiguous": contiguous}


def cases():
    """Every precision at every size and scale; the layouts rotate, so that each precision
    meets each layout at two (size, scale) pairs."""
    layouts = itertools.cycle(LAYOUTS)
    for precision in PRECISIONS:
        for (n, d), (theta, max_scale) in itertools.product(SIZES, SCALES):
            yield precision, n, d, theta, max_scale, next(layouts)


def run_case(precision, n, d, theta, max_scale, layout, device, gen):
    name, dtype, tf32 = precision
    make = LAYOUTS[layout]
    z_s = make(n, d, dtype, device, gen).requires_grad_()
    z_t = make(n, d, dtype, device, gen).requires_grad_()
    # A Python number for the scale in the contiguous cases (the operator builds its tensor).
    th = theta if layout == "contiguous" else torch.tensor(theta, device=device, requires_grad=True)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        loss, ce, kl = icd_fast.icd_loss(z_s, z_t, th, max_scale=max_scale,
                                         backend=device.type, return_parts=True)
        # Different upstream weights on the loss and its parts reach every gradient term.
        (loss + 0.5 * ce - 0.25 * kl).backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    if device.type == "cuda":
        torch.cuda.synchronize()
    grads = [z_s.grad, z_t.grad] + ([th.grad] if isinstance(th, torch.Tensor) else [])
    where = f"{name} N={n} D={d} theta={theta} {layout}"
    assert torch.isfinite(loss), f"non-finite loss at {where}"
    assert all(bool(torch.isfinite(g).all()) for g in grads), f"non-finite gradient at {where}"


ROW_RANGES = ((0, 130), (0, 1), (31, 33), (125, 5))  # of N = 130: whole, one row, inner, tail


def row_range_status(device, gen, ops=None) -> str:
    """Runs icd_forward_rows / icd_backward_rows (the sharded loss's kernels) on row ranges of
    strided and transposed inputs in every precision, with different upstream weights per
    row, where the build has them (``ops``: the op namespace, torch.ops.icd_fast by default)."""
    ops = ops if ops is not None else torch.ops.icd_fast
    if not (hasattr(ops, "icd_forward_rows") and hasattr(ops, "icd_backward_rows")):
        return "row-range ops absent from this build (not sanitized)"
    runs = 0
    n, d, max_scale = 130, 128, 10.0
    for _, dtype, _ in PRECISIONS[:4]:
        z_s, z_t = strided(n, d, dtype, device, gen), transposed(n, d, dtype, device, gen)
        log_scale = torch.tensor(1.0, device=device)
        all_rows = ops.icd_forward_rows(z_s, z_t, log_scale, 0, n, max_scale)
        acc = all_rows[0].dtype
        weight_ce = torch.linspace(0.5, 1.5, n, device=device, dtype=acc) / n
        weight_kl = torch.linspace(-0.25, 0.75, n, device=device, dtype=acc) / n
        for begin, count in ROW_RANGES:
            *_, unit, norms = ops.icd_forward_rows(z_s, z_t, log_scale, begin, count, max_scale)
            ops.icd_backward_rows(unit, norms, log_scale, *all_rows[:3], weight_ce, weight_kl,
                                  begin, count, max_scale, dtype,
                                  bool(torch.backends.cuda.matmul.allow_tf32))
            if device.type == "cuda":
                torch.cuda.synchronize()
            runs += 1
    return f"row-range ops ran {runs} ranges"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    gen = torch.Generator(device=device).manual_seed(0)
    count = 0
    for case in cases():
        run_case(*case, device, gen)
        count += 1
    try:
        rows = row_range_status(device, gen)
    except Exception as error:  # noqa: BLE001  (a build whose ops fail is reported, not fatal)
        rows = f"row-range ops present, but the call failed: {type(error).__name__}: {error}"[:300]
    caching = "off" if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1" else "on"
    print(f"sanitize workload done: {count} cases on {device.type}, caching allocator "
          f"{caching}, {rows}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
